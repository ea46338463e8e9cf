"""Faults with real processes and servers (issue 7, part 2): broker restarts, a MongoDB outage, and
notebooks that kill their kernel, loop forever, exhaust memory or flood their output.

The client is the unchanged omega|ml 0.18.0 client in a fresh process (`job.map()`, `job.status()`,
`om.runtime.job(name).run(timeout=...)`); the assertions are made from its side and from MongoDB.

Result backends, decided per test:
- broker restarts and the MongoDB outage use the `redis://` result backend for the worker and the
  client. "0 lost" is asserted on MongoDB (every task's `attributes.job_runs` holds exactly one OK
  run, the in-flight ledger is empty); the client's side is `job.status(task_group='*')` (or, for
  `run()` tasks, `AsyncResult(id).state`) in a fresh client process, which reads the Celery state
  from the backend: rpc:// results are owned by the publishing process (and replies sent
  while RabbitMQ is down are lost for it), redis:// results can be read by any client afterwards.
  For Redis, om-worker's connections (broker and backend) go through a relay the test cuts; the
  client talks to Redis directly.
- the misbehaving-notebook tests use omega|ml's default `rpc://` with `res.get()` in the process that
  called `run()`, exactly as a user does.

"No orphan kernels": each notebook's first cell writes its kernel's PID to a file; that process must
be gone shortly after the task. After the worker stops, no process may remain whose environment has
the worker's own OMEGA_TMP directory (unique per worker; the fork server and every kernel inherit it).

Stopping RabbitMQ's application disturbs anything else using it at that moment: the outage lasts a
few seconds and it is always restored (finally) and waited for before the test ends. Redis itself is
never stopped (see test 2).
"""
import json
import os
import re
import time
from pathlib import Path

import pymongo
import pytest

import faults_util as fu
from conftest import (AMQP_URL, REDIS_URL, VENV, VENV_PY, _NO_CONFIG, Broker, free_port, rabbitmqctl,
                      short_id, wait_until)
from omega_scenarios import client_env

# Seconds from the broker being back (a client's handshake succeeds) to om-worker logging its
# reconnect: the 5 s. om-worker's reconnect backoff doubles from 100 ms and caps at 2 s, so
# the worst case is the cap plus one handshake.
RECONNECT_BOUND = 5.0
DONE_TIMEOUT = 150  # every task of a scenario recorded (kernels on a loaded 2-core box)
FIGURES = {}  # measured figures, printed at the end of the module (pytest -s / -rA shows them)


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    if FIGURES:
        print("\n[test_faults figures] " + json.dumps(FIGURES, sort_keys=True))


def db_of(url):
    return pymongo.MongoClient(url, serverSelectionTimeoutMS=10000).get_default_database()


def no_panic(w):
    log = w.log()
    assert "panicked" not in log, f"om-worker panicked:\n{_lines(log, 'panicked')}"


def _lines(log, needle, limit=20):
    hits = [l for l in log.splitlines() if needle in l]
    return "\n".join(hits[:limit])


# ---------------------------------------------------------------------------------------------
# job.map() tasks that sleep (broker restarts, MongoDB outage)
# ---------------------------------------------------------------------------------------------

MAP_SCRIPT = """
import nbformat, omegaml as om
nb = nbformat.v4.new_notebook()
nb.cells.append(nbformat.v4.new_code_cell(
    "import os, time\\n"
    "open(os.path.join({marks!r}, 'started-{nb}-%s' % _jobdata['param']), 'w').close()\\n"
    "time.sleep({sleep})\\n"
    "print('slept', _jobdata['param'])"))
om.jobs.put(nb, {nb!r})
job = om.runtime.job({nb!r})
tasks = job.map(range({n}))
out({{"tasks": sorted(m.name for m in tasks),
      "task_ids": {{m.name: m.attributes["job"].get("task_id") for m in tasks}}}})
"""

STATUS_SCRIPT = """
import omegaml as om
rows = []
for nb in {nbs!r}:
    df = om.runtime.job(nb).status(task_group='*')
    rows += [dict(name=r['name'], status=r['status'], run_status=r['run_status']) for _, r in df.iterrows()]
out(rows)
"""


