"""A plain NumPy implementation of the seed's training, to measure the pipeline against.

``train_numpy`` is the algorithm of ``pipeline.model.SgdTrainer`` driven by ``pipeline.train.train``
(tests/test_reference.py checks it step for step): one Dense(10, softmax) layer, pixels times
float32(1/255), the cross-entropy summed over the batch (computed from the logits, so it stays
finite), plain SGD, the batch measured again after each update and the whole test set every
``eval_interval`` steps; everything in float32.

Run as a program it is the *NumPy reference process*: the pipeline's work without the pipeline. It
reads the four IDX files of ``--mirror`` (verified by SHA-256, split and one-hot encoded as
preprocess does) or the preprocess stage's arrays (``--data``), trains, and writes the history, the
weights and the test scores (``--out``); it prints a JSON summary. It never imports TensorFlow,
Keras or MLflow.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline.data import EXPECTED_SHA256, PIXEL_SCALE, RAW_PAIRS

# The arrays train_numpy takes, in its order.
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise softmax of float32 logits, shifted by the row maximum, with the shifted logits and the sums."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    sums = exponentials.sum(axis=1, keepdims=True)
    return exponentials / sums, shifted, sums


def measure(logits: np.ndarray, labels: np.ndarray) -> tuple[np.float32, np.float32, np.ndarray]:
    """Accuracy, cross-entropy summed over the rows, and the probabilities, from float32 logits.

    The cross-entropy is ``sum(labels * (logsumexp(logits) - logits))``, what TensorFlow computes for a
    softmax layer's output, so it stays finite where log(softmax) would underflow.
    """
    probabilities, shifted, sums = softmax(logits)
    cross_entropy = np.float32((labels * (np.log(sums) - shifted)).sum(dtype=np.float32))
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
    """One SGD step per row of ``batch_order`` (example indices) from ``weights`` (784, 10) and ``biases``.

    Images are uint8 rows of 784 pixels, labels one-hot rows of 10; the inputs are not changed.
    Returns float32 arrays: ``train_accuracy`` and ``train_cross_entropy`` per step, ``test_steps``,
    ``test_accuracy`` and ``test_cross_entropy`` per evaluation, the final ``weights`` and ``biases``
    and ``test_probabilities``.
    """
    weights, biases = np.array(weights, np.float32), np.array(biases, np.float32)
    rate = np.float32(learning_rate)
    train_labels = np.asarray(train_labels, np.float32)
    test_x, test_y = test_images.astype(np.float32) * PIXEL_SCALE, np.asarray(test_labels, np.float32)
    steps = len(batch_order)
    train_accuracy, train_cross_entropy = np.empty(steps, np.float32), np.empty(steps, np.float32)
    test_accuracy, test_cross_entropy = [], []
    for step, indices in enumerate(batch_order, start=1):
        x = train_images[indices].astype(np.float32) * PIXEL_SCALE
        y = train_labels[indices]
        # The gradient of the summed cross-entropy with respect to the logits is probabilities - labels.
        gradient = softmax(x @ weights + biases)[0] - y
        weights -= rate * (x.T @ gradient)
        biases -= rate * gradient.sum(axis=0)
        train_accuracy[step - 1], train_cross_entropy[step - 1], _ = measure(x @ weights + biases, y)
        if step % eval_interval == 0:
            accuracy, cross_entropy, _ = measure(test_x @ weights + biases, test_y)
            test_accuracy.append(accuracy)
            test_cross_entropy.append(cross_entropy)
    return {
        "train_accuracy": train_accuracy,
        "train_cross_entropy": train_cross_entropy,
        "test_steps": np.arange(eval_interval, steps + 1, eval_interval),
        "test_accuracy": np.array(test_accuracy, np.float32),
        "test_cross_entropy": np.array(test_cross_entropy, np.float32),
        "weights": weights,
        "biases": biases,
        "test_probabilities": measure(test_x @ weights + biases, test_y)[2],
    }


def batch_order(num_examples: int, batch_size: int, iterations: int, seed: int) -> np.ndarray:
    """Every step's batch, as pipeline.train's BatchOrder draws them: shuffled epochs laid end to end."""
    rng = np.random.default_rng(seed)
    epochs = -(-iterations * batch_size // num_examples)
    indices = np.concatenate([rng.permutation(num_examples).astype(np.int32) for _ in range(epochs)])
    return indices[: iterations * batch_size].reshape(iterations, batch_size)


def truncated_normal(shape: tuple[int, ...], stddev: float, seed: int) -> np.ndarray:
    """Keras' TruncatedNormal distribution (draws beyond two deviations drawn again), not its numbers."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    while (outside := np.abs(values) > 2).any():
        values[outside] = rng.standard_normal(int(outside.sum()))
    return (values * stddev).astype(np.float32)


