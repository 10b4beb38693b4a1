"""A plain NumPy implementation of the seed's training, to measure the pipeline against.

``train_numpy`` runs exactly the algorithm of ``pipeline.model.SgdTrainer`` driven by
``pipeline.train.train``: one ``Dense(10, softmax)`` layer, pixels scaled by ``np.float32(1/255)``,
cross-entropy summed over the batch (computed stably from the logits), plain SGD, and after every
update the batch's accuracy and summed cross-entropy measured again with the new weights; every
``eval_interval`` steps the same on the full test set. Everything is float32.

Run as a program (``python -m benchmarks.numpy_reference``) it is the *NumPy reference process*: the
whole pipeline's work without the pipeline (read the four IDX files from the mirror and verify them,
split and one-hot them, train, score the test set), for comparing wall times with ``dvc repro``.

This module never imports TensorFlow, Keras or MLflow.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

# The data set's facts come from pipeline.data (NumPy only); the algorithm below is the reference's own.
from pipeline.data import NUM_CLASSES, NUM_PIXELS, PIXEL_SCALE  # noqa: E402
from pipeline.data import RAW_PAIRS as RAW_FILES  # noqa: E402

# --------------------------------------------------------------------------------------------
# The algorithm


def scale_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1], exactly as pipeline.data.scale_pixels does."""
    return images.astype(np.float32) * PIXEL_SCALE


def softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise softmax and log-sum-exp of float32 logits, shifted by the row maximum for stability."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    sums = exponentials.sum(axis=1, keepdims=True)
    return exponentials / sums, np.log(sums) - shifted


def measure(logits: np.ndarray, labels: np.ndarray) -> tuple[np.float32, np.float32, np.ndarray]:
    """Accuracy, cross-entropy summed over the rows, and the probabilities, from logits.

    The cross-entropy is ``sum(labels * (logsumexp(logits) - logits))``, what
    ``tf.nn.softmax_cross_entropy_with_logits`` computes (Keras takes that path for a softmax
    layer's output), so it stays finite where log(softmax) would underflow. The accuracy compares
    the argmax of the probabilities, as SgdTrainer does.
    """
    probabilities, negative_log_probabilities = softmax(logits)
    cross_entropy = np.float32((labels * negative_log_probabilities).sum(dtype=np.float32))
    correct = probabilities.argmax(axis=1) == labels.argmax(axis=1)
    return np.float32(correct.mean(dtype=np.float32)), cross_entropy, probabilities


def train_numpy(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    weights: np.ndarray,
    biases: np.ndarray,
    batch_order: np.ndarray,
    learning_rate: float,
    eval_interval: int,
) -> dict[str, np.ndarray]:
    """Run one SGD step per row of ``batch_order`` and return the seed's measurements.

    ``train_images``/``test_images`` are uint8 rows of 784 pixels, the labels one-hot rows of 10 (any
    dtype), ``weights`` (784, 10) and ``biases`` (10,) the initial parameters (copied, not changed),
    ``batch_order`` the example indices of every step's batch (``pipeline.train.batch_order``).

    Returns float32 arrays: ``train_accuracy`` and ``train_cross_entropy`` (one per step, measured on
    the batch after its update), ``test_steps``, ``test_accuracy`` and ``test_cross_entropy`` (every
    ``eval_interval`` steps, the cross-entropy summed over the whole test set), the final
    ``weights`` and ``biases``, and the final ``test_probabilities``.
    """
    if eval_interval < 1:
        raise ValueError(f"eval_interval must be at least 1, got {eval_interval}")
    weights = np.array(weights, dtype=np.float32, copy=True)
    biases = np.array(biases, dtype=np.float32, copy=True)
    rate = np.float32(learning_rate)
    # Labels are cast once; images stay uint8 and each batch is gathered and scaled on the fly.
    train_labels = np.asarray(train_labels, dtype=np.float32)
    test_x = scale_pixels(test_images)
    test_y = np.asarray(test_labels, dtype=np.float32)

    iterations = len(batch_order)
    train_accuracy = np.empty(iterations, np.float32)
    train_cross_entropy = np.empty(iterations, np.float32)
    test_steps = list(range(eval_interval, iterations + 1, eval_interval))
    test_accuracy = np.empty(len(test_steps), np.float32)
    test_cross_entropy = np.empty(len(test_steps), np.float32)
    evaluation = 0

    for step, indices in enumerate(batch_order):
        x = train_images[indices].astype(np.float32)
        x *= PIXEL_SCALE
        y = train_labels[indices]
        # Forward pass and the gradient of the summed cross-entropy with respect to the logits.
        probabilities, _ = softmax(x @ weights + biases)
        gradient = probabilities - y
        weights -= rate * (x.T @ gradient)
        biases -= rate * gradient.sum(axis=0)
        # The seed measures the batch again after the update.
        train_accuracy[step], train_cross_entropy[step], _ = measure(x @ weights + biases, y)
        if (step + 1) % eval_interval == 0:
            test_accuracy[evaluation], test_cross_entropy[evaluation], _ = measure(test_x @ weights + biases, test_y)
            evaluation += 1

    return {
        "train_accuracy": train_accuracy,
        "train_cross_entropy": train_cross_entropy,
        "test_steps": np.array(test_steps, dtype=np.int64),
        "test_accuracy": test_accuracy,
        "test_cross_entropy": test_cross_entropy,
        "weights": weights,
        "biases": biases,
        "test_probabilities": measure(test_x @ weights + biases, test_y)[2],
    }


