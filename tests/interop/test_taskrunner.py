"""python/om_taskrunner.py through the fork server's `task` op, against a real SecantusDB.

No om-worker and no broker: the test plays om-worker's part. It starts `python/om_forkserver.py`
(the script om-worker embeds) under the pinned venv with a worker-like environment, writes task
requests with typed-JSON arguments, sends `{"op": "task", ...}` and reads the child's
`outcome.json` / `result.bin` after its `exit` event. Models and datasets are put with the
unchanged omega|ml client (`Omega(mongo_url=...)`, `om.models.put`, `om.datasets.put`); results are
compared with a local scikit-learn fit/predict/score, and the missing-dataset FAILURE with what
omega|ml's own `task.apply()` reports in a fresh client process.

A small task module (`omw_runner_tasks`, written to a temp dir on the fork server's PYTHONPATH and
preloaded with its `--preload` option) reports `self.request` and exercises retry, handlers and the
json result serializer; its `@shared_task`s join omegaml.celeryapp's registry when the child
finalizes the app. (omega|ml's `OMEGA_CELERY_IMPORTS` env override cannot add a module: it is
read as one string and iterated per character by `autodiscover_tasks`.)

Needs only the venv and SecantusDB (no RabbitMQ/Redis, no om-worker binary): `environment_ok`
is narrowed here to what this module uses.
"""
import base64
import datetime
import decimal
import json
import math
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import procs
from conftest import REDIS_URL, ROOT, VENV, VENV_PY, _NO_CONFIG, _SCRUB_ENV, _fail, short_id

WORKER_KERNELS = False
FORKSERVER = ROOT / "python" / "om_forkserver.py"
READY_TIMEOUT = 120.0
TASK_TIMEOUT = 120.0
HOSTNAME = "omw-runner@test"

sys.path.insert(0, str(ROOT / "python"))
import om_taskrunner  # noqa: E402  (typed JSON codec, in-process unit checks)

TASK_MODULE = '''
"""Test tasks for tests/interop/test_taskrunner.py (preloaded by the fork server)."""
import os
from celery import Task, shared_task
from omegaml.celery_util import OmegamlTask


def _ctx(req):
    return {k: getattr(req, k, None) for k in (
        "id", "args", "kwargs", "delivery_info", "hostname", "retries", "group", "group_index",
        "root_id", "parent_id", "is_eager", "called_directly", "correlation_id", "reply_to",
        "origin", "timelimit", "eta", "expires")}


@shared_task(bind=True, name="omw_runner_tasks.context")
def context(self, *args, **kwargs):
    return _ctx(self.request)


@shared_task(name="omw_runner_tasks.ipython_state")
def ipython_state():
    from IPython import get_ipython
    from omegaml.util import is_interactive
    return {"get_ipython": repr(get_ipython()), "is_interactive": bool(is_interactive())}


@shared_task(bind=True, base=OmegamlTask, name="omw_runner_tasks.om_context")
def om_context(self, *args, **kwargs):
    out = _ctx(self.request)
    out["delegate_kwargs"] = self.delegate_kwargs
    out["bucket"] = self.om.bucket
    return out


# MongoDB commands that set a client or store up (connect check, indexes), counted from Celery's
# task_prerun on: the listener is registered before any client exists, so every child has it
from celery.signals import task_prerun
from pymongo import monitoring

_SETUP = {"armed": False, "commands": []}


class _SetupCommands(monitoring.CommandListener):
    def started(self, event):
        if _SETUP["armed"] and event.command_name in ("ping", "hello", "createIndexes", "listIndexes"):
            _SETUP["commands"].append(event.command_name)

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


monitoring.register(_SetupCommands())


@task_prerun.connect
def _arm_setup_count(**_):
    _SETUP["armed"] = True


@shared_task(bind=True, base=OmegamlTask, name="omw_runner_tasks.om_warmth")
def om_warmth(self, *args, **kwargs):
    """Which omega|ml instance the task got, and the set-up commands issued since the task began
    (OmegamlTask's __call__ uses the datasets and models stores before this body runs)."""
    import omegaml
    om = self.om
    om.datasets.metadata("no-such-object")
    return {"is_default": om is getattr(omegaml._omega._om, "omega", None), "bucket": om.bucket,
            "setup_commands": sorted(set(_SETUP["commands"]))}

@shared_task(bind=True, name="omw_runner_tasks.retrying")
def retrying(self, x, new_args=False):
    if new_args:
        raise self.retry(args=(x + 1,), kwargs={}, countdown=7, max_retries=5,
                         exc=ValueError("again", x))
    raise self.retry(countdown=7, max_retries=5, exc=ValueError("again", x))


@shared_task(bind=True, name="omw_runner_tasks.retry_exhausted")
def retry_exhausted(self):
    raise self.retry(countdown=1, max_retries=0, exc=KeyError("gone"))


@shared_task(bind=True, name="omw_runner_tasks.sleepy")
def sleepy(self, seconds):
    import time
    time.sleep(seconds)
    return "woke"


_STATE = {}


@shared_task(bind=True, name="omw_runner_tasks.leave_state")
def leave_state(self):
    """What an earlier task left in this process (a spare must have none), then leaves some."""
    import omegaml
    before = {"module": dict(_STATE), "env": os.environ.get("OMW_LEFT_BY"),
              "om_initialized": bool(getattr(omegaml._omega._om, "initialized", False))}
    _STATE["left_by"] = self.request.id
    os.environ["OMW_LEFT_BY"] = self.request.id
    return before


@shared_task(bind=True, name="omw_runner_tasks.soft_limit")
def soft_limit(self):
    return [self.soft_time_limit, self.app.conf.task_soft_time_limit]


class MarkingTask(Task):
    def on_success(self, retval, task_id, args, kwargs):
        open(os.path.join(args[0], "on_success"), "w").write(task_id)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        open(os.path.join(args[0], "on_failure"), "w").write(type(exc).__name__)


@shared_task(bind=True, base=MarkingTask, name="omw_runner_tasks.marked")
def marked(self, marker_dir, what):
    if what == "fail":
        raise ZeroDivisionError("marked failure")
    if what == "unencodable":
        return object()
    return {"ok": what}
'''

