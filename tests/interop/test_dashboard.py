"""deploy/grafana/om-worker-dashboard.json: offline checks, no Grafana and no Prometheus.

- The file is valid JSON with Grafana's dashboard fields; panel ids are unique.
- Every query (panel targets and template variables) names only metrics om-worker exports: the
  names are read from the Rust source (`pub const ...: &str = "..."` in src/telemetry.rs; the
  ones recorded with `histogram!` also as `_bucket`/`_sum`/`_count`), which
  test_metrics.py checks against a live /metrics scrape on both brokers.
- The data source is the `datasource` template variable, on every panel and target.
- Each celery-exporter metric is graphed, and a row graphs om-worker's own.
Each rule is also run against a broken copy (MUTATIONS), which must be reported.
"""
import copy
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "om-worker-dashboard.json"
TELEMETRY = ROOT / "src" / "telemetry.rs"

# PromQL words that are not metric names: functions (also recognised by a following "("),
# aggregation modifiers, operators, keywords.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "atan2", "inf", "nan", "label_values"}


@pytest.fixture(scope="session", autouse=True)
def environment_ok():
    """Narrowed to what this module needs: nothing but the files (no brokers, no binary)."""
    return True


def exported_metrics():
    src = TELEMETRY.read_text()
    consts = dict(re.findall(r'pub const ([A-Z_]+): &str = "([a-z_]+)";', src))
    hist = {consts[c] for c in re.findall(r"metrics::histogram!\(\s*([A-Z_]+)", src)}
    assert hist, "no histogram found in src/telemetry.rs"
    names = set(consts.values())
    for h in hist:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return names


def metric_names(expr):
    """The metric names a PromQL expression reads."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    e = re.sub(r"\{[^{}]*\}", "", e)                       # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                       # range / subquery durations
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)                      # Grafana variables
    e = re.sub(r"(label_values\([^,()]*),\s*\w+\s*\)", r"\1)", e)  # Grafana's label_values(m, label)
    out = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        after = e[m.end():].lstrip()
        if after.startswith("(") or word in PROMQL_WORDS:
            continue
        out.add(word)
    return out


def all_panels(dash):
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


def queries(dash):
    """(where, PromQL) of every panel target and query variable."""
    for p in all_panels(dash):
        for t in p.get("targets", []):
            yield f"panel {p.get('title')!r} target {t.get('refId')}", t.get("expr", "")
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            yield f"variable {v.get('name')}", q.get("query") if isinstance(q, dict) else q


def problems(dash, exported):
    out = []
    for key in ("uid", "title", "panels", "schemaVersion", "templating"):
        if key not in dash:
            out.append(f"missing {key}")
    ids = [p.get("id") for p in all_panels(dash)]
    if len(ids) != len(set(ids)):
        out.append(f"duplicate panel ids {ids}")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds_var = variables.get("datasource")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        out.append("no `datasource` template variable of type datasource (prometheus)")
    used = set()
    for where, expr in queries(dash):
        if not expr:
            out.append(f"{where}: empty query")
            continue
        names = metric_names(expr)
        if not names:
            out.append(f"{where}: reads no metric: {expr!r}")
        unknown = names - exported
        if unknown:
            out.append(f"{where}: metrics om-worker does not export: {sorted(unknown)}")
        used |= names
    for p in all_panels(dash):
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            out.append(f"panel {p.get('title')!r}: datasource is not the $datasource variable")
        if not p.get("targets"):
            out.append(f"panel {p.get('title')!r}: no targets")
        for t in p.get("targets", []):
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                out.append(f"panel {p.get('title')!r} target {t.get('refId')}: datasource is not $datasource")
    for v in variables.values():
        if v.get("type") == "query" and (v.get("datasource") or {}).get("uid") != "${datasource}":
            out.append(f"variable {v.get('name')}: datasource is not $datasource")
    celery = {n for n in exported if n.startswith("celery_") and not n.endswith(("_sum", "_count"))
              and n != "celery_task_runtime"}
    missing = celery - used
    if missing:
        out.append(f"celery-exporter metrics not graphed: {sorted(missing)}")
    rows = [p for p in dash.get("panels", []) if p.get("type") == "row"]
    om_row = [r for r in rows if "om-worker" == r.get("title")]
    if not om_row:
        out.append("no `om-worker` row")
    if not any(n.startswith("om_worker_") for n in used):
        out.append("no om-worker metric graphed")
    return out


def load():
    return json.loads(DASHBOARD.read_text())


def test_metric_name_parser():
    assert metric_names('histogram_quantile(0.95, sum by (le, name) (rate(celery_task_runtime_bucket'
                        '{hostname=~"$hostname", queue_name=~"a{b}"}[$__rate_interval])))') == {
        "celery_task_runtime_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / (sum(rate(b_total[5m])) > 0)") == {"a_total", "b_total"}
    assert metric_names("label_values(celery_worker_up, hostname)") == {"celery_worker_up"}


def test_dashboard_is_valid_and_reads_only_exported_metrics():
    exported = exported_metrics()
    assert {"celery_task_sent_total", "celery_queue_length", "celery_task_runtime_bucket",
            "om_worker_kernels_ready"} <= exported
    dash = load()
    assert problems(dash, exported) == []


def _set_expr(title, expr):
    def mutate(d):
        for p in all_panels(d):
            if p.get("title") == title:
                p["targets"][0]["expr"] = expr
                return
        raise AssertionError(f"no panel {title!r}")
    return mutate


def _first_panel(d):
    return next(p for p in all_panels(d) if p.get("type") != "row")


MUTATIONS = {
    "unknown metric": (_set_expr("Queue length", "max by (queue_name) (celery_queue_lenght)"),
                       "does not export"),
    "fixed datasource": (lambda d: _first_panel(d).update(datasource={"type": "prometheus", "uid": "prom1"}),
                         "datasource is not"),
    "no datasource variable": (lambda d: d["templating"].update(
        list=[v for v in d["templating"]["list"] if v["name"] != "datasource"]), "datasource"),
    "queue length not graphed": (lambda d: d.update(panels=[
        p for p in d["panels"] if not any("celery_queue_length" in t.get("expr", "") for t in p.get("targets", []))]
        ) or d["templating"].update(list=[v for v in d["templating"]["list"] if v["name"] != "queue"]),
        "not graphed"),
    "duplicate id": (lambda d: _first_panel(d).update(id=d["panels"][0]["id"]), "duplicate panel ids"),
    "empty query": (_set_expr("Workers up", ""), "empty query"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_each_rule_catches_its_breakage(mutation):
    mutate, expected = MUTATIONS[mutation]
    dash = copy.deepcopy(load())
    mutate(dash)
    found = problems(dash, exported_metrics())
    assert any(expected in p for p in found), (mutation, found)
