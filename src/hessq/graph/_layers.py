"""Finding the layers hessq quantizes, by module path."""

from __future__ import annotations

from torch import nn

from hessq._errors import ConfigError

#: Module types that get quantized twins (weights quantized, input activations quantized).
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d (any groups) and Linear in ``model``, keyed by module path, in definition order.

    The names are the ones used everywhere in hessq (``layer1.0.conv1``), and match
    the names of the quantized twins after :func:`hessq.quantize`.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)}
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no quantizable layer (hessq quantizes nn.Conv2d and nn.Linear); "
            "nothing to analyse or quantize"
        )
    return layers
