"""Interop harness: the unchanged omega|ml 0.18.0 / Celery 5.7 client against the om-worker binary.

Everything is real: RabbitMQ 127.0.0.1:5672 (guest/guest), Redis 127.0.0.1:6379 db 0, SecantusDB started
per session by scripts/secantus.sh on a free 127.0.0.1 port. A missing component fails every test with
a message saying what is missing; nothing is skipped.

Client configuration: `omega_celery_app()` builds the client app the way omega|ml 0.18.0's
`OmegaRuntime._create_celery_app` does: `Celery('omegaml')` configured from a copy of
`omegaml.defaults.OMEGA_CELERY_CONFIG` (pickle task/result serializer, accept pickle+json,
track_started, result_expires 3600, BROKER_HEARTBEAT 0, ...) with CELERY_ALWAYS_EAGER=False and only
BROKER_URL and CELERY_RESULT_BACKEND overridden. omega|ml's autodiscover_tasks() is not called: the
tests use `send_task` by name, which does not need the task registry. test_ping.py also drives the
real `Omega(...).runtime` (omega|ml's own client API) for `om.runtime.require(Q).ping()`.

Environment knobs (all optional):
  OM_WORKER_BIN    path of the binary (default <repo>/target/debug/om-worker)
  OMW_NO_BUILD=1   do not run `cargo build`; require the binary as it is
  OMW_AMQP_URL     RabbitMQ URL (default amqp://guest:guest@127.0.0.1:5672//; rabbitmqctl must manage it)
  OMW_REDIS_URL    Redis URL for broker and result backend (default redis://127.0.0.1:6379/0)
  OMW_WORKER_IMPL  'rust' (default) or 'python': run the reference Python Celery worker
                   (`celery --app omegaml.celeryapp worker`) instead, to check the harness itself.
                   Tests of om-worker-only behaviour (CLI, malformed-message FAILURE results, ready
                   line, Redis visibility flags) are expected to fail or are marked in that mode.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest

import brokers
import procs

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("OM_VENV", ROOT / ".venv"))
VENV_PY = VENV / "bin" / "python"
BIN = Path(os.environ.get("OM_WORKER_BIN", ROOT / "target" / "debug" / "om-worker"))
AMQP_URL = os.environ.get("OMW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("OMW_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_BACKEND_URL = REDIS_URL
HOSTNAME = socket.gethostname()
IMPL = os.environ.get("OMW_WORKER_IMPL", "rust")
READY_TIMEOUT = 30.0
STOP_GRACE = 20.0
PING_TASK = "omegaml.tasks.omega_ping"

# Keep stray config.yml / Celery env overrides out of the client (set before omegaml is imported).
_NO_CONFIG = str(ROOT / ".run" / "omw-interop-no-such-config.yml")
os.environ["OMEGA_CONFIG_FILE"] = _NO_CONFIG
for _k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
    os.environ.pop(_k, None)


def _fail(msg):
    pytest.fail(msg, pytrace=False)


def wait_until(pred, timeout, desc, interval=0.1):
    """Poll pred() until truthy; fail with desc (and the last value) after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            _fail(f"timed out after {timeout:.0f}s waiting for: {desc} (last value: {last!r})")
        time.sleep(interval)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def short_id():
    return uuid.uuid4().hex[:8]


# ---------------------------------------------------------------------------------------------
# environment checks (session): loud failures, never skips
# ---------------------------------------------------------------------------------------------

def _check_environment():
    problems = []
    if not VENV_PY.exists():
        problems.append(f"venv missing: {VENV_PY} (run scripts/setup-venv.sh)")
    elif Path(sys.prefix).resolve() != VENV.resolve():
        problems.append(f"pytest runs under {sys.executable} (prefix {sys.prefix}), not the pinned venv "
                        f"{VENV}; run: {VENV_PY} -m pytest tests/interop")
    from importlib.metadata import PackageNotFoundError, version
    for pkg, want in {"omegaml": "0.18.0", "celery": "5.7.0", "kombu": "5.7.0", "redis": "8.1.0",
                      "pymongo": "4.20.0", "secantusdb": "0.7.0b3"}.items():
        try:
            got = version(pkg)
        except PackageNotFoundError:
            problems.append(f"python package {pkg} missing from the venv (scripts/setup-venv.sh)")
            continue
        if got != want:
            problems.append(f"{pkg} {got} installed, {want} pinned (scripts/requirements.txt)")
    if shutil.which("rabbitmqctl") is None:
        problems.append("rabbitmqctl not on PATH (needed to inspect RabbitMQ queues)")
    try:
        from kombu import Connection
        with Connection(AMQP_URL, connect_timeout=5) as c:
            c.ensure_connection(max_retries=1, timeout=5)
    except Exception as e:
        problems.append(f"RabbitMQ unreachable at {AMQP_URL}: {type(e).__name__}: {e}")
    try:
        import redis as _redis
        _redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as e:
        problems.append(f"Redis unreachable at {REDIS_URL}: {type(e).__name__}: {e}")
    return problems


