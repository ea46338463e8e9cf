"""omega|ml client scenarios, each run in a fresh subprocess with the unchanged omega|ml 0.18.0 client.

As a script (what the tests run):

    .venv/bin/python tests/interop/omega_scenarios.py <scenario> '<json args>'

with OMEGA_MONGO_URL / OMEGA_BROKER / OMEGA_RESULT_BACKEND=rpc:// / OMEGA_CONFIG_FILE=<nonexistent> /
OMEGA_TMP / OMEGA_WORKER_LABEL (+ CELERY_Q) in the environment, read by `import omegaml` exactly as a
user's client reads them. It prints JSON lines prefixed with MARK: zero or more `{"event": ...}` lines
(a scenario that holds waits for one line on stdin after each event) and one final `{"result": ...}`.
Values that JSON cannot hold keep their type: datetime -> {"$datetime": iso}, ObjectId -> {"$oid": hex}.

Why a subprocess per scenario: with rpc://, once a client process has waited on any result with
`.get()`, `job.status()` polling in that process reads PENDING forever (a client quirk, the Python
worker shows it too), and the client reads its configuration once at import. A fresh process per
scenario keeps every scenario independent and configured like a user's.

As a module (what the tests import): `Scenario` / `run_scenario` start the subprocess with the env
built by `client_env()` and enforce an overall timeout.
"""
import datetime
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

MARK = "@@OMW-SCENARIO@@ "
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_TIMEOUT = 240  # seconds, whole scenario (the script arms an alarm; the runner kills after +30 s)
TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")


# =============================================================================================
# runner side (imported by the tests)
# =============================================================================================

def client_env(mongo_url, broker_url, label, tmpdir, no_config, backend="rpc://", extra=None):
    """The environment of an omega|ml client process: no stray OMEGA_*/CELERY_* from the test runner,
    OMEGA_WORKER_LABEL and CELERY_Q both set to `label` (the client's default queue)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMEGA_", "CELERY_"))}
    env.update({
        "OMEGA_MONGO_URL": mongo_url,
        "OMEGA_BROKER": broker_url,
        "OMEGA_RESULT_BACKEND": backend,
        "OMEGA_CONFIG_FILE": str(no_config),
        "OMEGA_TMP": str(tmpdir),
        "OMEGA_WORKER_LABEL": label,
        "CELERY_Q": label,
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


class ScenarioError(AssertionError):
    pass


class Scenario:
    """One scenario subprocess. events() / go() for holding scenarios, result() for the final value."""

    def __init__(self, python, name, args, env, logdir, timeout=DEFAULT_TIMEOUT):
        self.name = name
        self.timeout = timeout
        args = dict(args, timeout=timeout)
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = logdir / f"scenario-{name}-{time.monotonic_ns()}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), name, json.dumps(args)],
                                     env=env, cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)
        self.deadline = time.monotonic() + timeout + 30
        self.stdout_lines = []
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            if line.startswith(MARK):
                self._lines.put(json.loads(line[len(MARK):]))
        self._lines.put(None)

    def stderr_tail(self, limit=6000):
        try:
            text = self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-limit:]

    def _describe(self):
        out = "".join(l for l in self.stdout_lines if not l.startswith(MARK))[-3000:]
        return (f"scenario {self.name!r} (pid {self.proc.pid}, rc {self.proc.poll()})\n--- stdout (non-JSON) ---\n"
                f"{out}\n--- stderr ---\n{self.stderr_tail()}")

    def _next(self):
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ScenarioError(f"timed out after {self.timeout + 30}s\n{self._describe()}")
            try:
                item = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if item is None:
                self.proc.wait(timeout=30)
                raise ScenarioError(f"scenario ended without a result\n{self._describe()}")
            if "error" in item:
                self.proc.wait(timeout=30)
                raise ScenarioError(f"scenario raised: {item['error']}\n{self._describe()}")
            return item

    def event(self):
        item = self._next()
        if "event" not in item:
            raise ScenarioError(f"expected an event line, got {item!r}\n{self._describe()}")
        return item["event"]

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self):
        item = self._next()
        if "result" not in item:
            raise ScenarioError(f"expected the result line, got {item!r}\n{self._describe()}")
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            self._stderr.close()
        if rc != 0:
            raise ScenarioError(f"scenario exited with rc {rc} after its result\n{self._describe()}")
        return item["result"]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()  # only this PID: the scenario process we started
            self.proc.wait(timeout=30)


def run_scenario(python, name, args, env, logdir, timeout=DEFAULT_TIMEOUT):
    sc = Scenario(python, name, args, env, logdir, timeout=timeout)
    try:
        return sc.result()
    finally:
        sc.kill()


# =============================================================================================
# script side (runs in the subprocess, with the unchanged omega|ml client)
# =============================================================================================

def tj(obj):
    """JSON-able copy that keeps datetimes and ObjectIds recognisable."""
    if isinstance(obj, dict):
        return {str(k): tj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [tj(v) for v in obj]
    if isinstance(obj, datetime.datetime):
        return {"$datetime": obj.isoformat()}
    if type(obj).__name__ == "ObjectId":
        return {"$oid": str(obj)}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return {"$repr": repr(obj), "$type": type(obj).__name__}


def emit(kind, value):
    sys.stdout.write(MARK + json.dumps({kind: tj(value)}) + "\n")
    sys.stdout.flush()


def hold(event):
    """Report an event and wait for the runner's `go`."""
    emit("event", event)
    line = sys.stdin.readline()
    if not line:
        raise RuntimeError("runner closed stdin while the scenario was holding")


