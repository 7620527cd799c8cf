"""Train the nuclear segmentation U-Net from images and instance masks.

Data
    Folders holding ``images/NAME.tif`` and ``masks/NAME.tif`` (instance labels, 0 background),
    paired by name, colour images turned into luminance; an ``index.csv`` (``id, modality,
    height, width``) splits a folder into groups (:func:`image_groups`); OME-Zarr images or
    plates with a label image (every field, timepoint and z plane is one 2D sample); simulated
    fields (:func:`pipeline.synthetic.simulate_field`, nuclear channel, several timepoints, seeds
    derived from the run seed). ``exclude`` removes held-out images by name (``t21.tif``) or by
    the end of their path (``gowt1/t21.tif``); :func:`grouped_holdout` draws such a split
    within every group.

Preparation (once per image, exactly as inference sees an image)
    1. Normalise the whole image with its robust percentiles and polarity (dark nuclei on a
       light background are inverted; :func:`pipeline.normalize.frame_percentiles`).
    2. Relabel the mask by connected components (a few ground-truth labels of the Cell
       Tracking Challenge masks cover two or three separate nuclei, e.g. daughters sharing
       their mother's id) and find the factor that brings its median nucleus diameter to
       :attr:`TrainingConfig.diameter_px`.
    3. Unannotated nuclei: real masks leave some nuclei out (the Cell Tracking Challenge masks
       omit almost every nucleus cut by the image border, and a few others). Pixels of bright
       blobs of at least 0.15 nucleus areas outside the (slightly dilated) annotated nuclei
       are given no weight in the loss rather than being taught as background
       (:func:`unannotated_mask`; not for simulated fields, whose ground truth is complete).
    4. Validation split: the last :attr:`TrainingConfig.validation_fraction` of the rows of every
       image (the same region of every frame, so a slowly moving nucleus does not appear in the
       training part of one frame and the validation part of the next). Training crops never
       reach into it.

Crops (:func:`render_crop`, drawn at every step)
    A window of the image and its mask around a random centre is rescaled (image linear, mask
    nearest) by the image's factor times a scale jitter log-uniform in
    :attr:`TrainingConfig.scale_range`, with a margin, and its targets are computed there on
    whole nuclei: class 1 "boundary" is ``find_boundaries(mode="inner")`` of the instance mask
    (touching nuclei get a two-pixel line between them), class 2 "interior" the rest of each
    nucleus, class 0 background; the distance target is the Euclidean distance of every
    interior pixel to its nucleus' boundary divided by that nucleus' largest such distance
    (1 at the centre, 0 on the boundary and outside).

Training
    Groups drawn with probability ~ sqrt(images in the group), images within a group by
    training area, rotations by 90 degrees and reflections, intensity augmentation (blur,
    gamma on the [0, 1] range, gain and offset, Gaussian noise), loss = class-weighted
    cross-entropy + ``distance_weight`` times a masked mean squared error on the distance map
    (weight 1 on nuclei, 0.1 on background). Class weights are ``frequency ** -power``
    (measured on 256 random crops) normalised so that the mean weight per pixel is 1 (power
    0.5: the boundary class, about 2 % of the pixels, counts about five times more than
    background, not thirty times as with inverse frequencies, which would thicken predicted
    boundaries and shrink masks). AdamW with a warm-up and cosine decay; validation loss after
    every epoch; early stopping keeps the best weights. ``init`` fine-tunes an existing model.
    Deterministic for a seed on CPU (``torch.manual_seed``, a numpy ``Generator`` and
    ``torch.use_deterministic_algorithms``); on CUDA bf16 autocast is used and determinism is
    requested but not enforced (some CUDA kernels have no deterministic version).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.measure import label as label_components
from skimage.segmentation import find_boundaries

from pipeline.convnet.inference import median_diameter, rescale_planes, scaled_shape
from pipeline.convnet.receptive_field import measure_receptive_field_radius, measure_stride
from pipeline.convnet.unet import CLASS_NAMES, UNet
from pipeline.convnet.weights import ModelInfo, load_model, save_model
from pipeline.errors import PipelineInputError
from pipeline.normalize import DEFAULT_PERCENTILES, colour_to_grey, frame_percentiles, normalize

__all__ = [
    "LabelledImage",
    "PreparedImage",
    "TrainingConfig",
    "class_weights",
    "grouped_holdout",
    "image_groups",
    "load_image_folder",
    "load_simulated",
    "load_zarr",
    "prepare_image",
    "read_name_list",
    "read_training_recipe",
    "render_crop",
    "rescale_labels",
    "targets_from_labels",
    "train",
    "unannotated_mask",
]

_TIFF_SUFFIXES = (".tif", ".tiff")
_BACKGROUND_DISTANCE_WEIGHT = 0.1


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of a training run (all recorded in the model's training record).

    Attributes
    ----------
    diameter_px
        Median nucleus diameter every image is rescaled to; stored as ``ModelInfo.diameter_px``.
    scale_range
        Scale augmentation: each crop is rescaled by a further factor log-uniform in this range
        (0.7-1.4: a diameter estimate off by 30 % is inside what the network has seen).
    crop, batch_size
        Training crop size (a multiple of the network's stride) and crops per step.
    steps_per_epoch, max_epochs, patience
        Steps between validations, most epochs, epochs without improvement before stopping.
    learning_rate, weight_decay, warmup_steps
        AdamW with a linear warm-up and cosine decay to 1/50 of the rate over all epochs.
    distance_weight
        Weight of the distance-map loss relative to the cross-entropy.
    class_weight_power
        Class weights are ``frequency ** -power`` (0: no balancing, 1: inverse frequency).
    validation_fraction
        Fraction of every image's rows (at the bottom) used for validation only.
    validation_per_source, validation_crop
        Validation crops per source (group) and their largest edge at the training scale.
    polarity
        ``"auto"``, ``"bright"`` or ``"dark"`` nuclei (:func:`pipeline.normalize.frame_percentiles`;
        the same rule as inference).
    ignore_unannotated
        Give no loss weight to bright unannotated blobs of real masks (:func:`unannotated_mask`).
    base_channels, depth
        U-Net width and number of poolings.
    seed
        Seed of weights, crops, augmentation and simulated fields.
    simulated_frames, simulated_size
        Frames per simulated field and its size in pixels (before rescaling).
    device
        ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
    threads
        CPU threads for torch (``None``: leave as is).
    """

    diameter_px: float = 30.0
    scale_range: tuple[float, float] = (0.7, 1.4)
    crop: int = 128
    batch_size: int = 16
    steps_per_epoch: int = 100
    max_epochs: int = 20
    patience: int = 5
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    distance_weight: float = 8.0
    class_weight_power: float = 0.5
    validation_fraction: float = 0.2
    validation_per_source: int = 4
    validation_crop: int = 256
    polarity: str = "auto"
    ignore_unannotated: bool = True
    base_channels: int = 16
    depth: int = 3
    seed: int = 0
    simulated_frames: tuple[int, ...] = (0, 3, 7)
    simulated_size: int = 256
    device: str | None = None
    threads: int | None = None


