"""deploy/monitoring/: the alert rules pass promtool (syntax and their unit tests), have
the shape an operator relies on, and the Grafana dashboard is well formed with valid PromQL.
Whether every metric they use is exported is checked against a live agent in
``test_monitoring_live.py``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.config import LeaseConfig
from tests.deploy.monitoring import (
    DASHBOARD,
    RULE_TESTS,
    RULES,
    dashboard,
    dashboard_exprs,
    grafana_to_promql,
    metric_names,
    rules,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)",
)

ALERTS = {
    "HarmonyAgentNotInQuorum",
    "HarmonyApplicationWithoutHolder",
    "HarmonyTwoInstancesRunning",
    "HarmonySiteWithoutHealthyAgent",
    "HarmonyCertificateExpiring",
    "HarmonyControllerStepFailing",
}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_rules_unit_tests_pass(tmp_path: Path) -> None:
    """Each alert fires in its case and stays quiet where it must (alerts.test.yml)."""
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
        if t["exp_alerts"]
    }
    assert tested == {r["alert"] for r in rules()}, "every alert has a firing case"


@needs_promtool
def test_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests catch a broken rule: two-instance alert that counts one instance."""
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULES.read_text().replace(") > 1", ") > 0"))
    case = tmp_path / "alerts.test.yml"
    case.write_text(RULE_TESTS.read_text())
    result = promtool("test", "rules", case)
    assert result.returncode != 0
    assert "HarmonyTwoInstancesRunning" in result.stdout + result.stderr


def test_rules_shape() -> None:
    found = {r["alert"] for r in rules()}
    assert found >= ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        names = metric_names(rule["expr"])
        assert names and all(n.startswith("harmony_") for n in names), (rule["alert"], names)


def test_no_holder_waits_two_ttls() -> None:
    """The issue's rule: no holder for more than 2 x ttl (the default ttl: the rule file
    tells operators to change it with theirs)."""
    rule = next(r for r in rules() if r["alert"] == "HarmonyApplicationWithoutHolder")
    seconds = int(rule["for"].removesuffix("s"))
    assert seconds == 2 * LeaseConfig().ttl


def test_dashboard_shape() -> None:
    dash = dashboard()
    assert dash["uid"] == "harmony-agent" and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names and all(n.startswith("harmony_") for n in names), (panel["title"], names)
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


@needs_promtool
def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule), Grafana variables expanded."""
    records = [
        {"record": f"harmony_dashboard:expr_{i}", "expr": grafana_to_promql(e)}
        for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert DASHBOARD.exists()


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('harmony_ready{site=~"$site"} == 0', {"harmony_ready"}),
        (
            "sum by (app) (rate(harmony_app_restarts_total[5m])) > 0.5e1",
            {"harmony_app_restarts_total"},
        ),
        (
            'label_replace(harmony_site_live_agents, "site", "$1", "peer_site", "(.+)")',
            {"harmony_site_live_agents"},
        ),
        (
            "a * on (app, site) group_left (node) b unless ignoring (x) c offset 5m",
            {"a", "b", "c"},
        ),
        ("sum(x) without (instance) / count(y{z='}'})", {"x", "y"}),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[1m])))", {"h_bucket"}),
    ],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
