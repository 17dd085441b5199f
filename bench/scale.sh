#!/usr/bin/env bash
# Hit throughput as the number of cached keys grows: cachegate's memory tier holding 1,
# 1 k, 100 k and 1 M entries, loaded with Zipf-distributed requests over all of them
# (bench/zipf.lua, exponent 0.99). For each size: a fresh cachegate, filled once with
# every key (bench/fill.lua), then wrk for the given seconds. Prints requests/s, p50/p99,
# the share of hits, the ratio to the first size's run (1 key by default), and memory per entry: the process's
# resident memory after filling minus before, divided by the entries held (shown from 100 k
# entries on: below, the allocator's fixed costs dominate), and the memory tier's own
# count (`memory_max_bytes` is counted in these bytes).
#
#   bench/scale.sh [seconds per run, default 10] [connections, default 50] [sizes, default "1 1000 100000 1000000"]
#
# The origin is the bare hyper server (bench/bare_hyper.rs --origin), which answers any
# path with bench/upstream.py's 66-byte response (fetched once), so that filling a million
# keys takes seconds. With SCALE_TSV=FILE, the table is also written to FILE
# (tab-separated: keys, requests/s, p50 ms, p99 ms, hit share, RSS and weighed bytes per
# entry).
# Everything listens on 127.0.0.1; every process started here is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CONNECTIONS="${2:-50}"
SIZES="${3:-1 1000 100000 1000000}"
command -v wrk >/dev/null || { SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk; }

cargo build --release --locked -q --bin cachegate --example bare_hyper
WORK="$(mktemp -d)"
PIDS=()
. bench/lib.sh   # cleanup on exit, forget, free_port, wait_http, to_ms
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
stat_of() { curl -s "http://127.0.0.1:$ADMIN/stats" | python3 -c "import json,sys; s=json.load(sys.stdin); print($1)"; }

UP=$(free_port); ORIGIN=$(free_port)
python3 bench/upstream.py "$UP" & PIDS+=($!)
wait_http "http://127.0.0.1:$UP/"
target/release/examples/bare_hyper "127.0.0.1:$ORIGIN" "http://127.0.0.1:$UP/kpi/revenue" --origin & PIDS+=($!)
wait_http "http://127.0.0.1:$ORIGIN/kpi/k0"

echo "keys, $(nproc) cores, wrk -t2 -c$CONNECTIONS -d${DURATION}s, Zipf 0.99 ($(date -u +%Y-%m-%d))"
printf '| %9s | %12s | %9s | %9s | %8s | %10s | %11s | %11s |\n' "keys" "requests/s" "p50 ms" "p99 ms" "hits" "vs first" "RSS B/entry" "weighed B/entry"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' "-----------" "--------------" "-----------" "-----------" "----------" "------------" "-------------" "-----------------"
[ -n "${SCALE_TSV:-}" ] && : > "$SCALE_TSV"
BASE=""
for keys in $SIZES; do
  CG=$(free_port); ADMIN=$(free_port)
  cat > "$WORK/cachegate.toml" <<TOML
listen = "127.0.0.1:$CG"
admin_listen = "127.0.0.1:$ADMIN"
[upstream]
url = "http://127.0.0.1:$ORIGIN"
[cache]
memory_max_bytes = 4294967296
TOML
  CACHEGATE_LOG=warn target/release/cachegate serve --config "$WORK/cachegate.toml" & pid=$!
  PIDS+=($pid)
  wait_http "http://127.0.0.1:$ADMIN/healthz"
  before=$(rss_kib "$pid")
  # wrk runs for its whole -d even once its threads stop: stopped here once every key was
  # answered (bounded: 600 s).
  FILL_KEYS=$keys FILL_THREADS=2 wrk -t2 -c"$CONNECTIONS" -d600s -s bench/fill.lua \
    "http://127.0.0.1:$CG/" >/dev/null & fill=$!
  PIDS+=($fill)
  for _ in $(seq 6000); do
    [ "$(stat_of 's["memory"]["entries"]')" -ge "$keys" ] && break
    sleep 0.1
  done
  kill "$fill" 2>/dev/null || true; wait "$fill" 2>/dev/null || true
  forget "$fill"
  entries=$(stat_of 's["memory"]["entries"]')
  weighed=$(stat_of 's["memory"]["bytes"]')
  after=$(rss_kib "$pid")
  hits0=$(stat_of 's["requests"]["by_status"].get("hit",{}).get("total",0)')
  total0=$(stat_of 's["requests"]["total"]')
  out=$(ZIPF_KEYS=$keys wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s bench/zipf.lua "http://127.0.0.1:$CG/")
  hits1=$(stat_of 's["requests"]["by_status"].get("hit",{}).get("total",0)')
  total1=$(stat_of 's["requests"]["total"]')
  kill "$pid"; wait "$pid" 2>/dev/null || true
  forget "$pid"
  rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out" | to_ms)
  p99=$(awk '$1=="99%"{print $2}' <<<"$out" | to_ms)
  hits=$(awk -v h=$((hits1 - hits0)) -v t=$((total1 - total0)) 'BEGIN { printf "%.4f", t ? h / t : 0 }')
  per_entry=$(awk -v a="$after" -v b="$before" -v n="$entries" 'BEGIN { printf "%.0f", n ? (a - b) * 1024 / n : 0 }')
  weighed_per_entry=$(awk -v w="$weighed" -v n="$entries" 'BEGIN { printf "%.0f", n ? w / n : 0 }')
  [ -z "$BASE" ] && BASE=$rps
  printf '| %9s | %12s | %9s | %9s | %7.2f%% | %9.2fx | %11s | %15s |\n' "$keys" "$rps" "$p50" "$p99" \
    "$(awk -v h="$hits" 'BEGIN{print h*100}')" "$(awk -v a="$rps" -v b="$BASE" 'BEGIN{print a/b}')" \
    "$([ "$keys" -ge 100000 ] && echo "$per_entry" || echo "-")" "$weighed_per_entry"
  [ "$entries" -ge $((keys * 99 / 100)) ] || echo "  (only $entries of $keys keys were held after filling)" >&2
  if [ -n "${SCALE_TSV:-}" ]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$keys" "$rps" "$p50" "$p99" "$hits" "$per_entry" "$weighed_per_entry" >> "$SCALE_TSV"
  fi
done