EVIL_MODULE = '''
import os
open(os.environ["OMW_EVIL_MARKER"], "w").write("imported")
class Evil:
    pass
'''


# ---------------------------------------------------------------------------------------------
# environment: this module needs the venv and SecantusDB only
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def environment_ok():
    problems = []
    if not VENV_PY.exists():
        problems.append(f"venv missing: {VENV_PY} (run scripts/setup-venv.sh)")
    elif Path(sys.prefix).resolve() != VENV.resolve():
        problems.append(f"pytest runs under {sys.executable}, not the pinned venv {VENV}")
    from importlib.metadata import PackageNotFoundError, version
    for pkg, want in {"omegaml": "0.18.0", "celery": "5.7.0", "kombu": "5.7.0",
                      "secantusdb": "0.7.0b3"}.items():
        try:
            got = version(pkg)
        except PackageNotFoundError:
            problems.append(f"python package {pkg} missing from the venv")
            continue
        if got != want:
            problems.append(f"{pkg} {got} installed, {want} pinned")
    if problems:
        _fail("taskrunner environment not usable:\n  - " + "\n  - ".join(problems))
    return True


# ---------------------------------------------------------------------------------------------
# the fork server, driven as om-worker drives it
# ---------------------------------------------------------------------------------------------

class ForkServer:
    def __init__(self, env, workdir):
        self.env = env
        self.workdir = workdir
        self.log_path = workdir / "forkserver.log"
        self._log = open(self.log_path, "ab")
        # --preload: the test task module is imported before the fork, like omegaml.tasks; its
        # @shared_task tasks join omegaml.celeryapp's registry when the child finalizes the app
        self.proc = subprocess.Popen([str(VENV_PY), str(FORKSERVER), "--preload", "omw_runner_tasks"],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env,
                                     cwd=str(workdir))
        self._events = queue.Queue()
        self._exits = {}
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self._wait(lambda e: e.get("event") in ("ready", "fatal"), READY_TIMEOUT,
                                "fork server ready")
        if self.ready["event"] != "ready":
            _fail(f"fork server failed: {self.ready}\n{self.log()}")

    def _read(self):
        for line in self.proc.stdout:
            try:
                self._events.put(json.loads(line))
            except ValueError:
                self._events.put({"event": "garbage", "line": line.decode(errors="replace")})
        self._events.put({"event": "eof"})

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                _fail(f"timed out waiting for {what}\n--- fork server log ---\n{self.log()}")
            try:
                ev = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if ev.get("event") == "exit":
                self._exits[ev["pid"]] = ev
            if ev.get("event") == "eof":
                _fail(f"fork server exited while waiting for {what}\n{self.log()}")
            if pred(ev):
                return ev

    def send(self, op):
        """Sends one op with a fresh id; returns the id."""
        self._next_id += 1
        op = dict(op, id=self._next_id)
        self.proc.stdin.write((json.dumps(op) + "\n").encode())
        self.proc.stdin.flush()
        return op["id"]

    def reply(self, rid, what):
        return self._wait(lambda e: e.get("id") == rid, 30, what)

    def wait_exit(self, pid, what, timeout=TASK_TIMEOUT):
        if pid not in self._exits:
            self._wait(lambda e: e.get("event") == "exit" and e.get("pid") == pid, timeout, what)
        return self._exits.pop(pid)

    def spare(self, env_extra=None):
        """Forks a spare task child (warmed up, waiting for `go`); returns its pid."""
        rid = self.send({"op": "spare", "hostname": HOSTNAME, "env": dict(self.env, **(env_extra or {})),
                         "cwd": str(self.workdir), "rlimit_as": None})
        forked = self.reply(rid, "forked reply for a spare")
        assert forked["event"] == "forked", forked
        return forked["pid"]

    def task(self, task, args=(), kwargs=None, serializer="pickle", request=None,
             env_extra=None, spare=None):
        """Run one task request in a forked child (`spare`: in that spare child, with `go`);
        returns (task id, exit event, outcome, files)."""
        self._next_id += 1
        rid = self._next_id
        tid = str(uuid.uuid4())
        result_dir = self.workdir / f"task-{rid}"
        result_dir.mkdir()
        req = {"retries": 0, "hostname": HOSTNAME,
               "delivery_info": {"exchange": "", "routing_key": "omw-q", "priority": 0,
                                 "redelivered": False},
               "reply_to": "reply-" + tid, "correlation_id": tid, "root_id": tid,
               "parent_id": None, "group": None, "group_index": None, "eta": None,
               "expires": None, "timelimit": [None, None], "origin": "gen1@test",
               "ignore_result": False}
        req.update(request or {})
        body = {"task": task, "id": tid, "args": list(args),
                "kwargs": kwargs if kwargs is not None else {"$dict": []},
                "request": req, "result_serializer": serializer, "result_dir": str(result_dir)}
        path = self.workdir / f"request-{rid}.json"
        path.write_text(json.dumps(body))
        env = dict(self.env, **(env_extra or {}))
        if spare is None:
            op = {"op": "task", "id": rid, "request": str(path), "env": env,
                  "cwd": str(self.workdir), "rlimit_as": None}
        else:
            op = {"op": "go", "id": rid, "pid": spare, "request": str(path)}
        self.proc.stdin.write((json.dumps(op) + "\n").encode())
        self.proc.stdin.flush()
        forked = self._wait(lambda e: e.get("id") == rid, 30, f"forked reply for task {rid}")
        assert forked["event"] == ("forked" if spare is None else "started"), forked
        pid = forked["pid"]
        if pid not in self._exits:
            self._wait(lambda e: e.get("event") == "exit" and e.get("pid") == pid, TASK_TIMEOUT,
                       f"exit of task child {pid} ({task})")
        ex = self._exits.pop(pid)
        files = {p.name: p.read_bytes() for p in result_dir.iterdir()}
        outcome = json.loads(files["outcome.json"]) if "outcome.json" in files else None
        return tid, ex, outcome, files

    def stop(self):
        try:
            self.proc.stdin.close()  # EOF: the server kills its children and exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            procs.stop_process(self.proc, 10)
        self._log.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("taskrunner")
    (d / "mods").mkdir()
    (d / "mods" / "omw_runner_tasks.py").write_text(TASK_MODULE)
    (d / "mods" / "omw_evil_mod.py").write_text(EVIL_MODULE)
    return d


