"""User-facing errors: each carries a one-line message the CLI prints without a traceback."""


class LdmError(Exception):
    """Base class for problems the user can fix (bad input, unusable file)."""

    exit_code = 2


class ModelNotFoundError(LdmError):
    """No model at the given path or name."""


class CheckpointError(LdmError):
    """A model file or folder exists but cannot be used: corrupt, unsafe, unknown keys."""


class UnsupportedModelError(CheckpointError):
    """A readable file that is not a model family this version can run."""


def name_keys(keys, limit: int = 5) -> str:
    """A few of `keys`, sorted, for a one-line message: "a, b, c (+12 more)"."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
