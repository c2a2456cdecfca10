"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of 3x3 basic blocks, 16/32/64 channels."""

from __future__ import annotations

from torch import nn

from morphnet.seeds.registry import register_seed


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual add; a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], widths[0]
        for stage, cout in enumerate(widths):
            stride = 1 if stage == 0 else 2
            layers.append(nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@register_seed
def resnet14(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-14 (0.18M parameters, 53 MFLOPs at 32x32, 13 MFLOPs at 16x16): the CPU benchmark's seed."""
    return CifarResNet(14, num_classes, in_channels, width)


@register_seed
def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-20 (0.27M parameters, 82 MFLOPs = 41M multiply-adds at 32x32)."""
    return CifarResNet(20, num_classes, in_channels, width)


@register_seed
def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-56 (0.86M parameters, 251 MFLOPs = 126M multiply-adds at 32x32)."""
    return CifarResNet(56, num_classes, in_channels, width)
