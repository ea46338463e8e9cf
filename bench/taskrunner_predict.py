"""One omega|ml predict: a fork-server child (`task` op, python/om_taskrunner.py) vs task.apply().

    .venv/bin/python bench/taskrunner_predict.py [--mongo URL] [-n N]

Starts its own SecantusDB (scripts/secantus.sh, free port) unless --mongo is given, puts a fitted
LinearRegression and a 1000-row dataset with the omega|ml client, then measures N predicts each:
- forked: `{"op": "task"}` to a fork server (python/om_forkserver.py) until (a) outcome.json is
  renamed into place and (b) the child's `exit` event; CPU from the exit event (wait4 rusage);
- apply: `omegaml.celeryapp.app.tasks['omegaml.tasks.omega_predict'].apply()` in this process
  (warm: one untimed call first), wall and process CPU time.
Prints a JSON summary (medians). No broker is needed.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import queue
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = Path(os.environ.get("OM_VENV", ROOT / ".venv")) / "bin" / "python"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mongo")
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--spare", action="store_true",
                    help="each task runs in a spare child forked (and warmed up) ahead of it")
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="omw-trbench-"))
    port = None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMEGA_", "CELERY_"))}
    env["OMEGA_CONFIG_FILE"] = str(tmp / "no-config.yml")
    env["OMEGA_TMP"] = str(tmp)
    if not opts.mongo:
        port = free_port()
        subprocess.run([str(ROOT / "scripts" / "secantus.sh"), "start", "--port", str(port), "--dir",
                        str(tmp / "data")], check=True, capture_output=True,
                       env=dict(os.environ, OM_RUN_DIR=str(tmp / "run")))
        opts.mongo = f"mongodb://127.0.0.1:{port}/omw_bench"
    env["OMEGA_MONGO_URL"] = opts.mongo
    os.environ.update(env)
    server = None
    try:
        import numpy as np
        import pandas as pd
        from omegaml import Omega
        from sklearn.linear_model import LinearRegression

        om = Omega(mongo_url=opts.mongo)
        X = pd.DataFrame({"x1": np.arange(1000.0), "x2": np.arange(1000.0) % 7})
        Y = pd.DataFrame({"y": 2 * X["x1"] - X["x2"]})
        om.datasets.put(X, "bench-X", append=False)
        om.models.put(LinearRegression().fit(X, Y), "bench-lr")
        kwargs = {"rName": None, "pure_python": False, "__bucket": None}

        # -- forked
        server = subprocess.Popen([str(VENV_PY), str(ROOT / "python" / "om_forkserver.py")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=env, cwd=str(tmp))
        events = queue.Queue()
        threading.Thread(target=lambda: [events.put(json.loads(ln)) for ln in server.stdout],
                         daemon=True).start()
        t = time.monotonic()
        ready = events.get(timeout=180)
        ready_s = time.monotonic() - t
        assert ready["event"] == "ready" and ready.get("task_runner") is None, ready
        forked = []
        for i in range(opts.n + 1):
            rdir = tmp / f"r{i}"
            rdir.mkdir()
            req = {"task": "omegaml.tasks.omega_predict", "id": f"bench-{i}",
                   "args": ["bench-lr", "bench-X"],
                   "kwargs": {"$dict": [[k, v] for k, v in kwargs.items()]},
                   "request": {"retries": 0, "hostname": "bench@host",
                               "delivery_info": {"exchange": "", "routing_key": "default",
                                                 "priority": 0, "redelivered": False}},
                   "result_serializer": "pickle", "result_dir": str(rdir)}
            (tmp / f"req{i}.json").write_text(json.dumps(req))
            if opts.spare:
                server.stdin.write((json.dumps({"op": "spare", "id": 1000 + i, "env": env,
                                                "cwd": str(tmp), "hostname": "bench@host"})
                                    + "\n").encode())
                server.stdin.flush()
                ev = events.get(timeout=30)
                assert ev.get("event") == "forked", ev
                spare_pid = ev["pid"]
                time.sleep(1.0)  # idle worker: the spare is warm before the task arrives
            t0 = time.monotonic()
            if opts.spare:
                op = {"op": "go", "id": i, "pid": spare_pid, "request": str(tmp / f"req{i}.json")}
            else:
                op = {"op": "task", "id": i, "request": str(tmp / f"req{i}.json"), "env": env,
                      "cwd": str(tmp)}
            server.stdin.write((json.dumps(op) + "\n").encode())
            server.stdin.flush()
            outcome_s = None
            while True:
                try:
                    ev = events.get(timeout=0.002)
                except queue.Empty:
                    ev = None
                if outcome_s is None and (rdir / "outcome.json").exists():
                    outcome_s = time.monotonic() - t0
                if ev and ev.get("event") == "exit":
                    exit_s = time.monotonic() - t0
                    break
            out = json.loads((rdir / "outcome.json").read_text())
            assert out["status"] == "SUCCESS", out
            if i:  # the first one warms the page cache / SecantusDB
                forked.append({"outcome_s": outcome_s or exit_s, "exit_s": exit_s,
                               "cpu_s": ev["cpu_s"], "task_runtime_s": out["runtime"]})

        # -- apply, in this process
        import omegaml.celeryapp as ca

        task = ca.app.tasks["omegaml.tasks.omega_predict"]
        task.apply(args=("bench-lr", "bench-X"), kwargs=dict(kwargs)).get()
        applied = []
        for i in range(opts.n):
            w, c = time.monotonic(), time.process_time()
            task.apply(args=("bench-lr", "bench-X"), kwargs=dict(kwargs)).get()
            applied.append({"wall_s": time.monotonic() - w, "cpu_s": time.process_time() - c})

        med = lambda rows, k: round(statistics.median(r[k] for r in rows), 4)  # noqa: E731
        print(json.dumps({
            "n": opts.n, "forkserver_ready_s": round(ready_s, 3),
            "forked": {k: med(forked, k) for k in ("outcome_s", "exit_s", "cpu_s", "task_runtime_s")},
            "apply_in_process": {k: med(applied, k) for k in ("wall_s", "cpu_s")},
        }, indent=1))
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(timeout=30)
        if port is not None:
            subprocess.run([str(ROOT / "scripts" / "secantus.sh"), "stop", "--port", str(port)],
                           capture_output=True, env=dict(os.environ, OM_RUN_DIR=str(tmp / "run")))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
