"""Shared helpers for bench/run.py, bench/client.py and bench/soak.py.

Process handling (/proc sampling, starting/stopping workers and SecantusDB) and broker cleanup.
Only the standard library is needed here, except the broker cleanup (kombu, redis from the venv).
Broker cleanup and process stopping come from tests/interop/brokers.py and procs.py.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# plain-Python helpers shared with the interop tests (no pytest, not conftest)
sys.path.insert(0, str(ROOT / "tests" / "interop"))
import brokers  # noqa: E402
import procs  # noqa: E402

VENV = Path(os.environ.get("OM_VENV", ROOT / ".venv"))
VENV_PY = VENV / "bin" / "python"
OM_WORKER_BIN = Path(os.environ.get("OM_WORKER_BIN", ROOT / "target" / "release" / "om-worker"))
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
BROKERS = {"amqp": AMQP_URL, "redis": REDIS_URL}
HOSTNAME = socket.gethostname()
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_SCRUB_ENV = ("OMEGA_", "CELERY_", "RABBITMQ_URL", "MONGO_URL", "C_FORCE_ROOT", "OM_WORKER_")


class BenchError(RuntimeError):
    pass


def short_id():
    return uuid.uuid4().hex[:8]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# /proc
# ------------------------------------------------------------------------------------------------

def proc_stat(pid):
    """(ppid, cpu_s own, cpu_s reaped children, starttime ticks, rss_kb) or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data[data.rfind(")") + 2:].split()
    # rest[0] = state (field 3); field n is rest[n-3]
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    starttime = int(rest[19])
    rss_pages = int(rest[21])
    return ppid, (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK, starttime, rss_pages * PAGE_KB


def cpu_seconds(pid, children=False):
    st = proc_stat(pid)
    if st is None:
        return None
    return st[1] + (st[2] if children else 0.0)


def status_kb(pid, field):
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def environ_has(pid, needle):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle.encode() in f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


def all_stats():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def descendants(root_pids, stats=None):
    """root pids plus all their descendants (by ppid), with their stat tuples."""
    stats = stats if stats is not None else all_stats()
    kids = {}
    for pid, st in stats.items():
        kids.setdefault(st[0], []).append(pid)
    seen = {}
    todo = [p for p in root_pids if p in stats]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen[p] = stats[p]
        todo.extend(kids.get(p, ()))
    return seen


def tree_cpu_seconds(root_pids):
    """CPU seconds (own + reaped children) summed over the live tree of root_pids. Processes that
    exited and were reaped by a tree member are included through the reaper's cutime/cstime."""
    return sum(st[1] + st[2] for st in descendants(root_pids).values())


class RssSampler(threading.Thread):
    """Samples RSS of the worker processes and their whole trees every `interval` seconds.
    Records peak RSS of each root process, peak summed tree RSS (and PSS, which counts CoW-shared
    pages once), every pid ever seen in a tree (pid, starttime, cmdline) and an optional series."""

    def __init__(self, root_pids, interval=0.5, series=False, pss_every=2):
        super().__init__(daemon=True)
        self.roots = list(root_pids)
        self.interval = interval
        self.keep_series = series
        self.pss_every = pss_every
        self.series = []  # (t, root_rss_kb_sum, tree_rss_kb, tree_nproc)
        self.peak_root_kb = {p: 0 for p in self.roots}
        self.peak_tree_kb = 0
        self.peak_tree_pss_kb = 0
        self.peak_nproc = 0
        self.seen = {}  # pid -> (starttime, cmdline)
        self._stop_evt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self, with_pss=False):
        tree = descendants(self.roots)
        total = 0
        for pid, st in tree.items():
            total += st[4]
            if pid not in self.seen:
                self.seen[pid] = (st[3], cmdline(pid))
        for p in self.roots:
            if p in tree:
                self.peak_root_kb[p] = max(self.peak_root_kb[p], tree[p][4], status_kb(p, "VmHWM") or 0)
        self.peak_tree_kb = max(self.peak_tree_kb, total)
        self.peak_nproc = max(self.peak_nproc, len(tree))
        if with_pss:
            pss = sum(pss_kb(p) or 0 for p in tree)
            self.peak_tree_pss_kb = max(self.peak_tree_pss_kb, pss)
        if self.keep_series:
            self.series.append((round(time.monotonic() - self.t0, 2),
                                sum(tree[p][4] for p in self.roots if p in tree), total, len(tree)))
        return tree

    def run(self):
        i = 0
        while not self._stop_evt.is_set():
            try:
                self.sample(with_pss=(i % self.pss_every == 0))
            except Exception:  # a process vanishing mid-read must not kill the sampler
                pass
            i += 1
            self._stop_evt.wait(self.interval)

    def stop(self):
        self._stop_evt.set()
        self.join(timeout=5)
        try:
            self.sample(with_pss=True)
        except Exception:
            pass

    def summary(self):
        return {
            "peak_worker_rss_mb": round(max(self.peak_root_kb.values() or [0]) / 1024, 1),
            "peak_worker_rss_mb_each": [round(v / 1024, 1) for v in self.peak_root_kb.values()],
            "peak_tree_rss_mb": round(self.peak_tree_kb / 1024, 1),
            "peak_tree_pss_mb": round(self.peak_tree_pss_kb / 1024, 1),
            "peak_tree_nproc": self.peak_nproc,
        }


