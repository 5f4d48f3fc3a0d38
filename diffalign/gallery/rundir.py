"""What a ``diffalign train`` run directory holds, read with one-line errors that name the missing file.

    run = RunDir.open("runs/shapes-alignprop")
    run.config.sample.steps, run.lora(), run.metrics(), run.evals(), run.eval_items()

A run directory (docs/training.md, "The run directory"): ``config.yaml`` (resolved), ``metrics.jsonl``,
``eval.jsonl``, ``eval_prompts.jsonl`` (the evaluation's prompts and seeds), ``samples/``,
``checkpoints/step_N/lora`` and, once training finished, ``lora/``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign.errors import DiffalignError

EVAL_PROMPTS = "eval_prompts.jsonl"  # one {"prompt_index", "prompt", "seed", "generator_seed"} line per eval image


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a missing, unreadable or malformed file is a one-line error naming it."""
    if not path.is_file():
        raise DiffalignError(f"{path} does not exist; is {path.parent} a diffalign train run directory?")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DiffalignError(f"cannot read {path}: {err}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DiffalignError(f"{path} line {n} is not JSON ({err.msg}); the file is damaged") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


@dataclass
class RunDir:
    """A finished (or interrupted) ``diffalign train`` output directory."""

    path: Path
    config: Any  # DiffalignConfig
    label: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path, label: str | None = None) -> RunDir:
        """Read ``path/config.yaml``; one-line errors for a missing directory or config."""
        from diffalign.config import DiffalignConfig

        root = Path(path)
        if not root.exists():
            raise DiffalignError(
                f"run directory {str(root)!r} does not exist; pass the output directory of diffalign train"
            )
        if not root.is_dir():
            raise DiffalignError(f"run directory {str(root)!r} is a file; pass the output directory of diffalign train")
        cfg_path = root / "config.yaml"
        if not cfg_path.is_file():
            raise DiffalignError(
                f"{cfg_path} does not exist: {root} is not a diffalign train run directory (or training never started)"
            )
        cfg = DiffalignConfig.from_yaml(cfg_path)
        from reward_models import RewardSpec

        rewards = "+".join(RewardSpec.parse(r).name for r in cfg.reward.rewards)
        return cls(root, cfg, label or f"{cfg.train.method} on {rewards} ({root.name})")

    @property
    def method(self) -> str:
        return str(self.config.train.method)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints that hold a LoRA, ascending."""
        steps = []
        for d in (self.path / "checkpoints").glob("step_*"):
            m = re.fullmatch(r"step_(\d+)", d.name)
            if m and (d / "lora").is_dir():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def lora(self, step: int | None = None) -> tuple[Path | None, int]:
        """(LoRA directory, its step) of the final LoRA (``step`` None), or of ``checkpoints/step_N``.

        Step 0 is the base model: (None, 0). An unfinished run (no ``lora/``) falls back to its newest
        checkpoint. A run without any LoRA, or a step without a checkpoint, is a one-line error.
        """
        last = int(self.config.train.steps)
        if step == 0:
            return None, 0
        steps = self.checkpoint_steps()
        if step is None or step == last:
            if (self.path / "lora").is_dir():
                return self.path / "lora", last
            if step is None and steps:
                return self.path / "checkpoints" / f"step_{steps[-1]}" / "lora", steps[-1]
            raise DiffalignError(
                f"{self.path / 'lora'} does not exist and {self.path / 'checkpoints'} holds no LoRA: the run has no "
                "LoRA yet; let diffalign train finish or reach a checkpoint (or resume it with --resume latest)"
            )
        if step in steps:
            return self.path / "checkpoints" / f"step_{step}" / "lora", step
        have = ", ".join(str(s) for s in [0, *steps, *([last] if (self.path / "lora").is_dir() else [])])
        raise DiffalignError(f"{self.path} has no LoRA of step {step} (steps with a LoRA: {have})")

    def metrics(self) -> list[dict[str, Any]]:
        if "metrics" not in self._cache:
            self._cache["metrics"] = read_jsonl(self.path / "metrics.jsonl")
        return self._cache["metrics"]

    def evals(self) -> list[dict[str, Any]]:
        if "evals" not in self._cache:
            self._cache["evals"] = read_jsonl(self.path / "eval.jsonl")
        return self._cache["evals"]

    def eval_items(self) -> tuple[list[str], list[int]]:
        """The evaluation's prompts and seeds: from ``eval_prompts.jsonl``, else (runs written before it
        existed) recomputed from ``prompts.eval`` and ``eval.num_prompts`` of the config, as the trainer does."""
        path = self.path / EVAL_PROMPTS
        if path.is_file():
            rows = read_jsonl(path)
            prompts: dict[int, str] = {}
            seeds: list[int] = []
            for r in rows:
                try:
                    prompts[int(r["prompt_index"])] = str(r["prompt"])
                    if int(r["seed"]) not in seeds:
                        seeds.append(int(r["seed"]))
                except (KeyError, TypeError, ValueError):
                    raise DiffalignError(
                        f"{path}: a line lacks prompt_index, prompt or seed; the file is damaged"
                    ) from None
            if not rows or sorted(prompts) != list(range(len(prompts))):
                raise DiffalignError(f"{path} lists no prompts, or not prompts 0..N-1; the file is damaged")
            return [prompts[i] for i in range(len(prompts))], seeds
        from diffalign.prompts import eval_prompts, load_prompts

        cfg = self.config
        return eval_prompts(load_prompts(cfg.prompts.eval, "prompts.eval"), cfg.eval.num_prompts), list(cfg.eval.seeds)

    def eval_eta(self) -> float:
        """The DDIM eta of the run's evaluation images (``eval.eta``, else ``sample.eta``)."""
        cfg = self.config
        return float(cfg.sample.eta if cfg.eval.eta is None else cfg.eval.eta)

    def dtype(self) -> str:
        """The dtype the run's frozen weights were loaded in."""
        from diffalign.trainer import DTYPE_BY_PRECISION

        cfg = self.config
        return DTYPE_BY_PRECISION[cfg.train.mixed_precision] if cfg.model.dtype == "auto" else cfg.model.dtype


def write_eval_prompts(path: Path, prompts: list[str], seeds: list[int]) -> Path:
    """``eval_prompts.jsonl``: one line per evaluation image, in the order of the evaluation grids."""
    from diffalign.evaluation import generator_seed

    with open(path, "w", encoding="utf-8") as fh:
        for i, prompt in enumerate(prompts):
            for seed in seeds:
                row = {"prompt_index": i, "prompt": prompt, "seed": seed, "generator_seed": generator_seed(seed, i)}
                fh.write(json.dumps(row) + "\n")
    return path
