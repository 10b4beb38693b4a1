"""The preprocess stage: flattening, one-hot labels, the seed's validation split, and bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import run_module, snapshot, write_params
from idx_fixtures import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, write_idx, write_mnist

from pipeline.data import load_processed
from pipeline.preprocess import flatten, one_hot, split_validation


def test_flatten_keeps_pixels_in_row_major_order():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    rows = flatten(images)
    assert rows.shape == (2, 784) and rows.dtype == np.uint8
    assert np.array_equal(rows[1], images[1].ravel())


def test_one_hot_encodes_each_label():
    encoded = one_hot(np.array([5, 0, 9], dtype=np.uint8))
    assert encoded.dtype == np.uint8
    assert encoded.tolist()[0] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert encoded.sum(axis=1).tolist() == [1, 1, 1] and encoded[2, 9] == 1


def test_one_hot_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must be in"):
        one_hot(np.array([10]))


def test_validation_is_the_first_images_like_read_data_sets():
    images, labels = np.arange(10)[:, None], np.arange(10)
    (train_images, train_labels), (validation_images, validation_labels) = split_validation(images, labels, 3)
    assert validation_labels.tolist() == [0, 1, 2]
    assert train_labels.tolist() == list(range(3, 10))
    assert len(train_images) == 7 and len(validation_images) == 3


def test_stage_writes_compact_splits(tmp_path):
    arrays = write_mnist(tmp_path / "raw", train_count=30, test_count=12, gz=False)
    write_params(tmp_path, preprocess={"validation_size": 5})
    result = run_module("pipeline.preprocess", "--raw", "raw", "--out", "processed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data, digests = load_processed(tmp_path / "processed")
    assert data["train_images"].shape == (25, 784) and data["train_images"].dtype == np.uint8
    # Each file's md5, DVC's own hash of a file, of the bytes it was read from.
    files = sorted((tmp_path / "processed").iterdir())
    assert digests == {path.as_posix(): hashlib.md5(path.read_bytes()).hexdigest() for path in files}
    assert data["validation_images"].shape == (5, 784)
    assert data["test_images"].shape == (12, 784)
    assert np.array_equal(data["train_images"][0], arrays[TRAIN_IMAGES][5].ravel())
    assert np.array_equal(data["test_labels"].argmax(axis=1), arrays[TEST_LABELS])
    assert np.array_equal(data["validation_labels"].argmax(axis=1), arrays[TRAIN_LABELS][:5])
    assert not list(tmp_path.glob(".processed.*")), "no temp directory is left behind"


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda raw: (raw / TRAIN_LABELS).unlink(), "train-labels-idx1-ubyte does not exist"),
        (lambda raw: (raw / TEST_IMAGES).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 8), "ends inside its IDX header"),
        (lambda raw: (raw / TRAIN_LABELS).write_bytes(b"\x1f\x8bnot really gzip"), "not a valid gzip file"),
        (lambda raw: write_idx(raw / TEST_LABELS, np.array([1, 2, 12] + [0] * 9, dtype=np.uint8)), "holds label 12"),
        (lambda raw: write_idx(raw / TEST_LABELS, np.zeros(3, dtype=np.uint8)), "12 images but 3 labels"),
    ],
)
def test_bad_raw_data_gives_a_clear_error_and_keeps_earlier_output(tmp_path, break_it, expected):
    write_mnist(tmp_path / "raw", train_count=30, test_count=12, gz=False)
    write_params(tmp_path, preprocess={"validation_size": 5})
    assert run_module("pipeline.preprocess", "--raw", "raw", "--out", "processed", cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path / "processed")
    break_it(tmp_path / "raw")
    result = run_module("pipeline.preprocess", "--raw", "raw", "--out", "processed", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert expected in " ".join(result.stderr.split())
    assert snapshot(tmp_path / "processed") == before


def test_validation_larger_than_the_data_is_explained(tmp_path):
    write_mnist(tmp_path / "raw", train_count=30, test_count=12, gz=False)
    write_params(tmp_path, preprocess={"validation_size": 30})
    result = run_module("pipeline.preprocess", "--raw", "raw", "--out", "processed", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "validation_size (30) must be smaller than the 30 training images" in " ".join(result.stderr.split())
    assert not (tmp_path / "processed").exists()


def test_corrupt_processed_data_is_reported(tmp_path):
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed" / "test_images.npy").write_bytes(b"garbage")
    from pipeline.cli import PipelineError

    with pytest.raises(PipelineError, match="test_images.npy is corrupt"):
        load_processed(tmp_path / "processed", splits=("test",))
    with pytest.raises(PipelineError, match="train_images.npy does not exist"):
        load_processed(tmp_path / "processed", splits=("train",))


@pytest.mark.parametrize(
    ("row", "value"),
    [(3, [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]), (0, [0] * 10), (5, [0, 0, 2, 0, 0, 0, 0, 0, 0, 0]), (7, [1] * 10)],
)
def test_labels_that_are_not_one_hot_are_refused_naming_the_first_bad_row(tmp_path, row, value):
    """Rewritten in place (so that DVC need not notice), labels that are no longer one-hot would train garbage."""
    labels = np.eye(10, dtype=np.uint8)[np.arange(12) % 10]
    labels[row] = value
    np.save(tmp_path / "test_images.npy", np.zeros((12, 784), np.uint8))
    np.save(tmp_path / "test_labels.npy", labels)
    from pipeline.cli import PipelineError

    with pytest.raises(PipelineError) as raised:
        load_processed(tmp_path, splits=("test",))
    message = str(raised.value)
    assert f"not one-hot (a single 1 among 0s) in 1 of its 12 rows, the first row {row}: {value}." in message
    assert "dvc repro -f preprocess" in message


def test_a_validation_size_of_zero_means_no_validation_split(tmp_path):
    write_mnist(tmp_path / "raw", train_count=30, test_count=12, gz=False)
    write_params(tmp_path, preprocess={"validation_size": 0})
    result = run_module("pipeline.preprocess", "--raw", "raw", "--out", "processed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data, _ = load_processed(tmp_path / "processed")
    assert data["train_images"].shape == (30, 784) and data["validation_images"].shape == (0, 784)


def test_a_full_disk_is_a_clear_error_and_leaves_the_previous_output(tmp_path, small_disk):
    write_mnist(tmp_path / "raw", train_count=300, test_count=12, gz=False)
    write_params(tmp_path, preprocess={"validation_size": 10})
    out = small_disk / "processed"
    out.mkdir()
    (out / "earlier.txt").write_text("the previous output")
    result = run_module("pipeline.preprocess", "--raw", "raw", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.split())
    # NumPy reports a short write on a full disk without an errno ("227360 requested and 3968 written").
    assert f"cannot write {out} (" in message and "the arrays need about 247,728 bytes" in message, message
    assert "bytes are free there" in message and "Nothing half-written was left" in message
    # The previous output is as it was, and no temp folder is left on the full disk.
    assert sorted(path.name for path in small_disk.iterdir()) == ["processed"]
    assert (out / "earlier.txt").read_text() == "the previous output"
