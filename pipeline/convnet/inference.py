"""Conv-net inference: whole images in numpy, and tiled on Dask with exactly the same result.

The network (see :mod:`pipeline.convnet.unet`) was trained on nuclei of ``ModelInfo.diameter_px``
pixels, on images normalised by their own robust percentiles. Inference therefore

1. normalises each frame (timepoint of one channel) by its whole-frame percentiles
   (contract 4 of docs/ARCHITECTURE.md; :mod:`pipeline.normalize`);
2. rescales the image plane by ``model diameter / nucleus diameter`` (linear interpolation,
   pixel centres aligned; z is never rescaled: z-stacks run slice by slice);
3. runs the network on tiles: each tile is a core whose origin is a multiple of the network's
   measured total stride, the tiles of a plane as equal as that allows
   (:func:`pipeline.tiling.tile_blocks`), plus a halo of at least its measured receptive-field
   radius (also a multiple of the stride), rescaled with its halo in one task; only the core is
   kept (centre crop, no blending), so every output pixel sees exactly the input it would see in
   one whole-image pass (contract 1);
4. rescales the four output maps back to the image's grid.

The model is loaded once per process (one Dask worker) and reused by every task on it; the device
is chosen there: CUDA with bfloat16 autocast when the worker has a GPU, else the CPU with a set
number of threads. Tiles of a block (its timepoints and z slices) are batched.
"""

from __future__ import annotations

import glob
import math
import threading
from collections.abc import Sequence
from functools import partial

import dask.array as da
import numpy as np
import torch

from pipeline.convnet.rescale import rescale_planes, rescale_planes_dask
from pipeline.convnet.settings import InferenceSettings
from pipeline.convnet.unet import UNet
from pipeline.convnet.weights import ModelInfo, load_model
from pipeline.normalize import frame_percentiles, normalize
from pipeline.tiling import tile_blocks

__all__ = [
    "InferenceSettings",
    "device_name",
    "equivalent_diameters",
    "loaded_model",
    "maps_from_normalised",
    "median_diameter",
    "model_load_count",
    "normalised_frames",
    "predict_maps",
    "predict_maps_tiled",
    "rescale_factor",
    "run_network",
    "runs_on_gpu",
    "scaled_shape",
    "unusable_gpu",
]

N_MAPS = 4


_MODELS: dict[tuple[str | None, str], tuple[UNet, ModelInfo]] = {}
_MODELS_LOCK = threading.Lock()
_LOADS = 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: str = "auto") -> str:
    """The device the network runs on in this process with the ``device`` setting, for people:
    ``"cpu"`` or, e.g., ``"cuda:0 (NVIDIA H200)"``."""
    chosen = _device(device)
    if chosen.type != "cuda":
        return "cpu"
    index = chosen.index if chosen.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def unusable_gpu() -> str | None:
    """Why this machine's NVIDIA GPU goes unused by torch (a CPU-only build, or no usable
    driver), or None when there is no such GPU or torch can use it."""
    if torch.cuda.is_available():
        return None
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if not devices:
        return None
    if torch.version.cuda is None:
        build = "a CPU-only build: pip install the CUDA build of torch"
    else:
        build = f"built for CUDA {torch.version.cuda}, which cannot use it (driver?)"
    return f"{devices[0]} is present but torch {torch.__version__} sees no GPU ({build})"


def runs_on_gpu(device: str) -> bool:
    """Whether the network runs on a GPU in this process with the ``device`` setting."""
    return _device(device).type == "cuda"


def loaded_model(model: str | None = None, device: str = "auto") -> tuple[UNet, ModelInfo]:
    """The model on this process's device, loaded on first use and then reused."""
    global _LOADS
    key = (model, str(_device(device)))
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_model(model, device=_device(device))
            _LOADS += 1
        return _MODELS[key]


def model_load_count() -> int:
    """How many times this process has loaded a model from disk (for tests and monitoring)."""
    return _LOADS


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, -k, dims=(-2, -1))


def _forward(model: UNet, batch: torch.Tensor) -> torch.Tensor:
    """Probabilities of the three classes and the distance map, float32."""
    if batch.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
    else:
        out = model(batch)
    out = out.float()
    return torch.cat([torch.softmax(out[:, :3], dim=1), out[:, 3:]], dim=1)


