#!/usr/bin/env bash
# Hit-path benchmark: cachegate against nginx proxy_cache, Varnish and a bare hyper server
# (bench/bare_hyper.rs: the stored response served by the HTTP stack alone, the ceiling;
# once on Tokio's shared work-stealing runtime, once with each connection on one thread as
# cachegate serves them), same origin, same small cached response, same load tool (wrk), in
# one run on this machine. cachegate runs answering from its memory tier (also with
# `connection_threads = 0`: connections on the shared runtime), and with the memory tier
# sized to zero so that every hit comes from Redis (a replica that has not seen the key
# yet), sealed entries and signed ones (`encrypt = false`); the memory tier is also loaded
# with a body-keyed POST (the natal-chart request of a `key_body` route), the same
# response. Prints requests/s and p50/p99 latency for each and cachegate's ratio to each
# peer.
#
#   bench/hit_path.sh [seconds per run, default 10] [connections, default 50]
#
# ROUNDS=N (default 3): rounds; the table shows their means, and the targets' ratios are
# also printed per round (each from runs of the same round), so that a round disturbed by
# the machine's other work shows.
#
# With HIT_PATH_TSV=FILE, the table is also written to FILE (tab-separated: name,
# requests/s, p50 ms, p99 ms), the input of bench/chart.sh.
#
# Installs nginx, varnish, redis-server and wrk from Debian's packages when missing. Everything listens on
# 127.0.0.1; every process started here is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CONNECTIONS="${2:-50}"
ROUNDS="${ROUNDS:-3}"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a whole number from 1" >&2; exit 1; }

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v varnishd >/dev/null || [ -x /usr/sbin/varnishd ] || missing+=(varnish)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
VARNISHD="$(command -v varnishd || echo /usr/sbin/varnishd)"

cargo build --release --locked -q --bin cachegate --example bare_hyper
WORK="$(mktemp -d)"
chmod 755 "$WORK"
PIDS=()
. bench/lib.sh   # cleanup on exit, forget, free_port, wait_http, to_ms

UP=$(free_port); CG=$(free_port); ADMIN=$(free_port); NG=$(free_port); VN=$(free_port); BH=$(free_port)
BHP=$(free_port); CGT=$(free_port); ADMINT=$(free_port)
CGR=$(free_port); ADMINR=$(free_port); REDIS=$(free_port); CGS=$(free_port); ADMINS=$(free_port)

python3 bench/upstream.py "$UP" & PIDS+=($!)
wait_http "http://127.0.0.1:$UP/"

target/release/examples/bare_hyper "127.0.0.1:$BH" "http://127.0.0.1:$UP/kpi/revenue" & PIDS+=($!)
wait_http "http://127.0.0.1:$BH/kpi/revenue"
# The same with each connection on one thread with its own event loop, as cachegate serves
# its connections by default (`connection_threads`).
target/release/examples/bare_hyper "127.0.0.1:$BHP" "http://127.0.0.1:$UP/kpi/revenue" --pinned & PIDS+=($!)
wait_http "http://127.0.0.1:$BHP/kpi/revenue"

cat > "$WORK/memory-tier.toml" <<TOML
listen = "127.0.0.1:$CG"
admin_listen = "127.0.0.1:$ADMIN"
[upstream]
url = "http://127.0.0.1:$UP"
[[routes]]
method = "POST"
path = "/api/natal/chart"
ttl_secs = 3600
key_body = true
TOML
CACHEGATE_LOG=warn target/release/cachegate serve --config "$WORK/memory-tier.toml" & PIDS+=($!)
wait_http "http://127.0.0.1:$ADMIN/healthz"
# The memory tier with connections on Tokio's shared work-stealing runtime
# (`connection_threads = 0`), as before connection threads.
sed -e "s/127\.0\.0\.1:$CG\"/127.0.0.1:$CGT\"/; s/127\.0\.0\.1:$ADMIN\"/127.0.0.1:$ADMINT\"/" \
    -e 's/^\[upstream\]$/[server]\nconnection_threads = 0\n[upstream]/' \
    "$WORK/memory-tier.toml" > "$WORK/shared-runtime.toml"
CACHEGATE_LOG=warn target/release/cachegate serve --config "$WORK/shared-runtime.toml" & PIDS+=($!)
wait_http "http://127.0.0.1:$ADMINT/healthz"
CHART_BODY='{"name":"Ada","birth":{"date":"1815-12-10","time":"12:00","tz":"Europe/London"},"place":{"lat":51.5072,"lon":-0.1276},"house_system":"placidus"}'
cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$CHART_BODY'
wrk.headers["Content-Type"] = "application/json"
LUA

redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
  >"$WORK/redis.log" 2>&1 & PIDS+=($!)