def map_tasks(env, marks, nb, n, sleep):
    sub = fu.run_client(VENV_PY, MAP_SCRIPT.format(marks=str(marks), nb=nb, n=n, sleep=sleep), env,
                        what=f"job.map({nb})")
    assert len(sub["tasks"]) == n, sub
    return sub


def started(marks, nb):
    return sorted(p.name for p in marks.glob(f"started-{nb}-*"))


def runs_of(d, tasks):
    return {doc["name"]: doc["attributes"].get("job_runs") or []
            for doc in d.metadata.find({"name": {"$in": list(tasks)}})}


def wait_all_recorded(d, tasks, w, timeout=DONE_TIMEOUT):
    def done():
        runs = runs_of(d, tasks)
        return len(runs) == len(tasks) and all(runs.values())

    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            runs = runs_of(d, tasks)
            missing = [t for t in tasks if not runs.get(t)]
            fu.fail(f"{len(missing)} of {len(tasks)} tasks have no run recorded after {timeout}s "
                    f"(lost?): {missing}\nworker alive: {w.alive()}\n--- worker log ---\n{w.log_tail()}")
        time.sleep(0.5)


def assert_exactly_once_ok(d, tasks, w):
    time.sleep(2)  # room for a duplicate run to show up
    runs = runs_of(d, tasks)
    bad = {t: [(r.get("status"), r.get("message")) for r in rs] for t, rs in runs.items()
           if len(rs) != 1 or rs[0].get("status") != "OK"}
    assert not bad, (f"tasks not run exactly once with status OK: {bad}\n--- worker log ---\n{w.log_tail()}")
    left = d.om_worker_inflight.count_documents({"owner": w.nodename})
    assert left == 0, f"{left} in-flight ledger records of {w.nodename} left after every task completed"


def assert_client_sees_success(env, nbs, tasks, w):
    rows = fu.run_client(VENV_PY, STATUS_SCRIPT.format(nbs=list(nbs)), env, what="job.status()")
    by_name = {r["name"]: (r["status"], r["run_status"]) for r in rows}
    want = {t: ("SUCCESS", "OK") for t in tasks}
    got = {t: by_name.get(t) for t in tasks}
    assert got == want, f"job.status() as the client sees it: {got}\n--- worker log ---\n{w.log_tail()}"


def wait_log_count(w, needle, count, timeout, desc):
    return wait_until(lambda: w.log().count(needle) >= count and time.monotonic(), timeout,
                      f"{desc} ({needle!r} logged {count}x)\n--- worker log ---\n{w.log_tail(6000)}",
                      interval=0.05)


def control_ping(node, timeout=1.0):
    """Celery's `inspect ping` to one node through the broker (pidbox), fresh connection."""
    from conftest import omega_celery_app
    app = omega_celery_app(AMQP_URL, REDIS_URL)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            replies = app.control.ping(destination=[node], timeout=timeout, connection=conn)
        return any(node in r for r in replies or [])
    except Exception:
        return False
    finally:
        app.close()


# ---------------------------------------------------------------------------------------------
# 1. RabbitMQ restart mid-run
# ---------------------------------------------------------------------------------------------

