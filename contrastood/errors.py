"""The errors a user can fix. `contrastood.main` prints their message as one line (exit status 2).

Every message names the fix (an override, a command, a file to delete). Anything else that escapes is
a bug and keeps its traceback. The classes also derive from the builtin a caller would expect
(ValueError for bad settings and data), so library callers can catch either.
"""
from __future__ import annotations


class ContrastoodError(Exception):
    """Base class: a problem with the user's settings, data, workdir or checkpoints, not a bug."""


class ConfigError(ContrastoodError, ValueError):
    """An invalid config value or combination; the message names the --config override that fixes it."""


class DataError(ContrastoodError, ValueError):
    """A dataset spec, file or folder that cannot be read as the spec says."""


class MissingDependencyError(ContrastoodError, ImportError):
    """An optional package (TensorFlow for tfds specs, say) is needed for what was asked."""


class WorkdirError(ContrastoodError, OSError):
    """The workdir cannot be used: missing (for evaluation), not writable, full, or locked."""


class WorkdirLockedError(WorkdirError):
    """Another run holds the workdir's lock."""


class CheckpointError(ContrastoodError, RuntimeError):
    """No usable checkpoint, or a save that had to happen was refused."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoints hold another model (shapes or structure differ from the config's)."""


class NonFiniteLossError(ContrastoodError, FloatingPointError):
    """The loss, a gradient or the updated state became NaN or infinite; nothing after it was saved."""
