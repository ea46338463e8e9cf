"""The benchmark's client side: the unchanged omega|ml 0.18.0 client, one scenario per process.

    .venv/bin/python bench/client.py SCENARIO '<json args>'

Scenarios (SCENARIO = latency | drain | map | model):
  latency  R task notebooks created untimed with omega|ml's generator (JobTasks._generate_jobs, what
           job.map() runs first); then R times: idle gap, publish one run_omegaml_job the way
           restart()/job.run() does (om.runtime.require(label).job(task).run()), wait for SUCCESS.
  drain    N task notebooks created untimed the same way; then all N published in one burst
           (same call), timed from the first publish to the last SUCCESS seen by this client.
  map      job.map(range(N), require=label) timed as a whole: time inside map() and makespan
           (map() call -> last SUCCESS seen by this client).
  model    args['op'] = predict | fit: a LinearRegression and its datasets put untimed (X: `rows`
           rows, 2 columns); one untimed warm-up call, then N times: idle gap, then
           om.runtime.require(label).model(name).predict(Xname).get() (or .fit(Xname, Yname).get()),
           timed from the call to the value returned by .get(); the predictions are checked
           against a local predict.

SUCCESS is observed through Celery's own result machinery (ResultSet.join_native with the
configured backend, rpc:// by default): the time a task's final state message reaches this client.
After the run every task notebook's last job_runs entry is checked for status OK.

Env: OMEGA_MONGO_URL, OMEGA_BROKER, OMEGA_RESULT_BACKEND (set by bench/run.py). The result is
written as JSON to args['out'].
"""
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NB_CODE = (
    "import omegaml as om\n"
    "param = _jobdata['param']\n"
    "om.datasets.put({{'param': param, 'square': param * param}}, '{ds}')\n"
    "print('param', param)"
)


def main():
    scenario = sys.argv[1]
    args = json.loads(sys.argv[2])
    out = {"scenario": scenario, "args": args, "ok": False}
    try:
        run(scenario, args, out)
        out["ok"] = not out.get("errors")
    except Exception as e:
        out["errors"] = out.get("errors", []) + [f"{type(e).__name__}: {e}", traceback.format_exc()[-3000:]]
    Path(args["out"]).write_text(json.dumps(out, indent=1, default=str))
    return 0 if out["ok"] else 1


