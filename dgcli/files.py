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


class TooLargeError(DgError):
    """An input file over the size a command reads (exit code 2)."""

    exit_code = 2


def read_limited(f, limit: int, name: str) -> bytes:
    """All of a binary stream, or a TooLargeError past `limit` bytes (read in pieces, so a pipe that
    never ends costs `limit` at most): a gzip bomb would otherwise fill the memory."""
    chunks, n = [], 0
    while chunk := f.read(min(2**20, limit + 1 - n)):
        chunks.append(chunk)
        n += len(chunk)
        if n > limit:
            raise TooLargeError(f"{name} is larger than {limit / 2**20:,.0f} MiB: not a file this command reads")
    return b"".join(chunks)


def read_file_limited(path: str | os.PathLike, limit: int, name: str | None = None) -> bytes:
    """A file's bytes, refusing a device (`--prefix /dev/zero` never ends) and anything over `limit`;
    a pipe (`<(...)`) is read."""
    name = name or str(path)
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise NotAFileError(f"{name} is a device, not a file")
        return read_limited(f, limit, name)
