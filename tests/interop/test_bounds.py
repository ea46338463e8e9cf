"""Issue 13 items 5-7: bounded worker memory per output, no log injection, no panics on any input.

- Notebook outputs far over the per-cell cap (one 500 MB `print`, a 300 MB `display_data` and a
  300 MB `execute_result`) through the real omega|ml client on RabbitMQ: the run is recorded, the
  stored cells are truncated with a visible marker/notice, and the worker's peak RSS (VmHWM of a
  worker started for this module) stays under OUTPUT_HWM_BOUND_MB.
- `run_omegaml_job` with `timeout=1e308` runs the notebook (no panic, no FAILURE).
- A hard time limit alone (`time_limit=`, no soft limit) on a notebook that sleeps: the client gets
  `TimeLimitExceeded`, and the task's metadata records one ERROR run and `attributes.state`.
- A task id holding a newline and ANSI escapes, on both brokers: no worker log line starts with the
  forged text and no raw ESC reaches the log; the id appears escaped.
- A 100 kB task id on RabbitMQ (rpc:// cannot answer it: AMQP's correlation_id is at most 255 bytes):
  the worker logs bounded lines and answers the next ping.

Run: .venv/bin/python -m pytest tests/interop/test_bounds.py -q
"""
import os
import time
from pathlib import Path

import pytest

import faults_util as fu
from conftest import AMQP_URL, VENV_PY, _NO_CONFIG, Broker, PING_TASK, WorkerProc, short_id, worker_env
from omega_scenarios import client_env

JOB = "omegaml.notebook.tasks.run_omegaml_job"
# One 500 MB print used to take the worker from ~26 MB to 1447 MB; the kernel now sends at most
# 16 MiB per output message and the worker cuts larger content while scanning it. The results
# notebook (10 MiB cell cap) is still built and written in memory, which is most of the peak.
OUTPUT_HWM_BOUND_MB = float(os.environ.get("OMW_BOUNDS_HWM_MB", "100"))
PRINT_BYTES = int(os.environ.get("OMW_BOUNDS_PRINT_BYTES", str(500_000_000)))
FORGED = "abc\n2026-01-01T00:00:00Z ERROR forged\x1b[31m"


def _vm_kb(pid, key):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class NbW:
    def __init__(self, w, tmpdir, label, mongo):
        self.w, self.tmpdir, self.label, self.mongo = w, tmpdir, label, mongo


@pytest.fixture(scope="module")
def nbw(om_worker_bin, mongo, tmp_path_factory):
    base = tmp_path_factory.mktemp("bounds-nb")
    wtmp = base / "worker-tmp"
    wtmp.mkdir()
    label = f"omw-bounds-{short_id()}"
    node = f"omw-bounds-{short_id()}@%h"
    argv = [str(om_worker_bin), "worker", "-Q", label, "-c", "1", "-n", node, "-l", "info",
            "--python", str(VENV_PY), "--task-timeout", "120"]
    w = WorkerProc(argv, worker_env(wtmp, AMQP_URL, "rpc://", mongo), base / "om-worker.log", node)
    try:
        w.wait_ready()
        yield NbW(w, wtmp, label, mongo)
    finally:
        rc = w.terminate()
        try:
            Broker("amqp").cleanup([label], [])
        except BaseException:
            pass
        if "panicked" in w.log():
            fu.fail(f"om-worker panicked:\n{w.log_tail()}")
        if rc != 0:
            fu.fail(f"om-worker exited {rc} on SIGTERM\n{w.log_tail()}")


@pytest.fixture
def nbworker(nbw, request):
    request.node._omw_workers = [nbw.w]
    assert nbw.w.alive(), f"the module's worker died earlier\n{nbw.w.log_tail()}"
    return nbw