@pytest.mark.exclusive  # stops the machine's RabbitMQ: nothing else may run meanwhile
def test_rabbitmq_restart_mid_run_loses_nothing(worker, mongo, names, tmp_path):
    label = names.queue("fault-rmq")
    nb = f"rmq{short_id()}"
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "ctmp").mkdir()
    w = worker(AMQP_URL, [label], backend=REDIS_URL, concurrency=2)
    env = client_env(mongo, AMQP_URL, label, tmp_path / "ctmp", _NO_CONFIG, backend=REDIS_URL)
    n = 4  # 2 running, 2 prefetched (unacked, waiting for a slot) when the broker goes away
    sub = map_tasks(env, marks, nb, n, sleep=6)
    tasks = sub["tasks"]
    wait_until(lambda: len(started(marks, nb)) >= 2, 90, "two notebooks running")
    d = db_of(mongo)
    assert d.om_worker_inflight.count_documents({"owner": w.nodename}) >= 2
    # a first ping before the outage: checks the path, and imports celery/omegaml in this process
    # now (seconds of CPU) rather than inside the measurement
    wait_until(lambda: control_ping(w.nodename), 30, f"{w.nodename} answers a control ping")
    lost_before = w.log().count("AMQP connection lost")
    back_before = w.log().count("reconnected to AMQP broker")
    back = None
    try:
        rabbitmqctl("stop_app")
        t_down = time.monotonic()
        wait_log_count(w, "AMQP connection lost", lost_before + 1, 15, "worker notices the broker is gone")
        # "back" = the first moment a client completes an AMQP handshake again
        back = fu.FirstSuccess(lambda: fu.rabbit_answers(AMQP_URL), interval=0.05).start()
        time.sleep(max(0.0, 4 - (time.monotonic() - t_down)))
        rabbitmqctl("start_app")
        t_back = back.wait(30)
        assert t_back is not None, "RabbitMQ accepts no AMQP connection 30s after start_app"
        outage = t_back - t_down
    finally:
        if back is not None:
            back.stop()
        fu.rabbit_restore(AMQP_URL)
    t_seen = wait_log_count(w, "reconnected to AMQP broker", back_before + 1, 30,
                            "worker reconnects after start_app")
    reconnect = max(0.0, t_seen - t_back)
    attempts = []

    def ping():
        ok = control_ping(w.nodename)
        attempts.append(round(time.monotonic() - t_back, 2))
        return ok and time.monotonic()

    pinged = wait_until(ping, 30, f"{w.nodename} answers a control ping after the restart")
    ping_after = pinged - t_back
    FIGURES["rabbitmq"] = {"outage_s": round(outage, 2), "reconnect_s": round(reconnect, 2),
                           "control_ping_s": round(ping_after, 2), "ping_attempts_at_s": attempts}
    assert reconnect <= RECONNECT_BOUND, (
        f"om-worker logged 'reconnected to AMQP broker' {reconnect:.1f}s after RabbitMQ was back "
        f"(bound {RECONNECT_BOUND}s)\n--- worker log ---\n{w.log_tail()}")
    wait_all_recorded(d, tasks, w)
    assert_exactly_once_ok(d, tasks, w)
    FIGURES["rabbitmq"]["tasks_lost"] = 0
    assert_client_sees_success(env, [nb], tasks, w)
    state = wait_until(lambda: (lambda s: s if (s["ready"], s["unacked"]) == (0, 0) else None)(
        Broker("amqp").queue_state(label)), 30, f"queue {label} drained")
    assert state["ready"] == 0
    assert w.alive(), f"worker exited rc {w.proc.poll()}\n{w.log_tail()}"
    no_panic(w)


# ---------------------------------------------------------------------------------------------
# 2. Redis unreachable mid-run (Redis as broker and result backend)
# ---------------------------------------------------------------------------------------------


