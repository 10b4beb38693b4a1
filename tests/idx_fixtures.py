"""Tiny synthetic MNIST in the IDX layout (``write_mnist``) and its digests (``write_digests``, the JSON
that ``MNIST_EXPECTED_SHA256`` points to), for tests that must not need the real data."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.data import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, encode_idx


def idx_bytes(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {name: encode_idx(array) for name, array in arrays.items()}


def digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in idx_bytes(arrays).items()}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    # mtime=0 keeps the gzip bytes the same from run to run.
    Path(path).write_bytes(gzip.compress(encode_idx(array), mtime=0) if gz else encode_idx(array))


def write_mnist(
    directory: Path, train_count: int = 20, test_count: int = 10, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write random images and labels as the four files (``<name>.gz`` when ``gz``) and return their arrays."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        TRAIN_IMAGES: rng.integers(0, 256, size=(train_count, 28, 28), dtype=np.uint8),
        TRAIN_LABELS: rng.integers(0, 10, size=train_count, dtype=np.uint8),
        TEST_IMAGES: rng.integers(0, 256, size=(test_count, 28, 28), dtype=np.uint8),
        TEST_LABELS: rng.integers(0, 10, size=test_count, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(Path(directory) / (f"{name}.gz" if gz else name), array, gz=gz)
    return arrays


def write_digests(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    Path(path).write_text(json.dumps(digests(arrays)), encoding="utf-8")
    return Path(path)