@pytest.fixture(scope="module")
def server_env(mongo, workdir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_ENV)}
    # OMEGA_BROKER: what a task publishes (a retry, callbacks) goes to the real Redis
    env.update({"OMEGA_MONGO_URL": mongo, "OMEGA_CONFIG_FILE": _NO_CONFIG, "OMEGA_BROKER": REDIS_URL,
                "OMEGA_TMP": str(workdir), "PYTHONPATH": str(workdir / "mods"),
                "OMW_EVIL_MARKER": str(workdir / "evil-imported")})
    return env


@pytest.fixture(scope="module")
def server(server_env, workdir):
    fs = ForkServer(server_env, workdir)
    assert fs.ready.get("task_runner") is None, fs.ready
    assert all(v is None for v in fs.ready["preload"].values()), fs.ready
    assert fs.ready["warnings"] == [], fs.ready
    yield fs
    fs.stop()


# ---------------------------------------------------------------------------------------------
# data: put with the omega|ml client, reference values from a local fit
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def omdata(mongo):
    import numpy as np
    import pandas as pd
    from omegaml import Omega
    from sklearn.linear_model import LinearRegression

    om = Omega(mongo_url=mongo)
    sid = short_id()
    rng = np.random.default_rng(7)
    X = pd.DataFrame({"x1": rng.normal(size=40), "x2": rng.normal(size=40)})
    Y = pd.DataFrame({"y": 3.0 * X["x1"] - 2.0 * X["x2"] + 0.5 + rng.normal(scale=0.1, size=40)})
    names = {"xname": f"X-{sid}", "yname": f"Y-{sid}", "model": f"lr-{sid}", "fitted": f"lrfit-{sid}"}
    om.datasets.put(X, names["xname"], append=False)
    om.datasets.put(Y, names["yname"], append=False)
    om.models.put(LinearRegression(), names["model"])
    local = LinearRegression().fit(X, Y)
    om.models.put(local, names["fitted"])
    yield {"om": om, "X": X, "Y": Y, "local": local, **names}
    for kind, key in (("datasets", "xname"), ("datasets", "yname"), ("models", "model"), ("models", "fitted")):
        try:
            getattr(om, kind).drop(names[key], force=True)
        except Exception:
            pass


