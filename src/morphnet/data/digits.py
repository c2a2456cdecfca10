"""The embedded default dataset: scikit-learn's bundled 8x8 digits (no download)."""

from __future__ import annotations

import numpy as np
import torch

from morphnet.data.bundle import DataBundle, TensorImages


def load_digits_data(test_fraction: float = 0.2, split_seed: int = 0, image_size: int | None = None) -> DataBundle:
    """1797 grey 8x8 digit images (1x8x8 tensors, or upsampled to ``image_size``), split into
    train/test stratified by class.

    The split depends only on ``split_seed`` so that every run of every command sees the same test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    return DataBundle(
        name="digits",
        train=TensorImages(torch.from_numpy(x_train), torch.from_numpy(y_train), mean, std, size=image_size),
        test=TensorImages(torch.from_numpy(x_test), torch.from_numpy(y_test), mean, std, size=image_size),
        num_classes=10,
        input_shape=(1, image_size or 8, image_size or 8),
    )
