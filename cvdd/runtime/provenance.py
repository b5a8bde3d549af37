"""Where a record came from: the library versions, the code's commit and the device that made it.

Every stage stamps it into what it writes (teachers, sets, labels, results, measured priors), and the report flags
the rows of one table that came from different versions. "Deterministic" in this project means: the same config
and seed give the same artifacts *with the same versions on the same kind of device*; another torch release or
another CPU instruction set may change float rounding, and with it a student's top-1 by a few tenths.
"""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "torchvision", "lightning", "timm", "cvdd")
CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root when cvdd runs from a checkout


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=20, check=True
    ).stdout.strip()


@lru_cache(maxsize=1)
def code_commit() -> dict[str, Any] | None:
    """The checkout's commit and whether tracked files differ from it; ``None`` outside a git checkout."""
    if not (CHECKOUT / ".git").exists():
        return None
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """Versions of python and the libraries that decide the numbers, the code's commit, the device."""
    return {
        "versions": {"python": platform.python_version(), **{p: package_version(p) for p in PACKAGES}},
        "git": code_commit(),
        "device": device_name(),
    }


def version_signature(record: dict[str, Any]) -> str:
    """What two records must share to be compared as one protocol's numbers: library versions and code commit
    (``unrecorded`` for records written before provenance was kept)."""
    prov = record.get("provenance")
    if not prov:
        return "unrecorded"
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v)
    code = prov.get("git")
    commit = f", commit {code['commit'][:10]}{' (dirty)' if code['dirty'] else ''}" if code else ""
    return versions + commit
