"""Malformed task messages through the real broker, published with kombu's Producer.

Each message carries valid v2 headers (task omega_ping, id, reply_to = the client's oid) and a bad body.
Contract (om-worker): the task id gets a FAILURE result, so the client's AsyncResult(id).get() raises
(rather than timing out); nothing in the body is ever executed; the worker stays up and still answers a
ping; the message is consumed once (queue empty afterwards, no redelivery loop).
(The Python worker differs: it drops undecodable bodies without a result, rejects disallowed content
types without a result, and *executes* pickled REDUCE payloads.)
"""
import os
import pickle

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError

from conftest import wait_until

# This module runs no notebook: its workers pre-start no kernels (see conftest's `worker`).
WORKER_KERNELS = False

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
PICKLE = ("application/x-python-serialize", "binary")


class _Reduce:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _case(kind, marker):
    """(body bytes, content_type, content_encoding) for a malformed-message kind."""
    touch = f"touch {marker}"
    if kind == "garbage_pickle":
        return b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00this is not a pickle\xff\xfe\x00.", *PICKLE
    if kind == "pickle_reduce_os_system":  # the whole body is a REDUCE of os.system
        return pickle.dumps(_Reduce(touch), protocol=4), *PICKLE
    if kind == "pickle_reduce_in_args":  # a well-formed v2 body whose args hold the REDUCE
        return pickle.dumps(((_Reduce(touch),), {}, EMBED), protocol=4), *PICKLE
    if kind == "yaml":
        return (b"- [1, 2]\n- {}\n- {callbacks: null, errbacks: null, chain: null, chord: null}\n",
                "application/x-yaml", "utf-8")
    if kind == "args_not_list_pickle":
        return pickle.dumps((42, {}, EMBED), protocol=4), *PICKLE
    if kind == "args_not_list_json":
        return b'[42, {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]', \
            "application/json", "utf-8"
    raise ValueError(kind)


CASES = ["garbage_pickle", "pickle_reduce_os_system", "pickle_reduce_in_args", "yaml",
         "args_not_list_pickle", "args_not_list_json"]


@pytest.mark.parametrize("kind", CASES)
def test_malformed_message(kind, broker, backend, worker, client_factory, q, tmp_path, check_ping):
    marker = tmp_path / f"pwned-{kind}"
    w = worker(broker.url, [q], backend=backend)
    client = client_factory(broker.url, backend)
    body, ctype, cenc = _case(kind, marker)
    tid, res = client.publish_raw(q, body, content_type=ctype, content_encoding=cenc)

    with pytest.raises(Exception) as ei:
        res.get(timeout=30)
    assert not isinstance(ei.value, CeleryTimeoutError), \
        f"{kind}: no result for task {tid} within 30 s (the worker sent no FAILURE)"
    assert res.state == "FAILURE", f"{kind}: state {res.state} ({ei.value!r})"
    print(f"{kind}: AsyncResult.get() raised {type(ei.value).__module__}.{type(ei.value).__name__}: {ei.value}")

    assert not marker.exists(), f"{kind}: the pickled os.system payload was EXECUTED ({marker} exists)"
    assert w.alive(), f"{kind}: worker exited (rc {w.proc.returncode})"
    check_ping(client.ping(q).get(timeout=30), w.nodename)
    wait_until(lambda: broker.queue_state(q) == {"exists": broker.kind == "amqp", "ready": 0, "unacked": 0},
               10, f"{kind}: queue {q} empty (nothing ready, nothing unacked)")
    assert not marker.exists()
    assert w.alive()
