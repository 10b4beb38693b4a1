"""Stage ``preprocess``: turn the raw IDX files into compact arrays ready for training.

Reads the four MNIST IDX files from ``--raw`` and writes ``--out`` holding, for each split
(``train``, ``validation``, ``test``), ``<split>_images.npy`` (uint8, rows of 784 pixels) and
``<split>_labels.npy`` (uint8 one-hot rows of 10). As in the seed's ``read_data_sets``, the first
``preprocess.validation_size`` training images are held out as validation. Pixels stay uint8 on disk
(a quarter of the size of float32); scaling to [0, 1] happens where batches are fed to the model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline import idx
from pipeline.cli import PipelineError, path_arguments, run
from pipeline.data import NUM_CLASSES, NUM_PIXELS, RAW_PAIRS, SPLITS, array_file
from pipeline.params import load_params

logger = logging.getLogger(__name__)


def flatten(images: np.ndarray) -> np.ndarray:
    """Turn (count, 28, 28) images into (count, 784) rows, keeping uint8 (count may be 0)."""
    return np.ascontiguousarray(images.reshape(len(images), NUM_PIXELS))


def one_hot(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Encode integer labels as uint8 one-hot rows (5 becomes [0, 0, 0, 0, 0, 1, 0, 0, 0, 0])."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return np.eye(num_classes, dtype=np.uint8)[labels]


def split_validation(
    images: np.ndarray, labels: np.ndarray, validation_size: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Hold out the first ``validation_size`` examples, as the seed's read_data_sets did."""
    if not 0 <= validation_size < len(images):
        raise ValueError(f"validation_size must be in [0, {len(images)}), got {validation_size}")
    return (
        (images[validation_size:], labels[validation_size:]),
        (images[:validation_size], labels[:validation_size]),
    )


def make_splits(raw: dict[str, tuple[np.ndarray, np.ndarray]], validation_size: int) -> dict[str, np.ndarray]:
    """From raw (images, labels) per IDX pair, build the flattened, one-hot arrays of every split."""
    train, validation = split_validation(*raw["train"], validation_size)
    arrays = {}
    for split, (images, labels) in {"train": train, "validation": validation, "test": raw["test"]}.items():
        arrays[f"{split}_images"] = flatten(images)
        arrays[f"{split}_labels"] = one_hot(labels)
    return arrays


def read_raw(raw_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = {}
    for split, (images_name, labels_name) in RAW_PAIRS.items():
        images = idx.read_images(raw_dir / images_name)
        labels = idx.read_labels(raw_dir / labels_name)
        idx.check_pair(images, labels, f"{raw_dir / images_name} and {labels_name}")
        raw[split] = (images, labels)
    return raw


def write_arrays(out_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write every array into a temp directory, then swap it in for ``out_dir`` in one rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    # mkdtemp makes the directory private; the output should have ordinary permissions.
    temp_dir.chmod(0o755)
    try:
        for name, array in arrays.items():
            np.save(temp_dir / array_file(name), array, allow_pickle=False)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        temp_dir.rename(out_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    args = path_arguments(__doc__, ["raw", "out"])
    params = load_params().preprocess

    raw = read_raw(args.raw)
    num_training = len(raw["train"][0])
    if params.validation_size >= num_training:
        raise PipelineError(
            f"preprocess.validation_size ({params.validation_size}) must be smaller than the "
            f"{num_training} training images in {args.raw}, or nothing would be left to train on."
        )
    arrays = make_splits(raw, params.validation_size)
    try:
        write_arrays(args.out, arrays)
    except OSError as error:
        needed = sum(array.nbytes for array in arrays.values())
        try:
            free = f"{shutil.disk_usage(args.out.parent).free:,} bytes are free there"
        except OSError:
            free = "its free space is unknown"
        raise PipelineError(
            f"cannot write {args.out} ({error.strerror or error}): the arrays need about {needed:,} bytes and {free}. "
            f"Nothing half-written was left, and the previous {args.out} (if any) is unchanged. Free some space "
            f"(or make {args.out.parent} writable) and run again."
        ) from None
    sizes = ", ".join(f"{split} {len(arrays[f'{split}_images'])}" for split in SPLITS)
    logger.info("wrote %s (%s images)", args.out, sizes)


if __name__ == "__main__":
    run(main)
