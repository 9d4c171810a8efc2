"""The Application resource of CONTRACT section 4: desired state stored as ``app.<name>``."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.patterns import NAME_PATTERN as NAME_PATTERN  # noqa: PLC0414 (re-exported)
from agent.patterns import SITE_PATTERN
from agent.yaml_errors import yaml_error
from scores.health import HealthSpec
from scores.spec import ScoreSpec

SiteName = Annotated[str, StringConstraints(pattern=SITE_PATTERN)]


class Trait(StrEnum):
    STATEFUL = "stateful"
    STATELESS = "stateless"


class Strategy(StrEnum):
    ABSOLUTE_CONSISTENCY = "AbsoluteConsistency"
    SPLIT_BRAIN_ALLOWED = "SplitBrainAllowed"


class Reconcile(StrEnum):
    KEEP_NEWEST = "keep-newest"
    KEEP_OLDEST = "keep-oldest"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Strict):
    name: str = Field(pattern=NAME_PATTERN)


class Failover(_Strict):
    strategy: Strategy = Strategy.ABSOLUTE_CONSISTENCY
    reconcile: Reconcile = Reconcile.KEEP_NEWEST


class Placement(_Strict):
    sites: list[SiteName] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Placement:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("sites must not repeat")
        return self


class ApplicationSpec(_Strict):
    trait: Trait
    failover: Failover = Field(default_factory=Failover)
    placement: Placement
    score: ScoreSpec
    health: HealthSpec | None = None
    """Optional (``scores/health.py``): consecutive failed checks make the holder give up."""

    @field_validator("health")
    @classmethod
    def _probe_fits_score(
        cls, health: HealthSpec | None, info: ValidationInfo
    ) -> HealthSpec | None:
        score = info.data.get("score")
        kind = getattr(score, "kind", None)
        if health is not None and health.probe is not None and kind == "KubernetesManifests":
            raise ValueError(
                "probe: KubernetesManifests cannot take an agent probe; give its "
                "containers a readinessProbe (the agent reads readiness)"
            )
        return health


class Application(_Strict):
    api_version: Literal["harmony/v1"] = Field(alias="apiVersion")
    kind: Literal["Application"]
    metadata: Metadata
    spec: ApplicationSpec

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def name(self) -> str:
        return self.metadata.name

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Application:
        return cls.model_validate(json.loads(data))


class ApplicationError(ValueError):
    """One line: which document, which field, what is wrong."""


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "field required"
    return f"{loc}: {msg}" if loc else msg


def parse_documents(text: str, source: str = "<input>") -> list[Application]:
    """Parse multi-document YAML; raise ApplicationError naming document and field."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ApplicationError(yaml_error(source, exc)) from None
    apps: list[Application] = []
    seen: set[str] = set()
    for index, doc in enumerate(docs, start=1):
        where = f"{source} document {index}"
        if not isinstance(doc, dict):
            raise ApplicationError(f"{where}: expected a mapping")
        app = parse_application(doc, where)
        if app.name in seen:
            raise ApplicationError(f"{where}: metadata.name: {app.name!r} appears twice")
        seen.add(app.name)
        apps.append(app)
    if not apps:
        raise ApplicationError(f"{source}: no Application documents found")
    return apps


def parse_application(doc: dict[str, Any], where: str) -> Application:
    name = doc.get("metadata", {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    label = f"{where} ({name})" if isinstance(name, str) else where
    try:
        return Application.model_validate(doc)
    except ValidationError as exc:
        raise ApplicationError(f"{label}: {format_validation_error(exc)}") from None
