"""The preprocess stage (flattening, one-hot labels, the seed's validation split, bad input) and load_processed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import run_module, snapshot, write_params
from idx_fixtures import write_idx, write_mnist

from pipeline.cli import PipelineError
from pipeline.data import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, load_processed


def preprocess(tmp_path, out: str = "processed"):
    return run_module("pipeline.preprocess", "--raw", "raw", "--out", out, cwd=tmp_path)


@pytest.mark.parametrize("validation_size", [5, 0])
def test_stage_writes_compact_splits(tmp_path, validation_size):
    arrays = write_mnist(tmp_path / "raw", train_count=30, test_count=12, gz=False)
    write_params(tmp_path, preprocess={"validation_size": validation_size})
    assert (result := preprocess(tmp_path)).returncode == 0, result.stderr
    data, digests = load_processed(tmp_path / "processed")
    # As the seed's read_data_sets: validation is the first images, pixels row-major, labels one-hot.
    assert data["train_images"].shape == (30 - validation_size, 784) and data["train_images"].dtype == np.uint8
    assert np.array_equal(data["train_images"][0], arrays[TRAIN_IMAGES][validation_size].ravel())
    assert np.array_equal(data["validation_labels"].argmax(axis=1), arrays[TRAIN_LABELS][:validation_size])
    assert np.array_equal(data["test_labels"].argmax(axis=1), arrays[TEST_LABELS])
    assert data["validation_images"].shape == (validation_size, 784) and data["test_images"].shape == (12, 784)
    # Each file's md5, DVC's own hash of a file, of the bytes it was read from.
    files = sorted((tmp_path / "processed").iterdir())
    assert digests == {path.as_posix(): hashlib.md5(path.read_bytes()).hexdigest() for path in files}
    assert len(files) == 6, "a temp file was left behind"


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda tmp: (tmp / "raw" / TRAIN_LABELS).unlink(), "raw/train-labels-idx1-ubyte does not exist"),
        (lambda tmp: (tmp / "raw" / TEST_IMAGES).write_bytes(b"\x00\x00\x08\x03" + bytes(8)), "is not an IDX file"),
        (lambda tmp: (tmp / "raw" / TRAIN_LABELS).write_bytes(b"\x1f\x8bnot really IDX"), "is not an IDX file"),
        (lambda tmp: write_idx(tmp / "raw" / TEST_LABELS, np.array([1, 12] + [0] * 10, np.uint8)), "the largest 12"),
        (lambda tmp: write_idx(tmp / "raw" / TEST_LABELS, np.zeros(3, np.uint8)), "12 images and 3 labels"),
        (
            lambda tmp: write_params(tmp, preprocess={"validation_size": 30}),
            "validation_size (30) must be smaller than the 30 training images",
        ),
    ],
)
def test_bad_raw_data_gives_a_clear_error_and_keeps_earlier_output(tmp_path, break_it, expected):
    write_mnist(tmp_path / "raw", train_count=30, test_count=12, gz=False)
    write_params(tmp_path, preprocess={"validation_size": 5})
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed" / "earlier.txt").write_text("the previous output")
    before = snapshot(tmp_path)
    break_it(tmp_path)
    result = preprocess(tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert expected in " ".join(result.stderr.split())
    assert snapshot(tmp_path / "processed") == {"earlier.txt": before["processed/earlier.txt"]}


LABELS = np.eye(10, dtype=np.uint8)[np.arange(12) % 10]
# Rewritten in place (so that DVC need not notice), labels that are no longer one-hot would train garbage.
NOT_ONE_HOT = LABELS.copy()
NOT_ONE_HOT[[3, 5, 7, 9]] = [[0, 1, 0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 2, 0, 0, 0, 0, 0, 0, 0], [1] * 10, [0] * 10]


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda tmp: (tmp / "test_images.npy").write_bytes(b"garbage"), "test_images.npy is corrupt"),
        (lambda tmp: (tmp / "test_labels.npy").unlink(), "test_labels.npy does not exist; run the preprocess stage"),
        (lambda tmp: np.save(tmp / "test_images.npy", np.zeros((12, 28, 28), np.uint8)), "are not as many uint8 rows"),
        (lambda tmp: np.save(tmp / "test_labels.npy", np.arange(12)), "are not as many uint8 rows"),
        (
            lambda tmp: np.save(tmp / "test_labels.npy", NOT_ONE_HOT),
            "not one-hot (a single 1 among 0s) in 4 of its 12 rows, the first row 3: [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]. "
            "Preprocess writes only one-hot rows, so the file was changed since; rerun it (dvc repro -f preprocess",
        ),
    ],
)
def test_missing_or_corrupt_processed_data_is_reported(tmp_path, write, expected):
    np.save(tmp_path / "test_images.npy", np.zeros((12, 784), np.uint8))
    np.save(tmp_path / "test_labels.npy", LABELS)
    write(tmp_path)
    with pytest.raises(PipelineError) as raised:
        load_processed(tmp_path, splits=("test",))
    assert expected in str(raised.value)


def test_a_full_disk_is_a_clear_error_and_leaves_the_previous_output(tmp_path, small_disk):
    write_mnist(tmp_path / "raw", train_count=300, test_count=12, gz=False)
    write_params(tmp_path, preprocess={"validation_size": 10})
    out = small_disk / "processed"
    out.mkdir()
    (out / "earlier.txt").write_text("the previous output")
    result = preprocess(tmp_path, str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.split())
    # NumPy reports a short write on a full disk without an errno ("227360 requested and 3968 written").
    assert f"cannot write {out} (" in message and "the arrays need about 247,728 bytes" in message, message
    assert "Nothing half-written was left" in message
    assert snapshot(small_disk) == {"processed/earlier.txt": b"the previous output"}