JOBS_SCRIPT = """
import nbformat, omegaml as om
res_all = []
for name, cells, kwargs, opts in {jobs!r}:
    nb = nbformat.v4.new_notebook()
    for src in cells:
        nb.cells.append(nbformat.v4.new_code_cell(src))
    om.jobs.put(nb, name)
    t0 = time.monotonic()
    res = om.runtime.celeryapp.send_task({job!r}, args=[name + ".ipynb"], kwargs=kwargs,
                                         queue={label!r}, **opts)
    r = {{"name": name, "task_id": res.id}}
    try:
        r["value"] = res.get(timeout={get_timeout})
    except Exception as e:
        r["exc"] = f"{{type(e).__name__}}: {{e}}"
    r["elapsed"] = time.monotonic() - t0
    r["state"] = res.state
    time.sleep(0.5)
    meta = om.jobs.metadata(name)
    r["job_runs"] = meta.attributes.get("job_runs", [])
    r["attr_state"] = meta.attributes.get("state")
    r["results"] = om.jobs.list("results/" + name + "*")
    if r["results"]:
        rnb = om.jobs.get(r["results"][-1])
        cells_out = []
        for c in rnb.cells:
            texts, kinds, plain = [], [], []
            for o in c.get("outputs", []):
                kinds.append(o.get("output_type"))
                if o.get("output_type") == "stream":
                    t = o.get("text", "")
                    texts.append(t if isinstance(t, str) else "".join(t))
                elif "data" in o:
                    p = o["data"].get("text/plain", "")
                    plain.append(p if isinstance(p, str) else "".join(p))
            text = "".join(texts)
            cells_out.append({{"kinds": kinds, "text_len": len(text), "plain_len": sum(map(len, plain)),
                               "markers": [l for l in (text + "\\n".join(plain)).splitlines()
                                           if "om-worker" in l][:5]}})
        r["results_cells"] = cells_out
        r["results_size"] = len(json.dumps(dict(rnb), default=repr))
    res_all.append(r)
out(res_all)
"""


def run_jobs(nbw, jobs, get_timeout=180, timeout=300):
    """jobs: [(name, [cells], kwargs, send_task options)] run one after the other by one client."""
    ctmp = nbw.tmpdir.parent / "ctmp"
    ctmp.mkdir(exist_ok=True)
    env = client_env(nbw.mongo, AMQP_URL, nbw.label, ctmp, _NO_CONFIG)
    script = JOBS_SCRIPT.format(jobs=jobs, job=JOB, label=nbw.label, get_timeout=get_timeout)
    return fu.run_client(VENV_PY, script, env, timeout=timeout, what="run_omegaml_job client")


def test_huge_outputs_keep_the_worker_small(nbworker):
    nbw = nbworker
    name = f"huge{short_id()}"
    cells = [
        f"print('x' * {PRINT_BYTES})",
        "from IPython.display import display\ndisplay({'text/plain': 'y' * 300_000_000}, raw=True)",
        "'z' * 300_000_000",
        "print('after the huge outputs')",
    ]
    base_kb = fu.rss_kb(nbw.w.pid)
    with fu.RssSampler(nbw.w.pid) as rss:
        (r,) = run_jobs(nbw, [(name, cells, {}, {})])
    hwm_mb = _vm_kb(nbw.w.pid, "VmHWM") / 1024
    log = nbw.w.log_tail()
    assert r["state"] == "SUCCESS" and "exc" not in r, f"{r}\n{log}"
    assert len(r["job_runs"]) == 1 and r["job_runs"][0]["status"] == "OK", f"{r['job_runs']}\n{log}"
    cells_out = r["results_cells"]
    printed, displayed, result, after = cells_out
    assert printed["text_len"] < 11 * 2**20, f"print cell kept {printed['text_len']} characters"
    assert any("truncated" in m or "cut" in m for m in printed["markers"]), printed
    for c in (displayed, result):
        assert c["plain_len"] < 11 * 2**20, c
        assert c["markers"], f"no truncation/omission notice in {c}"
    assert after["text_len"] > 0, "the cell after the huge outputs did not run"
    assert r["results_size"] < 51 * 2**20, r["results_size"]
    print(f"\nworker RSS base {base_kb / 1024:.0f} MB, sampled peak {rss.peak_kb / 1024:.0f} MB, "
          f"VmHWM {hwm_mb:.0f} MB; {PRINT_BYTES / 1e6:.0f} MB print + 2 x 300 MB outputs in "
          f"{r['elapsed']:.1f} s; profile {rss.profile()}")
    assert hwm_mb <= OUTPUT_HWM_BOUND_MB, (
        f"worker peak RSS (VmHWM) {hwm_mb:.0f} MB > {OUTPUT_HWM_BOUND_MB} MB (base {base_kb / 1024:.0f} MB)\n"
        f"RSS profile (s, MB): {rss.profile()}\n{log}")


# A cell that sends one huge stream message itself, past the kernel-side cap (Session.send of the
# class, not the kernel's capped instance attribute): om-worker must not parse it whole. It still
# receives the frame (the ZeroMQ crate has no ZMQ_MAXMSGSIZE), so its memory grows by about the
# frame plus the 16 MiB it keeps, not ~2.8 times the frame as before. Runs after the test above
# (VmHWM is the process's peak).
BYPASS_BYTES = 200_000_000
BYPASS_CELL = f"""
from jupyter_client.session import Session
k = get_ipython().kernel
Session.send(k.session, k.iopub_socket, 'stream', {{'name': 'stdout', 'text': 'w' * {BYPASS_BYTES}}},
             parent=k.get_parent(), ident=b'stream.stdout')
"""


