#!/usr/bin/env bash
# Memory-tier budget: fills an in-process cachegate's memory tier with 10 k, 100 k and 1 M
# tiny entries (one fresh process per size) and prints counted bytes, RSS and real bytes
# per entry. Target (issue 5): RSS <= memory_max_bytes + 40 MB at every size, and real
# overhead per entry beyond key + headers + body <= 200 B.
#
# Usage: bash bench/memory.sh [MEMORY_MAX_BYTES]   (default 16777216 = 16 MiB)
# Traffic stays on 127.0.0.1; each run is bounded by its entry count.
set -euo pipefail
cd "$(dirname "$0")/.."
max_bytes="${1:-16777216}"
cargo bench --bench memory --no-run --locked >/dev/null 2>&1 || cargo bench --bench memory --no-run --locked
for n in 10000 100000 1000000; do
  timeout 600 cargo bench --bench memory --locked -- "$n" "$max_bytes" 2>/dev/null | grep ' sent '
done
