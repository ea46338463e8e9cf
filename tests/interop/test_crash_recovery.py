"""Worker lifecycle: SIGKILL while holding unacked messages, and SIGTERM warm shutdown (spec §5.8).

Held messages are made deterministic with an ETA: a worker keeps ETA tasks unacked in memory until
their ETA, so right after publishing N pings with an ETA a few seconds ahead, all N sit unacked in the
worker (checked on the broker before acting).
"""
import datetime
import os
import signal
import time

import pytest

from conftest import start_python_worker, wait_until

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



def _held(broker, q, n):
    return (lambda s: s["ready"] == 0 and s["unacked"] == n)(broker.queue_state(q))


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_dead_workers_held_messages_return_within_its_lease_not_the_visibility_timeout(
        broker, worker, client_factory, names, tmp_path, mongo, check_ping):
    """Redis (issue 15): kombu leaves the messages a dead worker held — prefetched, waiting for their
    ETA — in `unacked` until the visibility timeout (1 h). om-worker's holder lease brings them back
    within about `--lease-seconds`, while messages held by live workers stay where they are: a live
    om-worker's and a live Python Celery worker's (which knows nothing of holder leases) are never
    restored early. All workers keep kombu's default visibility timeout (3600 s)."""
    q_dead, q_live, q_py = names.queue("omw-dead"), names.queue("omw-live"), names.queue("omw-py")
    lease = ["--lease-seconds", "3", "--prefetch-multiplier", "8"]
    client = client_factory(broker.url, "rpc://")
    far = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=600)

    started = []
    py = start_python_worker(broker.url, q_py, mongo, tmp_path, started)
    try:
        live = worker(broker.url, [q_live], concurrency=1, extra=lease)
        dead = worker(broker.url, [q_dead], concurrency=1, extra=lease)
        held_live = [client.ping(q_live, args=[i], eta=far) for i in range(N)]
        held_py = [client.ping(q_py, args=[i], eta=far) for i in range(N)]
        eta, results = _publish_eta_pings(client, q_dead, delay=3)
        for qq in (q_dead, q_live, q_py):
            _wait_held(broker, qq, N)
        dead.kill()
        assert dead.returncode == -9, dead.returncode
        assert broker.queue_state(q_dead) == {"exists": False, "ready": 0, "unacked": N}

        # The live om-worker's sweep (lease 3 s, every second) finds the dead holder: the N messages
        # are back on their queue long before the 3600 s visibility timeout (the wait's bound).
        wait_until(lambda: broker.queue_state(q_dead)["ready"] == N, 30,
                   f"the {N} messages the killed worker held back on {q_dead}")
        assert "stopped renewing its holder lease" in live.log(), live.log_tail()

        runner = worker(broker.url, [q_dead], concurrency=1, extra=lease)
        for i, r in enumerate(results):
            check_ping(r.get(timeout=60), runner.nodename, args=[i], kwargs={"a": 1})

        # Three more leases: what live workers hold is untouched.
        time.sleep(9)
        assert _held(broker, q_live, N), broker.queue_state(q_live)
        assert _held(broker, q_py, N), broker.queue_state(q_py)
        assert not any(r.ready() for r in held_live + held_py), "a held ETA task ran early"
        assert live.alive() and py.alive()
    finally:
        for w in started:
            w.terminate(grace=20)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_worker_paused_past_its_lease_does_not_run_what_was_restored(
        broker, worker, client_factory, q, check_ping):
    """Redis: a worker stopped (SIGSTOP) past its holder lease is declared dead and what it held goes
    back to the queue, where another worker runs it. When the first resumes it must not run those
    deliveries too: its ack fails (tombstone), it continues under a new holder id, and each task ran
    exactly once."""
    lease = ["--lease-seconds", "3", "--prefetch-multiplier", "8"]
    paused = worker(broker.url, [q], concurrency=1, extra=lease)
    client = client_factory(broker.url, "rpc://")
    eta, results = _publish_eta_pings(client, q, delay=6)
    _wait_held(broker, q, N)
    os.kill(paused.proc.pid, signal.SIGSTOP)
    try:
        other = worker(broker.url, [q], concurrency=1, extra=lease)
        for i, r in enumerate(results):
            check_ping(r.get(timeout=60), other.nodename, args=[i], kwargs={"a": 1})
    finally:
        os.kill(paused.proc.pid, signal.SIGCONT)
    wait_until(lambda: "holder lease" in paused.log() and "new holder id" in paused.log(), 20,
               "the resumed worker noticing it was declared dead")
    wait_until(lambda: paused.log().count("ack failed, not running") >= N, 20,
               f"the resumed worker refusing its {N} restored deliveries")
    ran_there = [ln for ln in paused.log().splitlines() if "task succeeded" in ln]
    assert not any(r.id in ln for ln in ran_there for r in results), "the resumed worker ran a restored task"
    assert paused.alive() and other.alive()
    # Both still serve the queue.
    assert client.ping(q).get(timeout=60)
