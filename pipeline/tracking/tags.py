"""What a run is tagged with: its commit, its data, its DVC experiment and its environment (read from git,
uv.lock and the distributions' metadata, so nothing heavy is imported to learn a version)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

# The packages whose versions can change a result; TensorFlow is tensorflow-cpu on Linux x86-64.
ENVIRONMENT_PACKAGES = {"tensorflow": ("tensorflow-cpu", "tensorflow")} | {
    name: (name,) for name in ("keras", "numpy", "scikit-learn", "dvc", "mlflow")
}
# The extensions TensorFlow's CPU kernels choose their code by: CPUs differing in them round differently.
KERNEL_ISA_FLAGS = (
    *("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16"),
    *("amx_tile", "amx_bf16", "amx_int8"),
)


def installed(names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of the distributions ``names`` that is installed, as (name, version)."""
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return name, metadata.version(name)
    return None


def cpu() -> str:
    """The CPU's model and kernel-relevant extensions, and any setting that limits what TensorFlow uses."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
        model, flags = fields.get("model name", model), set(fields.get("flags", "").split())
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
        versions[label] = found[1] if (found := installed(names)) else "not installed"
    lock = root / "uv.lock"
    versions["uv_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none"
    return versions


def model_requirements() -> list[str]:
    """Pinned pip requirements for the logged model: the distributions installed from uv.lock."""
    found = (installed(ENVIRONMENT_PACKAGES[label]) for label in ("tensorflow", "keras", "numpy"))
    return [f"{name}=={version}" for name, version in filter(None, found)]


def git_info(root: Path) -> dict[str, str]:
    """The commit the run started from (a queued experiment's baseline) and whether sources or params differ from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git("rev-parse", "HEAD") or "unknown"
    # Against that commit, not HEAD, so that an experiment's -S changes count; dvc.lock and metrics/ do not.
    changed = None if commit == "unknown" else git("diff", "--name-only", commit, "--", ".", ":!dvc.lock", ":!metrics")
    return {"git.commit": commit, "git.dirty": "unknown" if changed is None else str(bool(changed)).lower()}


def run_tags(root: Path, data: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags linking a run to its commit, data (the md5 of each file the stage read), DVC experiment and environment."""
    tags = {**git_info(root), **{f"data.{path}": md5 for path, md5 in (data or {}).items()}}
    tags.update({f"env.{key}": value for key, value in environment(root).items()})
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    return tags
