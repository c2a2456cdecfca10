"""save_slim / load_slim: structure JSON + state dict, no pickled code, round trip."""

import json

import pytest
import torch
import torchvision

import morphnet
from morphnet.surgery.io import STRUCTURE_FILE, WEIGHTS_FILE
from nets import ConcatNet

X = torch.randn(1, 3, 17, 19)


def trained_slim():
    model = ConcatNet().eval()
    reg = morphnet.GammaFlopsRegularizer(model, X, gamma_threshold=0.45)
    slim = morphnet.apply_structure(model, reg, X, keep_weights=True)
    with torch.no_grad():  # "retraining" moves every weight and statistic
        for t in slim.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))
    return slim.eval(), reg


def test_round_trip_restores_architecture_weights_and_outputs(tmp_path):
    slim, reg = trained_slim()
    morphnet.save_slim(tmp_path, slim, reg)
    loaded = morphnet.load_slim(ConcatNet, tmp_path, X).eval()
    assert type(loaded) is ConcatNet and loaded.conv1.out_channels == 7
    assert slim.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(slim.state_dict().values(), loaded.state_dict().values()))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(slim(X), loaded(X)))


def test_files_are_the_exporter_json_and_a_tensor_only_state_dict(tmp_path):
    slim, reg = trained_slim()
    morphnet.save_slim(tmp_path, slim, morphnet.StructureExporter(reg).get_alive_counts())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STRUCTURE_FILE, WEIGHTS_FILE])
    assert json.loads((tmp_path / STRUCTURE_FILE).read_text()) == {"conv1": 7, "conv2": 11, "conv3": 10, "conv4": 17}
    state = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def seed():
    return torchvision.models.resnet18(num_classes=10)


def test_expanded_resnet_round_trip(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    counts = morphnet.expand_structure(seed(), {"layer1.0.conv1": 16, "layer3.1.conv1": 300}, x, 1.0, round_to=8)
    slim = morphnet.apply_structure(seed(), counts, x).eval()
    morphnet.save_slim(tmp_path / "slim", slim, counts)
    loaded = morphnet.load_slim(seed, tmp_path / "slim", x).eval()
    assert loaded.layer3[1].conv1.out_channels == 304
    with torch.no_grad():
        assert torch.equal(slim(x), loaded(x))


def test_load_errors_name_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=STRUCTURE_FILE):
        morphnet.load_slim(ConcatNet, tmp_path, X)
    slim, reg = trained_slim()
    morphnet.save_slim(tmp_path, slim, reg)
    (tmp_path / STRUCTURE_FILE).write_text(json.dumps({"conv1": 5}))
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} do not fit"):
        morphnet.load_slim(ConcatNet, tmp_path, X)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable state dict"):
        morphnet.load_slim(ConcatNet, tmp_path, X)
    with pytest.raises(TypeError, match="must return an nn.Module"):
        morphnet.load_slim(lambda: None, tmp_path, X)
