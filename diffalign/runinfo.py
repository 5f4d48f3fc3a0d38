"""Where a figure came from: library versions, torch threads, processes and devices of a run.

Every ``diffalign train`` run appends one record to ``OUT/run_info.jsonl`` each time it starts or
resumes (``diffalign reno`` writes one into its output folder), so a number in ``eval.jsonl`` can be
traced to the environment that produced it. Float sums differ across CPUs, thread counts and library
versions, so two runs of one config agree exactly only when these records do.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "diffalign",
    "torch",
    "torchvision",
    "diffusers",
    "peft",
    "transformers",
    "accelerate",
    "open_clip_torch",
    "safetensors",
    "numpy",
    "xformers",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (``None`` when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the diffalign checkout (with ``+dirty`` for local changes), or None if not a checkout."""
    root = Path(path or Path(__file__).resolve().parent.parent)
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment_info(num_processes: int = 1, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions, threads, processes and hardware of this process, as one JSON-able dict."""
    info: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "num_processes": num_processes,
        "device": str(device),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
    return info


def append_run_info(out_dir: str | os.PathLike, **extra: Any) -> Path:
    """Append this process's :func:`environment_info` (plus ``extra``) to ``out_dir/run_info.jsonl``."""
    path = Path(out_dir) / "run_info.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = environment_info(extra.pop("num_processes", 1), extra.pop("device", "cpu")) | extra
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return path
