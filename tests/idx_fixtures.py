"""Tiny synthetic MNIST files in the IDX layout, for tests that must not need the real data.

``write_mnist`` writes the four files under their canonical names (gzipped or not) and returns the
arrays, so a test can compare what a stage read with what was written. ``digests`` gives the
SHA-256 of each file's uncompressed bytes, in the form ``MNIST_EXPECTED_SHA256`` expects.
``gzip_bomb`` makes a small gzip file that inflates to far more than any MNIST file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.data import FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from pipeline.idx import encode_idx

__all__ = ["FILES", "TEST_IMAGES", "TEST_LABELS", "TRAIN_IMAGES", "TRAIN_LABELS"]


def make_mnist(train_count: int = 20, test_count: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 images of shape (n, 28, 28) and labels in 0..9, keyed by canonical file name."""
    if train_count < 0 or test_count < 0:
        raise ValueError(f"counts must be zero or more, got {train_count} and {test_count}")
    rng = np.random.default_rng(seed)
    return {
        TRAIN_IMAGES: rng.integers(0, 256, size=(train_count, 28, 28), dtype=np.uint8),
        TRAIN_LABELS: rng.integers(0, 10, size=train_count, dtype=np.uint8),
        TEST_IMAGES: rng.integers(0, 256, size=(test_count, 28, 28), dtype=np.uint8),
        TEST_LABELS: rng.integers(0, 10, size=test_count, dtype=np.uint8),
    }


def idx_bytes(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The uncompressed IDX bytes of each array."""
    return {name: encode_idx(array) for name, array in arrays.items()}


def digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of each file's uncompressed IDX bytes, keyed by file name."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in idx_bytes(arrays).items()}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write one array as an IDX file at ``path`` (gzipped when ``gz``) and return the path."""
    data = encode_idx(array)
    # mtime=0 keeps the gzip bytes identical between runs, so tests can compare them.
    Path(path).write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return Path(path)


def write_mnist(
    directory: Path,
    train_count: int = 20,
    test_count: int = 10,
    gz: bool = True,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the four MNIST files (``<name>.gz`` when ``gz``, else ``<name>``) and return their arrays."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = make_mnist(train_count, test_count, seed)
    for name, array in arrays.items():
        write_idx(directory / (f"{name}.gz" if gz else name), array, gz=gz)
    return arrays


def write_digests(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write the ``{file name: sha256}`` JSON that ``MNIST_EXPECTED_SHA256`` points to."""
    Path(path).write_text(json.dumps(digests(arrays), indent=2), encoding="utf-8")
    return Path(path)


def gzip_bomb(mebibytes: int, prefix: bytes = b"") -> bytes:
    """A valid gzip file of ``prefix`` then ``mebibytes`` MiB of zeros, about a thousandth of that size.

    One MiB is compressed once; a full flush makes its compressed block independent of what came
    before, so repeating the block gives the whole stream quickly.
    """
    zeros = bytes(1 << 20)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(prefix) + deflater.flush(zlib.Z_FULL_FLUSH)
    block = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(prefix)
    for _ in range(mebibytes):
        crc = zlib.crc32(zeros, crc)
    size = (len(prefix) + (mebibytes << 20)) & 0xFFFFFFFF
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + start + block * mebibytes + deflater.flush() + struct.pack("<II", crc, size)
