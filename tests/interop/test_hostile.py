"""Hostile input (issue 7): a corpus of whole task messages (hostile_corpus.py, 140+ per broker) through
the real broker into one om-worker per broker, then one test per case.

Per broker, one module-scoped run: start `om-worker -c 3` on a fresh queue (result backend redis://, the
client an omega|ml-configured Celery app), create the notebooks some cases need (a slow one, one whose
GridFS file is not JSON, a 50 MiB one) with the real omega|ml client, publish the whole corpus in a burst
(kombu Producer; py-amqp or a hand-built kombu envelope where kombu would rewrite the property; LPUSH of
raw list elements for the Redis-only cases), collect every result from the redis backend, then check that
the worker still answers a ping, revoke the far-future-ETA messages it holds unacked, and check that the
queue is empty (nothing ready, nothing unacked) and that the worker exits 0 on SIGTERM. The per-case tests
read the outcome:

  - FAILURE cases: the FAILURE arrived with the expected exception type and message, and the worker
    logged an ERROR/WARN line naming the task id (exactly once: consumed once, never redelivered);
  - code-executing pickles: the marker file they target never appears (checked for every case too);
  - SUCCESS/EITHER: a terminal result (huge args: a normal ping or a DecodeError, never a hang);
  - REVOKED: `expires` in the past gives REVOKED, as Celery does;
  - HELD: far-future ETAs are held unacked without blocking anything, and a revoke settles them;
  - DROPPED: messages without any task id (or Redis elements that are not kombu envelopes) are logged once
    and dropped;
  - DUP: the same task id published twice for a slow notebook runs once (one job_runs entry, one results
    notebook, one SUCCESS);
  - notebook names with `..`/absolute paths: omega|ml's "Cannot run non-existent jobs" and no metadata.

Run: .venv/bin/python -m pytest tests/interop/test_hostile.py -q
"""
import base64
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import (AMQP_URL, HOSTNAME, PING_TASK, REDIS_URL, VENV_PY, Broker, WorkerProc, omega_celery_app,
                      redis_client, secantus_instance, short_id, worker_env)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_corpus as hc  # noqa: E402

KINDS = ("amqp", "redis")
CONCURRENCY = 3
RESULT_DEADLINE = 150.0  # seconds for the whole corpus to be answered (kernels for 3 notebook tasks)
TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")
SLOW_SECONDS = 6
BIG_BYTES = 50 * 1024 * 1024
RSS_LIMIT_MB = 1536
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ALL = [pytest.param(k, c.name, id=f"{k}-{c.name}",
                    marks=[pytest.mark.xfail(reason=c.xfail[k], strict=True)] if c.xfail and k in c.xfail else [])
       for k in KINDS for c in hc.CASES if k in c.brokers]


def _known_bug(kind, name):
    c = BY_NAME[name]
    return bool(c.xfail and kind in c.xfail)
BY_NAME = {c.name: c for c in hc.CASES}


def _fail(msg):
    pytest.fail(msg, pytrace=False)


# ------------------------------------------------------------------------------------------------
# notebooks (once per module, through the real omega|ml client)
# ------------------------------------------------------------------------------------------------

def _make_notebooks(mongo):
    import gridfs
    import nbformat
    import pymongo
    from omegaml import Omega

    om = Omega(mongo_url=mongo)
    tag = short_id()
    names = {f"slow-{k}": f"omwh-slow-{k}-{tag}" for k in KINDS}
    names.update(notjson=f"omwh-notjson-{tag}", big=f"omwh-big-{tag}")
    for k in KINDS:
        nb = nbformat.v4.new_notebook()
        nb.cells.append(nbformat.v4.new_code_cell(f"import time\ntime.sleep({SLOW_SECONDS})\nprint('slow done')"))
        om.jobs.put(nb, names[f"slow-{k}"])
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("print('never runs')"))
    om.jobs.put(nb, names["notjson"])
    # one cell whose stored output is 50 MiB (the worker reads and parses all of it, then clears outputs)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('big ok')")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="y" * BIG_BYTES)]
    nb.cells.append(cell)
    t0 = time.monotonic()
    om.jobs.put(nb, names["big"])
    big_put_s = time.monotonic() - t0

    client = pymongo.MongoClient(mongo, serverSelectionTimeoutMS=10000)
    db = client.get_default_database()
    meta = db.metadata.find_one({"name": names["notjson"] + ".ipynb", "prefix": "jobs/"}) or \
        db.metadata.find_one({"name": names["notjson"], "prefix": "jobs/"})
    if meta is None:
        _fail(f"om.jobs.put did not create metadata for {names['notjson']}")
    fs = gridfs.GridFS(db, collection="omegaml")
    bad = fs.put(b"this is not a notebook \xff\xfe {\"cells\": [", filename=uuid.uuid4().hex)
    db.metadata.update_one({"_id": meta["_id"]}, {"$set": {"gridfile": bad}})
    big_meta = db.metadata.find_one({"name": {"$in": [names["big"], names["big"] + ".ipynb"]}, "prefix": "jobs/"})
    big_len = fs.get(big_meta["gridfile"]).length
    if big_len < BIG_BYTES:
        _fail(f"the big notebook stored {big_len} bytes, expected > {BIG_BYTES}")
    client.close()
    return names, {"big_put_s": big_put_s, "big_len": big_len}


