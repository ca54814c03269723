"""Datasets for the VAE experiments (``dataset=`` group, :mod:`nfvi.data.images`): binarized 28x28 images and
8-bit CIFAR-10 (:mod:`nfvi.data.cifar`).

Importing this package registers the ``base_dataset`` schema in Hydra's ConfigStore.
"""

from __future__ import annotations

from nfvi.data.images import (
    ALL_DATASETS,
    COLOR_DATASETS,
    DATASETS,
    DatasetConfig,
    ImageData,
    binarize,
    load_dataset,
    split_generator,
)

__all__ = [
    "ALL_DATASETS",
    "COLOR_DATASETS",
    "DATASETS",
    "DatasetConfig",
    "ImageData",
    "binarize",
    "load_dataset",
    "split_generator",
]
