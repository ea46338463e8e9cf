#!/usr/bin/env bash
# Prepare the local omega|ml stack for manual runs and print the environment for it.
#
#   eval "$(scripts/test-env.sh [amqp|redis] [--port P])"
#
# Checks RabbitMQ (127.0.0.1:5672 guest/guest) and Redis (127.0.0.1:6379) and fails loudly when one is
# down, starts SecantusDB via scripts/secantus.sh (idempotent; default port 27117), then prints
# `export` lines for OMEGA_MONGO_URL, OMEGA_BROKER (amqp by default), OMEGA_RESULT_BACKEND=rpc://,
# OMEGA_WORKER_LABEL=default, OMEGA_TMP and OMEGA_CONFIG_FILE (a path that does not exist). Progress
# goes to stderr; only the export lines go to stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OM_VENV:-$root/.venv}"
kind=amqp
port=27117
while [ $# -gt 0 ]; do
  case "$1" in
    amqp|redis) kind="$1"; shift ;;
    --port) port="$2"; shift 2 ;;
    *) echo "test-env.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
amqp_url="amqp://guest:guest@127.0.0.1:5672//"
redis_url="redis://127.0.0.1:6379/0"

"$root/scripts/secantus.sh" start --port "$port" >&2
"$venv/bin/python" - "$amqp_url" "$redis_url" <<'EOF' >&2
import sys
from kombu import Connection
import redis
bad = []
try:
    with Connection(sys.argv[1], connect_timeout=5) as c:
        c.ensure_connection(max_retries=1, timeout=5)
except Exception as e:
    bad.append(f"RabbitMQ {sys.argv[1]}: {e}")
try:
    redis.Redis.from_url(sys.argv[2], socket_connect_timeout=3).ping()
except Exception as e:
    bad.append(f"Redis {sys.argv[2]}: {e}")
if bad:
    sys.exit("test-env.sh: unreachable:\n  " + "\n  ".join(bad))
print("test-env.sh: RabbitMQ and Redis reachable")
EOF
tmp="$root/.run/omega-tmp"
mkdir -p "$tmp"
broker="$amqp_url"; [ "$kind" = redis ] && broker="$redis_url"
cat <<EOF
export OMEGA_MONGO_URL='mongodb://127.0.0.1:$port/omega'
export OMEGA_BROKER='$broker'
export OMEGA_RESULT_BACKEND='rpc://'
export OMEGA_WORKER_LABEL='default'
export OMEGA_TMP='$tmp'
export OMEGA_CONFIG_FILE='$root/.run/no-such-config.yml'
EOF
