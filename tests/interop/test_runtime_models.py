"""om.runtime.model(...) through om-worker with the unchanged omega|ml 0.18.0 client, on RabbitMQ and
Redis: fit, predict (by dataset name and with inline data, which travels as a PassthroughDataset
inside the pickle), score, and a missing dataset (the exception the Python worker raises).

The model tasks run omega|ml's own task functions in a child forked from om-worker's fork server
(src/tasks/python_task.rs, python/om_taskrunner.py); the message is decoded by om-worker's
allow-list decoder and never unpickled in Python. The client runs in a fresh subprocess, configured
by env exactly as a user's (OMEGA_WORKER_LABEL = this test's queue).
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import VENV_PY, _NO_CONFIG, short_id, wait_until
from omega_scenarios import client_env

HERE = Path(__file__).resolve().parent

# No notebooks: no pre-started kernels (the fork server still starts, for the model tasks).
WORKER_KERNELS = False

CLIENT = r"""
import json, sys
import numpy as np
import pandas as pd
import omegaml as om
from sklearn.linear_model import LinearRegression

p = sys.argv[1]
df = pd.DataFrame({'x': np.arange(20, dtype=float)})
df['y'] = df['x'] * 2 + 1
om.datasets.put(df[['x']], p + 'X', append=False)
om.datasets.put(df[['y']], p + 'Y', append=False)
om.models.put(LinearRegression(), p + 'm')
mdl = om.runtime.model(p + 'm')
out = {}
meta = mdl.fit(p + 'X', p + 'Y').get(timeout=120)
out['fit'] = meta
out['predict'] = np.asarray(mdl.predict(p + 'X').get(timeout=120)).ravel().tolist()
local = LinearRegression().fit(df[['x']], df[['y']])
out['local'] = local.predict(df[['x']]).ravel().tolist()
out['score'] = mdl.score(p + 'X', p + 'Y').get(timeout=120)
out['inline'] = np.asarray(mdl.predict([[100.0], [101.0]]).get(timeout=120)).ravel().tolist()
try:
    mdl.predict(p + 'nosuchdataset').get(timeout=120)
    out['missing'] = None
except Exception as e:
    out['missing'] = [type(e).__module__, type(e).__name__, str(e)[:200]]
# the model stored by the worker's fit is the fitted one
out['stored_coef'] = np.asarray(om.models.get(p + 'm').coef_).ravel().tolist()
print('@@RESULT ' + json.dumps(out), flush=True)
"""


def run_client(mongo, broker_url, label, tmp_path, prefix, backend="rpc://"):
    tmp = tmp_path / "client-tmp"
    tmp.mkdir(exist_ok=True)
    env = client_env(mongo, broker_url, label, tmp, _NO_CONFIG, backend=backend)
    proc = subprocess.run([str(VENV_PY), "-c", CLIENT, prefix], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("@@RESULT ")]
    assert proc.returncode == 0 and lines, f"client failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("@@RESULT "):])


@pytest.mark.parametrize("backend_kind", ["rpc", "redis"])
def test_fit_predict_score_and_errors(broker, backend_kind, worker, names, mongo, tmp_path):
    label = names.queue("omwmodel")
    backend = "rpc://" if backend_kind == "rpc" else "redis://127.0.0.1:6379/0"
    w = worker(broker.url, [label], backend=backend, concurrency=2)
    out = run_client(mongo, broker.url, label, tmp_path, f"t{names.queue('')[-6:]}", backend=backend)

    # omega|ml's omega_fit returns repr(Metadata) (celery_util.sanitized), as with the Python worker
    assert isinstance(out["fit"], str), out["fit"]
    assert out["fit"].startswith("<Metadata: Metadata(name=") and "prefix=models/" in out["fit"], out["fit"]
    assert out["predict"] == pytest.approx(out["local"]), "remote predict equals a local predict"
    assert out["score"] == pytest.approx(1.0)
    assert out["inline"] == pytest.approx([201.0, 203.0]), "inline data (PassthroughDataset) predicted"
    assert out["stored_coef"] == pytest.approx([2.0])
    # What omega|ml's Python worker raises for a dataset that does not exist (scikit-learn's
    # ValueError on the None it reads), re-raised by the client with type and message.
    module, name, message = out["missing"]
    assert (module, name) == ("builtins", "ValueError"), out["missing"]
    assert "Expected 2D array" in message, message

    log = w.log()
    assert "python tasks" in log, "the model tasks were listed from omega|ml's Celery app"
    assert "starting a plain process" not in log, "the tasks were listed and run in forked children"
    for task in ("omega_fit", "omega_predict", "omega_score"):
        assert f"omegaml.tasks.{task}" in log


def test_without_fork_server_python_tasks_run_in_plain_processes(worker, names, mongo, tmp_path):
    """--no-fork-server: the same results, each task in a fresh `python om_taskrunner.py` (slower)."""
    from conftest import Broker
    broker = Broker("amqp")
    label = names.queue("omwmodel")
    w = worker(broker.url, [label], concurrency=2, extra=["--no-fork-server"])
    out = run_client(mongo, broker.url, label, tmp_path, f"n{short_id()}")
    assert out["predict"] == pytest.approx(out["local"])
    assert out["inline"] == pytest.approx([201.0, 203.0])
    assert out["missing"][:2] == ["builtins", "ValueError"]
    log = w.log()
    assert "fork_server=false" in log and "kernel fork server ready" not in log, "no fork server ran"


SLOW_CLIENT = r"""
import json, sys
import omegaml as om
sys.path.insert(0, sys.argv[2])
from om_test_models import SlowModel

