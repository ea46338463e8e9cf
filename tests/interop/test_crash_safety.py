"""Crash safety of notebook tasks (the in-flight ledger, src/ledger.rs), on RabbitMQ and Redis.

omega|ml's Python worker acks a task when it starts, so `kill -9` loses the running notebook.
om-worker records the message in MongoDB (`om_worker_inflight`) before acking and renews a lease
while it runs; another worker re-queues tasks whose lease ran out. These tests kill a worker with
notebooks in flight and check from MongoDB and from the omega|ml client's data that every task ran
to completion exactly once.
"""
import json
import os
import signal
import subprocess
import textwrap
import time

import pymongo
import pytest

from conftest import VENV_PY, wait_until

LEASE = "3"


def client(script, env, timeout=120):
    """Runs omega|ml client code in a fresh process (the unchanged client, reading its env)."""
    proc = subprocess.run([str(VENV_PY), "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def client_env(mongo, broker, label):
    env = dict(os.environ)
    env.update(OMEGA_MONGO_URL=mongo, OMEGA_BROKER=broker.url, OMEGA_RESULT_BACKEND="rpc://",
               OMEGA_WORKER_LABEL=label)
    return env


def db(mongo):
    return pymongo.MongoClient(mongo, serverSelectionTimeoutMS=5000).get_default_database()


MAP_SLEEPY = """
    import json, nbformat
    import omegaml as om
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import time, omegaml as om\\n"
        "time.sleep(5)\\n"
        # one dataset per task: concurrent first puts into one new dataset collide in omega|ml
        "om.datasets.put({{'param': _jobdata['param']}}, '{name}-out-%s' % _jobdata['param'])"))
    om.jobs.put(nb, '{name}')
    job = om.runtime.job('{name}')
    job.map(range({n}))
    print(json.dumps(sorted(om.jobs.list('tasks/{name}/*'))))
"""


@pytest.mark.parametrize("in_flight", [1, 3])
def test_kill_9_mid_run_loses_and_duplicates_nothing(broker, worker, mongo, names, in_flight):
    label = names.queue("crash")
    name = f"crash{names.queue('nb')[-8:]}"
    a = worker(broker.url, [label], name=f"victim-{name}@%h", concurrency=in_flight,
               extra=["--lease-seconds", LEASE])
    tasks = client(MAP_SLEEPY.format(name=name, n=in_flight), client_env(mongo, broker, label))
    assert len(tasks) == in_flight
    d = db(mongo)
    # all tasks recorded as in flight on the victim, i.e. acked by the broker and running
    wait_until(lambda: d.om_worker_inflight.count_documents({"owner": a.nodename}) == in_flight, 60,
               f"{in_flight} tasks in flight on {a.nodename}")
    a.kill()  # SIGKILL
    wait_until(lambda: not a.alive(), 10, "victim gone")
    worker(broker.url, [label], name=f"rescuer-{name}@%h", concurrency=2, extra=["--lease-seconds", LEASE])

    def all_ran():
        docs = list(d.metadata.find({"name": {"$in": tasks}}))
        return len(docs) == in_flight and all(doc["attributes"].get("job_runs") for doc in docs)

    wait_until(all_ran, 180, "every task ran to completion after the crash")
    time.sleep(2 * float(LEASE))  # time for any duplicate to show up
    for doc in d.metadata.find({"name": {"$in": tasks}}):
        runs = doc["attributes"]["job_runs"]
        assert len(runs) == 1, f"{doc['name']} ran {len(runs)} times: {runs}"
        assert runs[0]["status"] == "OK", runs
        assert doc["attributes"]["state"] == "SUCCESS"
        results = d.metadata.count_documents({"name": {"$regex": "^results/" + doc["name"].replace(".", r"\.")}})
        assert results == 1, f"{doc['name']}: {results} results notebooks"
    out = client(f"""
        import json, omegaml as om
        print(json.dumps(sorted(d['param'] for i in range({in_flight})
                                for d in om.datasets.get('{name}-out-%d' % i))))
    """, client_env(mongo, broker, label))
    assert out == list(range(in_flight)), f"values stored by the notebooks: {out}"
    assert d.om_worker_inflight.count_documents({"_id": {"$in": _task_ids(d, tasks)}}) == 0


def _task_ids(d, tasks):
    return [doc["attributes"].get("task_id") for doc in d.metadata.find({"name": {"$in": tasks}})]


def test_requeued_task_whose_run_is_recorded_is_not_run_again(broker, worker, mongo, names):
    """A worker that dies after recording the run but before clearing its ledger record: the record
    expires, the task is re-queued, and the next worker sees the recorded run and does not run it."""
    label = names.queue("idem")
    name = f"idem{names.queue('nb')[-8:]}"
    w = worker(broker.url, [label], concurrency=1, extra=["--lease-seconds", LEASE])
    env = client_env(mongo, broker, label)
    tasks = client(MAP_SLEEPY.format(name=name, n=1).replace("time.sleep(5)", "pass"), env)
    d = db(mongo)
    wait_until(lambda: (d.metadata.find_one({"name": tasks[0]}) or {}).get("attributes", {}).get("job_runs"),
               120, "the task ran")
    doc = d.metadata.find_one({"name": tasks[0]})
    task_id = doc["attributes"]["task_id"]
    # The record a worker that died right after record_run() would leave behind (JSON protocol v2).
    body = json.dumps([[tasks[0]], {"timeout": None, "pure_python": False, "__bucket": None},
                       {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()
    headers = json.dumps({"lang": "py", "task": "omegaml.notebook.tasks.run_omegaml_job", "id": task_id,
                          "retries": 0, "timelimit": [None, None], "root_id": task_id})
    from bson import Binary
    d.om_worker_inflight.insert_one({
        "_id": task_id, "owner": "dead@nowhere", "lease_until": 0, "queue": label, "attempts": 1,
        "message": {"body": Binary(body), "content_type": "application/json", "content_encoding": "utf-8",
                    "headers": headers, "correlation_id": task_id, "reply_to": None, "priority": None},
    })
    d.om_worker_inflight.update_one({"_id": task_id}, {"$currentDate": {"lease_until": True}})
    wait_until(lambda: "run already recorded" in w.log(), 60, "the re-queued task seen as done")
    wait_until(lambda: d.om_worker_inflight.count_documents({"_id": task_id}) == 0, 30, "ledger cleared")
    runs = d.metadata.find_one({"name": tasks[0]})["attributes"]["job_runs"]
    assert len(runs) == 1, runs


def _http_status(port, path):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_warm_shutdown_is_not_ready_but_alive_while_tasks_drain(broker, worker, mongo, names):
    """Kubernetes probes: /readyz turns 503 as soon as a warm shutdown begins (no new work), while
    /healthz stays 200 until the running tasks are done and the worker exits (a liveness probe
    must not kill the drain); both 200 while consuming."""
    from conftest import free_port
    label = names.queue("drain")
    name = f"drain{names.queue('nb')[-8:]}"
    port = free_port()
    w = worker(broker.url, [label], name=f"{name}@%h", concurrency=1,
               extra=["--metrics-addr", f"127.0.0.1:{port}"])
    wait_until(lambda: _http_status(port, "/readyz") == 200, 30, "/readyz 200 while consuming")
    assert _http_status(port, "/healthz") == 200
    tasks = client(MAP_SLEEPY.format(name=name, n=1), client_env(mongo, broker, label))
    d = db(mongo)
    wait_until(lambda: d.om_worker_inflight.count_documents({"owner": w.nodename}) == 1, 60,
               "the task running")
    os.kill(w.pid, signal.SIGTERM)
    wait_until(lambda: "warm shutdown" in w.log(), 10, "warm shutdown begun")
    assert _http_status(port, "/readyz") == 503, "a draining worker must not be ready"
    assert _http_status(port, "/healthz") == 200, "a draining worker is alive"
    assert w.alive(), "the worker waits for its running task"
    w.proc.wait(timeout=90)
    doc = d.metadata.find_one({"name": tasks[0]})
    runs = doc["attributes"]["job_runs"]
    assert [r["status"] for r in runs] == ["OK"], runs
