"""Data sources of the pipeline: embedded digits, generated images, folders, torchvision on disk."""

import struct

import numpy as np
import pytest
import torch

from morphnet.data import DataError, SyntheticImages, load_data


def test_digits_is_a_fixed_stratified_split_of_8x8_grey_images():
    a, b = load_data("digits"), load_data("digits")
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    x, y = a.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert torch.equal(a.test.images, b.test.images)
    assert sorted(set(a.test.labels.tolist())) == list(range(10))
    assert a.example_inputs(1).shape == (1, 1, 8, 8)


def test_synthetic_images_are_a_function_of_the_seed():
    g = SyntheticImages(seed=3)
    x1, y1 = g.sample(50, seed=7)
    x2, y2 = SyntheticImages(seed=3).sample(50, seed=7)
    x3, _ = SyntheticImages(seed=4).sample(50, seed=7)
    assert x1.shape == (50, 3, 32, 32) and x1.dtype == torch.uint8
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert set(y1.tolist()) <= set(range(10))


def test_synthetic_spec_sets_the_training_size():
    bundle = load_data("synthetic:300", seed=1)
    assert len(bundle.train) == 300 and bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    x, _ = bundle.train[0]
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1.0


def test_synthetic_spec_rejects_a_non_numeric_size():
    with pytest.raises(DataError, match="number of training images"):
        load_data("synthetic:many")


def _write_pngs(folder, classes=("cat", "dog"), per_class=5, size=(20, 12)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_image_folder_of_class_subfolders_is_split_and_resized(tmp_path):
    _write_pngs(tmp_path)
    bundle = load_data(str(tmp_path), image_size=16)
    assert bundle.num_classes == 2 and bundle.input_shape == (3, 16, 16)
    assert (len(bundle.train), len(bundle.test)) == (8, 2)


def test_image_folder_with_train_and_val_uses_them(tmp_path):
    _write_pngs(tmp_path / "train", per_class=3)
    _write_pngs(tmp_path / "val", per_class=2)
    bundle = load_data(str(tmp_path))
    assert (len(bundle.train), len(bundle.test)) == (6, 4) and bundle.input_shape == (3, 32, 32)


def test_missing_data_folder_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="does not exist.*digits, synthetic"):
        load_data(str(tmp_path / "nowhere"))


def _idx(path, array: np.ndarray):
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_dataset_already_on_disk_is_loaded_without_download(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 4)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    bundle = load_data(f"torchvision:MNIST:{tmp_path}")
    assert (len(bundle.train), len(bundle.test)) == (12, 4)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10


def test_torchvision_dataset_missing_on_disk_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="download it there first"):
        load_data(f"torchvision:MNIST:{tmp_path}")
    with pytest.raises(DataError, match="no dataset 'NoSuchSet'"):
        load_data(f"torchvision:NoSuchSet:{tmp_path}")
