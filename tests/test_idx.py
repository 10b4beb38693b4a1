"""Unit tests for pipeline.idx: encoding round trips and a clear, file-naming error for each defect."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from idx_fixtures import TRAIN_IMAGES, TRAIN_LABELS, gzip_bomb, make_mnist, write_idx, write_mnist

from pipeline.data import SIZE_LIMIT
from pipeline.idx import (
    IdxError,
    check_images,
    check_labels,
    check_pair,
    encode_idx,
    gunzip,
    is_gzip,
    parse_idx,
    read_bytes,
    read_images,
    read_labels,
    sha256,
)

NAME = "some-dir/train-images-idx3-ubyte"
LIMIT = SIZE_LIMIT[TRAIN_IMAGES]


@pytest.fixture
def arrays():
    return make_mnist(train_count=5, test_count=3, seed=1)


def test_round_trip_images_and_labels(arrays):
    images, labels = arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS]
    assert np.array_equal(parse_idx(encode_idx(images), "images"), images)
    assert np.array_equal(parse_idx(encode_idx(labels), "labels"), labels)
    header = encode_idx(images)[:16]
    assert struct.unpack(">IIII", header) == (0x00000803, 5, 28, 28)
    assert struct.unpack(">II", encode_idx(labels)[:8]) == (0x00000801, 5)


def test_round_trip_through_gzip_files(tmp_path):
    written = write_mnist(tmp_path, train_count=4, test_count=2, gz=True)
    assert is_gzip((tmp_path / f"{TRAIN_IMAGES}.gz").read_bytes())
    assert np.array_equal(read_images(tmp_path / f"{TRAIN_IMAGES}.gz"), written[TRAIN_IMAGES])
    assert np.array_equal(read_labels(tmp_path / f"{TRAIN_LABELS}.gz"), written[TRAIN_LABELS])


def test_empty_arrays_round_trip():
    empty = np.zeros((0, 28, 28), dtype=np.uint8)
    assert parse_idx(encode_idx(empty), "empty").shape == (0, 28, 28)


def test_encode_refuses_wrong_dtype_or_rank():
    with pytest.raises(ValueError, match="uint8"):
        encode_idx(np.zeros((2, 28, 28), dtype=np.int32))
    with pytest.raises(ValueError, match="dimensions"):
        encode_idx(np.zeros((2, 784), dtype=np.uint8))


def test_sha256_is_of_the_given_bytes():
    assert sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_not_gzip_is_reported_by_name():
    with pytest.raises(IdxError, match=f"{NAME}.gz is not a valid gzip file"):
        gunzip(b"\x1f\x8bthis is not deflate data", f"{NAME}.gz", LIMIT)


def test_truncated_gzip_is_reported_by_name(arrays):
    data = gzip.compress(encode_idx(arrays[TRAIN_IMAGES]))
    with pytest.raises(IdxError, match=f"{NAME}.gz is not a valid gzip file.*truncated"):
        gunzip(data[: len(data) // 2], f"{NAME}.gz", LIMIT)


def test_data_after_the_gzip_end_is_reported(arrays):
    data = gzip.compress(encode_idx(arrays[TRAIN_IMAGES]))
    with pytest.raises(IdxError, match=f"{NAME}.gz is not a valid gzip file.*data after its end"):
        gunzip(data + b"trailing junk", f"{NAME}.gz", LIMIT)


def test_gzip_bomb_stops_at_the_limit():
    # 1 MiB of gzip that would inflate to 1 GiB; only the limit plus one byte is ever inflated.
    bomb = gzip_bomb(1024)
    assert len(bomb) < 2 << 20
    with pytest.raises(
        IdxError, match=f"{NAME}.gz inflates to more than {SIZE_LIMIT[TRAIN_LABELS]:,} bytes, more than"
    ):
        gunzip(bomb, f"{NAME}.gz", SIZE_LIMIT[TRAIN_LABELS])


def test_gzip_bomb_helper_is_a_valid_gzip_file():
    assert gzip.decompress(gzip_bomb(3)) == bytes(3 << 20)


def test_gunzip_returns_exactly_the_limit():
    assert gunzip(gzip.compress(b"x" * 100), NAME, 100) == b"x" * 100
    with pytest.raises(IdxError, match="inflates to more than 99 bytes"):
        gunzip(gzip.compress(b"x" * 100), NAME, 99)


def test_truncated_gzip_file_read_from_disk(tmp_path, arrays):
    path = tmp_path / f"{TRAIN_IMAGES}.gz"
    data = gzip.compress(encode_idx(arrays[TRAIN_IMAGES]))
    path.write_bytes(data[:-10])
    with pytest.raises(IdxError, match=str(path)):
        read_images(path)


def test_wrong_magic_is_reported_by_name(arrays):
    data = bytearray(encode_idx(arrays[TRAIN_IMAGES]))
    data[2] = 0x0D  # float type code instead of unsigned byte
    with pytest.raises(IdxError, match=f"{NAME} has magic number 0x00000d03"):
        parse_idx(bytes(data), NAME)


def test_html_instead_of_idx_is_a_wrong_magic():
    with pytest.raises(IdxError, match=f"{NAME} has magic number .* not an MNIST IDX file"):
        parse_idx(b"<!DOCTYPE html><html>Not Found</html>", NAME)


def test_too_short_is_reported_by_name():
    with pytest.raises(IdxError, match=f"{NAME} is too short"):
        parse_idx(b"\x00\x00", NAME)


def test_header_ending_early_is_reported_by_name():
    with pytest.raises(IdxError, match=f"{NAME} ends inside its IDX header"):
        parse_idx(struct.pack(">HBB", 0, 8, 3) + struct.pack(">I", 5), NAME)


@pytest.mark.parametrize("declared", [4, 6])
def test_header_count_not_matching_payload(arrays, declared):
    data = bytearray(encode_idx(arrays[TRAIN_IMAGES]))  # 5 images
    data[4:8] = struct.pack(">I", declared)
    with pytest.raises(IdxError, match=f"{NAME} declares shape \\({declared}, 28, 28\\).*header count"):
        parse_idx(bytes(data), NAME)


def test_truncated_payload(arrays):
    data = encode_idx(arrays[TRAIN_IMAGES])
    with pytest.raises(IdxError, match=f"{NAME} declares shape .* but holds"):
        parse_idx(data[:-1], NAME)


def test_wrong_image_size_is_reported_by_name():
    images = parse_idx(encode_idx(np.zeros((3, 32, 32), dtype=np.uint8)), NAME)
    with pytest.raises(IdxError, match=f"{NAME} holds images of shape \\(32, 32\\), expected 28x28"):
        check_images(images, NAME)


def test_labels_file_given_as_images_is_reported(arrays):
    labels = parse_idx(encode_idx(arrays[TRAIN_LABELS]), NAME)
    with pytest.raises(IdxError, match=NAME):
        check_images(labels, NAME)


def test_label_above_nine_is_reported_by_name(tmp_path):
    path = write_idx(tmp_path / TRAIN_LABELS, np.array([0, 9, 10, 3], dtype=np.uint8))
    with pytest.raises(IdxError, match=f"{path} holds label 10; MNIST labels are 0 to 9"):
        read_labels(path)


def test_images_file_given_as_labels_is_reported(arrays):
    images = parse_idx(encode_idx(arrays[TRAIN_IMAGES]), NAME)
    with pytest.raises(IdxError, match=f"{NAME} is not a label file"):
        check_labels(images, NAME)


def test_count_mismatch_is_reported_by_name(arrays):
    images, labels = arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS][:-1]
    with pytest.raises(IdxError, match="train split: 5 images but 4 labels"):
        check_pair(images, labels, "train split")


def test_matching_counts_pass(arrays):
    check_pair(arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS], "train split")


def test_missing_file_is_reported_by_name(tmp_path):
    with pytest.raises(IdxError, match=f"{tmp_path / 'absent'} does not exist"):
        read_bytes(tmp_path / "absent")


def test_idx_error_is_a_pipeline_error():
    from pipeline.cli import PipelineError

    assert issubclass(IdxError, PipelineError)
