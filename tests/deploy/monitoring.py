"""The monitoring files (deploy/monitoring/) as the tests read them: alert rules, the
Grafana dashboard, and the metric names their PromQL expressions select."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"

CERT_METRIC = "harmony_cert_expiry_seconds"
"""Exported only by an agent that uses TLS (another part of the agent owns it)."""

_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[a-zA-Z]*|[a-zA-Z_:][a-zA-Z0-9_:]*")


def _drop_nested(text: str, open_: str, close: str) -> str:
    out: list[str] = []
    depth = 0
    for ch in text:
        if ch == open_:
            depth += 1
        elif ch == close and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
    return "".join(out)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers outside strings, label
    matchers, ranges and label lists that are not functions, keywords or numbers.

    Deliberately small rather than a full PromQL parser; the rules are also parsed by
    promtool, and ``test_monitoring.py`` checks this against known expressions."""
    text = _STRING.sub(" ", expr)
    text = _drop_nested(text, "{", "}")
    text = _drop_nested(text, "[", "]")
    text = _LABEL_LIST.sub(" ", text)
    names: set[str] = set()
    for match in _TOKEN.finditer(text):
        word = match.group(0)
        if word[0].isdigit() or word.lower() in _KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        names.add(word)
    return names


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def dashboard_variable_metrics() -> set[str]:
    """Metrics the template variables read (``label_values(metric, label)``)."""
    out: set[str] = set()
    for var in dashboard()["templating"]["list"]:
        query = var.get("definition") or ""
        match = re.match(r"label_values\((\w+)\s*,", query)
        if match:
            out.add(match.group(1))
    return out


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by what they expand to."""
    for var, value in (("$__rate_interval", "1m"), ("$__range", "1h"), ("$site", ".*")):
        expr = expr.replace(var, value)
    return expr.replace("$app", ".*")


def used_metrics() -> dict[str, set[str]]:
    """metric name -> where it is used (alert names, dashboard panel titles)."""
    used: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']!r}")
    for name in dashboard_variable_metrics():
        used.setdefault(name, set()).add("dashboard variables")
    return used
