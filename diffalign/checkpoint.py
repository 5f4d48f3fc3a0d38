"""Atomic checkpoints and exact resume.

``OUT/checkpoints/step_N/`` holds everything a resumed run needs to continue bit for bit:

    lora.safetensors   the trainable LoRA tensors by parameter name (exact fp32 values)
    lora/              the same adapter in diffusers format (usable directly: pipe.load_lora_weights)
    state.pt           step, optimizer, LR scheduler, grad scaler, prompt-stream position, method state
                       (e.g. DDPO's stat tracker), evaluator state, and the line counts of metrics.jsonl
                       and eval.jsonl at this step (resume truncates both files to them)
    rng_<rank>.pt      per process: python, numpy, torch CPU (and CUDA) RNG states and the states of
                       every generator the trainer owns
    meta.json          step, number of processes, LoRA rank; written last

A checkpoint is written into ``checkpoints/.tmp-step_N``, every file fsynced, then renamed to
``step_N`` in one ``os.replace``: a run killed at any moment leaves either a complete checkpoint or
a temporary directory that resume ignores and removes. All files load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffalign.errors import DiffalignError

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Test hook: "kill:N" SIGKILLs this process half-way through writing checkpoint N; "sleep:S" sleeps S seconds there.
HOOK_ENV = "DIFFALIGN_CHECKPOINT_HOOK"


# -------------------------------------------------------------------------------------------- RNG
def capture_rng(owned: dict[str, torch.Generator | random.Random]) -> dict[str, Any]:
    """Global RNG states (python, numpy, torch CPU, CUDA) and those of ``owned`` generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "owned": {},
    }
    for name, gen in owned.items():
        state["owned"][name] = gen.getstate() if isinstance(gen, random.Random) else gen.get_state()
    return state


def restore_rng(state: dict[str, Any], owned: dict[str, torch.Generator | random.Random]) -> None:
    random.setstate(_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in owned.items():
        if name not in state["owned"]:
            raise DiffalignError(f"checkpoint has no state for generator {name!r}; it was written by another version")
        saved = state["owned"][name]
        if isinstance(gen, random.Random):
            gen.setstate(_tuple(saved))
        else:
            gen.set_state(saved)


def _tuple(x: Any) -> Any:
    """random.setstate wants tuples; torch.load may give lists back."""
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------- files
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _hook(step: int) -> None:
    spec = os.environ.get(HOOK_ENV, "")
    action, _, arg = spec.partition(":")
    if action == "kill" and arg and int(arg) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sleep" and arg:
        time.sleep(float(arg))


@dataclass
class Loaded:
    """A checkpoint read back for this process."""

    path: Path
    step: int
    state: dict[str, Any]
    lora: dict[str, torch.Tensor]
    rng: dict[str, Any]


class Checkpointer:
    """Writes, lists, prunes and reads ``OUT/checkpoints/step_N``; coordinates processes via ``accelerator``."""

    def __init__(self, output_dir: str | Path, keep: int, accelerator: Any) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.acc = accelerator

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (with meta.json), oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "meta.json").is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def resolve(self, resume: str) -> Path | None:
        """``latest`` -> the newest complete checkpoint (None if there is none); else a checkpoint path."""
        if resume == "latest":
            return self.latest()
        path = Path(resume).expanduser()
        if not (path / "meta.json").is_file():
            raise DiffalignError(
                f"no checkpoint at {resume}: expected a directory like OUT/checkpoints/step_N with meta.json "
                "(or --resume latest)"
            )
        return path

    def clean_partial(self) -> None:
        """Remove leftovers of interrupted saves (main process)."""
        if self.acc.is_main_process and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)
        self.acc.wait_for_everyone()

    def remove_after(self, step: int) -> list[Path]:
        """Delete checkpoints newer than ``step`` (resuming from an older one starts a new branch)."""
        removed = []
        if self.acc.is_main_process:
            for s, p in self.checkpoints():
                if s > step:
                    self._discard(p)
                    removed.append(p)
        self.acc.wait_for_everyone()
        return removed

    def _discard(self, path: Path) -> None:
        trash = path.with_name(f".trash-{path.name}")
        os.replace(path, trash)  # a half-deleted checkpoint never looks complete
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        state: dict[str, Any],
        lora: dict[str, torch.Tensor],
        rng: dict[str, Any],
        write_extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically; every process calls this (each saves its own RNG)."""
        from safetensors.torch import save_file

        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        acc = self.acc
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(rng, tmp / f"rng_{acc.process_index}.pt")
        _fsync_file(tmp / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
            torch.save(state, tmp / "state.pt")
            _hook(step)
            if write_extra is not None:
                write_extra(tmp)
            rank = _rank_of(lora)
            meta = {"format": FORMAT, "step": step, "num_processes": acc.num_processes, "lora_rank": rank}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            _fsync_tree(tmp)
            if final.exists():
                self._discard(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for _, old in self.checkpoints()[: -self.keep]:
                self._discard(old)
        acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ loading
    def load(self, path: Path) -> Loaded:
        from safetensors.torch import load_file

        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise DiffalignError(f"checkpoint {path} has format {meta.get('format')}, this diffalign reads {FORMAT}")
        if meta["num_processes"] != self.acc.num_processes:
            raise DiffalignError(
                f"checkpoint {path} was written by {meta['num_processes']} processes, this run has "
                f"{self.acc.num_processes}; resume with the same number of processes for an exact continuation"
            )
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / f"rng_{self.acc.process_index}.pt", map_location="cpu", weights_only=True)
        return Loaded(path, int(meta["step"]), state, load_file(str(path / "lora.safetensors")), rng)


def _rank_of(lora: dict[str, torch.Tensor]) -> int:
    for name, t in lora.items():
        if "lora_A" in name:
            return int(t.shape[0])
    return 0


def truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` lines of a JSONL file (atomically); a missing file counts as empty."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    if len(lines) < n:
        raise DiffalignError(
            f"{path} has {len(lines)} lines but the checkpoint expects at least {n}; was it edited? "
            "Restore it or start a new run"
        )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines[:n]), encoding="utf-8")
    os.replace(tmp, path)
