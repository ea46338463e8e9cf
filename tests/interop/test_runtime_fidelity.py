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
import time
from pathlib import Path

import pytest

from conftest import IMPL, Broker, short_id
from test_fidelity import canonical, compare, decoded_replies, drain_replies, report, subs_for, tname

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


@pytest.fixture(scope="module", params=["amqp", "redis"])
def fid(request, mongo, om_worker_bin, tmp_path_factory):
    """Both workers' artifacts for the same model tasks on one broker: {'py': {...}, 'rs': {...}}."""
    import pymongo
    kind = request.param
    broker = Broker(kind)
    base = tmp_path_factory.mktemp(f"rtfidelity-{kind}")
    run = short_id()
    impls = {"py": "python", "rs": "rust" if om_worker_bin else "python"}
    labels = {tag: f"omwrf-{tag}-{run}" for tag in impls}
    dbs = {tag: database_url(mongo, f"omw_rf_{tag}_{run}") for tag in impls}
    cleanup, workers, caps = list(labels.values()), {}, {}
    try:
        for tag, impl in impls.items():
            workers[tag] = start_worker(impl, broker.url, labels[tag], dbs[tag], base / tag, om_worker_bin,
                                        concurrency=1)
        for w in workers.values():
            wait_ready(w)
        for tag in impls:
            sub = run_client(CLIENT, (), dbs[tag], broker.url, labels[tag], base / tag / "client-tmp")
            cleanup.append(sub["reply_to"])
            msgs = drain_replies(broker.url, sub["reply_to"], list(sub["ids"].values()), WAIT)
            client = pymongo.MongoClient(dbs[tag], serverSelectionTimeoutMS=10000)
            try:
                db = client.get_default_database()
                time.sleep(0.5)  # nothing should write after the results; a late write would show as a diff
                model = db["metadata"].find_one({"name": "fidm", "prefix": "models/"})
            finally:
                client.close()
            caps[tag] = {
                "impl": impls[tag], "nodename": workers[tag].nodename, "label": labels[tag],
                "reply_to": sub["reply_to"], "names": {}, "groups": {}, "task_ids": sub["ids"],
                "replies": {role: [m for m in msgs if m["correlation_id"] == tid] for role, tid in sub["ids"].items()},
                "model_meta": canonical(model) if model else None,
            }
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
            broker.cleanup(cleanup + [f"{w.expected_nodename}.celery.pidbox" for w in workers.values()], [])
        except Exception as e:  # cleanup must not mask the result
            print(f"cleanup failed: {e!r}")


def assert_same(fid, title, get, request, ignore=()):
    py, rs = fid["py"], fid["rs"]
    diffs = compare(get(py), get(rs), subs_for(py), subs_for(rs), "", ignore)
    assert not diffs, report(title, diffs, request.node.callspec.params.get("fid", ""))


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


def test_model_metadata_after_fit(fid, request):
    """The model's Metadata document in MongoDB after the worker's fit (and the predicts): keys, key
    order, BSON types and values (ids and timestamps by type only)."""
    assert_same(fid, "model Metadata document after fit", lambda c: c["model_meta"], request)


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
