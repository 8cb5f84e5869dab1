"""deploy/prometheus/alerts.yml and deploy/grafana/mx-guard.json against the guard's
own metrics: promtool checks and unit-tests the rules, and every query of both names
only metrics (and labels) that guard/metrics.py exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from guard import metrics
from tests.support.guardproc import ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "mx-guard.json"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
PROMETHEUS_OWN = {"up": {"job", "instance"}}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created")}


def promtool() -> str:
    found = shutil.which("promtool") or next(
        (str(p) for p in [ROOT / ".mta" / "prometheus" / "usr" / "bin" / "promtool"]
         if p.exists()), None)
    assert found, "promtool is missing: sh tests/support/install-test-deps.sh (as root)"
    return found


def exported() -> dict[str, set[str]]:
    """Every series name guard/metrics.py exports -> the labels it may carry."""
    out = dict(PROMETHEUS_OWN)
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            # prometheus-client keeps these private; nothing public lists a metric's
            # label names before a child exists.
            name, kind = obj._name, obj._type
            labels = set(obj._labelnames) | TARGET_LABELS
            for suffix in SUFFIXES[kind]:
                out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


SELECTOR = re.compile(r"\b([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*(\[|\)|,|$|\s|[<>=!*+/-])")
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate",
             "histogram_quantile", "label_values", "by", "without", "and", "or",
             "unless", "on", "ignoring", "bool", "abs", "absent", "le", "instance"}


def metrics_in(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every selector in a PromQL expression."""
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r'"[^"]*"', '""', expr)
    found = []
    for m in SELECTOR.finditer(expr):
        name, matchers = m.group(1), m.group(2) or ""
        if name in FUNCTIONS or re.fullmatch(r"[\d.]+", name):
            continue
        found.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))))
    return found


def check_queries(exprs: list[str]) -> None:
    known = exported()
    assert exprs, "no queries found"
    for expr in exprs:
        used = metrics_in(expr)
        assert used, f"no metric in {expr!r}"
        for name, labels in used:
            assert name in known, f"{name} (in {expr!r}) is not exported by guard/metrics.py"
            assert labels <= known[name], f"{name} has no label {labels - known[name]}"


@pytest.mark.tools
def test_alert_rules_pass_promtool_check() -> None:
    r = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 7 rules found" in r.stdout, r.stdout + r.stderr


@pytest.mark.tools
def test_alert_rules_pass_their_unit_tests() -> None:
    r = subprocess.run([promtool(), "test", "rules", ALERT_TESTS.name], capture_output=True,
                       text=True, timeout=60, cwd=PROMETHEUS)
    print(r.stdout)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def alert_exprs() -> dict[str, str]:
    # promtool has parsed the YAML; a line-based read keeps the tests free of PyYAML.
    text = ALERTS.read_text()
    out: dict[str, str] = {}
    for block in re.split(r"^      - alert: ", text, flags=re.M)[1:]:
        name = block.splitlines()[0].strip()
        m = re.search(r"^        expr: (>-\n((?:          .*\n)+)|(.*)\n)", block, re.M)
        assert m, f"no expr in {name}"
        out[name] = " ".join((m.group(2) or m.group(3)).split())
    return out


def test_every_alert_names_exported_metrics() -> None:
    exprs = alert_exprs()
    assert set(exprs) == {"MxGuardDown", "MxGuardPrimaryDownLong", "MxGuardStoreDegraded",
                          "MxGuardCallbackSlow", "MxGuardNoProbeSucceeds",
                          "MxGuardLogLinesDropped", "MxGuardCallbackFailures"}
    check_queries(list(exprs.values()))


def test_every_alert_has_a_unit_test() -> None:
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == set(alert_exprs())


def dashboard_queries(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        query = node.get("query")
        if isinstance(query, dict) and isinstance(query.get("query"), str):
            found.append(query["query"])
        return found + [q for v in node.values() for q in dashboard_queries(v)]
    if isinstance(node, list):
        return [q for v in node for q in dashboard_queries(v)]
    return []


def test_dashboard_queries_name_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    check_queries(queries)
    # Every metric the guard exports is on the dashboard somewhere.
    shown = {name for q in queries for name, _ in metrics_in(q)}
    families = {o._name for o in vars(metrics).values()
                if isinstance(o, MetricWrapperBase)}
    assert all(any(s.startswith(f) for s in shown) for f in families), families - {
        f for f in families if any(s.startswith(f) for s in shown)}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ('sum by (state) (mxguard_targets{state="down"})', [("mxguard_targets", {"state"})]),
        ("histogram_quantile(0.99, sum by (le) (rate(mxguard_callback_seconds_bucket[5m])))",
         [("mxguard_callback_seconds_bucket", set())]),
        ('up{job="mx-guard"} == 0', [("up", {"job"})]),
        ("mxguard_nope_total > 0", [("mxguard_nope_total", set())]),
    ],
)
def test_the_query_reader_finds_the_selectors(expr: str, want: list[tuple[str, set[str]]]
                                              ) -> None:
    assert metrics_in(expr) == want


def test_an_unknown_metric_is_caught() -> None:
    with pytest.raises(AssertionError, match="not exported"):
        check_queries(["rate(mxguard_decisions_typo_total[5m])"])
    with pytest.raises(AssertionError, match="has no label"):
        check_queries(['mxguard_targets{status="down"}'])
