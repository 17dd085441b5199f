# Helpers shared by the benchmark scripts (sourced, not run): processes started by a script
# are listed in PIDS and stopped by PID on exit; ports are free ones on 127.0.0.1.
#
#   WORK="$(mktemp -d)"; PIDS=(); . bench/lib.sh

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Drops a stopped process from PIDS, so that cleanup never signals a reused PID.
forget() { local kept=() p; for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || kept+=("$p"); done; PIDS=("${kept[@]}"); }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits (up to 10 s) until URL answers; exits the script otherwise.
wait_http() {
  for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "no answer from $1" >&2; exit 1
}

# A wrk latency ("812.00us", "1.20ms", "2s") on stdin, in milliseconds.
to_ms() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v/=1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v*=1000 } printf "%.3f", v }'; }
