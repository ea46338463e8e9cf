"""Fidelity of the model tasks: om-worker against omega|ml's own Python worker, for fit and predict.

Per broker (RabbitMQ, Redis) one module-scoped capture runs the same client against both workers at
the same time: omega|ml's `celery --app omegaml.celeryapp worker` (as conftest starts it for
OMW_WORKER_IMPL=python) and om-worker, each with concurrency 1 (the tasks run in the order sent), its
own label and its own MongoDB database, so both sides use the same object names. One fresh unchanged
omega|ml client process per side puts X/Y datasets and a LinearRegression, then sends, without waiting
on any result, `fit(X, Y)`, `predict(X)`, `predict(<inline data>)` (a PassthroughDataset) and
`predict(<missing dataset>)`. Every rpc:// state message stays in the client's reply queue; the test
reads them with kombu (test_fidelity.drain_replies), then reads the model's Metadata document with
pymongo (canonical Extended JSON: BSON types kept).

Compared as test_fidelity.py compares the notebook artifacts (its compare/decoded_replies): the model
Metadata document after the fit (keys, key order, types, values; ObjectIds and dates by type only),
the state messages per task (status sequence, headers, properties, delivery info, payload keys in
order with result type and value, traceback, children, date_done format) and their serialization.
"""
import json
import re
import time
from pathlib import Path

import pytest

from conftest import REDIS_URL, Broker, short_id
from test_fidelity import (canonical, compare, decoded_replies, drain_replies, pytree, report, subs_for,
                           tname)

import sys

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "support"))
from runtime_shared import database_url, run_client, start_worker, wait_ready  # noqa: E402

WORKER_KERNELS = False
WAIT = 240
ROLES = ("fit", "predict", "inline", "missing")

CLIENT = r"""
import json
import numpy as np
import pandas as pd
import omegaml as om
from sklearn.linear_model import LinearRegression

df = pd.DataFrame({'x': np.arange(20, dtype=float)})
df['y'] = df['x'] * 2 + 1
om.datasets.put(df[['x']], 'fidX', append=False)
om.datasets.put(df[['y']], 'fidY', append=False)
om.models.put(LinearRegression(), 'fidm')
m = om.runtime.model('fidm')
ids = {}
ids['fit'] = m.fit('fidX', 'fidY').id
ids['predict'] = om.runtime.model('fidm').predict('fidX').id
ids['inline'] = om.runtime.model('fidm').predict([[100.0], [101.0]]).id
ids['missing'] = om.runtime.model('fidm').predict('fidnosuchdataset').id
print('@@RESULT ' + json.dumps({'ids': ids, 'reply_to': om.runtime.celeryapp.thread_oid}), flush=True)
"""


def redis_metas(task_ids, timeout):
    """The redis:// backend's `celery-task-meta-<id>` values, once each is terminal (Celery writes
    STARTED, then overwrites it). The values are the workers' pickles of the meta dict (result_serializer
    pickle); only this test's own workers wrote them."""
    import pickle
    from conftest import redis_client
    r = redis_client()
    deadline = time.monotonic() + timeout
    metas = {}
    while True:
        for tid in task_ids:
            raw = r.get(f"celery-task-meta-{tid}")
            if raw is not None:
                metas[tid] = pickle.loads(raw)
        if all(m.get("status") in ("SUCCESS", "FAILURE", "REVOKED") for m in metas.values()) \
                and set(metas) == set(task_ids):
            return metas
        if time.monotonic() > deadline:
            raise AssertionError(f"redis backend: no terminal meta for some of {task_ids} after {timeout}s: "
                                 f"{ {t: m.get('status') for t, m in metas.items()} }")
        time.sleep(0.3)


