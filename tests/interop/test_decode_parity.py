"""Decode what kombu decodes (issue 13 item 8, and the NaN envelope of item 7), on both brokers.

Each message is published with the real kombu/Celery client as a user's client would send it:
- `send_task(..., compression=...)` with every compression kombu registers in the pinned venv (zlib,
  bzip2, lzma; brotli and zstd are not installed there, so neither side decodes them);
- `serializer="json"` with NaN, ±Infinity and a 100-digit integer in args and kwargs (Python's json
  writes `NaN`/`Infinity` tokens);
- on Redis, a raw publish with `NaN` in application headers, which kombu's Redis envelope carries as
  JSON `NaN` tokens (RabbitMQ refuses such a header table with 541 INTERNAL_ERROR);
- `run_omegaml_job` of a notebook stored in nbformat 3 (nbformat upgrades it to v4 on read).
Expected results are what omega|ml's Python worker returns for the same messages: `omega_ping`'s
echo (as `assert_ping_result` encodes it), and for the v3 job a SUCCESS with an OK run whose cell
printed its output. The same module runs against `celery --app omegaml.celeryapp worker` with
OMW_WORKER_IMPL=python, which is how these expectations were checked. One deliberate difference:
the Python worker stores the v3 job's results as a `python.data` object (an omega|ml 0.18 quirk, see
the test); om-worker stores the v4.5 results notebook that a v4 job gets.
"""
import json
import math
import uuid

import pytest

from conftest import IMPL, PING_TASK, wait_until

# Only the nbformat-3 test runs a notebook; it starts its kernel on demand.
WORKER_KERNELS = False

JOB = "omegaml.notebook.tasks.run_omegaml_job"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
BIG = 10 ** 100


def _drained(broker, q):
    wait_until(lambda: broker.queue_state(q) == {"exists": broker.kind == "amqp", "ready": 0, "unacked": 0},
               15, f"queue {q} empty (nothing ready, nothing unacked)")


@pytest.mark.parametrize("compression", ["zlib", "bzip2", "lzma"])
def test_compressed_task_runs(compression, broker, worker, client_factory, q, check_ping):
    w = worker(broker.url, [q])
    client = client_factory(broker.url)
    res = client.ping(q, args=(1, 2), compression=compression)
    check_ping(res.get(timeout=30), w.nodename)
    _drained(broker, q)


def test_json_nan_and_big_int_args(broker, worker, client_factory, q):
    w = worker(broker.url, [q])
    client = client_factory(broker.url)
    res = client.send(PING_TASK, q, args=(float("nan"), float("inf"), -float("inf"), BIG),
                      kwargs={"x": float("nan"), "big": -BIG}, serializer="json")
    value = res.get(timeout=30)
    assert value["worker"] == w.nodename, value
    args = list(value["args"])
    assert math.isnan(args[0]) and args[1:] == [math.inf, -math.inf, BIG], value
    assert math.isnan(value["kwargs"]["x"]) and value["kwargs"]["big"] == -BIG, value
    _drained(broker, q)


# Redis only: RabbitMQ itself closes the connection (541 INTERNAL_ERROR) when a NaN double is
# published in a header table, so no such message reaches any worker there.
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_nan_in_a_header_runs(broker, worker, client_factory, q, check_ping):
    w = worker(broker.url, [q])
    client = client_factory(broker.url)
    body = json.dumps([[1, 2], {"a": 1}, EMBED]).encode()
    tid, res = client.publish_raw(q, body, content_type="application/json", content_encoding="utf-8",
                                  headers={"x-score": float("nan"), "x-range": [float("-inf"), 1.5],
                                           # celery worker runs it with no limit (billiard never fires)
                                           "timelimit": [float("nan"), float("inf")]})
    check_ping(res.get(timeout=30), w.nodename)
    assert res.state == "SUCCESS"
    _drained(broker, q)


V3_NOTEBOOK = {
    "metadata": {"name": "old"}, "nbformat": 3, "nbformat_minor": 0,
    "worksheets": [{"metadata": {}, "cells": [
        {"cell_type": "heading", "level": 1, "metadata": {}, "source": "A v3 notebook"},
        {"cell_type": "code", "collapsed": False, "language": "python", "metadata": {},
         "input": ["x = 20 + 22\n", "print('v3 says', x)"], "outputs": [], "prompt_number": 1},
    ]}],
}


