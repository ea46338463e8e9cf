"""om-worker vs omega|ml's Python Celery worker, side by side in one invocation.

    .venv/bin/python bench/run.py --markdown BENCHMARKS.md          # the full run (~15 min, 2 cores)
    .venv/bin/python bench/run.py --quick --brokers amqp             # small N, for development

Per broker (RabbitMQ, Redis) and worker (omega|ml's `celery --app omegaml.celeryapp worker` = "python",
om-worker = "om-worker"), each scenario on a freshly started, ready worker consuming a fresh queue
label `bench-<uuid8>`, against one SecantusDB started fresh for this run:

  latency   single run_omegaml_job on an idle, ready worker: publish -> SUCCESS, several runs
  drain     N task notebooks pre-created with omega|ml's generator (untimed), then N run_omegaml_job
            published in one burst; first publish -> last SUCCESS seen by the client
  map10/50  job.map(range(N)): time inside map() and makespan (map() call -> last SUCCESS)
  scale     (om-worker only) 1, 2, 3 om-worker processes (distinct -n) on one queue, drain N
  predict   om.runtime.require(label).model(m).predict(X).get() on an idle, ready worker: call -> value
  fit       the same with .fit(X, Y).get(); both run on om-worker, on the Python worker at omega|ml's
            defaults and on the Python worker with `--max-tasks-per-child 1` ("python mtpc1", what
            omega|ml's docker images run), one after the other per broker

The client is the unchanged omega|ml client in its own process (bench/client.py). RSS of each worker
process and of its whole process tree is sampled from /proc; om-worker's JSON log lines
`task timings` / `notebook task timings` give the per-task breakdown. Every process started here is
stopped in `finally` (SIGTERM, SIGKILL after a grace; SecantusDB via scripts/secantus.sh).
"""
import argparse
import re
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import BenchError, log  # noqa: E402

IMPL_NAME = {"py": "python", "py1": "python mtpc1", "rs": "om-worker"}
# the Python worker variant "py1": omega|ml's docker default (one task per pool child)
PY1_ARGS = ["--max-tasks-per-child", "1"]
MODEL_SCENARIOS = ("predict", "fit")
GOALS = {
    "drain_throughput_ratio": 20.0,   # om-worker / python, >=
    "latency_ratio": 40.0,            # python / om-worker (median), >=
    "rs_cpu_per_task_s": 0.10,        # om-worker's tree, drain, CPU-s per seed task, <=
    "idle_tree_rss_ratio": 1 / 3,     # om-worker / python, summed RSS of the idle tree, <=
    "idle_tree_pss_ratio": 0.6,       # om-worker / python, PSS of the idle tree, <=
    "map50_makespan_over_map": 1.25,  # om-worker, <=
    "rs_worker_rss_mb": 25.0,         # om-worker's own process, <=
    "predict_latency_s": 0.060,       # om-worker, idle predict call -> value (median), <=
    "predict_ratio_py1": 30.0,        # python mtpc1 / om-worker (median), >=
}


def pct(xs, p):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * p
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def med(xs):
    return pct(xs, 0.5)


def rnd(x, n=3):
    return None if x is None else round(x, n)


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------

