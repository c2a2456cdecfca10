"""The seed registry and the ``--model`` resolver."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from torch import nn

SeedFactory = Callable[..., nn.Module]
_SEEDS: dict[str, SeedFactory] = {}


class SeedError(ValueError):
    """A ``--model`` value that does not name a model; the message lists what is accepted."""


def register_seed(factory: SeedFactory) -> SeedFactory:
    """Decorator: make ``factory`` available to ``create_seed`` under its function name."""
    _SEEDS[factory.__name__] = factory
    return factory


def list_seeds() -> list[str]:
    """Names of the built-in seed networks."""
    return sorted(_SEEDS)


def _call_with_supported(factory: Callable[..., nn.Module], kwargs: dict) -> nn.Module:
    """Call ``factory`` with the subset of ``kwargs`` its signature accepts."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in params})


def takes_image_size(name: str) -> bool:
    """Whether the built-in seed ``name`` has an ``image_size`` parameter (``vit_tiny``): such seeds
    are built for the data's size."""
    factory = _SEEDS.get(name)
    try:
        return factory is not None and "image_size" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _load_factory(target: str, name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = target.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise SeedError(f"model file '{path}' does not exist")
            spec = importlib.util.spec_from_file_location(f"morphnet_user_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise SeedError(f"cannot import '{module_name}' for model '{name}': {error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SeedError(f"'{module_name}' has no callable '{attr}' (model '{name}')")
    return factory


def create_seed(name: str, *, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the seed network ``name`` for ``num_classes`` outputs and ``in_channels`` inputs.

    Outside factories receive ``num_classes`` / ``in_channels`` / extra ``kwargs`` only when their
    signature accepts them. Weights are never downloaded: torchvision and timm models start random.
    """
    options = dict(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name in _SEEDS:
        return _SEEDS[name](**options)
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if arch not in torchvision.models.list_models():
            raise SeedError(f"torchvision has no model '{arch}'; see torchvision.models.list_models()")
        if in_channels != 3:
            raise SeedError(f"torchvision model '{arch}' takes 3 input channels, the data has {in_channels}")
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as error:
            raise SeedError(f"model '{name}' needs timm: pip install timm") from error
        arch = name.split(":", 1)[1]
        if arch not in timm.list_models():
            raise SeedError(f"timm has no model '{arch}'; see timm.list_models()")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    if ":" in name:
        return _call_with_supported(_load_factory(name, name), options)
    raise SeedError(
        f"unknown model '{name}'; use a built-in seed ({', '.join(list_seeds())}), "
        "torchvision:NAME, timm:NAME, package.module:factory or path/to/file.py:factory"
    )