def test_nbformat3_notebook_job_runs(broker, worker, client_factory, q, mongo):
    import gridfs
    import nbformat
    import pymongo
    from omegaml import Omega

    name = f"omwv3-{uuid.uuid4().hex[:8]}"
    om = Omega(mongo_url=mongo)
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("print('replaced by the v3 file')"))
    om.jobs.put(nb, name)
    mc = pymongo.MongoClient(mongo, serverSelectionTimeoutMS=10000)
    try:
        db = mc.get_default_database()
        meta = db.metadata.find_one({"name": {"$in": [name, name + ".ipynb"]}, "prefix": "jobs/"})
        assert meta is not None, f"om.jobs.put created no metadata for {name}"
        fs = gridfs.GridFS(db, collection="omegaml")
        v3 = fs.put(json.dumps(V3_NOTEBOOK, indent=1).encode(), filename=uuid.uuid4().hex)
        db.metadata.update_one({"_id": meta["_id"]}, {"$set": {"gridfile": v3}})

        w = worker(broker.url, [q])
        client = client_factory(broker.url)
        res = client.send(JOB, q, args=(name,))
        res.get(timeout=240)
        assert res.state == "SUCCESS", res.state

        results = [m for m in db.metadata.find({"prefix": "jobs/", "name": {"$regex": f"^results/{name}_"}})]
        assert len(results) == 1, [m["name"] for m in results]
        runs = db.metadata.find_one({"_id": meta["_id"]})["attributes"]["job_runs"]
        assert runs[-1]["status"] == "OK", runs[-1]
        assert runs[-1]["results"] == results[0]["name"], (runs[-1], results[0]["name"])
        if IMPL == "python":
            # omega|ml 0.18 runs it, but nbformat's v3 upgrade returns a v3-class NotebookNode that
            # OmegaJobs.put does not recognise, so the results land as a `python.data` object named
            # without `.ipynb` (om.jobs.get cannot open it). om-worker stores a proper notebook.
            assert results[0]["kind"] == "python.data", results[0]
            assert "v3 says 42" in str(list(db[results[0]["collection"]].find())), results[0]
            return
        assert results[0]["kind"] == "script.ipynb", results[0]
        stored = json.loads(fs.get(results[0]["gridfile"]).read())
        # nbformat's upgrade, executed, written as v4.5 (what om.jobs.put writes for a v4 node).
        assert (stored["nbformat"], stored["nbformat_minor"]) == (4, 5), stored
        cells = stored["cells"]
        assert [c["cell_type"] for c in cells] == ["markdown", "code"], cells
        assert "".join(cells[0]["source"]) == "# A v3 notebook", cells[0]
        assert "".join(cells[1]["source"]) == "x = 20 + 22\nprint('v3 says', x)", cells[1]
        assert all(len(c["id"]) == 8 for c in cells), cells
        texts = ["".join(o.get("text", "")) for o in cells[1]["outputs"] if o.get("output_type") == "stream"]
        assert texts == ["v3 says 42\n"], cells[1]["outputs"]
        assert "worksheets" not in stored and "orig_nbformat" not in stored["metadata"], stored.keys()
        assert w.alive()
    finally:
        mc.close()


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_nan_header_message_is_restored_after_sigkill(broker, worker, client_factory, q, check_ping):
    """A Redis envelope with `NaN` in its headers held unacked by a worker that is SIGKILLed is restored
    by the next worker's visibility sweep (it used to be 'not [envelope, exchange, routing_key]; left in
    place' forever) and runs once, with the redelivered mark kombu's restore sets."""
    import datetime
    import time

    w1 = worker(broker.url, [q], concurrency=1)
    client = client_factory(broker.url)
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=6)
    body = json.dumps([[1, 2], {"a": 1}, EMBED]).encode()
    tid, res = client.publish_raw(q, body, content_type="application/json", content_encoding="utf-8",
                                  headers={"x-score": float("nan"), "eta": eta.isoformat()})
    wait_until(lambda: broker.queue_state(q) == {"exists": False, "ready": 0, "unacked": 1}, 15,
               f"the ETA message of {q} held unacked by the first worker")
    w1.kill()
    time.sleep(max(0.0, (eta - datetime.datetime.now(datetime.timezone.utc)).total_seconds() + 0.5))
    w2 = worker(broker.url, [q], concurrency=1, extra=["--visibility-timeout", "2", "--restore-interval", "1"])
    check_ping(res.get(timeout=60), w2.nodename)
    _drained(broker, q)
    assert "left in place" not in w2.log(), w2.log_tail()
