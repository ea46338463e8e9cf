"""omega|ml 0.18.0's own packaged runtime tests (omegaml/tests/core/...) against a real worker.

Two roles in one module (plain Python; no import of conftest, so it can be loaded as a plugin):

1. A pytest plugin for the *inner* pytest that runs omega|ml's tests in a subprocess
   (`-p omegaml_suite`, with this directory on PYTHONPATH):
   - eager guard: omega|ml's tests switch `om.runtime.celeryapp.conf.CELERY_ALWAYS_EAGER = True`
     (and `om.runtime.mode(local=True)`) themselves; every write of a true value to
     CELERY_ALWAYS_EAGER / task_always_eager on any Celery conf is stored as False instead, so
     every task really goes to the broker and the worker.
   - the session checks the client really is remote (OMEGA_LOCAL_RUNTIME off) and uses the
     OMEGA_MONGO_URL it was given (not test mode's `testdb` rewrite); a failed check is a usage
     error, never a silent eager run.
   - per-test timeout (SIGALRM; pytest-timeout is not installed): a `.get()` that never gets its
     result fails that test instead of hanging the run.
   - drain after every test: leftover tasks of a test (fire-and-forget sends, a canvas whose
     tail never ran) are purged from the label's queue and the worker's active/reserved
     requests are waited out, so they cannot write into the next test's clean database.

2. The runner for the *outer* test (`run_suite`): runs the selected tests in a subprocess pytest
   with the client environment (OMEGA_TEST_MODE=1, OMEGA_LOCAL_RUNTIME=0, the worker's
   OMEGA_MONGO_URL / broker / label), and parses per-test outcomes from `--junitxml`.
"""
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent

EAGER_KEYS = ("CELERY_ALWAYS_EAGER", "task_always_eager")

# The packaged tests that exercise a worker (relative to the omegaml package). test_jobs.py's
# others run notebooks in-process (om.jobs.run) and never reach a worker.
SELECTED = [
    "tests/core/test_runtime.py",
    "tests/core/test_nbtasks.py",
]
# Not selected: test_jobs.py. Its tests run notebooks in-process (om.jobs.run), except the five
# scheduled-job tests (test_scheduled_*, test_schedule_job), which call execute_scripts on the worker
# and then assert at once on the trigger of the job run that execute_scripts only *submits* (a
# second task): IndexError with the Python worker and with om-worker in every run (eager-only).

# Excluded, each with its reason (test id relative to omegaml/tests/core -> why). The rest of the
# selected tests fail or pass the same way in every run with the Python worker.
_NO_TASK = "client-side only: never sends a task, so it proves nothing about a worker"
_EAGER_ONLY = ("asserts on the Metadata job.map() returned before the worker ran the job ('task_id' "
               "not in attributes): holds only eagerly, fails with the Python worker every run, ~5-15 s each")
_CALLBACK = ("predict(...).get() returns when the predict is done; the linked callback script (which "
             "pip-installs its package, seconds) has not run when the test asserts on its output: fails "
             "with the Python worker every run, ~10 s each")
EXCLUDED = {
    "test_runtime.py::RuntimeTests::test_partial_fit_chunked": (
        "sends partial_fit without waiting for it, then asserts on a predict sent right after: the "
        "outcome depends on which task finishes first (a race outside eager mode), and the partial_fit "
        "over 10,000 rows holds a worker slot for > 60 s here"),
    "test_runtime.py::RuntimeTests::test_bucket_switch": _NO_TASK,
    "test_runtime.py::RuntimeTests::test_require": _NO_TASK,
    "test_runtime.py::RuntimeTests::test_require_via_metadata": _NO_TASK,
    "test_runtime.py::RuntimeTests::test_require_apply_routing_label": _NO_TASK,
    "test_runtime.py::RuntimeTests::test_require_apply_routing_update": _NO_TASK,
    "test_runtime.py::RuntimeTests::test_task_callback": _CALLBACK,
    "test_runtime.py::RuntimeTests::test_task_callback_bucket": _CALLBACK,
    "test_nbtasks.py::JobTasksTests::test_map": _EAGER_ONLY,
    "test_nbtasks.py::JobTasksTests::test_map_fail": _EAGER_ONLY,
    "test_nbtasks.py::JobTasksTests::test_map_groups": _EAGER_ONLY,
}

PER_TEST_TIMEOUT = int(os.environ.get("OMW_SUITE_TEST_TIMEOUT", "45"))


# =============================================================================================
# plugin side (inside the inner pytest)
# =============================================================================================

_guard_hits = []
_drain_failures = []


