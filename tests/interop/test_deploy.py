"""deploy/kubernetes/: offline validation of the manifests, no cluster and no network.

- Built-in kinds (Deployment, ConfigMap, Secret, PodDisruptionBudget, Service) are validated with
  kubernetes-validate's bundled schemas, strict (unknown fields fail), for every version in
  K8S_VERSIONS.
- KEDA objects (no schema bundled) are checked structurally: apiVersion, kind, known spec fields,
  scaleTargetRef naming a Deployment of ours, minReplicaCount 0, the trigger type of the file,
  the queue the target Deployment consumes, TriggerAuthentication -> Secret keys.
- Consistency rules in code (`deployment_problems` & co.): flags exist in src/cli.rs; probes are
  httpGet /healthz on the port `--metrics-addr` serves, bound to all interfaces; no `celery` in a
  probe; terminationGracePeriodSeconds >= --shutdown-grace + 40 s >= the task hard time limit
  + 40 s; envFrom names the ConfigMap and Secret that exist; the Dockerfile's non-root uid; GPU
  requests and --gpus with CUDA_VISIBLE_DEVICES matching the GPU count. Each rule is also run
  against a broken copy of a manifest (MUTATIONS, KEDA_MUTATIONS), which must be reported, so no
  rule passes vacuously.

Needs only PyYAML and kubernetes-validate (scripts/requirements.txt): this module overrides the
session's `environment_ok` fixture (as test_taskrunner.py does), so RabbitMQ, Redis and the
om-worker binary are not needed, and it runs under any venv with those two packages.
"""
import copy
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
# Kubernetes versions the built-in kinds are validated against: an old release still common on
# managed clusters and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")
BUILTIN_KINDS = {
    ("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "Service"),
    ("apps/v1", "Deployment"), ("policy/v1", "PodDisruptionBudget"),
}
# After --shutdown-grace the worker gives cancelled tasks up to 30 s to record their outcome
# (src/worker/mod.rs) and its services up to 10 s to stop (src/app/mod.rs) before it exits:
# terminationGracePeriodSeconds must leave at least that after the grace.
POST_GRACE_S = 40
KEDA_API = "keda.sh/v1alpha1"
KEDA_FILES = {"keda-rabbitmq.yaml": "rabbitmq", "keda-redis.yaml": "redis"}
# spec fields of keda.sh/v1alpha1 (KEDA 2.x CRDs), to catch typos the API server would reject.
SCALEDOBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                     "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
                     "triggers"}
TRIGGER_FIELDS = {"type", "metadata", "name", "useCachedMetrics", "authenticationRef", "metricType"}
TRIGGERAUTH_SPEC = {"secretTargetRef", "env", "configMapTargetRef", "hashiCorpVault", "azureKeyVault",
                    "awsSecretManager", "gcpSecretManager", "podIdentity"}


