"""Worker lifecycle: SIGKILL while holding unacked messages, and SIGTERM warm shutdown (spec §5.8).

Held messages are made deterministic with an ETA: a worker keeps ETA tasks unacked in memory until
their ETA, so right after publishing N pings with an ETA a few seconds ahead, all N sit unacked in the
worker (checked on the broker before acting).
"""
import datetime
import time

from conftest import wait_until

# This module runs no notebook: its workers pre-start no kernels (see conftest's `worker`).
WORKER_KERNELS = False

N = 5


def _publish_eta_pings(client, q, delay):
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=delay)
    return eta, [client.ping(q, args=[i], eta=eta) for i in range(N)]


def _wait_held(broker, q, n):
    wait_until(lambda: (lambda s: s["ready"] == 0 and s["unacked"] == n)(broker.queue_state(q)), 15,
               f"all {n} ETA messages of {q} delivered to the worker and held unacked")


def test_sigkill_with_unacked_messages_then_second_worker(broker, worker, client_factory, q, check_ping):
    """SIGKILL a worker that holds N unacked ETA messages; a second worker (other nodename) gets them
    all and all N results reach the client. RabbitMQ requeues on connection loss; on Redis the second
    worker's visibility sweep (--visibility-timeout 2 --restore-interval 1) restores kombu's `unacked`."""
    w1 = worker(broker.url, [q], concurrency=1, extra=["--prefetch-multiplier", "8"])
    client = client_factory(broker.url, "rpc://")
    eta, results = _publish_eta_pings(client, q, delay=8)
    _wait_held(broker, q, N)
    assert not any(r.ready() for r in results), "a task ran before its ETA"
    w1.kill()  # SIGKILL, this PID only
    assert w1.returncode == -9, w1.returncode

    if broker.kind == "amqp":
        wait_until(lambda: broker.queue_state(q)["ready"] == N, 15, f"RabbitMQ requeued {N} messages of {q}")
        extra = []
    else:
        state = broker.queue_state(q)
        assert state["unacked"] == N, f"kombu unacked records of the killed worker: {state}"
        extra = ["--visibility-timeout", "2", "--restore-interval", "1"]
    # start the second worker once the ETA has passed, so it runs what it gets right away
    time.sleep(max(0.0, (eta - datetime.datetime.now(datetime.timezone.utc)).total_seconds() + 0.5))
    w2 = worker(broker.url, [q], concurrency=1, extra=extra)
    assert w2.nodename != w1.nodename
    for i, r in enumerate(results):
        check_ping(r.get(timeout=60), w2.nodename, args=[i], kwargs={"a": 1})
    wait_until(lambda: broker.queue_state(q) in ({"exists": True, "ready": 0, "unacked": 0},
                                                 {"exists": False, "ready": 0, "unacked": 0}),
               15, f"{q} drained and nothing left unacked")
    assert w2.alive()


def test_sigterm_warm_shutdown_idle(broker, worker, client_factory, q, check_ping):
    """SIGTERM on an idle worker that has served a task: warm shutdown, exit status 0."""
    w = worker(broker.url, [q])
    check_ping(client_factory(broker.url, "rpc://").ping(q).get(timeout=30), w.nodename)
    rc = w.terminate(grace=20)
    assert rc == 0, f"exit status {rc} after SIGTERM (expected 0, warm shutdown)"
    assert "panicked" not in w.log(), "panic in the worker log"


def test_sigterm_returns_held_messages(broker, worker, client_factory, q):
    """SIGTERM while N ETA messages are held unacked: the worker exits 0 without waiting for the ETA,
    and the messages are back in the queue, not acked (RabbitMQ: requeued on close; Redis: restored to
    the list, like kombu's restore on channel close) and not executed."""
    w = worker(broker.url, [q], concurrency=1, extra=["--prefetch-multiplier", "8"])
    client = client_factory(broker.url, "rpc://")
    _eta, results = _publish_eta_pings(client, q, delay=120)
    _wait_held(broker, q, N)
    t0 = time.monotonic()
    rc = w.terminate(grace=20)
    assert rc == 0, f"exit status {rc} after SIGTERM"
    assert time.monotonic() - t0 < 20
    wait_until(lambda: (lambda s: s["ready"] == N and s["unacked"] == 0)(broker.queue_state(q)), 15,
               f"the {N} held messages back in {q} as ready")
    assert not any(r.ready() for r in results), "an ETA task ran or got a result during shutdown"

