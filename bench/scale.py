"""Scale-out: 1, 2, 4, 8 om-worker processes on one queue (issue 15).

Each worker runs one task at a time (-c 1); each task is a job notebook that sleeps, so the two cores
of this machine are not what limits throughput and the workers, not the CPU, are measured. For k
workers the unchanged omega|ml client publishes 4·k tasks (`job._generate_jobs`, then one
`job.run()` per task notebook, as `job.map()` does); ideal throughput grows linearly with k.

Checked per run, from the workers' JSON logs and MongoDB: every task succeeded, no task ran twice
(one `task succeeded` line over all workers, one `job_runs` entry per task notebook), and how evenly
the tasks spread over the workers. Then a scale-down: 8 workers, 6·8 tasks, SIGTERM to half of them
once a third of the results are in (a warm shutdown: running tasks finish, held messages go back);
nothing may be lost or run twice.

    .venv/bin/python bench/scale.py [--brokers amqp,redis] [--workers 1,2,4,8] [--sleep 4]
                                    [--markdown BENCHMARKS.md] [--json out.json]

Uses OM_WORKER_BIN (default target/release/om-worker).
"""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import BenchError, log  # noqa: E402

PER_WORKER = 4
SCALE_DOWN_PER_WORKER = 6


def notebook(sleep_s):
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(f"import time\nparam = _jobdata['param']\ntime.sleep({sleep_s})\n"
                                              "print('param', param)"))
    return nb


def succeeded_ids(worker):
    """Task ids of the 'task succeeded' lines in one om-worker's JSON log."""
    ids = []
    for line in worker.log().splitlines():
        if not line.startswith("{") or "task succeeded" not in line:
            continue
        try:
            fields = json.loads(line).get("fields") or {}
        except ValueError:
            continue
        # "task succeeded in 4.123s"
        if str(fields.get("message", "")).startswith("task succeeded") and fields.get("task_id"):
            ids.append(fields["task_id"])
    return ids


def wait_results(results, timeout, on_progress=None):
    """{task_id: (state, seen_at)} once every result is final (or the timeout passed)."""
    final = {}
    deadline = time.monotonic() + timeout
    while len(final) < len(results) and time.monotonic() < deadline:
        for r in results:
            if r.id not in final and r.state in ("SUCCESS", "FAILURE", "REVOKED"):
                final[r.id] = (r.state, time.monotonic())
        if on_progress:
            on_progress(len(final))
        time.sleep(0.1)
    return final