def put_notebooks(om, notebooks):
    import nbformat
    for name, cells in (notebooks or {}).items():
        nb = nbformat.v4.new_notebook()
        for src in cells:
            nb.cells.append(nbformat.v4.new_code_cell(src))
        om.jobs.put(nb, name)


def status_rows(df):
    return [dict(name=r["name"], task_id=r["task_id"], status=r["status"], run_status=r["run_status"])
            for _, r in df.iterrows()]


def poll_status(job, until_done, timeout, task_group=None, interval=0.5):
    """Poll job.status() (the client's own AsyncResult.status through rpc://) until until_done(rows)."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        rows = status_rows(job.status(task_group=task_group))
        polls += 1
        if until_done(rows):
            return {"rows": rows, "timed_out": False, "polls": polls}
        if time.monotonic() > deadline:
            return {"rows": rows, "timed_out": True, "polls": polls}
        time.sleep(interval)


def row_done(r):
    return r["status"] in ("FAILURE", "REVOKED") or (r["status"] == "SUCCESS" and r["run_status"] in ("OK", "ERROR"))


def settle(om, names, timeout=30):
    """Celery publishes SUCCESS before NotebookTask.on_success writes attributes.state/task_id (both
    workers): once job.status() shows a task done, wait (bounded) for that write before reading."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending and time.monotonic() < deadline:
        pending = []
        for name in names:
            meta = om.jobs.metadata(name)
            attrs = meta.attributes if meta is not None else {}
            if "state" not in attrs or attrs.get("task_id") != attrs.get("job", {}).get("task_id"):
                pending.append(name)
        if pending:
            time.sleep(0.3)
    return pending


def task_details(om, names, notebooks=False):
    """Per task notebook: metadata (typed), results names and, optionally, the results notebooks."""
    out = {}
    for name in names:
        meta = om.jobs.metadata(name)
        d = {"exists": meta is not None}
        if meta is not None:
            d.update(name=meta.name, kind=meta.kind, prefix=meta.prefix, bucket=meta.bucket,
                     attributes=meta.attributes,
                     ts_types=[type(r.get("ts")).__name__ for r in meta.attributes.get("job_runs", [])])
        d["results"] = om.jobs.list(f"results/{name}*")
        d["results_meta"] = {}
        for rname in d["results"]:
            rmeta = om.jobs.metadata(rname)
            d["results_meta"][rname] = dict(name=rmeta.name, kind=rmeta.kind, prefix=rmeta.prefix,
                                            bucket=rmeta.bucket, attributes=rmeta.attributes)
            if notebooks:
                d.setdefault("results_nb", {})[rname] = dict(om.jobs.get(rname))
        out[name] = d
    return out


