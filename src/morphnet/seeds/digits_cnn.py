"""The default seed: a small VGG-style CNN with BatchNorm, sized for 8x8 digits."""

from __future__ import annotations

from torch import nn

from morphnet.seeds.registry import register_seed


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU blocks (two at full resolution, two after a 2x2 max-pool), global
    average pooling and a linear classifier. Widths are deliberately generous so MorphNet has
    something to remove; ``width`` scales all of them."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        w = [max(1, int(round(c * width))) for c in (32, 64, 64, 128)]
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w[0]),
            _conv_bn_relu(w[0], w[1]),
            nn.MaxPool2d(2),
            _conv_bn_relu(w[1], w[2]),
            _conv_bn_relu(w[2], w[3]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(w[3], num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


@register_seed
def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> nn.Module:
    """The default seed network (about 6 MFLOPs per 8x8 image)."""
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, width=width)
