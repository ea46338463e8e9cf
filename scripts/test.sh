#!/usr/bin/env bash
# Runs every check and test of om-worker. This is the README's test command and
# what CI runs (.ci/run). Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and
# Redis on 127.0.0.1:6379; creates the pinned venv and starts SecantusDB itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n==> %s\n' "$*"; }

step "services"
# Fail loudly, early and precisely when a required server is missing.
python3 - <<'PY'
import socket, sys
bad = []
for name, port in (("RabbitMQ", 5672), ("Redis", 6379)):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    except OSError as e:
        bad.append(f"{name} is not reachable on 127.0.0.1:{port} ({e})")
if bad:
    sys.exit("test.sh: " + "; ".join(bad))
print("RabbitMQ and Redis reachable")
PY

step "python venv"
bash scripts/setup-venv.sh
export OM_WORKER_PYTHON="$root/.venv/bin/python"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test"
cargo build --locked
cargo test --locked -- --test-threads=2

step "interop tests (unchanged Python celery/omega|ml clients against the om-worker binary)"
.venv/bin/python -m pytest tests/interop -q -p no:cacheprovider
