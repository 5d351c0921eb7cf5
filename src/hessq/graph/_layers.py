"""Finding the layers hessq quantizes, by module path: every module a weighted op family matches."""

from __future__ import annotations

from torch import nn

from hessq._errors import ConfigError
from hessq.ops import weighted_module_types


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantizable layer in ``model`` (Conv2d of any groups, Linear, and any registered weighted
    family's modules), keyed by module path, in definition order.

    The names are the ones used everywhere in hessq (``layer1.0.conv1``), and match
    the names of the quantized twins after :func:`hessq.quantize`.
    """
    types = weighted_module_types()
    layers: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        # a layer inside another (a deformable conv's offset branch) is part of it, not a layer of its own
        parts = name.split(".")
        if isinstance(m, types) and not any(".".join(parts[:i]) in layers for i in range(1, len(parts))):
            layers[name] = m
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no quantizable layer (hessq quantizes {', '.join(t.__name__ for t in types)}); "
            "nothing to analyse or quantize"
        )
    return layers