def capture(kind, backend, mongo, om_worker_bin, base):
    """Generator: start both workers on broker `kind` with result backend `backend` ('rpc' or 'redis'),
    run the client against each, yield {'py': cap, 'rs': cap}, then stop the workers and clean up."""
    import pymongo
    broker = Broker(kind)
    backend_url = "rpc://" if backend == "rpc" else REDIS_URL
    run = short_id()
    impls = {"py": "python", "rs": "rust" if om_worker_bin else "python"}
    labels = {tag: f"omwrf-{tag}-{run}" for tag in impls}
    dbs = {tag: database_url(mongo, f"omw_rf_{tag}_{run}") for tag in impls}
    cleanup, task_ids, workers, caps = list(labels.values()), [], {}, {}
    try:
        for tag, impl in impls.items():
            workers[tag] = start_worker(impl, broker.url, labels[tag], dbs[tag], base / tag, om_worker_bin,
                                        backend=backend_url, concurrency=1)
        for w in workers.values():
            wait_ready(w)
        for tag in impls:
            sub = run_client(CLIENT, (), dbs[tag], broker.url, labels[tag], base / tag / "client-tmp",
                             backend=backend_url)
            ids = sub["ids"]
            task_ids += list(ids.values())
            cap = {"impl": impls[tag], "nodename": workers[tag].nodename, "label": labels[tag],
                   "reply_to": sub["reply_to"], "names": {}, "groups": {}, "task_ids": ids}
            if backend == "rpc":
                cleanup.append(sub["reply_to"])
                msgs = drain_replies(broker.url, sub["reply_to"], list(ids.values()), WAIT)
                cap["replies"] = {role: [m for m in msgs if m["correlation_id"] == tid] for role, tid in ids.items()}
            else:
                metas = redis_metas(list(ids.values()), WAIT)
                cap["metas"] = {role: pytree(metas[tid]) for role, tid in ids.items()}
            client = pymongo.MongoClient(dbs[tag], serverSelectionTimeoutMS=10000)
            try:
                time.sleep(0.5)  # nothing should write after the results; a late write would show as a diff
                model = client.get_default_database()["metadata"].find_one({"name": "fidm", "prefix": "models/"})
            finally:
                client.close()
            cap["model_meta"] = canonical(model) if model else None
            caps[tag] = cap
        (base / "captures.json").write_text(json.dumps(caps, indent=1))
        yield caps
    except BaseException:
        for tag, w in workers.items():
            print(f"--- {w.impl} worker ({tag}) log {w.logpath} ---\n{w.log_tail(8000)}")
        raise
    finally:
        for w in workers.values():
            w.terminate()
        try:
            broker.cleanup(cleanup + [f"{w.expected_nodename}.celery.pidbox" for w in workers.values()], task_ids)
        except Exception as e:  # cleanup must not mask the result
            print(f"cleanup failed: {e!r}")


@pytest.fixture(scope="module", params=["amqp", "redis"])
def fid(request, mongo, om_worker_bin, tmp_path_factory):
    """Both workers' artifacts for the same model tasks on one broker, rpc:// backend:
    {'py': {...}, 'rs': {...}}."""
    yield from capture(request.param, "rpc", mongo, om_worker_bin,
                       tmp_path_factory.mktemp(f"rtfidelity-{request.param}"))


@pytest.fixture(scope="module")
def fid_redis_backend(mongo, om_worker_bin, tmp_path_factory):
    """The same on RabbitMQ with the redis:// result backend (what the workers store there)."""
    yield from capture("amqp", "redis", mongo, om_worker_bin, tmp_path_factory.mktemp("rtfidelity-beredis"))


def assert_same(fid, title, get, request, ignore=()):
    py, rs = fid["py"], fid["rs"]
    diffs = compare(get(py), get(rs), subs_for(py), subs_for(rs), "", ignore)
    callspec = getattr(request.node, "callspec", None)
    assert not diffs, report(title, diffs, callspec.params.get("fid", "amqp") if callspec else "amqp")


def test_reference_behaviour_captured(fid):
    """The Python worker's side is what omega|ml does (so the comparisons compare something real):
    fit/predict succeed, the missing dataset fails, the fit stored a fitted model's Metadata."""
    py = fid["py"]
    statuses = {role: [m["status"] for m in py["replies"][role]] for role in ROLES}
    assert statuses == {"fit": ["STARTED", "SUCCESS"], "predict": ["STARTED", "SUCCESS"],
                        "inline": ["STARTED", "SUCCESS"], "missing": ["STARTED", "FAILURE"]}, statuses
    fit_result = py["replies"]["fit"][-1]["payload"]["result"]
    assert isinstance(fit_result, str) and fit_result.startswith("<Metadata: Metadata(name=fidm,"), fit_result
    assert py["model_meta"] and py["model_meta"]["kind"] == "sklearn.joblib", py["model_meta"]
    for tag in ("py", "rs"):
        assert fid[tag]["model_meta"] is not None, f"{tag}: no model Metadata document"


