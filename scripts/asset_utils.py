"""What the shapes-asset training scripts share: a timestamped log and an atomic torch.save."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def log(work: Path, msg: str) -> None:
    """Print ``msg`` with a time stamp and append it to ``work/log.txt``."""
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(work / "log.txt", "a") as f:
        f.write(line + "\n")


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
