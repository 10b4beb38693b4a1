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


@contextlib.contextmanager
def staged(paths: list[Path]) -> Iterator[list[Path]]:
    """A temp path beside each of ``paths``; they replace their targets only if the whole block succeeds."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix stays last, as Keras and NumPy insist; the writer creates the file, so the umask sets its mode.
    temp_paths = [path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp{path.suffix}") for path in paths]
    try:
        yield temp_paths
        for temp_path, path in zip(temp_paths, paths):
            os.replace(temp_path, path)
    finally:
        for temp_path in temp_paths:
            temp_path.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with staged([path]) as [temp_path]:
        temp_path.write_bytes(data)


def read_bounded(stream: BinaryIO, limit: int = READ_LIMIT) -> bytes:
    """All of ``stream`` (a file or a pipe), refused beyond ``limit`` bytes without reading further."""
    if len(data := stream.read(limit + 1)) > limit:
        raise OSError(f"it holds more than the {limit:,} bytes this command reads")
    return data


def read_bytes(path: Path | str, limit: int = READ_LIMIT) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` (opening a FIFO without O_NONBLOCK blocks)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if (kind := stat.S_IFMT(os.fstat(descriptor).st_mode)) != stat.S_IFREG:
        os.close(descriptor)
        raise OSError(f"it is {KINDS.get(kind, 'a special file')}, not a regular file")
    with open(descriptor, "rb") as stream:
        return read_bounded(stream, limit)
