"""celery-exporter's metrics on om-worker's /metrics, on RabbitMQ and Redis.

A real om-worker with `--metrics-addr`, driven by the unchanged Celery client: a task that
succeeds, one that fails, one revoked before it arrives, one expired, one of an unregistered name; then the
scrape (parsed with prometheus_client's own parser, the library celery-exporter is built on)
must carry each `celery_*` series with celery-exporter's label names and the values those four
tasks give in Celery's worker events. The queue length is read after `cancel_consumer` with
messages waiting. `celery_task_sent_total` is checked with `--beat` (om-worker sends
`execute_scripts` itself). om-worker's own `om_worker_*` series stay.
"""
import re
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import HOSTNAME, PING_TASK, free_port, wait_until

WORKER_KERNELS = False
ROOT = Path(__file__).resolve().parents[2]
UNKNOWN_TASK = "omw.metrics.no_such_task"


def telemetry_celery_names():
    """The celery_* names om-worker declares (src/telemetry.rs CELERY_METRICS constants)."""
    src = (ROOT / "src" / "telemetry.rs").read_text()
    return set(re.findall(r'pub const CELERY_[A-Z_]+: &str = "(celery_[a-z_]+)";', src))


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def samples(text):
    """[(sample name, labels, value)] of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append((s.name, dict(s.labels), s.value))
    return out


def find(smp, metric, /, **labels):
    """The values of the samples called `metric` whose labels are exactly `labels`
    (`labels` may leave out `le`)."""
    return [v for n, ls, v in smp if n == metric
            and {k: x for k, x in ls.items() if k != "le"} == labels]


def one(smp, metric, /, **labels):
    vals = find(smp, metric, **labels)
    assert len(vals) == 1, (metric, labels, vals, [s for s in smp if s[0] == metric])
    return vals[0]


def inspect(app, node, method, timeout=5, **kw):
    replies = getattr(app.control.inspect(destination=[node], timeout=timeout), method)(**kw) or {}
    return replies.get(node)


def test_celery_exporter_series(broker, worker, client_factory, names):
    q = names.queue("met")
    port = free_port()
    w = worker(broker.url, [q], extra=["--metrics-addr", f"127.0.0.1:{port}"])
    host = w.nodename.split("@", 1)[1]
    assert host == HOSTNAME
    client = client_factory(broker.url)

    # Before any task: the worker is up, nothing active, the queue empty.
    smp = samples(scrape(port))
    assert one(smp, "celery_worker_up", hostname=host) == 1
    assert one(smp, "celery_worker_tasks_active", hostname=host) == 0
    assert one(smp, "celery_queue_length", queue_name=q) == 0

    ok = client.ping(q)
    ok.get(timeout=30)
    bad = client.ping(q, kwargs={"exception": True})
    with pytest.raises(Exception, match="omega ping exception"):
        bad.get(timeout=30)
    # Revoked before it is sent: skipped on arrival (Celery's task-revoked).
    tid = names.task_id()
    client.app.control.revoke(tid)
    wait_until(lambda: tid in (inspect(client.app, w.nodename, "revoked") or []), 20,
               "the revoke reached the worker")
    rev = client.app.send_task(PING_TASK, args=[1, 2], queue=q, task_id=tid)
    rev.get(timeout=30, propagate=False)
    assert rev.state == "REVOKED", rev.state
    # Expired on arrival: also task-revoked (expired=True) in Celery.
    gone = client.ping(q, expires=datetime.now(timezone.utc) - timedelta(minutes=5))
    gone.get(timeout=30, propagate=False)
    assert gone.state == "REVOKED", gone.state
    unknown = client.send(UNKNOWN_TASK, q)
    unknown.get(timeout=30, propagate=False)
    assert unknown.state == "FAILURE" and type(unknown.result).__name__ == "NotRegistered", unknown.result

    base = dict(name=PING_TASK, hostname=host, queue_name=q)
    smp = wait_until(
        lambda: (s := samples(scrape(port))) and find(s, "celery_task_rejected_total", name=UNKNOWN_TASK,
                                                      hostname=host, queue_name=q) == [1] and s,
        20, "the unregistered task counted")
    # Every task series exists for each state (0 where it did not happen), as the exporter
    # instantiates them; exactly these values.
    assert one(smp, "celery_task_received_total", **base) == 4
    assert one(smp, "celery_task_started_total", **base) == 2
    assert one(smp, "celery_task_succeeded_total", **base) == 1
    assert one(smp, "celery_task_failed_total", exception="Exception", **base) == 1
    assert one(smp, "celery_task_failed_total", exception="", **base) == 0
    assert one(smp, "celery_task_revoked_total", **base) == 2
    assert one(smp, "celery_task_rejected_total", **base) == 0
    assert one(smp, "celery_task_retried_total", **base) == 0
    # The unregistered task: Celery's worker reports task-failed(NotRegistered), and the message
    # is rejected (dead-lettered); it was never received for execution.
    unk = dict(name=UNKNOWN_TASK, hostname=host, queue_name=q)
    assert one(smp, "celery_task_rejected_total", **unk) == 1
    assert one(smp, "celery_task_failed_total", exception="NotRegistered", **unk) == 1
    assert find(smp, "celery_task_received_total", **unk) in ([], [0])
    # Nothing was published by the worker here.
    assert not [s for s in smp if s[0] == "celery_task_sent_total"]
    # Runtime: successes only, in the exporter's default buckets.
    assert one(smp, "celery_task_runtime_count", **base) == 1
    assert 0 <= one(smp, "celery_task_runtime_sum", **base) < 30
    les = {ls["le"] for n, ls, _ in smp if n == "celery_task_runtime_bucket"
           and ls.get("name") == PING_TASK}
    assert les == {"0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0",
                   "2.5", "5.0", "7.5", "10.0", "+Inf"}, les
    assert one(smp, "celery_worker_up", hostname=host) == 1
    assert one(smp, "celery_worker_tasks_active", hostname=host) == 0
    # Label sets are the exporter's, nothing more.
    for n, ls, _ in smp:
        if n.startswith("celery_task_") and not n.startswith("celery_task_runtime"):
            want = {"name", "hostname", "queue_name"} | ({"exception"} if n == "celery_task_failed_total" else set())
            assert set(ls) == want, (n, ls)
    # om-worker's own series are still there.
    assert one(smp, "om_worker_tasks_received_total", task=PING_TASK, queue=q) == 4
    # Every celery_* name om-worker declares is exported (sent needs a publish: the beat test).
    exported = {re.sub(r"_(bucket|sum|count)$", "", n) for n, _, _ in smp}
    assert telemetry_celery_names() - exported == {"celery_task_sent_total"}, exported

    # Queue length: stop consuming q, leave 3 messages on it; the scrape reads them from the broker.
    reply = client.app.control.cancel_consumer(q, destination=[w.nodename], reply=True, timeout=5)
    assert reply and "ok" in reply[0][w.nodename], reply
    def not_consumed():
        aq = inspect(client.app, w.nodename, "active_queues")
        return aq is not None and not any(x["name"] == q for x in aq)
    wait_until(not_consumed, 20, "q no longer consumed")
    for _ in range(3):
        client.ping(q)
    wait_until(lambda: one(samples(scrape(port)), "celery_queue_length", queue_name=q) == 3, 20,
               "celery_queue_length 3 for the queue")
    assert broker.queue_state(q)["ready"] == 3


def test_task_sent_by_beat(broker, worker, names):
    """`--beat` publishes execute_scripts itself: counted as celery_task_sent_total, and the same
    worker then receives and runs it."""
    q = names.queue("metbeat")
    port = free_port()
    w = worker(broker.url, [q], extra=["--metrics-addr", f"127.0.0.1:{port}",
                                       "--beat", "--beat-interval", "1"])
    host = w.nodename.split("@", 1)[1]
    name = "omegaml.notebook.tasks.execute_scripts"
    lbl = dict(name=name, hostname=host, queue_name=q)
    smp = wait_until(lambda: (s := samples(scrape(port)))
                     and sum(find(s, "celery_task_succeeded_total", **lbl)) >= 1 and s, 60,
                     "an execute_scripts sent by beat ran")
    sent = one(smp, "celery_task_sent_total", **lbl)
    assert sent >= 1 and one(smp, "celery_task_received_total", **lbl) <= sent
    exported = {re.sub(r"_(bucket|sum|count)$", "", n) for n, _, _ in smp}
    assert telemetry_celery_names() <= exported, telemetry_celery_names() - exported


def test_task_sent_by_a_python_task(broker, worker, client_factory, names):
    """A chain of two pings: the first message carries the chain, so omega|ml's Python ping runs
    in a task child and Celery's tracer there publishes the second; the child reports the publish
    (outcome `sent`) and om-worker counts it as celery_task_sent_total."""
    from celery import chain
    q = names.queue("metchain")
    port = free_port()
    w = worker(broker.url, [q], extra=["--metrics-addr", f"127.0.0.1:{port}"])
    host = w.nodename.split("@", 1)[1]
    client = client_factory(broker.url)
    app = client.app
    second_id = names.task_id()
    first = app.signature(PING_TASK, args=(1, 2), options={"queue": q, "task_id": names.task_id()})
    second = app.signature(PING_TASK, options={"queue": q, "task_id": second_id})
    res = chain(first, second).apply_async()
    res.get(timeout=120)
    assert res.id == second_id
    lbl = dict(name=PING_TASK, hostname=host, queue_name=q)
    smp = wait_until(lambda: (s := samples(scrape(port)))
                     and find(s, "celery_task_succeeded_total", **lbl) == [2] and s, 30,
                     "both pings counted")
    assert one(smp, "celery_task_sent_total", **lbl) == 1, "the chain's second element, sent by the child"
    assert one(smp, "celery_task_received_total", **lbl) == 2
    assert "running omega|ml's Python task instead" in w.log()
