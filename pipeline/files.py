"""Atomic file writes: a temp file beside the target, then a rename.

Every stage writes through these helpers, so killing a stage at any moment leaves either the old
file or the new one at an output path, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
