"""A MobileNetV2-style network for small images (Sandler et al. 2018): inverted residual blocks
(1x1 expansion, 3x3 depthwise, 1x1 linear projection, residual add when the shape allows), with the
strides of the CIFAR variants (stride 1 stem, three downsamplings), so it works from 16x16 up."""

from __future__ import annotations

from torch import nn

from morphnet.seeds.registry import register_seed


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """expand (1x1, skipped when the ratio is 1) -> depthwise 3x3 -> project (1x1, no activation)."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_residual = stride == 1 and cin == cout
        layers = [] if expand_ratio == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """Stages of (expansion t, channels c, blocks n, stride s); ``width`` scales every channel count."""

    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 3, 2), (6, 96, 2, 1), (6, 160, 2, 2))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, stem: int = 32,
                 last: int = 640, stem_stride: int = 1):
        super().__init__()

        def scaled(c: int) -> int:
            return max(1, int(round(c * width)))

        cin = scaled(stem)
        blocks: list[nn.Module] = [_conv_bn(in_channels, cin, 3, stem_stride)]
        for t, c, n, s in self.STAGES:
            for i in range(n):
                blocks.append(InvertedResidual(cin, scaled(c), s if i == 0 else 1, t))
                cin = scaled(c)
        blocks.append(_conv_bn(cin, scaled(last), 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(scaled(last), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_seed
def mobilenetv2_cifar(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                      stem_stride: int = 1) -> nn.Module:
    """MobileNetV2-style (13 inverted residual blocks, 16-160 channels, last conv 640; 0.96M parameters,
    30 MFLOPs at 16x16, 119 MFLOPs at 32x32; ``stem_stride=2`` halves the resolution at the stem, a
    quarter of the FLOPs): the depthwise-separable seed of the compression benchmark."""
    return CifarMobileNetV2(num_classes, in_channels, width, stem_stride=stem_stride)
