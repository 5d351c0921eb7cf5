"""What the sub-commands share: naming a model on the command line."""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from hessq._checks import check_int, check_number
from hessq._errors import ArtifactError, ConfigError, ModelError
from hessq._io import load_torch_safely

BUNDLED = ("resnet20", "efficientnet_lite0")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet20",
                   help="a bundled model (resnet20, efficientnet_lite0; minilm-bbc, minilm-tweets and codenet bring their "
                        "own data), a Hugging Face model folder as hf:<folder>, or 'package.module:factory' called with "
                        "no arguments")
    p.add_argument("--checkpoint", help="a state_dict (.pt) to load into --model")


def check_readable(path: str | os.PathLike, option: str) -> Path:
    """``path`` when it is a readable file; a :class:`ConfigError` naming ``option`` otherwise (checked before any work)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give the file inside it")
    if not path.is_file():
        raise ConfigError(f"{option} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {path} is not readable (permissions); fix them or give another file")
    return path


def parse_ints(text: str, what: str) -> list[int]:
    """``"4,8"`` as ``[4, 8]``; an error naming the option otherwise."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


def shown(value: Any) -> str:
    """A default as it is typed on the command line: ``(4, 8)`` as ``4,8``, None as ``none``."""
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(shown(v) for v in value) or "none"
    return str(value)


def add_config_flag(p: argparse.ArgumentParser, flag: str | tuple[str, ...], config: type, field: str, *, help: str,
                    **kwargs: Any) -> None:
    """``flag`` (or several spellings) for ``config``'s ``field`` (a :mod:`hessq.pipeline` config): its default
    is the config's own, so the command line and the Python API never disagree, and the help shows it."""
    default = config.defaults()[field]
    if kwargs.get("action") not in ("store_true", "store_false"):
        help = f"{help} (default {shown(default).replace('%', '%%')})"
        if "choices" not in kwargs:
            kwargs.setdefault("metavar", field.upper())
    p.add_argument(*((flag,) if isinstance(flag, str) else flag), default=default, help=help, **kwargs)


def load_model(spec: str, checkpoint: str | None = None, *, pretrained: bool = True) -> nn.Module:
    """A model by bundled name or ``package.module:factory``, in eval mode, with optional weights."""
    if spec in BUNDLED:
        from hessq import models

        model = getattr(models, spec)(pretrained=pretrained and checkpoint is None)
    else:
        if ":" not in spec:
            raise ConfigError(f"--model must be one of {BUNDLED} or 'package.module:factory', got {spec!r}")
        mod_name, fn_name = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load model factory {spec!r}: {exc}") from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        check_readable(checkpoint, "--checkpoint")
        state = load_torch_safely(checkpoint, what="model checkpoint",
                                  remedy="give --checkpoint a state_dict saved with torch.save(model.state_dict(), path)")
        if not isinstance(state, dict):
            raise ArtifactError(f"--checkpoint {checkpoint} holds a {type(state).__name__}, not a state_dict; save "
                              "model.state_dict() with torch.save")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
            raise ModelError(f"--checkpoint {checkpoint} does not fit --model {spec}: {exc}") from None
    return model.eval()


# --- data-free inputs: the shared `--data` option and ZeroQ distillation ------------------

if TYPE_CHECKING:  # imported lazily below, so `hessq --help` stays fast
    from hessq.distill import DistilledData

#: One sample's input shape for each bundled model (distillation needs it; a user model must give it).
BUNDLED_INPUT_SHAPES = {"resnet20": (1, 28, 28), "efficientnet_lite0": (3, 224, 224)}
#: Valid preprocessed pixel range per bundled model: distilled pixels outside it would stretch the ranges.
BUNDLED_INPUT_RANGES = {"efficientnet_lite0": (-127 / 128, 1.0)}


def parse_input_shape(text: str | None, spec: str) -> tuple[int, ...]:
    """``--input-shape C,H,W`` as a tuple; the bundled model's shape when not given."""
    if text is None:
        if spec not in BUNDLED_INPUT_SHAPES:
            raise ConfigError(
                f"--input-shape is needed for --model {spec}: hessq cannot know the input of a model that is not "
                "bundled; give one sample's shape without the batch dimension, e.g. --input-shape 3,224,224"
            )
        return BUNDLED_INPUT_SHAPES[spec]
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--input-shape must be comma-separated sizes like 3,224,224, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"--input-shape must be positive sizes like 3,224,224, got {text!r}")
    return shape


