"""The base of every settings model: strict (unknown keys are errors) and immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """Settings that reject unknown keys and cannot be changed once made."""

    model_config = ConfigDict(extra="forbid", frozen=True)