def run_network(planes: np.ndarray, settings: InferenceSettings | None = None) -> np.ndarray:
    """Run the network on normalised 2D planes at the model's scale.

    Parameters
    ----------
    planes
        (n, h, w) float32, already normalised and rescaled; h and w need not be multiples of
        the stride (the planes are zero-padded at the high end, exactly as a whole image is).
    settings
        Inference settings (default: shipped model, automatic device).

    Returns
    -------
    numpy.ndarray
        (n, 4, h, w) float32: p(background), p(boundary), p(interior), distance.
    """
    settings = settings or InferenceSettings()
    model, _ = loaded_model(settings.model, settings.device)
    device = next(model.parameters()).device
    if device.type == "cpu" and settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    n, h, w = planes.shape
    stride = model.stride
    padded_h, padded_w = math.ceil(h / stride) * stride, math.ceil(w / stride) * stride
    result = np.empty((n, N_MAPS, h, w), dtype=np.float32)
    transforms = [(k, flip) for flip in (False, True) for k in range(4)] if settings.tta else []
    per_pass = settings.tiles_per_pass(device.type == "cuda")
    with torch.inference_mode():
        for start in range(0, n, per_pass):
            chunk = np.zeros((min(per_pass, n - start), 1, padded_h, padded_w), dtype=np.float32)
            chunk[:, 0, :h, :w] = planes[start : start + per_pass]
            batch = torch.from_numpy(chunk).to(device)
            if transforms:
                out = sum(
                    _undo_dihedral(_forward(model, _dihedral(batch, k, flip)), k, flip)
                    for k, flip in transforms
                ) / len(transforms)
            else:
                out = _forward(model, batch)
            result[start : start + len(chunk)] = out[:, :, :h, :w].cpu().numpy()
    return result


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """The diameter (pixels) of the disc of each instance's area in a 2D label image, as
    Cellpose measures nuclei; one per label present."""
    sizes = np.bincount(np.asarray(labels).ravel())[1:]
    return 2.0 * np.sqrt(sizes[sizes > 0] / np.pi)


def median_diameter(labels: np.ndarray) -> float:
    """Median :func:`equivalent_diameters` of a 2D label image; NaN if it has no instance."""
    diameters = equivalent_diameters(labels)
    return float(np.median(diameters)) if diameters.size else float("nan")


def rescale_factor(info: ModelInfo, diameter: float) -> float:
    """Factor by which the image plane is scaled so its nuclei have the model's diameter."""
    if not diameter > 0:
        raise ValueError(f"diameter must be positive, got {diameter}")
    return float(info.diameter_px) / float(diameter)


def scaled_shape(shape: Sequence[int], factor: float) -> tuple[int, ...]:
    """The shape of an image plane rescaled by ``factor`` (rounded, at least one pixel)."""
    return tuple(max(1, round(n * factor)) for n in shape)


def _halo_and_tile(settings: InferenceSettings) -> tuple[int, int]:
    """Halo (>= the receptive-field radius) and core tile edge, both multiples of the stride."""
    _, info = loaded_model(settings.model, "cpu")
    stride = info.stride
    halo = math.ceil(info.receptive_field_radius_px / stride) * stride
    tile = max(stride, math.ceil(settings.tile_px / stride) * stride)
    return halo, tile


def predict_maps(
    image: np.ndarray,
    *,
    diameter: float | None = None,
    settings: InferenceSettings | None = None,
) -> np.ndarray:
    """Whole-image inference on a 2D (y, x) or 3D (z, y, x) image of one channel and timepoint.

    Parameters
    ----------
    image
        Raw intensities.
    diameter
        Typical nucleus diameter in pixels (None: the model's own, i.e. no rescaling).
    settings
        Inference settings.

    Returns
    -------
    numpy.ndarray
        (4, [z,] y, x) float32 maps at the image's resolution: p(background), p(boundary),
        p(interior), distance.
    """
    settings = settings or InferenceSettings()
    _, info = loaded_model(settings.model, settings.device)
    image = np.asarray(image)
    low, high = frame_percentiles(image[np.newaxis], info.percentiles, settings.polarity)[0]
    planes = normalize(image, low, high).reshape(-1, *image.shape[-2:])
    factor = 1.0 if diameter is None else rescale_factor(info, diameter)
    maps = run_network(rescale_planes(planes, scaled_shape(image.shape[-2:], factor)), settings)
    maps = rescale_planes(maps, image.shape[-2:])
    maps = maps.reshape(*image.shape[:-2], N_MAPS, *image.shape[-2:])
    return np.moveaxis(maps, -3, 0) if image.ndim == 3 else maps


def _core_slices(
    chunks: Sequence[tuple[int, ...]], block_id: Sequence[int], halo: int
) -> tuple[slice, ...]:
    """Where the core of block ``block_id`` lies in its overlapped (halo-grown) block."""
    slices = []
    for axis_chunks, index in zip(chunks, block_id, strict=True):
        start = sum(axis_chunks[:index])
        low = min(halo, start)
        slices.append(slice(low, low + axis_chunks[index]))
    return tuple(slices)


def _infer_block(
    block: np.ndarray,
    *,
    settings: InferenceSettings,
    chunks: tuple[tuple[int, ...], ...],
    halo: int,
    channels: tuple[int, ...],
    block_id: tuple[int, ...],
) -> np.ndarray:
    """Network maps ``channels`` of the core of one overlapped block (t, [z,] y, x) ->
    (t, len(channels), [z,] y, x)."""
    planes = block.reshape(-1, *block.shape[-2:])
    maps = run_network(planes.astype(np.float32, copy=False), settings)[:, channels]
    maps = maps.reshape(*block.shape[:-2], len(channels), *block.shape[-2:])
    maps = np.moveaxis(maps, -3, 1)
    core = _core_slices(chunks[-2:], block_id[-2:], halo)
    return maps[(Ellipsis, *core)]


