"""Node names derived from host names (Kubernetes spec.nodeName, odd hostnames)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import NODE_PATTERN, AgentConfig, node_from_hostname


@pytest.mark.parametrize(
    ("hostname", "node"),
    [
        ("ip-10-0-1-23.eu-west-1.compute.internal", "ip-10-0-1-23"),
        ("gke-prod-default-pool-1a2b3c4d-xyz1", "gke-prod-default-pool-1a2b3c4d-xyz1"),
        ("Worker-01.example.net", "worker-01"),
        ("node_7", "node_7"),
    ],
)
def test_first_label_when_it_is_already_a_node_name(hostname: str, node: str) -> None:
    assert node_from_hostname(hostname) == node


def test_altered_labels_get_a_hash_suffix() -> None:
    a = node_from_hostname("rack 1+node")
    b = node_from_hostname("rack 1#node")
    assert re.fullmatch(r"rack-1-node-[0-9a-f]{8}", a) and a != b
    long = node_from_hostname("n" * 80 + ".example.net")
    assert len(long) == 63 and long.startswith("n" * 54 + "-")
    assert re.fullmatch(r"node-[0-9a-f]{8}", node_from_hostname(".internal"))


@given(st.text(max_size=300))
def test_every_host_name_gives_a_valid_node_name(hostname: str) -> None:
    assert re.fullmatch(NODE_PATTERN, node_from_hostname(hostname))


def test_the_daemonset_variable_sets_the_default_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARMONY_AGENT_NODE", raising=False)
    monkeypatch.setenv("HARMONY_NODE_HOSTNAME", "ip-10-0-1-23.eu-west-1.compute.internal")
    assert AgentConfig(site="site-a").node == "ip-10-0-1-23"