def survivors(seen, exclude=()):
    """pids from a sampler's `seen` map that still run the same process (same starttime)."""
    out = []
    for pid, (start, cmd) in seen.items():
        if pid in exclude:
            continue
        st = proc_stat(pid)
        if st is not None and st[3] == start:
            out.append((pid, cmd))
    return out


# ------------------------------------------------------------------------------------------------
# SecantusDB
# ------------------------------------------------------------------------------------------------

class Secantus:
    """A fresh SecantusDB on its own port and data dir, via scripts/secantus.sh."""

    def __init__(self, run_dir):
        self.port = free_port()
        self.run_dir = Path(run_dir)
        self.env = dict(os.environ, OM_RUN_DIR=str(self.run_dir / "secantus-state"), OM_VENV=str(VENV))
        self.url = f"mongodb://127.0.0.1:{self.port}/omega"
        self.pid = None

    def start(self):
        proc = subprocess.run([str(ROOT / "scripts" / "secantus.sh"), "start", "--port", str(self.port),
                               "--dir", str(self.run_dir / "secantus-data")],
                              env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise BenchError(f"SecantusDB did not start on port {self.port}:\n{proc.stdout}\n{proc.stderr}")
        pidfile = self.run_dir / "secantus-state" / f"secantus-{self.port}.pid"
        self.pid = int(pidfile.read_text().strip())
        return self

    def stop(self):
        subprocess.run([str(ROOT / "scripts" / "secantus.sh"), "stop", "--port", str(self.port)],
                       env=self.env, capture_output=True, text=True, timeout=60)

    def cpu(self):
        return cpu_seconds(self.pid, children=True)


# ------------------------------------------------------------------------------------------------
# workers
# ------------------------------------------------------------------------------------------------

def clean_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_ENV)}
    env.update(extra)
    return env