def _normalise_block(block: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    out = np.empty(block.shape, dtype=np.float32)
    for i, (lo, hi) in enumerate(zip(low.ravel(), high.ravel(), strict=True)):
        out[i] = normalize(block[i], lo, hi)
    return out


def predict_maps_tiled(
    frames: da.Array,
    *,
    diameter: float | None = None,
    settings: InferenceSettings | None = None,
    output_chunks: Sequence[tuple[int, ...]] | None = None,
    frames_per_block: int = 1,
    channels: Sequence[int] = tuple(range(N_MAPS)),
) -> da.Array:
    """Tiled inference on Dask: (t, [z,] y, x) raw frames -> (t, 4, [z,] y, x) maps, lazily.

    Equal (to float rounding) to :func:`predict_maps` on each frame. Normalisation statistics are
    per whole frame, tiles are stride-aligned with a receptive-field halo and centre-cropped.

    Parameters
    ----------
    frames
        Raw intensities of one channel, any chunks.
    diameter
        Typical nucleus diameter in pixels (None: the model's own).
    settings
        Inference settings (model, device, batch and tile size, TTA).
    output_chunks
        Spatial chunks of the result at the image's scale (default: those of ``frames``).
    frames_per_block
        Timepoints batched together in one inference task.
    channels
        The maps to keep, in this order (default all four); a caller that reads only some
        (e.g. :data:`pipeline.segmentation.convnet.RECIPE_MAPS`) saves their rescaling and
        memory.

    Returns
    -------
    dask.array.Array
        float32 maps (t, len(channels), [z,] y, x); the inference tasks' layer name starts
        with ``"infer-"``.
    """
    settings = settings or InferenceSettings()
    frames = frames.rechunk({0: 1})
    return maps_from_normalised(
        normalised_frames(frames, settings),
        diameter=diameter,
        settings=settings,
        output_chunks=output_chunks,
        frames_per_block=frames_per_block,
        channels=channels,
    )


def maps_from_normalised(
    normalised: da.Array,
    *,
    diameter: float | None = None,
    settings: InferenceSettings | None = None,
    output_chunks: Sequence[tuple[int, ...]] | None = None,
    frames_per_block: int = 1,
    channels: Sequence[int] = tuple(range(N_MAPS)),
) -> da.Array:
    """:func:`predict_maps_tiled` from frames already normalised by :func:`normalised_frames`
    (one chunk per timepoint), for callers that also use the normalised intensity."""
    settings = settings or InferenceSettings()
    _, info = loaded_model(settings.model, "cpu")
    halo, tile = _halo_and_tile(settings)
    lead = normalised.ndim - 2
    factor = 1.0 if diameter is None else rescale_factor(info, diameter)
    plane_shape = scaled_shape(normalised.shape[-2:], factor)
    plan = tuple(tile_blocks(n, tile, info.stride, halo) for n in plane_shape)
    batch_chunks = (frames_per_block, *normalised.shape[1:lead])
    # each tile rescaled with its halo in one task: the tiles of the rescaled plane, overlapped
    overlapped = rescale_planes_dask(normalised, plane_shape, (*batch_chunks, *plan), halo)
    core_chunks = (*overlapped.chunks[:lead], *plan)
    channels = tuple(channels)
    function = partial(
        _infer_block, settings=settings, chunks=core_chunks, halo=halo, channels=channels
    )
    out_chunks = (core_chunks[0], (len(channels),), *core_chunks[1:])
    maps = da.map_blocks(
        function,
        overlapped,
        new_axis=1,
        chunks=out_chunks,
        dtype=np.float32,
        name=f"infer-{da.core.tokenize(overlapped, settings.model_dump(), halo, channels)}",
        meta=np.empty((0,) * (overlapped.ndim + 1), dtype=np.float32),
    )
    spatial_chunks = output_chunks or normalised.chunks[-2:]
    target = (
        (1,) * normalised.shape[0],
        (len(channels),),
        *normalised.chunks[1:lead],
        *spatial_chunks,
    )
    return rescale_planes_dask(maps, normalised.shape[-2:], target)


def normalised_frames(frames: da.Array, settings: InferenceSettings | None = None) -> da.Array:
    """(t, ...) raw frames as the network sees them before rescaling: each frame mapped by
    its own whole-frame percentiles (and polarity) to about [0, 1], float32, lazily."""
    settings = settings or InferenceSettings()
    _, info = loaded_model(settings.model, "cpu")
    limits = frame_percentiles(frames, info.percentiles, settings.polarity)
    return _normalise_frames(frames, limits)


def _normalise_frames(frames: da.Array, limits: da.Array) -> da.Array:
    """Normalise every frame by its own (low, high) percentiles, ``limits`` of shape (t, 2)."""
    broadcast = (frames.shape[0],) + (1,) * (frames.ndim - 1)
    low = limits[:, 0].rechunk(frames.chunks[0]).reshape(broadcast)
    high = limits[:, 1].rechunk(frames.chunks[0]).reshape(broadcast)
    return da.map_blocks(_normalise_block, frames, low, high, dtype=np.float32)
