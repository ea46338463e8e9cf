"""A Python task's result goes out when its child has written the outcome, not when the child's
process is gone; the task's slot is free only once it is (`src/tasks/python_task.rs`, `DoneSignal`
and `Teardown`).

om-worker (`-c 1`, fork server) runs the test tasks of `support/om_test_tasks` with the unchanged
Celery client: `lingers` returns at once but stalls its own exit by a minute (its stdout's flush,
which the fork server calls just before the child's `os._exit`, sleeps); `gone`, sent right behind
it, reports whether that process still exists when it starts.
"""
import time

import pytest

from test_control import tasks_worker

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
