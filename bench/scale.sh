#!/usr/bin/env bash
# Hit throughput as the number of cached keys grows: cachegate's memory tier holding 1,
# 1 k, 100 k and 1 M entries, loaded with Zipf-distributed requests over all of them
# (bench/zipf.lua, exponent 0.99). One fresh cachegate per size, each filled once with
# every key (bench/fill.lua) and kept running; then ROUNDS rounds (default 3), each running
# wrk (two one-thread processes that start together once both have drawn their keys) for
# the given seconds against every size in turn, so that the box's drift between
# runs falls on all sizes alike. In every round the same Zipf script also runs against the
# origin itself (the bare hyper server, no per-key work): what wrk's own key table costs
# at each size. Every round also loads each size paced (PACE_MS, default 1: each
# connection waits that long between requests, a fraction of the saturating rate), so that
# the tail is also seen below saturation. Prints, per size, the median requests/s and
# p50/p99 over the rounds (and the p99 range), the share of hits, the ratios to the first
# size (1 key by default), the paced requests/s, p99 and p99 ratio, and
# memory per entry: the process's resident memory after filling minus before, divided by
# the entries held (shown from 100 k entries on: below, the allocator's fixed costs
# dominate), and the memory tier's own count (`memory_max_bytes` is counted in these bytes).
#
#   bench/scale.sh [seconds per run, default 10] [connections, default 50] [sizes, default "1 1000 100000 1000000"]
#
# With CONNECTION_THREADS=N, cachegate runs with `[server] connection_threads = N` (0: the
# shared work-stealing runtime); ROUNDS=N sets the rounds.
#
# The origin is the bare hyper server (bench/bare_hyper.rs --origin), which answers any
# path with bench/upstream.py's 66-byte response (fetched once), so that filling a million
# keys takes seconds. With SCALE_TSV=FILE, the table is also written to FILE
# (tab-separated: keys, requests/s, p50 ms, p99 ms, hit share, RSS and weighed bytes per
# entry, origin requests/s, origin p99 ms, paced requests/s, paced p99 ms; medians).
# PACE_MS=0 leaves the paced runs out.
# Everything listens on 127.0.0.1; every process started here is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CONNECTIONS="${2:-50}"
SIZES="${3:-1 1000 100000 1000000}"
ROUNDS="${ROUNDS:-3}"
PACE_MS="${PACE_MS:-1}"
[[ $PACE_MS =~ ^[0-9]+$ ]] || { echo "PACE_MS: whole milliseconds, 0 for none; found '$PACE_MS'" >&2; exit 2; }
command -v wrk >/dev/null || { SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk; }

cargo build --release --locked -q --bin cachegate --example bare_hyper
WORK="$(mktemp -d)"
PIDS=()
. bench/lib.sh   # cleanup on exit, forget, free_port, wait_http, to_ms
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# stat_of ADMIN_PORT EXPR: EXPR over the instance's JSON stats `s`.
stat_of() { curl -s "http://127.0.0.1:$1/stats" | python3 -c "import json,sys; s=json.load(sys.stdin); print($2)"; }
hits_of() { stat_of "$1" 's["requests"]["by_status"].get("hit",{}).get("total",0)'; }
total_of() { stat_of "$1" 's["requests"]["total"]'; }
# median of the numbers on stdin
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# load KEYS URL [PACE_MS]: one load (paced when PACE_MS is given) by two wrk processes of
# one thread and half the connections each, which finish their Zipf tables first and then
# start together (zipf.lua's barrier: with one `-t2` process, wrk builds the second
# thread's table while the first already loads, over a second at 1 M keys); prints
# "requests/s p50_ms p99_ms": the sum of their requests/s, the mean of their p50 and of
# their p99 (the two halves of one load).
load() {
  local dir pids=() party out rps=0 p50=0 p99=0
  dir=$(mktemp -d -p "$WORK")
  for party in 1 2; do
    local conns=$(( party == 1 ? CONNECTIONS / 2 : CONNECTIONS - CONNECTIONS / 2 ))
    ZIPF_KEYS=$1 ZIPF_DELAY_MS=${3:-0} ZIPF_BARRIER=$dir ZIPF_PARTY=$party ZIPF_PARTIES=2 \
      wrk -t1 -c"$conns" -d"${DURATION}s" --latency -s bench/zipf.lua "$2" > "$dir/out.$party" &
    pids+=($!); PIDS+=($!)
  done
  for party in 1 2; do
    wait "${pids[$((party - 1))]}" || { echo "wrk failed" >&2; exit 1; }
    forget "${pids[$((party - 1))]}"
    out=$(cat "$dir/out.$party")
    rps=$(awk -v a="$rps" '/^Requests\/sec:/ {printf "%.0f", a + $2}' <<<"$out")
    p50=$(awk -v a="$p50" -v x="$(awk '$1=="50%"{print $2}' <<<"$out" | to_ms)" 'BEGIN {printf "%.3f", a + x / 2}')
    p99=$(awk -v a="$p99" -v x="$(awk '$1=="99%"{print $2}' <<<"$out" | to_ms)" 'BEGIN {printf "%.3f", a + x / 2}')
  done
  echo "$rps $p50 $p99"
}

