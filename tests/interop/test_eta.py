"""ETA/countdown messages held by the worker do not count against its prefetch limit.

Celery raises the channel's QoS for every message it holds for an ETA (`qos.increment_eventually`),
so a handful of far-future countdowns cannot starve a worker. om-worker does the same: with
`-c 1 --prefetch-multiplier 1` (prefetch 1), three pings held for an hour must not stop a fourth,
immediate ping from being received and answered. Without the QoS increment the worker would hold
the first countdown message and never receive anything else.
"""
import pytest

from conftest import wait_until

# This module runs no notebook: its workers pre-start no kernels (see conftest's `worker`).
WORKER_KERNELS = False


@pytest.mark.parametrize("backend", ["redis://127.0.0.1:6379/0"], ids=["be-redis"])
def test_held_eta_messages_do_not_starve_the_worker(broker, backend, worker, client_factory, q, check_ping):
    w = worker(broker.url, [q], backend=backend, concurrency=1, extra=["--prefetch-multiplier", "1"])
    client = client_factory(broker.url, backend)
    held = [client.ping(q, countdown=3600) for _ in range(3)]
    # all three reach the worker and are held (with prefetch 1 only the first would, without the
    # QoS increment)
    wait_until(lambda: _scheduled(w) >= 3, 30, "three countdown messages held by the worker")
    res = client.ping(q, args=[7, 8])
    check_ping(res.get(timeout=30), w.nodename, args=(7, 8))
    for r in held:
        assert r.state == "PENDING", f"a countdown ping ran early: {r.id} {r.state}"
        r.revoke()


def _scheduled(w):
    """How many tasks the worker reports as scheduled (ETA-held), via `celery inspect scheduled`."""
    from celery import Celery
    app = Celery("probe", broker=w.env["OMEGA_BROKER"])
    try:
        reply = app.control.inspect(destination=[w.nodename], timeout=2).scheduled() or {}
    finally:
        app.close()
    return len(reply.get(w.nodename, []))