def check_data_options(args: argparse.Namespace) -> None:
    """The options :func:`add_data_argument` adds, checked before any model is loaded."""
    if args.data not in ("fashion-mnist", "none"):
        check_readable(args.data, "--data")
    if args.input_shape is not None:
        parse_input_shape(args.input_shape, args.model)
    check_int(args.distilled_samples, "--distilled-samples", low=1, allow_none=True)
    check_int(args.distill_steps, "--distill-steps", low=0, allow_none=True)
    check_number(args.distill_label_weight, "--distill-label-weight", low=0, allow_none=True)


def add_data_argument(p: argparse.ArgumentParser, *, purpose: str) -> None:
    """``--data fashion-mnist|none|FILE.pt`` plus the knobs of the distillation ``none`` runs."""
    p.add_argument("--data", default="fashion-mnist", metavar="fashion-mnist|none|FILE.pt",
                   help=f"{purpose}: Fashion-MNIST training images (default); 'none' for ZeroQ data distilled from "
                        "the model's BatchNorm statistics (no data at all); or a file written by `hessq distill`")
    p.add_argument("--input-shape", help="one sample's shape for --data none, e.g. 3,32,32 (default: the bundled model's; "
                                         "required for a model given as package.module:factory)")
    from hessq.pipeline import DistillConfig

    add_config_flag(p, "--distilled-samples", DistillConfig, "num_samples", type=int, help="inputs distilled for --data none")
    add_config_flag(p, "--distill-steps", DistillConfig, "steps", type=int, help="Adam steps of the distillation for --data none")
    add_config_flag(p, "--distill-label-weight", DistillConfig, "label_weight", type=float,
                    help="for --data none: weight of a cross-entropy term towards random classes (0 = plain ZeroQ; "
                         "1 gave EfficientNet-Lite0 ~0.6 points more W8A8 agreement on average, bench/results/zeroq_sweep.md)")


def load_distilled(args: argparse.Namespace, model: nn.Module, *, progress: bool = True) -> DistilledData | None:
    """The distilled data that ``--data`` names (distilled now for ``none``, read for a file); None for Fashion-MNIST.

    Returns a :class:`hessq.distill.DistilledData` whose ``meta["source"]`` says where it came from.
    """
    from hessq.distill import DistilledData, distill_data
    from hessq.pipeline import DistillConfig

    if args.data == "fashion-mnist":
        return None
    if args.data == "none":
        shape = parse_input_shape(args.input_shape, args.model)
        data = distill_data(model, args.distilled_samples, shape, steps=args.distill_steps, seed=args.seed,
                            lr=DistillConfig.defaults()["lr"], batch_size=DistillConfig.defaults()["batch_size"],
                            progress=progress, input_range=BUNDLED_INPUT_RANGES.get(args.model),
                            label_weight=args.distill_label_weight)
        data.meta.update(model=args.model, source="distilled now")
        print(f"distilled {data.num_samples} inputs of shape {shape} in {data.seconds:.1f}s: statistics loss "
              f"{data.initial_loss:.4g} (noise) -> {data.loss:.4g}")
        return data
    path = Path(args.data)
    if not path.is_file():
        raise ConfigError(f"--data {args.data}: no such file; give fashion-mnist, none, or a file written by `hessq distill`")
    data = DistilledData.load(path)  # an unreadable or damaged file is an ArtifactError naming it
    # A file distilled for another input shape would fail deep in the forward pass: say so here.
    expected = parse_input_shape(args.input_shape, args.model) if args.input_shape or args.model in BUNDLED_INPUT_SHAPES else None
    got = tuple(data.inputs.shape[1:])
    if expected is not None and got != tuple(expected):
        raise ConfigError(f"{path} holds inputs of shape {got}, but --model {args.model} takes {tuple(expected)}")
    data.meta["source"] = str(path)
    return data
