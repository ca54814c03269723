"""Datasets: binarized 28x28 images for the VAE experiments (``dataset=`` group, :mod:`nfvi.data.images`).

Importing this package registers the ``base_dataset`` schema in Hydra's ConfigStore.
"""

from __future__ import annotations

from nfvi.data.images import DATASETS, DatasetConfig, ImageData, binarize, load_dataset, split_generator

__all__ = ["DATASETS", "DatasetConfig", "ImageData", "binarize", "load_dataset", "split_generator"]
