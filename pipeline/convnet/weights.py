"""Model files: where they are, their digest, and saving and loading a model.

A model is two files side by side: ``NAME.pt`` (a ``state_dict``, loaded with
``torch.load(..., weights_only=True)``) and ``NAME.json`` (:class:`ModelInfo`: architecture,
object diameter it was trained at, input normalisation, measured receptive field and stride,
training record). Two models ship in this package: ``nuclei_unet`` (nuclei, the default) and
``cells_phase_unet`` (whole cells in phase contrast); their model card is ``MODEL_CARD.md``
next to them. A shipped model is named by its bare name, any other by its path.

torch is imported only to save or load weights, so that deciding whether a run has work to do
(which compares weight digests) does not pay for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineInputError

if TYPE_CHECKING:
    import torch

    from pipeline.convnet.unet import UNet

__all__ = [
    "CELLS_MODEL",
    "DEFAULT_MODEL",
    "SHIPPED_MODELS",
    "ModelInfo",
    "load_model",
    "model_paths",
    "model_postprocessing",
    "save_model",
    "weights_sha256",
]

DEFAULT_MODEL = "nuclei_unet"
CELLS_MODEL = "cells_phase_unet"
SHIPPED_MODELS = (DEFAULT_MODEL, CELLS_MODEL)


def model_paths(model: str | Path | None) -> tuple[Path, Path]:
    """``(NAME.pt, NAME.json)`` of a model path (with or without suffix) or of a shipped
    model's name (:data:`SHIPPED_MODELS`); None: the shipped nuclear model."""
    if model is None or str(model) in SHIPPED_MODELS:
        base = Path(str(resources.files("pipeline.convnet") / (model or DEFAULT_MODEL)))
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


def model_postprocessing(model: str | Path | None) -> dict[str, float]:
    """The post-processing settings a model's description recommends (see
    :attr:`ModelInfo.postprocessing`); read without torch.

    Raises
    ------
    PipelineInputError
        If the description is missing or unreadable.
    """
    _, meta = model_paths(model)
    try:
        return dict(json.loads(meta.read_text()).get("postprocessing", {}))
    except FileNotFoundError:
        raise PipelineInputError("model file not found", meta) from None
    except (ValueError, TypeError, AttributeError) as error:
        raise PipelineInputError(f"cannot read model ({type(error).__name__})", meta) from None


@dataclass(frozen=True)
class ModelInfo:
    """What inference must know about a trained model.

    Attributes
    ----------
    architecture
        Keyword arguments of :class:`~pipeline.convnet.unet.UNet`.
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
    postprocessing
        The post-processing settings this model is meant to be used with, where they differ
        from the defaults of :class:`pipeline.segmentation.convnet.ConvNetParameters` (chosen
        on its training images); a user's own settings take precedence.
    weights_sha256
        Digest of the weights file (filled in by :func:`load_model`).
    """

    architecture: dict[str, Any]
    diameter_px: float
    percentiles: tuple[float, float]
    receptive_field_radius_px: int
    stride: int
    training: dict[str, Any] = field(default_factory=dict)
    postprocessing: dict[str, float] = field(default_factory=dict)
    weights_sha256: str = ""


def save_model(model: UNet, info: ModelInfo, path: str | Path) -> None:
    """Write ``PATH.pt`` (state dict) and ``PATH.json`` (info without the digest)."""
    import torch

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
    import torch

    from pipeline.convnet.unet import UNet

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
