"""``check``/``apply`` with a ``health:`` block: exit 2 and one line naming the field; the
deadline enforcement of each application; the rules with the agent's lease ttl."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import Invoke
from tests.harness.ports import free_port


def _app(
    name: str, score: str, health: str | None = None, strategy: str = "AbsoluteConsistency"
) -> str:
    text = f"""\
apiVersion: harmony/v1
kind: Application
metadata: {{name: {name}}}
spec:
  trait: stateful
  failover: {{strategy: {strategy}}}
  placement: {{sites: [site-a]}}
  score: {score}
"""
    return text + (f"  health: {health}\n" if health else "")


PROCESS = '{kind: Process, command: [sleep, "60"]}'
UNIT = "{kind: SystemdUnit, unit: ledger.service, exec_start: [/usr/bin/sleep, '60']}"
DEPLOY = "{kind: KubernetesDeployment, name: web, image: 'nginx:1.27'}"


@pytest.mark.parametrize(
    ("health", "line"),
    [
        (
            "{probe: {grpc: [x]}}",
            "<stdin> document 1 (ledger): spec.health.probe: unknown probe kind 'grpc' "
            "(expected exec, http or tcp)",
        ),
        ("{period: 0s}", "<stdin> document 1 (ledger): spec.health.period: must be greater than 0"),
        (
            "{failure_threshold: 0}",
            "<stdin> document 1 (ledger): spec.health.failure_threshold: "
            "Input should be greater than or equal to 1",
        ),
        (
            "{period: 1s, timeout: 5s}",
            "<stdin> document 1 (ledger): spec.health.timeout: 5s must not exceed period (1s): "
            "probes would overlap",
        ),
    ],
)
async def test_bad_health_exits_2_with_one_line(invoke: Invoke, health: str, line: str) -> None:
    text = _app("ledger", PROCESS, health)
    for args in (
        ("check", "-f", "-"),
        ("apply", "-f", "-", "-s", f"nats://127.0.0.1:{free_port()}"),
    ):
        result = await invoke(*args, input=text)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr == f"harmony-agent: error: {line}\n"


def _config(tmp_path: Path, text: str = "") -> str:
    path = tmp_path / "agent.yaml"
    path.write_text("site: site-a\nnode: n1\n" + text)
    return str(path)


async def test_exec_probe_must_be_executable_on_the_topology(
    invoke: Invoke, tmp_path: Path
) -> None:
    config = _config(tmp_path)
    missing = _app("ledger", PROCESS, "{probe: {exec: [no-such-probe-xyz, --quick]}}")
    result = await invoke("check", "-f", "-", "--config", config, input=missing)
    assert result.exit_code == 2
    assert result.stderr == (
        "harmony-agent: error: ledger: spec.health.probe.exec: 'no-such-probe-xyz' is not an "
        "executable file on this host\n"
    )
    fine = _app("ledger", PROCESS, "{probe: {exec: [sh, -c, 'true']}}")
    result = await invoke("check", "-f", "-", "--config", config, input=fine)
    assert result.exit_code == 0, result.output
    plain = await invoke("check", "-f", "-", input=missing)  # no topology: not checked
    assert plain.exit_code == 0


async def test_rules_with_the_lease_ttl_exit_2_naming_the_rule(
    invoke: Invoke, tmp_path: Path
) -> None:
    short = _config(tmp_path, "lease: {ttl: 400ms}\n")
    result = await invoke("check", "-f", "-", "--config", short, input=_app("ledger", UNIT))
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "harmony-agent: error: ledger: rule 'ttl - margin - ttl/3 > fence lead 250ms' violated"
    )
    assert result.stderr.count("\n") == 1
    cooldown = _app("ledger", PROCESS, "{cooldown: 5s}")
    result = await invoke("check", "-f", "-", "--config", _config(tmp_path), input=cooldown)
    assert result.exit_code == 2
    assert "ledger: rule 'cooldown >= lease.ttl' violated: cooldown 5s < ttl 10s" in result.stderr


async def test_check_says_per_application_whether_the_deadline_is_enforced(
    invoke: Invoke, tmp_path: Path
) -> None:
    docs = "---\n".join(
        [
            _app("ledger", PROCESS),
            _app("unit", UNIT),
            _app("cache", PROCESS, strategy="SplitBrainAllowed"),
        ]
    )
    result = await invoke("check", "-f", "-", "--config", _config(tmp_path), input=docs)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "application/ledger valid on site-a/n1 (localhost); deadline enforced outside the agent",
        "application/unit valid on site-a/n1 (localhost); "
        "deadline enforced outside the agent (transient systemd timer)",
        "application/cache valid on site-a/n1 (localhost); no lease deadline (SplitBrainAllowed)",
    ]
    assert result.stderr == ""

    kube = _config(tmp_path, "topology: {kind: kubernetes}\n")
    web = _app("web", DEPLOY, "{probe: {http: 'http://127.0.0.1:8080/healthz'}}")
    result = await invoke("check", "-f", "-", "--config", kube, input=web)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(
        "application/web valid on site-a/n1 (kubernetes); deadline not enforced outside the agent"
    )
    assert result.stderr == (
        "harmony-agent: warning: web: AbsoluteConsistency on kubernetes: deadline not enforced "
        "outside the agent: a hung or partitioned agent leaves the pods running past its lease\n"
    )
