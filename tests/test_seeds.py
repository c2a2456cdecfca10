"""Seed networks: the registry, the built-ins and outside models named by --model."""

import sys

import pytest
import torch

from morphnet.seeds import SeedError, create_seed, list_seeds, register_seed


@pytest.mark.parametrize("name, shape, params", [
    ("digits_cnn", (2, 1, 8, 8), 131_178),
    ("resnet14", (2, 3, 16, 16), 175_258),
    ("resnet20", (2, 3, 32, 32), 272_474),
    ("resnet56", (2, 3, 32, 32), 855_770),
])
def test_builtin_seeds_build_for_the_data_shape(name, shape, params):
    model = create_seed(name, num_classes=10, in_channels=shape[1])
    assert model(torch.randn(shape)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_builtin_seeds_follow_num_classes_and_width():
    model = create_seed("digits_cnn", num_classes=3, in_channels=1, width=0.5)
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 3)
    assert model.features[0][0].out_channels == 16
    assert {"digits_cnn", "resnet20", "resnet56"} <= set(list_seeds())


def test_registered_seed_is_created_by_name():
    @register_seed
    def tiny_test_seed(num_classes=10, in_channels=3):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * 4, num_classes))

    assert "tiny_test_seed" in list_seeds()
    assert create_seed("tiny_test_seed", num_classes=4, in_channels=1)(torch.randn(1, 1, 2, 2)).shape == (1, 4)


def test_torchvision_models_are_built_without_weights():
    model = create_seed("torchvision:resnet18", num_classes=7)
    assert model.fc.out_features == 7


def test_torchvision_model_rejects_grey_images():
    with pytest.raises(SeedError, match="3 input channels"):
        create_seed("torchvision:resnet18", in_channels=1)


def test_module_factory_gets_only_the_arguments_it_accepts(tmp_path, monkeypatch):
    (tmp_path / "my_seed_pkg.py").write_text(
        "import torch\n"
        "def build(num_classes):\n"
        "    return torch.nn.Linear(4, num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert create_seed("my_seed_pkg:build", num_classes=5, in_channels=1).out_features == 5
    sys.modules.pop("my_seed_pkg", None)


def test_file_factory_is_loaded_from_its_path(tmp_path):
    path = tmp_path / "net.py"
    path.write_text("import torch\ndef make(**kw):\n    return torch.nn.Linear(2, kw['num_classes'])\n")
    assert create_seed(f"{path}:make", num_classes=6).out_features == 6


@pytest.mark.parametrize("name, message", [
    ("no_such_seed", "unknown model 'no_such_seed'.*digits_cnn"),
    ("torchvision:no_such_net", "torchvision has no model"),
    ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
    ("os.path:no_such_factory", "has no callable 'no_such_factory'"),
])
def test_unknown_models_are_clear_errors(name, message):
    with pytest.raises(SeedError, match=message):
        create_seed(name)


def test_timm_models_are_built_or_ask_for_timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(SeedError, match="pip install timm"):
            create_seed("timm:resnet18")
    else:
        assert create_seed("timm:resnet18", num_classes=3).num_classes == 3
