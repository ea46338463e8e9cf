"""Deleting test/bench queues from the local brokers: kombu's layout on RabbitMQ and on Redis.

Plain Python (no pytest): used by tests/interop/conftest.py (`Broker.cleanup`) and bench/common.py.
"""
import json

REDIS_SEP = "\x06\x16"  # kombu's Redis priority-queue separator
CONNECT_TIMEOUT = 5  # seconds; kombu's and redis-py's default, stated for the bench


def redis_connect(url):
    import redis
    return redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT)


def redis_queue_keys(queue):
    """The Redis lists kombu keeps for a queue: the queue itself and its priority steps 3, 6, 9."""
    return [queue] + [f"{queue}{REDIS_SEP}{p}" for p in (3, 6, 9)]


def redis_unacked(r, queue):
    """delivery tags in kombu's `unacked` hash whose routing key is `queue`."""
    tags = []
    for tag, raw in r.hscan_iter("unacked"):
        try:
            envelope, exchange, routing_key = json.loads(raw)
        except Exception:
            continue
        if routing_key == queue:
            tags.append(tag)
    return tags


def delete_queues(kind, url, names, drop_unacked=False):
    """Delete queues `names` and their exchanges (RabbitMQ), or their lists and kombu bookkeeping
    (Redis: binding sets, binding deadlines and, with `drop_unacked`, their entries in kombu's
    `unacked` hash/index). Errors of single deletions on RabbitMQ are ignored."""
    names = [n for n in names if n]
    if not names:
        return
    if kind == "amqp":
        from kombu import Connection
        with Connection(url, connect_timeout=CONNECT_TIMEOUT) as c:
            for n in names:
                for op in ("queue_delete", "exchange_delete"):
                    ch = c.channel()
                    try:
                        getattr(ch, op)(n)
                    except Exception:
                        pass
                    finally:
                        try:
                            ch.close()
                        except Exception:
                            pass
        return
    r = redis_connect(url)
    for n in names:
        r.delete(*redis_queue_keys(n), f"_kombu.binding.{n}", f"_kombu.binding_permanent.{n}")
        r.zrem("_kombu.binding_deadlines", n)
        if drop_unacked:
            tags = redis_unacked(r, n)
            if tags:
                r.hdel("unacked", *tags)
                r.zrem("unacked_index", *tags)
    # binding members that point at our queues, e.g. the rpc reply queue bound elsewhere
    wanted = tuple((REDIS_SEP + n).encode() for n in names)
    for key in r.scan_iter("_kombu.binding*"):
        if r.type(key) != b"set":
            continue
        for m in r.smembers(key):
            if m.endswith(wanted):
                r.srem(key, m)
