"""Celery tasks registered in omega|ml's app through its own configuration
(OMEGA_CELERY_IMPORTS in a config.yml), as an operator adds custom tasks; used by
tests/interop/test_runtime_canvas.py for `self.retry()` and a failing task."""
