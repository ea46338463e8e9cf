"""The notebook path (issue 4 §4) end to end: the unchanged omega|ml 0.18.0 client's `job.map()`,
`job.status()`, `job.restart()`, `job.list()` and `om.runtime.job(name).run()` against om-worker, on
RabbitMQ and Redis, result backend rpc://.

Every client step runs in a fresh subprocess (omega_scenarios.py) configured by env exactly as a
user's client: OMEGA_WORKER_LABEL / CELERY_Q = a unique label per test, so `job.map()` publishes to
that label and only this test's om-worker (`-Q <label> -c 2`) consumes it. Notebook names are unique
per test; N is small because every task starts a fresh kernel (seconds of CPU each).
"""
import datetime
import re

import pytest

from conftest import VENV_PY, _NO_CONFIG, short_id, wait_until
from omega_scenarios import Scenario, client_env, run_scenario

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?"
CONCURRENCY = 2
WAIT = 180  # generous bound for a handful of kernels on a 2-core box


def results_name_re(task):
    return re.compile("^results/" + re.escape(task) + "_" + f"({TS})" + r"\.ipynb$")


@pytest.fixture
def label(names):
    return names.queue("omwjob")


@pytest.fixture
def scenario(mongo, broker, tmp_path):
    """scenario(name, args, label, hold=False) -> result dict (or a Scenario when hold=True)."""

    def run(name, args, label, hold=False, timeout=240):
        env = client_env(mongo, broker.url, label, tmp_path / "client-tmp", _NO_CONFIG)
        (tmp_path / "client-tmp").mkdir(exist_ok=True)
        if hold:
            return Scenario(VENV_PY, name, dict(args, hold=True), env, tmp_path, timeout=timeout)
        return run_scenario(VENV_PY, name, args, env, tmp_path, timeout=timeout)

    return run


@pytest.fixture
def db(mongo):
    import pymongo
    client = pymongo.MongoClient(mongo, serverSelectionTimeoutMS=10000)
    yield client.get_default_database()
    client.close()


def assert_queue_drained(broker, queue):
    state = wait_until(lambda: (lambda s: s if (s["ready"], s["unacked"]) == (0, 0) else None)(broker.queue_state(queue)),
                       30, f"queue {queue} empty and nothing unacked")
    assert (state["ready"], state["unacked"]) == (0, 0), state