def td(d):
    """A plain dict as typed JSON ({"$dict": [[k, v], ...]}, values already typed)."""
    return {"$dict": [[k, v] for k, v in d.items()]}


def omega_kwargs(**extra):
    # what om.runtime sends (OmegaRuntime: pure_python / __bucket; see omega_scenarios.py)
    return td({**extra, "pure_python": False, "__bucket": None})


def assert_success(ex, outcome, files):
    assert ex.get("code") == 0, (ex, outcome)
    assert outcome is not None and outcome["status"] == "SUCCESS", outcome
    assert outcome["result_stored"] is True
    return files["result.bin"]


# ---------------------------------------------------------------------------------------------
# omega|ml tasks
# ---------------------------------------------------------------------------------------------

def test_a_task_sees_no_ipython_shell(server):
    """The fork server prepares ipykernel's shell for notebooks; a task child is a Celery task,
    not a kernel: get_ipython() is None and omega|ml does not think it is interactive."""
    _, ex, out, files = server.task("omw_runner_tasks.ipython_state")
    value = pickle.loads(assert_success(ex, out, files))
    assert value == {"get_ipython": "None", "is_interactive": False}, value


def test_fit_predict_score(server, omdata):
    import numpy as np

    _, ex, out, files = server.task("omegaml.tasks.omega_fit", [omdata["model"], omdata["xname"]],
                                    omega_kwargs(Yname=omdata["yname"]))
    value = pickle.loads(assert_success(ex, out, files))
    assert out["content_type"] == "application/x-python-serialize"
    assert out["content_encoding"] == "binary"
    assert isinstance(value, str) and omdata["model"] in value  # sanitized(Metadata) -> repr
    fitted = omdata["om"].models.get(omdata["model"])
    np.testing.assert_allclose(fitted.coef_, omdata["local"].coef_, rtol=1e-9)
    # the file is exactly kombu's pickle of the value (protocol 4)
    assert files["result.bin"][:2] == b"\x80\x04"

    _, ex, out, files = server.task("omegaml.tasks.omega_predict", [omdata["model"], omdata["xname"]],
                                    omega_kwargs(rName=None))
    pred = pickle.loads(assert_success(ex, out, files))
    np.testing.assert_allclose(np.asarray(pred), omdata["local"].predict(omdata["X"]), rtol=1e-9)

    _, ex, out, files = server.task("omegaml.tasks.omega_score", [omdata["model"], omdata["xname"]],
                                    omega_kwargs(Yname=omdata["yname"], rName=None))
    score = pickle.loads(assert_success(ex, out, files))
    assert math.isclose(score, omdata["local"].score(omdata["X"], omdata["Y"]), rel_tol=1e-9)


def test_predict_passthrough_dataset(server, omdata):
    import numpy as np

    rows = [[0.5, -1.0], [2.0, 0.25], [-3.0, 1.5]]
    arg = {"$object": {"class": "omegaml.mixins.store.passthrough.PassthroughDataset",
                       "args": ["./system/passthrough/" + uuid.uuid4().hex],
                       "state": td({"_passthrough_data": rows})}}
    _, ex, out, files = server.task("omegaml.tasks.omega_predict", [omdata["fitted"], arg],
                                    omega_kwargs(rName=None))
    pred = pickle.loads(assert_success(ex, out, files))
    expect = omdata["local"].predict(np.array(rows))
    np.testing.assert_allclose(np.asarray(pred).ravel(), expect.ravel(), rtol=1e-9)


REFERENCE_APPLY = r'''
import json, sys
import omegaml.celeryapp as ca
task = ca.app.tasks[sys.argv[1]]
r = task.apply(args=json.loads(sys.argv[2]), kwargs=json.loads(sys.argv[3]))
exc = r.result
print("@@REF@@" + json.dumps({"state": r.state, "exc_type": type(exc).__qualname__,
                              "exc_module": type(exc).__module__, "args": list(exc.args)}))
'''