@dataclass(frozen=True)
class LabelledImage:
    """One 2D image with its instance mask, as read.

    ``name`` identifies it in the training record (``folder/file`` for TIFF folders), ``source``
    groups images that are sampled together (a folder, a zarr store, the simulated fields);
    ``complete`` says every nucleus is annotated (simulated ground truth).
    """

    name: str
    source: str
    image: np.ndarray
    labels: np.ndarray
    complete: bool = False


@dataclass
class PreparedImage:
    """A normalised image at its own resolution, its instance mask and loss weights.

    ``factor`` rescales it to the training diameter; rows ``[0, train_rows)`` are for training,
    the rest for validation; ``valid`` marks the pixels that count in the loss.
    """

    name: str
    source: str
    factor: float
    median_diameter: float
    image: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    train_rows: int


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _excluded(name: str, patterns: Sequence[str]) -> str | None:
    """The first pattern naming ``name`` (equal to its file name or to the end of its path)."""
    for pattern in patterns:
        pattern = pattern.strip().strip("/")
        if pattern and (name == pattern or name.endswith("/" + pattern)):
            return pattern
    return None


def load_image_folder(
    folder: str | Path, exclude: Sequence[str] = (), excluded: list[str] | None = None
) -> list[LabelledImage]:
    """Image/mask pairs of a folder with ``images/`` and ``masks/`` TIFFs paired by name.

    Parameters
    ----------
    folder
        Holds ``images/NAME.tif`` and ``masks/NAME.tif``.
    exclude
        Names (``t21.tif``) or path ends (``gowt1/t21.tif``) of images to leave out.
    excluded
        If given, the names of the images left out are appended to it.
    """
    folder = Path(folder)
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise PipelineInputError("training folder needs images/ and masks/ subfolders", folder)
    groups = image_groups(folder)
    pairs = []
    for path in sorted(images.iterdir()):
        if path.suffix.lower() not in _TIFF_SUFFIXES:
            continue
        name = f"{folder.name}/{path.name}"
        if _excluded(name, exclude):
            if excluded is not None:
                excluded.append(name)
            continue
        mask_path = masks / path.name
        if not mask_path.is_file():
            raise PipelineInputError("image has no mask of the same name", mask_path)
        image = np.squeeze(tifffile.imread(path))
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = colour_to_grey(image)
        labels = np.squeeze(tifffile.imread(mask_path))
        _check_pair(image, labels, path)
        group = groups.get(path.stem)
        source = f"{folder}/{group}" if group else str(folder)
        pairs.append(LabelledImage(name, source, image, labels))
    if not pairs and not excluded:
        raise PipelineInputError("no TIFF images found", images)
    return pairs


