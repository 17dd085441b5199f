#!/usr/bin/env bash
# Purge-by-tag cost: N values (default 100000) with one tag in the memory tier and in a real
# redis-server shared by two replicas; times the purge until both replicas acknowledged.
# Target (issue 7): under 1 s for 100 k entries. Installs redis-server when missing.
#
# Usage: bash bench/purge.sh [ENTRIES]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || {
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
}
timeout 600 cargo bench --bench purge --locked -- "${1:-100000}" 2>/dev/null | grep '^entries='
