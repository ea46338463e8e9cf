"""Scheduled notebooks (spec §8) with the unchanged omega|ml 0.18.0 client against om-worker.

- A notebook whose config cell says `run-at` is scheduled by the client's `om.jobs.put()`; a Celery
  client sends `omegaml.notebook.tasks.execute_scripts(now=<after run-at>)` to om-worker, which sends
  `run_omegaml_job(name, event=...)` to its default label, runs the notebook and re-schedules.
- `om.runtime.job(name).schedule(run_at=...)` sends `schedule_omegaml_job`; om-worker stores the
  trigger and config, returns the job's Metadata repr and records state/last_run_time.
- `om-worker worker --beat --beat-interval 2` fires an overdue trigger without any Python beat.

Client steps run in fresh subprocesses configured by env like a user's client (omega_scenarios.client_env).
"""
import datetime
import json
import subprocess

import pytest

from conftest import IMPL, VENV_PY, _NO_CONFIG, short_id, wait_until
from omega_scenarios import client_env

EXECUTE_SCRIPTS = "omegaml.notebook.tasks.execute_scripts"
RUN_WAIT = 180


@pytest.fixture
def label(names):
    return names.queue("omwsched")


@pytest.fixture
def db(mongo):
    import pymongo
    client = pymongo.MongoClient(mongo, serverSelectionTimeoutMS=10000)
    yield client.get_default_database()
    client.close()