def image_groups(folder: str | Path) -> dict[str, str]:
    """Group of each image of a training folder, from its optional ``index.csv``.

    A folder whose ``index.csv`` has the columns ``id``, ``modality``, ``height`` and ``width``
    (as ``dsb2018``) is split into groups ``MODALITY/HEIGHTxWIDTH``: images of one size and
    modality mostly come from one experiment. Groups are sampled in a balanced way and the
    validation split is drawn within each group. Without an index the folder is one group.
    """
    index = Path(folder) / "index.csv"
    if not index.is_file():
        return {}
    with index.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"id", "modality", "height", "width"} <= set(rows[0]):
        return {}
    return {row["id"]: f"{row['modality']}/{row['height']}x{row['width']}" for row in rows}


def grouped_holdout(
    groups: dict[str, str], fraction: float = 0.15, seed: int = 0, min_group: int = 3
) -> list[str]:
    """Ids held out for validation: ``round(fraction * n)`` (at least one) of every group of
    ``n >= min_group`` images, drawn with a seeded permutation; sorted."""
    rng = np.random.default_rng(seed)
    held_out = []
    for group in sorted(set(groups.values())):
        members = sorted(name for name, g in groups.items() if g == group)
        if len(members) < min_group:
            continue
        count = max(1, round(fraction * len(members)))
        held_out += [members[i] for i in rng.permutation(len(members))[:count]]
    return sorted(held_out)