def test_redis_away_mid_run_loses_nothing(worker, mongo, names, tmp_path, redis_relay):
    """om-worker reaches Redis (broker and result backend) through a relay the test cuts for ~3 s
    while two tasks run and two more wait in the queue: every connection drops and new ones are
    refused, as when Redis goes away; Redis keeps its data. The running tasks complete, the queued
    ones run after it is back, the tasks published after it run too, each recorded exactly once, and
    the client sees SUCCESS for all of them."""
    label = names.queue("fault-redis")
    nb1, nb2 = f"rdsa{short_id()}", f"rdsb{short_id()}"
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "ctmp").mkdir()
    via = redis_relay.url()
    w = worker(via, [label], backend=via, concurrency=2)
    # The client publishes and reads results directly: only om-worker's connections are cut.
    env = client_env(mongo, REDIS_URL, label, tmp_path / "ctmp", _NO_CONFIG, backend=REDIS_URL)
    before = map_tasks(env, marks, nb1, 4, sleep=6)["tasks"]  # 2 running, 2 waiting for a slot
    d = db_of(mongo)
    wait_until(lambda: len(started(marks, nb1)) == 2, 90, "two notebooks running")
    assert d.om_worker_inflight.count_documents({"owner": w.nodename}) >= 2
    lost_before = w.log().count("Redis BRPOP failed")
    back_before = w.log().count("Redis connection restored")
    redis_relay.cut()
    t_down = time.monotonic()
    try:
        wait_log_count(w, "Redis BRPOP failed", lost_before + 1, 15, "worker notices Redis is gone")
        time.sleep(max(0.0, 3 - (time.monotonic() - t_down)))
    finally:
        redis_relay.restore()
    t_back = time.monotonic()
    outage = t_back - t_down
    t_seen = wait_log_count(w, "Redis connection restored", back_before + 1, 30, "worker reconnects to Redis")
    reconnect = max(0.0, t_seen - t_back)
    FIGURES["redis"] = {"outage_s": round(outage, 2), "reconnect_s": round(reconnect, 2)}
    assert reconnect <= RECONNECT_BOUND, (
        f"om-worker logged 'Redis connection restored' {reconnect:.1f}s after Redis was back "
        f"(bound {RECONNECT_BOUND}s)\n--- worker log ---\n{w.log_tail()}")
    after = map_tasks(env, marks, nb2, 2, sleep=1)["tasks"]
    wait_all_recorded(d, before + after, w)
    assert_exactly_once_ok(d, before + after, w)
    FIGURES["redis"]["tasks_lost"] = 0
    assert_client_sees_success(env, [nb1, nb2], before + after, w)
    assert w.alive(), f"worker exited rc {w.proc.poll()}\n{w.log_tail()}"
    no_panic(w)


# ---------------------------------------------------------------------------------------------
# 3. MongoDB (SecantusDB) unavailable for 10 s mid-run
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def own_secantus(tmp_path, mongo):  # `mongo`: the session server is up, i.e. the venv works
    sec = fu.Secantus(VENV, free_port(), tmp_path / "secantus-data", tmp_path / "secantus-run")
    sec.start()
    try:
        yield sec
    finally:
        try:
            sec.stop()
        except BaseException:
            pass


SUBMIT_RUNS_SCRIPT = """
import nbformat, omegaml as om
ids = {{}}
for name in {names!r}:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import os, time\\n"
        "open(os.path.join(%r, 'started-%s'), 'w').close()\\n"
        "deadline = time.monotonic() + 120\\n"
        "while not os.path.exists(%r) and time.monotonic() < deadline:\\n"
        "    time.sleep(0.05)\\n"
        "print('released')" % ({marks!r}, name, {release!r})))
    om.jobs.put(nb, name)
for name in {names!r}:
    ids[name] = om.runtime.job(name).run().id
out(ids)
"""

STATES_SCRIPT = """
import omegaml as om
from celery.result import AsyncResult
app = om.runtime.celeryapp
res = {{}}
for name, tid in {ids!r}.items():
    r = AsyncResult(tid, app=app)
    res[name] = [r.state, str(r.get(timeout=10)) if r.state == "SUCCESS" else None]
out(res)
"""


