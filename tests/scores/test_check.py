"""Capability check before anything runs: clear refusals naming Score, site and capability."""

from __future__ import annotations

import pytest

from agent.application import parse_documents
from scores.check import CapabilityError, interpret_for, missing_capabilities
from scores.k8s import KubernetesDeploymentSpec
from scores.process import ProcessInterpret, ProcessSpec
from scores.systemd import SystemdUnitSpec
from topologies.capabilities import KubernetesApi, ProcessRuntime
from topologies.config import KubernetesConfig, LinuxSshConfig, LocalhostConfig
from topologies.higher_order import FailoverTopology, MultisiteTopology
from topologies.k8s import KubernetesTopology
from topologies.localhost import LocalhostTopology

APP = """
apiVersion: harmony/v1
kind: Application
metadata: {name: ledger}
spec:
  trait: stateful
  placement: {sites: [site-a]}
  score: {kind: KubernetesDeployment, name: ledger, image: "ledger:1"}
"""

DEPLOY = KubernetesDeploymentSpec(name="ledger", image="ledger:1")
UNIT = SystemdUnitSpec(unit="ledger.service", exec_start=["/bin/true"])


def test_kubernetes_deployment_on_localhost_site_is_refused() -> None:
    (app,) = parse_documents(APP)
    problems = missing_capabilities(app.spec.score, LocalhostConfig(), app=app.name, site="site-a")
    assert problems == [
        "ledger: score KubernetesDeployment needs KubernetesApi, "
        "which site site-a (localhost) does not provide"
    ]


def test_built_topology_and_config_agree() -> None:
    configs = [
        LocalhostConfig(),
        LinuxSshConfig(kind="linux-ssh", host="db1"),
        KubernetesConfig(kind="kubernetes"),
    ]
    for config in configs:
        for spec in (DEPLOY, UNIT, ProcessSpec(command=["true"])):
            from_config = missing_capabilities(spec, config, site="s")
            built = {
                "localhost": LocalhostTopology(),
                "kubernetes": KubernetesTopology("https://k8s.invalid"),
            }.get(config.kind)
            if built is not None:
                assert missing_capabilities(spec, built, site="s") == from_config


def test_each_score_runs_where_its_capability_is() -> None:
    assert missing_capabilities(ProcessSpec(command=["true"]), LocalhostConfig()) == []
    assert missing_capabilities(UNIT, LinuxSshConfig(kind="linux-ssh", host="db1")) == []
    assert missing_capabilities(DEPLOY, KubernetesConfig(kind="kubernetes")) == []
    over_ssh = missing_capabilities(
        ProcessSpec(command=["true"]), LinuxSshConfig(kind="linux-ssh", host="db1")
    )
    assert over_ssh == [
        "score Process needs ProcessRuntime, which the linux-ssh topology does not provide"
    ]


def test_higher_order_topologies_provide_the_intersection() -> None:
    kube = KubernetesTopology("https://k8s.invalid")
    pair = FailoverTopology(LocalhostTopology(), LocalhostTopology())
    assert missing_capabilities(ProcessSpec(command=["true"]), pair) == []
    mixed = MultisiteTopology({"a": LocalhostTopology(), "b": kube}, local="a")
    assert mixed.capabilities() == frozenset()
    (problem,) = missing_capabilities(DEPLOY, mixed, site="site-a")
    assert "needs KubernetesApi" in problem and "(multisite)" in problem
    assert missing_capabilities(DEPLOY, frozenset({KubernetesApi})) == []


def test_interpret_for_refuses_with_the_same_message() -> None:
    with pytest.raises(CapabilityError, match="needs KubernetesApi"):
        interpret_for(DEPLOY, LocalhostTopology(), app="ledger", site="site-a")
    interpret = interpret_for(ProcessSpec(command=["true"]), LocalhostTopology())
    assert isinstance(interpret, ProcessInterpret)
    assert ProcessSpec.required_capabilities == {ProcessRuntime}
