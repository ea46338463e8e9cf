#!/usr/bin/env bash
# Makes sure the two local servers the tests and the demo need answer: RabbitMQ on
# 127.0.0.1:5672 (guest/guest) and Redis on 127.0.0.1:6379.
#
# A server that is installed here but not running is started with the same command
# line the machine's own service start uses (Redis keeps nothing on disk; RabbitMQ
# detached), and waited for. One that is neither reachable nor installed fails loudly.
# Why start them at all: CI runs against the services "as the last session left them",
# and a stopped Redis once failed a whole CI run in 0 s. Idempotent: a running server is
# left alone, and nothing is ever stopped here.
set -euo pipefail

port_open() { # host port -> 0 if a TCP connection succeeds within 2 s
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 5; i++)); do
    port_open 127.0.0.1 "$2" && return 0
    sleep 0.2
  done
  echo "services.sh: $1 started but 127.0.0.1:$2 does not accept connections after $3 s" >&2
  return 1
}

# needs_start NAME PORT SERVER-BINARY: 1 (nothing to do) when the port answers, 0 when the server
# is installed and must be started, exit 1 when it is neither reachable nor installed.
needs_start() {
  if port_open 127.0.0.1 "$2"; then
    echo "services.sh: $1 reachable on 127.0.0.1:$2"
    return 1
  fi
  if ! command -v "$3" >/dev/null; then
    echo "services.sh: $1 is not reachable on 127.0.0.1:$2 and $3 is not installed" >&2
    exit 1
  fi
  echo "services.sh: $1 is not reachable on 127.0.0.1:$2; starting it"
}

ensure_redis() {
  needs_start Redis 6379 redis-server || return 0
  local dir=/var/lib/redis logdir=/var/log/redis
  [ -w "$dir" ] || dir="${TMPDIR:-/tmp}"
  [ -w "$logdir" ] || logdir="${TMPDIR:-/tmp}"
  # The machine's own service command line; Redis keeps nothing on disk.
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir "$dir" --logfile "$logdir/ci.log"
  wait_port Redis 6379 20
}

ensure_rabbitmq() {
  needs_start RabbitMQ 5672 rabbitmq-server || return 0
  if command -v rabbitmqctl >/dev/null && timeout 20 rabbitmqctl -q status >/dev/null 2>&1; then
    # The node runs but its application was stopped (rabbitmqctl stop_app).
    timeout 60 rabbitmqctl -q start_app
  else
    rabbitmq-server -detached
  fi
  wait_port RabbitMQ 5672 90
}

ensure_redis
ensure_rabbitmq