def run_once(om, mongo, run_dir, broker, k, sleep_s, per_worker, scale_down=False):
    label = f"scale-{common.short_id()}"
    n = per_worker * k
    res = {"broker": broker, "workers": k, "n": n, "sleep_s": sleep_s, "scale_down": scale_down}
    log(f"{broker}: {k} worker(s), {n} tasks of {sleep_s}s{' + SIGTERM to half mid-burst' if scale_down else ''}")
    workers = [common.Worker("rs", common.BROKERS[broker], mongo.url, label, run_dir, f"{label}-{i}",
                             concurrency=1) for i in range(k)]
    try:
        for w in workers:
            w.wait_ready(timeout=300)
        deadline = time.monotonic() + 300
        while not all("fork server ready" in w.log() for w in workers):
            if time.monotonic() > deadline:
                raise BenchError("fork servers not ready within 300 s")
            time.sleep(0.2)
        nbname = label
        om.jobs.put(notebook(sleep_s), nbname)
        job = om.runtime.job(nbname)
        job._generate_jobs(nbname, range(n))
        tasks = [t for t in job.list() if t != nbname]
        if len(tasks) != n:
            raise BenchError(f"generated {len(tasks)} task notebooks, expected {n}")
        t0 = time.monotonic()
        # require() routes only the next call: once per task, as job.map() does
        results = [om.runtime.require(label).job(t).run() for t in tasks]
        stopped = []

        def progress(done):
            if scale_down and not stopped and done >= n // 3:
                half = workers[k // 2:]
                log(f"  {done}/{n} done: SIGTERM to {len(half)} of {k} workers")
                for w in half:
                    w.proc.send_signal(15)
                stopped.extend(half)
                res["sigterm_at_done"] = done

        final = wait_results(results, timeout=120 + n * sleep_s * 2, on_progress=progress)
        t_last = max((t for _, t in final.values()), default=time.monotonic())
        res["makespan_s"] = round(t_last - t0, 2)
        res["throughput_per_s"] = round(n / (t_last - t0), 3)
        res["ideal_makespan_s"] = round(n / k * sleep_s, 1)
        if scale_down and "sigterm_at_done" in res:
            # the first tasks on k workers, the rest on the k - k//2 left
            done = res["sigterm_at_done"]
            res["ideal_makespan_s"] = round(done / k * sleep_s + (n - done) / (k - k // 2) * sleep_s, 1)
        res["final"] = len(final)
        res["succeeded"] = sum(1 for s, _ in final.values() if s == "SUCCESS")
        for w in stopped:
            rc = w.stop(grace=120)
            res.setdefault("stopped_exit", []).append(rc)
        per = [succeeded_ids(w) for w in workers]
        every = [t for ids in per for t in ids]
        ids = {r.id for r in results}
        res["per_worker"] = [len(p) for p in per]
        res["ran_twice"] = len(every) - len(set(every))
        res["unknown_ids"] = len(set(every) - ids)
        res["not_run"] = len(ids - set(every))
        runs = [len((om.jobs.metadata(t).attributes or {}).get("job_runs") or []) for t in tasks]
        res["job_runs_not_one"] = sum(1 for c in runs if c != 1)
        ok = (res["succeeded"] == n and res["ran_twice"] == 0 and res["not_run"] == 0
              and res["job_runs_not_one"] == 0)
        res["ok"] = ok
        log(f"  makespan {res['makespan_s']}s (ideal {res['ideal_makespan_s']}s), "
            f"{res['throughput_per_s']} tasks/s, per worker {res['per_worker']}, "
            f"succeeded {res['succeeded']}/{n}, ran twice {res['ran_twice']}, "
            f"job_runs≠1 {res['job_runs_not_one']}{'' if ok else '  <-- FAILED'}")
    except BenchError as e:
        res["ok"] = False
        res["error"] = str(e)
        log(f"  ERROR {e}")
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.stop(grace=60)
        try:
            common.cleanup_queues(broker, [label])
        except Exception as e:  # cleanup is best effort
            log(f"  queue cleanup failed: {e!r}")
    return res


def markdown(rows, machine):
    L = ["## Scale-out: om-worker processes on one queue (`bench/scale.py`)", "",
         f"{machine}. Every worker `-c 1`; each task a job notebook sleeping {rows[0]['sleep_s']} s, "
         f"{PER_WORKER} tasks per worker, published by the unchanged omega|ml client "
         "(`job._generate_jobs` + one `job.run()` per task notebook). Throughput = tasks / time from the "
         "first publish to the last result; speed-up against one worker; efficiency = speed-up / workers. "
         "Ran twice = task ids with more than one `task succeeded` line over all workers' logs; "
         "`job_runs`≠1 = task notebooks whose metadata does not hold exactly one run.", "",
         "| broker | workers | tasks | makespan s (ideal) | tasks/s | speed-up | efficiency | per worker | "
         "succeeded | ran twice | job_runs≠1 |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("scale_down") or "makespan_s" not in r:
            continue
        base = next((x for x in rows if x["broker"] == r["broker"] and x["workers"] == 1
                     and not x.get("scale_down") and "throughput_per_s" in x), None)
        sp = r["throughput_per_s"] / base["throughput_per_s"] if base else float("nan")
        L.append(f"| {r['broker']} | {r['workers']} | {r['n']} | {r['makespan_s']} ({r['ideal_makespan_s']}) | "
                 f"{r['throughput_per_s']} | {sp:.2f}× | {sp / r['workers']:.0%} | "
                 f"{'/'.join(map(str, r['per_worker']))} | {r['succeeded']}/{r['n']} | {r['ran_twice']} | "
                 f"{r['job_runs_not_one']} |")
    downs = [r for r in rows if r.get("scale_down")]
    if downs:
        L += ["", "Scale-down: SIGTERM (warm shutdown) to half of 8 workers once a third of the results "
              "were in; the stopped workers finish their running task and give back what they held.", "",
              "| broker | tasks | SIGTERM at | makespan s (ideal) | per worker (last 4 stopped) | exit codes | "
              "succeeded | ran twice | not run | job_runs≠1 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in downs:
            if "makespan_s" not in r:
                L.append(f"| {r['broker']} | {r['n']} | error: {r.get('error', '?')[:80]} |")
                continue
            L.append(f"| {r['broker']} | {r['n']} | {r.get('sigterm_at_done')} done | {r['makespan_s']} "
                     f"({r['ideal_makespan_s']}) | "
                     f"{'/'.join(map(str, r['per_worker']))} | {r.get('stopped_exit')} | "
                     f"{r['succeeded']}/{r['n']} | {r['ran_twice']} | {r['not_run']} | {r['job_runs_not_one']} |")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default="amqp,redis")
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--sleep", type=float, default=4.0)
    ap.add_argument("--no-scale-down", action="store_true")
    ap.add_argument("--markdown", help="write the tables into this file between scale markers")
    ap.add_argument("--json")
    a = ap.parse_args()
    if not common.OM_WORKER_BIN.exists():
        sys.exit(f"no om-worker binary at {common.OM_WORKER_BIN} (cargo build --release, or set OM_WORKER_BIN)")
    run_dir = Path(tempfile.mkdtemp(prefix="omw-scale-"))
    mongo = common.Secantus(run_dir).start()
    os.environ.update({"OMEGA_MONGO_URL": mongo.url, "OMEGA_RESULT_BACKEND": "rpc://",
                       "OMEGA_CONFIG_FILE": str(run_dir / "no-such-config.yml"), "OMEGA_TMP": str(run_dir)})
    rows = []
    try:
        for broker in a.brokers.split(","):
            os.environ["OMEGA_BROKER"] = common.BROKERS[broker]
            # a fresh client per broker: omega|ml builds its Celery app from the environment once
            for mod in [m for m in sys.modules if m == "omegaml" or m.startswith("omegaml.")]:
                del sys.modules[mod]
            import omegaml
            om = omegaml.setup()
            for k in [int(x) for x in a.workers.split(",")]:
                rows.append(run_once(om, mongo, run_dir, broker, k, a.sleep, PER_WORKER))
            if not a.no_scale_down:
                rows.append(run_once(om, mongo, run_dir, broker, 8, a.sleep, SCALE_DOWN_PER_WORKER,
                                     scale_down=True))
            om.runtime.celeryapp.close()
    finally:
        mongo.stop()
    load = os.getloadavg()
    machine = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
               f"load average at the end {load[0]:.1f}, binary {common.OM_WORKER_BIN.parent.name}")
    md = markdown(rows, machine)
    print(md)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    if a.markdown:
        import run as benchrun
        benchrun.write_markdown(a.markdown, md, begin="<!-- bench/scale.py:begin -->",
                                end="<!-- bench/scale.py:end -->")
    sys.exit(0 if all(r.get("ok") for r in rows) else 1)


if __name__ == "__main__":
    main()
