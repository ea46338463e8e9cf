"""Discovered by omega|ml's Celery app (`autodiscover_tasks(OMEGA_CELERY_IMPORTS, 'tasks')`)."""
import os
import sys
import time

from celery import shared_task


@shared_task(bind=True, max_retries=3)
def flaky(self, succeed_at):
    """Retries itself until `self.request.retries` reaches `succeed_at`."""
    if self.request.retries < succeed_at:
        raise self.retry(countdown=0.2, exc=RuntimeError("not yet: %d" % self.request.retries))
    return {"retries": self.request.retries}


@shared_task(bind=True, max_retries=1)
def hopeless(self):
    """Retries once, then fails with its own exception (Celery re-raises it)."""
    raise self.retry(countdown=0.1, exc=ValueError("hopeless after %d" % self.request.retries))


@shared_task(bind=True)
def fails(self, message):
    raise KeyError(message)


@shared_task(bind=True)
def add(self, a, b):
    return a + b


@shared_task(bind=True)
def sleeps(self, seconds):
    """Sleeps; returns when it ran (wall clock, the worker's host) so a test can check how many ran
    at once and how far apart they started (remote control pool_grow/pool_shrink, rate_limit)."""
    start = time.time()
    time.sleep(seconds)
    return {"start": start, "end": time.time()}


class _StallingFlush:
    """A stdout whose flush stalls from its second call on. om-worker's task runner flushes the
    standard streams once before it writes the task's outcome; the flush after that (the fork
    server's, just before the child's `os._exit`) is on the child's way out."""

    def __init__(self, stream, seconds):
        self.stream, self.seconds, self.calls = stream, seconds, 0

    def write(self, text):
        return self.stream.write(text)

    def flush(self):
        self.calls += 1
        if self.calls > 1:
            time.sleep(self.seconds)
        return self.stream.flush()


@shared_task(bind=True)
def lingers(self, seconds, pid_file):
    """Returns at once, but its process then takes `seconds` to end; writes its pid to `pid_file`."""
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    sys.stdout = _StallingFlush(sys.stdout, seconds)
    return {"pid": os.getpid(), "end": time.time()}


@shared_task(bind=True)
def gone(self, pid_file):
    """Whether the process whose pid `pid_file` holds is gone (ended and reaped) as this task runs."""
    with open(pid_file) as f:
        pid = int(f.read())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return {"gone": True, "start": time.time()}
    return {"gone": False, "start": time.time()}
