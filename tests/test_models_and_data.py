"""Models and data that fit together: defaults for RGB models, --image-size everywhere, models
with a fixed input size, unreadable images, errors in the user's code, and a group-lasso
threshold that no freshly initialized channel falls below."""

import textwrap

import pytest
import torch
import torchvision

import morphnet
from morphnet.cli.main import main
from morphnet.data import DataError, load_data
from morphnet.pipeline import RunConfig, make_regularizer

FIXED_SIZE_MODEL = '''
import torch.nn as nn

class PatchEmbed(nn.Module):
    def __init__(self, img_size):
        super().__init__()
        self.img_size, self.strict_img_size = (img_size, img_size), True
        self.proj = nn.Conv2d(3, 8, 4, 4)

    def forward(self, x):
        assert tuple(x.shape[-2:]) == self.img_size, f"input {tuple(x.shape[-2:])} is not {self.img_size}"
        return self.proj(x)

class Net(nn.Module):
    def __init__(self, num_classes, img_size):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size)
        self.head = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, num_classes))

    def forward(self, x):
        return self.head(self.patch_embed(x))

def build(num_classes=10, img_size=16):
    return Net(num_classes, img_size)
'''

BROKEN_MODEL = '''
import torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x) * (1 / 0)

def build():
    return Net()

def factory_fails():
    raise RuntimeError("no weights here")
'''


def test_rgb_models_default_to_the_generated_rgb_set_and_cost_runs_without_data(capsys):
    assert RunConfig(model="torchvision:resnet18").data == "synthetic"
    assert RunConfig(model="timm:resnet18").data == "synthetic" and RunConfig().data == "digits"
    assert main(["cost", "--model", "torchvision:resnet18"]) == 0
    out = capsys.readouterr().out
    assert "one 3x32x32 input of synthetic:10000 (batch 1)" in out and "latency_ns on V100" in out


@pytest.mark.parametrize("spec, channels", [("digits", 1), ("synthetic:20", 3)])
def test_image_size_is_honoured_by_the_built_in_sets(spec, channels):
    data = load_data(spec, image_size=20)
    assert data.input_shape == (channels, 20, 20)
    assert data.train[0][0].shape == data.test[0][0].shape == (channels, 20, 20)


def test_a_model_with_a_fixed_input_size_gets_its_size_or_a_one_line_error(tmp_path, capsys):
    model = tmp_path / "fixed.py"
    model.write_text(FIXED_SIZE_MODEL)
    assert main(["cost", "--model", f"{model}:build", "--data", "synthetic:20"]) == 0
    captured = capsys.readouterr()
    assert "one 3x16x16 input" in captured.out and "takes 16x16 images" in captured.err
    assert main(["cost", "--model", f"{model}:build", "--data", "synthetic:20", "--image-size", "24"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image-size 16" in err


def test_timm_vision_transformer_takes_its_size_from_its_config_or_is_built_for_image_size():
    pytest.importorskip("timm")  # the same logic on a fake model runs in the test above
    from morphnet.pipeline.session import prepare_model_and_data

    cfg = RunConfig(model="timm:vit_tiny_patch16_224", data="synthetic:20")
    data, kwargs = prepare_model_and_data(cfg, log=lambda message: None)
    assert cfg.image_size == 224 and data.input_shape == (3, 224, 224) and kwargs == {}
    cfg = RunConfig(model="timm:vit_tiny_patch16_224", data="synthetic:20", image_size=32)
    data, kwargs = prepare_model_and_data(cfg, log=lambda message: None)
    assert data.input_shape == (3, 32, 32) and kwargs == {"img_size": 32}


def _image_folder(root, corrupt: bool):
    from PIL import Image

    for split in ("train", "val"):
        for label, colour in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (12, 12), colour).save(folder / f"{i}.png")
    if corrupt:
        (root / "train" / "b" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")


def test_a_corrupt_image_is_an_error_naming_the_file_before_the_run_folder_is_made(tmp_path, capsys):
    _image_folder(tmp_path / "images", corrupt=True)
    assert main(["learn", "--data", str(tmp_path / "images"), "--steps", "2", "--batch-size", "2",
                 "--image-size", "8", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "zz_broken.png" in err and "delete or replace" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # every header is opened before anything is written
    with pytest.raises(DataError, match="zz_broken.png"):
        load_data(str(tmp_path / "images"), image_size=8)


def test_an_image_broken_past_its_header_stops_the_run_naming_it_and_resume_continues(tmp_path, capsys):
    """A truncated file opens (its header is fine) and fails only when a batch decodes it: the
    error names it and says how to go on; once it is replaced, --resume finishes the run."""
    from PIL import Image

    _image_folder(tmp_path / "images", corrupt=False)
    broken = tmp_path / "images" / "train" / "b" / "zz_truncated.png"
    Image.new("RGB", (12, 12), (0, 0, 250)).save(broken)
    broken.write_bytes(broken.read_bytes()[:45])  # the header and the start of the pixel data
    out = tmp_path / "run"
    argv = ["learn", "--data", str(tmp_path / "images"), "--steps", "10", "--batch-size", "4", "--image-size", "8",
            "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read image '{broken}'" in err
    assert f"`morphnet learn --resume --out {out}` continues it" in err and (out / "config.json").is_file()
    Image.new("RGB", (12, 12), (0, 0, 250)).save(broken)
    assert main(["learn", "--resume", "--out", str(out), "--quiet"]) == 0
    assert (out / "summary.json").is_file()


def test_an_error_in_the_users_forward_or_factory_names_its_line_and_debug_shows_the_traceback(tmp_path, capsys):
    model = tmp_path / "broken.py"
    model.write_text(textwrap.dedent(BROKEN_MODEL))
    assert main(["cost", "--model", f"{model}:build"]) == 2
    err = capsys.readouterr().err
    assert f"{model}:10, in forward" in err and "ZeroDivisionError" in err and "--debug" in err
    assert err.count("\n") == 1
    assert main(["learn", "--model", f"{model}:factory_fails", "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: no weights here" in err and f"{model}:16, in factory_fails" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(RuntimeError, match="no weights here"):
        main(["cost", "--model", f"{model}:factory_fails", "--debug"])


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_no_channel_of_a_freshly_initialized_torchvision_model_is_dead_under_the_default_threshold(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    widths = {row["name"]: row["channels"] for row in morphnet.cost_table(model, x)}
    reg = make_regularizer("group-lasso", "flops", model, x)
    assert reg.alive_counts() == {k: widths[k] for k in reg.alive_counts()}
    assert float(reg.get_cost()) == pytest.approx(morphnet.compute_cost(model, x, resource="flops"))
    if name == "mobilenet_v3_small":  # why the threshold is relative: an absolute 1e-2 kills half a layer
        absolute = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-2)
        assert absolute.alive_counts()["classifier.0"] < widths["classifier.0"] * 0.6