def _install_eager_guard():
    from celery.utils.collections import ChainMap, ConfigurationView

    for cls in (ConfigurationView, ChainMap):
        orig = cls.__dict__.get("__setitem__")
        if orig is None or getattr(orig, "_omw_guard", False):
            continue

        def guarded(self, key, value, _orig=orig):
            if key in EAGER_KEYS and value:
                _guard_hits.append(key)
                value = False
            return _orig(self, key, value)

        guarded._omw_guard = True
        cls.__setitem__ = guarded


_sent_ids = []


def _record_sent(sender=None, headers=None, **kw):
    if headers and headers.get("id"):
        _sent_ids.append(headers["id"])


def _delete_results():
    """redis:// backend: delete the result keys of the tasks this client sent (a canvas's later
    tasks, sent by the worker, expire with result_expires)."""
    url = os.environ.get("OMEGA_RESULT_BACKEND", "")
    if not url.startswith("redis://") or not _sent_ids:
        return
    import redis
    r = redis.Redis.from_url(url)
    for i in range(0, len(_sent_ids), 500):
        r.delete(*[f"celery-task-meta-{t}" for t in _sent_ids[i:i + 500]])


def pytest_configure(config):
    if not os.environ.get("OMW_SUITE_LABEL"):
        return  # loaded outside a suite run: do nothing
    import pytest
    _install_eager_guard()
    from celery import signals
    signals.before_task_publish.connect(_record_sent, weak=False)
    from omegaml import defaults
    problems = []
    if defaults.OMEGA_LOCAL_RUNTIME:
        problems.append(f"OMEGA_LOCAL_RUNTIME is {defaults.OMEGA_LOCAL_RUNTIME!r} (tasks would run eager)")
    if defaults.OMEGA_MONGO_URL != os.environ["OMEGA_MONGO_URL"]:
        problems.append(f"client OMEGA_MONGO_URL {defaults.OMEGA_MONGO_URL!r} is not the worker's "
                        f"{os.environ['OMEGA_MONGO_URL']!r}")
    if defaults.OMEGA_CELERY_CONFIG.get("CELERY_DEFAULT_QUEUE") != os.environ["OMW_SUITE_LABEL"]:
        problems.append(f"client queue {defaults.OMEGA_CELERY_CONFIG.get('CELERY_DEFAULT_QUEUE')!r} "
                        f"is not the worker's {os.environ['OMW_SUITE_LABEL']!r}")
    if problems:
        raise pytest.UsageError("omega|ml suite client is not remote: " + "; ".join(problems))


class SuiteTestTimeout(Exception):
    """Not an OSError: Celery's result wait swallows socket.timeout (= TimeoutError) and retries."""


def _alarm(signum, frame):
    raise SuiteTestTimeout(f"omw suite: per-test timeout of {PER_TEST_TIMEOUT}s (no result from the worker?)")


if os.environ.get("OMW_SUITE_LABEL"):
    import pytest as _pytest

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(PER_TEST_TIMEOUT)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)

    @_pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(item, nextitem):
        drain()

    def pytest_sessionfinish(session, exitstatus):
        try:
            _delete_results()
        except Exception as e:
            sys.stderr.write(f"omw suite: result cleanup failed: {e!r}\n")
        sys.stderr.write(f"\n@@OMW-SUITE eager-guard hits: {len(_guard_hits)}; "
                         f"drains not confirmed: {len(_drain_failures)}\n")


_drain_app = None


def _app():
    global _drain_app
    if _drain_app is None:
        from celery import Celery
        from omegaml import defaults
        # omega|ml's client config (its workers answer control requests in pickle)
        conf = dict(defaults.OMEGA_CELERY_CONFIG, CELERY_ALWAYS_EAGER=False)
        app = Celery("omw-suite-drain")
        app.config_from_object(conf)
        _drain_app = app
    return _drain_app


def _purge(app, label):
    from kombu import Queue
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)
            ch = conn.channel()
            try:
                Queue(label, channel=ch).purge()
            finally:
                ch.close()
    except Exception as e:  # the queue may not exist (AMQP 404): nothing to purge
        sys.stderr.write(f"omw suite drain: purge {label}: {type(e).__name__}: {e}\n")