def test_mongodb_away_mid_run_loses_nothing(worker, own_secantus, names, tmp_path):
    """The notebooks here do not use MongoDB themselves (omega|ml's own client in the kernel fails
    after its 2.5 s server selection timeout, OMEGA_MONGO_TIMEOUT; a job.map() notebook's
    _mark_status cells would then be ERROR runs, as with the Python worker): the outage hits
    om-worker's own MongoDB steps, i.e. storing results and recording runs of the two running tasks
    and the in-flight ledger, task and notebook reads of the two waiting for a slot.

    No timing is guessed: the two running notebooks wait for a release file, SecantusDB is stopped,
    then they are released, so their results are written while MongoDB is away; it stays away until
    om-worker has logged a retry and for at least 10 s in all."""
    sec = own_secantus
    label = names.queue("fault-mongo")
    marks = tmp_path / "marks"
    marks.mkdir()
    release = tmp_path / "release"
    (tmp_path / "ctmp").mkdir()
    w = worker(AMQP_URL, [label], backend=REDIS_URL, concurrency=2, env_extra={"OMEGA_MONGO_URL": sec.url})
    env = client_env(sec.url, AMQP_URL, label, tmp_path / "ctmp", _NO_CONFIG, backend=REDIS_URL)
    base = f"mgo{short_id()}"
    nbs = [f"{base}-{i}" for i in range(4)]  # 2 running through the outage, 2 waiting for a slot
    ids = fu.run_client(VENV_PY, SUBMIT_RUNS_SCRIPT.format(names=nbs, marks=str(marks), release=str(release)),
                        env, what="om.runtime.job(...).run()")
    wait_until(lambda: len(list(marks.glob("started-*"))) >= 2, 90, "two notebooks running")
    retry = "MongoDB unreachable, retrying"
    retries_before = w.log().count(retry)
    back = None
    try:
        sec.stop()
        t_down = time.monotonic()
        assert not fu.tcp_open("127.0.0.1", sec.port), "SecantusDB still accepts connections after stop"
        release.touch()
        wait_log_count(w, retry, retries_before + 1, 60, "om-worker retries a MongoDB step while it is away")
        time.sleep(max(0.0, 10 - (time.monotonic() - t_down)))
        back = fu.FirstSuccess(lambda: fu.tcp_open("127.0.0.1", sec.port), interval=0.05).start()
    finally:
        release.touch()
        sec.start()
    t_back = back.wait(10) or time.monotonic()
    back.stop()
    outage = t_back - t_down
    d = db_of(sec.url)
    stored = [f"{n}.ipynb" for n in nbs]  # om.jobs.put() adds the extension
    wait_all_recorded(d, stored, w)
    done_after = time.monotonic() - t_back
    assert_exactly_once_ok(d, stored, w)
    FIGURES["mongodb"] = {"outage_s": round(outage, 2), "all_recorded_after_return_s": round(done_after, 2),
                          "tasks_lost": 0, "retry_lines": w.log().count(retry) - retries_before}
    states = fu.run_client(VENV_PY, STATES_SCRIPT.format(ids=ids), env, what="AsyncResult states")
    bad = {n: st for n, st in states.items() if st[0] != "SUCCESS"}
    assert not bad, f"Celery states the client sees: {states}\n{w.log_tail()}"
    assert w.alive(), f"worker exited rc {w.proc.poll()}\n{w.log_tail()}"
    no_panic(w)


# ---------------------------------------------------------------------------------------------
# 4-7. notebooks that misbehave (RabbitMQ, rpc://): one worker for 4, 5 and 7; 6 has its own with
#      --kernel-memory-mb (under that limit the flood's kernel itself runs out of memory in ipykernel's
#      IOPub thread: 'IOStream.flush timed out', and the run takes a minute instead of seconds)
# ---------------------------------------------------------------------------------------------

# 512 is what the issue asks for, but with it no kernel starts at all (RLIMIT_AS counts the forked
# kernel's ~0.5 GiB of inherited address space plus 8 MiB per thread stack: ipykernel fails with
# "can't start new thread" / zmq "Resource temporarily unavailable (src/thread.cpp:241)").
KERNEL_MEMORY_MB = int(os.environ.get("OMW_FAULT_KERNEL_MEMORY_MB", "1024"))


class NbWorker:
    def __init__(self, w, tmpdir, marks, label, mongo):
        self.w, self.tmpdir, self.marks, self.label, self.mongo = w, tmpdir, marks, label, mongo


@pytest.fixture(scope="module")
def nbw(om_worker_bin, mongo, tmp_path_factory):
    base = tmp_path_factory.mktemp("faults-nb")
    with fu.notebook_worker(om_worker_bin, mongo, base, "omw-faultnb",
                            "misbehaving-notebook worker") as (w, wtmp, marks, label):
        yield NbWorker(w, wtmp, marks, label, mongo)


@pytest.fixture
def nbworker(nbw, request):
    request.node._omw_workers = [nbw.w]  # conftest attaches the log to a failed test's report
    assert nbw.w.alive(), f"the shared worker died earlier (rc {nbw.w.proc.poll()})\n{nbw.w.log_tail()}"
    return nbw


