#!/usr/bin/env bash
# How each runtime model absorbs per-request work: the bare hyper server
# (bench/bare_hyper.rs) on Tokio's work-stealing runtime and on cachegate's connection
# threads (`--pinned`), each spinning a given number of nanoseconds per request
# (`--work-ns`, standing in for a handler's own work, such as a cache's key and lookup),
# and cachegate's memory tier for reference, all answering the same stored response.
# ROUNDS rounds (default 3), every server loaded in turn in each round with
# `wrk -t2 -c<connections> -d<seconds>`; prints the mean requests/s and the ratio to the
# same model with the first amount of work (0 by default: none).
#
#   bench/runtime_work.sh [seconds per run, default 4] [connections, default 50] [work in ns, default "0 500 1000 2000"]
#
# Everything listens on 127.0.0.1; every process started here is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-4}"
CONNECTIONS="${2:-50}"
read -r -a WORK_NS <<<"${3:-0 500 1000 2000}"
ROUNDS="${ROUNDS:-3}"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a whole number from 1" >&2; exit 1; }
for ns in "${WORK_NS[@]}"; do
  [[ "$ns" =~ ^[0-9]+$ ]] || { echo "work must be whole nanoseconds: $ns" >&2; exit 1; }
done
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install -y wrk)" >&2; exit 1; }

cargo build --release --locked -q --bin cachegate --example bare_hyper
WORK="$(mktemp -d)"
PIDS=()
. bench/lib.sh   # cleanup on exit, free_port, wait_http

UP=$(free_port)
python3 bench/upstream.py "$UP" & PIDS+=($!)
wait_http "http://127.0.0.1:$UP/"
ORIGIN="http://127.0.0.1:$UP/kpi/revenue"

declare -A URL RPS
NAMES=()
for ns in "${WORK_NS[@]}"; do
  for model in shared pinned; do
    port=$(free_port)
    flag=(); [ "$model" = pinned ] && flag=(--pinned)
    target/release/examples/bare_hyper "127.0.0.1:$port" "$ORIGIN" "${flag[@]}" "--work-ns=$ns" & PIDS+=($!)
    wait_http "http://127.0.0.1:$port/kpi/revenue"
    NAMES+=("$model/$ns"); URL["$model/$ns"]="http://127.0.0.1:$port/kpi/revenue"
  done
done
CG=$(free_port); ADMIN=$(free_port)
printf 'listen = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\n[upstream]\nurl = "http://127.0.0.1:%s"\n' \
  "$CG" "$ADMIN" "$UP" > "$WORK/cachegate.toml"
CACHEGATE_LOG=warn target/release/cachegate serve --config "$WORK/cachegate.toml" & PIDS+=($!)
wait_http "http://127.0.0.1:$ADMIN/healthz"
status=""
for _ in $(seq 50); do
  status=$(curl -s -D - -o /dev/null "http://127.0.0.1:$CG/kpi/revenue" | tr -d '\r' |
    awk -F': ' 'tolower($1)=="x-cache-status"{print $2}')
  [ "$status" = "HIT" ] && break
  sleep 0.05
done
[ "$status" = "HIT" ] || { echo "cachegate does not answer with a hit ($status)" >&2; exit 1; }
NAMES+=(cachegate); URL[cachegate]="http://127.0.0.1:$CG/kpi/revenue"

for round in $(seq "$ROUNDS"); do
  for k in "${!NAMES[@]}"; do
    name=${NAMES[$(( (k + round) % ${#NAMES[@]} ))]}
    out=$(wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" "${URL[$name]}")
    if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
      echo "$name: errors during load:" >&2; grep "Non-2xx\|Socket errors" <<<"$out" >&2; exit 1
    fi
    rps=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$out")
    [ -n "$rps" ] || { echo "$name: no figure from wrk" >&2; exit 1; }
    RPS[$name]=$(( ${RPS[$name]:-0} + rps ))
  done
done

echo
echo "per-request work, $ROUNDS rounds x ${DURATION}s, wrk -t2 -c$CONNECTIONS, $(nproc) cores ($(date -u +%Y-%m-%d))"
printf '| %-10s | %12s | %12s | %12s | %12s |\n' "work ns" "shared rt" "vs ${WORK_NS[0]} ns" "pinned" "vs ${WORK_NS[0]} ns"
printf '|%s|%s|%s|%s|%s|\n' "------------" "--------------" "--------------" "--------------" "--------------"
base="${WORK_NS[0]}"
for ns in "${WORK_NS[@]}"; do
  awk -v ns="$ns" -v s="${RPS[shared/$ns]}" -v p="${RPS[pinned/$ns]}" -v s0="${RPS[shared/$base]}" \
      -v p0="${RPS[pinned/$base]}" -v k="$ROUNDS" \
    'BEGIN { printf "| %-10s | %12.0f | %11.2fx | %12.0f | %11.2fx |\n", ns, s/k, s/s0, p/k, p/p0 }'
done
awk -v c="${RPS[cachegate]}" -v s0="${RPS[shared/$base]}" -v p0="${RPS[pinned/$base]}" -v k="$ROUNDS" \
  -v b="$base" 'BEGIN { printf "cachegate (memory tier): %.0f requests/s, %.2fx shared rt, %.2fx pinned (%s ns of work)\n", c/k, c/s0, c/p0, b }'
