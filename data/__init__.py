"""Data for a search: metadata readers, label policy, grouped splits, image cache, balancing, download.

``data.augment`` (Albumentations presets) and ``data.pipeline`` (the ``tf.data`` input pipeline) are not
imported here, because they load Albumentations and TensorFlow. ``data.storage`` (run folders on a local disk or
in object storage, through ``pyarrow.fs``) is imported by the ``search`` and ``results`` packages directly.
"""

from data.balancing import BALANCING_METHODS, BalancedRows, balance_rows
from data.cache import ImageCache, build_image_cache, open_image_cache
from data.metadata import LAYOUTS, DataError, LabelledDataset, load_dataset
from data.splits import SPLITS, SplitFractions, assign_folds, assign_splits, read_manifest, write_manifest

__all__ = ["BALANCING_METHODS", "LAYOUTS", "SPLITS", "BalancedRows", "DataError", "ImageCache", "LabelledDataset",
           "SplitFractions", "assign_folds", "assign_splits", "balance_rows", "build_image_cache", "load_dataset",
           "open_image_cache", "read_manifest", "write_manifest"]