SHA1_RE = re.compile(r"\b[0-9a-f]{40}\b")


def mask_versions(tree):
    """omega|ml's model version hashes are sha1(name + str(meta.modified)) (modelversion.py), so they
    differ between any two runs: each distinct hash becomes <SHA1_n>, numbered in document order
    (values and keys alike), so which commit is which (tags.latest, commits, tree) is still compared.
    A list of names holding hashes (attributes.dataset.kwargs.model_store: the store's names in sorted
    order, which the random hashes shuffle on every run, on either worker) is masked after everything
    else is numbered and then compared sorted."""
    seen = {}

    def sub(text):
        return SHA1_RE.sub(lambda m: seen.setdefault(m.group(0), f"<SHA1_{len(seen)}>"), text)

    def is_name_list(v):
        return bool(v) and all(isinstance(x, str) for x in v) and any(SHA1_RE.search(x) for x in v)

    def walk(v, name_lists):
        if isinstance(v, dict):
            return {sub(k): walk(x, name_lists) for k, x in v.items()}
        if isinstance(v, list):
            if is_name_list(v):
                return sorted(sub(x) for x in v) if name_lists else v
            return [walk(x, name_lists) for x in v]
        return sub(v) if isinstance(v, str) else v

    walk(tree, False)  # number the hashes in document order, outside the name lists
    return walk(tree, True)


def test_model_metadata_after_fit(fid, request):
    """The model's Metadata document in MongoDB after the worker's fit (and the predicts): keys, key
    order, BSON types and values (ids and timestamps by type only, version hashes by position)."""
    assert_same(fid, "model Metadata document after fit", lambda c: mask_versions(c["model_meta"]), request)


@pytest.mark.parametrize("role", ROLES)
def test_result_messages(fid, role, request):
    """The rpc:// state messages of each task, decoded as the client decodes them: status sequence,
    correlation_id, headers, properties, delivery info, payload keys in order, the result's type and
    value (repr(Metadata) for fit, the prediction array for predict, the ValueError for the missing
    dataset), traceback (None on success, last line on failure), children, date_done."""
    assert_same(fid, f"{role} rpc result messages (decoded)", lambda c: decoded_replies(c, role), request,
                ignore=("*.payload.result.pid", "*.properties.delivery_tag"))


@pytest.mark.parametrize("role", ROLES)
def test_result_serialization(fid, role, request):
    """The state messages' serializer (omega|ml's result_serializer is pickle) and the result type."""
    def get(c):
        return [{"content_type": m["content_type"], "content_encoding": m["content_encoding"],
                 "properties": {k: m["properties"].get(k) for k in ("content_type", "content_encoding")},
                 "result_type": tname(m["payload"].get("result"))} for m in c["replies"][role]]
    assert_same(fid, f"{role} rpc result serialization", get, request)


def backend_meta(c, role):
    """The stored meta with the traceback reduced to its last line (Python frames cannot match)."""
    meta = json.loads(json.dumps(c["metas"][role]))
    if isinstance(meta.get("traceback"), str):
        meta["traceback"] = {"$traceback_last_line": meta["traceback"].rstrip("\n").splitlines()[-1]}
    return meta


def test_redis_backend_reference_captured(fid_redis_backend):
    py = fid_redis_backend["py"]
    statuses = {role: py["metas"][role]["status"] for role in ROLES}
    assert statuses == {"fit": "SUCCESS", "predict": "SUCCESS", "inline": "SUCCESS", "missing": "FAILURE"}, statuses


@pytest.mark.parametrize("role", ROLES)
def test_redis_backend_result_meta(fid_redis_backend, role, request):
    """The redis:// backend's stored result meta per task (status, result type and value, traceback,
    children, date_done, task_id; keys in order)."""
    assert_same(fid_redis_backend, f"{role} redis backend result meta", lambda c: backend_meta(c, role), request)


def test_redis_backend_model_metadata_after_fit(fid_redis_backend, request):
    assert_same(fid_redis_backend, "model Metadata document after fit (redis backend)",
                lambda c: mask_versions(c["model_meta"]), request)
