#!/usr/bin/env bash
# User-space instructions per hit, counted by valgrind's callgrind: repeatable for the same
# binary and requests whatever else the machine is doing (unlike requests/s on a shared
# box), so that a cut in the request path's own work can be measured on its own. Counts
# instructions, not time: kernel work (the socket calls) is not in it, and a `rep movsb`
# copy counts far less than it costs.
#
#   bench/instructions.sh [requests, default 4000] [cachegate binary, default the release build]
#
# Runs, one after the other: cachegate's memory tier (default settings), and the bare hyper
# example (bench/bare_hyper.rs) on Tokio's default runtime and `--pinned`, each under
# callgrind, with the same origin (bench/upstream.py) and the same cached response. Each
# is warmed (200 requests on one connection, not counted), then counting is switched on for
# REQUESTS requests over 4 keep-alive connections (a small Python client on raw sockets,
# one request in flight per connection), then off. Prints instructions per request.
# Installs valgrind from Debian's packages when missing. Everything listens on 127.0.0.1;
# every process started here is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS="${1:-4000}"
[[ "$REQUESTS" =~ ^[1-9][0-9]*$ ]] || { echo "requests must be a whole number from 1" >&2; exit 1; }
if ! command -v valgrind >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind
fi
if [ -n "${2:-}" ]; then
  CACHEGATE="$2"
  cargo build --release --locked -q --example bare_hyper
else
  CACHEGATE=target/release/cachegate
  cargo build --release --locked -q --bin cachegate --example bare_hyper
fi
WORK="$(mktemp -d)"
PIDS=()
. bench/lib.sh   # cleanup on exit, forget, free_port, wait_http

UP=$(free_port)
python3 bench/upstream.py "$UP" & PIDS+=($!)
wait_http "http://127.0.0.1:$UP/"

# Sends N GETs of /kpi/revenue to 127.0.0.1:PORT over C keep-alive connections, reading
# each whole response (the origin's body ends with `"30d"}`) before the next.
client() {
  python3 - "$1" "$2" "$3" <<'PY'
import socket, sys
port, n, c = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(c)]
req = b"GET /kpi/revenue HTTP/1.1\r\nHost: bench\r\n\r\n"
for _ in range(max(1, n // c)):
    for s in socks:
        s.sendall(req)
    for s in socks:
        got = b""
        while not got.endswith(b'"30d"}'):
            chunk = s.recv(65536)
            if not chunk:
                sys.exit("connection closed")
            got += chunk
PY
}

# count NAME PORT COMMAND...: starts COMMAND under callgrind (counting off), warms it,
# counts REQUESTS requests, prints the count per request, stops it.
count() {
  local name=$1 port=$2; shift 2
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/$name.%p" \
    "$@" 2>"$WORK/$name.log" & local pid=$!; PIDS+=("$pid")
  for _ in $(seq 300); do
    curl -s -o /dev/null "http://127.0.0.1:$port/kpi/revenue" && break; sleep 0.2
  done
  client "$port" 200 1
  callgrind_control -i on "$pid" >/dev/null
  client "$port" "$REQUESTS" 4
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  kill "$pid"; wait "$pid" 2>/dev/null || true; forget "$pid"
  local total
  total=$(cat "$WORK/$name".* | awk '/^totals:/ { s += $2 } END { print s + 0 }')
  printf '%-24s %8d instructions per request\n' "$name" $(( total / (REQUESTS / 4 * 4) ))
}

CG=$(free_port); ADMIN=$(free_port)
cat > "$WORK/cachegate.toml" <<TOML
listen = "127.0.0.1:$CG"
admin_listen = "127.0.0.1:$ADMIN"
[upstream]
url = "http://127.0.0.1:$UP"
TOML
# The first request stores the response; every counted one is a memory-tier hit.
CACHEGATE_LOG=warn count "cachegate (memory tier)" "$CG" "$CACHEGATE" serve --config "$WORK/cachegate.toml"
BH=$(free_port)
count "bare hyper" "$BH" target/release/examples/bare_hyper "127.0.0.1:$BH" "http://127.0.0.1:$UP/kpi/revenue"
BHP=$(free_port)
count "bare hyper (pinned)" "$BHP" target/release/examples/bare_hyper "127.0.0.1:$BHP" "http://127.0.0.1:$UP/kpi/revenue" --pinned
