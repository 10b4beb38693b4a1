"""What MNIST is, for every stage: its four files, their digests, the splits and how they are read.

The raw data is four IDX files; fetch puts them in ``data/raw`` and preprocess turns them into one
pair of ``.npy`` arrays per split (``<split>_images.npy``: uint8 rows of 784 pixels;
``<split>_labels.npy``: uint8 one-hot rows of 10). Train and report read those arrays back through
:func:`load_processed`. Every fact about the data set lives here once.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from pipeline.cli import PipelineError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
# Each raw split's images and labels, which must hold the same number of examples.
RAW_PAIRS = {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}

# SHA-256 of each file's *uncompressed* bytes. Digests of the .gz files would depend on the gzip
# settings a mirror used, while the IDX bytes are the same everywhere.
EXPECTED_SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAINING_IMAGES = 60_000
# Size in bytes of each uncompressed file: its IDX header, then one byte per pixel or label.
EXPECTED_SIZE = {
    TRAIN_IMAGES: 47_040_016,
    TRAIN_LABELS: 60_008,
    TEST_IMAGES: 7_840_016,
    TEST_LABELS: 10_008,
}
# The most bytes read or inflated for a file before giving up on its source. The slack covers gzip,
# which makes data it cannot compress a little larger; a source sending more is broken or hostile.
SIZE_LIMIT = {name: size + size // 64 + 4096 for name, size in EXPECTED_SIZE.items()}

IMAGE_SHAPE = (28, 28)
NUM_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
NUM_CLASSES = 10
# read_data_sets() scaled pixels by multiplying with 1/255 in float32; doing the same keeps every
# number identical to the seed's inputs.
PIXEL_SCALE = np.float32(1.0 / 255.0)

SPLITS = ("train", "validation", "test")
# The histories that train writes and report draws, each a CSV with its own steps so that no cell is
# empty (DVC's charts read an empty cell as 0): the training batch after every step, and the test set
# every eval_interval steps. A cross-entropy named ``…_sum`` is summed over the images measured (a
# batch of 100, or the 10,000 test images, as the seed measures it); ``test_cross_entropy`` in
# metrics.json is per image.
TRAIN_HISTORY_COLUMNS = ["step", "train_accuracy", "train_cross_entropy_sum"]
TEST_HISTORY_COLUMNS = ["step", "test_accuracy", "test_cross_entropy_sum"]
# Every eval_interval steps train also records how the weights (every kernel of the model, together)
# and the biases (every bias and batch-normalisation offset, together) are distributed: the 8
# boundaries of 7 buckets holding equal numbers of values (min, 6 quantiles, max), as the seed
# author's live visualisation draws them (tensorflowvisu.py, HISTOGRAM_BUCKETS = 7).
PERCENTILES = tuple(100 * bucket / 7 for bucket in range(8))
PARAMETER_GROUPS = ("weights", "biases")
PERCENTILE_COLUMNS = [
    "step",
    *(f"{group}_p{round(percentile)}" for group in PARAMETER_GROUPS for percentile in PERCENTILES),
]


def scale_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1], exactly as the seed's inputs were."""
    return images.astype(np.float32) * PIXEL_SCALE


def array_file(name: str) -> str:
    """The file that holds the processed array ``name`` (``train_images``, ``test_labels``…)."""
    return f"{name}.npy"


def load_processed(data_dir: Path, splits: tuple[str, ...] = SPLITS) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load the processed arrays of the given splits, with a clear error when they are missing or corrupt.

    Returns the arrays and, for each file read, the md5 of the bytes it was read from, keyed by its
    path: DVC's own hash of a file, so a run's tags name the data it really read (and where it is in
    DVC's cache) even when a file was changed behind DVC's back. Checks what costs little against
    the time training takes: every file's dtype and shape, and labels that are one-hot rows.
    """
    arrays, digests = {}, {}
    for split in splits:
        for kind, width in (("images", NUM_PIXELS), ("labels", NUM_CLASSES)):
            path = Path(data_dir) / array_file(f"{split}_{kind}")
            try:
                data = path.read_bytes()
                array = np.load(io.BytesIO(data), allow_pickle=False)
            except FileNotFoundError:
                raise PipelineError(f"{path} does not exist; run the preprocess stage first (dvc repro).") from None
            except (ValueError, OSError, EOFError) as error:
                raise PipelineError(
                    f"{path} is corrupt ({error}); rerun the preprocess stage (dvc repro -f preprocess)."
                ) from None
            if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != width:
                raise PipelineError(
                    f"{path} holds a {array.dtype} array of shape {array.shape}, expected uint8 rows of "
                    f"{width}; rerun the preprocess stage (dvc repro -f preprocess)."
                )
            if kind == "labels" and len(bad := np.flatnonzero((array > 1).any(axis=1) | (array.sum(axis=1) != 1))):
                raise PipelineError(
                    f"{path} holds labels that are not one-hot (a single 1 among 0s) in {len(bad)} of its "
                    f"{len(array)} rows, the first row {bad[0]}: {array[bad[0]].tolist()}. Preprocess writes only "
                    "one-hot rows, so the file was changed since; rerun it (dvc repro -f preprocess: DVC may not "
                    "have noticed the change)."
                )
            arrays[f"{split}_{kind}"] = array
            digests[path.as_posix()] = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise PipelineError(f"{data_dir}: the {split} images and labels have different counts; rerun preprocess.")
    return arrays, digests
