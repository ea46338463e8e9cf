"""Remote control and events: om-worker is visible to the unchanged Celery 5.7 CLI and omega|ml 0.18's
`om.runtime` discovery (labels/workers/stats/status) on RabbitMQ and Redis, and honours revoke,
add_consumer/cancel_consumer and shutdown broadcast over the pidbox."""
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import VENV, wait_until, worker_env

# This module runs no notebook: its workers pre-start no kernels (see conftest's `worker`).
WORKER_KERNELS = False

CELERY = str(VENV / "bin" / "celery")


def celery_cli(tmp_path, broker, mongo, *commands, timeout=60):
    """Runs each `celery --app omegaml.celeryapp <args>` (one tuple of args per command) with
    OMEGA_BROKER pointing at the test broker, all at once: each CLI process spends seconds
    importing omegaml, which is what this would otherwise wait for. Returns [(rc, output)]."""
    env = worker_env(tmp_path, broker.url, "rpc://", mongo, {"PYTHONUNBUFFERED": "1"})
    procs = [subprocess.Popen([CELERY, "--app", "omegaml.celeryapp", *args], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for args in commands]
    results = []
    for args, proc in zip(commands, procs):
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"celery {' '.join(args)} ran past {timeout}s:\n{out}", pytrace=False)
        results.append((proc.returncode, out))
    return results


def inspect(app, node, method, timeout=10, **kw):
    """One inspect call against `node`; its payload (None if it did not answer)."""
    replies = getattr(app.control.inspect(destination=[node], timeout=timeout), method)(**kw) or {}
    return replies.get(node)


def test_celery_cli_inspect_and_status(broker, worker, q, mongo, tmp_path):
    """`celery inspect ping|active_queues|stats|registered` and `celery status` list om-worker."""
    # With pre-started kernels the Python tasks are listed in the background at start-up.
    w = worker(broker.url, [q], concurrency=2, extra=["--kernel-pool", "1"])
    node = w.nodename
    wait_until(lambda: "python tasks (one fresh child process per task)" in w.log(), 120,
               "the Python tasks listed")
    ping, queues, stats, registered, status = celery_cli(
        tmp_path, broker, mongo,
        ("inspect", "ping", "-d", node, "--timeout", "10"),
        ("inspect", "active_queues", "-d", node, "--timeout", "10"),
        ("inspect", "stats", "-d", node, "--timeout", "10"),
        ("inspect", "registered", "-d", node, "--timeout", "10"),
        # `status` asks every node and so always waits its whole timeout
        ("status", "--timeout", "5"))
    rc, out = ping
    assert rc == 0 and f"{node}: OK" in out and "pong" in out, out
    rc, out = queues
    assert rc == 0 and f"'name': '{q}'" in out and "'type': 'direct'" in out, out
    rc, out = stats
    assert rc == 0 and '"max-concurrency": 2' in out and '"processes"' in out and '"uptime"' in out, out
    rc, out = registered
    assert rc == 0 and "omegaml.tasks.omega_ping" in out, out
    # omega|ml's Python tasks too; Celery's builtins are left out, as `registered` does by default
    assert "omegaml.tasks.omega_fit" in out and "run_omega_script" in out, out
    assert "celery.chord_unlock" not in out, out
    rc, out = status
    assert rc == 0 and f"{node}: OK" in out, out


def test_inspect_payload_shapes(broker, worker, client_factory, q):
    """Payloads as Celery's worker sends them: active_queues is Queue.as_dict, stats carries what
    omega|ml reads, unknown commands get kombu's KeyError reply."""
    from kombu import Exchange, Queue
    w = worker(broker.url, [q], concurrency=3)
    app = client_factory(broker.url).app
    queues = inspect(app, w.nodename, "active_queues")
    assert queues == [Queue(q, Exchange(q, "direct"), q).as_dict(recurse=True)], queues
    stats = inspect(app, w.nodename, "stats")
    assert stats["pool"]["max-concurrency"] == 3 and isinstance(stats["pool"]["processes"], list), stats
    assert isinstance(stats["clock"], str) and isinstance(stats["uptime"], int), stats
    assert stats["prefetch_count"] == 12 and "password" not in str(stats["broker"]), stats
    assert inspect(app, w.nodename, "active") == []
    reply = app.control.broadcast("no_such_command", destination=[w.nodename], reply=True, timeout=10)
    assert reply == [{w.nodename: {"error": "KeyError('no_such_command')"}}], reply
    # a non-matching destination gets no reply from us
    assert not app.control.ping(destination=["nobody@nowhere"], timeout=2)


