"""Remote control and events: om-worker is visible to the unchanged Celery 5.7 CLI and omega|ml 0.18's
`om.runtime` discovery (labels/workers/stats/status) on RabbitMQ and Redis, and honours revoke,
add_consumer/cancel_consumer and shutdown broadcast over the pidbox."""
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import VENV, omega_celery_conf, wait_until, worker_env

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
    """om.runtime.labels()/workers()/stats()/status() include om-worker (status needs a heartbeat)."""
    w = worker(broker.url, [q], concurrency=2)
    om = om_factory(broker.url)
    rt = om.runtime
    labels = rt.labels()
    assert labels.get(w.nodename) == [q], labels
    workers = rt.workers()
    assert workers.get(w.nodename) == [], workers
    stats = rt.stats()
    assert stats[w.nodename]["pool"]["max-concurrency"] == 2, stats
    if broker.kind == "redis":
        # status() blocks until omega|ml's CeleryEventStream has received a worker-heartbeat, and
        # kombu's Redis event capture takes 15-100 s to deliver the first one, with omega|ml's own
        # Python worker too (measured: 98.7 s for `celery worker`, 14.7 s for om-worker, both
        # publishing every 2 s on /0.celeryev/worker.heartbeat). That the heartbeats are on Redis
        # in the form kombu reads is checked by test_events_dump_shows_heartbeats[redis].
        return
    status = rt.status()
    assert w.nodename in status, status
    st = status[w.nodename]
    assert st["queues"] == [q] and st["concurrency"] == 2 and len(st["loadavg"]) == 3, st


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
