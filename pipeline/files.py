"""Atomic file writes (a temp file beside the target, then a rename) and bounded reads of users' files.

Every stage writes through these helpers, so killing a stage at any moment leaves either the old
file or the new one at an output path, never half of one. Every command reads the files a user
names through :func:`read_bytes`, so a device, a FIFO or a huge file is refused instead of hanging
the command or exhausting its memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

# The most a command reads of one file a user names: far more than any metrics file, sweep
# definition, params file or photo of a digit, far less than would strain memory.
READ_LIMIT = 64 * 2**20
KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


class UnreadableFile(OSError):
    """A file that is no regular file, or larger than the limit: its message says which, without the path."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the target's suffix, because some writers (Keras, NumPy) insist on it.
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    temp_path = Path(temp_name)
    # mkstemp makes the file private; outputs get the ordinary permissions the umask allows.
    umask = os.umask(0)
    os.umask(umask)
    temp_path.chmod(0o666 & ~umask)
    try:
        yield temp_path
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as temp_path:
        temp_path.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n")


@contextlib.contextmanager
def staged(paths: list[Path]) -> Iterator[list[Path]]:
    """Yield one temp path beside each of ``paths``; all are renamed into place only if the block succeeds.

    A stage writes its outputs to these temp paths as it goes and records its run; only when all of
    that has succeeded do the new outputs replace the old ones, so a failure at any point leaves no
    new output behind.
    """
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


def read_bounded(stream: BinaryIO, limit: int = READ_LIMIT) -> bytes:
    """All of ``stream`` (a file or a pipe), refusing it beyond ``limit`` bytes without reading further."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFile(f"it holds more than the {limit:,} bytes this command reads")
    return data


def read_bytes(path: Path | str, limit: int = READ_LIMIT) -> bytes:
    """The bytes of the regular file at ``path`` (or a link to one), at most ``limit`` of them.

    Raises UnreadableFile for a directory, a FIFO or a device (/dev/zero never ends, a FIFO waits
    for a writer) and for a file over the limit, and OSError for a file that cannot be opened. The
    file is opened without blocking, because opening a FIFO blocks until something writes to it.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    kind = stat.S_IFMT(os.fstat(descriptor).st_mode)
    if kind != stat.S_IFREG:
        os.close(descriptor)
        raise UnreadableFile(f"it is {KINDS.get(kind, 'a special file')}, not a regular file")
    with open(descriptor, "rb") as stream:
        return read_bounded(stream, limit)
