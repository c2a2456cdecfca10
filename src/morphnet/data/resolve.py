"""Turn a ``--data`` string into a DataBundle."""

from __future__ import annotations

from morphnet.data.bundle import DataBundle, DataError
from morphnet.data.digits import load_digits_data
from morphnet.data.folders import load_image_folder, load_torchvision_dataset
from morphnet.data.synthetic import load_synthetic_data

DATA_HELP = (
    "digits (default: scikit-learn's bundled 8x8 digits); synthetic[:N_TRAIN] (generated 3x32x32, "
    "10 classes); torchvision:NAME[:ROOT] (a torchvision dataset already on disk, ROOT default ./data); "
    "or PATH (a folder of class subfolders, or with train/ and val/ inside)"
)


def load_data(spec: str = "digits", *, seed: int = 0, image_size: int | None = None) -> DataBundle:
    """Load the dataset named by ``spec`` (see ``DATA_HELP``). ``seed`` fixes generated data and splits."""
    if spec == "digits":
        return load_digits_data(split_seed=seed)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        _, _, size = spec.partition(":")
        if size and not size.isdigit():
            raise DataError(f"'{spec}': the size after 'synthetic:' must be a number of training images")
        return load_synthetic_data(num_train=int(size) if size else 10000, seed=seed)
    if spec.startswith("torchvision:"):
        _, name, root = (spec.split(":", 2) + [""])[:3]
        return load_torchvision_dataset(name, root or "data", image_size=image_size)
    return load_image_folder(spec, image_size=image_size or 32, split_seed=seed)


__all__ = ["DATA_HELP", "DataError", "load_data"]
