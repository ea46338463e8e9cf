"""`om.runtime.status()` and `om.runtime.events.latest()` with om-worker, on RabbitMQ and Redis (issue 15).

omega|ml 0.18's `CeleryEventStream.latest()` loops `EventReceiver.capture(limit=1, timeout=5,
wakeup=False)` until a `worker-heartbeat` arrives. On RabbitMQ each capture waits up to a second for
an event on its own queue, so a worker heartbeating every 2 s is seen at once. On Redis kombu's
capture ends on the first readable pub/sub reply, which is the subscription's own confirmation: a
heartbeat is seen only if it lands in the fraction of a millisecond between the subscription and that
read. The loop reconnects ~80 times a second, and with a heartbeat every 2 s `status()` takes 20-200 s
with omega|ml's Python worker as with om-worker (measured: the Python worker 26 s and 32 s; both
workers side by side were caught equally often — nothing on the wire differs). The worker cannot
change the client's loop; it can heartbeat more often (`--heartbeat-interval`, Celery's flag), which
these tests use on Redis, and it answers the `heartbeat` broadcast that clients capturing with
`wakeup=True` (Celery's default, e.g. `celery events`) send, at once and again 250 ms later: kombu's
Redis transport sends that broadcast before it subscribes, so the first answer usually reaches nobody.
"""
import time

import pytest

from conftest import omega_celery_app

# No notebook runs here: the workers start no kernels (see conftest's `worker`).
WORKER_KERNELS = False


def _interval(broker):
    # Redis: frequent enough that omega|ml's subscription loop catches one within seconds.
    return ["--heartbeat-interval", "0.02"] if broker.kind == "redis" else []


def _latest_of(om, nodename, deadline_s):
    """events.latest() until it returns a heartbeat of `nodename` (other workers may share the
    broker); each call returns the latest heartbeat of any worker."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        ev = om.runtime.events.latest()
        if ev.get("hostname") == nodename:
            return ev
    pytest.fail(f"no heartbeat of {nodename} from om.runtime.events.latest() in {deadline_s}s")


def test_events_latest_returns_om_workers_heartbeat(broker, worker, q, om_factory):
    w = worker(broker.url, [q], concurrency=2, extra=_interval(broker))
    om = om_factory(broker.url)
    t0 = time.monotonic()
    ev = _latest_of(om, w.nodename, 90)
    took = time.monotonic() - t0
    assert ev["type"] == "worker-heartbeat", ev
    assert ev["sw_ident"] == "om-worker" and len(ev["loadavg"]) == 3, ev
    assert ev["freq"] == (0.02 if broker.kind == "redis" else 2.0), ev
    assert ev["active"] == 0 and ev["processed"] == 0, ev
    print(f"events.latest() on {broker.kind}: {took:.1f}s")


def test_status_lists_om_worker(broker, worker, q, om_factory):
    """The whole `om.runtime.status()`: labels(), stats() and the latest heartbeat, combined."""
    w = worker(broker.url, [q], concurrency=3, extra=_interval(broker))
    om = om_factory(broker.url)
    t0 = time.monotonic()
    status = om.runtime.status()
    took = time.monotonic() - t0
    # Another worker's heartbeat may be the latest; status() still lists every worker of labels().
    assert w.nodename in status, status
    st = status[w.nodename]
    assert st["queues"] == [q] and st["concurrency"] == 3, st
    assert len(st["processes"]) == 3 and st["uptime"] >= 0 and st["processed"] == {}, st
    assert len(st["loadavg"]) == 3, st
    assert took < 120, f"status() took {took:.1f}s"
    print(f"status() on {broker.kind}: {took:.1f}s")


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_waking_receiver_gets_a_heartbeat_at_once(broker, worker, q):
    """Celery's `EventReceiver.capture(wakeup=True)` broadcasts `heartbeat` once it has subscribed:
    om-worker answers with a heartbeat event right away and once more 250 ms later (the first answer
    usually beats the receiver's subscription on Redis), so a client that wakes workers does not wait
    for the next interval.

    The worker heartbeats only every 120 s here, and its start-up heartbeat went out before the
    receiver subscribed (Redis pub/sub keeps nothing): a heartbeat of this worker within 30 s can only
    be the answer to the broadcast. Other workers on the machine's Redis (other test processes) answer
    too; the receiver keeps reading until this one's arrives, so their number does not matter."""
    from celery.events import EventReceiver
    w = worker(broker.url, [q], extra=["--heartbeat-interval", "120"])
    time.sleep(0.5)  # the start-up heartbeat is long gone
    app = omega_celery_app(broker.url, "rpc://")
    got = []
    try:
        with app.connection() as conn:
            recv = EventReceiver(conn, app=app, handlers={})

            def on_heartbeat(event):
                got.append(event)
                if event.get("hostname") == w.nodename:
                    recv.should_stop = True

            recv.handlers["worker-heartbeat"] = on_heartbeat
            try:
                recv.capture(limit=None, timeout=30, wakeup=True)
            except TimeoutError:
                pass
    finally:
        app.close()
    mine = [e for e in got if e.get("hostname") == w.nodename]
    assert mine, f"no heartbeat of {w.nodename} within 30 s of the wake-up broadcast; got {got}"
    assert mine[0]["freq"] == 120.0, mine[0]
