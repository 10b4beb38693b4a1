"""Every fact about MNIST, once: the four IDX files and their digests, the processed arrays
(``<split>_images.npy``, uint8 rows of 784 pixels; ``<split>_labels.npy``, uint8 one-hot rows of 10), the histories."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import numpy as np

from pipeline.cli import PipelineError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
RAW_PAIRS = {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}
# The digests are of the uncompressed bytes, which are the same on every mirror (the .gz bytes are not).
EXPECTED_SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
EXPECTED_SIZE = {TRAIN_IMAGES: 47_040_016, TRAIN_LABELS: 60_008, TEST_IMAGES: 7_840_016, TEST_LABELS: 10_008}
TRAINING_IMAGES = 60_000
IMAGE_SHAPE = (28, 28)
NUM_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
NUM_CLASSES = 10
# read_data_sets() multiplied the pixels by 1/255 in float32; doing the same keeps the seed's inputs exact.
PIXEL_SCALE = np.float32(1.0 / 255.0)
SPLITS = ("train", "validation", "test")

# Separate CSVs with their own steps, so that no cell is empty (DVC's charts read an empty cell as 0).
# A ``…_sum`` cross-entropy is summed over the images measured, as the seed measures it.
TRAIN_HISTORY_COLUMNS = ["step", "train_accuracy", "train_cross_entropy_sum"]
TEST_HISTORY_COLUMNS = ["step", "test_accuracy", "test_cross_entropy_sum"]
# The 8 boundaries of 7 equally filled buckets, as the seed author's visualisation draws the parameters.
PERCENTILES = tuple(100 * bucket / 7 for bucket in range(8))
PERCENTILE_COLUMNS = ["step", *(f"{group}_p{round(share)}" for group in ("weights", "biases") for share in PERCENTILES)]


def scale_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1], exactly as the seed's inputs were."""
    return images.astype(np.float32) * PIXEL_SCALE


def encode_idx(array: np.ndarray) -> bytes:
    """A uint8 array as IDX bytes: two zero bytes, type 0x08, the rank, one big-endian size per axis, the data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def load_array(path: Path, stage: str) -> tuple[np.ndarray, bytes]:
    """The array in the file ``stage`` writes (IDX from fetch, ``.npy`` from the others), and its bytes."""
    try:
        data = Path(path).read_bytes()
        if stage != "fetch":
            return np.load(io.BytesIO(data), allow_pickle=False), data
        header = 4 + 4 * data[3]
        return np.frombuffer(data, np.uint8, offset=header).reshape(struct.unpack(f">{data[3]}I", data[4:header])), data
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist; run the {stage} stage first (dvc repro).") from None
    except (ValueError, OSError, EOFError, IndexError, struct.error) as error:
        problem = "is not an IDX file" if stage == "fetch" else "is corrupt"
        raise PipelineError(f"{path} {problem} ({error}); rerun the {stage} stage (dvc repro -f {stage}).") from None


def load_processed(data_dir: Path, splits: tuple[str, ...] = SPLITS) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The processed arrays of ``splits``, and the md5 (DVC's hash) of each file as read, for the run's tags."""
    arrays, digests = {}, {}
    for split in splits:
        for kind in ("images", "labels"):
            path = Path(data_dir) / f"{split}_{kind}.npy"
            arrays[f"{split}_{kind}"], data = load_array(path, "preprocess")
            digests[path.as_posix()] = hashlib.md5(data, usedforsecurity=False).hexdigest()
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        uint8 = images.dtype == labels.dtype == np.uint8
        if not uint8 or images.shape != (len(labels), NUM_PIXELS) or labels.shape[1:] != (NUM_CLASSES,):
            raise PipelineError(
                f"{data_dir}: the {split} images ({images.dtype} {images.shape}) and labels ({labels.dtype} "
                f"{labels.shape}) are not as many uint8 rows of {NUM_PIXELS} pixels and of {NUM_CLASSES} classes; "
                "rerun the preprocess stage (dvc repro -f preprocess)."
            )
        if len(bad := np.flatnonzero(labels.sum(axis=1) != 1)):  # uint8 rows sum to 1 only when one-hot
            raise PipelineError(
                f"{data_dir / f'{split}_labels.npy'} holds labels that are not one-hot (a single 1 among 0s) in "
                f"{len(bad)} of its {len(labels)} rows, the first row {bad[0]}: {labels[bad[0]].tolist()}. "
                "Preprocess writes only one-hot rows, so the file was changed since; rerun it (dvc repro -f "
                "preprocess: DVC may not have noticed the change)."
            )
    return arrays, digests