def truncated_normal(shape: tuple[int, ...], stddev: float, seed: int) -> np.ndarray:
    """Normal draws with every value beyond two standard deviations redrawn, as Keras' initializer.

    The same distribution as ``keras.initializers.TruncatedNormal``, not the same numbers; the
    benchmark and the tests pass Keras' own initial weights to ``train_numpy`` when they compare.
    """
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    while (outside := np.abs(values) > 2).any():
        values[outside] = rng.standard_normal(int(outside.sum()))
    return (values * stddev).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The reference process: raw IDX files in, trained model and test-set scores out


def read_idx(directory: Path, name: str, expected_sha256: str | None) -> np.ndarray:
    """Read ``<name>.gz`` (or ``<name>``) from ``directory`` and return its uint8 array.

    Like the fetch stage, the uncompressed bytes are checked against their SHA-256 when a digest is
    given; like pipeline.idx, the header must fit the payload.
    """
    directory = Path(directory)
    gz_path, plain_path = directory / f"{name}.gz", directory / name
    data = gzip.decompress(gz_path.read_bytes()) if gz_path.is_file() else plain_path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(f"{directory / name}: SHA-256 mismatch; not the MNIST file {name}")
    zero, type_code, num_dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code != 0x08 or num_dims not in (1, 3):
        raise ValueError(f"{directory / name} is not an MNIST IDX file")
    shape = struct.unpack(f">{num_dims}I", data[4 : 4 + 4 * num_dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{directory / name} is truncated")
    return array.reshape(shape)


def load_mirror(mirror: Path, validation_size: int, verify: bool = True) -> dict[str, np.ndarray]:
    """The processed arrays (as pipeline.preprocess writes them) straight from the four IDX files."""
    mirror = Path(mirror)
    expected = {}
    if verify:
        from pipeline.data import EXPECTED_SHA256  # stdlib and NumPy only

        expected = EXPECTED_SHA256
    eye = np.eye(NUM_CLASSES, dtype=np.uint8)
    arrays = {}
    for split, (images_name, labels_name) in RAW_FILES.items():
        images = read_idx(mirror, images_name, expected.get(images_name))
        labels = read_idx(mirror, labels_name, expected.get(labels_name))
        if len(images) != len(labels) or labels.max() >= NUM_CLASSES:
            raise ValueError(f"{mirror}: the {split} images and labels do not match")
        images = np.ascontiguousarray(images.reshape(len(images), NUM_PIXELS))
        if split == "train":
            arrays["validation_images"], arrays["validation_labels"] = (
                images[:validation_size],
                eye[labels[:validation_size]],
            )
            images, labels = images[validation_size:], labels[validation_size:]
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, eye[labels]
    return arrays


def load_processed(data_dir: Path) -> dict[str, np.ndarray]:
    """The train and test arrays the preprocess stage wrote."""
    return {
        f"{split}_{kind}": np.load(Path(data_dir) / f"{split}_{kind}.npy", allow_pickle=False)
        for split in ("train", "test")
        for kind in ("images", "labels")
    }


def report(result: dict[str, np.ndarray], test_labels: np.ndarray) -> dict:
    """The trivial report: test accuracy, cross-entropy per image and the confusion matrix."""
    labels = np.asarray(test_labels).argmax(axis=1)
    probabilities = result["test_probabilities"]
    predicted = probabilities.argmax(axis=1)
    true_class = np.clip(probabilities[np.arange(len(labels)), labels], 1e-30, 1.0)
    confusion = np.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )
    recall = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return {
        "test_accuracy": float(np.mean(predicted == labels)),
        "test_cross_entropy_per_image": float(-np.log(true_class).mean()),
        "macro_recall": float(recall.mean()),
        "final_train_accuracy": float(result["train_accuracy"][-1]),
        "final_train_cross_entropy": float(result["train_cross_entropy"][-1]),
        "confusion": confusion.tolist(),
    }


def write_outputs(out_dir: Path, result: dict[str, np.ndarray], metrics: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tests = dict(
        zip(result["test_steps"].tolist(), zip(result["test_accuracy"].tolist(), result["test_cross_entropy"].tolist()))
    )
    lines = ["step,train_accuracy,train_cross_entropy,test_accuracy,test_cross_entropy"]
    for step, (accuracy, cross_entropy) in enumerate(
        zip(result["train_accuracy"].tolist(), result["train_cross_entropy"].tolist()), start=1
    ):
        test = tests.get(step)
        lines.append(f"{step},{accuracy!r},{cross_entropy!r}," + (f"{test[0]!r},{test[1]!r}" if test else ","))
    (out_dir / "history.csv").write_text("\n".join(lines) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    np.savez(out_dir / "model.npz", weights=result["weights"], biases=result["biases"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--mirror", type=Path, help="directory of the four MNIST IDX files (.gz or not); default $MNIST_MIRROR"
    )
    source.add_argument("--data", type=Path, help="read the preprocess stage's arrays from this directory instead")
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params.yaml to read (default ./params.yaml)"
    )
    parser.add_argument("--iterations", type=int, help="override train.iterations")
    parser.add_argument(
        "--initial-weights",
        type=Path,
        help="an .npz with 'weights' and 'biases' to start from (default: a truncated normal drawn with train.seed)",
    )
    parser.add_argument("--out", type=Path, help="write history.csv, metrics.json and model.npz here")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the raw files")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    from pipeline.params import load_params  # PyYAML only
    from pipeline.train import batch_order  # NumPy and tqdm; TensorFlow and MLflow stay unimported

    params = load_params(args.params)
    config = params.train
    iterations = args.iterations or config.iterations
    if args.data is not None:
        data = load_processed(args.data)
    else:
        mirror = args.mirror or (Path(os.environ["MNIST_MIRROR"]) if os.environ.get("MNIST_MIRROR") else None)
        if mirror is None:
            parser.error("give --mirror DIR, --data DIR or set $MNIST_MIRROR")
        data = load_mirror(mirror, params.preprocess.validation_size, verify=not args.no_verify)
    loaded = time.perf_counter()

    if args.initial_weights is not None:
        with np.load(args.initial_weights) as initial:
            weights, biases = initial["weights"], initial["biases"]
    else:
        weights = truncated_normal((NUM_PIXELS, NUM_CLASSES), 0.1, config.seed)
        biases = np.zeros(NUM_CLASSES, np.float32)
    order = batch_order(len(data["train_images"]), config.batch_size, iterations, config.seed)
    result = train_numpy(
        data["train_images"],
        data["train_labels"],
        data["test_images"],
        data["test_labels"],
        weights,
        biases,
        order,
        config.learning_rate,
        config.eval_interval,
    )
    trained = time.perf_counter()

    metrics = report(result, data["test_labels"])
    if args.out is not None:
        write_outputs(args.out, result, metrics)
    summary = {
        "load_seconds": loaded - started,
        "train_seconds": trained - loaded,
        "total_seconds": time.perf_counter() - started,
        **{key: value for key, value in metrics.items() if key != "confusion"},
    }
    print(json.dumps(summary), file=sys.stdout)
    return summary


if __name__ == "__main__":
    main()