def test_om_runtime_discovery(broker, worker, q, om_factory):
    """om.runtime.labels()/workers()/stats() include om-worker; status() and events.latest(), which
    wait for a heartbeat, are in test_runtime_status.py."""
    w = worker(broker.url, [q], concurrency=2)
    om = om_factory(broker.url)
    rt = om.runtime
    labels = rt.labels()
    assert labels.get(w.nodename) == [q], labels
    workers = rt.workers()
    assert workers.get(w.nodename) == [], workers
    stats = rt.stats()
    assert stats[w.nodename]["pool"]["max-concurrency"] == 2, stats


def test_revoke_queued_eta_task(broker, worker, client_factory, q):
    """A revoked ETA task held by the worker is settled at once: REVOKED for the client, message acked."""
    w = worker(broker.url, [q])
    client = client_factory(broker.url)
    res = client.ping(q, countdown=120)
    wait_until(lambda: any(s["request"]["id"] == res.id
                           for s in (inspect(client.app, w.nodename, "scheduled", timeout=3) or [])),
               30, "the ETA task shows in inspect().scheduled()")
    client.app.control.revoke(res.id)
    res.get(timeout=30, propagate=False)
    assert res.state == "REVOKED", res.state
    assert res.id in inspect(client.app, w.nodename, "revoked")
    wait_until(lambda: broker.queue_state(q)["ready"] == 0 and broker.queue_state(q)["unacked"] == 0,
               15, "queue empty after the revoke")
    assert "revoked by remote control" in w.log()
    assert w.alive()


def test_add_and_cancel_consumer(broker, worker, client_factory, q, names, check_ping):
    """add_consumer starts consuming a new label at runtime; cancel_consumer stops one."""
    w = worker(broker.url, [q])
    q2 = names.queue()
    client = client_factory(broker.url)
    app = client.app
    reply = app.control.add_consumer(q2, destination=[w.nodename], reply=True, timeout=10)
    assert reply == [{w.nodename: {"ok": f"add consumer {q2}"}}], reply
    assert sorted(x["name"] for x in inspect(app, w.nodename, "active_queues")) == sorted([q, q2])
    check_ping(client.ping(q2).get(timeout=30), w.nodename)
    reply = app.control.cancel_consumer(q, destination=[w.nodename], reply=True, timeout=10)
    assert reply == [{w.nodename: {"ok": f"no longer consuming from {q}"}}], reply
    assert [x["name"] for x in inspect(app, w.nodename, "active_queues")] == [q2]
    res = client.ping(q)
    time.sleep(3)
    assert res.state == "PENDING", "a cancelled queue is no longer consumed"
    assert broker.queue_state(q)["ready"] == 1


def test_shutdown_command(broker, worker, client_factory, q):
    """`shutdown` broadcast = warm shutdown: the worker exits 0."""
    w = worker(broker.url, [q])
    client_factory(broker.url).app.control.shutdown(destination=[w.nodename])
    wait_until(lambda: not w.alive(), 30, "worker exited after the shutdown command")
    assert w.proc.returncode == 0, w.log_tail()


