"""Estimators for the interop tests, importable by the worker's Python children (PYTHONPATH)."""
import time

from sklearn.base import BaseEstimator


class SlowModel(BaseEstimator):
    """predict() sleeps `seconds` first (so a test can act on a running task)."""

    def __init__(self, seconds=60.0):
        self.seconds = seconds

    def fit(self, X, y=None):
        return self

    def predict(self, X):
        time.sleep(self.seconds)
        return [0] * len(X)
