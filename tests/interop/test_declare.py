"""Queue declaration compatibility between the Python client and om-worker (no 406 PRECONDITION_FAILED).

The client (kombu) declares, for a label Q: exchange Q (direct, durable), queue Q (durable, not
auto_delete, no arguments) and binding Q->Q with key Q, then publishes to the default exchange with
routing key Q. Whichever side declares first, the other side's declaration must be equivalent.
"""
from conftest import wait_until

# This module runs no notebook: its workers pre-start no kernels (see conftest's `worker`).
WORKER_KERNELS = False

QUEUE_ROW = "{q}\ttrue\tfalse\t[]"  # rabbitmqctl list_queues name durable auto_delete arguments


def _assert_amqp_topology(broker, q, who):
    row = broker.amqp_queue_row(q)
    assert row == QUEUE_ROW.format(q=q), \
        f"after {who}: rabbitmqctl list_queues row {row!r}, expected {QUEUE_ROW.format(q=q)!r}"


def test_client_declares_first(broker, worker, client_factory, q, check_ping):
    """send_task before any worker exists (the client creates the queue), then start the worker."""
    client = client_factory(broker.url, "rpc://")
    res = client.ping(q)
    wait_until(lambda: broker.queue_state(q)["ready"] == 1, 10, f"the ping waiting in {q}")
    if broker.kind == "amqp":
        _assert_amqp_topology(broker, q, "client declared")
    w = worker(broker.url, [q])
    check_ping(res.get(timeout=30), w.nodename)
    assert w.alive(), "worker died after consuming a client-declared queue (406?)"
    if broker.kind == "amqp":
        _assert_amqp_topology(broker, q, "worker declared too")
    # and a second round trip on the live channel (a 406 would have closed it)
    check_ping(client.ping(q).get(timeout=30), w.nodename)


def test_worker_declares_first(broker, worker, client_factory, q, check_ping):
    """Start the worker on a fresh queue (it declares), then the client publishes (declares again)."""
    w = worker(broker.url, [q])
    if broker.kind == "amqp":
        _assert_amqp_topology(broker, q, "worker declared")
    client = client_factory(broker.url, "rpc://")
    res = client.ping(q)  # kombu re-declares queue Q with the client's flags: a mismatch raises here
    check_ping(res.get(timeout=30), w.nodename)
    if broker.kind == "amqp":
        _assert_amqp_topology(broker, q, "client declared too")
    assert w.alive()


def test_worker_declares_exchange_and_binding_like_celery(worker, q):
    """RabbitMQ: like the Python worker, om-worker declares exchange Q (direct, durable, not auto_delete)
    and binds Q->Q with routing key Q, so clients that publish to exchange Q (not only the default
    exchange) reach it."""
    from conftest import Broker
    broker = Broker("amqp")
    worker(broker.url, [q])
    ex = broker.amqp_exchange_row(q)
    assert ex == f"{q}\tdirect\ttrue\tfalse\t[]", f"rabbitmqctl list_exchanges row for {q}: {ex!r}"
    bindings = broker.amqp_bindings(q)
    assert (q, q) in bindings, f"bindings of queue {q}: {bindings}"
