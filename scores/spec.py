"""The ``score:`` block of an Application: every shipped Score, discriminated by ``kind``."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from scores.k8s import KubernetesDeploymentSpec, KubernetesManifestsSpec
from scores.postgres import PostgresSpec
from scores.postgres.cnpg import CloudNativePGSpec
from scores.process import ProcessSpec
from scores.systemd import SystemdUnitSpec

ScoreSpec = Annotated[
    ProcessSpec
    | SystemdUnitSpec
    | KubernetesDeploymentSpec
    | KubernetesManifestsSpec
    | PostgresSpec
    | CloudNativePGSpec,
    Field(discriminator="kind"),
]

__all__ = [
    "CloudNativePGSpec",
    "KubernetesDeploymentSpec",
    "KubernetesManifestsSpec",
    "PostgresSpec",
    "ProcessSpec",
    "ScoreSpec",
    "SystemdUnitSpec",
]
