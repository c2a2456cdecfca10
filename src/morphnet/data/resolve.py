"""Turn a ``--data`` string into a DataBundle."""

from __future__ import annotations

from morphnet.data.bundle import DataBundle, DataError
from morphnet.data.digits import load_digits_data
from morphnet.data.folders import load_image_folder, load_torchvision_dataset
from morphnet.data.synthetic import load_synthetic_data

DATA_HELP = (
    "digits (scikit-learn's bundled 8x8 digits; the default for built-in and your own models); "
    "synthetic[:N_TRAIN] (generated 3x32x32, 10 classes; the default for torchvision:/timm: models); "
    "torchvision:NAME[:ROOT] (a torchvision dataset already on disk, ROOT default ./data); "
    "or PATH (a folder of class subfolders, or with train/ and val/ inside)"
)

#: Model prefixes whose models take 3-channel images, so their default data is the generated set.
_THREE_CHANNEL_PREFIXES = ("torchvision:", "timm:")


def default_data(model: str) -> str:
    """The ``--data`` a model gets when none is given: the generated 3-channel set for
    torchvision and timm models (they take RGB), the 1-channel digits for everything else."""
    return "synthetic" if model.startswith(_THREE_CHANNEL_PREFIXES) else "digits"


def load_data(spec: str = "digits", *, seed: int = 0, image_size: int | None = None) -> DataBundle:
    """Load the dataset named by ``spec`` (see ``DATA_HELP``). ``seed`` fixes generated data and splits."""
    if spec == "digits":
        return load_digits_data(split_seed=seed, image_size=image_size)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        _, _, size = spec.partition(":")
        if size and not size.isdigit():
            raise DataError(f"'{spec}': the size after 'synthetic:' must be a number of training images")
        return load_synthetic_data(num_train=int(size) if size else 10000, seed=seed, image_size=image_size)
    if spec.startswith("torchvision:"):
        _, name, root = (spec.split(":", 2) + [""])[:3]
        return load_torchvision_dataset(name, root or "data", image_size=image_size)
    return load_image_folder(spec, image_size=image_size or 32, split_seed=seed)


__all__ = ["DATA_HELP", "DataError", "default_data", "load_data"]
