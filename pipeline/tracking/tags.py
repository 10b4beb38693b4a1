"""What a run is tagged with: its commit, its data, its DVC experiment and its environment.

Everything here is read from the working copy the stage runs in (:func:`store.project_root`): its
git state and its ``uv.lock``; the data's digests come from the files the stage read. Package
versions come from the installed distributions' metadata, so nothing heavy is imported to learn them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

# The packages whose versions can change a result, by distribution name. TensorFlow is installed as
# tensorflow-cpu on Linux x86-64 and as tensorflow elsewhere (pyproject.toml); either is "tensorflow".
ENVIRONMENT_PACKAGES = {
    "tensorflow": ("tensorflow-cpu", "tensorflow"),
    "keras": ("keras",),
    "numpy": ("numpy",),
    "scikit-learn": ("scikit-learn",),
    "dvc": ("dvc",),
    "mlflow": ("mlflow",),
}
LOCK_FILE = "uv.lock"
# The instruction-set extensions TensorFlow's CPU kernels (XLA, oneDNN, Eigen) choose their code by:
# two CPUs that differ in these round differently in the last bits (see pipeline.reproduce).
KERNEL_ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip
# What a logged model needs to be loaded and served, in the exact versions this run used.
MODEL_PACKAGES = ("tensorflow", "keras", "numpy")


def installed(names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of the distributions ``names`` that is installed, as (name, version)."""
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu() -> str:
    """The CPU's model and kernel-relevant extensions, and any setting that limits what TensorFlow uses."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
        model, flags = fields.get("model name", model), set(fields.get("flags", "").split())
    except OSError:
        pass
    text = f"{model} ({platform.machine()}: {' '.join(flag for flag in KERNEL_ISA_FLAGS if flag in flags)})"
    if limit := re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", "")):
        text += f", XLA limited to {limit.group(1)}"
    if "TF_ENABLE_ONEDNN_OPTS" in os.environ:
        text += f", TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}"
    return text


def environment(root: Path) -> dict[str, str]:
    """Python, the CPU, the key packages' versions, and the SHA-256 of ``root``'s uv.lock."""
    versions = {"python": platform.python_version(), "cpu": cpu()}
    for label, names in ENVIRONMENT_PACKAGES.items():
        found = installed(names)
        versions[label] = found[1] if found else "not installed"
    lock = root / LOCK_FILE
    versions["uv_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none"
    return versions


def model_requirements() -> list[str]:
    """Pinned pip requirements for the logged model: the distributions installed from uv.lock."""
    requirements = []
    for label in MODEL_PACKAGES:
        found = installed(ENVIRONMENT_PACKAGES[label])
        if found:
            requirements.append(f"{found[0]}=={found[1]}")
    return requirements


def git_info(root: Path) -> dict[str, str]:
    """The commit the run started from and whether tracked sources differed from it."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    # An experiment's own commit does not exist yet while it runs; DVC names the one it started from.
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git("rev-parse", "HEAD") or "unknown"
    # Compared with that commit rather than with HEAD, so an experiment's -S changes to params.yaml
    # count in a queued copy too. Outputs that the pipeline itself rewrites while it runs
    # (dvc.lock, metrics/) do not count as a dirty tree; a changed source file or params.yaml does.
    changed = None if commit == "unknown" else git("diff", "--name-only", commit, "--", ".", ":!dvc.lock", ":!metrics")
    dirty = "unknown" if changed is None else str(bool(changed)).lower()
    return {"git.commit": commit, "git.dirty": dirty}


def run_tags(root: Path, data: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags linking a run to its commit, data, DVC experiment and environment.

    ``data`` holds the md5 of each data file the stage read, by path (see pipeline.data.load_processed):
    what it really read, which dvc.lock only claims.
    """
    tags = {**git_info(root), **{f"data.{path}": md5 for path, md5 in (data or {}).items()}}
    tags.update({f"env.{key}": value for key, value in environment(root).items()})
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    return tags