def test_huge_message_past_the_kernel_cap_is_cut_by_the_worker(nbworker):
    nbw = nbworker
    name = f"bypass{short_id()}"
    (r,) = run_jobs(nbw, [(name, [BYPASS_CELL, "print('after')"], {}, {})])
    hwm_mb = _vm_kb(nbw.w.pid, "VmHWM") / 1024
    log = nbw.w.log_tail()
    assert r["state"] == "SUCCESS" and "exc" not in r, f"{r}\n{log}"
    assert [x["status"] for x in r["job_runs"]] == ["OK"], r["job_runs"]
    cell, after = r["results_cells"]
    assert 0 < cell["text_len"] < 11 * 2**20, cell
    assert any("cut" in m or "truncated" in m for m in cell["markers"]), cell
    assert after["text_len"] > 0, r
    assert "its large values are cut" in log, log
    bound = BYPASS_BYTES / 2**20 + 120
    print(f"\nVmHWM after a {BYPASS_BYTES / 1e6:.0f} MB message past the kernel cap: {hwm_mb:.0f} MB")
    assert hwm_mb <= bound, f"worker VmHWM {hwm_mb:.0f} MB > {bound:.0f} MB (frame + 120 MB)\n{log}"


def test_notebook_stderr_cannot_forge_log_lines(nbworker):
    """Kernels inherited the worker's stderr: a cell writing to fd 2 wrote raw worker log lines."""
    nbw = nbworker
    forged = FORGED.encode()
    cell = (f"import os, sys\nos.write(2, b'\\n' + {forged!r} + b'-fd2\\n')\n"
            f"sys.__stderr__.write('\\n' + {FORGED!r} + '-dunder\\n'); sys.__stderr__.flush()")
    (r,) = run_jobs(nbw, [(f"stderr{short_id()}", [cell], {}, {})])
    assert r["state"] == "SUCCESS", r
    time.sleep(1.0)
    log = nbw.w.log()
    _assert_no_forged_lines(log)
    for tag in ("-fd2", "-dunder"):
        assert any(r"stderr: 2026-01-01T00:00:00Z ERROR forged\u{1b}[31m" + tag in l
                   for l in log.splitlines()), (
            f"the kernel's stderr line {tag} was not logged escaped:\n" + log[-3000:])


def test_timeout_1e308_runs_without_panic(nbworker):
    nbw = nbworker
    name = f"t1e308{short_id()}"
    (r,) = run_jobs(nbw, [(name, ["print('ran')"], {"timeout": 1e308}, {})])
    log = nbw.w.log()
    assert r["state"] == "SUCCESS" and "exc" not in r, f"{r}\n{nbw.w.log_tail()}"
    assert [x["status"] for x in r["job_runs"]] == ["OK"], r["job_runs"]
    assert "panicked" not in log and "cannot convert float" not in log, nbw.w.log_tail()


def test_hard_time_limit_records_the_error_run(nbworker):
    nbw = nbworker
    name = f"hard{short_id()}"
    (r,) = run_jobs(nbw, [(name, ["import time\ntime.sleep(120)"], {}, {"time_limit": 4})], get_timeout=90)
    log = nbw.w.log_tail()
    assert r["state"] == "FAILURE" and "TimeLimitExceeded" in r.get("exc", ""), f"{r}\n{log}"
    runs = r["job_runs"]
    assert len(runs) == 1, f"{runs}\n{log}"
    assert runs[0]["status"] == "ERROR" and "TimeLimitExceeded" in runs[0]["message"], runs
    assert r["attr_state"] == "FAILURE", r
    assert r["results"], f"no results notebook stored: {r}"
    assert r["elapsed"] < 60, f"took {r['elapsed']:.0f} s for a 4 s hard limit"


# ---------------------------------------------------------------------------------------------
# log injection and oversized ids (no kernels needed)
# ---------------------------------------------------------------------------------------------

WORKER_KERNELS = False  # the function-scoped `worker` factory starts these with --kernel-pool 0


def _assert_no_forged_lines(log):
    assert "\x1b" not in log, "raw ESC in the worker log:\n" + repr(log[-3000:])
    for line in log.splitlines():
        assert not line.startswith("2026-01-01T00:00:00Z"), f"forged log line: {line!r}"


