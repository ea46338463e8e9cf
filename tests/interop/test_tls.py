"""TLS (issue 15 item 3): `amqps://`, `rediss://` and MongoDB over TLS, configured as omega|ml and
Celery read it (OMEGA_USESSL, CA_CERTS_PATH, kombu's `ssl_*` URL parameters), end to end with the
unchanged omega|ml client, and a wrong CA or host name as a fast, precise failure at start.

Every server is this module's own, on 127.0.0.1 with a CA the module creates (openssl CLI):
  - its own `redis-server` (`--port 0 --tls-port P`; Debian's 7.0 build has TLS),
  - its own RabbitMQ node: a second node with its own name, ports, mnesia, logs and Erlang cookie
    (HOME) under tmp, only a TLS listener on 127.0.0.1; the system node is not touched,
  - its own SecantusDB (`secantusd-py --tls-cert-file ...`, in memory).
The server certificate names only DNS:localhost: connecting by `localhost` verifies, connecting by
`127.0.0.1` is the wrong-host-name case. A second CA, which signed nothing the servers use, is the
wrong-CA case.
"""
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import ROOT, VENV, VENV_PY, _NO_CONFIG, free_port, short_id, worker_env
from omega_scenarios import client_env

SEED = ROOT / "scripts" / "seed.py"
# RabbitMQ's own scripts, not Debian's /usr/sbin wrappers (those `su rabbitmq`, which would drop our
# HOME, i.e. our node's own Erlang cookie).
RABBIT_BIN = os.environ.get("OMW_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin")
FAIL_FAST_S = 30


def _run(argv, **kw):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)
    assert proc.returncode == 0, f"{argv} failed rc {proc.returncode}: {proc.stderr}"
    return proc


