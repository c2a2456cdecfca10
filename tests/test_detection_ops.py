"""Ops met in detection and segmentation models: handled (mapped or kept fixed), never refused."""

import torch
import torchvision
from torch import nn

import morphnet


class RoiHead(nn.Module):
    """Features -> RoIAlign on fixed boxes -> flatten -> linear; scores ranked with topk along boxes."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 2 * 2, 4)
        self.register_buffer("boxes", torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [0, 2.0, 2.0, 7.0, 7.0]]))

    def forward(self, x):
        f = torch.relu(self.bn(self.conv(x)))
        r = torchvision.ops.roi_align(f, self.boxes, output_size=2)
        scores = self.fc(r.flatten(1))
        return scores.topk(1, dim=0).values


def test_roi_align_passes_channels_and_topk_along_boxes_keeps_them():
    model = RoiHead()
    x = torch.randn(1, 3, 8, 8)
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=1e-3)
    assert set(morphnet.StructureExporter(reg).get_alive_counts()) == {"conv"}
    with torch.no_grad():
        model.bn.weight[[1, 4]] = 0
        model.bn.bias[[1, 4]] = 0
    slim = morphnet.apply_structure(model.eval(), reg, x, keep_weights=True)
    assert slim.conv.out_channels == 4 and slim.fc.in_features == 16
    with torch.no_grad():
        assert torch.allclose(slim.eval()(x), model(x), atol=1e-5)


class CachesAnchors(nn.Module):
    """Like torchvision's AnchorGenerator: forward replaces a plain tensor attribute with a moved copy."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.cells = [torch.ones(2)]

    def forward(self, x):
        self.cells = [c.to(x.device) for c in self.cells]
        return self.conv(x) * self.cells[0].sum()


def test_analysis_leaves_plain_tensor_attributes_as_found():
    model = CachesAnchors()
    morphnet.GroupLassoFlopsRegularizer(model, torch.randn(1, 3, 4, 4), threshold=0.0, prune_outputs=True)
    assert model.cells[0].device.type == "cpu" and model(torch.randn(1, 3, 4, 4)).shape == (1, 4, 4, 4)


class ImageList(nn.Module):
    """Takes a list of [C, H, W] images and their targets, as torchvision's detection models do; its
    second BatchNorm sees a 1x1 map, so training mode needs two images."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, images, targets=None):
        assert targets is None or len(targets) == len(images), "one target per image"
        x = torch.relu(self.bn1(self.conv1(torch.stack(images))))
        x = torch.relu(self.bn2(self.conv2(nn.functional.adaptive_avg_pool2d(x, 1))))
        return self.head(x.flatten(1))


def test_a_list_of_images_counts_one_example_per_image_and_doubles_images_with_targets():
    from torch.utils.flop_counter import FlopCounterMode

    model = ImageList()
    images = [torch.randn(3, 6, 5)]
    targets = [{"labels": torch.tensor([1])}]
    reg = morphnet.GammaFlopsRegularizer(model, (images, targets), gamma_threshold=1e-3)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(images * 4)
    assert reg.get_cost().item() == counter.get_total_flops() / 4 == 2 * (3 * 9 * 8 * 30 + 8 * 6 + 6 * 2)
    with torch.no_grad():
        model.bn1.weight[[0, 5]] = 0
        model.bn1.bias[[0, 5]] = 0
    slim = morphnet.apply_structure(model.eval(), reg, (images, targets), keep_weights=True).eval()
    assert slim.conv1.out_channels == 6
    with torch.no_grad():
        assert torch.allclose(slim(images * 3), model(images * 3), atol=1e-6)