@pytest.fixture
def client(mongo, broker, label, tmp_path):
    """client(code) -> the JSON the code prints last, run by the omega|ml client in a subprocess."""
    ctmp = tmp_path / "client-tmp"
    ctmp.mkdir(exist_ok=True)
    env = client_env(mongo, broker.url, label, ctmp, _NO_CONFIG)

    def run(code, timeout=120):
        proc = subprocess.run([str(VENV_PY), "-c", code], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"omega|ml client failed (rc {proc.returncode}):\n{code}\n--- stderr ---\n"
                        f"{proc.stderr[-6000:]}", pytrace=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert lines, f"client printed no JSON:\n{proc.stdout}\n{proc.stderr[-3000:]}"
        return json.loads(lines[-1])

    return run


PUT_NB = """
import json, nbformat, omegaml as om
nb = nbformat.v4.new_notebook()
{config}nb.cells.append(nbformat.v4.new_code_cell("print('scheduled hello')"))
meta = om.jobs.put(nb, {name!r})
a = meta.attributes
print(json.dumps({{"name": meta.name, "config": a.get("config"),
                   "triggers": [dict(t, **{{"run-at": t["run-at"].isoformat()}}) for t in a.get("triggers", [])]}}))
"""

CONFIG_CELL = 'nb.cells.append(nbformat.v4.new_code_cell("# omega-ml:\\n#   run-at: \\"{cron}\\""))\n'


def put_notebook(client, name, cron=None):
    config = CONFIG_CELL.format(cron=cron) if cron else ""
    return client(PUT_NB.format(config=config, name=name))


def job_attrs(db, name):
    doc = db.metadata.find_one({"name": name, "prefix": "jobs/", "bucket": "omegaml"})
    assert doc is not None, f"job {name} missing"
    return doc.get("attributes", {})


def pending(attrs):
    return [t for t in attrs.get("triggers", []) if t.get("status") == "PENDING"]


def assert_ran_and_rescheduled(db, name, cron, now):
    """job_runs OK with a results notebook, and exactly one PENDING trigger at croniter's next after now."""
    from croniter import croniter
    attrs = wait_until(lambda: (lambda a: a if a.get("job_runs") else None)(job_attrs(db, name)),
                       RUN_WAIT, f"a job_runs entry on {name}")
    run = attrs["job_runs"][-1]
    assert run["status"] == "OK", run
    results = db.metadata.find_one({"name": run["results"], "prefix": "jobs/"})
    assert results is not None and results["attributes"]["source_job"] == name, run
    assert run["results"].startswith(f"results/{name}_"), run
    assert attrs["state"] == "SUCCESS", attrs
    want = croniter(cron, now).get_next(datetime.datetime)
    p = pending(attrs)
    assert len(p) == 1, attrs["triggers"]
    assert p[0]["run-at"] == want and p[0]["event"] == want.isoformat(), (p, want)
    assert p[0]["event-kind"] == "scheduled"
    return attrs


def test_config_cell_run_at_fires_via_execute_scripts(broker, label, worker, client, client_factory, db):
    name = f"sched-{short_id()}"
    cron = "*/5 * * * *"
    put = put_notebook(client, name, cron)
    # the client scheduled it (om.jobs.put -> schedule): config + one PENDING trigger
    assert put["config"]["run-at"] == cron, put
    assert len(put["triggers"]) == 1 and put["triggers"][0]["status"] == "PENDING", put
    run_at = datetime.datetime.fromisoformat(put["triggers"][0]["run-at"])

    w = worker(broker.url, [label])
    c = client_factory(broker.url)
    now = run_at + datetime.timedelta(seconds=1)
    res = c.send(EXECUTE_SCRIPTS, label, kwargs={"now": now})
    assert res.get(timeout=60) is None
    attrs = assert_ran_and_rescheduled(db, f"{name}.ipynb", cron, now)
    # omega|ml quirk kept: the fired trigger was replaced before the run, so no OK trigger history
    assert [t["status"] for t in attrs["triggers"]] == ["PENDING"], attrs["triggers"]

    # a second pass before the new run-at fires nothing
    res = c.send(EXECUTE_SCRIPTS, label, kwargs={"now": now + datetime.timedelta(seconds=1)})
    assert res.get(timeout=60) is None
    assert len(job_attrs(db, f"{name}.ipynb")["job_runs"]) == 1
    assert w.alive()


def test_schedule_omegaml_job_via_runtime(broker, label, worker, client, db):
    name = f"sched-{short_id()}"
    put_notebook(client, name)
    worker(broker.url, [label])
    before = datetime.datetime.utcnow()
    out = client(f"""
import json, omegaml as om
r = om.runtime.job({name!r}).schedule(run_at='*/10 * * * *')
print(json.dumps({{"result": r.get(timeout=60), "state": r.state}}))
""")
    after = datetime.datetime.utcnow()
    assert out["state"] == "SUCCESS", out
    assert out["result"].startswith(
        f"<Metadata: Metadata(name={name}.ipynb,bucket=omegaml,prefix=jobs/,kind=script.ipynb,created="), out
    attrs = wait_until(lambda: (lambda a: a if a.get("state") else None)(job_attrs(db, f"{name}.ipynb")),
                       30, "on_success state")
    assert attrs["config"]["run-at"] == "*/10 * * * *", attrs
    from croniter import croniter
    p = pending(attrs)
    assert len(p) == 1, attrs
    lo = croniter("*/10 * * * *", before).get_next(datetime.datetime)
    hi = croniter("*/10 * * * *", after).get_next(datetime.datetime)
    assert lo <= p[0]["run-at"] <= hi, (p, lo, hi)  # never ran: base is utcnow()
    assert attrs["state"] == "SUCCESS" and attrs["last_run_time"] == "*/10 * * * *", attrs
    assert "next_run_time" not in attrs

    if IMPL != "python":
        # natural language: omega|ml parses it, om-worker fails it explicitly (documented)
        out = client(f"""
import json, omegaml as om
r = om.runtime.job({name!r}).schedule(run_at='every 5 minutes')
try:
    r.get(timeout=60); print(json.dumps({{"state": r.state}}))
except Exception as e:
    print(json.dumps({{"state": r.state, "error": type(e).__name__, "message": str(e)}}))
""")
        assert out["state"] == "FAILURE" and out["error"] == "ValueError", out
        assert "natural-language" in out["message"], out
        assert job_attrs(db, f"{name}.ipynb")["config"]["run-at"] == "*/10 * * * *"


def test_beat_fires_overdue_trigger(broker, label, worker, client, db):
    if IMPL == "python":
        pytest.skip("--beat is om-worker's own flag")
    name = f"sched-{short_id()}"
    cron = "* * * * *"
    put_notebook(client, name, cron)
    past = datetime.datetime.now().replace(microsecond=0) - datetime.timedelta(minutes=5)
    db.metadata.update_one({"name": f"{name}.ipynb", "prefix": "jobs/"}, {"$set": {"attributes.triggers": [
        {"event-kind": "scheduled", "event": past.isoformat(), "run-at": past, "status": "PENDING"}]}})
    w = worker(broker.url, [label], extra=["--beat", "--beat-interval", "2"])
    attrs = wait_until(lambda: (lambda a: a if a.get("job_runs") else None)(job_attrs(db, f"{name}.ipynb")),
                       RUN_WAIT, "the beat-fired run")
    assert attrs["job_runs"][-1]["status"] == "OK", attrs["job_runs"]
    p = pending(job_attrs(db, f"{name}.ipynb"))
    assert len(p) == 1 and p[0]["run-at"] > past, p
    assert "beat: sent omegaml.notebook.tasks.execute_scripts" in w.log()
