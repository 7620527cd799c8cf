"""Turn a labelled image into training crops: normalisation, targets, sampling, augmentation.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.measure import label as label_components
from skimage.segmentation import find_boundaries

from pipeline.convnet.inference import median_diameter, scaled_shape
from pipeline.convnet.rescale import rescale_planes
from pipeline.convnet.training.data import LabelledImage
from pipeline.errors import PipelineInputError
from pipeline.normalize import DEFAULT_PERCENTILES, frame_percentiles, normalize


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


class CropSampler:
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
        seed: int | Sequence[int],
        scale_range: tuple[float, float] = (1.0, 1.0),
        margin: float = 0.0,
    ) -> None:
        self.prepared = list(prepared)
        self.crop, self.scale_range, self.margin = crop, scale_range, margin
        self.rng = np.random.default_rng(np.random.SeedSequence([*np.atleast_1d(seed), 0xC80F]))
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
