"""The ``score:`` block of an Application: every shipped Score, discriminated by ``kind``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from scores.duration import Duration


class ProcessSpec(BaseModel):
    """A supervised local process (placeholder until the Scores issue lands)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["Process"] = "Process"
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    stop_timeout: Duration = 5.0


ScoreSpec = Annotated[ProcessSpec, Field(discriminator="kind")]