def _check_pair(image: np.ndarray, labels: np.ndarray, where: str | Path) -> None:
    if image.ndim != 2 or image.shape != labels.shape:
        raise PipelineInputError(
            f"expected a 2D image and mask of one shape, got {image.shape} and {labels.shape}",
            where,
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise PipelineInputError(f"mask must hold integer labels, got {labels.dtype}", where)


def load_zarr(
    path: str | Path,
    label: str,
    channel: str | int = 0,
    exclude: Sequence[str] = (),
    excluded: list[str] | None = None,
) -> list[LabelledImage]:
    """Every 2D plane (field, timepoint, z) of an OME-Zarr image or plate with a label image.

    Parameters
    ----------
    path
        OME-Zarr image or plate.
    label
        Name of the label image (``labels/NAME`` of each field).
    channel
        Channel name or index of the nuclear channel.
    exclude, excluded
        As in :func:`load_image_folder`; names are ``STORE/FIELD/tT`` (``/zZ`` in 3D).
    """
    from pipeline.io.omezarr import open_image, open_plate

    plate = open_plate(path)
    store = Path(plate.path).name
    samples = []
    for fov in plate.fields:
        labels_path = f"{fov.path}/labels/{label}" if fov.path else f"labels/{label}"
        # Label writers commonly skip chunks without nuclei: absent chunks are background.
        label_image = open_image(plate.path, image_path=labels_path, missing_chunks="fill").data
        data = fov.data
        if "c" in data.dims:
            if isinstance(channel, str) and not channel.isdigit():
                if channel not in fov.channel_names:
                    raise PipelineInputError(
                        f"no channel {channel!r} (channels: {', '.join(fov.channel_names)})",
                        plate.path,
                    )
                data = data.sel(c=channel)
            else:
                data = data.isel(c=int(channel))
        image = np.asarray(data.values)
        labels = np.asarray(label_image.values)
        if "c" in label_image.dims:
            labels = labels.take(0, axis=label_image.dims.index("c"))
        if image.shape != labels.shape:
            raise PipelineInputError(
                f"label image {label!r} has shape {labels.shape}, the image {image.shape}",
                plate.path,
            )
        dims = [dim for dim in data.dims if dim not in ("y", "x")]
        for index in np.ndindex(*image.shape[: len(dims)]):
            suffix = "/".join(f"{dim}{i}" for dim, i in zip(dims, index, strict=True))
            name = "/".join(part for part in (store, fov.path or "image", suffix) if part)
            if _excluded(name, exclude):
                if excluded is not None:
                    excluded.append(name)
                continue
            samples.append(LabelledImage(name, plate.path, image[index], labels[index]))
    return samples


def simulated_seeds(count: int, seed: int) -> list[int]:
    """Seeds of the simulated training fields of a run (derived from the run seed)."""
    sequence = np.random.SeedSequence([seed, 0x5EED])
    return [int(s.generate_state(1, dtype=np.uint32)[0]) for s in sequence.spawn(count)]


def load_simulated(
    count: int, seed: int, frames: Sequence[int] = (0, 3, 7), size: int = 256
) -> list[LabelledImage]:
    """Nuclear channel and ground truth of ``count`` simulated fields at the given frames."""
    from pipeline.synthetic import simulate_field

    samples = []
    for field_seed in simulated_seeds(count, seed):
        simulated = simulate_field(n_frames=max(frames) + 1, size=size, seed=field_seed)
        for t in frames:
            samples.append(
                LabelledImage(
                    f"simulated/{field_seed}/t{t}",
                    "simulated",
                    simulated.image[t, 0],
                    simulated.labels[t],
                    complete=True,
                )
            )
    return samples


# --------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------


def rescale_labels(labels: np.ndarray, factor: float) -> np.ndarray:
    """Rescale a 2D label image by ``factor`` with nearest-neighbour sampling."""
    shape = scaled_shape(labels.shape, factor)
    if shape == labels.shape:
        return labels
    rows = np.minimum(
        ((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.int64),
        labels.shape[0] - 1,
    )
    cols = np.minimum(
        ((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.int64),
        labels.shape[1] - 1,
    )
    return labels[np.ix_(rows, cols)]


def targets_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class map (0 background, 1 boundary, 2 interior; uint8) and distance map (float32)."""
    labels = np.asarray(labels)
    foreground = labels > 0
    boundary = find_boundaries(labels, mode="inner") & foreground
    interior = foreground & ~boundary
    classes = np.zeros(labels.shape, dtype=np.uint8)
    classes[boundary] = 1
    classes[interior] = 2
    distance = ndi.distance_transform_edt(interior).astype(np.float32)
    if interior.any():
        largest = np.zeros(int(labels.max()) + 1, dtype=np.float32)
        np.maximum.at(largest, labels[interior], distance[interior])
        scale = largest[labels]
        distance = np.divide(distance, scale, out=np.zeros_like(distance), where=scale > 0)
    return classes, distance


def unannotated_mask(image: np.ndarray, labels: np.ndarray, diameter: float) -> np.ndarray:
    """Background pixels of the mask that probably belong to unannotated nuclei.

    The normalised image is smoothed (sigma = diameter / 20) and thresholded half-way between
    the median of the annotated background and Otsu's threshold; what lies farther than a tenth
    of a diameter from every annotated nucleus and forms blobs of at least 0.15 nucleus areas
    is returned, grown by a tenth of a diameter, minus the annotated nuclei.
    """
    labels = np.asarray(labels)
    background = labels == 0
    if not background.any() or background.all():
        return np.zeros(labels.shape, dtype=bool)
    smooth = ndi.gaussian_filter(np.asarray(image, np.float32), sigma=max(1.0, diameter / 20))
    level = float(np.median(smooth[background]))
    bright = smooth > level + 0.5 * (threshold_otsu(smooth) - level)
    margin = max(1, round(0.1 * diameter))
    candidates = bright & ~ndi.binary_dilation(~background, iterations=margin)
    blobs, _ = ndi.label(candidates)
    area = np.bincount(blobs.ravel())
    keep = area >= 0.15 * np.pi * (diameter / 2) ** 2
    keep[0] = False
    return ndi.binary_dilation(keep[blobs], iterations=margin) & background


def prepare_image(
    sample: LabelledImage,
    diameter_px: float,
    validation_fraction: float = 0.2,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ignore_unannotated: bool = True,
    polarity: str = "auto",
) -> PreparedImage:
    """Normalise the whole image exactly as inference does (percentiles and polarity), split
    its mask into connected components and find its factor to ``diameter_px``; see the module
    notes. Crops are rescaled and given targets when they are drawn (:func:`render_crop`)."""
    labels = label_components(np.asarray(sample.labels), connectivity=1).astype(np.int32)
    diameter = median_diameter(labels)
    if not diameter > 0:
        raise PipelineInputError("mask has no nuclei; cannot set the image's scale", sample.name)
    low, high = frame_percentiles(sample.image[np.newaxis], percentiles, polarity)[0]
    normalised = normalize(sample.image, low, high)
    if ignore_unannotated and not sample.complete:
        ignored = unannotated_mask(normalised, labels, diameter)
    else:
        ignored = np.zeros(labels.shape, dtype=bool)
    return PreparedImage(
        sample.name,
        sample.source,
        float(diameter_px) / diameter,
        diameter,
        normalised,
        labels,
        ~ignored,
        round(labels.shape[0] * (1.0 - validation_fraction)),
    )


def render_crop(
    item: PreparedImage,
    scale: float,
    centre: tuple[float, float],
    shape: tuple[int, int],
    rows: tuple[int, int],
    margin: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A crop of ``shape`` pixels at ``item.factor * scale``, centred on ``centre`` (source
    pixels), drawn only from the source rows ``rows``: image, classes, distance, valid.

    The source window is rescaled with a ``margin`` (output pixels) on every side, so targets
    are computed on whole nuclei before the crop is cut; what lies outside the image (or the
    rows) is zero and has no loss weight.
    """
    factor = item.factor * scale
    limits = ((rows[0], rows[1]), (0, item.image.shape[1]))
    bounds = []
    for c, n, (lo, hi) in zip(centre, shape, limits, strict=True):
        half = (n / 2 + margin) / factor
        bounds.append((max(lo, math.floor(c - half)), min(hi, math.ceil(c + half))))
    (y0, y1), (x0, x1) = bounds
    window = (slice(y0, y1), slice(x0, x1))
    out_shape = scaled_shape((y1 - y0, x1 - x0), factor)
    image = rescale_planes(item.image[window], out_shape)
    labels = rescale_labels(item.labels[window], factor)
    valid = rescale_labels(item.valid[window], factor)
    classes, distance = targets_from_labels(labels)
    origin = [
        round((c - b[0]) * o / (b[1] - b[0]) - n / 2)
        for c, b, o, n in zip(centre, bounds, out_shape, shape, strict=True)
    ]
    return (
        _cut(image, origin, shape, 0.0),
        _cut(classes, origin, shape, 0),
        _cut(distance, origin, shape, 0.0),
        _cut(valid, origin, shape, False),
    )


def _cut(array: np.ndarray, origin: Sequence[int], shape: Sequence[int], fill) -> np.ndarray:
    """``array[origin : origin + shape]``, filled with ``fill`` where it reaches outside."""
    out = np.full(tuple(shape), fill, dtype=array.dtype)
    source, target = [], []
    for o, n, size in zip(origin, shape, array.shape, strict=True):
        lo, hi = max(o, 0), min(o + n, size)
        if hi <= lo:
            return out
        source.append(slice(lo, hi))
        target.append(slice(lo - o, hi - o))
    out[tuple(target)] = array[tuple(source)]
    return out


def class_weights(counts: np.ndarray, power: float) -> tuple[np.ndarray, np.ndarray]:
    """Class frequencies from pixel counts per class and weights ``f ** -power`` normalised
    to a mean weight of 1 per pixel."""
    counts = np.asarray(counts, dtype=np.float64)
    frequency = counts / counts.sum()
    weights = np.where(frequency > 0, np.maximum(frequency, 1e-12) ** -power, 0.0)
    weights /= float(np.sum(frequency * weights))
    return frequency, weights


# --------------------------------------------------------------------------------------------
# Sampling and augmentation
# --------------------------------------------------------------------------------------------


class _Sampler:
    """Random training crops with scale, geometric and intensity augmentation.

    A group (source) is drawn with probability proportional to the square root of its number
    of images (balanced, yet a group of three images is not seen as often as one of hundreds),
    an image within it by its training area at the training scale, a scale factor log-uniform
    in ``scale_range`` and a centre in the training rows.
    """

    def __init__(
        self,
        prepared: Sequence[PreparedImage],
        crop: int,
        seed: int,
        scale_range: tuple[float, float] = (1.0, 1.0),
        margin: float = 0.0,
    ) -> None:
        self.prepared = list(prepared)
        self.crop, self.scale_range, self.margin = crop, scale_range, margin
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC80F]))
        sources = sorted({item.source for item in self.prepared})
        area = [item.train_rows * item.image.shape[1] * item.factor**2 for item in self.prepared]
        if all(a == 0 for a in area):
            raise PipelineInputError("no training region left after the validation split", "")
        self.groups = []
        for source in sources:
            members = [i for i, item in enumerate(self.prepared) if item.source == source]
            weights = np.array([area[i] for i in members], dtype=np.float64)
            if weights.sum() > 0:
                self.groups.append((members, weights / weights.sum()))
        sizes = np.array([len(members) for members, _ in self.groups], dtype=np.float64)
        self.group_probability = np.sqrt(sizes) / np.sqrt(sizes).sum()

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        images = np.empty((size, 1, self.crop, self.crop), dtype=np.float32)
        classes = np.empty((size, self.crop, self.crop), dtype=np.int64)
        distance = np.empty((size, self.crop, self.crop), dtype=np.float32)
        valid = np.empty((size, self.crop, self.crop), dtype=bool)
        for n in range(size):
            images[n, 0], classes[n], distance[n], valid[n] = self.sample()
        return images, classes, distance, valid

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = self.rng
        members, weights = self.groups[rng.choice(len(self.groups), p=self.group_probability)]
        item = self.prepared[members[rng.choice(len(members), p=weights)]]
        low, high = self.scale_range
        scale = math.exp(rng.uniform(math.log(low), math.log(high)))
        half = self.crop / (2 * item.factor * scale)
        centre = tuple(
            float(rng.uniform(min(half, n / 2), max(n - half, n / 2)))
            for n in (item.train_rows, item.image.shape[1])
        )
        crop = render_crop(
            item, scale, centre, (self.crop, self.crop), (0, item.train_rows), self.margin
        )
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        image, classes, distance, valid = (_orient(a, turns, flip) for a in crop)
        return _intensity(image, rng), classes, distance, valid