@pytest.fixture(scope="session", autouse=True)
def environment_ok():
    problems = _check_environment()
    if problems:
        _fail("interop environment not usable:\n  - " + "\n  - ".join(problems))
    return True


def _newest_source_mtime():
    newest = 0.0
    for p in [ROOT / "Cargo.toml", ROOT / "Cargo.lock", ROOT / "build.rs"]:
        if p.exists():
            newest = max(newest, p.stat().st_mtime)
    for p in (ROOT / "src").rglob("*"):
        if p.is_file():
            newest = max(newest, p.stat().st_mtime)
    return newest


@pytest.fixture(scope="session")
def om_worker_bin(environment_ok):
    """The om-worker binary; `cargo build` once per session if missing or older than src/."""
    if IMPL == "python":
        return None
    if not os.environ.get("OMW_NO_BUILD") and (not BIN.exists() or BIN.stat().st_mtime < _newest_source_mtime()):
        cargo = shutil.which("cargo")
        if cargo is None:
            _fail(f"{BIN} is missing or stale and cargo is not on PATH")
        proc = subprocess.run([cargo, "build", "--bin", "om-worker"], cwd=ROOT, capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            _fail(f"`cargo build --bin om-worker` failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    if not BIN.exists():
        _fail(f"om-worker binary missing: {BIN} (build with `cargo build`, or set OM_WORKER_BIN)")
    proc = subprocess.run([str(BIN), "worker", "--help"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or "--broker" not in proc.stdout + proc.stderr:
        _fail(f"`{BIN} worker --help` did not describe the worker CLI (rc {proc.returncode}); "
              f"is the worker core built?\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    return BIN


@contextlib.contextmanager
def secantus_instance(base):
    """A throwaway SecantusDB on a free 127.0.0.1 port via scripts/secantus.sh, data under `base`;
    yields the omega URL and stops it (by port) afterwards."""
    port = free_port()
    env = dict(os.environ, OM_RUN_DIR=str(base / "run"), OM_VENV=str(VENV))
    script = ROOT / "scripts" / "secantus.sh"
    proc = subprocess.run([str(script), "start", "--port", str(port), "--dir", str(base / "data")],
                          env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        _fail(f"SecantusDB did not start ({script} start --port {port}, rc {proc.returncode}):\n"
              f"{proc.stdout}\n{proc.stderr}")
    try:
        yield f"mongodb://127.0.0.1:{port}/omw_interop"
    finally:
        subprocess.run([str(script), "stop", "--port", str(port)], env=env, capture_output=True, text=True,
                       timeout=60)


@pytest.fixture(scope="session")
def mongo(environment_ok, tmp_path_factory):
    """The session's SecantusDB; yields the omega URL."""
    with secantus_instance(tmp_path_factory.mktemp("secantus")) as url:
        os.environ["OMEGA_MONGO_URL"] = url  # for omegaml clients created in this process
        yield url


# ---------------------------------------------------------------------------------------------
# brokers and backends
# ---------------------------------------------------------------------------------------------

def rabbitmqctl(*args):
    proc = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        _fail(f"rabbitmqctl {' '.join(args)} failed (rc {proc.returncode}): {proc.stderr}")
    return proc.stdout


def redis_client():
    import redis as _redis
    return _redis.Redis.from_url(REDIS_URL)


class Broker:
    def __init__(self, kind):
        self.kind = kind
        self.url = AMQP_URL if kind == "amqp" else REDIS_URL

    def __repr__(self):
        return f"Broker({self.kind})"

    # -- inspection ------------------------------------------------------------------------
    def queue_state(self, queue):
        """{'exists', 'ready', 'unacked'} for a task queue."""
        if self.kind == "amqp":
            rows = json.loads(rabbitmqctl("list_queues", "name", "messages_ready",
                                          "messages_unacknowledged", "--formatter", "json") or "[]")
            for r in rows:
                if r["name"] == queue:
                    return {"exists": True, "ready": r["messages_ready"],
                            "unacked": r["messages_unacknowledged"]}
            return {"exists": False, "ready": 0, "unacked": 0}
        r = redis_client()
        ready = sum(r.llen(k) for k in self._redis_queue_keys(queue))
        return {"exists": ready > 0, "ready": ready, "unacked": len(self.redis_unacked(queue))}

    @staticmethod
    def _redis_queue_keys(queue):
        return brokers.redis_queue_keys(queue)

    @staticmethod
    def redis_unacked(queue):
        """delivery tags in kombu's `unacked` hash whose routing key is `queue`."""
        return brokers.redis_unacked(redis_client(), queue)

    def amqp_queue_row(self, queue):
        """The tab-separated `rabbitmqctl list_queues name durable auto_delete arguments` row, or None."""
        out = rabbitmqctl("list_queues", "name", "durable", "auto_delete", "arguments")
        for line in out.splitlines():
            if line.split("\t")[0] == queue:
                return line
        return None

    def amqp_exchange_row(self, name):
        out = rabbitmqctl("list_exchanges", "name", "type", "durable", "auto_delete", "arguments")
        for line in out.splitlines():
            if line.split("\t")[0] == name:
                return line
        return None

    def amqp_bindings(self, queue):
        rows = json.loads(rabbitmqctl("list_bindings", "source_name", "destination_name", "destination_kind",
                                      "routing_key", "--formatter", "json") or "[]")
        return [(r["source_name"], r["routing_key"]) for r in rows
                if r["destination_name"] == queue and r["destination_kind"] == "queue"]

    # -- cleanup ---------------------------------------------------------------------------
    def cleanup(self, names, task_ids):
        brokers.delete_queues(self.kind, self.url, names, drop_unacked=True)
        r = redis_client()
        if task_ids:
            r.delete(*[f"celery-task-meta-{t}" for t in task_ids])


@pytest.fixture(params=["amqp", "redis"])
def broker(request, environment_ok):
    return Broker(request.param)


@pytest.fixture(params=["rpc", "redis"], ids=["be-rpc", "be-redis"])
def backend(request):
    return "rpc://" if request.param == "rpc" else REDIS_BACKEND_URL


class Names:
    """Unique queue names per test plus everything to clean up afterwards."""

    def __init__(self):
        self.names = []
        self.task_ids = []
        self.nodes = []  # worker nodenames: their pidbox queues/bindings are cleaned on Redis

    def queue(self, prefix="omw"):
        n = f"{prefix}-{short_id()}"
        self.names.append(n)
        return n

    def track(self, *names):
        self.names.extend(names)

    def task_id(self):
        t = str(uuid.uuid4())
        self.task_ids.append(t)
        return t


@pytest.fixture
def names(environment_ok):
    ns = Names()
    yield ns
    for kind in ("amqp", "redis"):
        try:
            Broker(kind).cleanup(ns.names + [f"{n}.celery.pidbox" for n in ns.nodes], ns.task_ids)
        except BaseException as e:  # cleanup must not mask the test result
            warnings.warn(f"cleanup on {kind} failed: {e!r}")


@pytest.fixture
def q(names):
    """A fresh queue name `omw-<uuid8>` for this test."""
    return names.queue()


# ---------------------------------------------------------------------------------------------
# omega|ml client
# ---------------------------------------------------------------------------------------------

def omega_celery_conf(broker_url, backend_url):
    """omega|ml 0.18.0 client config: defaults.OMEGA_CELERY_CONFIG copied, broker/backend overridden."""
    from omegaml import defaults
    conf = dict(defaults.OMEGA_CELERY_CONFIG)
    conf["CELERY_ALWAYS_EAGER"] = False  # as OmegaRuntime._create_celery_app (OMEGA_LOCAL_RUNTIME unset)
    conf["BROKER_URL"] = broker_url
    conf["CELERY_RESULT_BACKEND"] = backend_url
    return conf


def omega_celery_app(broker_url, backend_url):
    from celery import Celery
    app = Celery("omegaml")
    app.config_from_object(omega_celery_conf(broker_url, backend_url))
    return app


@pytest.fixture
def om_factory(mongo, names):
    """omega|ml clients (Omega(...)) for a broker; their apps are closed at teardown."""
    made = []

    def make(broker_url):
        from omegaml import Omega
        om = Omega(mongo_url=mongo, celeryconf=omega_celery_conf(broker_url, "rpc://"))
        made.append(om)
        names.track(om.runtime.celeryapp.thread_oid)
        return om

    yield make
    for om in made:
        try:
            om.runtime.celeryapp.close()
        except Exception:
            pass


class Client:
    def __init__(self, app, names):
        self.app = app
        self._names = names

    @property
    def is_rpc(self):
        return self.app.conf.result_backend.startswith("rpc")

    def send(self, name, queue, args=(), kwargs=None, **opts):
        tid = self._names.task_id()
        return self.app.send_task(name, args=list(args), kwargs=kwargs or {}, queue=queue, task_id=tid, **opts)

    def ping(self, queue, args=(1, 2), kwargs=None, **opts):
        return self.send(PING_TASK, queue, args=args, kwargs={"a": 1} if kwargs is None else kwargs, **opts)

    def result(self, task_id):
        from celery.result import AsyncResult
        return AsyncResult(task_id, app=self.app)

    def publish_raw(self, queue, body, content_type, content_encoding="binary", task=PING_TASK,
                    headers=None, with_reply_to=True):
        """Publish a hand-made v2 message with kombu's Producer (what Celery's send_task does, minus
        serialization): same queue declaration, routing (default exchange, key = queue), properties and
        header set. For rpc the reply queue is declared first, exactly as send_task does
        (backend.on_task_call). Returns (task_id, AsyncResult)."""
        tid = self._names.task_id()
        hdrs = {"lang": "py", "task": task, "id": tid, "shadow": None, "eta": None, "expires": None,
                "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": tid,
                "parent_id": None, "argsrepr": "(1, 2)", "kwargsrepr": "{}",
                "origin": f"gen{os.getpid()}@{HOSTNAME}", "ignore_result": None, "replaced_task_nesting": 0,
                "stamped_headers": None, "stamps": {}}
        hdrs.update(headers or {})
        task_queue = self.app.amqp.queues[queue]  # the auto-created Queue(q, Exchange(q, direct), q)
        props = {"correlation_id": tid}
        if with_reply_to:
            props["reply_to"] = self.app.thread_oid
        res = self.result(tid)
        with self.app.producer_or_acquire() as producer:
            self.app.backend.on_task_call(producer, tid)
            producer.publish(body, exchange="", routing_key=queue, declare=[task_queue],
                             content_type=content_type, content_encoding=content_encoding,
                             headers=hdrs, delivery_mode=2, retry=True, **props)
        return tid, res


@pytest.fixture
def client_factory(names, mongo):
    apps = []

    def make(broker_url, backend_url="rpc://"):
        app = omega_celery_app(broker_url, backend_url)
        apps.append(app)
        if backend_url.startswith("rpc"):
            names.track(app.thread_oid)  # reply queue: delete at teardown
        return Client(app, names)

    yield make
    for app in apps:
        try:
            app.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# om-worker processes
# ---------------------------------------------------------------------------------------------

READY_RE = re.compile(r"om-worker (\S+) ready: consuming (.*)$", re.M)
PY_READY_RE = re.compile(r"(\S+@\S+) ready\.", re.M)
_SCRUB_ENV = ("OMEGA_", "CELERY_", "RABBITMQ_URL", "MONGO_URL", "C_FORCE_ROOT", "OM_WORKER_")


class WorkerProc:
    def __init__(self, argv, env, logpath, expected_nodename):
        self.argv = argv
        self.env = env
        self.logpath = logpath
        self.expected_nodename = expected_nodename
        self.nodename = None
        self.consuming = None
        self._logf = open(logpath, "ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL,
                                     stdout=self._logf, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.returncode = None

    def __repr__(self):
        return f"<om-worker pid={self.pid} {self.nodename or self.expected_nodename}>"

    def log(self):
        try:
            return self.logpath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, limit=20000):
        text = self.log()
        return text if len(text) <= limit else "...[truncated]...\n" + text[-limit:]

    def alive(self):
        return self.proc.poll() is None

    def wait_ready(self, timeout=READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        rx = PY_READY_RE if IMPL == "python" else READY_RE
        while True:
            m = rx.search(self.log())
            if m:
                self.nodename = m.group(1)
                self.consuming = m.group(2).strip() if IMPL != "python" else None
                return self
            rc = self.proc.poll()
            if rc is not None:
                _fail(f"om-worker exited with rc {rc} before logging 'ready'\ncommand: {' '.join(self.argv)}\n"
                      f"--- log ---\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                _fail(f"om-worker (pid {self.pid}) logged no 'ready' line within {timeout:.0f}s\n"
                      f"command: {' '.join(self.argv)}\n--- log ---\n{self.log_tail()}")
            time.sleep(0.1)

    def terminate(self, grace=STOP_GRACE):
        """SIGTERM (warm shutdown), SIGKILL after `grace` seconds; only this PID. Returns the exit code."""
        procs.stop_process(self.proc, grace, on_kill=lambda: warnings.warn(
            f"om-worker pid {self.pid} ignored SIGTERM for {grace}s; sending SIGKILL"))
        self.returncode = self.proc.wait()
        self._logf.close()
        return self.returncode

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.returncode = self.proc.wait(timeout=30)
        return self.returncode


def wait_ready(w, timeout=90):
    """Waits for a WorkerProc's ready line (om-worker's, or the Python worker's when `w.impl` is
    'python'), sets `w.nodename` from it and returns `w`."""
    rx = PY_READY_RE if w.impl == "python" else READY_RE
    deadline = time.monotonic() + timeout
    while not rx.search(w.log()):
        if not w.alive():
            raise AssertionError(f"{w.impl} worker exited rc {w.proc.returncode} before ready\n{w.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{w.impl} worker not ready after {timeout}s\n{w.log_tail()}")
        time.sleep(0.2)
    w.nodename = rx.search(w.log()).group(1)
    return w


def worker_env(tmpdir, broker_url=None, backend_url=None, mongo_url=None, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_ENV)}
    env.update({"OMEGA_TMP": str(tmpdir), "OMEGA_CONFIG_FILE": _NO_CONFIG, "RUST_BACKTRACE": "1"})
    if broker_url:
        env["OMEGA_BROKER"] = broker_url
    if backend_url:
        env["OMEGA_RESULT_BACKEND"] = backend_url
    if mongo_url:
        env["OMEGA_MONGO_URL"] = mongo_url
    env.update(extra or {})
    return env


def start_python_worker(broker_url, queues, mongo_url, tmp_path, started, backend="rpc://", env_extra=None,
                        concurrency=1, extra=(), prefix="omw-py"):
    """omega|ml's own worker, `celery --app omegaml.celeryapp worker`, as the `worker` fixture starts it
    for OMW_WORKER_IMPL=python, whatever OMW_WORKER_IMPL is: for tests that run it beside om-worker.
    Appends it to `started` (the caller stops it) and returns it once it is ready."""
    queues = [queues] if isinstance(queues, str) else list(queues)
    name = f"{prefix}-{short_id()}@%h"
    wtmp = tmp_path / f"py-worker-{short_id()}"
    wtmp.mkdir()
    argv = [str(VENV / "bin" / "celery"), "--app", "omegaml.celeryapp", "worker", "-Q", ",".join(queues),
            "-c", str(concurrency), "-n", name, "-l", "info", "--without-gossip", "--without-mingle",
            "--without-heartbeat", *extra]
    env = worker_env(wtmp, broker_url, backend, mongo_url, dict(env_extra or {}, C_FORCE_ROOT="1"))
    w = WorkerProc(argv, env, wtmp / "python-worker.log", name.replace("%h", HOSTNAME))
    started.append(w)
    deadline = time.monotonic() + 60
    while not PY_READY_RE.search(w.log()):
        if not w.alive() or time.monotonic() > deadline:
            _fail(f"python celery worker not ready (alive={w.alive()}):\n{w.log_tail()}")
        time.sleep(0.2)
    w.nodename = PY_READY_RE.search(w.log()).group(1)
    return w


@pytest.fixture
def worker(request, names, mongo, om_worker_bin, tmp_path):
    """Factory: start(broker_url, queues=[...], backend='rpc://', name=None, concurrency=1, extra=[],
    via='env'|'flags', wait=True) -> WorkerProc (ready). Stops every worker it started at teardown
    (SIGTERM, SIGKILL after a grace); their logs are attached to the report of a failed test."""
    started = []
    request.node._omw_workers = started

    def start(broker_url, queues, backend="rpc://", name=None, concurrency=1, extra=(), via="env",
              wait=True, env_extra=None):
        queues = [queues] if isinstance(queues, str) else list(queues)
        name = name or f"omw-{short_id()}@%h"
        expected = name.replace("%h", HOSTNAME)
        wtmp = tmp_path / f"worker-{len(started)}"
        wtmp.mkdir()
        if IMPL == "python":
            unsupported = [a for a in extra if a in ("--visibility-timeout", "--restore-interval",
                                                     "--unknown-tasks", "--python")]
            if unsupported:
                pytest.skip(f"OMW_WORKER_IMPL=python self-check: celery worker has no {unsupported}")
            argv = [str(VENV / "bin" / "celery"), "--app", "omegaml.celeryapp", "worker", "-Q", ",".join(queues),
                    "-c", str(concurrency), "-n", name, "-l", "info", "--without-gossip", "--without-mingle",
                    "--without-heartbeat", *extra]
            env = worker_env(wtmp, broker_url, backend, mongo, dict(env_extra or {}, C_FORCE_ROOT="1"))
        else:
            argv = [str(om_worker_bin), "worker", "-Q", ",".join(queues), "-c", str(concurrency), "-n", name,
                    "-l", "info", "--python", str(VENV_PY)]
            if via == "flags":
                argv += ["--broker", broker_url, "--result-backend", backend, "--mongo-url", mongo]
                env = worker_env(wtmp, extra=env_extra)
            else:
                env = worker_env(wtmp, broker_url, backend, mongo, env_extra)
            argv += list(extra)
            if not getattr(request.module, "WORKER_KERNELS", True) and "--kernel-pool" not in argv:
                # A module that runs no notebook says so (WORKER_KERNELS = False): the fork server
                # (seconds of CPU importing omegaml) starts only if a task needs it. A notebook or
                # Python task would still run, waiting for it.
                argv += ["--kernel-pool", "0", "--lazy-fork-server"]
        w = WorkerProc(argv, env, tmp_path / f"om-worker-{len(started)}.log", expected)
        started.append(w)
        names.nodes.append(expected)
        if wait:
            w.wait_ready()
        return w

    yield start
    problems = []
    for w in reversed(started):
        killed_by_test = w.returncode is not None or not w.alive()
        try:
            rc = w.terminate()
        except Exception as e:
            problems.append(f"stopping {w!r} failed: {e!r}")
            continue
        if not killed_by_test and rc != 0 and IMPL != "python":
            problems.append(f"{w!r} exited with status {rc} on SIGTERM at teardown (warm shutdown must exit 0)")
        if "panicked" in w.log():
            problems.append(f"{w!r} logged a panic (see its log)")
    if problems:
        _fail("worker teardown: " + "; ".join(problems))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for i, w in enumerate(getattr(item, "_omw_workers", [])):
            state = "running" if w.alive() else f"exited rc={w.proc.returncode}"
            rep.sections.append((f"om-worker #{i} {w.nodename or w.expected_nodename} pid {w.pid} ({state}) "
                                 f"log {w.logpath}", w.log_tail()))


def assert_ping_result(value, nodename, args=(1, 2), kwargs=None):
    """omega_ping's return value as omega|ml's Python worker produces it."""
    kwargs = {"a": 1} if kwargs is None else kwargs
    assert isinstance(value, dict), f"omega_ping returned {type(value).__name__}: {value!r}"
    assert value.get("message") == "ping return message", value
    assert value.get("worker") == nodename, f"worker {value.get('worker')!r} != nodename {nodename!r}: {value!r}"
    assert list(value.get("args") or []) == list(args), value
    assert value.get("kwargs") == kwargs, value
    import datetime
    datetime.datetime.fromisoformat(value["time"])  # an ISO timestamp


@pytest.fixture
def check_ping():
    return assert_ping_result


@pytest.fixture
def redis_relay():
    """A test-owned TCP relay in front of the machine's Redis (faults_util.TcpOutage): a worker
    pointed at it can be cut off from Redis without stopping Redis itself."""
    import faults_util
    from urllib.parse import urlsplit

    u = urlsplit(REDIS_URL)
    relay = faults_util.TcpOutage(u.hostname, u.port or 6379).start()
    try:
        yield relay
    finally:
        relay.close()