def _port_open(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(port, proc, what, log, timeout=60):
    deadline = time.monotonic() + timeout
    while not _port_open(port):
        if proc.poll() is not None:
            pytest.fail(f"{what} exited rc {proc.returncode} before listening on {port}\n"
                        f"{log.read_text(errors='replace')[-3000:]}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not listening on {port} after {timeout}s\n"
                        f"{log.read_text(errors='replace')[-3000:]}", pytrace=False)
        time.sleep(0.2)


def _stop(proc, grace=15):
    """SIGTERM to our own process group (the server and the children it started), SIGKILL after grace."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca.pem signs server.pem (DNS:localhost only); other-ca.pem signs nothing the servers use."""
    d = tmp_path_factory.mktemp("pki")

    def ca(name, cn):
        _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"),
              "-out", str(d / f"{name}.pem"), "-days", "2", "-subj", f"/CN={cn}"])

    def leaf(name, cn, signer, ext):
        """`name`.key/.pem: a key and a certificate for `cn`, signed by `signer`, with `ext`."""
        (d / f"{name}.cnf").write_text(ext)
        _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"),
              "-out", str(d / f"{name}.csr"), "-subj", f"/CN={cn}"])
        _run(["openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{signer}.pem"),
              "-CAkey", str(d / f"{signer}.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"),
              "-days", "2", "-extfile", str(d / f"{name}.cnf")])

    ca("ca", "om-worker test CA")
    ca("other-ca", "om-worker other CA")
    leaf("server", "localhost", "ca", "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
         "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    # a client certificate for mutual TLS (ssl_certfile / ssl_keyfile)
    leaf("client", "om-worker client", "ca", client_ext)
    # a client certificate from a CA the servers do not trust
    leaf("bad-client", "om-worker stranger", "other-ca", client_ext)
    # readable by the servers whatever user they drop to
    for p in d.iterdir():
        p.chmod(0o644)
    return d


def _redis_tls_server(pki, d, auth_clients):
    port = free_port()
    log = d / "redis.log"
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"),
         "--tls-ca-cert-file", str(pki / "ca.pem"), "--tls-auth-clients", auth_clients,
         "--save", "", "--appendonly", "no", "--dir", str(d)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    _wait_port(port, proc, "redis-server --tls-port", log)
    return port, proc


@pytest.fixture(scope="module")
def tls_redis(pki, tmp_path_factory):
    port, proc = _redis_tls_server(pki, tmp_path_factory.mktemp("redis-tls"), "no")
    try:
        yield port
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def tls_redis_mutual(pki, tmp_path_factory):
    """A redis-server that requires a client certificate signed by our CA."""
    port, proc = _redis_tls_server(pki, tmp_path_factory.mktemp("redis-mtls"), "yes")
    try:
        yield port
    finally:
        _stop(proc)


class TlsRabbit(int):
    """The TLS node's port (an int, as the tests format it into URLs), with its node name and the
    environment its rabbitmqctl needs."""

    def __new__(cls, port, node, env):
        obj = super().__new__(cls, port)
        obj.node, obj.env = node, env
        return obj

    def ctl(self, *args):
        proc = subprocess.run([f"{RABBIT_BIN}/rabbitmqctl", "-q", "-n", self.node, *args], env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"rabbitmqctl {args}: {proc.stdout}{proc.stderr}"
        return proc.stdout


@pytest.fixture(scope="module")
def tls_rabbit(pki, tmp_path_factory):
    """A second RabbitMQ node of our own with only a TLS listener; its own HOME (Erlang cookie)."""
    if not os.access(f"{RABBIT_BIN}/rabbitmq-server", os.X_OK):
        pytest.fail(f"{RABBIT_BIN}/rabbitmq-server not found: the amqps tests start a RabbitMQ node of "
                    f"their own (set OMW_RABBITMQ_BIN to RabbitMQ's sbin/bin directory)", pytrace=False)
    d = tmp_path_factory.mktemp("rabbit-tls")
    port, dist = free_port(), free_port()
    node = f"omwtls{short_id()}@localhost"
    (d / "rabbit.conf").write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {pki / 'ca.pem'}\n"
        f"ssl_options.certfile = {pki / 'server.pem'}\n"
        f"ssl_options.keyfile = {pki / 'server.key'}\n"
        # a client certificate is checked against our CA when one is presented (the amqps mutual
        # TLS test); clients without one are let in (the other amqps tests)
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
        "loopback_users = none\n")
    (d / "plugins").write_text("")
    env = dict(os.environ, HOME=str(d), RABBITMQ_NODENAME=node, RABBITMQ_DIST_PORT=str(dist),
               RABBITMQ_MNESIA_BASE=str(d / "mnesia"), RABBITMQ_LOG_BASE=str(d / "log"),
               RABBITMQ_CONFIG_FILE=str(d / "rabbit"), RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "plugins"),
               RABBITMQ_PID_FILE=str(d / "rabbit.pid"))
    log = d / "server.log"
    proc = subprocess.Popen([f"{RABBIT_BIN}/rabbitmq-server"], env=env, cwd=str(d), stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # await_startup answers "not running" until the node has registered with epmd: retry.
        deadline = time.monotonic() + 150
        while True:
            up = subprocess.run([f"{RABBIT_BIN}/rabbitmqctl", "-n", node, "await_startup", "--timeout", "20"],
                                env=env, capture_output=True, text=True, timeout=60)
            if up.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"second RabbitMQ node {node} did not start: {up.stdout}{up.stderr}\n"
                            f"{log.read_text(errors='replace')[-3000:]}", pytrace=False)
            time.sleep(1)
        _wait_port(port, proc, f"RabbitMQ {node}", log)
        yield TlsRabbit(port, node, env)
    finally:
        subprocess.run([f"{RABBIT_BIN}/rabbitmqctl", "-n", node, "stop"], env=env, capture_output=True,
                       timeout=60)
        _stop(proc)


