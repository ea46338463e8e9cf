"""Stopping one process we started: SIGTERM, then SIGKILL after a grace period, only that PID.

Plain Python (no pytest): used by tests/interop/conftest.py and bench/common.py.
"""
import os
import signal
import subprocess
import time

KILL_WAIT = 30.0  # seconds to wait for the exit after SIGKILL


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid):
    """(exited, exit code or None) for a pid, without blocking. The exit code is known only for our
    own child (reaped here); for any other process, only whether it is gone."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (or already reaped): existence is all we can see
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True, None
        except PermissionError:
            return False, None
        return False, None
    if done == 0:
        return False, None
    return True, os.waitstatus_to_exitcode(status)


def _wait_pid(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        exited, rc = _reap(pid)
        if exited:
            return True, rc
        if time.monotonic() >= deadline:
            return False, None
        time.sleep(0.05)


def stop_process(proc, grace, on_kill=None):
    """Stop `proc` (a subprocess.Popen, or a pid): SIGTERM, wait up to `grace` seconds, then SIGKILL
    and wait up to KILL_WAIT seconds. Signals only that PID, never its group or children.
    `on_kill()`, if given, is called just before the SIGKILL (to log or warn).
    Returns the exit code (negative signal number when killed by a signal), or None where it is not
    known: a pid that is not our child, or one that outlived the SIGKILL wait. A Popen that outlives
    the SIGKILL wait raises subprocess.TimeoutExpired."""
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is None:
            _signal(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                if on_kill is not None:
                    on_kill()
                _signal(proc.pid, signal.SIGKILL)
                proc.wait(timeout=KILL_WAIT)
        return proc.returncode
    pid = int(proc)
    exited, rc = _reap(pid)
    if exited:
        return rc
    _signal(pid, signal.SIGTERM)
    exited, rc = _wait_pid(pid, grace)
    if exited:
        return rc
    if on_kill is not None:
        on_kill()
    _signal(pid, signal.SIGKILL)
    return _wait_pid(pid, KILL_WAIT)[1]
