"""Celery canvas and task semantics through om-worker, with the unchanged omega|ml 0.18.0 client on
RabbitMQ and Redis: `om.runtime.sequence()` (a chain), `om.runtime.parallel()` (a group),
`om.runtime.mapreduce()` (a chord, on the redis:// result backend; Celery's rpc:// cannot do chords),
`link`/`link_error` callbacks, `self.retry()` (republished with `retries` + 1 and its countdown, then
a success, or the task's own exception once `max_retries` is exceeded) and `Reject`/`Ignore`.

How it works in om-worker: the Python task's child runs Celery's tracer, which publishes the
callbacks and the next chain element with the task's result; its backend proxy leaves the task's own
result to om-worker but counts chord parts and calls errbacks for real (python/om_taskrunner.py).
A message of one of om-worker's own tasks (ping) that carries canvas runs as omega|ml's Python task.

Custom tasks (tests/interop/support/om_test_tasks) are registered the way an operator adds them to
omega|ml: `OMEGA_CELERY_IMPORTS` in the worker's config.yml; om-worker lists them from omega|ml's app.
"""
import json
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import REDIS_BACKEND_URL, VENV_PY, _NO_CONFIG, omega_celery_app, short_id
from omega_scenarios import client_env

HERE = Path(__file__).resolve().parent
SUPPORT = HERE / "support"

WORKER_KERNELS = False

OMEGA_IMPORTS = ["omegaml", "omegaml.notebook", "omegaml.backends.package",
                 "omegaml.backends.monitoring", "om_test_tasks"]

CLIENT = r"""
import json, sys
import numpy as np
import pandas as pd
import omegaml as om
from omegaml.backends.virtualobj import virtualobj
from sklearn.linear_model import LinearRegression

p, chords = sys.argv[1], sys.argv[2] == '1'
out = {}
df = pd.DataFrame({'x': np.arange(1, 10, dtype=float)})
df['y'] = df['x'] * 2 + 1
om.datasets.put(df, p + 'sample', append=False)
om.models.put(LinearRegression(), p + 'm')
with om.runtime.sequence() as ctr:
    ctr.ping(wait=False)
    ctr.model(p + 'm').fit(p + 'sample[x]', p + 'sample[y]')
    ctr.model(p + 'm').predict(p + 'sample[x]')
    result = ctr.run()
out['sequence'] = np.asarray(result.get(timeout=120)).ravel().tolist()
out['y'] = df['y'].tolist()
with om.runtime.parallel() as ctr:
    ctr.model(p + 'm').predict(p + 'sample[x]')
    ctr.model(p + 'm').predict([[100.0]])
    result = ctr.run()
out['parallel'] = [np.asarray(r).ravel().tolist() for r in result.get(timeout=120)]
if chords:
    @virtualobj
    def combined(data=None, method=None, meta=None, store=None, **kwargs):
        # the map results (numpy arrays), scaled so that the reduce step shows it ran
        return [np.asarray(y).ravel() * 5 for y in data]

    om.models.put(combined, p + 'combined', replace=True)
    with om.runtime.mapreduce() as ctr:
        ctr.model(p + 'm').predict(p + 'sample[x]')
        ctr.model(p + 'm').predict([[100.0]])
        ctr.model(p + 'combined').reduce()
        result = ctr.run()
    out['mapreduce'] = [np.asarray(r).ravel().tolist() for r in result.get(timeout=120)]
print('@@RESULT ' + json.dumps(out), flush=True)
"""


def config_file(tmp_path):
    """A config.yml registering the test tasks with omega|ml's Celery app."""
    path = tmp_path / "omega-config.yml"
    path.write_text("OMEGA_CELERY_IMPORTS:\n" + "".join(f"  - {m}\n" for m in OMEGA_IMPORTS))
    return path


def start_worker(worker, broker_url, label, tmp_path, backend):
    return worker(broker_url, [label], backend=backend, concurrency=2,
                  env_extra={"PYTHONPATH": str(SUPPORT), "OMEGA_CONFIG_FILE": str(config_file(tmp_path))})


def run_client(mongo, broker_url, label, tmp_path, backend, chords):
    tmp = tmp_path / "client-tmp"
    tmp.mkdir(exist_ok=True)
    env = client_env(mongo, broker_url, label, tmp, _NO_CONFIG, backend=backend)
    proc = subprocess.run([str(VENV_PY), "-c", CLIENT, f"c{short_id()}", "1" if chords else "0"], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("@@RESULT ")]
    assert proc.returncode == 0 and lines, f"client failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("@@RESULT "):])


