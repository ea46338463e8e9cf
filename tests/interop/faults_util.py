"""Helpers for test_faults.py: broker/database outages, process inspection, client scripts.

Everything here acts only on what the tests start (their own om-worker, SecantusDB, kernels, a TCP
relay in front of Redis), except RabbitMQ's application, which the RabbitMQ test stops and starts
(`rabbitmqctl stop_app/start_app`: the node process keeps running) and always restores.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def fail(msg):
    pytest.fail(msg, pytrace=False)


# ---------------------------------------------------------------------------------------------
# client scripts: the unchanged omega|ml client in a fresh process
# ---------------------------------------------------------------------------------------------

CLIENT_PRELUDE = """
import json, sys, time, os
def out(v):
    print("@@OMW-FAULT@@ " + json.dumps(v, default=repr)); sys.stdout.flush()
"""


def run_client(python, script, env, timeout=120, what="client"):
    """Runs `script` (dedented, after CLIENT_PRELUDE) with the omega|ml client; returns the value it
    passed to out() last. Fails with its output if it exits non-zero or runs past `timeout`."""
    code = CLIENT_PRELUDE + textwrap.dedent(script)
    try:
        proc = subprocess.run([str(python), "-c", code], env=env, cwd=str(ROOT), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        fail(f"{what} ran past {timeout}s\n--- stdout ---\n{(e.stdout or '')[-3000:]}\n"
             f"--- stderr ---\n{(e.stderr or '')[-3000:]}")
    vals = [json.loads(l[len("@@OMW-FAULT@@ "):]) for l in proc.stdout.splitlines()
            if l.startswith("@@OMW-FAULT@@ ")]
    if proc.returncode != 0 or not vals:
        fail(f"{what} failed (rc {proc.returncode})\n--- stdout ---\n{proc.stdout[-3000:]}\n"
             f"--- stderr ---\n{proc.stderr[-4000:]}")
    return vals[-1]


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------

def proc_state(pid):
    """'R', 'S', 'Z', ... or None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def gone(pid):
    return proc_state(pid) in (None, "Z", "X")


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return 0


def procs_with_env(key, value):
    """PIDs (other than zombies) whose initial environment has key=value: the kernels and fork server
    of one om-worker are found by the OMEGA_TMP directory it was started with (unique per worker)."""
    needle = f"{key}={value}".encode()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if needle in env and not gone(int(d)):
            found.append(int(d))
    return found


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return "<gone>"


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


class RssSampler:
    """Samples VmRSS of one PID every `interval` seconds in a thread; .peak_kb, .samples."""

    def __init__(self, pid, interval=0.05):
        self.pid = pid
        self.interval = interval
        self.samples = []
        self.times = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.monotonic()
        self.wall0 = time.time()
        while not self._stop.is_set():
            v = rss_kb(self.pid)
            if v is not None:
                self.samples.append(v)
                self.times.append(time.monotonic() - t0)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=5)

    @property
    def peak_at(self):
        """seconds after the start of sampling when the peak was seen"""
        return self.times[self.samples.index(self.peak_kb)] if self.samples else None

    @property
    def peak_utc(self):
        import datetime
        if not self.samples:
            return None
        t = self.wall0 + self.peak_at
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]

    def profile(self, step=1.0):
        """(t, max RSS MB) per `step` seconds, for reports"""
        out = {}
        for t, v in zip(self.times, self.samples):
            k = round(int(t / step) * step, 1)
            out[k] = max(out.get(k, 0), round(v / 1024))
        return sorted(out.items())

    @property
    def peak_kb(self):
        return max(self.samples) if self.samples else None


# ---------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------

def rabbitmqctl_raw(*args, timeout=60):
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout)


def rabbit_answers(amqp_url):
    """True when a client can open an AMQP connection (and a channel)."""
    from kombu import Connection
    try:
        with Connection(amqp_url, connect_timeout=2) as c:
            c.ensure_connection(max_retries=1, timeout=2)
            c.channel().close()
        return True
    except Exception:
        return False