UP=$(free_port); ORIGIN=$(free_port)
python3 bench/upstream.py "$UP" & PIDS+=($!)
wait_http "http://127.0.0.1:$UP/"
target/release/examples/bare_hyper "127.0.0.1:$ORIGIN" "http://127.0.0.1:$UP/kpi/revenue" --origin & PIDS+=($!)
wait_http "http://127.0.0.1:$ORIGIN/kpi/k0"

# One filled instance per size.
declare -A CG_PORT ADMIN_PORT PID_OF ENTRIES WEIGHED PER_ENTRY
for keys in $SIZES; do
  CG=$(free_port); ADMIN=$(free_port)
  cat > "$WORK/cachegate-$keys.toml" <<TOML
listen = "127.0.0.1:$CG"
admin_listen = "127.0.0.1:$ADMIN"
[upstream]
url = "http://127.0.0.1:$ORIGIN"
[cache]
memory_max_bytes = 4294967296
TOML
  [ -n "${CONNECTION_THREADS:-}" ] && printf '[server]\nconnection_threads = %s\n' "$CONNECTION_THREADS" >> "$WORK/cachegate-$keys.toml"
  CACHEGATE_LOG=warn target/release/cachegate serve --config "$WORK/cachegate-$keys.toml" & pid=$!
  PIDS+=($pid)
  wait_http "http://127.0.0.1:$ADMIN/healthz"
  before=$(rss_kib "$pid")
  # wrk runs for its whole -d even once its threads stop: stopped here once every key was
  # answered (bounded: 600 s).
  FILL_KEYS=$keys FILL_THREADS=2 wrk -t2 -c"$CONNECTIONS" -d600s -s bench/fill.lua \
    "http://127.0.0.1:$CG/" >/dev/null & fill=$!
  PIDS+=($fill)
  for _ in $(seq 6000); do
    [ "$(stat_of "$ADMIN" 's["memory"]["entries"]')" -ge "$keys" ] && break
    sleep 0.1
  done
  kill "$fill" 2>/dev/null || true; wait "$fill" 2>/dev/null || true
  forget "$fill"
  entries=$(stat_of "$ADMIN" 's["memory"]["entries"]')
  [ "$entries" -ge $((keys * 99 / 100)) ] || echo "  (only $entries of $keys keys were held after filling)" >&2
  CG_PORT[$keys]=$CG; ADMIN_PORT[$keys]=$ADMIN; PID_OF[$keys]=$pid; ENTRIES[$keys]=$entries
  WEIGHED[$keys]=$(awk -v w="$(stat_of "$ADMIN" 's["memory"]["bytes"]')" -v n="$entries" 'BEGIN { printf "%.0f", n ? w / n : 0 }')
  PER_ENTRY[$keys]=$(awk -v a="$(rss_kib "$pid")" -v b="$before" -v n="$entries" 'BEGIN { printf "%.0f", n ? (a - b) * 1024 / n : 0 }')
done