def test_missing_dataset_as_python_worker(server, server_env, omdata):
    missing = f"no-such-dataset-{short_id()}"
    args = [omdata["fitted"], missing]
    kwargs = {"rName": None, "pure_python": False, "__bucket": None}
    # reference: omega|ml's own task.apply() in a fresh client process
    ref = subprocess.run([str(VENV_PY), "-c", REFERENCE_APPLY, "omegaml.tasks.omega_predict",
                          json.dumps(args), json.dumps(kwargs)], env=server_env,
                         capture_output=True, text=True, timeout=180)
    line = [ln for ln in ref.stdout.splitlines() if ln.startswith("@@REF@@")]
    assert line, f"reference apply() printed nothing (rc {ref.returncode}):\n{ref.stderr[-4000:]}"
    expect = json.loads(line[0][len("@@REF@@"):])
    assert expect["state"] == "FAILURE"

    _, ex, out, files = server.task("omegaml.tasks.omega_predict", args, td(kwargs))
    assert ex.get("code") == 0 and out["status"] == "FAILURE", out
    assert (out["exc_type"], out["exc_module"]) == (expect["exc_type"], expect["exc_module"])
    assert out["exc_message"] == expect["args"]
    assert "Traceback" in out["traceback"] and "omega_predict" in out["traceback"]
    assert "result.bin" not in files
    exc = pickle.loads(files["exception.bin"])  # as Celery's pickle backend would store it
    assert type(exc).__name__ == expect["exc_type"] and list(exc.args) == expect["args"]


def test_ping_request_and_json_serializer(server, omdata):
    _, ex, out, files = server.task(
        "omegaml.tasks.omega_ping", [1, "two", {"$tuple": [3]}],
        td({"a": 1, "__bucket": None, "pure_python": False}), serializer="json")
    data = json.loads(assert_success(ex, out, files))
    assert out["content_type"] == "application/json" and out["content_encoding"] == "utf-8"
    assert data["worker"] == HOSTNAME
    assert data["args"] == [1, "two", [3]]
    assert data["kwargs"] == {"a": 1}  # __bucket consumed by OmegamlTask

    _, ex, out, files = server.task("omegaml.tasks.omega_ping", [],
                                    td({"exception": True, "__bucket": None}))
    assert out["status"] == "FAILURE"
    assert (out["exc_type"], out["exc_module"]) == ("RuntimeError", "builtins")
    assert out["exc_message"] == ["intentional exception caused by exception=True kwarg"]


def test_unknown_task(server):
    _, ex, out, files = server.task("omegaml.tasks.no_such_task", [], None)
    assert ex.get("code") == 0
    assert out["status"] == "FAILURE"
    assert (out["exc_type"], out["exc_module"]) == ("NotRegistered", "celery.exceptions")
    assert out["exc_message"] == ["omegaml.tasks.no_such_task"]


@pytest.mark.parametrize("cls", ["omw_evil_mod.Evil", "os.system", "builtins.eval",
                                 "celery.canvas.Signature"])
def test_object_not_allowed(server, workdir, cls):
    arg = {"$object": {"class": cls, "args": ["echo hi"], "state": None}}
    _, ex, out, files = server.task("omegaml.tasks.omega_ping", [arg], td({"__bucket": None}))
    assert ex.get("code") == 0
    assert out["status"] == "FAILURE", out
    assert (out["exc_type"], out["exc_module"]) == ("TypeError", "builtins")
    assert cls in out["exc_message"][0] and "not allowed" in out["exc_message"][0]
    assert not (workdir / "evil-imported").exists()  # the class's module was never imported


def test_listed_tasks():
    proc = subprocess.run([str(VENV_PY), str(ROOT / "python" / "om_taskrunner.py"), "--list-tasks"],
                          capture_output=True, text=True, timeout=180,
                          env={k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_ENV)}
                          | {"OMEGA_CONFIG_FILE": _NO_CONFIG})
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = json.loads(proc.stdout)
    for n in ("omegaml.tasks.omega_predict", "omegaml.tasks.omega_fit", "omegaml.tasks.omega_ping",
              "omegaml.notebook.tasks.run_omegaml_job",
              "omegaml.backends.package.tasks.run_omega_script"):
        assert n in names
    # Celery's builtins too, as a Python worker of the app runs them (chord_unlock for chords on
    # backends without native join)
    assert "celery.chord_unlock" in names


# ---------------------------------------------------------------------------------------------
# Celery semantics (test task module)
# ---------------------------------------------------------------------------------------------