def _orient(array: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    array = np.rot90(array, turns)
    return np.ascontiguousarray(array[:, ::-1] if flip else array)


def _intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, gamma on the [0, 1] part of the normalised range, gain and offset, noise."""
    if rng.uniform() < 0.25:
        image = ndi.gaussian_filter(image, sigma=rng.uniform(0.5, 2.0))
    gamma = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    clipped = np.clip(image, 0.0, 1.0)
    image = clipped**gamma + (image - clipped)
    gain = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    offset = rng.uniform(-0.15, 0.15)
    noise = rng.uniform(0.0, 0.08)
    image = gain * image + offset + noise * rng.standard_normal(image.shape)
    return image.astype(np.float32)


AUGMENTATIONS = {
    "crop": (
        "random crops of the training rows; groups drawn with probability ~ sqrt(images), "
        "images within a group by training area at the training scale"
    ),
    "scale": "continuous: factor log-uniform in scale_range around diameter_px, targets recomputed",
    "geometry": "rotations by 0/90/180/270 degrees and a left-right reflection",
    "blur": "Gaussian, sigma uniform in [0.5, 2] px, on a quarter of the crops",
    "gamma": "x -> clip(x, 0, 1) ** g + (x - clip(x, 0, 1)), g log-uniform in [0.5, 2]",
    "gain_offset": "x -> a x + b, a log-uniform in [0.6, 1.6], b uniform in [-0.15, 0.15]",
    "noise": "additive Gaussian, sigma uniform in [0, 0.08] (normalised units)",
}


# --------------------------------------------------------------------------------------------
# Loss and training loop
# --------------------------------------------------------------------------------------------


def _loss(
    output: torch.Tensor,
    classes: torch.Tensor,
    distance: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    distance_weight: float,
) -> torch.Tensor:
    """Class-weighted cross-entropy (weighted mean over the pixels that count) plus
    ``distance_weight`` times the masked mean squared error of the distance map."""
    output = output.float()
    valid = valid.float()
    pixel_weight = weights[classes] * valid
    cross_entropy = F.cross_entropy(output[:, :3], classes, reduction="none")
    cross_entropy = (cross_entropy * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-6)
    mask = torch.where(classes > 0, 1.0, _BACKGROUND_DISTANCE_WEIGHT) * valid
    squared = (output[:, 3] - distance) ** 2
    return cross_entropy + distance_weight * (squared * mask).sum() / mask.sum().clamp_min(1e-6)


def _validation_sets(
    prepared: Sequence[PreparedImage], stride: int, per_source: int, size: int, margin: float
) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
    """Per source, up to ``per_source`` validation crops (the middle of the validation rows
    of evenly spaced images, at most ``size`` pixels square at the training scale, trimmed to
    multiples of the stride)."""
    sets = []
    for source in sorted({item.source for item in prepared}):
        items = [p for p in prepared if p.source == source]
        picks = np.unique(np.linspace(0, len(items) - 1, min(per_source, len(items))).round())
        strips = []
        for item in (items[int(i)] for i in picks):
            height, width = item.image.shape
            rows = (height - item.train_rows) * item.factor
            shape = tuple(min(size, int(n) // stride * stride) for n in (rows, width * item.factor))
            if min(shape) == 0:
                continue
            centre = ((item.train_rows + height) / 2, width / 2)
            strips.append(render_crop(item, 1.0, centre, shape, (item.train_rows, height), margin))
        if strips:
            sets.append(strips)
    return sets


def _validate(model, sets, weights, config, device, autocast) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for strips in sets:
            source = []
            for image, classes, distance, valid in strips:
                x = torch.from_numpy(image)[None, None].to(device)
                with autocast():
                    output = model(x)
                loss = _loss(
                    output,
                    torch.from_numpy(classes.astype(np.int64))[None].to(device),
                    torch.from_numpy(distance)[None].to(device),
                    torch.from_numpy(np.ascontiguousarray(valid))[None].to(device),
                    weights,
                    config.distance_weight,
                )
                source.append(float(loss))
            losses.append(float(np.mean(source)))
    model.train()
    return float(np.mean(losses))


def _learning_rate(step: int, total: int, config: TrainingConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    floor = config.learning_rate / 50
    return floor + (config.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class _Determinism:
    """Seed everything and request deterministic algorithms; restore the global state after."""

    def __init__(self, seed: int, device: torch.device, threads: int | None) -> None:
        self.seed, self.device, self.threads = seed, device, threads

    def __enter__(self) -> _Determinism:
        self.previous = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_num_threads(),
        )
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=self.device.type != "cpu")
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc: object) -> None:
        enabled, warn_only, threads = self.previous
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.set_num_threads(threads)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineInputError("CUDA requested but not available", name)
    return device


def read_name_list(path: str | Path) -> list[str]:
    """Image names listed in a text file, one per line; ``#`` starts a comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise PipelineInputError(f"cannot read the list of images ({error})", path) from None
    return [name for name in (line.split("#")[0].strip() for line in lines) if name]


def read_training_recipe(path: str | Path) -> dict[str, Any]:
    """A training recipe from YAML: ``data`` (folders), ``simulated`` (fields), ``init``,
    ``exclude`` (names) and ``exclude_file`` (one name per line, ``#`` comments; relative to
    the recipe), ``training`` (:class:`TrainingConfig` fields). Returns the keyword arguments
    of :func:`train` with ``config`` built."""
    import yaml

    path = Path(path)
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise PipelineInputError(f"cannot read training recipe ({error})", path) from None
    known = {"data", "simulated", "init", "exclude", "exclude_file", "training"}
    unknown = set(recipe) - known
    fields = TrainingConfig.__dataclass_fields__
    unknown |= {f"training.{k}" for k in recipe.get("training") or {} if k not in fields}
    if unknown:
        raise PipelineInputError(f"unknown keys {sorted(unknown)} in training recipe", path)
    settings = dict(recipe.get("training") or {})
    if "scale_range" in settings:
        settings["scale_range"] = tuple(settings["scale_range"])
    exclude = list(recipe.get("exclude") or [])
    if recipe.get("exclude_file"):
        exclude += read_name_list(path.parent / recipe["exclude_file"])
    result: dict[str, Any] = {"config": TrainingConfig(**settings), "exclude": exclude}
    for key in ("data", "simulated", "init"):
        if key in recipe:
            result[key] = recipe[key]
    return result


def _hardware(device: torch.device) -> str:
    """The device a run trained on, in words (GPU name, or CPU threads)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"


def _model_info(
    model: UNet, config: TrainingConfig, radius: int, stride: int, record: dict[str, Any]
) -> ModelInfo:
    return ModelInfo(
        architecture=dict(model.config),
        diameter_px=float(config.diameter_px),
        percentiles=tuple(float(p) for p in DEFAULT_PERCENTILES),
        receptive_field_radius_px=int(radius),
        stride=int(stride),
        training=record,
    )


def train(
    *,
    out: str | Path | None,
    data: Iterable[str | Path] = (),
    zarr: Iterable[tuple[str | Path, str, str | int]] = (),
    simulated: int = 0,
    exclude: Sequence[str] = (),
    config: TrainingConfig | None = None,
    init: str | Path | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[UNet, ModelInfo]:
    """Train a :class:`UNet` and save it (``OUT.pt`` and ``OUT.json``) with its training record.

    Parameters
    ----------
    out
        Where to save the model (``None``: do not save). The best weights so far are written
        there after every epoch that improves the validation loss (record ``finished:
        false``), so a run stopped part-way leaves a usable model and its history.
    data
        Folders with ``images/`` and ``masks/`` TIFFs.
    zarr
        ``(path, label name, channel)`` of OME-Zarr images or plates with a label image.
    simulated
        Number of simulated fields added (frames ``config.simulated_frames`` of each).
    exclude
        Held-out images: names or path ends (``gowt1/t21.tif``); each must match an image.
    config
        Hyper-parameters (default :class:`TrainingConfig`).
    init
        Fine-tune: start from this model's weights (``"shipped"``: the shipped model); its
        architecture and training diameter replace those of ``config``.
    command
        The command line to record (default: none recorded).
    log
        Receives one line per epoch (default: ``print``).

    Returns
    -------
    model, info
        The best model (lowest validation loss) in evaluation mode on the CPU, and its info.
    """
    config = config or TrainingConfig()
    log = log or (lambda line: print(line, flush=True))
    low, high = config.scale_range
    if not 0 < low <= 1.0 <= high:
        raise PipelineInputError("scale_range must hold 1.0", str(config.scale_range))
    initial = None
    if init is not None:
        initial = load_model(None if str(init) == "shipped" else init)
        config = replace(
            config,
            diameter_px=initial[1].diameter_px,
            base_channels=initial[0].config["base_channels"],
            depth=initial[0].config["depth"],
        )
    started = time.perf_counter()
    device = _device(config.device)
    data = [Path(folder) for folder in data]
    zarr = list(zarr)
    excluded: list[str] = []
    samples: list[LabelledImage] = []
    for folder in data:
        samples += load_image_folder(folder, exclude, excluded)
    for path, label, channel in zarr:
        samples += load_zarr(path, label, channel, exclude, excluded)
    unused = [p for p in exclude if p.strip() and not any(_excluded(n, [p]) for n in excluded)]
    if unused:
        raise PipelineInputError("--exclude names no image", ", ".join(unused))
    if simulated:
        samples += load_simulated(
            simulated, config.seed, config.simulated_frames, config.simulated_size
        )
    if not samples:
        raise PipelineInputError("no training images", "give --data, --zarr or --simulated")
    log(f"preparing {len(samples)} images")
    prepared = [
        prepare_image(
            s,
            config.diameter_px,
            config.validation_fraction,
            ignore_unannotated=config.ignore_unannotated,
            polarity=config.polarity,
        )
        for s in samples
    ]
    margin = config.diameter_px
    counter = _Sampler(prepared, config.crop, config.seed + 1, config.scale_range, margin)
    counts = np.zeros(3)
    for _ in range(256):
        classes, valid = (counter.sample()[i] for i in (1, 3))
        counts += np.bincount(classes[valid].ravel(), minlength=3)[:3]
    frequency, weights = class_weights(counts, config.class_weight_power)

    def describe(
        step: int, history: list[dict], best_epoch: int, best_loss: float, finished: bool
    ) -> dict[str, Any]:
        """The training record: what made the weights, and how far training got."""
        return {
            "command": command,
            "init": None if init is None else str(init),
            "init_weights_sha256": None if initial is None else initial[1].weights_sha256,
            "seed": config.seed,
            "config": asdict(config),
            "data": [str(folder) for folder in data],
            "zarr": [{"path": str(p), "label": lbl, "channel": ch} for p, lbl, ch in zarr],
            "simulated": {
                "fields": simulated,
                "seeds": simulated_seeds(simulated, config.seed) if simulated else [],
                "frames": list(config.simulated_frames),
                "size": config.simulated_size,
            },
            "excluded": sorted(excluded),
            "images": [
                {
                    "name": item.name,
                    "group": item.source,
                    "median_diameter_px": round(item.median_diameter, 2),
                    "factor": round(item.factor, 4),
                    "ignored_fraction": round(1.0 - float(np.mean(item.valid)), 4),
                }
                for item in prepared
                if item.source != "simulated"
            ],
            "finished": finished,
            "steps": step,
            "epochs": len(history),
            "best_epoch": best_epoch,
            "best_val_loss": best_loss,
            "history": list(history),
            "validation": (
                f"last {config.validation_fraction:.0%} of the rows of every image; loss on up "
                f"to {config.validation_per_source} crops of <= {config.validation_crop} px "
                "per group"
            ),
            "hardware": _hardware(device),
            "augmentations": AUGMENTATIONS,
            "class_frequencies": dict(zip(CLASS_NAMES, frequency.tolist(), strict=True)),
            "class_weights": dict(zip(CLASS_NAMES, weights.tolist(), strict=True)),
            "loss": (
                f"class-weighted cross-entropy + {config.distance_weight} x masked MSE of the "
                f"distance map (weight 1 on nuclei, {_BACKGROUND_DISTANCE_WEIGHT} on background)"
            ),
            "device": str(device),
            "torch": torch.__version__,
            "wall_time_s": round(time.perf_counter() - started, 1),
        }

    with _Determinism(config.seed, device, config.threads):
        model = UNet(in_channels=1, base_channels=config.base_channels, depth=config.depth)
        if initial is not None:
            model.load_state_dict(initial[0].state_dict())
        stride = model.stride
        if config.crop % stride:
            raise PipelineInputError(f"crop must be a multiple of the stride {stride}", "")
        model.to(device).train()
        sampler = _Sampler(prepared, config.crop, config.seed, config.scale_range, margin)
        validation = _validation_sets(
            prepared, stride, config.validation_per_source, config.validation_crop, margin
        )
        if not validation:
            raise PipelineInputError("validation split is empty", "raise validation_fraction")
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        weight_tensor = torch.tensor(weights, dtype=torch.float32, device=device)

        def autocast():
            return torch.autocast(
                device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
            )

        checkpoint_geometry = measure_receptive_field_radius(model), model.stride
        total_steps = config.steps_per_epoch * config.max_epochs
        best_loss, best_epoch, best_state = math.inf, 0, None
        history = []
        step = 0
        for epoch in range(1, config.max_epochs + 1):
            running = []
            for _ in range(config.steps_per_epoch):
                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(step, total_steps, config)
                images, classes, distance, valid = sampler.batch(config.batch_size)
                with autocast():
                    output = model(torch.from_numpy(images).to(device))
                loss = _loss(
                    output,
                    torch.from_numpy(classes).to(device),
                    torch.from_numpy(distance).to(device),
                    torch.from_numpy(valid).to(device),
                    weight_tensor,
                    config.distance_weight,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running.append(float(loss.detach()))
                step += 1
            val_loss = _validate(model, validation, weight_tensor, config, device, autocast)
            train_loss = float(np.mean(running))
            improved = val_loss < best_loss
            if improved:
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
            if improved and out is not None:
                checkpoint = copy.deepcopy(model).cpu().float().eval()
                record = describe(step, history, best_epoch, best_loss, finished=False)
                save_model(
                    checkpoint, _model_info(checkpoint, config, *checkpoint_geometry, record), out
                )
            elapsed = time.perf_counter() - started
            log(
                f"epoch {epoch:3d}/{config.max_epochs}  train {train_loss:.4f}  "
                f"val {val_loss:.4f}{' *' if improved else '  '}  "
                f"lr {optimizer.param_groups[0]['lr']:.1e}  "
                f"elapsed {elapsed:6.0f} s  "
                f"left at most {elapsed / epoch * (config.max_epochs - epoch):6.0f} s"
            )
            if epoch - best_epoch >= config.patience:
                log(f"early stop: no improvement for {config.patience} epochs")
                break
        model.load_state_dict(best_state)
        model = model.cpu().float().eval()
        radius = measure_receptive_field_radius(model)
        measured_stride = measure_stride(model, radius=radius)

    record = describe(step, history, best_epoch, best_loss, finished=True)
    info = _model_info(model, config, radius, measured_stride, record)
    if out is not None:
        save_model(model, info, out)
    return model, info