def machine_info():
    def first(path, key):
        try:
            for line in open(path):
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            return None
    from importlib.metadata import version, PackageNotFoundError

    def ver(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    def cmd(*a):
        try:
            return subprocess.run(a, capture_output=True, text=True, timeout=30, cwd=common.ROOT).stdout.strip()
        except Exception as e:
            return f"({type(e).__name__})"

    mem_kb = first("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "nproc": os.cpu_count(),
        "mem_total_gb": round(int(mem_kb.split()[0]) / 1024 / 1024, 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {p: ver(p) for p in ("omegaml", "celery", "kombu", "secantusdb", "ipykernel",
                                          "jupyter_client", "pymongo", "redis")},
        "rustc": cmd("rustc", "--version"),
        "om_worker": cmd(str(common.OM_WORKER_BIN), "--version"),
        "git": cmd("git", "rev-parse", "--short", "HEAD") + (" (dirty)" if cmd("git", "status", "--porcelain",
                                                                                   "--", "src", "Cargo.toml") else ""),
        "rabbitmq": cmd("rabbitmqctl", "-q", "version"),
    }


def system_cpu_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / common.CLK_TCK, sum(v[:8]) / common.CLK_TCK


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


# ------------------------------------------------------------------------------------------------
# one scenario
# ------------------------------------------------------------------------------------------------

class Ctx:
    def __init__(self, args, run_dir, mongo):
        self.args = args
        self.run_dir = run_dir
        self.mongo = mongo
        self.queues = {"amqp": [], "redis": []}


def wait_pool(sampler, workers, impl, conc, timeout=30):
    """om-worker: wait until its fork server exists under each worker (started in the background at
    start-up; no pool of pre-started kernels by default), then a short settle so it is ready (its
    imports); python: the prefork pool exists at 'ready.'; settle briefly."""
    deadline = time.monotonic() + timeout
    want = 1 + (1 if impl == "rs" else conc)
    while time.monotonic() < deadline:
        tree = common.descendants([w.pid for w in workers])
        if all(len(common.descendants([w.pid], tree)) >= want for w in workers):
            break
        time.sleep(0.2)
    else:
        log(f"warning: worker trees did not reach {want} processes within {timeout}s")
    if impl == "rs":
        while time.monotonic() < deadline and not all("fork server ready" in w.log() for w in workers):
            time.sleep(0.2)
    time.sleep(2.0)
    tree = sampler.sample(with_pss=True)
    return {"idle_worker_rss_mb": [round(tree[w.pid][4] / 1024, 1) for w in workers if w.pid in tree],
            "idle_tree_rss_mb": round(sum(st[4] for st in tree.values()) / 1024, 1),
            "idle_tree_pss_mb": round(sum(common.pss_kb(p) or 0 for p in tree) / 1024, 1),
            "idle_tree_nproc": len(tree)}


def run_scenario(ctx, broker, impl, scenario, n, nworkers=1, extra=None):
    a = ctx.args
    label = f"bench-{common.short_id()}"
    conc = a.rs_concurrency if impl == "rs" else a.py_concurrency
    eff_conc = conc or 4  # omega|ml's default CELERYD_CONCURRENCY (OMEGA_WORKER_CONCURRENCY, 4)
    res = {"broker": broker, "impl": impl, "scenario": scenario, "n": n, "workers": nworkers, "label": label,
           "concurrency": eff_conc}
    ctx.queues[broker].append(label)
    log(f"{broker} {IMPL_NAME[impl]} {scenario} n={n} workers={nworkers} queue={label}")
    workers, sampler, client = [], None, None
    t_scen = time.monotonic()
    try:
        rate = 1.0 if impl == "rs" else 0.2
        timeout = a.task_timeout or (60 + n / rate)
        cargs = {"label": label, "n": n, "timeout": timeout, "secantus_pid": ctx.mongo.pid,
                 "out": str(ctx.run_dir / f"client-{label}.json"),
                 "ready_file": str(ctx.run_dir / f"client-{label}.ready"),
                 "go_file": str(ctx.run_dir / f"client-{label}.go"), **(extra or {})}
        for k in range(nworkers):
            workers.append(common.Worker("py" if impl == "py1" else impl, common.BROKERS[broker], ctx.mongo.url,
                                         label, ctx.run_dir, f"{impl}-{scenario}-{label[6:]}-{k}",
                                         concurrency=conc, extra_args=PY1_ARGS if impl == "py1" else ()))
        cargs["worker_pids"] = [w.pid for w in workers]
        # the client: the unchanged omega|ml client in its own process; it imports omegaml and does its
        # untimed setup while the worker starts, then waits for the go file
        cenv = common.clean_env({
            "OMEGA_BROKER": common.BROKERS[broker], "OMEGA_MONGO_URL": ctx.mongo.url,
            "OMEGA_RESULT_BACKEND": "rpc://", "OMEGA_CONFIG_FILE": str(ctx.run_dir / "no-such-config.yml"),
            "OMEGA_TMP": str(ctx.run_dir)})
        kind = "map" if scenario.startswith("map") else ("drain" if scenario in ("drain", "scale") else scenario)
        if scenario in MODEL_SCENARIOS:
            kind = "model"
        clog = ctx.run_dir / f"client-{label}.log"
        lf = open(clog, "wb")
        client = subprocess.Popen([str(common.VENV_PY), str(Path(__file__).parent / "client.py"), kind,
                                   json.dumps(cargs)], env=cenv, cwd=str(ctx.run_dir), stdout=lf,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        lf.close()
        for w in workers:
            w.wait_ready(timeout=a.ready_timeout)
        res["ready_s"] = [round(w.ready_s, 2) for w in workers]
        res["worker_argv"] = workers[0].argv
        sampler = common.RssSampler([w.pid for w in workers], interval=0.5)
        sampler.start()
        res.update(wait_pool(sampler, workers, impl, eff_conc))
        deadline = time.monotonic() + 300
        while not os.path.exists(cargs["ready_file"]):
            if client.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"client setup failed or hung (rc {client.poll()}); log {clog}:\n"
                                 f"{clog.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        Path(cargs["go_file"]).write_text("go")
        try:
            res["client_rc"] = client.wait(timeout=timeout + 120)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{scenario} on {broker}/{IMPL_NAME[impl]}: the client did not finish within "
                             f"{timeout + 120:.0f}s (log {clog})")
        try:
            cres = json.loads(Path(cargs["out"]).read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"client wrote no result ({e}); log {clog}:\n{clog.read_text(errors='replace')[-3000:]}")
        res["client"] = cres
        if cres.get("errors"):
            res.setdefault("errors", []).extend(cres["errors"][:1])
            log(f"  client reported: {cres['errors'][0][:300]}")
    except BenchError as e:
        res.setdefault("errors", []).append(str(e))
        log(f"  ERROR: {str(e)[:600]}")
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(timeout=30)
        if sampler:
            sampler.stop()
            res.update(sampler.summary())
        rcs = []
        for w in workers:
            rcs.append(w.stop(grace=a.stop_grace))
        res["worker_exit"] = rcs
        # every process of the worker trees must be gone shortly after the workers exited
        seen = sampler.seen if sampler else {}
        t_stop = time.monotonic()
        while time.monotonic() - t_stop < a.orphan_wait and common.survivors(seen, {w.pid for w in workers}):
            time.sleep(0.1)
        res["tree_gone_after_stop_s"] = round(time.monotonic() - t_stop, 2)
        left = {}
        for w in workers:
            for p, c in w.sweep(seen):
                left[p] = c
        res["leftover_processes"] = [f"{p} {c[:120]}" for p, c in left.items()]
        logs = [w.log() for w in workers]
        errs = [common.log_errors(t) for t in logs]
        res["worker_log_errors"] = sum(n for _, n in errs)
        res["worker_log_error_lines"] = [l for e, _ in errs for l in e][:5]
        res["worker_logs"] = [str(w.logpath) for w in workers]
        if impl == "rs":
            timings, problems = {}, []
            for t in logs:
                tm, pr = common.parse_timings(t)
                timings.update(tm)
                problems += pr
            res["timings"] = timings
            res["timing_problems"] = sorted(set(problems))
        client_q = (res.get("client") or {}).get("client", {}).get("reply_queue")
        try:
            common.cleanup_queues(broker, [label, client_q])
        except Exception as e:
            log(f"  queue cleanup on {broker} failed: {e!r}")
        res["scenario_wall_s"] = round(time.monotonic() - t_scen, 1)
    summarize(res)
    log("  " + one_line(res))
    return res


DISTURBED = re.compile(r"reconnect|Connection refused|Cannot connect to|connection lost|Connection to broker lost",
                       re.I)


def disturbance(res, run_dir):
    """A broker outage seen during the scenario (e.g. another job restarting the shared RabbitMQ):
    the first matching line of the worker or client logs, else None."""
    paths = [Path(p) for p in res.get("worker_logs", [])] + [run_dir / f"client-{res['label']}.log"]
    for p in paths:
        try:
            for line in p.read_text(errors="replace").splitlines():
                if DISTURBED.search(line):
                    return f"{p.name}: {line[:300]}"
        except OSError:
            pass
    return None


def run_scenario_retry(ctx, broker, impl, scenario, n, nworkers=1, extra=None):
    """run_scenario; repeated (up to --retries times) when it failed or a broker outage disturbed it."""
    discarded = []
    for attempt in range(ctx.args.retries + 1):
        res = run_scenario(ctx, broker, impl, scenario, n, nworkers, extra)
        why = disturbance(res, ctx.run_dir)
        res["disturbed"] = why
        if not (res.get("errors") or why) or attempt == ctx.args.retries:
            break
        log(f"  discarding this attempt ({'broker outage: ' + why if why else res['errors'][0][:200]}); again")
        discarded.append({k: res.get(k) for k in ("label", "errors", "disturbed", "summary")})
        time.sleep(5)
    res["discarded_attempts"] = discarded
    return res


def summarize(res):
    c = res.get("client") or {}
    s = {}
    if res["scenario"] in ("latency",) + MODEL_SCENARIOS:
        lats = [r["latency_s"] for r in c.get("runs", []) if r.get("status") == "SUCCESS"]
        s.update(n_ok=len(lats), latency_median_s=rnd(med(lats)), latency_p90_s=rnd(pct(lats, 0.9)),
                 latency_min_s=rnd(min(lats)) if lats else None, latencies_s=lats)
        per = {r["task_id"]: r["latency_s"] for r in c.get("runs", []) if r.get("latency_s")}
    elif res["scenario"] in ("drain", "scale"):
        lats = [p["latency_s"] for p in c.get("per_task", []) if p.get("status") == "SUCCESS"]
        s.update(n_ok=c.get("succeeded"), throughput=c.get("throughput"), wall_s=c.get("wall_s"),
                 publish_burst_s=c.get("publish_burst_s"),
                 latency_median_s=rnd(med(lats)), latency_p90_s=rnd(pct(lats, 0.9)))
        per = {p["task_id"]: p["latency_s"] for p in c.get("per_task", []) if p.get("latency_s")}
    else:
        s.update(n_ok=c.get("succeeded"), makespan_s=c.get("makespan_s"), time_in_map_s=c.get("time_in_map_s"),
                 makespan_over_map=rnd(c["makespan_s"] / c["time_in_map_s"]) if c.get("makespan_s") else None)
        per = {}
    s["verified_ok"] = c.get("verified_ok")
    cpu = c.get("cpu") or {}
    n = res["n"]
    if cpu:
        s["cpu_per_task_s"] = {k: rnd(v / n, 4) if v is not None else None for k, v in cpu.items()}
    if res.get("timings"):
        s["breakdown"] = breakdown(res["timings"], per)
    res["summary"] = s


def breakdown(timings, client_lat):
    """medians per field; worker total = sum of the 'task timings' steps; broker+client = client
    latency - worker total (per task, then median)."""
    rows = list(timings.values())
    out = {}
    for f in common.TASK_FIELDS + common.NB_FIELDS:
        vals = [r[f] for r in rows if f in r]
        out[f] = rnd(med(vals), 1) if vals else None
    totals = {tid: sum(r.get(f, 0.0) for f in common.TASK_FIELDS) for tid, r in timings.items()
              if all(f in r for f in common.TASK_FIELDS)}
    out["worker_total_ms"] = rnd(med(totals.values()), 1) if totals else None
    pairs = [(client_lat[t] * 1000, totals[t]) for t in totals if t in client_lat]
    out["client_latency_ms"] = rnd(med([p[0] for p in pairs]), 1) if pairs else None
    out["broker_client_ms"] = rnd(med([p[0] - p[1] for p in pairs]), 1) if pairs else None
    out["tasks_with_timings"] = len(rows)
    out["tasks_matched_to_client"] = len(pairs)
    return out


def one_line(res):
    s = res.get("summary", {})
    keys = ["n_ok", "throughput", "wall_s", "latency_median_s", "latency_p90_s", "makespan_s", "time_in_map_s"]
    parts = [f"{k}={s[k]}" for k in keys if s.get(k) is not None]
    parts.append(f"peak_worker={res.get('peak_worker_rss_mb')}MB tree={res.get('peak_tree_rss_mb')}MB")
    if res.get("errors"):
        parts.append("ERRORS")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def find(results, broker, impl, scenario, workers=1):
    for r in results:
        if r["broker"] == broker and r["impl"] == impl and r["scenario"] == scenario and r["workers"] == workers:
            return r
    return None


def fmt(x, unit="", nd=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def verdict(value, goal, le=False):
    if value is None:
        return "MISS (no data)"
    ok = value <= goal if le else value >= goal
    return "PASS" if ok else "MISS"


def cpu_tree(r):
    """CPU-s per task of the worker's whole process tree in a scenario (kernels included)."""
    return ((r or {}).get("summary", {}).get("cpu_per_task_s") or {}).get("worker_tree_s")


def idle(results, b, impl, key):
    """Median over the scenarios of one worker of an idle-tree figure (sampled when it was ready)."""
    xs = sorted(r[key] for r in results
                if r["broker"] == b and r["impl"] == impl and r.get(key) is not None
                and r["scenario"] in ("latency", "drain", "map10", "map50"))
    return xs[len(xs) // 2] if xs else None


def ratio_of(a, b):
    return rnd(a / b, 2) if a is not None and b else None


def idle_row(results, b, what, key, goal_text, goal):
    """The goal row comparing an idle-tree figure of om-worker with the Python worker's."""
    py, rs = idle(results, b, "py", key), idle(results, b, "rs", key)
    value = ratio_of(rs, py)
    return {"broker": b, "metric": f"idle tree {what} (MB), om-worker / python", "python": py,
            "om_worker": rs, "value": value, "goal": goal_text, "verdict": verdict(value, goal, le=True)}


def ratios(results, brokers):
    out = []
    for b in brokers:
        py_d, rs_d = find(results, b, "py", "drain"), find(results, b, "rs", "drain")
        py_l, rs_l = find(results, b, "py", "latency"), find(results, b, "rs", "latency")
        rs_m = find(results, b, "rs", "map50")
        g = lambda r, k: (r or {}).get("summary", {}).get(k)  # noqa: E731
        tp_r = (g(rs_d, "throughput") / g(py_d, "throughput")) if g(rs_d, "throughput") and g(py_d, "throughput") else None
        lat_r = (g(py_l, "latency_median_s") / g(rs_l, "latency_median_s")) if g(rs_l, "latency_median_s") and g(py_l, "latency_median_s") else None
        rs_rss = max([r.get("peak_worker_rss_mb") or 0 for r in results if r["broker"] == b and r["impl"] == "rs"] or [0]) or None
        out += [
            {"broker": b, "metric": "drain throughput, om-worker / python", "python": g(py_d, "throughput"),
             "om_worker": g(rs_d, "throughput"), "value": rnd(tp_r, 2), "goal": "≥ 20×",
             "verdict": verdict(tp_r, GOALS["drain_throughput_ratio"])},
            {"broker": b, "metric": "single-task latency (median), python / om-worker",
             "python": g(py_l, "latency_median_s"), "om_worker": g(rs_l, "latency_median_s"),
             "value": rnd(lat_r, 2), "goal": "≥ 40×", "verdict": verdict(lat_r, GOALS["latency_ratio"])},
            {"broker": b, "metric": "CPU-s per seed task, worker tree (drain)",
             "python": cpu_tree(py_d), "om_worker": cpu_tree(rs_d), "value": cpu_tree(rs_d),
             "goal": "≤ 0.10", "verdict": verdict(cpu_tree(rs_d), GOALS["rs_cpu_per_task_s"], le=True)},
            idle_row(results, b, "RSS", "idle_tree_rss_mb", "≤ 0.33×", GOALS["idle_tree_rss_ratio"]),
            idle_row(results, b, "PSS", "idle_tree_pss_mb", "≤ 0.6×", GOALS["idle_tree_pss_ratio"]),
            {"broker": b, "metric": "map(range(50)): makespan / time in map(), om-worker",
             "python": g(find(results, b, "py", "map50"), "makespan_over_map"),
             "om_worker": g(rs_m, "makespan_over_map"), "value": g(rs_m, "makespan_over_map"),
             "goal": "≤ 1.25×", "verdict": verdict(g(rs_m, "makespan_over_map"), GOALS["map50_makespan_over_map"], le=True)},
            {"broker": b, "metric": "peak RSS of the worker process (MB), om-worker",
             "python": max([r.get("peak_worker_rss_mb") or 0 for r in results if r["broker"] == b and r["impl"] == "py"] or [0]) or None,
             "om_worker": rs_rss, "value": rs_rss, "goal": "≤ 25 MB",
             "verdict": verdict(rs_rss, GOALS["rs_worker_rss_mb"], le=True)},
        ]
        out += model_ratios(results, b)
    # a metric whose scenarios were not run at all (e.g. --scenarios predict,fit) is left out
    return [q for q in out if q["python"] is not None or q["om_worker"] is not None]


def model_ratios(results, b):
    """om.runtime.model(...).predict/.fit, idle latency medians: python / om-worker and
    python mtpc1 / om-worker; goals for predict only (≤ 60 ms, ≥ 30× vs mtpc1)."""
    out = []
    g = lambda r: (r or {}).get("summary", {}).get("latency_median_s")  # noqa: E731
    for op in MODEL_SCENARIOS:
        rs = g(find(results, b, "rs", op))
        if rs is None and not any(r["broker"] == b and r["scenario"] == op for r in results):
            continue
        for impl in ("py", "py1"):
            py = g(find(results, b, impl, op))
            ratio = py / rs if py and rs else None
            goal = "≥ 30×" if (op == "predict" and impl == "py1") else "–"
            out.append({"broker": b, "metric": f"idle {op} latency (median), {IMPL_NAME[impl]} / om-worker",
                        "python": py, "om_worker": rs, "value": rnd(ratio, 2), "goal": goal,
                        "verdict": verdict(ratio, GOALS["predict_ratio_py1"]) if goal != "–" else "info"})
        if op == "predict":
            out.append({"broker": b, "metric": "idle predict latency (median, s), om-worker", "python": None,
                        "om_worker": rs, "value": rs, "goal": "≤ 0.060 s",
                        "verdict": verdict(rs, GOALS["predict_latency_s"], le=True)})
    return out


def markdown(report):
    a = report["args"]
    m = report["machine"]
    res = report["results"]
    brokers = a["brokers"]
    L = []
    L.append(f"Run {report['started']} – {report['finished']} ({report['wall_s']:.0f} s), command: "
             f"`{report['command']}`")
    L.append("")
    L.append(f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['mem_total_gb']} GB RAM, Linux {m['kernel']}, "
             f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
             + f"; {m['rustc']}; {m['om_worker']} (git {m['git']}); RabbitMQ {m['rabbitmq']}; "
             f"Redis; SecantusDB (secantusd-py) started fresh for this run.")
    ld = report["load"]
    L.append("")
    L.append(f"Load: loadavg {' '.join(ld['loadavg_start'])} at start, {' '.join(ld['loadavg_end'])} at end; "
             f"CPU time used by processes outside this benchmark during the run ≈ {ld['foreign_cpu_s']:.0f} CPU-s "
             f"of {ld['available_cpu_s']:.0f} available ({ld['foreign_pct']:.0f} %)"
             + (" — **the machine was shared and loaded; absolute numbers are pessimistic**." if ld["foreign_pct"] > 10 else "."))
    L.append("")
    L.append(f"Workers: python = `celery --app omegaml.celeryapp worker -Q <label> -n <name> -l info --without-gossip "
             f"--without-mingle --without-heartbeat` at omega|ml's default concurrency "
             f"({a['py_concurrency'] or 4}, `CELERYD_CONCURRENCY`); om-worker = `target/release/om-worker worker -Q <label> "
             f"-n <name> --python .venv/bin/python --log-format json` "
             f"{'-c ' + str(a['rs_concurrency']) if a['rs_concurrency'] else '(default concurrency 4)'}, fork server "
             f"and kernel pool on (defaults). Each scenario starts a fresh worker on a fresh queue `bench-<uuid8>` and "
             f"waits until it is ready and its pool is filled; result backend `rpc://` (omega|ml's default)."
             + (" Task = the seed notebook (reads `_jobdata['param']`, `om.datasets.put` into a pre-created per-run "
                "dataset) as generated by omega|ml's `JobTasks._generate_jobs` (init/done cells with `_mark_status`)."
                if any(r["scenario"] not in MODEL_SCENARIOS for r in res) else "")
             + (" python mtpc1 = the same Python worker with `--max-tasks-per-child 1`."
                if any(r["impl"] == "py1" for r in res) else ""))
    L.append("")
    L.append("### Results per broker × scenario × worker")
    L.append("")
    L.append("| broker | scenario | worker | N | ok | throughput (tasks/s) | wall / makespan (s) | time in map() (s) "
             "| latency median / p90 (s) | peak RSS worker (MB) | peak RSS tree (MB) | peak PSS tree (MB) | idle tree RSS (MB) "
             "| CPU-s per task: worker tree / SecantusDB / client |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res:
        if r["scenario"] == "scale":
            continue
        s = r.get("summary", {})
        cpu = s.get("cpu_per_task_s") or {}
        wall = s.get("wall_s") if r["scenario"] == "drain" else s.get("makespan_s")
        L.append(f"| {r['broker']} | {r['scenario']} | {IMPL_NAME[r['impl']]} | {r['n']} | {fmt(s.get('n_ok'))} "
                 f"| {fmt(s.get('throughput'))} | {fmt(wall)} | {fmt(s.get('time_in_map_s'))} "
                 f"| {fmt(s.get('latency_median_s'))} / {fmt(s.get('latency_p90_s'))} "
                 f"| {fmt(r.get('peak_worker_rss_mb'), nd=1)} | {fmt(r.get('peak_tree_rss_mb'), nd=0)} "
                 f"| {fmt(r.get('peak_tree_pss_mb'), nd=0)} | {fmt(r.get('idle_tree_rss_mb'), nd=0)} "
                 f"| {fmt(cpu.get('worker_tree_s'), nd=3)} / {fmt(cpu.get('secantus_s'), nd=3)} / {fmt(cpu.get('client_s'), nd=3)} |")
    L.append("")
    L.append("latency = publish → SUCCESS seen by the client (single task on an idle worker for `latency`; per task in the "
             "burst for `drain`, including queueing). RSS tree = summed RSS of the worker and all its descendants "
             "(kernels, fork server, prefork children; CoW-shared pages counted per process), PSS counts shared pages once. "
             "CPU per task over the timed window (drain/map only): worker tree includes reaped kernels.")
    L.append("")
    model = [r for r in res if r["scenario"] in MODEL_SCENARIOS]
    if model:
        L.append("### Model tasks: `om.runtime.model(m).predict(X).get()` / `.fit(X, Y).get()` on an idle worker")
        L.append("")
        L.append("| broker | task | worker | runs | ok | latency median / p90 / min (s) | all runs (s) | peak RSS tree (MB) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in model:
            s = r.get("summary", {})
            L.append(f"| {r['broker']} | {r['scenario']} | {IMPL_NAME[r['impl']]} | {r['n']} | {fmt(s.get('n_ok'))} "
                     f"| {fmt(s.get('latency_median_s'), nd=3)} / {fmt(s.get('latency_p90_s'), nd=3)} / "
                     f"{fmt(s.get('latency_min_s'), nd=3)} | {', '.join(f'{x:.3f}' for x in s.get('latencies_s', []))} "
                     f"| {fmt(r.get('peak_tree_rss_mb'), nd=0)} |")
        L.append("")
        L.append(f"Client = the unchanged omega|ml client (bench/client.py `model`): a fitted LinearRegression and "
                 f"datasets X ({a.get('model_rows')} rows × 2 columns), Y put untimed; one untimed warm-up call, then per "
                 f"run an idle gap of {a.get('latency_gap')} s and `om.runtime.require(label).model(m).predict(X)` "
                 f"(`.fit(X, Y)`) timed to the value `.get()` returns (predictions checked against a local predict). "
                 f"python mtpc1 = the Python worker with `--max-tasks-per-child 1` (omega|ml's docker default: a new "
                 f"pool child per task). rpc:// result backend.")
        L.append("")
    L.append("### Goals (om-worker vs python, same run)")
    L.append("")
    L.append("| broker | metric | python | om-worker | ratio / value | goal | |")
    L.append("|---|---|---|---|---|---|---|")
    for q in report["ratios"]:
        L.append(f"| {q['broker']} | {q['metric']} | {fmt(q['python'])} | {fmt(q['om_worker'])} | {fmt(q['value'])} "
                 f"| {q['goal']} | **{q['verdict']}** |")
    L.append("")
    scale = [r for r in res if r["scenario"] == "scale"]
    if scale:
        L.append(f"### Scale-out: om-worker processes on one queue, burst drain N={scale[0]['n']}")
        L.append("")
        L.append("| broker | workers | ok | throughput (tasks/s) | wall (s) | speed-up vs 1 | latency median / p90 (s) "
                 "| peak RSS per worker (MB) | peak RSS all trees (MB) |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for b in brokers:
            base = find(results=res, broker=b, impl="rs", scenario="scale", workers=1)
            bt = (base or {}).get("summary", {}).get("throughput")
            for r in [x for x in scale if x["broker"] == b]:
                s = r.get("summary", {})
                sp = s["throughput"] / bt if bt and s.get("throughput") else None
                L.append(f"| {b} | {r['workers']} | {fmt(s.get('n_ok'))} | {fmt(s.get('throughput'))} | {fmt(s.get('wall_s'))} "
                         f"| {fmt(sp)} | {fmt(s.get('latency_median_s'))} / {fmt(s.get('latency_p90_s'))} "
                         f"| {', '.join(str(x) for x in r.get('peak_worker_rss_mb_each', []))} | {fmt(r.get('peak_tree_rss_mb'), nd=0)} |")
        L.append("")
    L.append("### Where the time goes (om-worker, medians per task, ms)")
    L.append("")
    cols = common.TASK_FIELDS + common.NB_FIELDS + ["worker_total_ms", "client_latency_ms", "broker_client_ms"]
    L.append("| broker | scenario | " + " | ".join(c.replace("_ms", "") for c in cols) + " |")
    L.append("|---|---|" + "---|" * len(cols))
    for r in res:
        bd = r.get("summary", {}).get("breakdown")
        if r["impl"] != "rs" or not bd or r["scenario"] not in ("latency", "drain") + MODEL_SCENARIOS:
            continue
        L.append(f"| {r['broker']} | {r['scenario']} | " + " | ".join(fmt(bd.get(c), nd=1) for c in cols) + " |")
    L.append("")
    L.append("Fields from om-worker's JSON log: `task timings` (wait_slot = received → task slot, ledger = in-flight "
             "record, ack, started = STARTED state sent, run = the task, result = SUCCESS sent, ledger_finish) and "
             "`notebook task timings` (the run: metadata read, GridFS read, kernel ready, execute = cells incl. "
             "shutdown, results notebook write, job_runs record). worker_total = sum of the `task timings` steps; "
             "broker + client = client-observed latency − worker_total (publish, broker hops both ways, the client's "
             "result consumer).")
    probs = sorted({p for r in res for p in r.get("timing_problems", [])})
    missing = [f"{r['broker']}/{r['scenario']}" for r in res if r["impl"] == "rs" and r.get("summary", {}).get("n_ok")
               and not r.get("timings")]
    if probs or missing:
        L.append("")
        L.append("Timing log problems: " + "; ".join(probs + [f"no timing lines in {m}" for m in missing]))
    if any(r["scenario"] == "drain" for r in res):
        L.append("")
        L.append("Floor, per task during the burst drain (CPU-seconds; 2 cores = 2 CPU-s per wall second):")
    L.append("")
    for b in brokers:
        for impl in ("py", "rs"):
            r = find(res, b, impl, "drain")
            cpu = (r or {}).get("summary", {}).get("cpu_per_task_s")
            if not cpu or None in (cpu.get("worker_tree_s"), cpu.get("secantus_s"), cpu.get("client_s")):
                continue
            tot = cpu["worker_tree_s"] + cpu["secantus_s"] + cpu["client_s"]
            own = (f" (the worker process itself {cpu['worker_proc_s']:.3f})"
                   if cpu.get("worker_proc_s") is not None else "")
            L.append(f"- {b} {IMPL_NAME[impl]}: worker tree {cpu['worker_tree_s']:.3f}{own} + SecantusDB "
                     f"{cpu['secantus_s']:.3f} + client {cpu['client_s']:.3f} = {tot:.3f} CPU-s/task → CPU-bound ceiling "
                     f"≈ {m['nproc'] / tot:.1f} tasks/s on {m['nproc']} cores (measured {fmt(r['summary'].get('throughput'))}).")
    L.append("")
    errs = [(r, r["worker_log_errors"]) for r in res if r.get("worker_log_errors")]
    bad = [r for r in res if r.get("errors") or r.get("leftover_processes")
           or (r["impl"] == "rs" and any(x not in (0, None) for x in r.get("worker_exit", [])))]
    L.append("### Health")
    L.append("")
    if not errs and not bad:
        L.append("No scenario errors, no WARN/ERROR lines in worker logs, every om-worker exited 0 on SIGTERM, "
                 "no processes left behind.")
    for r in bad:
        L.append(f"- {r['broker']}/{r['scenario']}/{IMPL_NAME[r['impl']]}: errors {[e[:200] for e in r.get('errors', [])]}, "
                 f"exit {r.get('worker_exit')}, leftovers {r.get('leftover_processes')}")
    for r in res:
        if r.get("discarded_attempts") or r.get("disturbed"):
            L.append(f"- {r['broker']}/{r['scenario']}/{IMPL_NAME[r['impl']]}: {len(r.get('discarded_attempts', []))} "
                     f"attempt(s) discarded and re-run (failed or disturbed by a broker outage of the shared services)"
                     + (f"; the kept attempt was disturbed too: `{r['disturbed'][:200]}`" if r.get("disturbed") else ""))
    for r, n in errs:
        L.append(f"- {r['broker']}/{r['scenario']}/{IMPL_NAME[r['impl']]}: {n} WARN/ERROR log lines, e.g. "
                 f"`{(r['worker_log_error_lines'] or [''])[0][:240]}`")
    L.append("")
    misses = [q for q in report["ratios"] if q["verdict"] not in ("PASS", "info")]
    if misses:
        L.append("### Goals missed in this run")
        L.append("")
        for q in misses:
            L.append(f"- {q['broker']}: {q['metric']} = {fmt(q['value'])} (goal {q['goal']}).")
        L.append("")
    return "\n".join(L)


def write_markdown(path, section, begin="<!-- bench/run.py:begin -->", end="<!-- bench/run.py:end -->"):
    path = Path(path)
    text = path.read_text() if path.exists() else (
        "# Benchmarks: om-worker vs omega|ml's Python worker\n\n"
        "Produced by `bench/run.py` and `bench/soak.py` (see bench/README.md).\n\n"
        "## Side by side (bench/run.py)\n\n<!-- bench/run.py:begin -->\n<!-- bench/run.py:end -->\n\n"
        "## Soak (bench/soak.py)\n\n<!-- bench/soak.py:begin -->\n<!-- bench/soak.py:end -->\n")
    if begin not in text or end not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    path.write_text(pre + begin + "\n" + section.strip() + "\n" + end + post)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def build():
    log("cargo build --release (om-worker)")
    proc = subprocess.run(["cargo", "build", "--release", "--bin", "om-worker"], cwd=common.ROOT,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise BenchError(f"cargo build --release failed:\n{proc.stderr[-4000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small N everywhere (development)")
    ap.add_argument("--brokers", default="amqp,redis")
    ap.add_argument("--impls", default="py,rs", help="py,rs (python worker, om-worker)")
    ap.add_argument("--scenarios", default="latency,drain,map,scale,predict,fit")
    ap.add_argument("--model-impls", default="py,py1,rs",
                    help="workers for predict/fit: py (defaults), py1 (--max-tasks-per-child 1), rs")
    ap.add_argument("--model-runs-py", type=int, default=5)
    ap.add_argument("--model-runs-rs", type=int, default=10)
    ap.add_argument("--model-rows", type=int, default=100, help="rows of the predict/fit dataset")
    ap.add_argument("--out-json", default=None, help="default .run/bench/<timestamp>/results.json")
    ap.add_argument("--markdown", default=None, help="write/refresh the results section of this file")
    ap.add_argument("--drain-n", type=int, default=30)
    ap.add_argument("--map-n", default="10,50")
    ap.add_argument("--latency-runs-py", type=int, default=5)
    ap.add_argument("--latency-runs-rs", type=int, default=10)
    ap.add_argument("--latency-gap", type=float, default=1.0, help="idle seconds before each latency run")
    ap.add_argument("--scale-n", type=int, default=50)
    ap.add_argument("--scale-workers", default="1,2,3")
    ap.add_argument("--rs-concurrency", type=int, default=None, help="om-worker -c (default: its default, 4)")
    ap.add_argument("--py-concurrency", type=int, default=None, help="python worker -c (default: omega|ml's, 4)")
    ap.add_argument("--task-timeout", type=float, default=None, help="client wait per scenario (default from N)")
    ap.add_argument("--ready-timeout", type=float, default=120)
    ap.add_argument("--stop-grace", type=float, default=30)
    ap.add_argument("--orphan-wait", type=float, default=10,
                    help="seconds the worker's processes get to exit after it did; later = left over")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-run a scenario that failed or saw a broker outage (shared services) up to this often")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="only re-render --markdown from the results.json of an earlier run (e.g. after "
                         "the goals changed); measures nothing")
    a = ap.parse_args()
    if a.render:
        report = json.loads(Path(a.render).read_text())
        if not a.markdown:
            raise SystemExit("--render needs --markdown")
        report["ratios"] = ratios(report["results"], report["args"]["brokers"])
        scenarios = report["args"]["scenarios"]
        tag = "bench/run.py:models" if set(scenarios) <= set(MODEL_SCENARIOS) else "bench/run.py"
        write_markdown(a.markdown, markdown(report) + f"\n\nRaw numbers: `{os.path.relpath(a.render, common.ROOT)}` "
                       "(JSON, not committed; goals re-applied with `--render`).\n",
                       begin=f"<!-- {tag}:begin -->", end=f"<!-- {tag}:end -->")
        log(f"wrote {a.markdown} from {a.render}")
        return
    if a.quick:
        a.drain_n, a.map_n, a.latency_runs_py, a.latency_runs_rs = 4, "3,5", 2, 3
        a.scale_n, a.scale_workers = 8, "1,2"
        a.model_runs_py, a.model_runs_rs = 3, 5
    a.brokers = [b for b in a.brokers.split(",") if b]
    impls = [i for i in a.impls.split(",") if i]
    model_impls = [i for i in a.model_impls.split(",") if i]
    scenarios = [s for s in a.scenarios.split(",") if s]
    map_ns = [int(x) for x in a.map_n.split(",") if x]
    command = " ".join([".venv/bin/python", "bench/run.py"] + sys.argv[1:])

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = common.ROOT / ".run" / "bench" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    out_json = Path(a.out_json) if a.out_json else run_dir / "results.json"
    log(f"run dir {run_dir}")
    need_rs = "rs" in impls or ("rs" in model_impls and any(x in scenarios for x in MODEL_SCENARIOS))
    if not a.no_build and need_rs:
        build()
    if need_rs and not common.OM_WORKER_BIN.exists():
        raise SystemExit(f"{common.OM_WORKER_BIN} missing")

    report = {"command": command, "args": {**vars(a), "impls": impls, "scenarios": scenarios,
                                            "model_impls": model_impls},
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(), "results": []}
    t0 = time.monotonic()
    busy0, tot0 = system_cpu_busy()
    la0 = loadavg()
    mongo = common.Secantus(run_dir)
    results = report["results"]
    mongo_cpu = 0.0
    try:
        mongo.start()
        log(f"SecantusDB pid {mongo.pid} on {mongo.url}")
        ctx = Ctx(a, run_dir, mongo)
        for b in a.brokers:
            for impl in impls:
                if "latency" in scenarios:
                    n = a.latency_runs_py if impl == "py" else a.latency_runs_rs
                    results.append(run_scenario_retry(ctx, b, impl, "latency", n, extra={"gap": a.latency_gap}))
                if "drain" in scenarios:
                    results.append(run_scenario_retry(ctx, b, impl, "drain", a.drain_n))
                if "map" in scenarios:
                    for n in map_ns:
                        results.append(run_scenario_retry(ctx, b, impl, f"map{n}", n))
            if "scale" in scenarios and "rs" in impls:
                for k in [int(x) for x in a.scale_workers.split(",") if x]:
                    results.append(run_scenario_retry(ctx, b, "rs", "scale", a.scale_n, nworkers=k))
            for op in [x for x in MODEL_SCENARIOS if x in scenarios]:
                for impl in model_impls:
                    n = a.model_runs_rs if impl == "rs" else a.model_runs_py
                    results.append(run_scenario_retry(ctx, b, impl, op, n, extra={
                        "op": op, "gap": a.latency_gap, "rows": a.model_rows}))
            _save(report, out_json)
    finally:
        mongo_cpu = mongo.cpu() or 0.0
        mongo.stop()
        log("SecantusDB stopped")
    busy1, tot1 = system_cpu_busy()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    ours = ru.ru_utime + ru.ru_stime + me.ru_utime + me.ru_stime + mongo_cpu
    foreign = max(0.0, (busy1 - busy0) - ours)
    report["load"] = {"loadavg_start": la0, "loadavg_end": loadavg(), "our_cpu_s": round(ours, 1),
                      "system_busy_cpu_s": round(busy1 - busy0, 1), "foreign_cpu_s": round(foreign, 1),
                      "available_cpu_s": round(tot1 - tot0, 1),
                      "foreign_pct": round(100 * foreign / max(1e-9, tot1 - tot0), 1)}
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report["wall_s"] = round(time.monotonic() - t0, 1)
    report["ratios"] = ratios(results, a.brokers)
    _save(report, out_json)
    md = markdown(report)
    print("\n" + md)
    if a.markdown:
        # a run of only predict/fit refreshes its own section (the side-by-side one stays)
        tag = "bench/run.py:models" if set(scenarios) <= set(MODEL_SCENARIOS) else "bench/run.py"
        write_markdown(a.markdown, md + f"\n\nRaw numbers: `{os.path.relpath(out_json, common.ROOT)}` "
                       f"(JSON, every run; not committed) — re-run the command above to regenerate.\n",
                       begin=f"<!-- {tag}:begin -->", end=f"<!-- {tag}:end -->")
        log(f"wrote {a.markdown}")
    log(f"JSON: {out_json}")
    return 1 if any(r.get("errors") for r in results) else 0


def _save(report, path):
    Path(path).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