class Worker:
    """One worker process (om-worker or omega|ml's Python Celery worker) in its own session."""

    RS_READY = re.compile(r"ready: consuming")
    PY_READY = re.compile(r"\S+@\S+ ready\.")

    def __init__(self, impl, broker_url, mongo_url, queue, run_dir, tag, concurrency=None,
                 extra_args=(), backend="rpc://"):
        self.impl = impl
        self.queue = queue
        self.marker = f"BENCH_RUN={tag}"
        tmp = Path(run_dir) / f"tmp-{tag}"
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.logpath = Path(run_dir) / f"worker-{tag}.log"
        self.nodename = f"bench-{impl}-{tag}@{HOSTNAME}"
        env = clean_env({
            "OMEGA_BROKER": broker_url, "OMEGA_MONGO_URL": mongo_url, "OMEGA_RESULT_BACKEND": backend,
            "OMEGA_TMP": str(tmp), "OMEGA_CONFIG_FILE": str(Path(run_dir) / "no-such-config.yml"),
            "BENCH_RUN": tag,
        })
        if impl == "rs":
            argv = [str(OM_WORKER_BIN), "worker", "-Q", queue, "-n", self.nodename, "-l", "info",
                    "--python", str(VENV_PY), "--log-format", "json"]
            if concurrency:
                argv += ["-c", str(concurrency)]
        else:
            env["C_FORCE_ROOT"] = "1"
            argv = [str(VENV / "bin" / "celery"), "--app", "omegaml.celeryapp", "worker", "-Q", queue,
                    "-n", self.nodename, "-l", "info", "--without-gossip", "--without-mingle",
                    "--without-heartbeat"]
            if concurrency:
                argv += ["-c", str(concurrency)]
        argv += list(extra_args)
        self.argv = argv
        self._logf = open(self.logpath, "ab")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, cwd=str(tmp), stdin=subprocess.DEVNULL,
                                     stdout=self._logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.ready_s = None

    def log(self):
        try:
            return self.logpath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout=120):
        rx = self.RS_READY if self.impl == "rs" else self.PY_READY
        deadline = time.monotonic() + timeout
        while True:
            if rx.search(self.log()):
                self.ready_s = time.monotonic() - self.t_start
                return self
            if self.proc.poll() is not None:
                raise BenchError(f"{self.impl} worker exited rc={self.proc.returncode} before ready; "
                                 f"log {self.logpath}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.impl} worker (pid {self.pid}) not ready within {timeout}s; "
                                 f"log {self.logpath}:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def stop(self, grace=30):
        """SIGTERM (warm shutdown), SIGKILL after `grace`. Returns the exit status."""
        procs.stop_process(self.proc, grace, on_kill=lambda: log(
            f"{self.impl} worker pid {self.pid} ignored SIGTERM for {grace}s; SIGKILL"))
        try:
            self._logf.close()
        except Exception:
            pass
        return self.proc.returncode

    def sweep(self, seen):
        """SIGKILL every process of this run still alive after stop (seen in its tree, or carrying
        its BENCH_RUN marker in the environment); returns what was found before killing."""
        left = survivors(seen, exclude={self.pid})
        marked = [(p, cmdline(p)) for p in _pids() if p != self.pid and p != os.getpid()
                  and environ_has(p, self.marker) and p not in {x for x, _ in left}]
        found = left + marked
        for pid, _ in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return found


def _pids():
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


# ------------------------------------------------------------------------------------------------
# om-worker JSON log
# ------------------------------------------------------------------------------------------------

TASK_FIELDS = ["wait_slot_ms", "ledger_ms", "ack_ms", "started_ms", "run_ms", "result_ms", "ledger_finish_ms"]
NB_FIELDS = ["meta_read_ms", "gridfs_read_ms", "kernel_ready_ms", "execute_ms", "results_write_ms", "record_ms"]


def parse_timings(log_text):
    """{task_id: {field: ms}} from om-worker's JSON log lines 'task timings' and
    'notebook task timings' (tracing's json format: the event's fields under "fields")."""
    out = {}
    problems = []
    for line in log_text.splitlines():
        if "timings" not in line or not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        fields = rec.get("fields") or {}
        msg = fields.get("message")
        if msg not in ("task timings", "notebook task timings"):
            continue
        tid = fields.get("task_id")
        if not tid:
            problems.append(f"'{msg}' line without task_id")
            continue
        want = TASK_FIELDS if msg == "task timings" else NB_FIELDS
        d = out.setdefault(tid, {})
        for k in want:
            v = fields.get(k)
            if v is None:
                problems.append(f"'{msg}' line lacks field {k}")
            else:
                d[k] = float(v)
    return out, sorted(set(problems))


def log_errors(log_text, limit=10):
    """WARN/ERROR lines of a worker log (JSON or text), at most `limit`."""
    out = []
    for line in log_text.splitlines():
        lvl = None
        if line.startswith("{"):
            try:
                lvl = json.loads(line).get("level")
            except ValueError:
                pass
        elif re.search(r"\b(ERROR|CRITICAL)/|Traceback", line):
            lvl = "ERROR"
        if lvl in ("ERROR", "WARN", "WARNING"):
            out.append(line[:500])
    return out[:limit], len(out)


# ------------------------------------------------------------------------------------------------
# broker cleanup
# ------------------------------------------------------------------------------------------------

def cleanup_queues(kind, names):
    """Delete the bench's task queues (and their exchanges) and kombu bookkeeping for them."""
    brokers.delete_queues(kind, AMQP_URL if kind == "amqp" else REDIS_URL, names)
