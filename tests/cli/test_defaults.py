"""Every command-line default equals the config default of the Python API: one place for each default."""

from __future__ import annotations

import argparse

import pytest

import hessq
from hessq.cli import build_parser
from hessq.cli._compress import CONFIG_FLAGS, configs_from_args
from hessq.pipeline import CONFIG_ARGUMENTS

# Flags of the stage commands that set the same thing as a config field: (command, dest, config, field).
STAGE_FLAGS = [
    ("analyze", "rtol", hessq.SensitivityConfig, "rtol"),
    ("analyze", "max_samples", hessq.SensitivityConfig, "max_samples"),
    ("analyze", "min_samples", hessq.SensitivityConfig, "min_samples"),
    *[(command, dest, hessq.DistillConfig, field) for command in ("analyze", "quantize")
      for dest, field in (("distilled_samples", "num_samples"), ("distill_steps", "steps"),
                          ("distill_label_weight", "label_weight"))],
    ("distill", "num_samples", hessq.DistillConfig, "num_samples"),
    ("distill", "steps", hessq.DistillConfig, "steps"),
    ("distill", "lr", hessq.DistillConfig, "lr"),
    ("distill", "batch_size", hessq.DistillConfig, "batch_size"),
    ("distill", "label_weight", hessq.DistillConfig, "label_weight"),
    ("plan", "act_bits", hessq.PlanConfig, "act_bits"),
    ("plan", "pin_first_last", hessq.PlanConfig, "pin_first_last"),
    ("plan", "curvature", hessq.PlanConfig, "curvature"),
    ("quantize", "calibration_batches", hessq.QuantizeConfig, "calibration_batches"),
    ("export", "mode", hessq.ExportConfig, "onnx_mode"),
    ("demo", "qat_lr", hessq.FinetuneConfig, "lr"),
]


def _parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def test_compress_with_no_flags_runs_the_configs_defaults():
    args = build_parser().parse_args(["compress"])
    configs = configs_from_args(args)
    for name, cls in CONFIG_ARGUMENTS.items():
        if name == "finetune":
            assert configs[name] is None  # no --finetune-epochs: no QAT, as compress(finetune=None)
        else:
            assert configs[name] == cls(), name
    assert args.seed == hessq.compress.__kwdefaults__["seed"]


@pytest.mark.parametrize("flag, name, field", [(f, n, fl) for f, n, fl, _ in CONFIG_FLAGS],
                         ids=[f for f, *_ in CONFIG_FLAGS])
def test_every_compress_flag_defaults_to_its_config_field(flag, name, field):
    action = _parser("compress")._option_string_actions[flag]
    assert action.default == CONFIG_ARGUMENTS[name].defaults()[field]


def test_every_compress_config_field_has_a_flag_or_a_reason():
    flagged = {(name, field) for _, name, field, _ in CONFIG_FLAGS}
    # Not a flag: the method is --sensitivity (which also takes a file); epochs is --finetune-epochs (0: no QAT);
    # distill/checkpoint are always on for the command line; input_range comes with the bundled model;
    # the distillation's lr and batch size are `hessq distill`'s, min_samples `hessq analyze`'s.
    reasons = {("sensitivity", "method"), ("sensitivity", "min_samples"), ("finetune", "epochs"),
               ("finetune", "distill"), ("finetune", "checkpoint"), ("distill", "input_range"), ("distill", "lr"),
               ("distill", "batch_size")}
    every = {(name, field) for name, cls in CONFIG_ARGUMENTS.items() for field in cls.defaults()}
    assert every - flagged == reasons


@pytest.mark.parametrize("command, dest, cls, field", STAGE_FLAGS, ids=[f"{c} {d}" for c, d, *_ in STAGE_FLAGS])
def test_the_stage_commands_share_the_configs_defaults(command, dest, cls, field):
    action = next(a for a in _parser(command)._actions if a.dest == dest)
    assert action.default == cls.defaults()[field]


def test_a_bad_flag_is_named_as_typed():
    args = build_parser().parse_args(["compress", "--distilled-samples", "0"])
    with pytest.raises(hessq.ConfigError, match="^--distilled-samples must be >= 1, got 0$"):
        configs_from_args(args)
    args = build_parser().parse_args(["compress", "--pin-first-last", "none", "--baselines", "none", "--weight-bits", "8,2"])
    configs = configs_from_args(args)
    assert configs["plan"].pin_first_last is None and configs["plan"].weight_bits == (2, 8)
    assert configs["quantize"].baselines == ()
    args = build_parser().parse_args(["compress", "--finetune-epochs", "1", "--no-range-tracking", "--hidden-weight", "2"])
    ft = configs_from_args(args)["finetune"]
    assert ft.track_ranges is False and ft.hidden_weight == 2.0
