"""Every metric the alert rules and the Grafana dashboard use is exported by a real agent.

One agent (``harmony-agent run``) on a real nats-server, holding and running one
application so that the per-application series exist; its live ``/metrics`` is parsed and
every metric name selected by an alert expression, a dashboard query or a dashboard
variable must be there with samples. One exception, stated here: the certificate-expiry
metric exists only when the agent uses TLS certificates, and this agent runs without TLS.
"""

from __future__ import annotations

import asyncio
import shutil
import urllib.request
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.application import Application
from mesh.names import STATE_BUCKET, app_key
from tests.deploy.monitoring import CERT_METRIC, ROOT, used_metrics
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

APP = {
    "apiVersion": "harmony/v1",
    "kind": "Application",
    "metadata": {"name": "ledger"},
    "spec": {
        "trait": "stateful",
        "placement": {"sites": ["site-a"]},
        "score": {"kind": "Process", "command": ["sleep", "600"], "stop_timeout": "1s"},
    },
}


def scrape(agent: AgentProcess) -> str:
    url = f"http://{agent.health_host}:{agent.health_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def scrape_when(agent: AgentProcess, needle: str) -> str | None:
    text = scrape(agent)
    return text if needle in text else None


def sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
async def agent(nats_server: NatsNode, tmp_path: Path) -> AsyncIterator[AgentProcess]:
    proc = AgentProcess(site="site-a", node="n1", workdir=tmp_path / "a", servers=[nats_server.url])
    proc.start()
    try:
        await eventually(proc.ready, timeout=30, what="agent ready")
        nc = await nats.connect(nats_server.url)
        try:
            kv = await nc.jetstream().key_value(STATE_BUCKET)
            await kv.put(app_key("ledger"), Application.model_validate(APP).to_json())
        finally:
            await nc.close()
        yield proc
    finally:
        proc.stop()


async def test_every_metric_used_by_alerts_and_dashboard_is_exported(
    agent: AgentProcess,
) -> None:
    held = 'harmony_app_lease_held{app="ledger",node="n1",site="site-a"} 1.0'
    text = await eventually(
        lambda: scrape_when(agent, held), timeout=30, what="ledger held by the agent"
    )
    exported = sample_names(text)
    tls = "tls" in agent.config()["nats"]
    missing = {
        name: sorted(where)
        for name, where in used_metrics().items()
        if name not in exported and not (name == CERT_METRIC and not tls)
    }
    assert not missing, f"used but not exported by the agent: {missing}"
    assert CERT_METRIC in used_metrics(), "the certificate alert is written against it"


async def test_exposition_has_one_prefix_and_no_created_series(agent: AgentProcess) -> None:
    text = await eventually(
        lambda: scrape_when(agent, "harmony_app_info{"), timeout=30, what="per-app series"
    )
    names = sample_names(text)
    assert names and all(n.startswith("harmony_") for n in names), sorted(
        n for n in names if not n.startswith("harmony_")
    )
    assert not [n for n in names if n.endswith("_created")]
    docs = (ROOT / "docs" / "operations.md").read_text()
    exported = [
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
    ]
    undocumented = sorted(name for name in exported if f"`{name}`" not in docs)
    assert not undocumented, f"exported but not in docs/operations.md: {undocumented}"
    promtool = shutil.which("promtool")
    if promtool is not None:  # the client library's conventions, checked by Prometheus
        lint = await asyncio.create_subprocess_exec(
            promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
        )
        out, _ = await lint.communicate(text.encode())
        assert lint.returncode == 0, out.decode()
