"""omega|ml script packages, callbacks, the `om runtime` CLI and gridsearch through om-worker, with the
unchanged omega|ml 0.18.0 client, on RabbitMQ and Redis.

One worker per broker (module-scoped), on its own label and MongoDB database, serves every test of the
module; each test runs a fresh client subprocess configured by env as a user's. The script package is
tests/interop/support/omw_hello_pkg (an in-tree PEP 517 backend, so `om.scripts.put('pkg://...')` builds
and the worker's pip installs it offline); its run() reports what it was called with and, with
record=<name>, stores that as a dataset. The assertions are what omega|ml's Python worker does
(OMW_WORKER_IMPL=python runs the module against it).
"""
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import IMPL, VENV, Broker, short_id

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "support"))
from runtime_shared import database_url, run_client, start_worker, wait_ready  # noqa: E402

WORKER_KERNELS = False  # `om runtime job` runs one notebook: without a warm kernel


@pytest.fixture(scope="module", params=["amqp", "redis"])
def rt(request, mongo, om_worker_bin, tmp_path_factory):
    """One worker for the module on one broker: {'broker', 'label', 'mongo', 'worker', 'pkg', 'tmp'}."""
    broker = Broker(request.param)
    base = tmp_path_factory.mktemp(f"rtscripts-{request.param}")
    run = short_id()
    label = f"omwrts-{run}"
    mongo_url = database_url(mongo, f"omw_rts_{run}")
    # om.scripts.put builds the sdist into <pkgdir>/dist: build from a copy, not from the source tree
    pkg = base / "omw_hello_pkg"
    shutil.copytree(HERE / "support" / "omw_hello_pkg", pkg, ignore=shutil.ignore_patterns("__pycache__", "dist"))
    w = start_worker(IMPL if om_worker_bin is None else "rust", broker.url, label, mongo_url, base / "worker",
                     om_worker_bin)
    try:
        wait_ready(w)
        yield {"broker": broker, "label": label, "mongo": mongo_url, "worker": w, "pkg": pkg, "tmp": base}
    finally:
        w.terminate()
        try:
            broker.cleanup([label, f"{w.expected_nodename}.celery.pidbox"], [])
        except Exception as e:  # cleanup must not mask the result
            print(f"cleanup failed: {e!r}")


@pytest.fixture(autouse=True)
def _attach_worker_log(request):
    """Failed tests get the module worker's log attached (conftest's report hook)."""
    if "rt" in request.fixturenames:
        request.node._omw_workers = [request.getfixturevalue("rt")["worker"]]


def client(rt, code, *args, tag="client", **kw):
    return run_client(code, args, rt["mongo"], rt["broker"].url, rt["label"], rt["tmp"] / f"{tag}-{short_id()}", **kw)


# ---------------------------------------------------------------------------------------------
# script package run
# ---------------------------------------------------------------------------------------------

SCRIPT_CLIENT = r"""
import json, os, sys, time
import omegaml as om

pkgdir, p = sys.argv[1], sys.argv[2]
out = {}

def settled_attrs(task_id, timeout=30):
    # Celery publishes the result before the task's on_success/on_failure runs (both workers):
    # wait (bounded) for the handler's write of this task's id
    deadline = time.monotonic() + timeout
    while True:
        attrs = om.scripts.metadata('omw_hello').attributes
        if attrs.get('task_id') == task_id or time.monotonic() > deadline:
            return {k: attrs.get(k) for k in ('state', 'task_id')}
        time.sleep(0.3)

meta = om.scripts.put('pkg://' + pkgdir, 'omw_hello')
out['kind'] = meta.kind
res = om.runtime.script('omw_hello').run(7, 'x', greeting='hi', client_pid=os.getpid(), record=p + 'seen')
out['value'] = res.get(timeout=240)
out['task_id'] = res.id
seen = om.datasets.get(p + 'seen')
out['seen'] = seen[0] if isinstance(seen, list) else seen
out['seen'].pop('_id', None)
out['attrs_ok'] = settled_attrs(res.id)
bad = om.runtime.script('omw_hello').run(fail=True)
try:
    bad.get(timeout=240)
    out['failed'] = None
except Exception as e:
    out['failed'] = [type(e).__module__, type(e).__name__, str(e)]
out['bad_id'] = bad.id
out['attrs_bad'] = settled_attrs(bad.id)
print('@@RESULT ' + json.dumps(out, default=repr), flush=True)
"""


