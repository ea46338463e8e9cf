"""Soak: many trivial notebook tasks through ONE om-worker; does its memory stay flat, and does it
leave no processes behind?

    .venv/bin/python bench/soak.py --markdown BENCHMARKS.md           # 1000 tasks, RabbitMQ
    .venv/bin/python bench/soak.py --tasks 200 --broker redis          # shorter, Redis

A fresh SecantusDB and one om-worker (defaults: -c 4, fork server and kernel pool on) on a fresh queue.
M trivial notebooks (`print(1)`) are stored once (untimed); the tasks are published with the unchanged
omega|ml client (`om.runtime.require(label).job(nb).run()`, i.e. run_omegaml_job) in waves of M, each
wave waited for through the result backend (rpc://) before the next. The worker's RSS (and its
tree's) is sampled from /proc every second. Reported: start (idle, ready) / after the first wave /
peak / end RSS, growth = end − after first wave, failures, and orphans: after SIGTERM and the
worker's exit, any process of its tree still alive after --orphan-wait seconds, or any process whose
environment carries this run's marker (ipykernel kernels, om_forkserver) — expected 0.
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import BenchError, log  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--notebooks", type=int, default=100, help="distinct notebooks = wave size")
    ap.add_argument("--broker", default="amqp", choices=["amqp", "redis"])
    ap.add_argument("--concurrency", type=int, default=None, help="om-worker -c (default: its default)")
    ap.add_argument("--wave-timeout", type=float, default=600)
    ap.add_argument("--orphan-wait", type=float, default=10)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    command = " ".join([".venv/bin/python", "bench/soak.py"] + sys.argv[1:])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = common.ROOT / ".run" / "bench" / f"soak-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    out_json = Path(a.out_json) if a.out_json else run_dir / "soak.json"
    if not a.no_build:
        import run as benchrun
        benchrun.build()
    label = f"soak-{common.short_id()}"
    mongo = common.Secantus(run_dir)
    worker = sampler = None
    report = {"command": command, "args": vars(a), "label": label, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    t0 = time.monotonic()
    reply_q = None
    try:
        mongo.start()
        # the client lives in this process: configure omega|ml through its environment first
        os.environ.update({"OMEGA_BROKER": common.BROKERS[a.broker], "OMEGA_MONGO_URL": mongo.url,
                           "OMEGA_RESULT_BACKEND": "rpc://",
                           "OMEGA_CONFIG_FILE": str(run_dir / "no-such-config.yml")})
        worker = common.Worker("rs", common.BROKERS[a.broker], mongo.url, label, run_dir, f"soak-{label[5:]}",
                               concurrency=a.concurrency)
        import nbformat
        import omegaml as om
        from celery.result import ResultSet
        names = []
        for i in range(a.notebooks):
            nb = nbformat.v4.new_notebook()
            nb.cells.append(nbformat.v4.new_code_cell("print(1)"))
            name = f"{label}/nb-{i}"
            om.jobs.put(nb, name)
            names.append(name)
        reply_q = getattr(om.runtime.celeryapp.backend, "oid", None)
        worker.wait_ready()
        sampler = common.RssSampler([worker.pid], interval=1.0, series=True, pss_every=5)
        sampler.start()
        time.sleep(8)  # fork server + pool up: the idle, ready baseline
        base = sampler.sample(with_pss=True)
        start_rss = base[worker.pid][4] / 1024
        start_tree = sum(st[4] for st in base.values()) / 1024
        log(f"om-worker pid {worker.pid} ready, RSS {start_rss:.1f} MB, tree {start_tree:.0f} MB "
            f"({len(base)} processes); {a.tasks} tasks in waves of {a.notebooks}")
        done = failed = 0
        waves = []
        t_first = time.perf_counter()
        while done + failed < a.tasks:
            k = min(a.notebooks, a.tasks - done - failed)
            tw = time.perf_counter()
            results = [om.runtime.require(label).job(names[i]).run() for i in range(k)]
            final = {}

            def on_message(meta, final=final):
                if meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                    final.setdefault(meta.get("task_id"), meta.get("status"))
            try:
                ResultSet(results).join_native(timeout=a.wave_timeout, propagate=False, on_message=on_message,
                                               callback=lambda tid, v: final.setdefault(tid, "SUCCESS"))
            except Exception as e:
                raise BenchError(f"wave {len(waves) + 1}: {type(e).__name__}: {e} ({len(final)}/{k} final)")
            ok = sum(1 for s in final.values() if s == "SUCCESS")
            done += ok
            failed += k - ok
            st = common.proc_stat(worker.pid)
            tree = common.descendants([worker.pid])
            waves.append({"tasks": done + failed, "wave_s": round(time.perf_counter() - tw, 2), "ok": ok,
                          "worker_rss_mb": round(st[4] / 1024, 1) if st else None,
                          "tree_rss_mb": round(sum(x[4] for x in tree.values()) / 1024, 1),
                          "tree_nproc": len(tree)})
            log(f"  {done + failed}/{a.tasks}: wave {waves[-1]['wave_s']} s, ok {ok}/{k}, "
                f"worker RSS {waves[-1]['worker_rss_mb']} MB, tree {waves[-1]['tree_rss_mb']} MB")
        total_s = time.perf_counter() - t_first
        time.sleep(2)
        end = sampler.sample(with_pss=True)
        end_rss = end[worker.pid][4] / 1024
        report.update({
            "tasks": a.tasks, "succeeded": done, "failed": failed, "wall_s": round(total_s, 1),
            "throughput": round(done / total_s, 2),
            "worker_rss_mb": {"start": round(start_rss, 1), "after_first_wave": waves[0]["worker_rss_mb"],
                              "peak": round(max(sampler.peak_root_kb.values()) / 1024, 1), "end": round(end_rss, 1),
                              "vmhwm": round((common.status_kb(worker.pid, "VmHWM") or 0) / 1024, 1)},
            "tree_rss_mb": {"start": round(start_tree, 1), "after_first_wave": waves[0]["tree_rss_mb"],
                            "peak": round(sampler.peak_tree_kb / 1024, 1),
                            "peak_pss": round(sampler.peak_tree_pss_kb / 1024, 1),
                            "end": round(sum(x[4] for x in end.values()) / 1024, 1)},
            "tree_nproc": {"start": len(base), "end": len(end), "peak": sampler.peak_nproc},
            "waves": waves,
        })
        report["growth_mb"] = round(report["worker_rss_mb"]["end"] - report["worker_rss_mb"]["after_first_wave"], 1)
    except BenchError as e:
        report["error"] = str(e)
        log(f"ERROR: {e}")
    finally:
        if sampler:
            sampler.stop()
            report["rss_series"] = sampler.series  # (t_s, worker_rss_kb, tree_rss_kb, nproc)
        if worker:
            report["worker_exit"] = worker.stop(grace=60)
            seen = sampler.seen if sampler else {}
            t_stop = time.monotonic()
            while time.monotonic() - t_stop < a.orphan_wait and common.survivors(seen, {worker.pid}):
                time.sleep(0.1)
            report["tree_gone_after_stop_s"] = round(time.monotonic() - t_stop, 2)
            # processes of this run still alive: seen in the tree or carrying the run's env marker
            orphans = worker.sweep(seen)
            report["orphans"] = [f"{p} {c[:160]}" for p, c in orphans]
            report["orphans_kernel_or_forkserver"] = sum(1 for _, c in orphans
                                                         if "ipykernel" in c or "om_forkserver" in c)
            report["processes_seen_in_tree"] = len(seen)
            outages = [ln for ln in worker.log().splitlines()
                       if re.search(r"reconnect|connection lost|Connection refused|Connection reset", ln, re.I)]
            report["broker_outage_lines"] = len(outages)
            report["broker_outage_first"] = outages[0][:300] if outages else None
            errs, nerr = common.log_errors(worker.log())
            report["worker_log_errors"] = nerr
            report["worker_log_error_lines"] = errs[:5]
            report["worker_log"] = str(worker.logpath)
        try:
            common.cleanup_queues(a.broker, [label, reply_q])
        except Exception as e:
            log(f"queue cleanup failed: {e!r}")
        mongo.stop()
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report["total_s"] = round(time.monotonic() - t0, 1)
    out_json.write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    print("\n" + md)
    if a.markdown:
        import run as benchrun
        benchrun.write_markdown(a.markdown, md, begin="<!-- bench/soak.py:begin -->", end="<!-- bench/soak.py:end -->")
        log(f"wrote {a.markdown}")
    log(f"JSON: {out_json}")
    ok = not report.get("error") and not report.get("orphans") and report.get("failed") == 0
    return 0 if ok else 1


def markdown(r):
    L = [f"Run {r['started']} – {r['finished']}, command: `{r['command']}` (broker {r['args']['broker']}, "
         f"one om-worker, default concurrency unless `--concurrency`; trivial notebooks `print(1)`, "
         f"{r['args']['notebooks']} notebooks run in waves)."]
    L.append("")
    if r.get("error"):
        L.append(f"**Error:** {r['error']}")
        L.append("")
    if "worker_rss_mb" in r:
        w, t = r["worker_rss_mb"], r["tree_rss_mb"]
        L.append(f"{r['succeeded']}/{r['tasks']} tasks SUCCESS ({r['failed']} failed) in {r['wall_s']} s "
                 f"({r['throughput']} tasks/s).")
        L.append("")
        L.append("| RSS (MB) | start (idle, ready) | after first wave | peak | end | growth (end − first wave) |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| om-worker process | {w['start']} | {w['after_first_wave']} | {w['peak']} | {w['end']} | "
                 f"{r['growth_mb']:+.1f} |")
        L.append(f"| whole tree (fork server, kernels) | {t['start']:.0f} | {t['after_first_wave']:.0f} | {t['peak']:.0f} "
                 f"| {t['end']:.0f} | {t['end'] - t['after_first_wave']:+.0f} |")
        L.append("")
        L.append(f"Tree RSS sums every process's resident pages (pages a forked kernel shares copy-on-write with the "
                 f"fork server count once per process); the tree's peak PSS (shared pages split) was "
                 f"{t.get('peak_pss', 0):.0f} MB, at most {r['tree_nproc']['peak']} processes.")
        L.append("")
        wv = r["waves"]
        L.append("Per wave (tasks done: worker RSS MB / tree processes): " + ", ".join(
            f"{x['tasks']}: {x['worker_rss_mb']} / {x['tree_nproc']}" for x in wv))
        L.append("")
    L.append(f"After SIGTERM: worker exit status {r.get('worker_exit')}, its process tree was gone "
             f"{r.get('tree_gone_after_stop_s')} s after the worker exited; orphans (processes of this run alive "
             f"after {r['args']['orphan_wait']:.0f} s, ipykernel/om_forkserver or carrying the run's env marker): "
             f"**{len(r.get('orphans', []))}** of {r.get('processes_seen_in_tree')} processes seen in the tree"
             + (f" — {r['orphans']}" if r.get("orphans") else "") + ".")
    if r.get("broker_outage_lines"):
        L.append("")
        L.append(f"The broker connection was lost and re-established during the run ({r['broker_outage_lines']} worker "
                 f"log lines; the shared RabbitMQ/Redis were restarted by other jobs), first: "
                 f"`{r['broker_outage_first'][:200]}`. Every task still succeeded.")
    if r.get("worker_log_errors"):
        L.append("")
        L.append(f"Worker log: {r['worker_log_errors']} WARN/ERROR lines, e.g. `{r['worker_log_error_lines'][0][:240]}`")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
