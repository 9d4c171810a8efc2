"""mypy refuses a Score handed to a topology lacking its capability (ADR 015's compile error)."""

from __future__ import annotations

from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[2]

SNIPPET = """\
from scores.k8s import KubernetesDeploymentSpec
from scores.process import ProcessSpec
from topologies.higher_order import FailoverTopology, MultisiteTopology
from topologies.k8s import KubernetesTopology
from topologies.localhost import LocalhostTopology

local = LocalhostTopology()
kube = KubernetesTopology("https://k8s.example")
deploy = KubernetesDeploymentSpec(name="web", image="nginx")
process = ProcessSpec(command=["true"])
failover_kube: FailoverTopology[KubernetesTopology] = FailoverTopology(kube, kube)

process.interpret(local)
process.interpret(FailoverTopology(local, LocalhostTopology()))
deploy.interpret(MultisiteTopology({"a": failover_kube}, "a"))
deploy.interpret(local)  # line 16
process.interpret(failover_kube)  # line 17
process.interpret(MultisiteTopology({"a": local, "b": local}, "a"))
"""


def test_mypy_rejects_scores_on_topologies_without_their_capability(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    stdout, stderr, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--no-error-summary", str(snippet)]
    )
    errors = [line.split(": error: ", 1) for line in stdout.splitlines() if ": error: " in line]
    by_line = {int(where.rsplit(":", 1)[1]): what for where, what in errors}
    assert status == 1, (stdout, stderr)
    assert set(by_line) == {16, 17}, stdout
    assert '"LocalhostTopology"; expected "Provides[KubernetesApi]"' in by_line[16]
    assert (
        '"FailoverTopology[KubernetesTopology]"; expected "Provides[ProcessRuntime]"' in by_line[17]
    )