def assert_ok_run(task, d, task_id=None):
    """The task notebook's metadata after a successful run (spec §10 items 10-13)."""
    assert d["exists"], f"task notebook {task} vanished"
    attrs = d["attributes"]
    assert len(d["results"]) == 1, f"{task}: results notebooks {d['results']}"
    rname = d["results"][0]
    m = results_name_re(task).match(rname)
    assert m, f"results name {rname!r} does not have the form results/<task>_<str(ts)>.ipynb"
    run = attrs["job_runs"][-1]
    assert run["status"] == "OK", run
    assert run["message"] == "...", f"OK run message {run['message']!r} (omega|ml 0.18: f'{{m[:80]}}...{{m[-80:]}}' of '')"
    assert run["results"] == rname == attrs["job_results"][-1], (run, attrs.get("job_results"))
    assert d["ts_types"][-1] == "datetime", f"job_runs[-1].ts is a {d['ts_types'][-1]}, not a datetime"
    # BSON dates hold milliseconds: the name keeps the microseconds, ts is truncated to ms
    ts = datetime.datetime.fromisoformat(run["ts"]["$datetime"])
    name_ts = datetime.datetime.fromisoformat(m.group(1))
    assert ts == name_ts.replace(microsecond=name_ts.microsecond // 1000 * 1000), \
        f"job_runs[-1].ts {ts} is not the results name's timestamp {name_ts} truncated to ms"
    assert attrs["state"] == "SUCCESS", attrs
    assert attrs["task_id"] == attrs["job"]["task_id"], attrs
    if task_id:
        assert attrs["task_id"] == task_id, (attrs["task_id"], task_id)
    assert attrs["job"]["status"] == "finished", f"attributes.job.status {attrs['job']['status']!r}: the kernel's done cell sets 'finished' and the worker must not overwrite it"
    assert "last_run_time" not in attrs and "next_run_time" not in attrs, attrs
    rmeta = d["results_meta"][rname]
    assert (rmeta["kind"], rmeta["prefix"], rmeta["bucket"]) == ("script.ipynb", "jobs/", "omegaml"), rmeta
    assert rmeta["attributes"] == {"source_job": task}, rmeta
    return rname


def test_map_workflow_restart_and_views(broker, worker, label, scenario, db):
    """The documented parallel-jobs workflow: a notebook reading `_jobdata['param']` and storing a
    dataset; `job.map(range(3))`; `job.status()` polled to all SUCCESS/OK; results notebooks, stored
    values and task metadata as omega|ml's worker leaves them. A second `job.map([3])` from the same
    client makes a second task group (and resubmits nothing of the first); `job.list()`,
    `job.list(task_group='*')` and `job.status(task_group='*')` show one group resp. both. Then, in a
    new client process, `job.restart()` after dropping one task's results notebook reruns exactly
    that task, and the views show every group."""
    worker(broker.url, [label], concurrency=CONCURRENCY)
    nb, ds = f"wf-{short_id()}", f"wf-ds-{short_id()}"
    code = ("import omegaml as om\n"
            "param = _jobdata['param']\n"
            # one dataset per task: concurrent first puts to one new dataset race on its metadata
            # (NotUniqueError inside the notebook, with any worker)
            f"om.datasets.put({{'param': param, 'square': param * param}}, '{ds}-%d' % param)\n"
            "print('param', param)")
    n = 3
    res = scenario("map", {"put": {nb: [code]}, "nb": nb, "params": list(range(n)), "again": [n],
                           "datasets": [f"{ds}-{i}" for i in range(n + 1)], "lists": True,
                           "wait_timeout": WAIT}, label)
    assert res["client"]["default_queue"] == label, f"the client did not take OMEGA_WORKER_LABEL as its default queue: {res['client']}"
    group = res["task_group"]
    tasks = [f"tasks/{nb}/{group}-{i}.ipynb" for i in range(n)]
    assert res["submitted"] == tasks, res["submitted"]
    final = res["final"]
    assert not final["timed_out"], f"job.status() after {WAIT}s: {final['rows']}"
    assert res["unsettled"] == [], f"attributes.state/task_id not written 30s after SUCCESS: {res['unsettled']}"
    assert [(r["name"], r["status"], r["run_status"]) for r in final["rows"]] == [(t, "SUCCESS", "OK") for t in tasks], final["rows"]
    for r in final["rows"]:
        assert r["task_id"] == res["task_ids"][r["name"]], r
    first_results = {}
    for t in tasks:
        first_results[t] = assert_ok_run(t, res["details"][t], res["task_ids"][t])
        job = res["details"][t]["attributes"]["job"]
        i = int(t.rsplit("-", 1)[1].split(".")[0])
        assert {k: job[k] for k in ("param", "job_id", "task_group", "task_name")} == \
            {"param": i, "job_id": i, "task_group": group, "task_name": t[:-len(".ipynb")]}, job
        assert len(res["details"][t]["attributes"]["job_runs"]) == 1
    # the second map(): a new group with one task; the first group's tasks are not resubmitted
    again = res["again"]
    g2 = again["task_group"]
    t2 = f"tasks/{nb}/{g2}-0.ipynb"
    assert g2 != group and again["submitted"] == [t2], again["submitted"]
    assert not again["final"]["timed_out"], again["final"]
    assert again["unsettled"] == [], again["unsettled"]
    assert [(r["name"], r["status"], r["run_status"]) for r in again["final"]["rows"]] == [(t2, "SUCCESS", "OK")]
    first_results[t2] = assert_ok_run(t2, again["details"][t2], again["task_ids"][t2])
    assert again["details"][t2]["attributes"]["job"]["param"] == n
    stored = sorted((d["param"], d["square"]) for name in res["datasets"] for d in res["datasets"][name])
    assert stored == [(i, i * i) for i in range(n + 1)], f"values stored by the notebooks: {stored}"
    # views from the client that ran both map() calls: list() = the last group, '*' = all groups
    assert res["list"] == [t2], res["list"]
    assert sorted(res["list_all"]) == sorted(tasks + [t2]), res["list_all"]
    assert sorted((r["name"], r["status"], r["run_status"]) for r in res["status_all"]) == \
        sorted((t, "SUCCESS", "OK") for t in tasks + [t2]), res["status_all"]
    assert_queue_drained(broker, label)

    # -- new client: job.restart() after dropping one task's results notebook reruns exactly that task
    victim = tasks[1]
    others = [t for t in tasks + [t2] if t != victim]
    before = {t: db.metadata.find_one({"name": t, "prefix": "jobs/"}) for t in others}
    rs = scenario("restart", {"nb": nb, "drop": [first_results[victim]], "lists": True, "wait_timeout": WAIT}, label)
    assert rs["submitted"] == [victim], f"restart() resubmitted {rs['submitted']}, expected only {victim}"
    rows = {r["name"]: r for r in rs["final"]["rows"]}
    assert not rs["final"]["timed_out"], rs["final"]
    assert rs["unsettled"] == [], rs["unsettled"]
    assert (rows[victim]["status"], rows[victim]["run_status"]) == ("SUCCESS", "OK"), rows[victim]
    assert rows[victim]["task_id"] == rs["task_ids"][victim] != res["task_ids"][victim], rows[victim]
    d = rs["details"][victim]
    new = assert_ok_run(victim, d, rs["task_ids"][victim])
    assert new != first_results[victim], "restart did not produce a new results notebook"
    assert len(d["attributes"]["job_runs"]) == 2 and len(d["attributes"]["job_results"]) == 2, d["attributes"]
    assert d["attributes"]["job_runs"][0]["results"] == first_results[victim]  # history kept
    for t in others:
        assert rs["details"][t]["results"] == [first_results[t]], rs["details"][t]["results"]
        after = db.metadata.find_one({"name": t, "prefix": "jobs/"})
        assert after == before[t], f"{t} changed although restart() did not resubmit it"
        # another client process submitted these: rpc:// results are not visible here
        assert (rows[t]["status"], rows[t]["run_status"]) == ("PENDING", "OK"), rows[t]
    # a fresh client has no current group: list() and list('*') are all groups
    assert sorted(rs["list"]) == sorted(rs["list_all"]) == sorted(tasks + [t2]), rs
    assert {r["name"]: (r["status"], r["run_status"]) for r in rs["status_all"]} == \
        {t: ("SUCCESS" if t == victim else "PENDING", "OK") for t in tasks + [t2]}, rs["status_all"]
    assert_queue_drained(broker, label)


def test_raising_notebook(broker, worker, label, scenario):
    """A cell raises: Celery SUCCESS, run_status ERROR, job_runs[-1].message in omega|ml 0.18's
    f'{s[:80]}...{s[-80:]}' form of str(CellExecutionError), a results notebook with the error output,
    attributes.job.status stays 'pending' (the done cell never ran)."""
    worker(broker.url, [label], concurrency=CONCURRENCY)
    nb = f"raise-{short_id()}"
    cells = ["x = _jobdata['param'] + 1", "raise ValueError('omw intentional failure %d' % x)", "print('not reached')"]
    res = scenario("map", {"put": {nb: cells}, "nb": nb, "params": [41], "notebooks": True,
                           "wait_timeout": WAIT}, label)
    task = f"tasks/{nb}/{res['task_group']}-0.ipynb"
    final = res["final"]
    assert not final["timed_out"], final
    assert res["unsettled"] == [], res["unsettled"]
    assert [(r["name"], r["status"], r["run_status"]) for r in final["rows"]] == [(task, "SUCCESS", "ERROR")], final["rows"]
    d = res["details"][task]
    attrs = d["attributes"]
    run = attrs["job_runs"][-1]
    assert run["status"] == "ERROR", run
    msg = run["message"]
    assert len(msg) == 80 + 3 + 80 and msg[80:83] == "...", f"message is not first80...last80: {msg!r}"
    head = "An error occurred while executing the following cell:\n------------------\n" + cells[1]
    assert msg[:80] == head[:80], f"message head {msg[:80]!r} is not str(CellExecutionError)[:80] {head[:80]!r}"
    plain = ANSI.sub("", msg)
    assert plain.rstrip().endswith("ValueError: omw intentional failure 42"), f"message tail {plain[-80:]!r}"
    assert len(d["results"]) == 1 and run["results"] == d["results"][0] == attrs["job_results"][-1], (run, d["results"])
    assert results_name_re(task).match(run["results"]), run["results"]
    assert d["ts_types"][-1] == "datetime"
    assert attrs["state"] == "SUCCESS" and attrs["task_id"] == attrs["job"]["task_id"], attrs
    assert attrs["job"]["status"] == "pending", attrs["job"]
    rnb = d["results_nb"][run["results"]]
    code_cells = [c for c in rnb["cells"] if c["cell_type"] == "code"]
    errors = [o for c in code_cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert len(errors) == 1, f"error outputs in the results notebook: {errors}"
    assert (errors[0]["ename"], errors[0]["evalue"]) == ("ValueError", "omw intentional failure 42"), errors[0]
    assert any("omw intentional failure 42" in ANSI.sub("", line) for line in errors[0]["traceback"]), errors[0]
    # the cell after the failing one (and the generated done cell) did not run
    assert [c.get("execution_count") for c in code_cells] == [1, 2, 3, None, None], \
        [(c["source"][:30], c.get("execution_count")) for c in code_cells]
    assert_queue_drained(broker, label)


def test_map_require_label(broker, worker, label, names, scenario):
    """map(..., require='gpu-<id>') goes to queue gpu-<id>: a worker on the client's default label only
    does not take it (the task stays PENDING and the message stays in the queue); a worker started on
    the gpu label then runs it."""
    worker(broker.url, [label], concurrency=CONCURRENCY)
    gpu = names.queue("gpu")
    nb = f"gpu-{short_id()}"
    sc = scenario("map", {"put": {nb: ["print('on', _jobdata['param'])"]}, "nb": nb, "params": [7],
                          "require": gpu, "observe": 3, "wait_timeout": WAIT}, label, hold=True)
    try:
        ev = sc.event()
        task = f"tasks/{nb}/{ev['task_group']}-0.ipynb"
        assert ev["client"]["default_queue"] == label
        observed = [[(r["name"], r["status"], r["run_status"]) for r in rows] for rows in ev["observed"]]
        assert observed and all(rows == [(task, "PENDING", "unknown")] for rows in observed), observed
        state = broker.queue_state(gpu)
        assert (state["ready"], state["unacked"]) == (1, 0), f"queue {gpu}: {state}"
        assert broker.queue_state(label)["ready"] == 0
        worker(broker.url, [gpu], concurrency=CONCURRENCY)
        sc.go()
        res = sc.result()
    finally:
        sc.kill()
    final = res["final"]
    assert not final["timed_out"], final
    assert res["unsettled"] == [], res["unsettled"]
    assert [(r["name"], r["status"], r["run_status"]) for r in final["rows"]] == [(task, "SUCCESS", "OK")]
    assert_ok_run(task, res["details"][task], res["task_ids"][task])
    assert_queue_drained(broker, gpu)


def test_missing_job_fails(broker, worker, label, scenario, db):
    """A task for a notebook deleted after submit, and one for a name that never existed (the client's
    om.runtime.job(name) refuses it, so it is sent as OmegaJobProxy.run() sends it): Celery
    FAILURE, the client's .get() raises AssertionError('Cannot run non-existent jobs <name>'), and no
    metadata is (re)created."""
    gone, missing = f"gone-{short_id()}", f"nonexistent-{short_id()}"
    sc = scenario("run", {"put": {gone: ["print('never runs')"]}, "names": [gone], "absent": [missing],
                          "drop_after_submit": [gone], "get_timeout": 60}, label, hold=True)
    try:
        ev = sc.event()
        assert ev["client"]["default_queue"] == label
        assert ev["proxy_refused"] == {missing: f"jobs/{missing} does not exist"}, ev
        assert broker.queue_state(label)["ready"] == 2
        worker(broker.url, [label], concurrency=CONCURRENCY)  # started after submit and drop
        sc.go()
        res = sc.result()
    finally:
        sc.kill()
    for name in (gone, missing):
        o = res["outcomes"][name]
        assert o["state"] == "FAILURE", o
        assert (o["exc_type"], o["exc_module"]) == ("AssertionError", "builtins"), o
        assert o["exc_str"] == f"Cannot run non-existent jobs {name}", o
        assert not o["metadata_exists"], o
        assert db.metadata.count_documents({"name": {"$regex": "^(results/)?" + re.escape(name)}}) == 0
    assert_queue_drained(broker, label)
