"""Writing files so that a reader never sees half of one: a temporary file beside the target, then a
rename (atomic on one filesystem). A failed or interrupted write leaves the old file, or none."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import DgError


class NotAFileError(DgError):
    """The target exists and is a device, pipe or socket: a rename would replace it (exit code 2)."""

    exit_code = 2


def check_not_special(path: str | os.PathLike) -> None:
    """Refuse a target that is a device, FIFO or socket: the rename that makes writes atomic would put a
    regular file in its place (run as root, `--trace /dev/full` replaced the device)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # absent (the usual case) or unreadable: the write itself will say
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise NotAFileError(f"{path} is not a regular file (a device, pipe or socket): give a file name")


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator:
    """`with atomic_output(path) as f: f.write(...)`: the file appears under `path` whole, or not at all."""
    path = Path(path)
    check_not_special(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as f:
        f.write(text)