def test_script_package_run(rt):
    """om.scripts.put('pkg://<dir>', name) + om.runtime.script(name).run(*args, **kwargs): the worker
    installs the package from GridFS and calls its run(om, *args, **kwargs); the result is omega|ml's
    JSON envelope; ScriptTask.on_success/on_failure record state and task_id in the script's Metadata;
    a raising script is a RuntimeError carrying the envelope with repr(exception)."""
    out = client(rt, SCRIPT_CLIENT, rt["pkg"], f"s{short_id()}")
    assert out["kind"] == "python.package", out
    assert isinstance(out["value"], str), f"run_omega_script returns a JSON string: {out['value']!r}"
    value = json.loads(out["value"])
    assert list(value) == ["script", "args", "kwargs", "result", "runtimes", "started", "ended"], value
    assert value["script"] == "omw_hello" and value["args"] == [7, "x"], value
    # the client's pure_python flag reaches the script as a keyword (omega|ml's delegate_kwargs)
    assert set(value["kwargs"]) == {"greeting", "client_pid", "record", "pure_python"}, value["kwargs"]
    assert value["kwargs"]["greeting"] == "hi" and value["kwargs"]["pure_python"] is False, value
    assert value["result"] == {"hello": "from omw_hello", "args": [7, "x"], "n_kwargs": 4}, value
    assert isinstance(value["runtimes"], float)
    seen = out["seen"]
    assert seen["args"] == [7, "x"] and seen["kwargs"]["greeting"] == "hi", seen
    assert seen["om_is_omega"] == "Omega" and seen["pid_differs"] is True, seen
    assert out["attrs_ok"] == {"state": "SUCCESS", "task_id": out["task_id"]}, out["attrs_ok"]

    module, name, message = out["failed"]
    assert (module, name) == ("builtins", "RuntimeError"), out["failed"]
    envelope = json.loads(message)
    assert envelope["script"] == "omw_hello" and envelope["kwargs"] == {"fail": True, "pure_python": False}, envelope
    assert envelope["result"] == "ValueError('omw_hello failed as asked')", envelope
    assert out["attrs_bad"] == {"state": "FAILURE", "task_id": out["bad_id"]}, out["attrs_bad"]


# ---------------------------------------------------------------------------------------------
# callbacks: om.runtime.callback(script) -> link / link_error -> run_omega_callback_script
# ---------------------------------------------------------------------------------------------

CALLBACK_CLIENT = r"""
import json, sys, time
import numpy as np
import pandas as pd
import omegaml as om
from sklearn.linear_model import LinearRegression

pkgdir, p = sys.argv[1], sys.argv[2]
out = {}
om.scripts.put('pkg://' + pkgdir, 'omw_hello')
df = pd.DataFrame({'x': np.arange(10, dtype=float)})
om.datasets.put(df, p + 'X', append=False)
om.models.put(LinearRegression().fit(df[['x']], df['x'] * 3), p + 'm')
ok = om.runtime.callback('omw_hello', record=p + 'cb_ok').model(p + 'm').predict(p + 'X')
try:
    out['predict'] = np.asarray(ok.get(timeout=120)).ravel().tolist()
except Exception as e:
    out['predict'] = [type(e).__module__, type(e).__name__, str(e)[:500]]
out['ok_id'] = ok.id
bad = om.runtime.callback('omw_hello', record=p + 'cb_err').model(p + 'm').predict(p + 'nosuchdataset')
try:
    bad.get(timeout=120)
    out['bad'] = None
except Exception as e:
    out['bad'] = [type(e).__module__, type(e).__name__, str(e)[:500]]
out['bad_id'] = bad.id
# the callbacks are separate tasks the worker sends after the predict tasks end
deadline = time.monotonic() + 60
records = {}
# (nothing to wait for where the predict itself was refused: the message's canvas never ran)
while isinstance(out['predict'][0], float) and time.monotonic() < deadline and len(records) < 2:
    for key in ('cb_ok', 'cb_err'):
        if key not in records and om.datasets.metadata(p + key) is not None:
            seen = om.datasets.get(p + key)
            seen = seen[0] if isinstance(seen, list) else seen
            seen.pop('_id', None)
            records[key] = seen
    time.sleep(0.5)
out['records'] = records
# CallbackScriptTask.on_success (after the result is published) writes the script's state
deadline = time.monotonic() + 20
while om.scripts.metadata('omw_hello').attributes.get('state') != 'SUCCESS' and time.monotonic() < deadline:
    time.sleep(0.3)
out['script_state'] = om.scripts.metadata('omw_hello').attributes.get('state')
print('@@RESULT ' + json.dumps(out, default=repr), flush=True)
"""