RUN_SCRIPT = """
import nbformat, omegaml as om
res_all = []
for name, cells, timeout in {jobs!r}:
    nb = nbformat.v4.new_notebook()
    for src in cells:
        nb.cells.append(nbformat.v4.new_code_cell(src))
    om.jobs.put(nb, name)
    t0 = time.monotonic()
    res = om.runtime.job(name).run(timeout=timeout)
    r = {{"name": name, "task_id": res.id}}
    try:
        r["value"] = res.get(timeout={get_timeout})
    except Exception as e:
        r["exc"] = f"{{type(e).__name__}}: {{e}}"
    r["elapsed"] = time.monotonic() - t0
    r["state"] = res.state
    meta = om.jobs.metadata(name)
    r["job_runs"] = meta.attributes.get("job_runs", [])
    r["results"] = om.jobs.list("results/" + name + "*")
    if r["results"]:
        rnb = om.jobs.get(r["results"][-1])
        cells_out = []
        for c in rnb.cells:
            texts, kinds, errors = [], [], []
            for o in c.get("outputs", []):
                kinds.append(o.get("output_type"))
                if o.get("output_type") == "stream":
                    t = o.get("text", "")
                    texts.append(t if isinstance(t, str) else "".join(t))
                elif o.get("output_type") == "error":
                    errors.append([o.get("ename"), o.get("evalue")])
            text = "".join(texts)
            cells_out.append({{"kinds": kinds, "text_len": len(text), "errors": errors,
                               "markers": [l for l in text.splitlines() if "om-worker" in l][:5],
                               "head": text[:200], "tail": text[-300:]}})
        r["results_cells"] = cells_out
        r["results_size"] = len(json.dumps(dict(rnb), default=repr))
    res_all.append(r)
out(res_all)
"""


def pid_cell(marks, tag):
    return f"import os\nopen({str(marks / ('kpid-' + tag))!r}, 'w').write(str(os.getpid()))"


def run_jobs(nbw, jobs, get_timeout=120, timeout=240):
    """jobs: [(name, [cells], run timeout)] run one after the other by one client process."""
    env = client_env(nbw.mongo, AMQP_URL, nbw.label, nbw.tmpdir.parent / "ctmp",
                     _NO_CONFIG)
    (nbw.tmpdir.parent / "ctmp").mkdir(exist_ok=True)
    return fu.run_client(VENV_PY, RUN_SCRIPT.format(jobs=jobs, get_timeout=get_timeout), env,
                         timeout=timeout, what="om.runtime.job(...).run()")


def kernel_pid(nbw, tag):
    p = nbw.marks / f"kpid-{tag}"
    assert p.exists(), f"the notebook's first cell did not record its kernel pid ({p})\n{nbw.w.log_tail()}"
    return int(p.read_text())


def assert_kernel_gone(nbw, tag, timeout=10):
    pid = kernel_pid(nbw, tag)
    wait_until(lambda: fu.gone(pid), timeout,
               f"kernel pid {pid} of {tag} gone after its task (still: {fu.cmdline(pid)!r}, state "
               f"{fu.proc_state(pid)})")
    # and nothing it started is left either
    assert not fu.children(pid), f"children of kernel {pid} left: {fu.children(pid)}"
    return pid


def assert_worker_tree_bounded(nbw):
    """Besides the fork server and the pool's idle kernels (-c 2 → pool 2), nothing of this worker runs."""
    procs = fu.procs_with_env("OMEGA_TMP", str(nbw.tmpdir))
    assert procs, f"no process with OMEGA_TMP={nbw.tmpdir} found: the orphan check would see nothing"
    assert len(procs) <= 4, ("more worker processes than fork server + 2 pool kernels + 1 kernel shutting "
                             "down: " + "; ".join(f"{p}: {fu.cmdline(p)}" for p in procs))


def one_run(r):
    runs = r["job_runs"]
    assert len(runs) == 1, f"{r['name']}: {len(runs)} runs recorded: {runs}"
    return runs[0]