def client_info(om):
    app = om.runtime.celeryapp
    return {"default_queue": app.conf.task_default_queue, "reply_to": app.thread_oid,
            "broker": app.conf.broker_url.split("@")[-1], "backend": app.conf.result_backend}


def sc_map(om, a):
    """put notebooks; job.map(params, require=...); optionally observe/hold; poll job.status() until
    every task is done; report rows, details, and the list/status views."""
    put_notebooks(om, a.get("put"))
    nb = a["nb"]
    job = om.runtime.job(nb)
    tasks = job.map(a["params"], require=a.get("require"))
    out = {"client": client_info(om), "task_group": job.task_group,
           "submitted": [m.name for m in tasks],
           "task_ids": {m.name: m.attributes["job"].get("task_id") for m in tasks}}
    if a.get("observe"):
        seen = []
        end = time.monotonic() + a["observe"]
        while time.monotonic() < end:
            seen.append(status_rows(job.status()))
            time.sleep(0.5)
        out["observed"] = seen
    if a.get("hold"):
        hold(out)
    if a.get("wait", True):
        out["final"] = poll_status(job, lambda rows: rows and all(row_done(r) for r in rows),
                                   a.get("wait_timeout", 180))
        out["unsettled"] = settle(om, [r["name"] for r in out["final"]["rows"] if r["status"] == "SUCCESS"])
        out["details"] = task_details(om, [r["name"] for r in out["final"]["rows"]], a.get("notebooks", False))
    if a.get("again"):
        # a second map() of the same notebook from this client: a new task group; restart() inside
        # map() scans all groups and must not resubmit the first group's tasks (they have results)
        tasks2 = job.map(a["again"], require=a.get("require"))
        again = {"task_group": job.task_group, "submitted": [m.name for m in tasks2],
                 "task_ids": {m.name: m.attributes["job"].get("task_id") for m in tasks2}}
        again["final"] = poll_status(job, lambda rows: rows and all(row_done(r) for r in rows),
                                     a.get("wait_timeout", 180))
        again["unsettled"] = settle(om, [r["name"] for r in again["final"]["rows"] if r["status"] == "SUCCESS"])
        again["details"] = task_details(om, [r["name"] for r in again["final"]["rows"]])
        out["again"] = again
    if a.get("datasets"):
        out["datasets"] = {name: om.datasets.get(name) for name in a["datasets"]}
    if a.get("lists"):
        out["list"] = job.list()
        out["list_all"] = job.list(task_group="*")
        out["status_all"] = status_rows(job.status(task_group="*"))
    return out


def sc_restart(om, a):
    """drop the results notebooks named in `drop`, then job.restart() and poll job.status() until the
    resubmitted tasks are done (the others' task ids belong to another client process: PENDING here)."""
    for name in a.get("drop", []):
        om.jobs.drop(name, force=True)
    job = om.runtime.job(a["nb"])
    tasks = job.restart()
    submitted = [m.name for m in tasks]
    out = {"submitted": submitted, "task_ids": {m.name: m.attributes["job"].get("task_id") for m in tasks}}
    final = poll_status(job, lambda rows: rows and all(row_done(r) for r in rows if r["name"] in submitted),
                        a.get("wait_timeout", 180))
    out["final"] = final
    out["unsettled"] = settle(om, submitted)
    out["details"] = task_details(om, [r["name"] for r in final["rows"]])
    if a.get("lists"):
        out["list"] = job.list()
        out["list_all"] = job.list(task_group="*")
        out["status_all"] = status_rows(job.status(task_group="*"))
    return out