cat > "$WORK/redis-tier.toml" <<TOML
listen = "127.0.0.1:$CGR"
admin_listen = "127.0.0.1:$ADMINR"
[upstream]
url = "http://127.0.0.1:$UP"
[cache]
memory_max_bytes = 0     # nothing fits: every hit is a Redis hit
key_secret = "bench"
[redis]
url = "redis://127.0.0.1:$REDIS"
TOML
CACHEGATE_LOG=warn target/release/cachegate serve --config "$WORK/redis-tier.toml" & PIDS+=($!)
wait_http "http://127.0.0.1:$ADMINR/healthz"
# The same with signed rather than sealed entries (`encrypt = false`: a keyed BLAKE3 MAC,
# no encryption), in its own namespace: what sealing costs a Redis-tier hit.
sed -e "s/127\.0\.0\.1:$CGR\"/127.0.0.1:$CGS\"/; s/127\.0\.0\.1:$ADMINR\"/127.0.0.1:$ADMINS\"/" \
    -e 's/^key_secret = "bench"$/key_secret = "bench"\nnamespace = "bench-signed"/' \
    "$WORK/redis-tier.toml" > "$WORK/redis-signed.toml"
echo "encrypt = false" >> "$WORK/redis-signed.toml"
CACHEGATE_LOG=warn target/release/cachegate serve --config "$WORK/redis-signed.toml" & PIDS+=($!)
wait_http "http://127.0.0.1:$ADMINS/healthz"

mkdir -p "$WORK/cache"
USER_LINE=""; [ "$(id -u)" -eq 0 ] && USER_LINE="user root;"
cat > "$WORK/nginx.conf" <<CONF
$USER_LINE
worker_processes auto;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/proxy;
  fastcgi_temp_path $WORK/fastcgi;
  uwsgi_temp_path $WORK/uwsgi;
  scgi_temp_path $WORK/scgi;
  proxy_cache_path $WORK/cache levels=1:2 keys_zone=bench:10m max_size=100m inactive=60m use_temp_path=off;
  upstream origin { server 127.0.0.1:$UP; keepalive 32; }
  server {
    listen 127.0.0.1:$NG;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_valid 200 1h;
      add_header X-Cache-Status \$upstream_cache_status;
    }
  }
}
CONF
"$NGINX" -c "$WORK/nginx.conf" & PIDS+=($!)
wait_http "http://127.0.0.1:$NG/kpi/revenue"

# Varnish with its built-in VCL (which caches by the origin's max-age), plus a header
# that tells hits from misses.
cat > "$WORK/varnish.vcl" <<VCL
vcl 4.1;
backend origin { .host = "127.0.0.1"; .port = "$UP"; }
sub vcl_deliver {
  if (obj.hits > 0) { set resp.http.X-Cache-Status = "HIT"; } else { set resp.http.X-Cache-Status = "MISS"; }
}
VCL
"$VARNISHD" -F -f "$WORK/varnish.vcl" -a "127.0.0.1:$VN" -s malloc,64m -n "$WORK/varnish" \
  -p workspace_client=64k >"$WORK/varnish.log" 2>&1 & PIDS+=($!)
wait_http "http://127.0.0.1:$VN/kpi/revenue"

declare -A URL=(
  [cachegate]="http://127.0.0.1:$CG/kpi/revenue"
  [nginx]="http://127.0.0.1:$NG/kpi/revenue"
  [varnish]="http://127.0.0.1:$VN/kpi/revenue"
)
URL[cachegate-redis]="http://127.0.0.1:$CGR/kpi/revenue"
URL[cachegate-signed]="http://127.0.0.1:$CGS/kpi/revenue"
URL[bare-hyper]="http://127.0.0.1:$BH/kpi/revenue"
URL[bare-hyper-pinned]="http://127.0.0.1:$BHP/kpi/revenue"
URL[cachegate-shared]="http://127.0.0.1:$CGT/kpi/revenue"
URL[cachegate-post]="http://127.0.0.1:$CG/api/natal/chart"
NAMES=(cachegate cachegate-shared cachegate-post cachegate-redis cachegate-signed nginx varnish bare-hyper
       bare-hyper-pinned)
declare -A SCRIPT=([cachegate-post]="$WORK/post.lua")

