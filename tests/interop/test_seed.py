"""The README's main command's workflow: scripts/seed.py (the unchanged omega|ml client doing
`job.map(range(10))`, `job.status()` until all SUCCESS/OK, the results notebooks, the values the
notebooks stored, `om.runtime.ping()`) against om-worker, on both brokers.

scripts/demo.sh adds only set-up around this script (venv, SecantusDB, a release build, a worker on
`default`); here the worker is the test's own, on a fresh label and a database of its own, so the
script's clean-up of `main` touches nothing else.
"""
import subprocess

from conftest import ROOT, VENV_PY, _NO_CONFIG, short_id
from omega_scenarios import client_env

SEED = ROOT / "scripts" / "seed.py"


def test_seed_workflow(broker, worker, names, mongo, tmp_path):
    label = names.queue("seed")
    url = mongo.rsplit("/", 1)[0] + f"/omw_seed_{short_id()}"
    w = worker(broker.url, [label], concurrency=2, env_extra={"OMEGA_MONGO_URL": url})
    (tmp_path / "ctmp").mkdir()
    env = client_env(url, broker.url, label, tmp_path / "ctmp", _NO_CONFIG)
    proc = subprocess.run([str(VENV_PY), str(SEED)], env=env, cwd=str(ROOT), capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"seed.py exited {proc.returncode}\n{out[-6000:]}\n--- worker ---\n{w.log_tail()}"
    assert "seed: all 10 tasks SUCCESS/OK" in out, out[-4000:]
    assert "squares stored by the notebooks: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out, out[-4000:]
    assert f"worker '{w.nodename}'" in out, out[-4000:]