def sc_lists(om, a):
    job = om.runtime.job(a["nb"])
    return {"list": job.list(), "list_all": job.list(task_group="*"),
            "list_group": job.list(task_group=a["task_group"]) if a.get("task_group") else None,
            "status_all": status_rows(job.status(task_group="*"))}


def sc_run(om, a):
    """om.runtime.job(name).run() for each name (optionally dropping the job right after submitting);
    optionally hold; then .get() each result and report the exception the client raises."""
    put_notebooks(om, a.get("put"))
    results = []
    out = {"client": client_info(om)}
    for name in a.get("absent", []):
        # the client refuses om.runtime.job(<absent>) (its proxy asserts the metadata exists): send
        # what OmegaJobProxy.run() sends, via the same runtime task API
        try:
            om.runtime.job(name)
        except AssertionError as e:
            out.setdefault("proxy_refused", {})[name] = str(e)
        res = om.runtime.task("omegaml.notebook.tasks.run_omegaml_job").delay(name, timeout=None)
        results.append((name, res))
    for name in a.get("names", []):
        res = om.runtime.job(name).run()
        results.append((name, res))
        if name in a.get("drop_after_submit", []):
            om.jobs.drop(name, force=True)
    out["task_ids"] = {n: r.id for n, r in results}
    if a.get("hold"):
        hold(out)
    if not a.get("get", True):
        return out
    out["outcomes"] = {}
    for name, res in results:
        o = {}
        try:
            o["value"] = res.get(timeout=a.get("get_timeout", 60))
        except Exception as e:
            o.update(exc_type=type(e).__name__, exc_module=type(e).__module__, exc_str=str(e),
                     exc_args=[repr(x) for x in e.args])
        o["state"] = res.state
        o["metadata_exists"] = om.jobs.metadata(name) is not None
        out["outcomes"][name] = o
    return out


def sc_submit(om, a):
    """put notebooks; job.map(params) for each of `maps`; send run_omegaml_job for each `absent` name as
    OmegaJobProxy.run() does. Nothing waits on a result, nothing polls: every state message the worker
    publishes stays in this client's reply queue (reported as client.reply_to) for the test to read."""
    put_notebooks(om, a.get("put"))
    out = {"client": client_info(om), "maps": {}, "absent": {}}
    for spec in a.get("maps", []):
        job = om.runtime.job(spec["nb"])
        tasks = job.map(spec["params"], require=spec.get("require"))
        out["maps"][spec["nb"]] = {"task_group": job.task_group,
                                   "task_ids": {m.name: m.attributes["job"].get("task_id") for m in tasks}}
    for name in a.get("absent", []):
        out["absent"][name] = om.runtime.task("omegaml.notebook.tasks.run_omegaml_job").delay(name, timeout=None).id
    return out


SCENARIOS = {"submit": sc_submit, "map": sc_map, "restart": sc_restart, "lists": sc_lists, "run": sc_run}


def main(argv):
    name, args = argv[1], json.loads(argv[2]) if len(argv) > 2 else {}
    timeout = int(args.get("timeout", DEFAULT_TIMEOUT))

    def on_alarm(signum, frame):
        raise TimeoutError(f"scenario {name!r} exceeded its overall timeout of {timeout}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)
    try:
        for k in ("OMEGA_MONGO_URL", "OMEGA_BROKER", "OMEGA_WORKER_LABEL"):
            if not os.environ.get(k):
                raise RuntimeError(f"{k} is not set for the scenario process")
        import omegaml as om
        result = SCENARIOS[name](om, args)
    except BaseException as e:
        import traceback
        traceback.print_exc()
        emit("error", f"{type(e).__name__}: {e}")
        return 1
    finally:
        signal.alarm(0)
    emit("result", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
