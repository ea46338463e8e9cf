"""The seed workflow, driven by the unchanged omega|ml client (see scripts/demo.sh).

1. The documented parallel-jobs workflow: a notebook `main` that reads its
   parameter from the generated `_jobdata` and stores a result with
   `om.datasets.put` (one dataset per task); `job.map(range(10))`; `job.status()` polled until every
   task is SUCCESS/OK; the results notebooks listed; the stored values checked.
2. `om.runtime.ping()`: omega|ml's own liveness task through the broker.

The ping comes last on purpose: with `rpc://`, once a client has waited on a
result with `.get()`, its reply-queue consumer takes every later state message,
and `AsyncResult.status` polling (what `job.status()` does) then reads PENDING
forever. omega|ml's Python worker shows the same client behaviour.
"""
import sys
import time

import nbformat
import omegaml as om

N = 10
TIMEOUT = 300


def main() -> int:
    # the main notebook: square the parameter and store it
    # start clean so the demo is repeatable: map() also resubmits unfinished
    # tasks of earlier groups of the same notebook
    for name in om.jobs.list("tasks/main/*") + om.jobs.list("results/tasks/main/*"):
        om.jobs.drop(name, force=True)
    om.jobs.drop("main", force=True)
    for name in om.datasets.list("seed-results/*"):
        om.datasets.drop(name, force=True)
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import omegaml as om\n"
        "param = _jobdata['param']\n"
        "om.datasets.put({'param': param, 'square': param * param}, 'seed-results/%d' % param)\n"
        "print('param', param)"
    ))
    om.jobs.put(nb, "main")

    job = om.runtime.job("main")
    t_map = time.perf_counter()
    job.map(range(N))
    in_map = time.perf_counter() - t_map
    print(f"job.map(range({N})) returned after {in_map:.2f}s")

    deadline = time.time() + TIMEOUT
    while True:
        status = job.status()
        done = ((status["status"] == "SUCCESS") & (status["run_status"] == "OK")).sum()
        failed = (status["run_status"] == "ERROR").sum() + (status["status"] == "FAILURE").sum()
        if done == N or failed or time.time() > deadline:
            break
        time.sleep(0.5)
    makespan = time.perf_counter() - t_map
    print(status.to_string())
    if done != N:
        print(f"seed: {done}/{N} tasks SUCCESS/OK, {failed} failed", file=sys.stderr)
        return 1
    print(f"seed: all {N} tasks SUCCESS/OK; map() -> last SUCCESS in {makespan:.2f}s")

    results = [r for name in status["name"] for r in om.jobs.list(f"results/{name}*")]
    # One dataset per task: notebooks that create the same dataset at the same moment race inside
    # omega|ml's client (one put makes it python.data, the other pandas.rawdict, and get() then
    # returns a half-empty DataFrame), with any worker that runs tasks concurrently.
    values = sorted(d["square"] for name in sorted(om.datasets.list("seed-results/*"))
                    for d in om.datasets.get(name))
    print(f"seed: {len(results)} results notebooks, squares stored by the notebooks: {values}")
    if len(results) < N or values != sorted(i * i for i in range(N)):
        print("seed: results do not match", file=sys.stderr)
        return 1
    last = om.jobs.metadata(status["name"].iloc[0]).attributes["job_runs"][-1]
    print(f"seed: job_runs[-1] = {last}")

    t0 = time.perf_counter()
    reply = om.runtime.ping()
    print(f"om.runtime.ping() -> worker {reply.get('worker')!r} in {time.perf_counter() - t0:.3f}s")
    if reply.get("message") != "ping return message":
        print(f"seed: unexpected ping reply {reply!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