@pytest.fixture(scope="module")
def tls_mongo(pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("secantus-tls")
    port = free_port()
    log = d / "secantus.log"
    proc = subprocess.Popen(
        [str(VENV / "bin" / "secantusd-py"), "--host", "127.0.0.1", "--port", str(port), "--storage-path",
         ":memory:", "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"),
         "--tls-ca-file", str(pki / "ca.pem")],
        cwd=str(d), stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(port, proc, "secantusd-py --tls", log)
        yield port
    finally:
        _stop(proc)


def _tls_env(pki):
    """omega|ml's TLS settings: MongoDB TLS with our CA (OMEGA_USESSL, CA_CERTS_PATH)."""
    return {"OMEGA_USESSL": "1", "CA_CERTS_PATH": str(pki / "ca.pem")}


def _seed(worker, names, tmp_path, pki, broker_url, backend_url, mongo_port):
    label = names.queue("tls")
    mongo_url = f"mongodb://localhost:{mongo_port}/omw_tls_{short_id()}"
    # The worker trusts our CA only through CA_CERTS_PATH / the URL (no SSL_CERT_FILE).
    w = worker(broker_url, [label], backend=backend_url, concurrency=2,
               env_extra=dict(_tls_env(pki), OMEGA_MONGO_URL=mongo_url))
    (tmp_path / "ctmp").mkdir()
    # The Python client: OMEGA_USESSL makes Celery's broker_use_ssl True (py-amqp: TLS with the
    # default context, which reads SSL_CERT_FILE), pymongo gets tls/tlsCAFile from omega|ml.
    env = client_env(mongo_url, broker_url, label, tmp_path / "ctmp", _NO_CONFIG, backend=backend_url,
                     extra=dict(_tls_env(pki), SSL_CERT_FILE=str(pki / "ca.pem")))
    proc = subprocess.run([str(VENV_PY), str(SEED)], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"seed.py exited {proc.returncode}\n{out[-6000:]}\n--- worker ---\n{w.log_tail()}"
    assert "seed: all 10 tasks SUCCESS/OK" in out, out[-4000:]
    assert "squares stored by the notebooks: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out, out[-4000:]
    assert f"worker '{w.nodename}'" in out, out[-4000:]
    return w


def test_amqps_seed_workflow_with_mongodb_tls(worker, names, tmp_path, pki, tls_rabbit, tls_mongo):
    """amqps:// broker, rpc:// results over it, MongoDB over TLS: the seed workflow end to end."""
    w = _seed(worker, names, tmp_path, pki, f"amqps://guest:guest@localhost:{tls_rabbit}//", "rpc://",
              tls_mongo)
    assert "connected to AMQP broker" in w.log()


def test_rediss_seed_workflow_with_mongodb_tls(worker, names, tmp_path, pki, tls_redis, tls_mongo):
    """rediss:// broker and result backend with kombu's ssl_* URL parameters, MongoDB over TLS."""
    url = (f"rediss://localhost:{tls_redis}/0?ssl_cert_reqs=required"
           f"&ssl_ca_certs={pki / 'ca.pem'}")
    w = _seed(worker, names, tmp_path, pki, url, url, tls_mongo)
    assert "connected to Redis broker" in w.log()


def _start_expecting_failure(om_worker_bin, tmp_path, env_extra, extra_args=()):
    """Starts om-worker; returns (rc, seconds, output) once it exits (fails the test after FAIL_FAST_S)."""
    wtmp = tmp_path / f"w-{short_id()}"
    wtmp.mkdir()
    env = worker_env(wtmp, extra=env_extra)
    argv = [str(om_worker_bin), "worker", "-Q", f"omw-tls-{short_id()}", "-c", "1", "-n",
            f"omw-tls-{short_id()}@%h", "--python", str(VENV_PY), "--kernel-pool", "0", "--lazy-fork-server",
            *extra_args]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=FAIL_FAST_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"om-worker still running after {FAIL_FAST_S}s (a TLS misconfiguration must fail fast)"
                    f"\n{out[-4000:]}", pytrace=False)
    return proc.returncode, time.monotonic() - t0, out


CASES = ["amqps", "rediss", "mongodb"]


def _env_for(case, pki, host, ca, tls_rabbit, tls_redis, tls_mongo, mongo):
    """The worker's environment with `host` and trusted `ca` on the service under test; the others
    are the plain system brokers and the session's SecantusDB."""
    if case == "amqps":
        # amqp:// + OMEGA_USESSL is TLS (Celery's broker_use_ssl=True); CA_CERTS_PATH is the CA.
        return {"OMEGA_BROKER": f"amqp://guest:guest@{host}:{tls_rabbit}//", "OMEGA_USESSL": "1",
                "CA_CERTS_PATH": str(ca), "OMEGA_RESULT_BACKEND": "rpc://", "OMEGA_MONGO_URL": mongo}
    if case == "rediss":
        url = f"rediss://{host}:{tls_redis}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
        return {"OMEGA_BROKER": url, "OMEGA_RESULT_BACKEND": "rpc://", "OMEGA_MONGO_URL": mongo}
    return {"OMEGA_BROKER": "redis://127.0.0.1:6379/0", "OMEGA_RESULT_BACKEND": "rpc://",
            "OMEGA_MONGO_URL": f"mongodb://{host}:{tls_mongo}/omw_tls", "OMEGA_USESSL": "1",
            "CA_CERTS_PATH": str(ca)}


@pytest.fixture
def tls_servers(request, pki, tls_redis, tls_mongo):
    # RabbitMQ's node only for the amqps cases (it is the slowest to start).
    rabbit = request.getfixturevalue("tls_rabbit") if request.node.callspec.params["case"] == "amqps" else None
    return rabbit, tls_redis, tls_mongo


@pytest.mark.parametrize("case", CASES)
def test_wrong_ca_fails_fast(case, om_worker_bin, tmp_path, pki, tls_servers, mongo):
    """A CA that did not sign the server's certificate: exit non-zero within FAIL_FAST_S, one line
    naming certificate verification, the unknown issuer and the CA used."""
    rabbit, redis_port, mongo_port = tls_servers
    env = _env_for(case, pki, "localhost", pki / "other-ca.pem", rabbit, redis_port, mongo_port, mongo)
    rc, took, out = _start_expecting_failure(om_worker_bin, tmp_path, env)
    assert rc != 0, out[-4000:]
    lines = [ln for ln in out.splitlines() if "certificate verification failed" in ln]
    assert lines, f"no line names certificate verification (rc {rc}, {took:.1f}s):\n{out[-4000:]}"
    assert "not signed by a trusted CA" in lines[-1], lines[-1]
    assert str(pki / "other-ca.pem") in lines[-1], lines[-1]
    assert "ready: consuming" not in out, out[-4000:]


@pytest.mark.parametrize("case", CASES)
def test_wrong_host_name_fails_fast(case, om_worker_bin, tmp_path, pki, tls_servers, mongo):
    """The right CA, but connected by 127.0.0.1 while the certificate names only localhost."""
    rabbit, redis_port, mongo_port = tls_servers
    env = _env_for(case, pki, "127.0.0.1", pki / "ca.pem", rabbit, redis_port, mongo_port, mongo)
    rc, took, out = _start_expecting_failure(om_worker_bin, tmp_path, env)
    assert rc != 0, out[-4000:]
    lines = [ln for ln in out.splitlines() if "certificate verification failed" in ln]
    assert lines, f"no line names certificate verification (rc {rc}, {took:.1f}s):\n{out[-4000:]}"
    assert "not valid for the host name" in lines[-1], lines[-1]
    assert "ready: consuming" not in out, out[-4000:]


def test_check_reports_tls_failure(om_worker_bin, tmp_path, pki, tls_redis):
    """`om-worker check` names the TLS problem too (it shares the connection code)."""
    url = f"rediss://localhost:{tls_redis}/0?ssl_cert_reqs=required&ssl_ca_certs={pki / 'other-ca.pem'}"
    env = worker_env(tmp_path, broker_url=url, backend_url="rpc://",
                     mongo_url="mongodb://127.0.0.1:1/omw_tls")
    proc = subprocess.run([str(om_worker_bin), "check", "--python", str(VENV_PY)], env=env,
                          capture_output=True, text=True, timeout=90)
    broker_line = next((ln for ln in proc.stdout.splitlines() if "broker" in ln), "")
    assert proc.returncode != 0, proc.stdout
    assert broker_line.startswith("FAILED"), proc.stdout
    assert "certificate verification failed" in broker_line, proc.stdout


RELAXED = {
    # ssl_check_hostname=false: the chain is verified (our CA), the name (127.0.0.1) is not
    "rediss-check-hostname-false": "rediss://127.0.0.1:{redis}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
                                   "&ssl_check_hostname=false",
    # ssl_cert_reqs=none: kombu's CERT_NONE, any certificate (here: signed by a CA we do not trust)
    "rediss-cert-reqs-none": "rediss://127.0.0.1:{redis}/0?ssl_cert_reqs=none&ssl_ca_certs={other}",
    "amqps-check-hostname-false": "amqps://guest:guest@127.0.0.1:{rabbit}//?ssl_ca_certs={ca}"
                                  "&ssl_check_hostname=false",
}


@pytest.mark.parametrize("case", list(RELAXED))
def test_relaxed_verification_connects(case, request, worker, names, pki, tls_redis):
    """kombu's ssl_check_hostname=false and ssl_cert_reqs=none relax exactly what they say: the same
    host names and CAs that fail start-up above connect."""
    rabbit = request.getfixturevalue("tls_rabbit") if case.startswith("amqps") else None
    url = RELAXED[case].format(redis=tls_redis, rabbit=rabbit, ca=pki / "ca.pem", other=pki / "other-ca.pem")
    w = worker(url, [names.queue("tls")], extra=["--kernel-pool", "0", "--lazy-fork-server"])
    assert w.consuming, w.log_tail()


def test_client_certificate(worker, names, om_worker_bin, tmp_path, pki, tls_redis_mutual, mongo):
    """Mutual TLS: ssl_certfile/ssl_keyfile are presented; without them the server's refusal is
    named at start."""
    base = f"rediss://localhost:{tls_redis_mutual}/0?ssl_cert_reqs=required&ssl_ca_certs={pki / 'ca.pem'}"
    rc, took, out = _start_expecting_failure(
        om_worker_bin, tmp_path, {"OMEGA_BROKER": base, "OMEGA_RESULT_BACKEND": "rpc://",
                                  "OMEGA_MONGO_URL": mongo})
    assert rc != 0, out[-4000:]
    assert "TLS" in out and "client certificate" in out, f"({took:.1f}s)\n{out[-4000:]}"
    url = f"{base}&ssl_certfile={pki / 'client.pem'}&ssl_keyfile={pki / 'client.key'}"
    w = worker(url, [names.queue("tls")], extra=["--kernel-pool", "0", "--lazy-fork-server"])
    assert w.consuming, w.log_tail()


def test_amqps_client_certificate(worker, names, om_worker_bin, tmp_path, pki, tls_rabbit, mongo):
    """Mutual TLS on AMQP: the certificate in ssl_certfile/ssl_keyfile is presented (RabbitMQ lists
    its subject on the connection); one from a CA the node does not trust is refused, and that
    refusal is named at start."""
    base = f"amqps://guest:guest@localhost:{tls_rabbit}//?ssl_ca_certs={pki / 'ca.pem'}"
    bad = f"{base}&ssl_certfile={pki / 'bad-client.pem'}&ssl_keyfile={pki / 'bad-client.key'}"
    rc, took, out = _start_expecting_failure(
        om_worker_bin, tmp_path, {"OMEGA_BROKER": bad, "OMEGA_RESULT_BACKEND": "rpc://", "OMEGA_MONGO_URL": mongo})
    assert rc != 0, out[-4000:]
    assert "client certificate" in out and "ssl_certfile" in out, f"({took:.1f}s)\n{out[-4000:]}"
    assert "ready: consuming" not in out, out[-4000:]
    url = f"{base}&ssl_certfile={pki / 'client.pem'}&ssl_keyfile={pki / 'client.key'}"
    w = worker(url, [names.queue("tls")], extra=["--kernel-pool", "0", "--lazy-fork-server"])
    assert w.consuming, w.log_tail()
    subjects = tls_rabbit.ctl("list_connections", "peer_cert_subject")
    assert "CN=om-worker client" in subjects, subjects


@pytest.mark.parametrize("url", ["amqps://guest:guest@127.0.0.1:5672//", "rediss://127.0.0.1:6379/0"],
                         ids=["amqps", "rediss"])
def test_tls_to_a_plain_port_fails_fast(url, om_worker_bin, tmp_path, mongo):
    """TLS against the system's plain RabbitMQ/Redis ports: no hang, a line that says to suspect it."""
    rc, took, out = _start_expecting_failure(
        om_worker_bin, tmp_path, {"OMEGA_BROKER": url, "OMEGA_RESULT_BACKEND": "rpc://", "OMEGA_MONGO_URL": mongo})
    assert rc != 0, out[-4000:]
    assert "does not speak TLS on this port" in out or "does the server speak TLS on this port" in out, \
        f"({took:.1f}s)\n{out[-4000:]}"


def test_mongodb_result_backend_over_tls(worker, client_factory, names, pki, tls_mongo, check_ping):
    """The opt-in mongodb:// result backend with OMEGA_USESSL/CA_CERTS_PATH: om-worker stores the
    ping's result over TLS (as omega|ml's mongo_url() adds tls/tlsCAFile for Celery) and the Celery
    client reads it back over TLS."""
    import pymongo
    q = names.queue("tls")
    plain = f"mongodb://localhost:{tls_mongo}/omw_tls_be_{short_id()}"
    tls_url = f"{plain}?tls=true&tlsCAFile={pki / 'ca.pem'}&directConnection=true"
    db = pymongo.MongoClient(tls_url, serverSelectionTimeoutMS=10000).get_default_database()
    # created up front, as in test_ping (SecantusDB and two concurrent collection creations)
    db.celery_taskmeta.create_index("date_done", background=True)
    redis_url = "redis://127.0.0.1:6379/0"
    w = worker(redis_url, [q], backend=plain, extra=["--kernel-pool", "0", "--lazy-fork-server"],
               env_extra=dict(_tls_env(pki), OMEGA_MONGO_URL=plain))
    client = client_factory(redis_url, tls_url)
    client.app.conf.mongodb_backend_settings = {"options": {"socketTimeoutMS": 30000,
                                                            "serverSelectionTimeoutMS": 10000}}
    res = client.ping(q)
    check_ping(res.get(timeout=30), w.nodename)
    doc = db.celery_taskmeta.find_one({"_id": res.id})
    assert doc is not None and doc["status"] == "SUCCESS", doc
