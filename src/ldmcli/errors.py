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


class ImageMetadataError(LdmError):
    """A PNG whose generation parameters cannot be read (not a PNG, truncated, a text chunk over the
    limit) or not understood (wrong types in ldm's record, A1111 text that does not parse)."""


class NonFiniteError(Exception):
    """An image came out NaN/Inf (a checkpoint with NaN weights, an overflow): it is never saved.

    Not an LdmError: it happens while generating, so it fails that image (exit 1), not the run.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, CI and service managers send), raised where Ctrl-C would be, so it
    ends the run the same way: finished images kept, the summary printed. Exit 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.exit_code = 128 + signum


def name_keys(keys, limit: int = 5) -> str:
    """A few of `keys`, sorted, for a one-line message: "a, b, c (+12 more)"."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
