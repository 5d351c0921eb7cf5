"""What the sub-commands share: naming a model on the command line."""

from __future__ import annotations

import argparse
import importlib

import torch
from torch import nn

BUNDLED = ("resnet20", "efficientnet_lite0")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet20",
                   help="a bundled model (resnet20, efficientnet_lite0) or 'package.module:factory' called with no arguments")
    p.add_argument("--checkpoint", help="a state_dict (.pt) to load into --model")


def load_model(spec: str, checkpoint: str | None = None, *, pretrained: bool = True) -> nn.Module:
    """A model by bundled name or ``package.module:factory``, in eval mode, with optional weights."""
    if spec in BUNDLED:
        from hessq import models

        model = getattr(models, spec)(pretrained=pretrained and checkpoint is None)
    else:
        if ":" not in spec:
            raise ValueError(f"--model must be one of {BUNDLED} or 'package.module:factory', got {spec!r}")
        mod_name, fn_name = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load model factory {spec!r}: {exc}") from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read the checkpoint {checkpoint}: {exc}") from exc
        model.load_state_dict(state)
    return model.eval()
