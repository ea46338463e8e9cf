"""What a task leaves running after its outcome, and its slot (`TaskContext::teardown`).

- A Python task's result goes out when its child has written the outcome, not when the child's
  process is gone; the task's slot is free only once it is (`src/tasks/python_task.rs`,
  `DoneSignal`). om-worker (`-c 1`, fork server) runs the test tasks of `support/om_test_tasks`
  with the unchanged Celery client: `lingers` returns at once but stalls its own exit by a minute
  (its stdout's flush, which the fork server calls just before the child's `os._exit`, sleeps);
  `gone`, sent right behind it, reports whether that process still exists when it starts.
- A notebook's kernel is shut down after its result, in the background; with `--gpus` the slot
  stays taken until the kernel is gone, so the slot's next task (same GPU) never meets it. The
  first notebook's kernel (`--kernel-mode ipykernel`, whose exit runs `atexit`) stalls its exit by
  a minute; the second notebook, one slot behind it, reports whether that kernel still exists.
"""
import time

import pytest

import faults_util as fu
from conftest import VENV_PY, _NO_CONFIG
from omega_scenarios import client_env
from test_control import tasks_worker
from test_isolation import JOBS_SCRIPT

WORKER_KERNELS = False

LINGERS = "om_test_tasks.tasks.lingers"
GONE = "om_test_tasks.tasks.gone"
STALL_S = 60


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_the_result_goes_out_before_the_child_is_gone_and_the_slot_waits_for_it(
        broker, worker, client_factory, q, tmp_path):
    w = tasks_worker(worker, broker, q, tmp_path, concurrency=1)
    client = client_factory(broker.url)
    pid_file = tmp_path / "lingers.pid"
    t0 = time.monotonic()
    lingering = client.send(LINGERS, q, args=(STALL_S, str(pid_file)))
    behind = client.send(GONE, q, args=(str(pid_file),))
    # Waiting for the exit would take the whole stall.
    out = lingering.get(timeout=STALL_S / 2)
    took = time.monotonic() - t0
    assert lingering.state == "SUCCESS" and out["pid"] > 0, out
    after = behind.get(timeout=STALL_S / 2)
    assert behind.state == "SUCCESS", after
    # The stalled child was ended (not left to its minute), and with one slot the next task started
    # only once it was reaped.
    assert after["gone"] is True, after
    assert after["start"] >= out["end"], (out, after)
    log = w.log()
    assert "task succeeded" in log and "WorkerLostError" not in log, log[-3000:]
    print(f"result {took:.2f}s after sending (the child's exit would have taken {STALL_S}s more)")


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_with_gpus_a_notebooks_slot_waits_for_its_kernel_to_end(broker, worker, q, mongo, tmp_path):
    worker(broker.url, [q], concurrency=1,
           extra=["--gpus", "7", "--kernel-mode", "ipykernel", "--kernel-pool", "0"])
    pid_file = tmp_path / "kernel.pid"
    lingering = [f"import atexit, os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                 f"atexit.register(time.sleep, {STALL_S})"]
    behind = [f"import os\npid = int(open({str(pid_file)!r}).read())\n"
              "try:\n    os.kill(pid, 0)\n    print('kernel ALIVE')\n"
              "except ProcessLookupError:\n    print('kernel GONE')\n"
              "print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'))"]
    ctmp = tmp_path / "client"
    ctmp.mkdir()
    env = client_env(mongo, broker.url, q, ctmp, _NO_CONFIG)
    jobs = [(f"linger-{q}", lingering), (f"behind-{q}", behind)]
    res = fu.run_client(VENV_PY, JOBS_SCRIPT.format(jobs=jobs), env, timeout=240,
                        what="two jobs on one GPU slot")
    first, second = res
    assert first["state"] == "SUCCESS" and second["state"] == "SUCCESS", res
    assert "kernel GONE" in second["text"] and "gpu 7" in second["text"], second