p = sys.argv[1]
om.models.put(SlowModel(seconds=120), p + 'slow')
result = om.runtime.model(p + 'slow').predict([[1.0]])
print('@@SENT ' + result.id, flush=True)
try:
    result.get(timeout=180)
    out = None
except Exception as e:
    out = [type(e).__module__, type(e).__name__, str(e)[:200]]
print('@@RESULT ' + json.dumps(out), flush=True)
"""


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_child_killed_mid_task_is_worker_lost_and_the_worker_goes_on(broker, worker, names, mongo,
                                                                        tmp_path):
    label = names.queue("omwmodel")
    support = str(HERE / "support")
    w = worker(broker.url, [label], env_extra={"PYTHONPATH": support})
    tmp = tmp_path / "client-tmp"
    tmp.mkdir(exist_ok=True)
    env = client_env(mongo, broker.url, label, tmp, _NO_CONFIG)
    prefix = f"k{short_id()}"
    client = subprocess.Popen([str(VENV_PY), "-c", SLOW_CLIENT, prefix, support], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The task child: forked by the fork server (a child of the worker), running the task.
        def task_child():
            for server in _children(w.pid):
                if "om_forkserver.py" in _cmdline(server):
                    kids = _children(server)
                    if kids:
                        return kids[0]
            return None

        wait_until(lambda: "task started" in w.log() and task_child(), 120, "the predict task running")
        time.sleep(1.0)  # inside predict's sleep
        child = task_child()
        os.kill(child, signal.SIGKILL)
        out, err = client.communicate(timeout=200)
    finally:
        if client.poll() is None:
            client.kill()
    lines = [l for l in out.splitlines() if l.startswith("@@RESULT ")]
    assert lines, f"client failed:\n{err[-4000:]}"
    module, name, message = json.loads(lines[-1][len("@@RESULT "):])
    assert (module, name) == ("billiard.exceptions", "WorkerLostError"), (module, name, message)
    assert "signal 9 (SIGKILL)" in message, message
    # The worker goes on: it still answers.
    assert w.alive()
    from conftest import omega_celery_app
    app = omega_celery_app(broker.url, "rpc://")
    r = app.send_task("omegaml.tasks.omega_ping", args=(1, 2), kwargs={"a": 1}, queue=label)
    assert r.get(timeout=60)["message"] == "ping return message"


def test_soft_time_limit_raises_inside_the_python_task(broker, worker, names, mongo, tmp_path):
    """Celery's soft limit: SoftTimeLimitExceeded is raised inside the running task (its child arms
    the limit from the message), and the client re-raises it; the hard limit (soft + 30 s, which
    would be TimeLimitExceeded) is not reached."""
    label = names.queue("omwmodel")
    support = str(HERE / "support")
    worker(broker.url, [label], env_extra={"PYTHONPATH": support})
    tmp = tmp_path / "client-tmp"
    tmp.mkdir(exist_ok=True)
    # omega|ml's client sends its own limits in every message (timelimit = [T + 30, T]).
    env = client_env(mongo, broker.url, label, tmp, _NO_CONFIG, extra={"OMEGA_TASK_TIMEOUT": "3"})
    started = time.monotonic()
    proc = subprocess.run([str(VENV_PY), "-c", SLOW_CLIENT, f"s{short_id()}", support], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("@@RESULT ")]
    assert lines, f"client failed:\n{proc.stderr[-4000:]}"
    module, name, _message = json.loads(lines[-1][len("@@RESULT "):])
    assert (module, name) == ("billiard.exceptions", "SoftTimeLimitExceeded"), (module, name)
    assert time.monotonic() - started < 60, "ended by the soft limit, not the 120 s sleep or the hard limit"
