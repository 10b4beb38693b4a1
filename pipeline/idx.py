"""The IDX file format MNIST is distributed in, read and written with full validation.

An IDX file is a big-endian header (two zero bytes, a type code, the number of dimensions, then
one 32-bit size per dimension) followed by the raw array. MNIST uses unsigned bytes (type 0x08):
images are ``(count, 28, 28)`` and labels ``(count,)``.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.cli import PipelineError
from pipeline.data import IMAGE_SHAPE, NUM_CLASSES, SIZE_LIMIT

UNSIGNED_BYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"


class IdxError(PipelineError):
    """An IDX file (or its gzip wrapper) is malformed."""


def is_gzip(data: bytes) -> bool:
    return data[:2] == GZIP_MAGIC


def gunzip(data: bytes, name: str, limit: int) -> bytes:
    """Decompress gzip bytes into at most ``limit`` bytes, reporting a corrupt or oversized stream by file name.

    The output is bounded because a small file can be crafted to inflate to gigabytes; this way it
    fails after ``limit`` bytes, in that much memory.
    """
    # 16 + MAX_WBITS makes zlib expect (and check) a gzip header and trailer.
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        raw = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise IdxError(f"{name} is not a valid gzip file ({error}); it is corrupt or truncated.") from None
    if len(raw) > limit:
        raise IdxError(
            f"{name} inflates to more than {limit:,} bytes, more than an MNIST file holds; it was not inflated further."
        )
    if not inflater.eof or inflater.unused_data:
        raise IdxError(f"{name} is not a valid gzip file (it is truncated, or has data after its end).")
    return raw


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Decode IDX bytes into an array, checking the magic number and that the header fits the payload."""
    if len(data) < 4:
        raise IdxError(f"{name} is too short ({len(data)} bytes) to be an IDX file.")
    zero, type_code, num_dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code != UNSIGNED_BYTE or num_dims not in (1, 3):
        magic = int.from_bytes(data[:4], "big")
        raise IdxError(
            f"{name} has magic number 0x{magic:08x}, expected 0x00000801 (labels) or "
            "0x00000803 (images); it is not an MNIST IDX file."
        )
    header_size = 4 + 4 * num_dims
    if len(data) < header_size:
        raise IdxError(f"{name} ends inside its IDX header.")
    shape = struct.unpack(f">{num_dims}I", data[4:header_size])
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(data) - header_size
    if actual != expected:
        raise IdxError(
            f"{name} declares shape {tuple(shape)} ({expected} bytes of data) but holds {actual} "
            "bytes; the file is truncated or its header count is wrong."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array of 1 or 3 dimensions as IDX bytes."""
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise ValueError(f"IDX encoding needs a uint8 array of 1 or 3 dimensions, got {array.dtype} {array.shape}")
    header = struct.pack(">HBB", 0, UNSIGNED_BYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def check_images(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise IdxError(f"{name} holds images of shape {images.shape[1:]}, expected 28x28.")
    return images


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    if labels.ndim != 1:
        raise IdxError(f"{name} is not a label file: it has {labels.ndim} dimensions, expected 1.")
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise IdxError(f"{name} holds label {int(labels.max())}; MNIST labels are 0 to 9.")
    return labels


def check_pair(images: np.ndarray, labels: np.ndarray, name: str) -> None:
    if len(images) != len(labels):
        raise IdxError(f"{name}: {len(images)} images but {len(labels)} labels; the counts must agree.")


def read_images(path: Path) -> np.ndarray:
    return check_images(parse_idx(read_bytes(path), str(path)), str(path))


def read_labels(path: Path) -> np.ndarray:
    return check_labels(parse_idx(read_bytes(path), str(path)), str(path))


def read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing gzip, with a clear error when it is missing."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise IdxError(f"{path} does not exist; run the earlier pipeline stages first (dvc repro).") from None
    return gunzip(data, str(path), max(SIZE_LIMIT.values())) if is_gzip(data) else data
