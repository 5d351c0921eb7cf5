"""One error hierarchy: every error hessq raises on purpose is a :class:`HessqError`.

Each class also derives from the built-in exception a caller would have caught before
(``ValueError``, ``TypeError``, ``RuntimeError``, ``ImportError``), so ``except ValueError``
keeps working. The command line prints one line for any ``HessqError`` and a traceback only
for what is not one (a bug), or with ``--debug``.
"""

from __future__ import annotations


class HessqError(Exception):
    """Base of every error hessq raises on purpose: its message names the problem and the fix."""


class ConfigError(HessqError, ValueError):
    """An argument or option has a value hessq cannot use (a bit width out of range, a negative tolerance, ...)."""


class ConfigTypeError(ConfigError, TypeError):
    """An argument is of the wrong type (a string where a model is expected, ...)."""


class InputDataError(HessqError, ValueError):
    """The data handed in cannot be used: wrong shape or dtype, NaNs, targets out of range, an exhausted iterator."""


class ModelError(HessqError, ValueError):
    """The model cannot be used as given: not an ``nn.Module``, on the meta device, NaN weights, another model's plan."""


class ArtifactError(HessqError, ValueError):
    """A file is damaged, of another kind, or from another version of hessq: refused whole."""


class CheckpointMismatchError(ArtifactError):
    """A QAT checkpoint belongs to another model, bit plan or training configuration."""


class MissingDependencyError(HessqError, ImportError):
    """An optional package is not installed; the message says what to install."""


class HessqRuntimeError(HessqError, RuntimeError):
    """A computation could not go on (a diverging loss, a solver failure, ...)."""
