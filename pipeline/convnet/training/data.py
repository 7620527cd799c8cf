"""Read training images and instance masks.

Data
    Folders holding ``images/NAME.tif`` and ``masks/NAME.tif`` (instance labels, 0 background),
    paired by name, colour images turned into luminance; an ``index.csv`` (``id, modality,
    height, width``) splits a folder into groups (:func:`image_groups`); OME-Zarr images or
    plates with a label image (every field, timepoint and z plane is one 2D sample); simulated
    fields (:func:`pipeline.synthetic.simulate_field`, nuclear channel, several timepoints, seeds
    derived from the run seed). ``exclude`` removes held-out images by name (``t21.tif``) or by
    the end of their path (``gowt1/t21.tif``); :func:`grouped_holdout` draws such a split
    within every group.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from pipeline.errors import PipelineInputError
from pipeline.normalize import colour_to_grey

_TIFF_SUFFIXES = (".tif", ".tiff")


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


def matching_pattern(name: str, patterns: Sequence[str]) -> str | None:
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
        if matching_pattern(name, exclude):
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
            if matching_pattern(name, exclude):
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
