"""Stage ``preprocess``: the four IDX files in ``--raw`` become ``<split>_images.npy`` (uint8 rows of 784
pixels, a quarter of float32's size) and ``<split>_labels.npy`` (one-hot) in ``--out``, for train, validation
and test. As in the seed's ``read_data_sets``, validation is the first ``validation_size`` training images."""

from __future__ import annotations

import logging

import numpy as np

from pipeline import files
from pipeline.cli import PipelineError, path_arguments, run
from pipeline.data import NUM_CLASSES, NUM_PIXELS, RAW_PAIRS, SPLITS, load_array
from pipeline.params import load_params

logger = logging.getLogger(__name__)


def main() -> None:
    args = path_arguments(__doc__, ["raw", "out"])
    validation_size = load_params().preprocess.validation_size
    raw = {}
    for split, (images_name, labels_name) in RAW_PAIRS.items():
        images, labels = (load_array(args.raw / name, "fetch")[0] for name in (images_name, labels_name))
        if len(images) != len(labels) or labels.max(initial=0) >= NUM_CLASSES:
            raise PipelineError(
                f"{args.raw / images_name} and {labels_name} hold {len(images)} images and {len(labels)} labels "
                f"(the largest {labels.max(initial=0)}), not one label from 0 to 9 per image; rerun the fetch "
                "stage (dvc repro -f fetch)."
            )
        raw[split] = images.reshape(len(images), NUM_PIXELS), np.eye(NUM_CLASSES, dtype=np.uint8)[labels]
    images, labels = raw["train"]
    if validation_size >= len(images):
        raise PipelineError(
            f"preprocess.validation_size ({validation_size}) must be smaller than the {len(images)} training "
            f"images in {args.raw}, or nothing would be left to train on."
        )
    raw["validation"] = images[:validation_size], labels[:validation_size]
    raw["train"] = images[validation_size:], labels[validation_size:]
    arrays = {f"{split}_{kind}": array for split in SPLITS for kind, array in zip(("images", "labels"), raw[split])}
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
