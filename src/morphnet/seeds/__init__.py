"""Seed networks: a timm-style registry of built-in models plus resolution of outside models.

``create_seed(name, num_classes=..., in_channels=...)`` accepts a registered name (``digits_cnn``,
``resnet20``, ``resnet56``, ``mobilenetv2_cifar``, ``vit_tiny``), ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory`` or
``path/to/file.py:factory``.
"""

from morphnet.seeds.registry import SeedError, create_seed, list_seeds, register_seed
from morphnet.seeds import cifar_mobilenet, cifar_resnet, digits_cnn, vit  # noqa: F401  (registers the built-in seeds)

__all__ = ["SeedError", "create_seed", "list_seeds", "register_seed"]
