"""Discovered by omega|ml's Celery app (`autodiscover_tasks(OMEGA_CELERY_IMPORTS, 'tasks')`)."""
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
