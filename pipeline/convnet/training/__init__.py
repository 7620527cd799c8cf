"""Train the nuclear segmentation U-Net from images and instance masks.

- :mod:`.recipe`: hyper-parameters (:class:`TrainingConfig`) and recipe files;
- :mod:`.data`: reading image/mask pairs (TIFF folders, OME-Zarr, simulated fields) and the
  grouped validation split;
- :mod:`.crops`: normalisation as inference does it, targets, random crops and augmentation;
- :mod:`.loop`: loss, validation, schedule and :func:`train`.
"""

from pipeline.convnet.training.crops import (
    AUGMENTATIONS,
    CropSampler,
    PreparedImage,
    prepare_image,
    render_crop,
    rescale_labels,
    targets_from_labels,
    unannotated_mask,
)
from pipeline.convnet.training.data import (
    LabelledImage,
    grouped_holdout,
    image_groups,
    load_image_folder,
    load_simulated,
    load_zarr,
    matching_pattern,
    simulated_seeds,
)
from pipeline.convnet.training.loop import class_weights, train
from pipeline.convnet.training.recipe import TrainingConfig, read_name_list, read_training_recipe

__all__ = [
    "AUGMENTATIONS",
    "CropSampler",
    "LabelledImage",
    "PreparedImage",
    "TrainingConfig",
    "class_weights",
    "grouped_holdout",
    "image_groups",
    "load_image_folder",
    "load_simulated",
    "load_zarr",
    "matching_pattern",
    "prepare_image",
    "read_name_list",
    "read_training_recipe",
    "render_crop",
    "rescale_labels",
    "simulated_seeds",
    "targets_from_labels",
    "train",
    "unannotated_mask",
]