def rabbit_restore(amqp_url, timeout=90):
    """start_app (idempotent) and wait until RabbitMQ accepts connections again."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        p = rabbitmqctl_raw("start_app", timeout=max(5, deadline - time.monotonic()))
        last = (p.returncode, p.stderr.strip()[-500:])
        if p.returncode == 0:
            break
        time.sleep(1)
    while time.monotonic() < deadline:
        if rabbit_answers(amqp_url):
            return
        time.sleep(0.3)
    fail(f"RabbitMQ did not come back within {timeout}s after start_app (last start_app: {last})")


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------

def redis_conn(url, timeout=2):
    import redis as _redis
    return _redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)


def redis_answers(url):
    try:
        return bool(redis_conn(url).ping())
    except Exception:
        return False


class TcpOutage:
    """A TCP relay owned by the test, in front of a shared server (here: the machine's Redis).

    om-worker connects through it; `cut()` closes every relayed connection and stops listening (new
    connections are refused), `restore()` listens on the same port again. To om-worker this is the
    server going away and coming back, with the data kept, as in a network partition or a failover.
    Why not restart the real server: it is shared (CI uses it as the session leaves it), and a server
    restarted from inside a test would belong to that test's process tree."""

    def __init__(self, upstream_host, upstream_port):
        self.upstream = (upstream_host, upstream_port)
        self.port = None  # picked by the first start(), kept by every restore()
        self._lock = threading.Lock()
        self._conns = set()
        self._listener = None
        self._accepting = None
        self._cut_after = None  # bytes: cut right after relaying a server reply containing them
        self._frozen = False

    def cut_after_reply_containing(self, marker):
        """Relay until a reply from the server contains `marker`, pass that reply on, then cut:
        from that moment nothing more reaches either side (what the client sends next is lost, as
        in a partition that begins right after the reply)."""
        self._cut_after = marker

    def url(self, scheme="redis", path="/0"):
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def restore(self):
        with self._lock:
            if self._listener is not None:
                return self
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", self.port or 0))
            self.port = ls.getsockname()[1]
            ls.listen(64)
            self._listener = ls
            self._accepting = threading.Thread(target=self._accept, args=(ls,), daemon=True)
            self._accepting.start()
        return self

    start = restore

    def _cut_frozen(self):
        self.cut()
        self._frozen = False  # a restore() relays again

    def cut(self):
        with self._lock:
            ls, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        if self._accepting is not None:
            self._accepting.join(timeout=5)

    close = cut

    def _accept(self, ls):
        while True:
            try:
                down, _ = ls.accept()
            except OSError:
                return  # cut()
            try:
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self._lock:
                if self._listener is not ls:  # cut() raced with this accept
                    down.close()
                    up.close()
                    return
                self._conns.update((down, up))
            for src, dst, from_server in ((down, up, False), (up, down, True)):
                threading.Thread(target=self._pump, args=(src, dst, from_server), daemon=True).start()

    def _pump(self, src, dst, from_server=False):
        try:
            while True:
                data = src.recv(65536)
                if not data or self._frozen:
                    break
                marker = self._cut_after
                if from_server and marker is not None and marker in data:
                    self._frozen = True  # every pump drops what it reads from now on
                    self._cut_after = None
                    dst.sendall(data)
                    threading.Thread(target=self._cut_frozen, daemon=True).start()
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._conns.discard(src)
            self._conns.discard(dst)


# ---------------------------------------------------------------------------------------------
# SecantusDB (our own instance)
# ---------------------------------------------------------------------------------------------

class Secantus:
    def __init__(self, venv, port, data_dir, run_dir):
        self.port = port
        self.data_dir = Path(data_dir)
        self.env = dict(os.environ, OM_RUN_DIR=str(run_dir), OM_VENV=str(venv))
        self.script = ROOT / "scripts" / "secantus.sh"
        self.url = f"mongodb://127.0.0.1:{port}/omw_faults"

    def _call(self, *args, timeout=120):
        return subprocess.run([str(self.script), *args, "--port", str(self.port)], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self):
        p = self._call("start", "--dir", str(self.data_dir))
        if p.returncode != 0:
            fail(f"SecantusDB start --port {self.port} failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")

    def stop(self):
        p = self._call("stop", timeout=60)
        if p.returncode != 0:
            fail(f"SecantusDB stop --port {self.port} failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")

    def answers(self):
        return self._call("status", timeout=30).returncode == 0


class FirstSuccess:
    """Polls probe() in a thread from start() until it returns True; .at = time.monotonic() then."""

    def __init__(self, probe, interval=0.1):
        self.probe = probe
        self.interval = interval
        self.at = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            if self.probe():
                self.at = time.monotonic()
                return
            self._stop.wait(self.interval)

    def start(self):
        self._t.start()
        return self

    def wait(self, timeout):
        self._t.join(timeout)
        return self.at

    def stop(self):
        self._stop.set()
        self._t.join(timeout=10)


def tcp_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_worker_checked(w, wtmp, cleanup, what):
    """Stops a test's om-worker (SIGTERM) and fails if it did not exit 0, if any process started
    with its OMEGA_TMP (its fork server, kernels, task children) is still there 10 s later, or if
    it panicked; `cleanup()` (queue removal) runs in between and may fail quietly."""
    rc = w.terminate()
    deadline = time.monotonic() + 10
    left = procs_with_env("OMEGA_TMP", str(wtmp))
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = procs_with_env("OMEGA_TMP", str(wtmp))
    try:
        cleanup()
    except BaseException:
        pass
    problems = []
    if rc != 0:
        problems.append(f"om-worker exited {rc} on SIGTERM")
    if left:
        problems.append("processes of the stopped worker left behind (orphans): "
                        + "; ".join(f"{p}: {cmdline(p)}" for p in left))
    if "panicked" in w.log():
        problems.append("om-worker panicked")
    if problems:
        fail(f"{what} teardown: " + " | ".join(problems) + f"\n--- worker log ---\n{w.log_tail()}")


@contextlib.contextmanager
def notebook_worker(om_worker_bin, mongo, base, prefix, what):
    """A ready om-worker for notebook tests (RabbitMQ, rpc://, `-c 2`, its own OMEGA_TMP under
    `base`), stopped and checked for leftovers (`stop_worker_checked`) on exit. Yields
    (worker, its OMEGA_TMP, a marks directory, its queue label)."""
    from conftest import AMQP_URL, VENV_PY, Broker, WorkerProc, short_id, worker_env

    wtmp, marks = base / "worker-tmp", base / "marks"
    wtmp.mkdir()
    marks.mkdir()
    label = f"{prefix}-{short_id()}"
    node = f"{prefix}-{short_id()}@%h"
    argv = [str(om_worker_bin), "worker", "-Q", label, "-c", "2", "-n", node, "-l", "info",
            "--python", str(VENV_PY)]
    w = WorkerProc(argv, worker_env(wtmp, AMQP_URL, "rpc://", mongo), base / "om-worker.log", node)
    try:
        w.wait_ready()
        yield w, wtmp, marks, label
    finally:
        stop_worker_checked(w, wtmp, lambda: Broker("amqp").cleanup([label], []), what)