def test_kernel_dies_is_an_error_run_and_worker_goes_on(nbworker):
    nbw = nbworker
    bad, good = f"kdie{short_id()}", f"kok{short_id()}"
    r_bad, r_good = run_jobs(nbw, [
        (bad, [pid_cell(nbw.marks, bad), "import os; os._exit(1)", "print('not reached')"], None),
        (good, [pid_cell(nbw.marks, good), "print(6 * 7)"], None),
    ])
    log = nbw.w.log_tail()
    assert r_bad["state"] == "SUCCESS" and "exc" not in r_bad, (
        f"a notebook whose kernel died must be a SUCCESS task (omega|ml semantics): {r_bad}\n{log}")
    run = one_run(r_bad)
    assert run["status"] == "ERROR", f"run recorded {run}\n{log}"
    assert re.search(r"(?i)kernel died|dead ?kernel", run["message"]), f"message {run['message']!r}"
    assert r_bad["results"], f"no results notebook stored for {bad}: {r_bad}"
    assert_kernel_gone(nbw, bad)
    assert r_good["state"] == "SUCCESS", r_good
    run = one_run(r_good)
    assert run["status"] == "OK", f"the next task after a kernel death: {run}\n{log}"
    assert r_good["results_cells"][1]["head"].strip() == "42", r_good["results_cells"]
    assert_kernel_gone(nbw, good)
    assert_worker_tree_bounded(nbw)
    FIGURES["os_exit"] = {"time_to_error_s": round(r_bad["elapsed"], 2), "next_ok_s": round(r_good["elapsed"], 2),
                          "message": one_run(r_bad)["message"]}
    assert r_bad["elapsed"] < 30, f"os._exit took {r_bad['elapsed']:.1f}s to become an ERROR run"


CELL_TIMEOUT = 5


def test_infinite_loop_is_stopped_by_the_timeout(nbworker):
    nbw = nbworker
    name = f"loop{short_id()}"
    (r,) = run_jobs(nbw, [(name, [pid_cell(nbw.marks, name), "while True:\n    pass",
                                  "print('not reached')"], CELL_TIMEOUT)])
    log = nbw.w.log_tail()
    assert r["state"] == "SUCCESS" and "exc" not in r, f"{r}\n{log}"
    run = one_run(r)
    assert run["status"] == "ERROR", f"run recorded {run}\n{log}"
    assert re.search(r"(?i)timed? ?out", run["message"]), f"message {run['message']!r}"
    # the timeout, the interrupt grace (5 s), kernel start and client overhead on a loaded box
    bound = CELL_TIMEOUT + 5 + 15
    assert r["elapsed"] < bound, f"loop became an ERROR run after {r['elapsed']:.1f}s (bound {bound}s)\n{log}"
    assert_kernel_gone(nbw, name)
    assert_worker_tree_bounded(nbw)
    FIGURES["loop"] = {"cell_timeout_s": CELL_TIMEOUT, "time_to_error_s": round(r["elapsed"], 2),
                       "message": run["message"]}


@pytest.fixture
def memworker(worker, names, mongo, tmp_path):
    """A worker with --kernel-memory-mb; after it stops, nothing with its OMEGA_TMP may be left."""
    label = names.queue("fault-mem")
    marks = tmp_path / "marks"
    marks.mkdir()
    w = worker(AMQP_URL, [label], concurrency=1, extra=["--kernel-memory-mb", str(KERNEL_MEMORY_MB)])
    wtmp = w.env["OMEGA_TMP"]
    yield NbWorker(w, Path(wtmp), marks, label, mongo)
    rc = w.terminate()
    deadline = time.monotonic() + 10
    left = fu.procs_with_env("OMEGA_TMP", wtmp)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = fu.procs_with_env("OMEGA_TMP", wtmp)
    assert rc == 0, f"om-worker exited {rc} on SIGTERM\n{w.log_tail()}"
    assert not left, "orphans of the stopped worker: " + "; ".join(f"{p}: {fu.cmdline(p)}" for p in left)


