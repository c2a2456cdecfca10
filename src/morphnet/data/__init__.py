"""Datasets for the MorphNet pipeline: built-in, generated, and the user's own on disk.

``load_data(spec)`` turns a ``--data`` string into a :class:`DataBundle` (train and test sets plus
the shape facts a seed network needs). Nothing here downloads: every source is local.
"""

from morphnet.data.bundle import DataBundle, DataError, ImageReadError, TensorImages
from morphnet.data.digits import load_digits_data
from morphnet.data.folders import load_image_folder, load_torchvision_dataset
from morphnet.data.resolve import DATA_HELP, default_data, load_data
from morphnet.data.synthetic import SyntheticImages, load_synthetic_data

__all__ = [
    "DATA_HELP",
    "DataBundle",
    "DataError",
    "ImageReadError",
    "SyntheticImages",
    "TensorImages",
    "default_data",
    "load_data",
    "load_digits_data",
    "load_image_folder",
    "load_synthetic_data",
    "load_torchvision_dataset",
]