def test_request_context_as_worker(server):
    tid, ex, out, files = server.task(
        "omw_runner_tasks.context", [1, {"$bytes": base64.b64encode(b"\x00\xff").decode()}],
        td({"k": {"$set": [1]}}),
        request={"retries": 2, "group": "g-1", "group_index": 3, "parent_id": "p-1",
                 "root_id": "r-1", "timelimit": [100, 90]})
    ctx = pickle.loads(assert_success(ex, out, files))
    assert ctx["id"] == tid and ctx["correlation_id"] == tid
    assert ctx["args"] == [1, b"\x00\xff"] and ctx["kwargs"] == {"k": {1}}
    assert ctx["is_eager"] is False and ctx["called_directly"] is False
    assert ctx["hostname"] == HOSTNAME and ctx["retries"] == 2
    assert (ctx["group"], ctx["group_index"], ctx["parent_id"], ctx["root_id"]) == \
        ("g-1", 3, "p-1", "r-1")
    assert ctx["delivery_info"]["routing_key"] == "omw-q"
    assert list(ctx["timelimit"]) == [100, 90]

    _, ex, out, files = server.task("omw_runner_tasks.om_context", ["a"],
                                    td({"x": 1, "__bucket": None, "__logging": False}))
    ctx = pickle.loads(assert_success(ex, out, files))
    assert ctx["delegate_kwargs"] == {"x": 1} and ctx["is_eager"] is False


def test_retry_republishes_as_celery_does(server):
    """self.retry() publishes the task again from the child, as Celery's worker does: same id,
    retries + 1, to the queue the message came from (its delivery_info), with the countdown's ETA;
    the outcome is RETRY with the cause, and describes what was published."""
    import redis

    q = f"omw-retry-{short_id()}"
    delivery = {"exchange": "", "routing_key": q, "priority": 0, "redelivered": False}
    client = redis.Redis.from_url(REDIS_URL)
    try:
        tid, ex, out, files = server.task("omw_runner_tasks.retrying", [5], None,
                                          request={"retries": 1, "delivery_info": delivery})
        assert ex.get("code") == 0 and out["status"] == "RETRY", out
        assert (out["exc_type"], out["exc_message"]) == ("ValueError", ["again", 5])
        r = out["retry"]
        assert r["countdown"] == 7 and r["max_retries"] == 5 and r["retries"] == 2
        assert r["queue"] == q
        eta = datetime.datetime.fromisoformat(r["eta"])
        now = datetime.datetime.now(datetime.timezone.utc)
        assert 0 < (eta - now).total_seconds() <= 8
        assert "args" not in r  # the original arguments were republished
        published = [json.loads(m) for m in client.lrange(q, 0, -1)]
        assert len(published) == 1, published
        headers = published[0]["headers"]
        assert (headers["id"], headers["retries"], headers["task"]) == (tid, 2, "omw_runner_tasks.retrying")
        assert headers["eta"] and datetime.datetime.fromisoformat(headers["eta"]) > now

        _, ex, out, files = server.task("omw_runner_tasks.retrying", [5], td({"new_args": True}),
                                        request={"delivery_info": delivery})
        assert out["status"] == "RETRY" and out["retry"]["args"] == [6]
        assert out["retry"]["kwargs"] == {"$dict": []}
        assert client.llen(q) == 2
    finally:
        client.delete(q)
        client.close()

    _, ex, out, files = server.task("omw_runner_tasks.retry_exhausted", [], None,
                                    request={"retries": 0})
    assert out["status"] == "FAILURE" and out["exc_type"] == "KeyError", out
    assert "retry" not in out


def test_handlers_and_encode_error(server, workdir):
    marks = workdir / f"marks-{short_id()}"
    marks.mkdir()
    tid, ex, out, files = server.task("omw_runner_tasks.marked", [str(marks), "yes"], None)
    assert pickle.loads(assert_success(ex, out, files)) == {"ok": "yes"}
    assert (marks / "on_success").read_text() == tid

    fail_dir = workdir / f"marks-{short_id()}"
    fail_dir.mkdir()
    _, ex, out, files = server.task("omw_runner_tasks.marked", [str(fail_dir), "fail"], None)
    assert out["status"] == "FAILURE" and out["exc_type"] == "ZeroDivisionError"
    assert (fail_dir / "on_failure").read_text() == "ZeroDivisionError"

    enc_dir = workdir / f"marks-{short_id()}"
    enc_dir.mkdir()
    _, ex, out, files = server.task("omw_runner_tasks.marked", [str(enc_dir), "unencodable"],
                                    None, serializer="json")
    # as the Python worker: the backend's encode fails inside the tracer -> FAILURE + on_failure
    assert out["status"] == "FAILURE" and out["exc_type"] == "EncodeError", out
    assert out["exc_module"] == "kombu.exceptions"
    assert (enc_dir / "on_failure").read_text() == "EncodeError"
    assert "result.bin" not in files