def drain(timeout=60.0):
    """Purge the label's queue, then wait until the worker holds no active or reserved request
    (repeat: a finishing task may publish a follow-up)."""
    label = os.environ["OMW_SUITE_LABEL"]
    node = os.environ["OMW_SUITE_NODE"]
    app = _app()
    deadline = time.monotonic() + timeout
    errors = 0
    while True:
        _purge(app, label)
        insp = app.control.inspect(destination=[node], timeout=2.0)
        try:
            active = (insp.active() or {}).get(node)
            reserved = (insp.reserved() or {}).get(node)
        except Exception as e:
            active = reserved = None
            errors += 1
            sys.stderr.write(f"omw suite drain: inspect: {type(e).__name__}: {e}\n")
        if active == [] and reserved == []:
            return
        if errors >= 3 or time.monotonic() >= deadline:
            _drain_failures.append(node)
            sys.stderr.write(f"omw suite drain: worker {node} not confirmed idle after {timeout:.0f}s "
                             f"(active={active!r} reserved={reserved!r})\n")
            return
        time.sleep(0.5)


# =============================================================================================
# runner side (the outer test)
# =============================================================================================

def omegaml_dir(python):
    out = subprocess.run([str(python), "-c", "import omegaml, os; print(os.path.dirname(omegaml.__file__))"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMEGA_CONFIG_FILE="/nonexistent"))
    if out.returncode != 0:
        raise RuntimeError(f"cannot locate the omegaml package: {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def suite_env(base_env, mongo_url, broker_url, backend, label, node, tmpdir):
    """The inner pytest's environment: an omega|ml client in test mode, but remote."""
    env = {k: v for k, v in base_env.items() if not k.startswith(("OMEGA_", "CELERY_", "PYTEST_"))}
    env.update({
        "OMEGA_TEST_MODE": "1",
        "OMEGA_LOCAL_RUNTIME": "0",
        "OMEGA_MONGO_URL": mongo_url,
        "OMEGA_BROKER": broker_url,
        "OMEGA_RESULT_BACKEND": backend,
        "OMEGA_WORKER_LABEL": label,
        "CELERY_Q": label,
        "OMEGA_CONFIG_FILE": str(Path(tmpdir) / "no-such-config.yml"),
        "OMEGA_TMP": str(tmpdir),
        "OMW_SUITE_LABEL": label,
        "OMW_SUITE_NODE": node,
        "PYTHONPATH": os.pathsep.join([str(HERE)] + [p for p in [base_env.get("PYTHONPATH")] if p]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def parse_junit(path):
    """{test id: (outcome, message)}; outcome in passed/failed/error/skipped; id 'file.py::Class::name'."""
    out = {}
    root = ET.parse(path).getroot()
    for tc in root.iter("testcase"):
        cls = tc.get("classname", "")
        mod, _, klass = cls.rpartition(".")
        tid = f"{mod.rsplit('.', 1)[-1]}.py::{klass}::{tc.get('name')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                msg = (el.get("message") or "") + "\n" + (el.text or "")
                break
        if tid in out and out[tid][0] != "passed":
            continue  # keep a call failure over a later teardown entry
        if tid in out and outcome == "passed":
            continue
        out[tid] = (outcome, msg.strip())
    return out


def run_suite(python, env, tmpdir, selected=None, overall_timeout=900):
    """Run the selected packaged tests in a subprocess pytest; returns (outcomes, output, wall_s)."""
    tmpdir = Path(tmpdir)
    pkg = omegaml_dir(python)
    targets = [str(pkg / s) for s in (selected or SELECTED)]
    junit = tmpdir / "junit.xml"
    argv = [str(python), "-m", "pytest", *targets, "-p", "omegaml_suite", "-p", "no:cacheprovider",
            "-c", os.devnull, "--rootdir", str(pkg), "-q", "-rA", "--junitxml", str(junit),
            "-o", "junit_family=xunit1", "-o", f"faulthandler_timeout={PER_TEST_TIMEOUT + 15}",
            "-W", "ignore::DeprecationWarning"]
    for tid in EXCLUDED:
        argv += ["--deselect", f"tests/core/{tid}"]
    logpath = tmpdir / "inner-pytest.log"
    started = time.monotonic()
    with open(logpath, "wb") as logf:
        proc = subprocess.Popen(argv, env=env, cwd=str(tmpdir), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=overall_timeout)
            killed = ""
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed = f"\ninner pytest killed after {overall_timeout}s\n"
    wall = time.monotonic() - started
    output = logpath.read_text(errors="replace") + killed
    if not junit.exists():
        raise RuntimeError(f"inner pytest wrote no junit report:\n{output[-8000:]}")
    return parse_junit(junit), output, wall


def passed(outcomes):
    return {t for t, (o, _m) in outcomes.items() if o == "passed"}


def table(py, rs):
    ids = sorted(set(py) | set(rs))
    w = max(len(i) for i in ids) if ids else 10
    lines = [f"{'test':<{w}}  python     om-worker"]
    for i in ids:
        lines.append(f"{i:<{w}}  {py.get(i, ('-',))[0]:<9}  {rs.get(i, ('-',))[0]}")
    return "\n".join(lines)