def run(scenario, args, out):
    import nbformat
    import omegaml as om
    from celery.result import AsyncResult, ResultSet

    label = args["label"]
    nbname = label
    ds = f"{label}-results"
    app = om.runtime.celeryapp
    if scenario == "model":
        return run_model(om, app, args, out)
    out["client"] = {"broker": _mask(app.conf.broker_url), "backend": app.conf.result_backend,
                     "reply_queue": getattr(app.backend, "oid", None), "pid": os.getpid()}

    # -- untimed setup: the seed notebook, its dataset (pre-created: concurrent first puts into a new
    #    dataset collide in omega|ml), connections warmed up
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(NB_CODE.format(ds=ds)))
    om.jobs.put(nb, nbname)
    om.datasets.put({"param": -1, "square": 1}, ds)
    job = om.runtime.job(nbname)
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)

    secantus_pid = args.get("secantus_pid")
    worker_pids = args.get("worker_pids") or []
    timeout = float(args.get("timeout", 300))

    def cpu_snapshot():
        return {"secantus_s": common.cpu_seconds(secantus_pid, children=True) if secantus_pid else None,
                "worker_tree_s": common.tree_cpu_seconds(worker_pids) if worker_pids else None,
                # the worker process(es) alone, without fork server, kernels or prefork children
                "worker_proc_s": sum(common.cpu_seconds(p) or 0.0 for p in worker_pids) if worker_pids else None,
                "client_s": time.process_time()}

    def cpu_delta(a, b):
        return {k: (round(b[k] - a[k], 3) if a[k] is not None and b[k] is not None else None) for k in a}

    def wait(results, deadline_s):
        """Block until every result is final; {task_id: (status, t_seen)} via join_native."""
        final = {}

        def on_message(meta):
            st = meta.get("status")
            if st in ("SUCCESS", "FAILURE", "REVOKED"):
                final.setdefault(meta.get("task_id"), (st, time.perf_counter()))

        def on_result(tid, _value):
            final.setdefault(tid, ("SUCCESS", time.perf_counter()))

        try:
            ResultSet(list(results)).join_native(timeout=deadline_s, propagate=False, on_message=on_message,
                                                 callback=on_result, interval=0.05)
        except Exception as e:  # celery.exceptions.TimeoutError and friends
            out.setdefault("errors", []).append(
                f"waiting for results: {type(e).__name__}: {e} ({len(final)}/{len(results)} final)")
        return final

    def publish(task_nb):
        return om.runtime.require(label).job(task_nb).run()

    def verify(task_names):
        ok = 0
        for t in task_names:
            runs = (om.jobs.metadata(t).attributes or {}).get("job_runs") or []
            ok += bool(runs) and runs[-1].get("status") == "OK"
        return ok

    if scenario in ("latency", "drain"):
        n = int(args["n"])
        job._generate_jobs(nbname, range(n))  # omega|ml's own task-notebook generator, untimed
        tasks = job.list()
        if len(tasks) != n:
            raise RuntimeError(f"generator made {len(tasks)} task notebooks, expected {n}")
        # job.list() sorts by name: tasks/x/g-0, g-1, g-10, ...; keep param order for readability
        tasks.sort(key=lambda s: int(s.rsplit("-", 1)[1].split(".")[0]))

    # untimed setup done: tell bench/run.py, wait for its go (the worker is ready and idle by then)
    if args.get("ready_file"):
        Path(args["ready_file"]).write_text("ready")
        deadline = time.monotonic() + float(args.get("go_timeout", 600))
        while not os.path.exists(args["go_file"]):
            if time.monotonic() > deadline:
                raise RuntimeError("no go signal from bench/run.py")
            time.sleep(0.05)

    if scenario == "latency":
        gap = float(args.get("gap", 2.0))
        runs = []
        for t in tasks:
            time.sleep(gap)
            t0 = time.perf_counter()
            res = publish(t)
            t_pub = time.perf_counter()
            final = wait([res], timeout)
            st, t_done = final.get(res.id, ("TIMEOUT", None))
            runs.append({"task_id": res.id, "status": st, "publish_s": round(t_pub - t0, 4),
                         "latency_s": round(t_done - t0, 4) if t_done else None})
            if st != "SUCCESS":
                break
        out["runs"] = runs
        out["verified_ok"] = verify(tasks)
        out["n"] = len(tasks)

    elif scenario == "drain":
        c0 = cpu_snapshot()
        t0 = time.perf_counter()
        results, t_pub = [], {}
        for t in tasks:
            res = publish(t)
            t_pub[res.id] = time.perf_counter()
            results.append(res)
        t_published = time.perf_counter()
        final = wait(results, timeout)
        c1 = cpu_snapshot()
        succ = {tid: v for tid, v in final.items() if v[0] == "SUCCESS"}
        last = max((v[1] for v in succ.values()), default=None)
        out.update({
            "n": n, "succeeded": len(succ), "failed": sum(1 for v in final.values() if v[0] != "SUCCESS"),
            "publish_burst_s": round(t_published - t0, 4),
            "wall_s": round(last - t0, 4) if last else None,
            "throughput": round(len(succ) / (last - t0), 4) if last and succ else None,
            "per_task": [{"task_id": r.id, "published_s": round(t_pub[r.id] - t0, 4),
                          "status": final.get(r.id, ("TIMEOUT", None))[0],
                          "latency_s": round(final[r.id][1] - t_pub[r.id], 4) if r.id in final else None,
                          "done_s": round(final[r.id][1] - t0, 4) if r.id in final else None}
                         for r in results],
            "cpu": cpu_delta(c0, c1),
        })
        out["verified_ok"] = verify(tasks)

    elif scenario == "map":
        n = int(args["n"])
        c0 = cpu_snapshot()
        t0 = time.perf_counter()
        metas = job.map(range(n), require=label)
        t_map = time.perf_counter() - t0
        ids = [m.attributes["job"]["task_id"] for m in metas]
        results = [AsyncResult(tid, app=app) for tid in ids]
        final = wait(results, timeout)
        c1 = cpu_snapshot()
        succ = {tid: v for tid, v in final.items() if v[0] == "SUCCESS"}
        last = max((v[1] for v in succ.values()), default=None)
        tasks = job.list()
        out.update({
            "n": n, "published": len(ids), "succeeded": len(succ),
            "failed": sum(1 for v in final.values() if v[0] != "SUCCESS"),
            "time_in_map_s": round(t_map, 4),
            "makespan_s": round(last - t0, 4) if last else None,
            "done_s": sorted(round(v[1] - t0, 4) for v in succ.values()),
            "cpu": cpu_delta(c0, c1),
        })
        out["verified_ok"] = verify(tasks)
    elif scenario == "model":
        pass  # run_model() below, before the notebook setup
    else:
        raise ValueError(f"unknown scenario {scenario!r}")


