"""The user's own data on disk: image folders and torchvision datasets already downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from morphnet.data.bundle import DataBundle, DataError, ImageReadError


def _image_transform(image_size: int | None):
    from torchvision import transforms

    steps = []
    if image_size:
        steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    steps += [transforms.ToTensor(), transforms.Normalize(0.5, 0.25)]
    return transforms.Compose(steps)


def read_image(path: str):
    """Open one image as RGB; an unreadable file raises ``ImageReadError`` naming it."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as error:  # PIL raises several types for broken files
        raise ImageReadError(f"cannot read image '{path}' ({type(error).__name__}: {error}); "
                             "delete or replace the file") from None


def check_headers(root: Path, *folders) -> None:
    """Open the header of every image of ``folders`` (ImageFolders; no pixels are decoded, so it
    is quick), so that a file that is no image fails before a run starts, named, instead of
    mid-run. Pixel data broken further in (a truncated file) still fails when first read."""
    from PIL import Image

    bad = []
    for folder in folders:
        for path, _ in folder.samples:
            try:
                with Image.open(path):
                    pass
            except Exception as error:  # PIL raises several types for broken files
                bad.append(f"'{path}' ({type(error).__name__})")
    if bad:
        raise ImageReadError(f"{len(bad)} file(s) under '{root}' cannot be read as images: {', '.join(bad[:5])}"
                             f"{', ...' if len(bad) > 5 else ''}; delete or replace them")


def _bundle(name: str, train: Dataset, test: Dataset, num_classes: int) -> DataBundle:
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"data '{name}' has an empty train or test split; add images to both")
    shape = tuple(train[0][0].shape)
    return DataBundle(name=name, train=train, test=test, num_classes=num_classes, input_shape=shape)


def load_image_folder(
    root: str | Path, image_size: int | None = 32, test_fraction: float = 0.2, split_seed: int = 0
) -> DataBundle:
    """A folder of class subfolders (``root/<class>/*.png``), or ``root/train`` + ``root/val``
    (or ``root/test``) each holding class subfolders. Without a split, ``test_fraction`` of the
    images, chosen by ``split_seed``, are held out. Images are resized to ``image_size`` squared.
    Every file's header is opened here (``check_headers``).
    """
    from torchvision.datasets import ImageFolder

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data folder '{root}' does not exist; pass digits, synthetic, "
            "torchvision:NAME:ROOT, or a folder with one subfolder of images per class"
        )
    transform = _image_transform(image_size)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    try:
        if (root / "train").is_dir() and test_dir is not None:
            train = ImageFolder(root / "train", transform=transform, loader=read_image)
            test = ImageFolder(test_dir, transform=transform, loader=read_image)
            check_headers(root, train, test)
            return _bundle(str(root), train, test, len(train.classes))
        full = ImageFolder(root, transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(f"cannot read images under '{root}': {error}") from error
    check_headers(root, full)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(split_seed)).tolist()
    cut = max(1, int(round(len(full) * test_fraction)))
    return _bundle(str(root), Subset(full, order[cut:]), Subset(full, order[:cut]), len(full.classes))


def load_torchvision_dataset(name: str, root: str | Path, image_size: int | None = None) -> DataBundle:
    """``torchvision.datasets.<name>`` found under ``root`` (never downloaded), e.g. CIFAR10, MNIST.

    Datasets with ``train=True/False`` and those with ``split="train"/"test"`` are both accepted.
    """
    import torchvision.datasets as datasets

    cls = getattr(datasets, name, None)
    if not isinstance(cls, type):
        raise DataError(f"torchvision.datasets has no dataset '{name}'; check the spelling (e.g. CIFAR10, MNIST)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist; download {name} there first (no download at run time)")
    transform = _image_transform(image_size)
    try:
        try:
            train = cls(root, train=True, transform=transform, download=False)
            test = cls(root, train=False, transform=transform, download=False)
        except TypeError:
            train = cls(root, split="train", transform=transform, download=False)
            test = cls(root, split="test", transform=transform, download=False)
    except (RuntimeError, FileNotFoundError, OSError) as error:
        raise DataError(f"{name} is not under '{root}' ({error}); download it there first") from error
    classes = getattr(train, "classes", None)
    num_classes = len(classes) if classes else int(max(int(train[i][1]) for i in range(len(train)))) + 1
    return _bundle(f"torchvision:{name}", train, test, num_classes)
