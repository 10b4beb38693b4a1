"""Stage ``preprocess``: the four IDX files in ``--raw`` become compact arrays in ``--out``.

For each split (train, validation, test) it writes ``<split>_images.npy`` (uint8 rows of 784 pixels)
and ``<split>_labels.npy`` (uint8 one-hot rows of 10). As in the seed's ``read_data_sets``, the first
``preprocess.validation_size`` training images are held out for validation. Pixels stay uint8 on disk,
a quarter of float32's size; they are scaled to [0, 1] where batches are fed to the model.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline import files
from pipeline.cli import PipelineError, path_arguments, run
from pipeline.data import NUM_CLASSES, NUM_PIXELS, RAW_PAIRS, SPLITS, read_idx
from pipeline.params import load_params

logger = logging.getLogger(__name__)


def flatten(images: np.ndarray) -> np.ndarray:
    """(count, 28, 28) images as (count, 784) rows, still uint8."""
    return np.ascontiguousarray(images.reshape(len(images), NUM_PIXELS))


def one_hot(labels: np.ndarray) -> np.ndarray:
    """Integer labels as uint8 one-hot rows: 5 becomes [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]."""
    return np.eye(NUM_CLASSES, dtype=np.uint8)[labels]


def main() -> None:
    args = path_arguments(__doc__, ["raw", "out"])
    validation_size = load_params().preprocess.validation_size

    raw = {}
    for split, (images_name, labels_name) in RAW_PAIRS.items():
        images, labels = read_idx(args.raw / images_name), read_idx(args.raw / labels_name)
        if len(images) != len(labels) or labels.max(initial=0) >= NUM_CLASSES:
            raise PipelineError(
                f"{args.raw / images_name} and {labels_name} hold {len(images)} images and {len(labels)} labels "
                f"(the largest {labels.max(initial=0)}), not one label from 0 to 9 per image; rerun the fetch "
                "stage (dvc repro -f fetch)."
            )
        raw[split] = images, labels
    images, labels = raw["train"]
    if validation_size >= len(images):
        raise PipelineError(
            f"preprocess.validation_size ({validation_size}) must be smaller than the {len(images)} training "
            f"images in {args.raw}, or nothing would be left to train on."
        )
    raw["validation"] = images[:validation_size], labels[:validation_size]
    raw["train"] = images[validation_size:], labels[validation_size:]

    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = flatten(raw[split][0]), one_hot(raw[split][1])
    try:
        with files.staged([args.out / f"{name}.npy" for name in arrays]) as temp_paths:
            for temp_path, array in zip(temp_paths, arrays.values()):
                np.save(temp_path, array, allow_pickle=False)
    except OSError as error:
        needed = sum(array.nbytes for array in arrays.values())
        raise PipelineError(
            f"cannot write {args.out} ({error.strerror or error}): the arrays need about {needed:,} bytes. "
            f"Nothing half-written was left, and the previous {args.out} (if any) is unchanged. Free some "
            f"space (or make {args.out.parent} writable) and run again."
        ) from None
    logger.info("wrote %s (%s)", args.out, ", ".join(f"{name} {len(array)}" for name, array in arrays.items()))


if __name__ == "__main__":
    run(main)