def test_events_dump_shows_heartbeats(broker, worker, q, mongo, tmp_path):
    """`celery events --dump` (bounded run) shows om-worker's heartbeats."""
    w = worker(broker.url, [q])
    env = worker_env(tmp_path, broker.url, "rpc://", mongo, {"PYTHONUNBUFFERED": "1"})
    out_path = tmp_path / "evdump.log"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([CELERY, "--app", "omegaml.celeryapp", "events", "--dump"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: f"{w.nodename} [" in out_path.read_text(errors="replace")
                       and "heartbeat" in out_path.read_text(errors="replace"), 30,
                       "a heartbeat of om-worker in `celery events --dump`")
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    text = out_path.read_text(errors="replace")
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{w.nodename} [") and "heartbeat" in ln)
    assert "sw_ident=om-worker" in line and "freq=2.0" in line, line


class EventCapture:
    """Celery's EventReceiver in a thread, collecting every event (before the worker sends any)."""

    def __init__(self, app):
        self.events = []
        self.app = app
        self.conn = app.connection()
        self.recv = app.events.Receiver(self.conn, handlers={"*": self.events.append})
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for _ in self.recv.consume(limit=None, timeout=None, wakeup=False):
                self.ready.set()
        except Exception:
            pass

    def close(self):
        self.recv.should_stop = True
        self.thread.join(timeout=10)
        self.conn.release()


def test_task_events_with_E(broker, worker, client_factory, q, check_ping):
    """With -E: task-received/started/succeeded for the task; worker-online/heartbeat always."""
    client = client_factory(broker.url)
    cap = EventCapture(client.app)
    try:
        time.sleep(2)  # consumer (Redis: PSUBSCRIBE) in place before the worker starts
        w = worker(broker.url, [q], extra=["-E"])
        res = client.ping(q)
        check_ping(res.get(timeout=30), w.nodename)
        wait_until(lambda: any(e.get("type") == "task-succeeded" and e.get("uuid") == res.id
                               for e in list(cap.events)), 20, "task-succeeded event")
        mine = [e for e in list(cap.events) if e.get("hostname") == w.nodename]
        types = [e["type"] for e in mine]
        assert "worker-online" in types, types
        task_types = [e["type"] for e in mine if e.get("uuid") == res.id]
        assert task_types == ["task-received", "task-started", "task-succeeded"], task_types
        received = next(e for e in mine if e["type"] == "task-received")
        assert received["name"] == "omegaml.tasks.omega_ping" and received["args"], received
        clocks = [e["clock"] for e in mine]
        assert clocks == sorted(clocks), clocks
    finally:
        cap.close()


def test_flower_lists_the_worker_slow(broker, worker, q, mongo, tmp_path):
    """Flower (127.0.0.1 only) lists om-worker via /api/workers. Needs `flower` in the venv."""
    try:
        import flower  # noqa: F401  (pinned in scripts/requirements.txt)
    except ImportError as e:
        pytest.fail(f"flower is missing from the venv: run scripts/setup-venv.sh ({e})")
    import json
    import urllib.request
    from conftest import free_port
    w = worker(broker.url, [q])
    port = free_port()
    env = worker_env(tmp_path, broker.url, "rpc://", mongo,
                     {"PYTHONUNBUFFERED": "1", "FLOWER_UNAUTHENTICATED_API": "1"})
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen([CELERY, "--app", "omegaml.celeryapp", "flower", "--address=127.0.0.1",
                             f"--port={port}", "--unix_socket="], env=env, stdout=log, stderr=subprocess.STDOUT)

    def workers():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers?refresh=1", timeout=10) as r:
                return json.loads(r.read())
        except Exception:
            return None

    try:
        data = wait_until(lambda: (lambda d: d if d and w.nodename in d else None)(workers()), 60,
                          "om-worker in Flower's /api/workers", interval=1)
        assert any(x["name"] == q for x in data[w.nodename].get("active_queues", [])), data[w.nodename]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


# ---------------------------------------------------------------------------------------------
# Issue 15 item 4: the remaining control commands, answered as Celery 5.7's worker answers them
# (celery/worker/control.py), with their effect.
# ---------------------------------------------------------------------------------------------

SUPPORT = __import__("pathlib").Path(__file__).resolve().parent / "support"
SLEEPS = "om_test_tasks.tasks.sleeps"


def control(app, node, method, timeout=10, **arguments):
    """One control command with a reply from `node`: its payload (None if it did not answer)."""
    replies = app.control.broadcast(method, arguments=arguments, destination=[node], reply=True,
                                    timeout=timeout) or []
    for r in replies:
        if node in r:
            return r[node]
    return None


def tasks_worker(worker, broker, q, tmp_path, concurrency, extra=()):
    """An om-worker that runs the test tasks (tests/interop/support/om_test_tasks), as an operator
    registers them with omega|ml (OMEGA_CELERY_IMPORTS), their names listed (for time_limit and
    rate_limit, which answer 'unknown task' for a name the worker does not have)."""
    conf = tmp_path / "omega-config.yml"
    conf.write_text("OMEGA_CELERY_IMPORTS:\n" + "".join(
        f"  - {m}\n" for m in ["omegaml", "omegaml.notebook", "omegaml.backends.package",
                               "omegaml.backends.monitoring", "om_test_tasks"]))
    w = worker(broker.url, [q], concurrency=concurrency, extra=["--kernel-pool", "0", *extra],
               env_extra={"PYTHONPATH": str(SUPPORT), "OMEGA_CONFIG_FILE": str(conf)})
    wait_until(lambda: "python tasks (one fresh child process per task)" in w.log(), 120,
               "the Python tasks listed")
    return w


def run_sleeps(client, q, secs, n, timeout=120):
    """n `sleeps(secs)` sent at once; their results (start/end wall-clock times), all SUCCESS."""
    results = [client.send(SLEEPS, q, args=(secs,)) for _ in range(n)]
    out = []
    for r in results:
        out.append(r.get(timeout=timeout))
        assert r.state == "SUCCESS", r.state
    return out


def overlap(a, b):
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_pool_grow_shrink_time_limit_rate_limit(broker, worker, client_factory, q, tmp_path):
    """pool_grow/pool_shrink change how many tasks run at once, live, without losing or interrupting
    one; time_limit and rate_limit apply to later tasks of that name; replies as Celery's."""
    w = tasks_worker(worker, broker, q, tmp_path, concurrency=1, extra=["--prefetch-multiplier", "1"])
    node = w.nodename
    client = client_factory(broker.url)
    app = client.app

    # -c 1, prefetch 1 × 1: one running (acked at start), one prefetched, two left on the queue.
    four = [client.send(SLEEPS, q, args=(12,)) for _ in range(4)]
    wait_until(lambda: len(inspect(app, node, "active", timeout=3) or []) == 1, 60, "one task running")
    wait_until(lambda: broker.queue_state(q)["ready"] == 2, 30, "one running, one prefetched, two ready")
    time.sleep(1)
    assert broker.queue_state(q)["ready"] == 2 and len(inspect(app, node, "active")) == 1

    assert control(app, node, "pool_grow", n=1) == {"ok": "pool will grow"}
    # The second slot takes the prefetched one; the prefetch (now 2 × 1) takes the other two, long
    # before the first task ends (12 s) and would free a place under the old prefetch of 1.
    wait_until(lambda: broker.queue_state(q)["ready"] == 0, 6, "the prefetch followed the concurrency")
    stats = inspect(app, node, "stats")
    assert stats["pool"]["max-concurrency"] == 2 and len(stats["pool"]["processes"]) == 2, stats
    assert stats["prefetch_count"] == 2, stats
    done = [r.get(timeout=120) for r in four]
    assert all(r.state == "SUCCESS" for r in four), [r.state for r in four]
    assert overlap(done[0], done[1]), f"after pool_grow two sleeping tasks run at once: {done}"

    # Shrink while two run: both finish undisturbed; the next ones run one at a time, after them.
    running = [client.send(SLEEPS, q, args=(4,)) for _ in range(2)]
    wait_until(lambda: len(inspect(app, node, "active", timeout=3) or []) == 2, 60, "two tasks running")
    assert control(app, node, "pool_shrink", n=1) == {"ok": "pool will shrink"}
    later = [client.send(SLEEPS, q, args=(1,)) for _ in range(2)]
    first = [r.get(timeout=120) for r in running]
    rest = [r.get(timeout=120) for r in later]
    assert all(r.state == "SUCCESS" for r in running + later), [r.state for r in running + later]
    assert all(x["end"] - x["start"] >= 3.9 for x in first), f"the running ones were not cut short: {first}"
    assert not overlap(*rest), f"after pool_shrink one at a time: {rest}"
    assert min(x["start"] for x in rest) >= min(x["end"] for x in first) - 0.05, (first, rest)
    stats = inspect(app, node, "stats")
    assert stats["pool"]["max-concurrency"] == 1 and stats["prefetch_count"] == 1, stats
    # Below one slot: refused, nothing changed.
    reply = control(app, node, "pool_shrink", n=1)
    assert set(reply) == {"error"} and "shrink" in reply["error"], reply
    assert inspect(app, node, "stats")["pool"]["max-concurrency"] == 1

    # time_limit: later sleeps get the limits; unknown names are refused as Celery does.
    assert control(app, node, "time_limit", task_name="no.such.task", soft=1, hard=2) == \
        {"error": "unknown task"}
    assert control(app, node, "time_limit", task_name=SLEEPS, soft=1.0, hard=3.0) == \
        {"ok": "time limits set successfully"}
    t0 = time.monotonic()
    r = client.send(SLEEPS, q, args=(20,))
    r.get(timeout=60, propagate=False)
    assert r.state == "FAILURE" and "TimeLimitExceeded" in type(r.result).__name__, (r.state, r.result)
    assert time.monotonic() - t0 < 15, "the 1 s soft limit ended the 20 s sleep"
    assert control(app, node, "time_limit", task_name=SLEEPS, soft=None, hard=None) == \
        {"ok": "time limits set successfully"}

    # rate_limit: starts spaced by the rate, even with free slots.
    assert control(app, node, "pool_grow", n=2) == {"ok": "pool will grow"}
    assert control(app, node, "rate_limit", task_name=SLEEPS, rate_limit="20/m") == \
        {"ok": "new rate limit set successfully"}
    assert f"{SLEEPS} [rate_limit=20/m]" in inspect(app, node, "registered")
    starts = sorted(x["start"] for x in run_sleeps(client, q, 0, 3))
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(g >= 2.5 for g in gaps), f"20/m = one start every 3 s: gaps {gaps}"
    reply = control(app, node, "rate_limit", task_name=SLEEPS, rate_limit="x/m")
    assert reply == {"error": "Invalid rate limit string: ValueError(\"could not convert string to float: 'x'\")"}, reply
    assert control(app, node, "rate_limit", task_name=SLEEPS, rate_limit=None) == \
        {"ok": "rate limit disabled successfully"}
    starts = sorted(x["start"] for x in run_sleeps(client, q, 0, 3))
    assert starts[-1] - starts[0] < 2.5, f"no rate limit any more: {starts}"
    assert w.alive()


def test_conf_report_aliases_and_unsupported_pool_commands(broker, worker, client_factory, q, mongo, tmp_path):
    """conf (alias dump_conf) has the keys omega|ml's Celery worker answers with and no password;
    report is a bug-report text; Celery's dump_* aliases answer as their commands; autoscale and
    pool_restart answer as Celery's worker without an autoscaler / pool restarts; query_task says
    'scheduled' for an ETA-held task; a wrong argument type is an error reply, not a crash."""
    from celery.utils.serialization import jsonify
    w = worker(broker.url, [q], concurrency=2)
    node = w.nodename
    client = client_factory(broker.url)
    app = client.app

    conf = inspect(app, node, "conf")
    # The Python worker answers `app.conf.table(with_defaults=False)` of omega|ml's Celery config.
    celery_keys = set(jsonify(app.conf.table(with_defaults=False)))
    assert celery_keys <= set(conf), sorted(celery_keys - set(conf))
    assert conf["CELERYD_CONCURRENCY"] == 2 and conf["CELERYD_PREFETCH_MULTIPLIER"] == 4, conf
    assert conf["CELERY_ACKS_LATE"] is False and conf["CELERY_QUEUES"] == [q], conf
    if broker.kind == "amqp":
        assert conf["BROKER_URL"] == "amqp://guest:********@127.0.0.1:5672//", conf["BROKER_URL"]
    assert ":guest@" not in str(conf)
    assert control(app, node, "dump_conf") == conf
    report = inspect(app, node, "report")
    assert set(report) == {"ok"} and "software -> om-worker:" in report["ok"], report
    assert "BROKER_URL" in report["ok"] and ":guest@" not in report["ok"], report

    # Without an autoscaler / pool restarts Celery raises; kombu answers repr(exc).
    assert control(app, node, "autoscale", max=4, min=1) == {"error": repr(ValueError("Autoscale not enabled"))}
    assert control(app, node, "pool_restart") == {"error": repr(ValueError("Pool restarts not enabled"))}
    reply = control(app, node, "pool_grow", n="two")
    assert set(reply) == {"error"} and "TypeError" in reply["error"], reply
    assert inspect(app, node, "stats")["pool"]["max-concurrency"] == 2

    res = client.ping(q, countdown=120)
    wait_until(lambda: len(inspect(app, node, "scheduled", timeout=3) or []) == 1, 30, "the ETA task held")
    assert control(app, node, "dump_schedule") == inspect(app, node, "scheduled")
    qt = (app.control.inspect(destination=[node], timeout=10).query_task(res.id) or {}).get(node)
    assert qt[res.id][0] == "scheduled" and qt[res.id][1]["id"] == res.id, qt
    for alias, command in [("dump_tasks", "registered"), ("dump_reserved", "reserved"),
                           ("dump_active", "active")]:
        assert control(app, node, alias) == inspect(app, node, command), alias
    app.control.revoke(res.id)
    res.get(timeout=30, propagate=False)
    assert control(app, node, "dump_revoked") == [res.id]

    # What `om runtime celery control pool_grow N` runs: Celery's CLI on omega|ml's app.
    (rc, out), = celery_cli(tmp_path, broker, mongo, ("control", "pool_grow", "2", "-d", node, "--timeout", "10"))
    assert rc == 0 and f"{node}: OK" in out and "pool will grow" in out, out
    assert inspect(app, node, "stats")["pool"]["max-concurrency"] == 4
    assert w.alive()


def test_disable_enable_events_and_heartbeat(broker, worker, client_factory, q, check_ping):
    """disable_events stops task-* events, enable_events brings them back (replies as Celery's);
    `heartbeat` sends a worker-heartbeat at once."""
    client = client_factory(broker.url)
    cap = EventCapture(client.app)
    try:
        time.sleep(2)  # consumer (Redis: PSUBSCRIBE) in place before the worker starts
        w = worker(broker.url, [q], extra=["-E"])
        node, app = w.nodename, client.app

        def task_events(task_id):
            return [e["type"] for e in list(cap.events) if e.get("uuid") == task_id]

        res = client.ping(q)
        check_ping(res.get(timeout=30), node)
        wait_until(lambda: "task-succeeded" in task_events(res.id), 20, "task events with -E")
        assert control(app, node, "enable_events") == {"ok": "task events already enabled"}
        assert control(app, node, "disable_events") == {"ok": "task events disabled"}
        assert control(app, node, "disable_events") == {"ok": "task events already disabled"}
        quiet = client.ping(q)
        check_ping(quiet.get(timeout=30), node)
        time.sleep(2)
        assert task_events(quiet.id) == [], task_events(quiet.id)
        assert control(app, node, "enable_events") == {"ok": "task events enabled"}
        loud = client.ping(q)
        check_ping(loud.get(timeout=30), node)
        wait_until(lambda: "task-succeeded" in task_events(loud.id), 20, "task events again")

        def heartbeats():
            return [e for e in list(cap.events) if e.get("hostname") == node and e["type"] == "worker-heartbeat"]

        before = len(heartbeats())
        t0 = time.monotonic()
        for _ in range(5):
            app.control.heartbeat(destination=[node])
        # Five asked for within a second: the regular ones come every 2 s.
        wait_until(lambda: len(heartbeats()) - before >= 5, 10, "five requested heartbeats")
        assert time.monotonic() - t0 < 5
    finally:
        cap.close()


def test_replies_match_celerys_worker(worker, client_factory, names, mongo, tmp_path):
    """The same commands to om-worker and to omega|ml's Python Celery worker (prefork, no -E, no
    autoscaler; heartbeats on, so it has an event dispatcher) on RabbitMQ: the same replies."""
    from conftest import AMQP_URL, HOSTNAME, Broker, WorkerProc, short_id, wait_ready
    broker = Broker("amqp")
    om = worker(broker.url, [names.queue()], concurrency=2)
    py_q = names.queue()
    py_name = f"omwpy-{short_id()}@%h"
    wdir = tmp_path / "py-worker"
    wdir.mkdir()
    py = WorkerProc([str(VENV / "bin" / "celery"), "--app", "omegaml.celeryapp", "worker", "-Q", py_q, "-c", "2",
                     "-n", py_name, "-l", "info", "--without-gossip", "--without-mingle"],
                    worker_env(wdir, AMQP_URL, "rpc://", mongo, {"C_FORCE_ROOT": "1"}), wdir / "celery.log",
                    py_name.replace("%h", HOSTNAME))
    py.impl = "python"
    try:
        wait_ready(py, timeout=120)
        app = client_factory(broker.url).app
        ping = "omegaml.tasks.omega_ping"
        commands = [
            ("pool_grow", {"n": 1}), ("pool_shrink", {"n": 1}),
            ("time_limit", {"task_name": ping, "soft": 10.0, "hard": 20.0}),
            ("time_limit", {"task_name": "no.such.task", "soft": 1.0, "hard": 2.0}),
            ("rate_limit", {"task_name": ping, "rate_limit": "10/m"}),
            ("rate_limit", {"task_name": ping, "rate_limit": "x/m"}),
            ("rate_limit", {"task_name": ping, "rate_limit": "5/d"}),
            ("rate_limit", {"task_name": "no.such.task", "rate_limit": "1/s"}),
            ("autoscale", {"max": 4, "min": 1}), ("pool_restart", {}),
            ("enable_events", {}), ("enable_events", {}), ("disable_events", {}), ("disable_events", {}),
            ("heartbeat", {}), ("query_task", {"ids": ["no-such-id"]}), ("dump_revoked", {}),
            ("dump_schedule", {}), ("dump_reserved", {}), ("dump_active", {}),
        ]
        diffs = []
        for method, arguments in commands:
            mine = control(app, om.nodename, method, **arguments)
            theirs = control(app, py.nodename, method, **arguments)
            if mine != theirs:
                diffs.append(f"{method} {arguments}: om-worker {mine!r} != celery {theirs!r}")
        assert not diffs, "\n".join(diffs)
        # registered shows the rate limit the same way (set above, then not disabled).
        assert f"{ping} [rate_limit=10/m]" in control(app, om.nodename, "registered")
        assert f"{ping} [rate_limit=10/m]" in control(app, py.nodename, "registered")
        # conf: every key the Python worker answers with.
        py_conf = control(app, py.nodename, "conf")
        missing = set(py_conf) - set(control(app, om.nodename, "conf"))
        assert not missing, {k: py_conf[k] for k in missing}
        assert control(app, om.nodename, "stats")["pool"]["max-concurrency"] == \
            control(app, py.nodename, "stats")["pool"]["max-concurrency"] == 2
    finally:
        py.terminate()
        broker.cleanup([py_q], [])
