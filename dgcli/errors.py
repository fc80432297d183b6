"""The one exception type dg raises for problems a user can fix.

Its message is a single line meant for a person (what went wrong, and how to fix it). The CLI prints
it as `error: <message>` and exits non-zero; anything else is a bug and keeps its traceback.
"""


class DgError(Exception):
    """A user-facing error: bad input, missing or broken files, not enough memory."""

    exit_code = 1


class ModelNotFoundError(DgError):
    """A model name resolved to nothing on this machine."""


class CheckpointError(DgError):
    """A checkpoint on disk is missing files, has wrong tensors, or is corrupt."""


class ConfigError(DgError):
    """config.json or generation_config.json is missing a field or contradicts itself."""


class EmptyPromptError(DgError):
    """A prompt with no tokens to condition on: the caller has to change it (exit code 2, bad usage)."""

    exit_code = 2


class ContextFullError(DgError):
    """A conversation or prompt needs more tokens than the cache holds."""


class ContextLengthError(DgError, ValueError):
    """A prompt plus its answer budget cannot fit the model's context (or the cache given): found
    before any compute, and the caller has to change it (exit code 2, bad usage)."""

    exit_code = 2


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