for round in $(seq "$ROUNDS"); do
  for keys in $SIZES; do
    admin=${ADMIN_PORT[$keys]}
    hits0=$(hits_of "$admin"); total0=$(total_of "$admin")
    load "$keys" "http://127.0.0.1:${CG_PORT[$keys]}/" >> "$WORK/cachegate.$keys"
    hits1=$(hits_of "$admin"); total1=$(total_of "$admin")
    echo $((hits1 - hits0)) $((total1 - total0)) >> "$WORK/hits.$keys"
    load "$keys" "http://127.0.0.1:$ORIGIN/" >> "$WORK/origin.$keys"
    if [ "$PACE_MS" -gt 0 ]; then
      load "$keys" "http://127.0.0.1:${CG_PORT[$keys]}/" "$PACE_MS" >> "$WORK/paced.$keys"
    fi
  done
done

echo "keys, $(nproc) cores, 2 x wrk -t1, $CONNECTIONS connections, ${DURATION}s x $ROUNDS rounds (medians), Zipf 0.99 ($(date -u +%Y-%m-%d))"
printf '| %9s | %10s | %7s | %7s | %13s | %8s | %12s | %10s | %12s | %10s | %11s | %15s | %12s | %10s | %16s |\n' "keys" "requests/s" "p50 ms" "p99 ms" "p99 range" "hits" "req/s vs 1st" "p99 vs 1st" "origin req/s" "origin p99" "RSS B/entry" "weighed B/entry" \
  "paced req/s" "paced p99" "paced p99 vs 1st"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' "-----------" "------------" "---------" "---------" "---------------" "----------" "--------------" "------------" "--------------" "------------" "-------------" "-----------------" \
  "--------------" "------------" "------------------"
[ -n "${SCALE_TSV:-}" ] && : > "$SCALE_TSV"
BASE_RPS=""; BASE_P99=""; BASE_PACED_P99=""
for keys in $SIZES; do
  rps=$(awk '{print $1}' "$WORK/cachegate.$keys" | median)
  p50=$(awk '{print $2}' "$WORK/cachegate.$keys" | median)
  p99=$(awk '{print $3}' "$WORK/cachegate.$keys" | median)
  range=$(awk '{print $3}' "$WORK/cachegate.$keys" | sort -g | awk 'NR==1{lo=$1} {hi=$1} END{printf "%s-%s", lo, hi}')
  hits=$(awk '{ h += $1; t += $2 } END { printf "%.4f", t ? h / t : 0 }' "$WORK/hits.$keys")
  origin_rps=$(awk '{print $1}' "$WORK/origin.$keys" | median)
  origin_p99=$(awk '{print $3}' "$WORK/origin.$keys" | median)
  [ -z "$BASE_RPS" ] && { BASE_RPS=$rps; BASE_P99=$p99; }
  paced_rps="-"; paced_p99="-"; paced_ratio="-"
  if [ -s "$WORK/paced.$keys" ]; then
    paced_rps=$(awk '{print $1}' "$WORK/paced.$keys" | median | xargs printf '%.0f')
    paced_p99=$(awk '{print $3}' "$WORK/paced.$keys" | median | xargs printf '%.3f')
    [ -z "$BASE_PACED_P99" ] && BASE_PACED_P99=$paced_p99
    paced_ratio="$(awk -v a="$paced_p99" -v b="$BASE_PACED_P99" 'BEGIN{printf "%.2fx", a/b}')"
  fi
  printf '| %9s | %10.0f | %7.3f | %7.3f | %13s | %7.2f%% | %11.2fx | %9.2fx | %12.0f | %10.3f | %11s | %15s | %12s | %10s | %16s |\n' "$keys" "$rps" "$p50" "$p99" "$range" \
    "$(awk -v h="$hits" 'BEGIN{print h*100}')" "$(awk -v a="$rps" -v b="$BASE_RPS" 'BEGIN{print a/b}')" \
    "$(awk -v a="$p99" -v b="$BASE_P99" 'BEGIN{print a/b}')" "$origin_rps" "$origin_p99" \
    "$([ "$keys" -ge 100000 ] && echo "${PER_ENTRY[$keys]}" || echo "-")" "${WEIGHED[$keys]}" \
    "$paced_rps" "$paced_p99" "$paced_ratio"
  if [ -n "${SCALE_TSV:-}" ]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$keys" "$rps" "$p50" "$p99" "$hits" "${PER_ENTRY[$keys]}" "${WEIGHED[$keys]}" "$origin_rps" "$origin_p99" "$paced_rps" "$paced_p99" >> "$SCALE_TSV"
  fi
done