def run_model(om, app, args, out):
    """The `model` scenario: idle latency of om.runtime.model(...).predict / .fit, call -> .get()."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LinearRegression

    label, op, n = args["label"], args.get("op", "predict"), int(args["n"])
    rows, gap, timeout = int(args.get("rows", 100)), float(args.get("gap", 1.0)), float(args.get("timeout", 300))
    out["client"] = {"broker": _mask(app.conf.broker_url), "backend": app.conf.result_backend,
                     "reply_queue": getattr(app.backend, "oid", None), "pid": os.getpid()}
    X = pd.DataFrame({"x1": np.arange(float(rows)), "x2": np.arange(float(rows)) % 7})
    Y = pd.DataFrame({"y": 2 * X["x1"] - X["x2"] + 1})
    xname, yname, mname = f"{label}-X", f"{label}-Y", f"{label}-m"
    om.datasets.put(X, xname, append=False)
    om.datasets.put(Y, yname, append=False)
    om.models.put(LinearRegression().fit(X, Y), mname)
    expected = LinearRegression().fit(X, Y).predict(X).ravel()
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)

    def call():
        mdl = om.runtime.require(label).model(mname)
        return mdl.predict(xname) if op == "predict" else mdl.fit(xname, yname)

    def check(value):
        if op == "predict":
            return bool(np.allclose(np.asarray(value, dtype=float).ravel(), expected))
        return isinstance(value, str) and value.startswith("<Metadata")

    if args.get("ready_file"):
        Path(args["ready_file"]).write_text("ready")
        deadline = time.monotonic() + float(args.get("go_timeout", 600))
        while not os.path.exists(args["go_file"]):
            if time.monotonic() > deadline:
                raise RuntimeError("no go signal from bench/run.py")
            time.sleep(0.05)

    warm = call()  # untimed: the first call also pays the client's own first-use setup
    if not check(warm.get(timeout=timeout)):
        raise RuntimeError(f"warm-up {op} returned a wrong value")
    runs = []
    for _ in range(n):
        time.sleep(gap)
        t0 = time.perf_counter()
        res = call()
        t_pub = time.perf_counter()
        try:
            value = res.get(timeout=timeout)
            st = "SUCCESS" if check(value) else "WRONG"
        except Exception as e:  # noqa: BLE001 - reported, not raised
            st = f"{type(e).__name__}: {str(e)[:200]}"
        t_done = time.perf_counter()
        runs.append({"task_id": res.id, "status": st, "publish_s": round(t_pub - t0, 4),
                     "latency_s": round(t_done - t0, 4)})
        if st != "SUCCESS":
            out.setdefault("errors", []).append(f"{op}: {st}")
            break
    out["runs"] = runs
    out["n"] = n
    out["verified_ok"] = sum(r["status"] == "SUCCESS" for r in runs)


def _mask(url):
    import re
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", str(url))


if __name__ == "__main__":
    sys.exit(main())