def test_callback_script_runs_after_success_and_error(rt):
    """om.runtime.callback('omw_hello', **kw).model(m).predict(...) sends the predict with link and
    link_error signatures of run_omega_callback_script: after a successful predict the worker sends
    the callback with (result, 'SUCCESS', script) and after a failed one with (task_id, 'ERROR',
    script) (Celery's old-style errback: the task is bound), each of which runs the script with
    state= and results=. (om-worker rejects canvas messages with NotImplementedError until canvas
    support lands.)"""
    out = client(rt, CALLBACK_CLIENT, rt["pkg"], f"c{short_id()}")
    assert out["predict"] == pytest.approx([0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0, 24.0, 27.0]), out["predict"]
    assert out["bad"] and out["bad"][:2] == ["builtins", "ValueError"], out["bad"]
    records = out["records"]
    assert set(records) == {"cb_ok", "cb_err"}, f"callback records stored: {sorted(records)}; {out}"
    ok, err = records["cb_ok"], records["cb_err"]
    assert ok["args"] == [] and err["args"] == [], records
    assert set(ok["kwargs"]) == set(err["kwargs"]) == {"state", "results", "record", "pure_python"}, records
    assert ok["kwargs"]["state"] == "SUCCESS", ok
    assert len(ok["kwargs"]["results"]) == 1, f"results = (predict result,): {ok}"
    assert ok["kwargs"]["results"][0] == pytest.approx(out["predict"]), f"the predict result reached the callback: {ok}"
    assert err["kwargs"]["state"] == "ERROR", err
    assert err["kwargs"]["results"] == [out["bad_id"]], f"results = (failed task id,) for the errback: {err}"
    assert out["script_state"] == "SUCCESS", "CallbackScriptTask.on_success updated the script's Metadata"


# ---------------------------------------------------------------------------------------------
# the `om runtime` CLI
# ---------------------------------------------------------------------------------------------

CLI_CLIENT = r"""
import json, os, subprocess, sys
import nbformat
import numpy as np
import pandas as pd
import omegaml as om
from sklearn.linear_model import LinearRegression

pkgdir, p, om_cmd = sys.argv[1], sys.argv[2], sys.argv[3]
df = pd.DataFrame({'x': np.arange(20, dtype=float)})
df['y'] = df['x'] * 2 + 1
om.datasets.put(df[['x']], p + 'X', append=False)
om.datasets.put(df[['y']], p + 'Y', append=False)
om.models.put(LinearRegression(), p + 'm')
om.scripts.put('pkg://' + pkgdir, 'omw_hello')
nb = nbformat.v4.new_notebook()
nb.cells.append(nbformat.v4.new_code_cell("import omegaml as om\nom.datasets.put({'from_cli_job': 42}, '%snb_out', append=False)" % p))
om.jobs.put(nb, p + 'nb')
out = {}

def cli(*args):
    proc = subprocess.run([om_cmd, 'runtime', *args], capture_output=True, text=True, timeout=300)
    return {'rc': proc.returncode, 'out': proc.stdout, 'err': proc.stderr[-3000:]}

out['fit'] = cli('model', p + 'm', 'fit', p + 'X', p + 'Y')
out['predict'] = cli('model', p + 'm', 'predict', p + 'X')
out['script'] = cli('script', 'omw_hello', 'run', 'greeting=hi')
out['job'] = cli('job', p + 'nb')
out['coef'] = np.asarray(om.models.get(p + 'm').coef_).ravel().tolist()
nb_out = om.datasets.get(p + 'nb_out')
out['nb_out'] = (nb_out[0] if isinstance(nb_out, list) else nb_out or {}).get('from_cli_job')
print('@@RESULT ' + json.dumps(out, default=repr), flush=True)
"""