def _job_doc(db, name):
    return db.metadata.find_one({"name": {"$in": [name, name + ".ipynb"]}, "prefix": "jobs/"})


# ------------------------------------------------------------------------------------------------
# publishing
# ------------------------------------------------------------------------------------------------

def _headers(tid, pub):
    h = {"lang": "py", "task": pub.task, "id": tid, "shadow": None, "eta": None, "expires": None,
         "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": tid,
         "parent_id": None, "argsrepr": "(1, 2)", "kwargsrepr": "{}", "origin": f"gen{os.getpid()}@{HOSTNAME}",
         "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}
    if pub.task is None:
        del h["task"]
    h.update(pub.headers)
    return {k: v for k, v in h.items() if v is not hc.DROP}


class Publisher:
    def __init__(self, kind, app, queue):
        self.kind, self.app, self.queue = kind, app, queue
        self.task_queue = app.amqp.queues[queue]

    def publish(self, tid, pub):
        corr = tid if pub.correlation_id == "<tid>" else pub.correlation_id
        headers = _headers(tid, pub)
        for _ in range(pub.times):
            if pub.via == "redis-raw":
                assert self.kind == "redis"
                redis_client().lpush(self.queue, pub.raw.replace(b"<q>", self.queue.encode()))
            elif pub.via == "raw":
                self._raw(pub, headers, corr)
            else:
                self._kombu(pub, headers, corr)

    def _kombu(self, pub, headers, corr):
        props = {"reply_to": self.app.thread_oid}
        if corr is not None:
            props["correlation_id"] = corr
        with self.app.producer_or_acquire() as producer:
            producer.publish(pub.body, exchange="", routing_key=self.queue, declare=[self.task_queue],
                             content_type=pub.content_type, content_encoding=pub.content_encoding,
                             headers=headers, delivery_mode=2, retry=True, **props)

    def _raw(self, pub, headers, corr):
        """Properties kombu's Producer would rewrite (an empty or absent content_type)."""
        if self.kind == "amqp":
            import amqp
            from kombu import Connection
            props = {"application_headers": headers, "delivery_mode": 2, "reply_to": self.app.thread_oid}
            if pub.content_type is not None:
                props["content_type"] = pub.content_type
                props["content_encoding"] = pub.content_encoding
            if corr is not None:
                props["correlation_id"] = corr
            with Connection(AMQP_URL) as c:
                ch = c.default_channel
                ch.basic_publish(amqp.Message(pub.body, **props), exchange="", routing_key=self.queue)
            return
        from kombu.utils.json import dumps
        env = {"body": base64.b64encode(pub.body).decode(), "content-encoding": pub.content_encoding,
               "content-type": pub.content_type, "headers": json.loads(dumps(headers)),
               "properties": {"correlation_id": corr, "reply_to": self.app.thread_oid, "delivery_mode": 2,
                              "delivery_info": {"exchange": "", "routing_key": self.queue}, "priority": 0,
                              "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}}
        redis_client().lpush(self.queue, json.dumps(env))


# ------------------------------------------------------------------------------------------------
# the run: one worker per broker, the whole corpus in a burst
# ------------------------------------------------------------------------------------------------

def _vm(pid, key):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024  # MiB
    except OSError:
        return None
    return None


def _exc_info(meta):
    r = meta.get("result")
    if isinstance(r, BaseException):
        return f"{type(r).__module__}.{type(r).__name__}", str(r)
    if isinstance(r, dict) and "exc_type" in r:
        msg = r.get("exc_message")
        msg = " ".join(map(str, msg)) if isinstance(msg, (list, tuple)) else str(msg)
        return f"{r.get('exc_module')}.{r['exc_type']}", msg
    return type(r).__name__, repr(r)[:500]


class Run:
    """Everything one broker's run observed."""

    def __init__(self, kind):
        self.kind = kind
        self.tids = {}
        self.meta = {}
        self.meta_errors = {}
        self.log = ""
        self.lines = []
        self.notes = []
        self.problems = []


def _collect(app, pending, run, deadline, optional=(), grace=10.0):
    """Poll the redis backend until every case in `pending` has a terminal result; cases in `optional`
    (known bugs) get `grace` seconds once everything else is in."""
    rest_done_at = None
    while pending and time.monotonic() < deadline:
        if pending <= set(optional):
            rest_done_at = rest_done_at or time.monotonic()
            if time.monotonic() - rest_done_at > grace:
                break
        for name in list(pending):
            tid = run.tids[name]
            try:
                m = app.backend.get_task_meta(tid)
            except Exception as e:  # a result the client cannot decode is itself a finding
                run.meta_errors[name] = f"{type(e).__name__}: {e}"
                pending.discard(name)
                continue
            if m.get("status") in TERMINAL:
                run.meta[name] = m
                pending.discard(name)
        time.sleep(0.2)


def _run_kind(kind, mongo, bin_path, tmp, notebooks):
    import pymongo
    broker = Broker(kind)
    run = Run(kind)
    q = f"omwh-{short_id()}"
    node = f"omwh-{short_id()}@{HOSTNAME}"
    run.queue, run.nodename = q, node
    marker_dir = tmp / "markers"
    marker_dir.mkdir()
    run.marker_dir = marker_dir
    wtmp = tmp / "worker-tmp"
    wtmp.mkdir()
    argv = [str(bin_path), "worker", "-Q", q, "-c", str(CONCURRENCY), "-n", node, "-l", "info", "--python",
            str(VENV_PY), "--kernel-pool", "1"]
    env = worker_env(wtmp, broker.url, REDIS_URL, mongo)
    w = WorkerProc(argv, env, tmp / "om-worker.log", node)
    run.worker = w
    app = omega_celery_app(broker.url, REDIS_URL)
    run.app = app
    db_client = pymongo.MongoClient(mongo, serverSelectionTimeoutMS=10000)
    db = db_client.get_default_database()
    try:
        w.wait_ready()
        run.rss_idle_mb = _vm(w.pid, "VmRSS")
        pub = Publisher(kind, app, q)
        nbs = dict(notebooks, slow=notebooks[f"slow-{kind}"])
        ctx = hc.Ctx(marker_dir, nbs)
        cases = [c for c in hc.CASES if kind in c.brokers]
        # the duplicate pair first, so both copies meet while the first one runs
        cases.sort(key=lambda c: c.expect != "DUP")
        t0 = time.monotonic()
        for c in cases:
            tid = str(uuid.uuid4())
            run.tids[c.name] = tid
            ctx.tid, ctx.name = tid, c.name
            pub.publish(tid, c.build(ctx))
        run.publish_s = time.monotonic() - t0
        waiting = {c.name for c in cases if c.expect in ("FAILURE", "SUCCESS", "EITHER", "REVOKED", "DUP")}
        _collect(app, waiting, run, time.monotonic() + RESULT_DEADLINE,
                 optional={c.name for c in cases if _known_bug(kind, c.name)})
        run.unanswered = sorted(waiting)
        run.collect_s = time.monotonic() - t0
        time.sleep(1.0)  # drop/duplicate log lines of the last messages

        # far-future ETAs: held unacked (no result), the worker keeps answering; then revoke them
        held = [c.name for c in cases if c.expect == "HELD"]
        run.held_states = {n: app.backend.get_task_meta(run.tids[n]).get("status") for n in held}
        run.queue_while_held = broker.queue_state(q)
        run.alive_before_ping = w.alive()
        t1 = time.monotonic()
        try:
            pong = app.send_task(PING_TASK, args=[1, 2], kwargs={"a": 1}, queue=q).get(timeout=30)
            run.ping = pong
        except Exception as e:
            run.ping = e
        run.ping_s = time.monotonic() - t1
        for n in held:
            app.control.revoke(run.tids[n])
        waiting = set(held)
        _collect(app, waiting, run, time.monotonic() + 30)
        run.held_unrevoked = sorted(waiting)

        deadline = time.monotonic() + 30
        while True:
            st = broker.queue_state(q)
            if st["ready"] == 0 and st["unacked"] == 0:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.3)
        run.queue_final = st
        run.rss_peak_mb = _vm(w.pid, "VmHWM")
        run.rss_end_mb = _vm(w.pid, "VmRSS")
        run.alive_at_end = w.alive()
        run.markers = sorted(p.name for p in marker_dir.iterdir())

        # MongoDB: the duplicated notebook ran once; hostile names created nothing; the big one ran
        run.slow_doc = _job_doc(db, nbs["slow"])
        run.big_doc = _job_doc(db, nbs["big"])
        run.path_docs = {}
        for c in cases:
            if c.name.startswith("job_path_"):
                nb = _nb_of(c, ctx)
                run.path_docs[c.name] = db.metadata.count_documents(
                    {"name": {"$in": [nb, nb + ".ipynb"]}}) + db.metadata.count_documents(
                    {"name": {"$regex": "^results/" + re.escape(nb.replace("\x00", ""))}})
    finally:
        run.rc = w.terminate()
        run.log = ANSI.sub("", w.log())
        run.lines = run.log.splitlines()
        try:
            app.close()
        except Exception:
            pass
        db_client.close()
        try:
            broker.cleanup([q, f"{node}.celery.pidbox"], list(run.tids.values()))
        except Exception as e:
            run.notes.append(f"cleanup failed: {e!r}")
    return run


def _nb_of(c, ctx):
    import pickle
    return pickle.loads(c.build(ctx).body)[0][0]


@pytest.fixture(scope="module")
def hostile_mongo(environment_ok, tmp_path_factory):
    """The corpus gets its own SecantusDB: it stores 50 MiB notebooks (and their results), which
    would slow the session's (Python) SecantusDB down for every test after this module."""
    with secantus_instance(tmp_path_factory.mktemp("secantus-hostile")) as url:
        yield url


@pytest.fixture(scope="module")
def hostile(hostile_mongo, om_worker_bin, tmp_path_factory):
    mongo = hostile_mongo
    cache = {}
    state = {}

    def get(kind):
        if kind not in cache:
            try:
                if "notebooks" not in state:
                    state["notebooks"], state["nbinfo"] = _make_notebooks(mongo)
                tmp = tmp_path_factory.mktemp(f"hostile-{kind}")
                r = _run_kind(kind, mongo, om_worker_bin, tmp, state["notebooks"])
                r.nbinfo = state["nbinfo"]
                r.notebooks = state["notebooks"]
                cache[kind] = r
            except BaseException as e:
                import traceback
                e.omw_tb = traceback.format_exc()
                cache[kind] = e
        r = cache[kind]
        if isinstance(r, BaseException):
            _fail(f"the {kind} corpus run itself failed: {type(r).__name__}: {r}\n{getattr(r, 'omw_tb', '')}")
        return r

    yield get


# ------------------------------------------------------------------------------------------------
# helpers for the assertions
# ------------------------------------------------------------------------------------------------

def _log_lines(run, needle):
    return [ln for ln in run.lines if needle in ln]


def _tail(run, tid=None, n=15):
    lines = _log_lines(run, tid) if tid else run.lines[-n:]
    return "\n".join(lines[-n:]) or "(no log lines)"


def _is_problem_line(ln):
    return " ERROR " in ln or " WARN " in ln


def _expect_exc(c, got_type):
    want = c.exc
    return got_type == want or got_type.rsplit(".", 1)[-1] == want


# ------------------------------------------------------------------------------------------------
# the run as a whole
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_corpus_size_and_worker_survives(hostile, kind):
    run = hostile(kind)
    n = len(run.tids)
    assert n >= 50, f"only {n} hostile messages published on {kind}"
    print(f"{kind}: {n} cases, published in {run.publish_s:.1f}s, answered in {run.collect_s:.1f}s, "
          f"ping after the corpus {run.ping_s:.2f}s, worker RSS idle {run.rss_idle_mb} MiB, "
          f"peak {run.rss_peak_mb} MiB, end {run.rss_end_mb} MiB; big notebook put in "
          f"{run.nbinfo['big_put_s']:.1f}s ({run.nbinfo['big_len']} bytes)")
    for name, tid in run.tids.items():
        m = run.meta.get(name)
        st = m["status"] if m else "-"
        detail = _exc_info(m) if st == "FAILURE" else (repr(m["result"])[:100] if m else "")
        print(f"  {name:45s} {st:8s} {detail}")
    assert run.alive_before_ping and run.alive_at_end, \
        f"om-worker died during the corpus (rc {run.rc})\n{_tail(run, n=40)}"
    assert not isinstance(run.ping, BaseException), f"no ping answer after the corpus: {run.ping!r}"
    assert isinstance(run.ping, dict) and run.ping.get("worker") == run.nodename, run.ping
    assert "panicked" not in run.log, "\n".join(ln for ln in run.lines if "panick" in ln)
    assert run.rc == 0, f"warm shutdown after the corpus exited {run.rc}\n{_tail(run, n=30)}"
    assert run.markers == [], f"pickled code was EXECUTED: markers {run.markers} exist in {run.marker_dir}"
    unanswered = [n for n in run.unanswered if not _known_bug(kind, n)]
    assert unanswered == [], f"no result within {RESULT_DEADLINE:.0f}s for: {unanswered}"
    assert run.meta_errors == {}, f"results the client could not decode: {run.meta_errors}"
    assert run.rss_peak_mb is not None and run.rss_peak_mb < RSS_LIMIT_MB, \
        f"worker peak RSS {run.rss_peak_mb} MiB (limit {RSS_LIMIT_MB})"


@pytest.mark.parametrize("kind", KINDS)
def test_queue_drained_nothing_redelivered(hostile, kind):
    run = hostile(kind)
    assert (run.queue_final["ready"], run.queue_final["unacked"]) == (0, 0), \
        f"queue {run.queue} not drained after the corpus: {run.queue_final}"
    # consumed once: no message was seen twice (every task id is logged as received/rejected at most once)
    redelivered = [ln for ln in run.lines if "redeliver" in ln.lower() and "om_worker" in ln]
    assert not redelivered, "\n".join(redelivered[:10])


# ------------------------------------------------------------------------------------------------
# one test per case
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,name", ALL)
def test_case(hostile, kind, name):
    run = hostile(kind)
    c = BY_NAME[name]
    tid = run.tids[name]
    marker = run.marker_dir / f"pwned-{name}"
    assert not marker.exists(), f"{name}: the payload was EXECUTED ({marker} exists)"
    meta = run.meta.get(name)
    lines = _log_lines(run, tid)
    where = f"\n--- worker log lines naming {tid} ---\n{_tail(run, tid)}"

    if c.expect in ("FAILURE", "SUCCESS", "EITHER", "REVOKED", "DUP"):
        assert name not in run.meta_errors, f"{name}: result not decodable by the client: {run.meta_errors[name]}"
        assert meta is not None, f"{name}: no result for task {tid} within {RESULT_DEADLINE:.0f}s{where}"
    state = meta["status"] if meta else None

    if c.expect == "FAILURE":
        got_type, got_msg = _exc_info(meta) if state == "FAILURE" else (None, None)
        assert state == "FAILURE", f"{name}: state {state}, expected FAILURE ({meta.get('result')!r}){where}"
        assert _expect_exc(c, got_type), f"{name}: FAILURE is {got_type}: {got_msg!r}, expected {c.exc}{where}"
        for part in (c.msg if isinstance(c.msg, tuple) else (c.msg,)):
            assert part.lower() in got_msg.lower(), f"{name}: FAILURE message {got_msg[:400]!r} lacks {part!r}"
        bad = [ln for ln in lines if _is_problem_line(ln)]
        assert bad, f"{name}: no ERROR/WARN log line names task {tid}{where}"
        # consumed exactly once: one rejection (undecodable / unregistered) or one failed run, never more
        settled = [ln for ln in lines if "rejecting malformed message" in ln or "unregistered task" in ln
                   or "task failed" in ln]
        assert len(settled) == 1, f"{name}: settled {len(settled)} times (expected once){where}"
    elif c.expect in ("SUCCESS", "EITHER"):
        if c.expect == "SUCCESS" or state == "SUCCESS":
            assert state == "SUCCESS", f"{name}: state {state} ({_exc_info(meta)}){where}"
            if c.check:
                c.check(meta["result"])
        else:
            got_type, got_msg = _exc_info(meta)
            assert state == "FAILURE" and _expect_exc(c, got_type), \
                f"{name}: state {state} {got_type} {got_msg!r}; expected a normal run or {c.exc}{where}"
            print(f"{kind} {name}: FAILURE {got_type}: {got_msg[:200]}")
        started = [ln for ln in lines if "task started" in ln]
        assert len(started) <= 1, f"{name}: started {len(started)} times{where}"
        if name == "job_notebook_50mib":
            doc = run.big_doc
            runs = (doc or {}).get("attributes", {}).get("job_runs", [])
            assert runs and runs[-1]["status"] == "OK", f"big notebook runs: {runs}"
            assert doc["attributes"].get("task_id") == tid, doc["attributes"].get("task_id")
    elif c.expect == "REVOKED":
        assert state == "REVOKED", f"{name}: state {state} ({meta.get('result')!r}), expected REVOKED{where}"
        assert any("expired" in ln for ln in lines), f"{name}: no 'expired' log line{where}"
        assert not any("task started" in ln for ln in lines), f"{name}: an expired task was started{where}"
    elif c.expect == "HELD":
        assert run.held_states[name] in ("PENDING", "RECEIVED"), \
            f"{name}: a far-future ETA task reached state {run.held_states[name]} before its ETA"
        assert run.queue_while_held["unacked"] >= 1, \
            f"{name}: far-future ETA messages not held unacked: queue {run.queue_while_held}"
        assert name not in run.held_unrevoked, f"{name}: revoke did not settle the held ETA task{where}"
        assert run.meta[name]["status"] == "REVOKED", run.meta[name]
        assert not any("task started" in ln for ln in lines), f"{name}: ran before its ETA{where}"
    elif c.expect == "DROPPED":
        assert name not in run.meta, f"{name}: unexpected result {run.meta.get(name)}"
        if c.has_id:  # Redis elements: the preview in the log line carries the token
            hits = [ln for ln in lines if c.log in ln]
            assert len(hits) == 1, f"{name}: expected one '{c.log}' line naming {tid}, got {len(hits)}{where}"
        else:
            hits = [ln for ln in run.lines if c.log in ln and 'task_id="?"' in ln or
                    (c.log in ln and "task_id=?" in ln)]
            assert hits, f"{name}: no log line for the id-less message containing {c.log!r}\n{_tail(run, n=60)}"
        assert not meta
    elif c.expect == "DUP":
        assert state == "SUCCESS", f"{name}: state {state} {_exc_info(meta)}{where}"
        attrs = (run.slow_doc or {}).get("attributes", {})
        runs = attrs.get("job_runs", [])
        assert len(runs) == 1, f"{name}: the twice-published task ran {len(runs)} times: {runs}"
        assert len(attrs.get("job_results", [])) == 1, attrs.get("job_results")
        assert runs[0]["status"] == "OK", runs
        ran = [ln for ln in lines if "notebook ran" in ln]
        assert len(ran) == 1, f"{name}: 'notebook ran' logged {len(ran)} times{where}"
        dup = [ln for ln in lines if "duplicate" in ln or "already recorded" in ln]
        assert dup, f"{name}: the second copy left no 'duplicate'/'already recorded' line{where}"
        print(f"{kind} {name}: second copy -> {dup[0][-160:]}")
    else:
        raise AssertionError(c.expect)

    if name.startswith("job_path_"):
        assert run.path_docs[name] == 0, f"{name}: metadata was created for a hostile notebook name"


def test_code_payloads_are_live(tmp_path):
    """Control: CPython's own pickle.loads, in a throwaway subprocess, DOES run every payload marked 'live'
    (each touches its marker file), so the corpus's "no marker appears" checks are not vacuous."""
    ctx = hc.Ctx(tmp_path, {"slow": "s", "notjson": "n", "big": "b"})
    live = [c for c in hc.CASES if c.code == "live"]
    assert len(live) >= 25, f"only {len(live)} live code-execution payloads"
    for c in live:
        ctx.tid, ctx.name = str(uuid.uuid4()), c.name
        (tmp_path / f"{c.name}.pickle").write_bytes(c.build(ctx).body)
    script = ("import glob, pickle, sys, time\n"
              "for f in sorted(glob.glob(sys.argv[1] + '/*.pickle')):\n"
              "    try:\n"
              "        pickle.loads(open(f, 'rb').read())\n"
              "    except Exception:\n"
              "        pass\n"
              "time.sleep(1.0)\n")
    import subprocess
    subprocess.run([str(VENV_PY), "-c", script, str(tmp_path)], cwd=str(tmp_path), timeout=60,
                   capture_output=True)
    deadline = time.monotonic() + 10
    missing = [c.name for c in live if not (tmp_path / f"pwned-{c.name}").exists()]
    while missing and time.monotonic() < deadline:
        time.sleep(0.2)
        missing = [c.name for c in live if not (tmp_path / f"pwned-{c.name}").exists()]
    assert missing == [], f"these payloads do not execute under CPython's pickle.loads: {missing}"