def test_sequence_parallel_mapreduce(broker, worker, names, mongo, tmp_path):
    """omega|ml's canvas helpers on the redis:// result backend (chords need one that counts). The
    reduce step gets the map steps' numpy arrays, decoded by om-worker as data and rebuilt in the
    task child."""
    label = names.queue("omwcanvas")
    w = start_worker(worker, broker.url, label, tmp_path, REDIS_BACKEND_URL)
    out = run_client(mongo, broker.url, label, tmp_path, REDIS_BACKEND_URL, chords=True)
    assert out["sequence"] == pytest.approx(out["y"]), "ping -> fit -> predict, the last result"
    assert out["parallel"][0] == pytest.approx(out["y"])
    assert out["parallel"][1] == pytest.approx([201.0])
    assert out["mapreduce"][0] == pytest.approx([y * 5 for y in out["y"]]), "the reduce ran on the map results"
    assert out["mapreduce"][1] == pytest.approx([1005.0])
    log = w.log()
    assert "running omega|ml's Python task instead" in log, "the chain's first task (ping) ran in Python"
    assert "omegaml.tasks.omega_reduce" in log


def test_sequence_and_parallel_on_rpc(worker, names, mongo, tmp_path):
    """The same on omega|ml's default rpc:// backend."""
    from conftest import Broker
    broker = Broker("amqp")
    label = names.queue("omwcanvas")
    start_worker(worker, broker.url, label, tmp_path, "rpc://")
    out = run_client(mongo, broker.url, label, tmp_path, "rpc://", chords=False)
    assert out["sequence"] == pytest.approx(out["y"])
    assert out["parallel"][1] == pytest.approx([201.0])


def test_link_link_error_retry(broker, worker, names, mongo, tmp_path):
    """link gets the parent's result, link_error the failed task's id (an old-style errback, as
    Celery calls a bound task), retry() republishes until it succeeds or gives up."""
    label = names.queue("omwcanvas")
    w = start_worker(worker, broker.url, label, tmp_path, REDIS_BACKEND_URL)
    app = omega_celery_app(broker.url, REDIS_BACKEND_URL)
    try:
        cb_id, eb_id = str(uuid.uuid4()), str(uuid.uuid4())
        cb = app.signature("om_test_tasks.tasks.add", args=(10,), options={"queue": label, "task_id": cb_id})
        r = app.send_task("om_test_tasks.tasks.add", args=(1, 2), queue=label, link=cb)
        assert r.get(timeout=120) == 3
        assert app.AsyncResult(cb_id).get(timeout=120) == 13, "the callback got the parent's result first"

        eb = app.signature("omegaml.tasks.omega_ping", options={"queue": label, "task_id": eb_id})
        r = app.send_task("om_test_tasks.tasks.fails", args=("boom",), queue=label, link_error=eb)
        with pytest.raises(KeyError, match="boom"):
            r.get(timeout=120)
        ping = app.AsyncResult(eb_id).get(timeout=120)
        assert ping["args"] == [r.id], "the errback got the failed task's id"

        # a ping (om-worker's own task) with a link: run as omega|ml's Python task
        cb2 = str(uuid.uuid4())
        r = app.send_task("omegaml.tasks.omega_ping", args=(7,), queue=label,
                          link=app.signature("omegaml.tasks.omega_ping", options={"queue": label, "task_id": cb2}))
        assert r.get(timeout=120)["args"] == [7]
        assert app.AsyncResult(cb2).get(timeout=120)["args"][0]["args"] == [7], "the ping's result, passed on"

        r = app.send_task("om_test_tasks.tasks.flaky", args=(2,), queue=label)
        assert r.get(timeout=120) == {"retries": 2}, "retried twice, then succeeded"
        r = app.send_task("om_test_tasks.tasks.hopeless", queue=label)
        with pytest.raises(ValueError, match="hopeless after 1"):
            r.get(timeout=120)
    finally:
        app.close()
    log = w.log()
    assert log.count("task retry") >= 3, "RETRY recorded for each retry"
    assert "om_test_tasks.tasks.flaky" in log