def test_task_id_cannot_forge_log_lines(broker, worker, client_factory, q):
    w = worker(broker.url, [q], backend="rpc://")
    client = client_factory(broker.url, "rpc://")
    res = client.app.send_task(PING_TASK, args=[1, 2], kwargs={"a": 1}, queue=q, task_id=FORGED)
    assert res.get(timeout=30)["message"] == "ping return message"
    bad = client.app.send_task("omw.no.such.task", queue=q, task_id=FORGED + "-2")
    with pytest.raises(Exception) as e:
        bad.get(timeout=30)
    assert "NotRegistered" in type(e.value).__name__ or "NotRegistered" in str(e.value), repr(e.value)
    time.sleep(0.5)
    log = w.log()
    _assert_no_forged_lines(log)
    escaped = r"abc\n2026-01-01T00:00:00Z ERROR forged\u{1b}[31m"
    assert escaped in log, "the forged id was not logged (escaped):\n" + log[-3000:]
    assert any(escaped + "-2" in l and (" ERROR " in l or " WARN " in l) for l in log.splitlines()), log[-3000:]


def test_huge_task_id_on_rabbitmq_logs_bounded_lines(worker, client_factory, q):
    import amqp
    from kombu import Connection
    w = worker(AMQP_URL, [q], backend="rpc://")
    client = client_factory(AMQP_URL, "rpc://")
    # warm-up: the reply queue exists, so only the huge id's own outcome is in question
    client.ping(q).get(timeout=30)
    tid = "h" * 100_000
    headers = {"lang": "py", "task": PING_TASK, "id": tid, "retries": 0, "timelimit": [None, None],
               "root_id": None, "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}", "eta": None,
               "expires": None, "group": None}
    body = b'[[1, 2], {"a": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    with Connection(AMQP_URL) as c:
        c.default_channel.basic_publish(
            amqp.Message(body, content_type="application/json", content_encoding="utf-8",
                         application_headers=headers, reply_to=client.app.thread_oid, delivery_mode=2,
                         correlation_id="short-" + short_id()),
            exchange="", routing_key=q)
    time.sleep(3)
    assert client.ping(q).get(timeout=30)["message"] == "ping return message"
    time.sleep(0.5)
    log = w.log()
    lines = [l for l in log.splitlines() if "hhhhhhhhhh" in l]
    assert lines, "the huge id was never logged:\n" + log[-2000:]
    longest = max(map(len, lines))
    print(f"\n{len(lines)} log lines name the huge id; longest {longest} bytes:\n" + "\n".join(l[:300] for l in lines))
    assert longest < 8000, f"a log line of {longest} bytes"
    # the task's own lines (started, succeeded, timings) and one ERROR per state it cannot answer:
    # a reply id over AMQP's 255 bytes is refused for good, not retried
    problems = [l for l in lines if " WARN " in l or " ERROR " in l]
    assert len(lines) <= 6 and len(problems) <= 2, "\n".join(l[:300] for l in lines)
    assert sum(map(len, lines)) < 100_000, f"{len(lines)} lines naming the id, {sum(map(len, lines))} bytes"
    assert "panicked" not in log


# ---------------------------------------------------------------------------------------------
# broker messages over the size limit (src/broker/mod.rs MAX_MESSAGE_BYTES = 64 MiB)
# ---------------------------------------------------------------------------------------------

OVERSIZED_ARG_BYTES = 80_000_000


def test_message_over_the_size_limit_fails_without_decoding(broker, worker, client_factory, q):
    w = worker(broker.url, [q], backend="rpc://")
    client = client_factory(broker.url, "rpc://")
    base_mb = _vm_kb(w.pid, "VmHWM") / 1024
    res = client.ping(q, args=("p" * OVERSIZED_ARG_BYTES,))
    with pytest.raises(Exception) as e:
        res.get(timeout=120)
    err = f"{type(e.value).__name__}: {e.value}"
    assert "DecodeError" in err and "limit" in err, err
    assert client.ping(q).get(timeout=30)["message"] == "ping return message"
    hwm_mb = _vm_kb(w.pid, "VmHWM") / 1024
    print(f"\n{broker.kind}: {OVERSIZED_ARG_BYTES / 1e6:.0f} MB argument refused; VmHWM {base_mb:.0f} -> "
          f"{hwm_mb:.0f} MB")
    # AMQP: the delivery itself (~80 MB; measured +76 MB). Redis: the redis crate reads the popped
    # element (~107 MB, base64) whole, growing its buffer, and the envelope's fields are read to find
    # the task id (measured +407 MB). Decoding and answering it used ~6-10 times the body.
    factor = 2 if broker.kind == "amqp" else 6
    assert hwm_mb < base_mb + factor * OVERSIZED_ARG_BYTES / 2**20, f"VmHWM {hwm_mb:.0f} MB"
    time.sleep(1.0)
    st = broker.queue_state(q)
    assert st["ready"] == 0 and st["unacked"] == 0, f"not settled (redelivery loop?): {st}"
    log = w.log()
    assert "over the 67108864-byte limit" in log, log[-3000:]
