#!/usr/bin/env bash
# Runs every check and test of om-worker. This is the README's test command and
# what CI runs (.ci/run). Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and
# Redis on 127.0.0.1:6379 (started by scripts/services.sh when installed but
# stopped); creates the pinned venv and starts SecantusDB itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n==> %s\n' "$*"; }

step "services"
# RabbitMQ and Redis must answer; a stopped local one is started, a missing one fails loudly.
bash scripts/services.sh

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
# Most of the suite waits (on sleeping notebooks, leases, outages), so its modules run two at a time
# (pytest-xdist, one module per process: module fixtures such as test_tls's RabbitMQ node are set up
# once; each process has its own SecantusDB; queue names are unique per test). Tests marked
# `exclusive` stop the machine's RabbitMQ and run alone afterwards. Both parts always run.
interop_jobs="${OMW_INTEROP_JOBS:-2}"
rc=0
.venv/bin/python -m pytest tests/interop -q -p no:cacheprovider -m "not exclusive" \
  -n "$interop_jobs" --dist loadfile || rc=$?
step "interop tests that stop RabbitMQ (alone)"
.venv/bin/python -m pytest tests/interop -q -p no:cacheprovider -m exclusive || rc=$?
exit "$rc"
