"""Helpers for the training tests: tiny plug-in rewards and tiny run configs.

The rewards are plug-ins (``train_fixtures:Brightness``), so the trainer loads them through the
public reward registry exactly as a user's own reward module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from reward_models import Reward


class Brightness(Reward):
    """Differentiable: mean red minus mean blue intensity (cheap, prompt-free)."""

    name = "brightness"
    differentiable = True
    range = (-1.0, 1.0)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))


class Darkness(Brightness):
    """Minus :class:`Brightness`: a held-out reward that falls exactly when the training reward rises."""

    name = "darkness"

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -super().score(images, prompts)


class NanAfter(Reward):
    """Differentiable; returns NaN from its ``calls``-th call on (counting from 1)."""

    name = "nan_after"
    differentiable = True

    def __init__(self, calls: int = 3) -> None:
        super().__init__()
        self.calls, self.seen = int(calls), 0

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.seen += 1
        value = images.mean(dim=(1, 2, 3))
        return value * float("nan") if self.seen >= self.calls else value


class Recording(Brightness):
    """Brightness that appends the values of its training calls (with gradient) to DIR/<pid>.jsonl."""

    name = "recording"

    def __init__(self, dir: str = ".") -> None:
        super().__init__()
        self.dir = dir

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import json
        import os

        values = super().score(images, prompts)
        if torch.is_grad_enabled():
            with open(Path(self.dir) / f"{os.getpid()}.jsonl", "a") as fh:
                fh.write(json.dumps({"values": values.tolist(), "prompts": prompts}) + "\n")
        return values


def tiny_config(sd_dir: Path, out: Path, method: str = "alignprop", **sections: dict[str, Any]) -> dict[str, Any]:
    """A run of a few seconds on the tiny SD pipeline; ``sections`` update the defaults per section."""
    cfg: dict[str, Any] = {
        "model": {"pretrained": str(sd_dir), "device": "cpu", "lora": {"rank": 2, "alpha": 2.0}},
        "sample": {"steps": 3, "eta": 1.0, "guidance_scale": 2.0, "batch_size": 2},
        "train": {"method": method, "steps": 3, "lr": 1e-2, "seed": 0},
        "reward": {"rewards": ["train_fixtures:Brightness"]},
        "prompts": {"train": "shapes:train", "eval": "shapes:heldout"},
        "eval": {"every": 2, "num_prompts": 2, "seeds": [0, 1], "batch_size": 4},
        "checkpoint": {"output_dir": str(out), "every": 2, "keep": 2},
        "log": {"progress": False},
    }
    if method == "ddpo":
        cfg["reward"] = {"rewards": ["jpeg_compressibility"]}
        cfg["ddpo"] = {"train_batch_size": 1, "per_prompt_stat_tracking": False}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
