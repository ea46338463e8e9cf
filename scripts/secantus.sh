#!/usr/bin/env bash
# Start/stop a SecantusDB daemon (MongoDB wire protocol) for om-worker tests and benchmarks.
#
#   scripts/secantus.sh start  [--port P] [--dir D] [--timeout S]
#   scripts/secantus.sh stop   [--port P]
#   scripts/secantus.sh status [--port P]
#
# - Always binds 127.0.0.1. Default port 27117; default data dir <repo>/.run/secantus-<port>.
# - State is keyed by port: PID file <repo>/.run/secantus-<port>.pid, log <repo>/.run/secantus-<port>.log
#   (override the state dir with OM_RUN_DIR).
# - start is idempotent: if the PID in the PID file is our secantusd-py on that port and a pymongo ping
#   succeeds, it does nothing. It waits until a ping succeeds (default 60 s; --timeout or
#   SECANTUS_START_TIMEOUT) and fails with the log tail otherwise.
# - stop signals only the PID from its own PID file (after checking that it is secantusd-py on that port):
#   SIGTERM, then SIGKILL after 15 s.
# - status exits 0 when running and answering pings, 3 when not running, 1 when running but not answering.
# - Runs scripts/setup-venv.sh first if the venv ($OM_VENV, default <repo>/.venv) lacks secantusd-py.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OM_VENV:-$root/.venv}"
run_dir="${OM_RUN_DIR:-$root/.run}"
host=127.0.0.1
port=27117
dir=""
timeout="${SECANTUS_START_TIMEOUT:-60}"

die() { echo "secantus.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 1 ] || usage
cmd="$1"; shift
while [ $# -gt 0 ]; do
  case "$1" in
    --port) [ $# -ge 2 ] || usage; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --dir) [ $# -ge 2 ] || usage; dir="$2"; shift 2 ;;
    --dir=*) dir="${1#*=}"; shift ;;
    --timeout) [ $# -ge 2 ] || usage; timeout="$2"; shift 2 ;;
    --timeout=*) timeout="${1#*=}"; shift ;;
    -h|--help) usage ;;
    *) echo "secantus.sh: unknown argument: $1" >&2; usage ;;
  esac
done
case "$port" in ''|*[!0-9]*) die "--port must be a number, got '$port'" ;; esac
case "$timeout" in ''|*[!0-9]*) die "--timeout must be whole seconds, got '$timeout'" ;; esac
[ -n "$dir" ] || dir="$run_dir/secantus-$port"
pidfile="$run_dir/secantus-$port.pid"
logfile="$run_dir/secantus-$port.log"

ensure_venv() {
  if [ ! -x "$venv/bin/python" ] || [ ! -x "$venv/bin/secantusd-py" ]; then
    echo "secantus.sh: venv $venv lacks secantusd-py; running scripts/setup-venv.sh" >&2
    OM_VENV="$venv" "$root/scripts/setup-venv.sh" >&2 || die "scripts/setup-venv.sh failed"
    [ -x "$venv/bin/secantusd-py" ] || die "$venv/bin/secantusd-py still missing after setup-venv.sh"
  fi
}

# ping: exit 0 iff a MongoDB ping on host:port succeeds within ~1 s.
ping_ok() {
  "$venv/bin/python" - "$host" "$port" <<'EOF' >/dev/null 2>&1
import sys, pymongo
c = pymongo.MongoClient(sys.argv[1], int(sys.argv[2]), serverSelectionTimeoutMS=1000,
                        connectTimeoutMS=1000, directConnection=True)
try:
    c.admin.command("ping")
finally:
    c.close()
EOF
}

# our_pid: print the PID from the PID file iff that process is alive and is secantusd-py on $port.
our_pid() {
  [ -f "$pidfile" ] || return 1
  local pid; pid="$(cat "$pidfile" 2>/dev/null || true)"
  case "$pid" in ''|*[!0-9]*) return 1 ;; esac
  [ -r "/proc/$pid/cmdline" ] || return 1
  local cmdline; cmdline="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)"
  case "$cmdline" in
    *secantusd-py*"--port $port "*) echo "$pid" ;;
    *) return 1 ;;
  esac
}

do_start() {
  ensure_venv
  mkdir -p "$run_dir" 2>/dev/null || die "cannot create state dir '$run_dir'"
  local pid
  if pid="$(our_pid)"; then
    if ping_ok; then
      echo "secantus.sh: already running on $host:$port (pid $pid, data $dir)"
      return 0
    fi
    echo "secantus.sh: pid $pid is running but not answering yet; waiting" >&2
  else
    rm -f "$pidfile"
    if ping_ok; then
      die "$host:$port already answers MongoDB pings but was not started by this script (no live PID in $pidfile); stop that server or pick another --port"
    fi
    mkdir -p "$dir" 2>/dev/null || die "cannot create data dir '$dir'"
    echo "=== $(date -u +%FT%TZ) start port=$port dir=$dir" >> "$logfile"
    # setsid: own session, so a terminal ^C to the caller does not hit the daemon; in a
    # non-interactive shell the background child is not a group leader, so setsid execs in place
    # and $! is the daemon's PID (checked below via /proc/<pid>/cmdline).
    setsid "$venv/bin/secantusd-py" --host "$host" --port "$port" --storage-path "$dir" \
      >> "$logfile" 2>&1 < /dev/null &
    pid=$!
    echo "$pid" > "$pidfile"
  fi
  local deadline=$(( $(date +%s) + timeout ))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pidfile"
      echo "secantus.sh: secantusd-py (pid $pid) exited during startup; log tail ($logfile):" >&2
      tail -n 30 "$logfile" >&2 || true
      exit 1
    fi
    if ping_ok; then
      if ! our_pid >/dev/null; then
        die "pid $pid answers but its cmdline is not 'secantusd-py ... --port $port' ($(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null))"
      fi
      echo "secantus.sh: running on $host:$port (pid $pid, data $dir, log $logfile)"
      return 0
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "secantus.sh: secantusd-py (pid $pid) did not answer a pymongo ping on $host:$port within ${timeout}s; log tail ($logfile):" >&2
      tail -n 30 "$logfile" >&2 || true
      echo "secantus.sh: leaving pid $pid running; 'scripts/secantus.sh stop --port $port' stops it" >&2
      exit 1
    fi
    sleep 0.3
  done
}

do_stop() {
  local pid
  if ! pid="$(our_pid)"; then
    if [ -f "$pidfile" ]; then
      echo "secantus.sh: stale PID file $pidfile (pid $(cat "$pidfile" 2>/dev/null) is not our secantusd-py on port $port); removing it"
      rm -f "$pidfile"
    else
      echo "secantus.sh: not running on port $port (no PID file $pidfile)"
    fi
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "secantus.sh: pid $pid ignored SIGTERM for 15 s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
  echo "secantus.sh: stopped pid $pid (port $port)"
}

do_status() {
  local pid
  if ! pid="$(our_pid)"; then
    echo "secantus.sh: not running on port $port"
    exit 3
  fi
  [ -x "$venv/bin/python" ] || die "venv $venv missing; cannot ping"
  if ping_ok; then
    echo "secantus.sh: running on $host:$port (pid $pid), ping ok"
  else
    echo "secantus.sh: pid $pid is running on port $port but does not answer pings"
    exit 1
  fi
}

case "$cmd" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) usage ;;
esac
