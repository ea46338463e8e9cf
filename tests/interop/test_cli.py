"""`om-worker check` and `om-worker config` against the real services (om-worker only; no Python
counterpart). Env is scrubbed as for the worker fixture; each case sets exactly what it tests."""
import subprocess

import pytest

from conftest import AMQP_URL, IMPL, REDIS_BACKEND_URL, REDIS_URL, VENV_PY, free_port, worker_env

# This module runs no notebook: its workers pre-start no kernels (see conftest's `worker`).
WORKER_KERNELS = False

pytestmark = pytest.mark.skipif(IMPL == "python", reason="OMW_WORKER_IMPL=python self-check: om-worker CLI only")


def run_cli(binary, sub, args, env, timeout=90):
    proc = subprocess.run([str(binary), sub, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _flags(broker, backend, mongo, python=None, queues="omw-cli"):
    return ["-Q", queues, "--broker", broker, "--result-backend", backend, "--mongo-url", mongo,
            "--python", python or str(VENV_PY)]


@pytest.mark.parametrize("broker_url,backend_url", [(AMQP_URL, "rpc://"), (REDIS_URL, REDIS_BACKEND_URL),
                                                    (AMQP_URL, REDIS_BACKEND_URL)],
                         ids=["amqp-rpc", "redis-redis", "amqp-redis"])
def test_check_ok(om_worker_bin, mongo, tmp_path, broker_url, backend_url):
    rc, out = run_cli(om_worker_bin, "check", _flags(broker_url, backend_url, mongo), worker_env(tmp_path))
    assert rc == 0, f"check failed with everything up (rc {rc}):\n{out}"


def test_check_broker_unreachable(om_worker_bin, mongo, tmp_path):
    port = free_port()
    rc, out = run_cli(om_worker_bin, "check",
                      _flags(f"amqp://guest:s3cretpw@127.0.0.1:{port}//", "rpc://", mongo), worker_env(tmp_path))
    assert rc != 0, f"check passed with an unreachable broker:\n{out}"
    assert "broker" in out.lower() and f"127.0.0.1:{port}" in out, f"message does not name the broker:\n{out}"
    assert "s3cretpw" not in out, f"password printed:\n{out}"


def test_check_redis_broker_unreachable(om_worker_bin, mongo, tmp_path):
    port = free_port()
    rc, out = run_cli(om_worker_bin, "check", _flags(f"redis://127.0.0.1:{port}/0", "rpc://", mongo),
                      worker_env(tmp_path))
    assert rc != 0, f"check passed with an unreachable Redis broker:\n{out}"
    assert "broker" in out.lower() and f"127.0.0.1:{port}" in out, out


def test_check_mongo_unreachable(om_worker_bin, tmp_path):
    port = free_port()
    rc, out = run_cli(om_worker_bin, "check",
                      _flags(AMQP_URL, "rpc://", f"mongodb://u:m0ngopw@127.0.0.1:{port}/omega"),
                      worker_env(tmp_path))
    assert rc != 0, f"check passed with an unreachable MongoDB:\n{out}"
    assert "mongo" in out.lower() and f"127.0.0.1:{port}" in out, f"message does not name MongoDB:\n{out}"
    assert "m0ngopw" not in out, f"password printed:\n{out}"


def test_check_backend_unreachable(om_worker_bin, mongo, tmp_path):
    port = free_port()
    rc, out = run_cli(om_worker_bin, "check", _flags(AMQP_URL, f"redis://127.0.0.1:{port}/0", mongo),
                      worker_env(tmp_path))
    assert rc != 0, f"check passed with an unreachable result backend:\n{out}"
    assert "backend" in out.lower() and f"127.0.0.1:{port}" in out, f"message does not name the backend:\n{out}"


def test_check_python_missing(om_worker_bin, mongo, tmp_path):
    bad = str(tmp_path / "no-such-python")
    rc, out = run_cli(om_worker_bin, "check", _flags(AMQP_URL, "rpc://", mongo, python=bad), worker_env(tmp_path))
    assert rc != 0, f"check passed with a missing python:\n{out}"
    assert "python" in out.lower() and bad in out, f"message does not name the python path:\n{out}"


def test_config_masks_secrets(om_worker_bin, tmp_path):
    args = ["-Q", "omw-a,omw-b", "-c", "3", "--broker", "amqp://guest:s3cretpw@127.0.0.1:5672//",
            "--result-backend", "redis://:b4ckendpw@127.0.0.1:6379/0",
            "--mongo-url", "mongodb://u:m0ngopw@127.0.0.1:27017/omega"]
    rc, out = run_cli(om_worker_bin, "config", args, worker_env(tmp_path))
    assert rc == 0, out
    for secret in ("s3cretpw", "b4ckendpw", "m0ngopw"):
        assert secret not in out, f"secret {secret!r} shown by `config`:\n{out}"
    for shown in ("127.0.0.1:5672", "127.0.0.1:6379", "127.0.0.1:27017", "omw-a", "omw-b", "3"):
        assert shown in out, f"{shown!r} missing from `config` output:\n{out}"


def test_config_env_fallbacks(om_worker_bin, tmp_path):
    """RABBITMQ_URL, MONGO_URL and CELERY_Q are read when the OMEGA_* names are unset; result backend
    defaults to rpc://, as in omega|ml's defaults."""
    env = worker_env(tmp_path, extra={"RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5999//",
                                      "MONGO_URL": "mongodb://127.0.0.1:27999/fallbackdb",
                                      "CELERY_Q": "omw-fallback-q"})
    rc, out = run_cli(om_worker_bin, "config", [], env)
    assert rc == 0, out
    for shown in ("127.0.0.1:5999", "127.0.0.1:27999", "fallbackdb", "omw-fallback-q", "rpc://"):
        assert shown in out, f"{shown!r} missing from `config` output:\n{out}"
    env = worker_env(tmp_path, broker_url="amqp://guest:guest@127.0.0.1:5888//", extra={
        "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5999//", "OMEGA_WORKER_LABEL": "omw-label",
        "CELERY_Q": "omw-fallback-q", "OMEGA_WORKER_CONCURRENCY": "7"})
    rc, out = run_cli(om_worker_bin, "config", [], env)
    assert rc == 0, out
    assert "127.0.0.1:5888" in out and "127.0.0.1:5999" not in out, f"OMEGA_BROKER must win:\n{out}"
    assert "omw-label" in out and "omw-fallback-q" not in out, f"OMEGA_WORKER_LABEL must win:\n{out}"
    assert "7" in out, out