def test_om_runtime_cli(rt):
    """omega|ml's `om runtime model <m> fit <X> <Y>`, `model <m> predict <X>`, `script <s> run kw=v` and
    `job <nb>` (the documented examples) against the worker: each waits for its task and prints the
    result; the fitted model, the script envelope and the notebook's side effect are those of a run."""
    out = client(rt, CLI_CLIENT, rt["pkg"], f"cli{short_id()}", VENV / "bin" / "om")
    for step in ("fit", "predict", "script", "job"):
        r = out[step]
        assert r["rc"] == 0, f"`om runtime {step}` failed (rc {r['rc']}):\n{r['out']}\n{r['err']}"
    assert "<Metadata: Metadata(name=" in out["fit"]["out"] and "prefix=models/" in out["fit"]["out"], out["fit"]
    assert out["coef"] == pytest.approx([2.0]), "the CLI's fit ran on the worker and stored the model"
    assert "39." in out["predict"]["out"] and "1." in out["predict"]["out"], out["predict"]
    text = out["script"]["out"]
    assert '"script": "omw_hello"' in text and '"greeting": "hi"' in text, out["script"]
    assert '"hello": "from omw_hello"' in text, out["script"]
    assert "<Metadata: Metadata(name=results/" in out["job"]["out"], out["job"]
    assert out["nb_out"] == 42, "the notebook ran on the worker"


# ---------------------------------------------------------------------------------------------
# gridsearch
# ---------------------------------------------------------------------------------------------

GRIDSEARCH_CLIENT = r"""
import json, sys
import numpy as np
import pandas as pd
import omegaml as om
from sklearn.neighbors import KNeighborsRegressor

p, kind = sys.argv[1], sys.argv[2]
df = pd.DataFrame({'x': np.arange(30, dtype=float)})
df['y'] = df['x'] * 2
om.datasets.put(df[['x']], p + 'X', append=False)
om.datasets.put(df[['y']], p + 'Y', append=False)
om.models.put(KNeighborsRegressor(), p + 'm')
out = {}
res = om.runtime.model(p + 'm').gridsearch(p + 'X', p + 'Y', parameters={'n_neighbors': range(1, 4) if kind == 'range' else [1, 2, 3]})
try:
    out['value'] = res.get(timeout=240)
except Exception as e:
    out['value'] = [type(e).__module__, type(e).__name__, str(e)[:500]]
gs = om.models.metadata(p + 'm').attributes.get('gridsearch') or []
out['entries'] = [{k: v for k, v in e.items() if k != 'datetime'} for e in gs]
if gs:
    gsm = om.models.get(gs[-1]['gsModel'])
    out['gs_type'] = type(gsm).__name__
    out['gs_params'] = [dict(x) for x in gsm.cv_results_['params']]
    out['best'] = dict(gsm.best_params_)
    out['estimator'] = type(gsm.best_estimator_).__name__
print('@@RESULT ' + json.dumps(out, default=repr), flush=True)
"""


@pytest.mark.parametrize("kind", ["range", "list"])
def test_gridsearch(rt, kind):
    """om.runtime.model(m).gridsearch(X, Y, parameters={'n_neighbors': range(1, 4)}) as omega|ml
    documents it (the pickle holds builtins.range; 'list' sends [1, 2, 3] instead): the worker runs
    GridSearchCV, stores the fitted search as a model and appends {Xname, Yname, gsModel} to the
    model's attributes.gridsearch; the result is repr(Metadata)."""
    p = f"g{short_id()}"
    out = client(rt, GRIDSEARCH_CLIENT, p, kind)
    assert isinstance(out["value"], str) and out["value"].startswith("<Metadata: Metadata(name="), out["value"]
    assert len(out["entries"]) == 1, out
    entry = out["entries"][0]
    assert (entry["Xname"], entry["Yname"]) == (p + "X", p + "Y"), entry
    assert entry["gsModel"].startswith(p + "m.") and entry["gsModel"].endswith(".gs"), entry
    assert out["gs_type"] == "GridSearchCV" and out["estimator"] == "KNeighborsRegressor", out
    assert out["gs_params"] == [{"n_neighbors": 1}, {"n_neighbors": 2}, {"n_neighbors": 3}], out
    assert out["best"]["n_neighbors"] in (1, 2, 3), out
