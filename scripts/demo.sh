#!/usr/bin/env bash
# The README's main command: from a fresh clone, set everything up, start
# SecantusDB (MongoDB) and om-worker, and push the seed workflow through it
# with the real, unchanged omega|ml Python client (scripts/seed.py).
# Uses the local RabbitMQ (guest/guest) unless OMEGA_BROKER is set
# (e.g. OMEGA_BROKER=redis://127.0.0.1:6379/0).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/services.sh
bash scripts/setup-venv.sh
# SecantusDB is stopped at the end only if this run started it (its data stays in .run/).
sec_was_running=0
bash scripts/secantus.sh status --port 27117 >/dev/null 2>&1 && sec_was_running=1
bash scripts/secantus.sh start --port 27117
cargo build --release --locked

export OMEGA_MONGO_URL="${OMEGA_MONGO_URL:-mongodb://127.0.0.1:27117/omega}"
export OMEGA_BROKER="${OMEGA_BROKER:-amqp://guest:guest@127.0.0.1:5672//}"
export OMEGA_RESULT_BACKEND="${OMEGA_RESULT_BACKEND:-rpc://}"
export OMEGA_WORKER_LABEL="${OMEGA_WORKER_LABEL:-default}"
export OMEGA_TMP="${OMEGA_TMP:-$root/.run/tmp}"
# Keep stray config.yml files out of the client and the kernels.
export OMEGA_CONFIG_FILE="$root/.run/no-config.yml"
export OM_WORKER_PYTHON="$root/.venv/bin/python"
mkdir -p "$OMEGA_TMP" .run

log="$root/.run/demo-worker.log"
./target/release/om-worker worker -n "demo@%h" -c 2 -Q default,gpu >"$log" 2>&1 &
worker=$!
stop_all() {
  kill -TERM "$worker" 2>/dev/null && wait "$worker" 2>/dev/null || true
  if [ "$sec_was_running" = 0 ]; then
    bash scripts/secantus.sh stop --port 27117 >/dev/null 2>&1 || true
    echo "demo: stopped the SecantusDB it started; its data stays in .run/secantus-27117" \
      "(scripts/secantus.sh start --port 27117 to look at the results again)"
  fi
}
trap stop_all EXIT

for _ in $(seq 1 150); do
  grep -q "ready: consuming" "$log" && break
  kill -0 "$worker" 2>/dev/null || { cat "$log"; echo "demo: om-worker exited" >&2; exit 1; }
  sleep 0.2
done
grep -q "ready: consuming" "$log" || { cat "$log"; echo "demo: om-worker not ready" >&2; exit 1; }
echo "demo: om-worker (pid $worker) is consuming; log: $log"

.venv/bin/python scripts/seed.py
