"""omega|ml 0.18.0's own packaged runtime tests (test_runtime.py, test_nbtasks.py; selection and
exclusions with reasons in omegaml_suite.py) run against a real worker, first the Python Celery worker, then om-worker, on
the same broker and the same kind of database (each its own queue and database).

Proves: every packaged test that passes with omega|ml's Python worker also passes with om-worker
(om-worker is a drop-in), and the Python worker passes a non-trivial number of them (so the
comparison cannot pass vacuously). The client side is omega|ml's unchanged test code in a
subprocess pytest, kept remote by the eager guard in omegaml_suite.py.
"""
import os

import pytest

import omegaml_suite as suite
from conftest import REDIS_BACKEND_URL, VENV_PY, short_id, start_python_worker

# Notebook jobs (test_nbtasks, job runs) need kernels: om-worker pre-starts its kernel pool.
MIN_PYTHON_PASSES = 12  # the Python worker passes 18 here; far fewer means the harness is broken


# redis://, not omega|ml's default rpc://: with rpc:// a canvas's later tasks (sent by the worker)
# reply to the worker, not to the test, and chords are refused, so the canvas tests could not pass
# with either worker and would prove nothing.
BACKEND = REDIS_BACKEND_URL
# One slot: tasks a test sends without waiting run in the order sent, on both workers (test_fit
# sends a fit without .get() and checks its effect after an awaited predict; with two slots the
# predict can finish first, a race with either worker).
CONCURRENCY = 1


def _label_env(label):
    """The worker's own default queue is its label, as in a deployment: tasks a worker sends itself
    (a chain's next task, a chord's callback) go there, not to the shared 'default' queue."""
    return {"OMEGA_WORKER_LABEL": label, "CELERY_Q": label}


def _start_python_worker(broker_url, label, mongo_url, tmp_path, started):
    """omega|ml's own worker on `label`, as conftest starts it for OMW_WORKER_IMPL=python."""
    return start_python_worker(broker_url, label, mongo_url, tmp_path, started, backend=BACKEND,
                               env_extra=_label_env(label), concurrency=CONCURRENCY, prefix="omw-suite-py")


def _client(kind, broker, mongo, label, tmp_path):
    """(database URL, inner pytest env, client tmp dir): each worker gets its own database."""
    db_url = mongo.rsplit("/", 1)[0] + f"/omw_suite_{kind}_{short_id()}"
    tmp = tmp_path / f"client-{kind}"
    tmp.mkdir()
    env = suite.suite_env(os.environ, db_url, broker.url, BACKEND, label, None, tmp)
    return db_url, env, tmp


# Redis by default (CI time); OMW_SUITE_BROKERS=redis,amqp runs RabbitMQ too (~3 min more).
BROKERS = os.environ.get("OMW_SUITE_BROKERS", "redis").split(",")


@pytest.mark.parametrize("broker_kind", BROKERS)
def test_python_worker_passes_are_om_worker_passes(broker_kind, worker, names, mongo, tmp_path, request):
    from conftest import Broker
    broker = Broker(broker_kind)
    started = []
    request.node._omw_workers = started  # logs attached to a failed report
    timings = {}

    # -- the Python worker ------------------------------------------------------------------
    py_label = names.queue("omwsuite-py")
    db_py, env_py, tmp_py = _client("py", broker, mongo, py_label, tmp_path)
    pw = _start_python_worker(broker.url, py_label, db_py, tmp_path, started)
    names.nodes.append(pw.nodename)
    env_py["OMW_SUITE_NODE"] = pw.nodename
    try:
        py_out, py_log, timings["python"] = suite.run_suite(VENV_PY, env_py, tmp_py)
    finally:
        pw.terminate()

    # -- om-worker ---------------------------------------------------------------------------
    rs_label = names.queue("omwsuite-rs")
    db_rs, env_rs, tmp_rs = _client("rs", broker, mongo, rs_label, tmp_path)
    ow = worker(broker.url, [rs_label], backend=BACKEND, concurrency=CONCURRENCY,
                env_extra=dict(_label_env(rs_label), OMEGA_MONGO_URL=db_rs))
    started.append(ow)
    env_rs["OMW_SUITE_NODE"] = ow.nodename
    rs_out, rs_log, timings["om-worker"] = suite.run_suite(VENV_PY, env_rs, tmp_rs)

    py_pass, rs_pass = suite.passed(py_out), suite.passed(rs_out)
    report = (f"\n{suite.table(py_out, rs_out)}\n\npython worker passed {len(py_pass)}/{len(py_out)} "
              f"in {timings['python']:.0f}s; om-worker passed {len(rs_pass)}/{len(rs_out)} in "
              f"{timings['om-worker']:.0f}s\npassed with python: {sorted(py_pass)}\n"
              f"passed with om-worker: {sorted(rs_pass)}\n")
    print(report)
    missing = py_pass - rs_pass
    details = "\n".join(f"--- {t} (om-worker: {rs_out.get(t, ('absent', ''))[0]})\n"
                        f"{rs_out.get(t, ('', ''))[1][-3000:]}" for t in sorted(missing))
    assert len(py_pass) >= MIN_PYTHON_PASSES, (
        f"the Python worker passed only {len(py_pass)} tests: the harness is broken{report}\n"
        f"--- inner pytest (python worker) ---\n{py_log[-6000:]}")
    assert "eager-guard hits" in py_log and "eager-guard hits" in rs_log, "the eager guard plugin was not loaded"
    assert not missing, (f"passed with the Python worker but not with om-worker: {sorted(missing)}"
                         f"{report}\n{details}")
