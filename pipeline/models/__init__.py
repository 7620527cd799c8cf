"""The nuclear segmentation conv-net: architecture, shipped weights and how to load them.

A model is two files side by side: ``NAME.pt`` (a ``state_dict``, loaded with
``torch.load(..., weights_only=True)``) and ``NAME.json`` (:class:`ModelInfo`: architecture,
object diameter it was trained at, input normalisation, measured receptive field and stride,
training record). The shipped model is ``nuclei_unet`` in this package; its model card is
``MODEL_CARD.md`` next to it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineInputError
from pipeline.model_files import DEFAULT_MODEL, model_paths
from pipeline.models.unet import UNet

__all__ = ["DEFAULT_MODEL", "ModelInfo", "load_model", "save_model"]


@dataclass(frozen=True)
class ModelInfo:
    """What inference must know about a trained model.

    Attributes
    ----------
    architecture
        Keyword arguments of :class:`~pipeline.models.unet.UNet`.
    diameter_px
        Median nucleus diameter (pixels) the model was trained at; inputs are rescaled to it.
    percentiles
        Low and high intensity percentiles of a whole frame mapped to 0 and 1.
    receptive_field_radius_px
        Measured: an input pixel farther than this from an output pixel does not affect it.
    stride
        Measured total stride: tile origins and sizes are multiples of it.
    training
        Free-form record of how the weights were made (data, seed, command, scores).
    weights_sha256
        Digest of the weights file (filled in by :func:`load_model`).
    """

    architecture: dict[str, Any]
    diameter_px: float
    percentiles: tuple[float, float]
    receptive_field_radius_px: int
    stride: int
    training: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""


def save_model(model: UNet, info: ModelInfo, path: str | Path) -> None:
    """Write ``PATH.pt`` (state dict) and ``PATH.json`` (info without the digest)."""
    weights, meta = model_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    torch.save(state, weights)
    record = asdict(info)
    record.pop("weights_sha256")
    meta.write_text(json.dumps(record, indent=2) + "\n")


def load_model(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[UNet, ModelInfo]:
    """Load a model in evaluation mode (``None``: the shipped one).

    Raises
    ------
    PipelineInputError
        If the weights or their description are missing or unreadable.
    """
    weights, meta = model_paths(path)
    for required in (weights, meta):
        if not required.is_file():
            raise PipelineInputError("model file not found", required)
    try:
        record = json.loads(meta.read_text())
        record["percentiles"] = tuple(record["percentiles"])
        payload = weights.read_bytes()
        info = ModelInfo(**record, weights_sha256=hashlib.sha256(payload).hexdigest())
        model = UNet(**info.architecture)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise PipelineInputError(
            f"cannot load model ({error.__class__.__name__})", weights
        ) from None
    return model.to(device).eval(), info
