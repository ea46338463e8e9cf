"""No task harms another, and nothing a task starts outlives it (issue 13, items 3 and 4).

om-worker (RabbitMQ, rpc://, `-c 2`, kernels forked from the fork server) and the unchanged
omega|ml client in a fresh process (`om.runtime.job(name).run()`, `res.get()`):

- a notebook that kills the fork server (`os.kill(os.getppid(), 9)`, the kernel's parent) while
  another slot's notebook runs: the other notebook ends OK with all its output, the killer's own
  notebook runs on to its end too, and the next job runs (the server is restarted);
- processes a notebook moves out of its process group and session (`start_new_session=True`, a
  double fork whose middle process exits), with the kernel ending normally and with the kernel
  dying (`os._exit`): none is left a few seconds after the task.

Each notebook's first cell writes its kernel's pid (as in test_faults.py); the spawned processes
carry a unique tag in their command line, so the orphan check sees only this test's processes.
"""
import os
import time

import pytest

import faults_util as fu
from conftest import AMQP_URL, VENV_PY, _NO_CONFIG, short_id, wait_until
from omega_scenarios import client_env

WORKER_KERNELS = True

JOBS_SCRIPT = """
import nbformat, omegaml as om
jobs = {jobs!r}
started = []
for name, cells in jobs:
    nb = nbformat.v4.new_notebook()
    for src in cells:
        nb.cells.append(nbformat.v4.new_code_cell(src))
    om.jobs.put(nb, name)
for name, cells in jobs:
    started.append((name, om.runtime.job(name).run()))
res = []
for name, r in started:
    out_r = {{"name": name}}
    try:
        out_r["value"] = r.get(timeout=180)
    except Exception as e:
        out_r["exc"] = f"{{type(e).__name__}}: {{e}}"
    out_r["state"] = r.state
    meta = om.jobs.metadata(name)
    out_r["job_runs"] = meta.attributes.get("job_runs", [])
    texts = []
    results = om.jobs.list("results/" + name + "*")
    if results:
        rnb = om.jobs.get(results[-1])
        for c in rnb.cells:
            for o in c.get("outputs", []):
                if o.get("output_type") == "stream":
                    t = o.get("text", "")
                    texts.append(t if isinstance(t, str) else "".join(t))
    out_r["text"] = "".join(texts)
    res.append(out_r)
out(res)
"""


@pytest.fixture(scope="module")
def iso(om_worker_bin, mongo, tmp_path_factory):
    base = tmp_path_factory.mktemp("isolation")
    with fu.notebook_worker(om_worker_bin, mongo, base, "omw-iso",
                            "isolation worker") as (w, _wtmp, marks, label):
        yield {"w": w, "label": label, "mongo": mongo, "marks": marks, "base": base}


def run_jobs(iso, jobs, timeout=300):
    ctmp = iso["base"] / "ctmp"
    ctmp.mkdir(exist_ok=True)
    env = client_env(iso["mongo"], AMQP_URL, iso["label"], ctmp, _NO_CONFIG)
    return fu.run_client(VENV_PY, JOBS_SCRIPT.format(jobs=jobs), env, timeout=timeout,
                         what="om.runtime.job(...).run()")


def pid_cell(iso, tag):
    return f"import os\nopen({str(iso['marks'] / ('kpid-' + tag))!r}, 'w').write(str(os.getpid()))"


def one_run(r):
    runs = r["job_runs"]
    assert len(runs) == 1, f"{r['name']}: {len(runs)} runs recorded: {runs}"
    return runs[0]


def test_a_notebook_that_kills_the_fork_server_harms_no_other_task(iso, request):
    request.node._omw_workers = [iso["w"]]
    victim, killer, after = (f"victim{short_id()}", f"killer{short_id()}", f"after{short_id()}")
    victim_cells = [pid_cell(iso, victim),
                    "import os\nprint('parent:', open('/proc/%d/cmdline' % os.getppid())"
                    ".read().replace(chr(0), ' '))",
                    "import time\nfor i in range(12):\n    print('tick', i, flush=True)\n"
                    "    time.sleep(1)",
                    "print('victim done')"]
    killer_cells = [pid_cell(iso, killer),
                    "import os, signal, time\ntime.sleep(3)\nserver = os.getppid()\n"
                    "os.kill(server, signal.SIGKILL)\nprint('killed', server)",
                    "import time\ntime.sleep(1)\nprint('killer done')"]
    r_victim, r_killer = run_jobs(iso, [(victim, victim_cells), (killer, killer_cells)])
    log = iso["w"].log_tail()
    assert "exited: its running kernels and tasks go on" in iso["w"].log(), (
        f"the fork server was not killed (the test proves nothing)\n{log}")
    for r, last in ((r_victim, "victim done"), (r_killer, "killer done")):
        assert r["state"] == "SUCCESS" and "exc" not in r, f"{r}\n{log}"
        run = one_run(r)
        assert run["status"] == "OK", f"{r['name']}: run {run}\n{log}"
        assert last in r["text"], f"{r['name']}: output {r['text']!r}"
    assert all(f"tick {i}" in r_victim["text"] for i in range(12)), r_victim["text"]
    # the next task runs (a new fork server)
    (r_after,) = run_jobs(iso, [(after, [pid_cell(iso, after), "print(6 * 7)"])])
    assert r_after["state"] == "SUCCESS" and one_run(r_after)["status"] == "OK", r_after
    assert "42" in r_after["text"]
    # the victim's kernel was forked by the fork server (checked before the kill), not started
    # as a plain process (as a notebook task's kernel env differing from the server's would be)
    assert "parent: " in r_victim["text"] and "om_forkserver.py" in r_victim["text"], r_victim["text"]
    for tag in (victim, killer, after):
        pid = int((iso["marks"] / f"kpid-{tag}").read_text())
        wait_until(lambda: fu.gone(pid), 15, f"kernel {pid} of {tag} gone after its task")
    assert iso["w"].alive()


def escaping_cells(tag):
    return ["import os, subprocess\n"
            f"subprocess.Popen(['sleep', '600', '{tag}-session'], start_new_session=True)\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            f"    subprocess.Popen(['sleep', '600', '{tag}-daemon'], start_new_session=True)\n"
            "    os._exit(0)\n"
            "import time\ntime.sleep(0.5)\nprint('spawned')"]


def tagged(tag):
    """Live processes whose command line holds `tag` (a zombie's is empty)."""
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and tag in fu.cmdline(int(d))]


@pytest.mark.parametrize("ending", ["normal", "kernel-dies"])
def test_processes_a_task_starts_end_with_it(iso, request, ending):
    request.node._omw_workers = [iso["w"]]
    name = f"esc{short_id()}"
    tag = f"omw-escape-{short_id()}"
    cells = [pid_cell(iso, name)] + escaping_cells(tag)
    cells.append("print('end')" if ending == "normal" else "import os\nos._exit(3)")
    (r,) = run_jobs(iso, [(name, cells)])
    log = iso["w"].log_tail()
    assert r["state"] == "SUCCESS", f"{r}\n{log}"
    assert "spawned" in r["text"], f"the escaping cell did not run: {r}"
    assert one_run(r)["status"] == ("OK" if ending == "normal" else "ERROR"), r
    deadline = time.monotonic() + 10
    left = tagged(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = tagged(tag)
    assert not left, ("processes the task started outlived it: "
                      + "; ".join(f"{p} ({fu.cmdline(p)}, ppid state {fu.proc_state(p)})" for p in left)
                      + f"\n{log}")