# ---------------------------------------------------------------------------------------------
# typed JSON codec (in-process)
# ---------------------------------------------------------------------------------------------

def test_typed_json_decode_all_tags():
    aware = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456,
                              tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    doc = [None, True, 3, 2.5, "s",
           {"$float": "nan"}, {"$float": "-inf"}, {"$tuple": [1, [2]]}, {"$set": [1, 2]},
           {"$dict": [[{"$tuple": [1, 2]}, "t"], [3, {"$dict": []}]]},
           {"$bytes": base64.b64encode(b"\x00\x01").decode()}, {"$int": str(2 ** 80)},
           {"$datetime": aware.isoformat()}, {"$date": "2024-05-06"}, {"$time": "07:08:09.000010"},
           {"$timedelta": [1, 2, 3]}, {"$decimal": "1.10"},
           {"$uuid": "12345678123456781234567812345678"}]
    v = om_taskrunner.decode(json.loads(json.dumps(doc)))
    assert v[:5] == [None, True, 3, 2.5, "s"]
    assert math.isnan(v[5]) and v[6] == float("-inf")
    assert v[7] == (1, [2]) and v[8] == {1, 2}
    assert v[9] == {(1, 2): "t", 3: {}} and list(v[9]) == [(1, 2), 3]
    assert v[10] == b"\x00\x01" and v[11] == 2 ** 80
    assert v[12] == aware and v[13] == datetime.date(2024, 5, 6)
    assert v[14] == datetime.time(7, 8, 9, 10) and v[15] == datetime.timedelta(1, 2, 3)
    assert v[16] == decimal.Decimal("1.10") and v[17] == uuid.UUID(int=0x12345678123456781234567812345678)
    # and back: the encoder is the decoder's inverse for these values
    again = om_taskrunner.decode(json.loads(json.dumps(om_taskrunner.encode(v), allow_nan=False)))
    assert again[7:] == v[7:] and again[:5] == v[:5] and math.isnan(again[5])


def test_typed_json_passthrough_and_refusals():
    from omegaml.mixins.store.passthrough import PassthroughDataset

    obj = om_taskrunner.decode({"$object": {
        "class": "omegaml.mixins.store.passthrough.PassthroughDataset",
        "args": ["./system/passthrough/abc"], "state": td({"_passthrough_data": [[1, 2]]})}})
    assert isinstance(obj, PassthroughDataset) and isinstance(obj, str)
    assert obj.data == [[1, 2]] and obj.startswith("./system/passthrough/")
    enc = om_taskrunner.encode(obj)
    assert enc["$object"]["class"] == "omegaml.mixins.store.passthrough.PassthroughDataset"
    assert om_taskrunner.decode(enc).data == [[1, 2]]
    for bad, exc in [({"a": 1}, TypeError), ({"$nope": 1}, TypeError), ({"$float": "1"}, ValueError),
                     ({"$bytes": "!!"}, ValueError), ({"$dict": [[1]]}, ValueError),
                     ({"$object": {"class": "subprocess.Popen", "args": []}}, TypeError)]:
        with pytest.raises(exc):
            om_taskrunner.decode(bad)
    assert om_taskrunner.encode(object()).startswith("<object object")
    assert om_taskrunner.encode(float("inf")) == {"$float": "inf"}
    assert om_taskrunner.encode(2 ** 70) == {"$int": str(2 ** 70)}


def test_soft_time_limit(server):
    t = time.monotonic()
    _, ex, out, files = server.task("omw_runner_tasks.sleepy", [30], None,
                                    request={"timelimit": [None, 1]})
    assert time.monotonic() - t < 20
    assert ex.get("code") == 0 and out["status"] == "FAILURE", out
    assert (out["exc_type"], out["exc_module"]) == ("SoftTimeLimitExceeded", "billiard.exceptions")
    # without a message limit the app's (omega|ml's CELERYD_TASK_SOFT_TIME_LIMIT) applies
    _, ex, out, files = server.task("omw_runner_tasks.soft_limit", [], None)
    assert pickle.loads(assert_success(ex, out, files))[1] == 20 * 60