@pytest.fixture(scope="session", autouse=True)
def environment_ok():
    """Narrowed to what this module needs: PyYAML and the pinned kubernetes-validate."""
    from importlib.metadata import PackageNotFoundError, version
    req = (ROOT / "scripts" / "requirements.txt").read_text()
    m = re.search(r"^kubernetes-validate==(\S+)", req, re.M)
    assert m, "kubernetes-validate is not pinned in scripts/requirements.txt"
    problems = []
    for pkg, want in {"kubernetes-validate": m.group(1), "PyYAML": None}.items():
        try:
            got = version(pkg)
        except PackageNotFoundError:
            problems.append(f"python package {pkg} missing (scripts/requirements.txt)")
            continue
        if want and got != want:
            problems.append(f"{pkg} {got} installed, {want} pinned (scripts/requirements.txt)")
    if problems:
        pytest.fail("deploy test environment not usable:\n  - " + "\n  - ".join(problems), pytrace=False)
    return True


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def load_docs():
    """{file name: [documents]} for every YAML file under deploy/kubernetes/ (empty docs dropped)."""
    import yaml
    out = {}
    for path in sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("*.yml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        out[path.name] = docs
    return out


DOCS = load_docs()
MANIFESTS = {f: d for f, d in DOCS.items() if f != "kustomization.yaml"}
BASE_FILES = sorted(f for f in MANIFESTS if f not in KEDA_FILES)


def base_objects():
    return [d for f in BASE_FILES for d in MANIFESTS[f]]


def by_kind(kind, docs=None):
    return {d["metadata"]["name"]: d for d in (docs if docs is not None else base_objects())
            if d.get("kind") == kind}


def all_docs():
    return [(f, i, d) for f, docs in MANIFESTS.items() for i, d in enumerate(docs)]


def doc_id(item):
    f, i, d = item
    return f"{f}#{i}:{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"


# ---------------------------------------------------------------------------------------------
# facts from the rest of the repository
# ---------------------------------------------------------------------------------------------

def cli_flags():
    """Long and short flags of src/cli.rs's clap structs (`#[arg(...)]` followed by `pub field`)."""
    src = (ROOT / "src" / "cli.rs").read_text()
    longs, shorts = set(), set()
    for attr, field in re.findall(r"#\[arg\(([^\]]*)\)\]\s*(?:///[^\n]*\n\s*)*pub (\w+):", src):
        m = re.search(r'long\s*=\s*"([^"]+)"', attr)
        if m:
            longs.add(m.group(1))
        elif re.search(r"\blong\b", attr):
            longs.add(field.replace("_", "-"))
        m = re.search(r"short\s*=\s*'(.)'", attr)
        if m:
            shorts.add(m.group(1))
    return longs, shorts


def dockerfile_user():
    """(uid, user name) the runtime image runs as, from docker/Dockerfile."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    m = re.search(r"useradd\b[^\n]*--uid\s+(\d+)\s+(\w+)", text)
    assert m, "docker/Dockerfile: no `useradd --uid N name`"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users, "docker/Dockerfile: no USER"
    assert users[-1] == m.group(2), f"Dockerfile USER {users[-1]} is not the useradd'ed {m.group(2)}"
    return int(m.group(1)), m.group(2)


def dockerfile_env(name):
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    m = re.search(rf"\b{name}=(\S+)", text)
    return m.group(1) if m else None


def env_names_read_by_worker():
    """Every quoted UPPER_CASE name in src/**/*.rs (env vars om-worker reads, among others)."""
    names = set()
    for p in (ROOT / "src").rglob("*.rs"):
        names |= set(re.findall(r'"([A-Z][A-Z0-9_]+)"', p.read_text()))
    return names


# ---------------------------------------------------------------------------------------------
# Deployment rules
# ---------------------------------------------------------------------------------------------

def parse_args(args):
    """Worker args -> {flag: value or True}; '-Q x' and '--queues=x' forms; positional 'worker'."""
    out, pos, i = {}, [], 0
    while i < len(args):
        a = str(args[i])
        if a.startswith("-"):
            if "=" in a and a.startswith("--"):
                k, v = a.split("=", 1)
                out[k] = v
            elif i + 1 < len(args) and not str(args[i + 1]).startswith("-"):
                out[a] = str(args[i + 1])
                i += 1
            else:
                out[a] = True
        else:
            pos.append(a)
        i += 1
    return pos, out


def flag(opts, *names):
    for n in names:
        if n in opts:
            return opts[n]
    return None


def resolve_port(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def container_of(dep):
    cs = dep["spec"]["template"]["spec"]["containers"]
    return next((c for c in cs if c.get("name") == "om-worker"), cs[0])


def deployment_problems(dep, ctx):
    """Every rule a worker Deployment breaks, as messages (empty = fine)."""
    p = []
    name = dep["metadata"]["name"]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    c = container_of(dep)
    if c.get("command"):
        p.append("command set: the image's ENTRYPOINT om-worker must stay")
    pos, opts = parse_args(c.get("args") or [])
    if pos[:1] != ["worker"]:
        p.append(f"args must start with the `worker` subcommand, got {pos[:1]}")
    longs, shorts = ctx["flags"]
    for f in opts:
        known = f[2:] in longs if f.startswith("--") else f[1:] in shorts
        if not known:
            p.append(f"flag {f} does not exist in src/cli.rs")
    # labels / selector
    sel = spec["selector"]["matchLabels"]
    tlabels = spec["template"]["metadata"].get("labels", {})
    if any(tlabels.get(k) != v for k, v in sel.items()):
        p.append(f"selector {sel} does not match the pod labels {tlabels}")
    queue = flag(opts, "-Q", "--queues")
    if not queue:
        p.append("no -Q/--queues")
    elif tlabels.get("app.kubernetes.io/component") != queue or not name.endswith("-" + queue):
        p.append(f"queue {queue!r} vs component label {tlabels.get('app.kubernetes.io/component')!r} "
                 f"and name {name!r}")
    # metrics address and probes
    addr = flag(opts, "--metrics-addr")
    mport = None
    if not isinstance(addr, str) or not re.fullmatch(r"(.+):(\d+)", addr):
        p.append(f"--metrics-addr missing or not host:port: {addr!r}")
    else:
        host, port = addr.rsplit(":", 1)
        mport = int(port)
        if host not in ("0.0.0.0", "[::]"):
            p.append(f"--metrics-addr binds {host}: the kubelet probes the pod IP, bind 0.0.0.0")
        if mport not in [cp.get("containerPort") for cp in c.get("ports", [])]:
            p.append(f"metrics port {mport} is not a containerPort")
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(kind)
        if probe is None:
            if kind != "startupProbe":
                p.append(f"{kind} missing")
            continue
        if "celery" in repr(probe).lower():
            p.append(f"{kind} mentions celery")
        hg = probe.get("httpGet")
        if not hg or set(probe) & {"exec", "tcpSocket", "grpc"}:
            p.append(f"{kind} is not an httpGet probe")
            continue
        # liveness/startup: alive (also while draining); readiness: takes work (503 while draining)
        want = "/readyz" if kind == "readinessProbe" else "/healthz"
        if hg.get("path") != want:
            p.append(f"{kind} path {hg.get('path')!r} != {want}")
        if mport is None or resolve_port(c, hg.get("port")) != mport:
            p.append(f"{kind} port {hg.get('port')!r} is not the served metrics port {mport}")
    # shutdown
    grace = flag(opts, "--shutdown-grace")
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if grace is None or not str(grace).isdigit():
        p.append(f"--shutdown-grace missing or not seconds: {grace!r}")
    else:
        if not tgps >= int(grace) + POST_GRACE_S:
            p.append(f"terminationGracePeriodSeconds {tgps} < --shutdown-grace {grace} + {POST_GRACE_S} s "
                     f"for cancelled tasks and the exit")
        hard = int(flag(opts, "--task-timeout") or ctx["task_timeout"]) + 30
        if not int(grace) >= hard:
            p.append(f"--shutdown-grace {grace} < the task hard time limit {hard}")
    # env
    refs = c.get("envFrom") or []
    cms = {r["configMapRef"]["name"] for r in refs if "configMapRef" in r}
    secs = {r["secretRef"]["name"] for r in refs if "secretRef" in r}
    if not cms or cms - set(ctx["configmaps"]):
        p.append(f"envFrom ConfigMaps {sorted(cms)} not all among {sorted(ctx['configmaps'])}")
    if not secs or secs - set(ctx["secrets"]):
        p.append(f"envFrom Secrets {sorted(secs)} not all among {sorted(ctx['secrets'])}")
    if any(r.get(k, {}).get("optional") for r in refs for k in ("configMapRef", "secretRef")):
        p.append("envFrom marked optional: a missing Secret would start a worker on defaults")
    # security
    uid = ctx["uid"]
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    run_as = csc.get("runAsUser", psc.get("runAsUser"))
    if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        p.append("runAsNonRoot not set")
    if run_as != uid:
        p.append(f"runAsUser {run_as} != the Dockerfile's uid {uid}")
    if csc.get("allowPrivilegeEscalation") is not False:
        p.append("allowPrivilegeEscalation not false")
    if csc.get("privileged"):
        p.append("privileged container")
    # resources
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(part, {}):
                p.append(f"resources.{part}.{r} missing")
    # GPU
    gpus = res.get("limits", {}).get("nvidia.com/gpu")
    gflag = flag(opts, "--gpus")
    if ctx.get("gpu"):
        if not isinstance(gpus, int) or gpus < 1:
            p.append(f"limits nvidia.com/gpu {gpus!r}: a GPU worker must request a GPU")
        if not gflag or gflag is True:
            p.append("GPU worker without --gpus")
        elif gflag == "auto" and isinstance(gpus, int):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            want = ",".join(str(i) for i in range(gpus))
            if env.get("CUDA_VISIBLE_DEVICES") != want:
                p.append(f"--gpus auto splits CUDA_VISIBLE_DEVICES, which the device plugin does not set: "
                         f"it must be {want!r} for {gpus} GPU(s), is {env.get('CUDA_VISIBLE_DEVICES')!r}")
        conc = flag(opts, "-c", "--concurrency")
        if isinstance(gpus, int) and (conc is None or int(conc) != gpus):
            p.append(f"-c {conc} on {gpus} GPU(s): one task slot per GPU")
        if not (pod.get("nodeSelector") or pod.get("affinity")) or not pod.get("tolerations"):
            p.append("GPU worker without nodeSelector/affinity and tolerations for GPU nodes")
    else:
        if gpus or gflag:
            p.append("non-GPU worker requests a GPU or passes --gpus")
    return p


def context():
    cms = by_kind("ConfigMap")
    task_timeout = 1200
    for cm in cms.values():
        task_timeout = int(cm.get("data", {}).get("OMEGA_TASK_TIMEOUT", task_timeout))
    return {
        "flags": cli_flags(),
        "configmaps": cms,
        "secrets": by_kind("Secret"),
        "uid": dockerfile_user()[0],
        "task_timeout": task_timeout,
    }


def is_gpu(dep):
    return dep["metadata"]["name"].endswith("-gpu")


# ---------------------------------------------------------------------------------------------
# tests: files and schemas
# ---------------------------------------------------------------------------------------------

def test_manifests_present():
    want = {"configmap.yaml", "secret.yaml", "deployment-default.yaml", "deployment-gpu.yaml",
            "pdb.yaml", "keda-rabbitmq.yaml", "keda-redis.yaml", "kustomization.yaml", "service.yaml"}
    assert want <= set(DOCS), f"missing: {sorted(want - set(DOCS))}"
    for f, docs in MANIFESTS.items():
        assert docs, f"{f}: no YAML document"
        for d in docs:
            assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"{f}: {d!r:.200}"
            assert (d.get("metadata") or {}).get("name"), f"{f}: {d['kind']} without metadata.name"


def test_every_kind_is_checked():
    """A kind this module neither schema-validates nor checks as KEDA would slip through."""
    for f, i, d in all_docs():
        key = (d["apiVersion"], d["kind"])
        assert key in BUILTIN_KINDS or (d["apiVersion"] == KEDA_API and d["kind"] in
                                        ("ScaledObject", "TriggerAuthentication")), f"{f}#{i}: {key}"
        if d["apiVersion"] == KEDA_API:
            assert f in KEDA_FILES, f"{f}: KEDA object outside keda-*.yaml"


def test_no_duplicate_names():
    for keda in [None, *KEDA_FILES]:
        seen = set()
        for d in base_objects() + (MANIFESTS[keda] if keda else []):
            key = (d["kind"], d["metadata"]["name"])
            assert key not in seen, f"duplicate {key} (base + {keda})"
            seen.add(key)


BUILTIN_DOCS = [x for x in all_docs() if (x[2]["apiVersion"], x[2]["kind"]) in BUILTIN_KINDS]


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("item", BUILTIN_DOCS, ids=doc_id)
def test_schema_strict(item, k8s):
    import kubernetes_validate
    f, i, d = item
    try:
        kubernetes_validate.validate(d, k8s, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{doc_id(item)} invalid for Kubernetes {k8s}: {e.message} at "
                    f"{'/'.join(str(x) for x in e.path)}", pytrace=False)


def test_schema_validation_is_strict():
    """The validator is not a no-op: an unknown field and a wrong type are rejected."""
    import kubernetes_validate
    dep = copy.deepcopy(by_kind("Deployment")["om-worker-default"])
    kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(dep)
    container_of(bad)["livenesProbe"] = container_of(bad)["livenessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "1830s"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_kustomization():
    k = DOCS["kustomization.yaml"][0]
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    res = k["resources"]
    for r in res:
        assert (DEPLOY / r).is_file(), f"kustomization lists missing {r}"
    assert sorted(res) == BASE_FILES, f"resources {sorted(res)} != every non-KEDA manifest {BASE_FILES}"
    assert not set(res) & set(KEDA_FILES), "only one KEDA variant may be applied: keep both out"


# ---------------------------------------------------------------------------------------------
# tests: consistency rules
# ---------------------------------------------------------------------------------------------

DEPLOYMENTS = sorted(by_kind("Deployment"))


def test_deployments_present():
    assert DEPLOYMENTS == ["om-worker-default", "om-worker-gpu"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_rules(name):
    dep = by_kind("Deployment")[name]
    ctx = dict(context(), gpu=is_gpu(dep))
    assert deployment_problems(dep, ctx) == []


def _args(dep):
    return container_of(dep)["args"]


def _set_flag(dep, name, value):
    a = _args(dep)
    a[a.index(name) + 1] = value


# (description, deployment, mutation): each must be reported by deployment_problems.
MUTATIONS = [
    ("probe on /metrics", "om-worker-default",
     lambda d: container_of(d)["livenessProbe"]["httpGet"].update(path="/metrics")),
    ("readiness probe on another port", "om-worker-default",
     lambda d: container_of(d)["readinessProbe"]["httpGet"].update(port=8080)),
    ("celery inspect ping probe", "om-worker-default",
     lambda d: container_of(d).update(livenessProbe={"exec": {"command": [
         "celery", "inspect", "ping", "-d", "default@$HOSTNAME"]}})),
    ("no readiness probe", "om-worker-gpu", lambda d: container_of(d).pop("readinessProbe")),
    ("metrics on loopback", "om-worker-default",
     lambda d: _set_flag(d, "--metrics-addr", "127.0.0.1:9808")),
    ("metrics port not served by the probes' port", "om-worker-gpu",
     lambda d: _set_flag(d, "--metrics-addr", "0.0.0.0:9100")),
    ("grace period below shutdown grace", "om-worker-default",
     lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=1800)),
    ("grace period without room for the exit", "om-worker-gpu",
     lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=1830)),
    ("grace period left at the default 30 s", "om-worker-gpu",
     lambda d: d["spec"]["template"]["spec"].pop("terminationGracePeriodSeconds")),
    ("shutdown grace shorter than a task", "om-worker-default",
     lambda d: _set_flag(d, "--shutdown-grace", "60")),
    ("misspelt flag", "om-worker-default",
     lambda d: _args(d).__setitem__(_args(d).index("--shutdown-grace"), "--shutdown-grace-secs")),
    ("envFrom names a missing Secret", "om-worker-default",
     lambda d: container_of(d)["envFrom"][1]["secretRef"].update(name="om-worker-secret")),
    ("envFrom without the ConfigMap", "om-worker-gpu",
     lambda d: container_of(d)["envFrom"].pop(0)),
    ("root user", "om-worker-default",
     lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0)),
    ("GPU worker without a GPU", "om-worker-gpu",
     lambda d: [container_of(d)["resources"][k].pop("nvidia.com/gpu") for k in ("requests", "limits")]),
    ("GPU worker without --gpus", "om-worker-gpu",
     lambda d: _args(d).__delitem__(slice(_args(d).index("--gpus"), _args(d).index("--gpus") + 2))),
    ("--gpus auto without CUDA_VISIBLE_DEVICES", "om-worker-gpu", lambda d: container_of(d).pop("env")),
    ("queue and labels disagree", "om-worker-default", lambda d: _set_flag(d, "-Q", "gpu")),
    ("selector does not match the pods", "om-worker-default",
     lambda d: d["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "x"})),
    ("no memory limit", "om-worker-gpu", lambda d: container_of(d)["resources"]["limits"].pop("memory")),
]


@pytest.mark.parametrize("desc,name,mutate", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_rule_catches(desc, name, mutate):
    dep = copy.deepcopy(by_kind("Deployment")[name])
    mutate(dep)
    ctx = dict(context(), gpu=is_gpu(dep))
    assert deployment_problems(dep, ctx), f"{desc}: not reported"


def test_configmap_settings():
    cm = by_kind("ConfigMap")["om-worker-env"]["data"]
    assert cm.get("OMEGA_RESULT_BACKEND") == "rpc://"
    assert cm.get("OMEGA_TMP") == dockerfile_env("OMEGA_TMP"), "OMEGA_TMP differs from the image's dir"
    known = env_names_read_by_worker()
    unknown = sorted(k for k in cm if k not in known)
    assert not unknown, f"ConfigMap keys om-worker never reads (typo?): {unknown}"
    for k, v in cm.items():
        assert not re.search(r"://[^/@\s]*:[^/@\s]*@", v), f"ConfigMap {k} carries credentials: use the Secret"
    assert not {"OMEGA_MONGO_URL", "OMEGA_BROKER", "MONGO_URL", "RABBITMQ_URL"} & set(cm)


def test_secret_is_an_example():
    s = by_kind("Secret")["om-worker-secrets"]
    data = s.get("stringData", {})
    assert {"OMEGA_MONGO_URL", "OMEGA_BROKER"} <= set(data)
    assert "data" not in s, "example Secret should use readable stringData placeholders"
    for k, v in data.items():
        assert "CHANGE-ME" in v, f"{k}: not a placeholder; real credentials do not belong in git"
    text = (DEPLOY / "secret.yaml").read_text()
    assert "kubectl create secret" in text, "secret.yaml should say how real deployments create it"
    # every key is read by om-worker or by a KEDA TriggerAuthentication
    known = env_names_read_by_worker()
    keda_keys = {r["key"] for f in KEDA_FILES for d in MANIFESTS[f] if d["kind"] == "TriggerAuthentication"
                 for r in d["spec"].get("secretTargetRef", [])}
    assert set(data) <= known | keda_keys, f"unused Secret keys: {sorted(set(data) - known - keda_keys)}"


def test_pdbs():
    pdbs = by_kind("PodDisruptionBudget")
    for name, dep in by_kind("Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs.values()
                    if all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())]
        assert len(covering) == 1, f"{name}: {len(covering)} PDBs select its pods"
        spec = covering[0]["spec"]
        assert spec.get("maxUnavailable", 0) >= 1 and "minAvailable" not in spec, \
            f"{name}: maxUnavailable >= 1 so a single replica can still be drained"


def test_service_targets_metrics():
    svc = by_kind("Service")["om-worker-metrics"]["spec"]
    for name, dep in by_kind("Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in svc["selector"].items()), f"Service misses {name}"
        c = container_of(dep)
        _, opts = parse_args(c["args"])
        served = int(opts["--metrics-addr"].rsplit(":", 1)[1])
        for port in svc["ports"]:
            assert resolve_port(c, port["targetPort"]) == served, f"{name}: targetPort {port['targetPort']}"


# ---------------------------------------------------------------------------------------------
# tests: KEDA
# ---------------------------------------------------------------------------------------------

def keda_problems(fname, docs):
    """Every rule the KEDA objects of keda-rabbitmq.yaml / keda-redis.yaml break (empty = fine)."""
    p = []
    trigger_type = KEDA_FILES[fname]
    deployments = by_kind("Deployment")
    secrets = by_kind("Secret")
    for d in docs:
        if d["apiVersion"] != KEDA_API:
            p.append(f"{d['kind']}: apiVersion {d['apiVersion']} != {KEDA_API}")
    auths = by_kind("TriggerAuthentication", docs)
    scaled = by_kind("ScaledObject", docs)
    if not auths or not scaled:
        p.append("needs a TriggerAuthentication and ScaledObjects")
    for name, a in auths.items():
        if set(a["spec"]) - TRIGGERAUTH_SPEC:
            p.append(f"{name}: unknown spec fields {sorted(set(a['spec']) - TRIGGERAUTH_SPEC)}")
        refs = a["spec"].get("secretTargetRef") or []
        if not refs:
            p.append(f"{name}: no secretTargetRef")
        for r in refs:
            if set(r) != {"parameter", "name", "key"}:
                p.append(f"{name}: secretTargetRef fields {sorted(r)}")
            elif r["name"] not in secrets:
                p.append(f"{name}: Secret {r['name']} does not exist")
            elif r["key"] not in secrets[r["name"]].get("stringData", {}):
                p.append(f"{name}: key {r['key']} not in Secret {r['name']}")
    if set(scaled) != set(deployments):
        p.append(f"ScaledObjects {sorted(scaled)} vs Deployments {sorted(deployments)}")
    for name, so in scaled.items():
        spec = so["spec"]
        if set(spec) - SCALEDOBJECT_SPEC:
            p.append(f"{name}: unknown spec fields {sorted(set(spec) - SCALEDOBJECT_SPEC)}")
        target = spec.get("scaleTargetRef", {}).get("name")
        if target not in deployments or spec["scaleTargetRef"].get("kind", "Deployment") != "Deployment":
            p.append(f"{name}: scaleTargetRef {spec.get('scaleTargetRef')} is no Deployment of ours")
            continue
        if spec.get("minReplicaCount") != 0:
            p.append(f"{name}: minReplicaCount {spec.get('minReplicaCount')} (want 0: scale to zero)")
        if not spec.get("maxReplicaCount", 0) >= 1:
            p.append(f"{name}: maxReplicaCount {spec.get('maxReplicaCount')}")
        _, opts = parse_args(container_of(deployments[target])["args"])
        queue = flag(opts, "-Q", "--queues")
        if not spec.get("triggers"):
            p.append(f"{name}: no triggers")
        for t in spec.get("triggers") or []:
            if set(t) - TRIGGER_FIELDS:
                p.append(f"{name}: unknown trigger fields {sorted(set(t) - TRIGGER_FIELDS)}")
            if t.get("type") != trigger_type:
                p.append(f"{name}: trigger {t.get('type')} in {fname}")
                continue
            if (t.get("authenticationRef") or {}).get("name") not in auths:
                p.append(f"{name}: authenticationRef {t.get('authenticationRef')} not in {fname}")
            md = t.get("metadata") or {}
            if not all(isinstance(v, str) for v in md.values()):
                p.append(f"{name}: KEDA metadata values must be strings")
                continue
            if trigger_type == "rabbitmq":
                if md.get("queueName") != queue:
                    p.append(f"{name}: queueName {md.get('queueName')} != -Q {queue}")
                if md.get("mode") != "QueueLength":
                    p.append(f"{name}: mode {md.get('mode')}")
                if md.get("protocol", "auto") not in ("amqp", "http", "auto"):
                    p.append(f"{name}: protocol {md.get('protocol')}")
                if not md.get("value", "").isdigit() or int(md["value"]) < 1:
                    p.append(f"{name}: value {md.get('value')!r} per replica")
                if "host" in md:
                    p.append(f"{name}: broker URL (with password) belongs in the TriggerAuthentication")
            else:
                # kombu's Redis transport keeps queue Q as the list key Q
                if md.get("listName") != queue:
                    p.append(f"{name}: listName {md.get('listName')} != -Q {queue}")
                if not md.get("listLength", "").isdigit() or int(md["listLength"]) < 1:
                    p.append(f"{name}: listLength {md.get('listLength')!r}")
                if not re.fullmatch(r"[^:/]+:\d+", md.get("address", "")):
                    p.append(f"{name}: address {md.get('address')!r} is not host:port")
                if "password" in md:
                    p.append(f"{name}: password belongs in the TriggerAuthentication")
    return p


@pytest.mark.parametrize("fname", sorted(KEDA_FILES))
def test_keda(fname):
    assert keda_problems(fname, MANIFESTS[fname]) == []


def _so(docs, name):
    return next(d for d in docs if d["kind"] == "ScaledObject" and d["metadata"]["name"] == name)


def _trig(docs, name):
    return _so(docs, name)["spec"]["triggers"][0]


KEDA_MUTATIONS = [
    ("no scale to zero", "keda-rabbitmq.yaml", lambda ds: _so(ds, "om-worker-default")["spec"].update(minReplicaCount=1)),
    ("wrong queue", "keda-rabbitmq.yaml", lambda ds: _trig(ds, "om-worker-gpu")["metadata"].update(queueName="default")),
    ("wrong list", "keda-redis.yaml", lambda ds: _trig(ds, "om-worker-default")["metadata"].update(listName="celery")),
    ("unknown target", "keda-redis.yaml",
     lambda ds: _so(ds, "om-worker-gpu")["spec"]["scaleTargetRef"].update(name="om-worker")),
    ("secret key missing", "keda-redis.yaml",
     lambda ds: ds[0]["spec"]["secretTargetRef"][0].update(key="REDIS_PASS")),
    ("spec typo", "keda-rabbitmq.yaml",
     lambda ds: _so(ds, "om-worker-default")["spec"].update(minReplicas=0)),
    ("trigger of the other broker", "keda-rabbitmq.yaml", lambda ds: _trig(ds, "om-worker-default").update(type="redis")),
    ("integer metadata", "keda-redis.yaml", lambda ds: _trig(ds, "om-worker-gpu")["metadata"].update(listLength=1)),
    ("URL as redis address", "keda-redis.yaml",
     lambda ds: _trig(ds, "om-worker-gpu")["metadata"].update(address="redis://redis:6379/0")),
]


@pytest.mark.parametrize("desc,fname,mutate", KEDA_MUTATIONS, ids=[m[0] for m in KEDA_MUTATIONS])
def test_keda_rule_catches(desc, fname, mutate):
    docs = copy.deepcopy(MANIFESTS[fname])
    mutate(docs)
    assert keda_problems(fname, docs), f"{desc}: not reported"
