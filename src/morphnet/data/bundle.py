"""The container every data source returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset


class DataError(ValueError):
    """A ``--data`` value that cannot be loaded; the message says what to pass instead."""


class ImageReadError(DataError):
    """An image file that cannot be decoded. A DataLoader worker re-raises it in the main process
    with the worker's traceback as the message; the constructor keeps only the original line."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class TensorImages(Dataset):
    """Images held in memory as one tensor (uint8 or float) with integer labels.

    uint8 images are mapped to floats with ``(x / 255 - mean) / std`` on access, which keeps large
    generated sets at a quarter of the memory of float32. With ``size``, each image is resized
    (bilinear) to ``size`` x ``size`` on access, so memory stays that of the stored images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float = 0.0, std: float = 1.0,
                 size: int | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.mean = mean
        self.std = std
        self.size = size if size and tuple(images.shape[-2:]) != (size, size) else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.size is not None:
            x = torch.nn.functional.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                                                align_corners=False)[0]
        return (x - self.mean) / self.std, self.labels[index]


@dataclass
class DataBundle:
    """Train and test sets of one classification task, with what a seed network needs to know."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # one example, e.g. (C, H, W)
    val: Dataset | None = None  # held out of the training data (``with_validation``), when asked for

    def with_validation(self, fraction: float, seed: int = 0) -> "DataBundle":
        """The same task with ``fraction`` of the training examples (a fixed random draw from ``seed``)
        moved to a validation set that no step trains on."""
        n = len(self.train)
        held = int(round(n * fraction))
        if not 0 < held < n:
            raise DataError(f"{self.name}: --val-fraction {fraction} of {n} training examples leaves "
                            f"{held} for validation and {n - held} for training; choose a fraction that leaves both")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return DataBundle(self.name, Subset(self.train, order[held:]), self.test, self.num_classes, self.input_shape,
                          val=Subset(self.train, order[:held]))

    def example_inputs(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of real training examples, used to trace the model for analysis."""
        return torch.stack([self.train[i][0] for i in range(batch_size)])