def read_idx(directory: Path, name: str, verify: bool) -> np.ndarray:
    """The uint8 array of ``<name>.gz`` (or ``<name>``) in ``directory``, checked against its SHA-256."""
    gz = directory / f"{name}.gz"
    data = gzip.decompress(gz.read_bytes()) if gz.is_file() else (directory / name).read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != EXPECTED_SHA256[name]:
        raise SystemExit(f"error: {directory / name} is not the MNIST file {name} (SHA-256 mismatch)")
    dimensions = data[3]
    shape = np.frombuffer(data, ">u4", dimensions, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dimensions).reshape(shape)


def load_mirror(mirror: Path, validation_size: int, verify: bool = True) -> dict[str, np.ndarray]:
    """The train and test arrays as preprocess writes them, straight from the four IDX files."""
    eye = np.eye(10, dtype=np.uint8)
    arrays = {}
    for split, (images_name, labels_name) in RAW_PAIRS.items():
        images, labels = read_idx(mirror, images_name, verify), read_idx(mirror, labels_name, verify)
        skip = validation_size if split == "train" else 0
        arrays[f"{split}_images"] = images[skip:].reshape(-1, 784)
        arrays[f"{split}_labels"] = eye[labels[skip:]]
    return arrays


def write_outputs(out: Path, result: dict[str, np.ndarray], summary: dict) -> None:
    """The history (one row per step, the test columns empty between evaluations), weights and scores."""
    out.mkdir(parents=True, exist_ok=True)
    tests = dict(zip(result["test_steps"].tolist(), zip(result["test_accuracy"], result["test_cross_entropy"])))
    lines = ["step,train_accuracy,train_cross_entropy,test_accuracy,test_cross_entropy"]
    for step, train in enumerate(zip(result["train_accuracy"], result["train_cross_entropy"]), start=1):
        lines.append(",".join([str(step), *(repr(float(value)) for value in train + tests.get(step, ()))]))
        lines[-1] += "" if step in tests else ",,"
    (out / "history.csv").write_text("\n".join(lines) + "\n")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    np.savez(out / "model.npz", weights=result["weights"], biases=result["biases"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mirror", type=Path, help="directory of the four MNIST IDX files (.gz or not)")
    source.add_argument("--data", type=Path, help="directory of the preprocess stage's .npy arrays")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--iterations", type=int, help="instead of train.iterations")
    parser.add_argument("--initial-weights", type=Path, help="an .npz of 'weights' and 'biases' to start from")
    parser.add_argument("--out", type=Path, help="write history.csv, metrics.json and model.npz here")
    parser.add_argument("--no-verify", action="store_true", help="skip the raw files' SHA-256 check")
    args = parser.parse_args()

    started = time.perf_counter()
    params = yaml.safe_load(args.params.read_text())
    config = params["train"]
    iterations = args.iterations or config["iterations"]
    if args.data:
        data = {name: np.load(args.data / f"{name}.npy") for name in ARRAYS}
    else:
        data = load_mirror(args.mirror, params["preprocess"]["validation_size"], verify=not args.no_verify)
    if args.initial_weights:
        with np.load(args.initial_weights) as initial:
            weights, biases = initial["weights"], initial["biases"]
    else:
        weights, biases = truncated_normal((784, 10), 0.1, config["seed"]), np.zeros(10, np.float32)
    loaded = time.perf_counter()
    order = batch_order(len(data["train_images"]), config["batch_size"], iterations, config["seed"])
    result = train_numpy(
        *map(data.get, ARRAYS), weights, biases, order, config["learning_rate"], config["eval_interval"]
    )
    trained = time.perf_counter()

    labels, predicted = data["test_labels"].argmax(axis=1), result["test_probabilities"].argmax(axis=1)
    summary = {
        "load_seconds": loaded - started,
        "train_seconds": trained - loaded,
        "test_accuracy": float(result["test_accuracy"][-1]) if len(result["test_accuracy"]) else None,
        "test_cross_entropy": float(result["test_cross_entropy"][-1]) if len(result["test_cross_entropy"]) else None,
        "confusion": np.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10).tolist(),
    }
    if args.out:
        write_outputs(args.out, result, summary)
    print(json.dumps({key: value for key, value in summary.items() if key != "confusion"}))


if __name__ == "__main__":
    main()