def test_spare_children_run_one_task_each_and_start_clean(server, omdata):
    """`spare`/`go` (what om-worker uses for every Python task after the first): a spare is
    forked and warmed up ahead of its task (Celery's worker-process init, the default omega|ml
    instance) and runs exactly one task; nothing one task leaves behind (module state,
    os.environ) is seen by the next; the result equals a cold child's."""
    a, b = server.spare(), server.spare()
    assert a != b
    _, ex, outcome, files = server.task("omw_runner_tasks.leave_state", spare=a)
    first = pickle.loads(assert_success(ex, outcome, files))
    # warmed up: the default omega|ml instance exists before the task's first line
    assert first == {"module": {}, "env": None, "om_initialized": True}, first
    _, ex, outcome, files = server.task("omw_runner_tasks.leave_state", spare=b)
    assert pickle.loads(assert_success(ex, outcome, files)) == first
    # a cold child reports the same state, without the warm-up
    _, ex, outcome, files = server.task("omw_runner_tasks.leave_state")
    assert pickle.loads(assert_success(ex, outcome, files)) == dict(first, om_initialized=False)
    # a model task in a spare: same prediction as a local one
    import numpy as np
    c = server.spare()
    _, ex, outcome, files = server.task("omegaml.tasks.omega_predict",
                                        args=[omdata["fitted"], omdata["xname"]],
                                        kwargs=omega_kwargs(rName=None), spare=c)
    got = pickle.loads(assert_success(ex, outcome, files))
    np.testing.assert_allclose(np.asarray(got), omdata["local"].predict(omdata["X"]))


def test_a_spare_hands_its_open_omega_instance_to_the_task(server, omdata):
    """A spare opens the default omega|ml instance's datasets and models stores before its task
    (MongoDB connected, indexes ensured) and the task's `self.om` is that instance -- the one a
    cold child's first `self.om` creates and makes the module default: the task sends no set-up
    command (a cold child's sends ping and createIndexes). With another bucket the task gets
    omega|ml's own clone, as before."""
    c = server.spare()
    _, ex, outcome, files = server.task("omw_runner_tasks.om_warmth", kwargs=omega_kwargs(), spare=c)
    warm = pickle.loads(assert_success(ex, outcome, files))
    assert warm == {"is_default": True, "bucket": None, "setup_commands": []}, warm
    _, ex, outcome, files = server.task("omw_runner_tasks.om_warmth", kwargs=omega_kwargs())
    cold = pickle.loads(assert_success(ex, outcome, files))
    assert cold["is_default"] is True and cold["bucket"] is None, cold
    assert {"ping", "createIndexes"} <= set(cold["setup_commands"]), cold
    c = server.spare()
    _, ex, outcome, files = server.task("omw_runner_tasks.om_warmth",
                                        kwargs=td({"pure_python": False, "__bucket": "other"}), spare=c)
    other = pickle.loads(assert_success(ex, outcome, files))
    assert other["bucket"] == "other" and other["is_default"] is False, other


def test_spare_misuse_and_retire(server):
    """A spare runs one task only: `go` to a used, unknown or dead pid is an error and runs
    nothing; `retire` ends an unused spare (exit 0, no outcome) -- promptly even while another
    task child runs, so no sibling holds a spare's pipe (no task can start a task in it)."""
    a = server.spare()
    _, ex, outcome, _ = server.task("omw_runner_tasks.context", spare=a)
    assert outcome["status"] == "SUCCESS"
    rid = server.send({"op": "go", "pid": a, "request": "/nonexistent.json"})
    err = server.reply(rid, "go to a used spare")
    assert err["event"] == "error" and "no waiting spare" in err["error"], err
    rid = server.send({"op": "go", "pid": "x", "request": "/nonexistent.json"})
    assert server.reply(rid, "go to a bad pid")["event"] == "error"

    b = server.spare()
    req_dir = server.workdir / "sleepy"
    req_dir.mkdir()
    body = {"task": "omw_runner_tasks.sleepy", "id": str(uuid.uuid4()), "args": [20],
            "kwargs": {"$dict": []}, "request": {"hostname": HOSTNAME},
            "result_serializer": "pickle", "result_dir": str(req_dir)}
    (req_dir / "request.json").write_text(json.dumps(body))
    rid = server.send({"op": "task", "request": str(req_dir / "request.json"), "env": server.env,
                       "cwd": str(server.workdir), "rlimit_as": None})
    sleeper = server.reply(rid, "forked sleepy")["pid"]
    t0 = time.monotonic()
    server.send({"op": "retire", "pid": b})
    ex = server.wait_exit(b, "retired spare exit", timeout=15)
    assert ex.get("code") == 0, ex
    assert time.monotonic() - t0 < 15
    assert sleeper not in server._exits, "the sleeping task ended first: the check proves nothing"
    os.killpg(sleeper, 9)
    server.wait_exit(sleeper, "sleepy child killed")
    rid = server.send({"op": "go", "pid": b, "request": "/nonexistent.json"})
    assert server.reply(rid, "go to a retired spare")["event"] == "error"
