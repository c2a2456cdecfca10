"""A tiny Vision Transformer for CPU-sized images: torchvision's ``VisionTransformer``, random init.

MorphNet prunes its attention heads (the q / k / v rows of a head and the output projection's
columns that read it form one channel group) and its MLP hidden widths. The residual width is
normalized by LayerNorm and stays fixed, and there is no BatchNorm: learn it with
``--regularizer group-lasso`` (weight-group norms), not ``gamma``.
"""

from __future__ import annotations

from torch import nn

from morphnet.seeds.registry import register_seed


@register_seed
def vit_tiny(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
             num_layers: int = 4, num_heads: int = 4, hidden_dim: int = 64, mlp_dim: int = 256) -> nn.Module:
    """ViT with 4 blocks of 4 heads (head width 16), residual width 64, MLP 256 and 4x4 patches:
    65 tokens and 30 MFLOPs per 32x32 image (attention products included), 0.2M parameters.

    ``image_size`` is the data's (``morphnet run`` passes it); a grey input gets a 1-channel patch
    embedding."""
    from torchvision.models.vision_transformer import VisionTransformer

    if image_size % patch_size:
        raise ValueError(f"vit_tiny: image_size {image_size} is not a multiple of patch_size {patch_size}; "
                         "pass --image-size with a multiple of it")
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                              num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        nn.init.trunc_normal_(model.conv_proj.weight, std=(1.0 / (in_channels * patch_size**2)) ** 0.5)
        nn.init.zeros_(model.conv_proj.bias)
    return model
