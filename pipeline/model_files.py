"""Where a model's files are and the digest of its weights, without importing torch.

Kept apart from :mod:`pipeline.models` so that deciding whether a run has work to do (which
compares weight digests) stays fast.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from pipeline.errors import PipelineInputError

__all__ = ["DEFAULT_MODEL", "model_paths", "weights_sha256"]

DEFAULT_MODEL = "nuclei_unet"


def model_paths(model: str | Path | None) -> tuple[Path, Path]:
    """``(NAME.pt, NAME.json)`` of a model path (with or without suffix); None: the shipped one."""
    if model is None:
        base = Path(str(resources.files("pipeline") / "models" / DEFAULT_MODEL))
    else:
        base = Path(model)
        if base.suffix in (".pt", ".json"):
            base = base.with_suffix("")
    return base.with_suffix(".pt"), base.with_suffix(".json")


def weights_sha256(model: str | Path | None) -> str:
    """sha256 of a model's weight file (the model's identity in a run's provenance).

    Raises
    ------
    PipelineInputError
        If the weight file does not exist.
    """
    weights, _ = model_paths(model)
    if not weights.is_file():
        raise PipelineInputError("model file not found", weights)
    return hashlib.sha256(weights.read_bytes()).hexdigest()
