"""Shared helpers for test_runtime_scripts.py and test_runtime_fidelity.py (plain Python, no fixtures).

A worker started here is module-scoped by the tests (one per broker), on its own label and its own
MongoDB database, so several tests share it; `start_worker` starts om-worker, or omega|ml's Python
`celery --app omegaml.celeryapp worker` (impl='python', as conftest does for OMW_WORKER_IMPL=python).
Clients are fresh subprocesses running the unchanged omega|ml 0.18.0 client, configured by env as a
user's (omega_scenarios.client_env): they print one `@@RESULT <json>` line.
"""
import json
import subprocess

from conftest import HOSTNAME, VENV, VENV_PY, _NO_CONFIG, WorkerProc, short_id, wait_ready, worker_env  # noqa: F401 (wait_ready re-exported)
from omega_scenarios import client_env

RESULT_MARK = "@@RESULT "


def database_url(mongo, dbname):
    """The session's SecantusDB URL with another database (each module instance gets its own)."""
    return mongo.rsplit("/", 1)[0] + "/" + dbname


def start_worker(impl, broker_url, label, mongo_url, wdir, om_worker_bin, backend="rpc://", concurrency=2,
                 env_extra=None, extra=()):
    """Start (not wait for) a worker consuming `label`. OMEGA_WORKER_LABEL=label in its environment
    makes `label` the Python worker's default queue too (omegaml.defaults: CELERY_DEFAULT_QUEUE), which
    is where Celery publishes link/link_error callback tasks that name no queue."""
    wdir.mkdir(parents=True, exist_ok=True)
    name = f"omwrt-{short_id()}@%h"
    env_extra = dict({"OMEGA_WORKER_LABEL": label}, **(env_extra or {}))
    if impl == "python":
        argv = [str(VENV / "bin" / "celery"), "--app", "omegaml.celeryapp", "worker", "-Q", label,
                "-c", str(concurrency), "-n", name, "-l", "info", "--without-gossip", "--without-mingle",
                "--without-heartbeat", *extra]
        env = worker_env(wdir, broker_url, backend, mongo_url, dict(env_extra, C_FORCE_ROOT="1"))
    else:
        argv = [str(om_worker_bin), "worker", "-Q", label, "-c", str(concurrency), "-n", name, "-l", "info",
                "--python", str(VENV_PY), "--kernel-pool", "0", *extra]
        env = worker_env(wdir, broker_url, backend, mongo_url, env_extra)
    w = WorkerProc(argv, env, wdir / f"{impl}-worker.log", name.replace("%h", HOSTNAME))
    w.impl = impl
    w.label = label
    return w




def run_client(code, args, mongo_url, broker_url, label, tmpdir, backend="rpc://", timeout=400, extra_env=None):
    """Run `code` (python -c) with the omega|ml client's environment; return its @@RESULT json."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = client_env(mongo_url, broker_url, label, tmpdir, _NO_CONFIG, backend=backend, extra=extra_env)
    proc = subprocess.run([str(VENV_PY), "-c", code, *[str(a) for a in args]], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"client failed (rc {proc.returncode}):\n--- stdout ---\n{proc.stdout[-3000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])
