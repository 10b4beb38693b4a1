"""Atomic writes (a stage killed at any moment leaves the old file or the new one, never half of one) and bounded
reads (a device, a FIFO or a huge file is refused instead of hanging a command or exhausting its memory)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Far more than any metrics file, params file or photo of a digit; far less than would strain memory.
READ_LIMIT = 64 * 2**20
KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


class UnreadableFile(OSError):
    """No regular file, or one over the limit (the message leaves the path to the caller)."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix stays last, as Keras and NumPy insist; the writer creates the file, so the umask sets its mode.
    temp_path = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp{path.suffix}")
    try:
        yield temp_path
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(paths: list[Path]) -> Iterator[list[Path]]:
    """A temp path beside each of ``paths``; they replace their targets only if the whole block succeeds."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as temp_path:
        temp_path.write_bytes(data)


def read_bounded(stream: BinaryIO, limit: int = READ_LIMIT) -> bytes:
    """All of ``stream`` (a file or a pipe), refused beyond ``limit`` bytes without reading further."""
    if len(data := stream.read(limit + 1)) > limit:
        raise UnreadableFile(f"it holds more than the {limit:,} bytes this command reads")
    return data


def read_bytes(path: Path | str, limit: int = READ_LIMIT) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` (opening a FIFO without O_NONBLOCK blocks)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if (kind := stat.S_IFMT(os.fstat(descriptor).st_mode)) != stat.S_IFREG:
        os.close(descriptor)
        raise UnreadableFile(f"it is {KINDS.get(kind, 'a special file')}, not a regular file")
    with open(descriptor, "rb") as stream:
        return read_bounded(stream, limit)
