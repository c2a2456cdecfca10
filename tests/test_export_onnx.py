"""Slim models export through torch.export and ONNX (ONNX checks skip when onnx is not installed)."""

import pytest
import torch
import torchvision

import morphnet

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def exported(request):
    torch.manual_seed(0)
    model = torchvision.models.get_model(request.param, num_classes=10).eval()
    reg = morphnet.GammaFlopsRegularizer(model, X, gamma_threshold=0.0)
    counts = morphnet.expand_structure(model, reg, X, 0.5, round_to=8)
    slim = morphnet.apply_structure(model, counts, X).eval()
    return slim, torch.export.export(slim, (X,))


def test_torch_export_of_a_slim_model_computes_the_same_outputs(exported):
    slim, program = exported
    with torch.no_grad():
        assert torch.allclose(program.module()(X), slim(X), atol=1e-6)


def test_onnx_export_of_a_slim_model_checks_and_computes_the_same_outputs(exported, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    slim, program = exported
    path = tmp_path / "slim.onnx"
    torch.onnx.export(program, (X,), str(path), dynamo=True, verbose=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    got = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: X.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), slim(X), atol=1e-5)