# Warm every cache and check that the measured path is a hit.
# (The Redis write after a miss is asynchronous: try a few times, bounded.)
for name in "${NAMES[@]}"; do
  url="${URL[$name]}"
  post=(); [ "$name" = cachegate-post ] && post=(-H "Content-Type: application/json" --data "$CHART_BODY")
  status=""
  for _ in $(seq 50); do
    status=$(curl -s "${post[@]}" -D - -o /dev/null "$url" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache-status"{print $2}')
    [ "$status" = "HIT" ] && break
    sleep 0.05
  done
  [ "$status" = "HIT" ] || { echo "$url is not a hit (X-Cache-Status: $status)" >&2; exit 1; }
done
for name in cachegate-redis cachegate-signed; do
  curl -s -D - -o /dev/null "${URL[$name]}" | grep -qi "cache-status: cachegate; hit.*detail=redis" \
    || { echo "the $name instance does not answer from redis" >&2; exit 1; }
done

declare -A RPS P50 P99 ROUND_RPS
run() { # name url
  local out script=()
  [ -n "${SCRIPT[$1]:-}" ] && script=(-s "${SCRIPT[$1]}")
  out=$(wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "${script[@]}" "$2")
  RPS[$1]=$(awk -v a="${RPS[$1]:-0}" '/^Requests\/sec:/ { printf "%.0f", a + $2 }' <<<"$out")
  ROUND_RPS[$1]+="$(awk '/^Requests\/sec:/ { r = $2 } END { printf "%.0f", r + 0 }' <<<"$out") "
  P50[$1]=$(awk -v a="${P50[$1]:-0}" -v x="$(awk '$1=="50%"{print $2}' <<<"$out" | to_ms)" 'BEGIN{printf "%.3f", a + x}')
  P99[$1]=$(awk -v a="${P99[$1]:-0}" -v x="$(awk '$1=="99%"{print $2}' <<<"$out" | to_ms)" 'BEGIN{printf "%.3f", a + x}')
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$1: errors during load:" >&2; grep "Non-2xx\|Socket errors" <<<"$out" >&2; fi
}
# Rotate the order each round so that no proxy always runs on a warmer or busier machine.
for round in $(seq $ROUNDS); do
  for k in "${!NAMES[@]}"; do
    name=${NAMES[$(( (k + round) % ${#NAMES[@]} ))]}
    run "$name" "${URL[$name]}"
  done
done

echo
echo "hit path, $ROUNDS rounds x ${DURATION}s, wrk -t2 -c$CONNECTIONS, $(nproc) cores ($(date -u +%Y-%m-%d))"
printf '| %-23s | %12s | %9s | %9s |\n' "proxy" "requests/s" "p50 ms" "p99 ms"
printf '|%s|%s|%s|%s|\n' "-------------------------" "--------------" "-----------" "-----------"
declare -A LABEL=([cachegate]="cachegate (memory tier)" [cachegate-redis]="cachegate (redis tier)"
                  [cachegate-post]="cachegate POST (body key)"
                  [cachegate-signed]="cachegate (redis, signed)"
                  [nginx]="nginx proxy_cache" [varnish]="varnish (malloc)"
                  [cachegate-shared]="cachegate (shared rt)"
                  [bare-hyper]="bare hyper (ceiling)" [bare-hyper-pinned]="bare hyper (pinned)")
[ -n "${HIT_PATH_TSV:-}" ] && : > "$HIT_PATH_TSV"
for name in "${NAMES[@]}"; do
  awk -v l="${LABEL[$name]}" -v r="${RPS[$name]}" -v p5="${P50[$name]}" -v p9="${P99[$name]}" -v k=$ROUNDS \
    'BEGIN { printf "| %-23s | %12.0f | %9.3f | %9.3f |\n", l, r/k, p5/k, p9/k }'
  if [ -n "${HIT_PATH_TSV:-}" ]; then
    awk -v l="${LABEL[$name]}" -v r="${RPS[$name]}" -v p5="${P50[$name]}" -v p9="${P99[$name]}" -v k=$ROUNDS \
      'BEGIN { printf "%s\t%.0f\t%.3f\t%.3f\n", l, r/k, p5/k, p9/k }' >> "$HIT_PATH_TSV"
  fi
done
echo
for ours in cachegate cachegate-shared cachegate-redis cachegate-signed; do
  for peer in bare-hyper bare-hyper-pinned nginx varnish; do
    awk -v o="${LABEL[$ours]}" -v p="$peer" -v a="${RPS[$ours]}" -v b="${RPS[$peer]}" \
        -v a5="${P50[$ours]}" -v b5="${P50[$peer]}" -v a9="${P99[$ours]}" -v b9="${P99[$peer]}" \
      'BEGIN { printf "%s / %s: throughput %.2fx, p50 latency %.2fx, p99 latency %.2fx\n", o, p, a/b, a5/b5, a9/b9 }'
  done
done
awk -v a="${RPS[cachegate-post]}" -v b="${RPS[cachegate]}" -v a9="${P99[cachegate-post]}" -v b9="${P99[cachegate]}" \
  'BEGIN { printf "cachegate POST (body key) / cachegate GET: throughput %.2fx, p99 latency %.2fx\n", a/b, a9/b9 }'
echo
echo "per round (throughput ratios, each from the same round):"
for pair in "cachegate bare-hyper" "cachegate bare-hyper-pinned" "cachegate nginx" \
            "cachegate-redis nginx" "cachegate-signed nginx" "cachegate-post cachegate"; do
  read -r ours peer <<<"$pair"
  awk -v o="${LABEL[$ours]}" -v p="${LABEL[$peer]}" -v a="${ROUND_RPS[$ours]}" -v b="${ROUND_RPS[$peer]}" \
    'BEGIN { n = split(a, x, " "); split(b, y, " "); printf "%s / %s:", o, p
             for (i = 1; i <= n; i++) if (x[i] > 0 && y[i] > 0) printf " %.3f", x[i] / y[i]; else printf " NA"
             printf "\n" }'
done