def test_memory_bomb_hits_the_kernel_memory_limit(memworker):
    nbw = memworker
    name, ok = f"mem{short_id()}", f"memok{short_id()}"
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 2**20))"
    with fu.RssSampler(nbw.w.pid) as rss:
        r, r_ok = run_jobs(nbw, [(name, [pid_cell(nbw.marks, name), bomb, "print('not reached')"], 60),
                                 (ok, [pid_cell(nbw.marks, ok), "print(6 * 7)"], 60)])
    log = nbw.w.log_tail()
    assert one_run(r_ok)["status"] == "OK", (
        f"a plain notebook after the bomb, under --kernel-memory-mb {KERNEL_MEMORY_MB}: {r_ok['job_runs']}\n{log}")
    assert_kernel_gone(nbw, ok)
    assert r["state"] == "SUCCESS" and "exc" not in r, f"{r}\n{log}"
    run = one_run(r)
    assert run["status"] == "ERROR", f"run recorded {run}\n{log}"
    assert re.search(r"(?i)MemoryError|kernel died|dead ?kernel", run["message"]), f"message {run['message']!r}"
    assert r["elapsed"] < 60, f"memory bomb took {r['elapsed']:.1f}s to become an ERROR run"
    assert_kernel_gone(nbw, name)
    assert_worker_tree_bounded(nbw)
    peak_mb = rss.peak_kb / 1024
    FIGURES["memory"] = {"kernel_memory_mb": KERNEL_MEMORY_MB, "time_to_error_s": round(r["elapsed"], 2),
                         "worker_rss_peak_mb": round(peak_mb, 1), "message": run["message"]}
    assert peak_mb < 200, f"om-worker RSS peaked at {peak_mb:.0f} MB during the memory bomb"


FLOOD_LINES = int(os.environ.get("OMW_FAULT_FLOOD_LINES", "100000"))  # × 1001 bytes: ~100 MB
# Measured on the 2-core dev box (debug build, base RSS ~41 MB): peaks of 181-225 MB for 100 MB and
# 233 MB for 300 MB of output, i.e. bounded, but above the 200 MB first aimed at; most of it appears
# while the (10 MiB-capped) results notebook is written. The bound guards against buffering the flood.
FLOOD_RSS_BOUND_MB = float(os.environ.get("OMW_FAULT_FLOOD_RSS_BOUND_MB", "300"))


def test_output_flood_is_truncated_and_rss_bounded(nbworker):
    nbw = nbworker
    name = f"flood{short_id()}"
    flood = f"for i in range({FLOOD_LINES}):\n    print('x' * 1000)"
    base_kb = fu.rss_kb(nbw.w.pid)
    with fu.RssSampler(nbw.w.pid) as rss:
        (r,) = run_jobs(nbw, [(name, [pid_cell(nbw.marks, name), flood, "print('after the flood')"], 120)],
                        get_timeout=150, timeout=240)
    log = nbw.w.log_tail()
    assert r["state"] == "SUCCESS" and "exc" not in r, f"{r}\n{log}"
    run = one_run(r)
    assert run["status"] in ("OK", "ERROR"), run
    assert r["results"], f"no results notebook stored: {r}"
    cell = r["results_cells"][1]
    markers = cell["markers"] + [m for c in r["results_cells"] for m in c["markers"]]
    assert any("truncated" in m for m in markers), (
        f"no truncation marker in the stored results notebook: cell {cell}\n{log}")
    assert cell["text_len"] < 11 * 2**20, f"flood cell kept {cell['text_len']} characters (cap 10 MiB)"
    assert r["results_size"] < 51 * 2**20, f"results notebook is {r['results_size']} bytes (cap 50 MiB)"
    assert_kernel_gone(nbw, name)
    assert_worker_tree_bounded(nbw)
    peak_mb = rss.peak_kb / 1024
    FIGURES["flood"] = {"run_status": run["status"], "elapsed_s": round(r["elapsed"], 2),
                        "worker_rss_base_mb": round(base_kb / 1024, 1), "worker_rss_peak_mb": round(peak_mb, 1),
                        "peak_utc": rss.peak_utc, "rss_profile_mb": rss.profile(),
                        "samples": len(rss.samples), "kept_chars": cell["text_len"],
                        "results_nb_bytes": r["results_size"], "marker": markers[:1]}
    assert peak_mb < FLOOD_RSS_BOUND_MB, (
        f"om-worker RSS peaked at {peak_mb:.0f} MB (base {base_kb / 1024:.0f} MB) during a "
        f"{FLOOD_LINES * 1001 / 1e6:.0f} MB output flood; bound {FLOOD_RSS_BOUND_MB} MB\n"
        f"RSS profile (s, MB): {rss.profile()}\n{log}")
