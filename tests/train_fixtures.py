"""Helpers for the training tests: tiny plug-in rewards, tiny run configs, training in subprocesses
(killed and resumed, or two processes under ``accelerate launch``), run comparisons, and a fixture
that leaves the method registry as it was.

The rewards are plug-ins (``train_fixtures:Brightness``), so the trainer loads them through the
public reward registry exactly as a user's own reward module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from reward_models import Reward

ROOT = Path(__file__).resolve().parent.parent


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


class Greenness(Reward):
    """Differentiable: mean green intensity; conflicts partly with :class:`Brightness` (Pareto runs)."""

    name = "greenness"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images[:, 1].mean(dim=(1, 2))


class Scaled(Brightness):
    """``scale * Brightness + shift``: ensemble members of different scales (``train_fixtures:Scaled:scale=2``)."""

    name = "scaled"

    def __init__(self, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.scale, self.shift = float(scale), float(shift)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.scale * super().score(images, prompts) + self.shift


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


class PeakAt(Reward):
    """A held-out reward of 1 on its ``call``-th call (counting from 1) and 0 on every other: the best
    evaluation of a run is the ``call``-th, whatever the model does."""

    name = "peak_at"

    def __init__(self, call: int = 2) -> None:
        super().__init__()
        self.call, self.seen = int(call), 0

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.seen += 1
        return torch.full((images.shape[0],), 1.0 if self.seen == self.call else 0.0)


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


def assert_lora_loads_in_diffusers(sd_dir: Path, run: Path, step: int) -> dict[str, Any]:
    """The run's exported ``lora/`` loads with plain diffusers' ``load_lora_weights`` and holds exactly the
    LoRA of its checkpoint at ``step``; return that checkpoint's tensors."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(run / "lora", adapter_name="trained")
    trained = load_file(run / "checkpoints" / f"step_{step}" / "lora.safetensors")
    loaded = {f"unet.{n}".replace(".trained.", ".default."): p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    return trained


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class FakeCombining:
    """What a fake StepContext needs for ``reward.combine``: ``combine``, ``reward_values`` and ``reward_terms`` over its own
    ``rewards()``, with ``combiner`` (default: the weighted sum of the rewards it returns, weight 1)."""

    combiner = None

    def combine(self, values, groups=None):
        from diffalign.combine import build_combiner

        if self.combiner is None:
            self.combiner = build_combiner("weighted", list(values))
        return self.combiner(values, groups)

    def reward_values(self, images, prompts):
        return self.rewards(images, prompts)[1]

    def reward_terms(self, images, prompts):
        parts = self.reward_values(images, prompts)
        return self.combine(parts), parts


# ------------------------------------------------------------------------------ runs in subprocesses
def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a training subprocess: one thread, ``tests/`` and the checkout importable
    (plug-in rewards and methods), no checkpoint hook inherited; ``extra`` set last."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    env.pop("DIFFALIGN_CHECKPOINT_HOOK", None)
    return env | extra


def train_cmd(cfg: Path, *extra: str) -> list[str]:
    """``python -m diffalign train --config cfg [extra...]``."""
    return [sys.executable, "-m", "diffalign", "train", "--config", str(cfg), *extra]


def run_train(cfg: Path, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    """:func:`train_cmd` run to its end in :func:`subprocess_env` (with ``env`` added), output captured."""
    return subprocess.run(train_cmd(cfg, *extra), env=subprocess_env(**env), capture_output=True, text=True)


def kill_inside_checkpoint_save(cfg: Path, step: int) -> subprocess.CompletedProcess[str]:
    """Train ``cfg`` in a subprocess that SIGKILLs itself inside the save of checkpoint ``step``."""
    proc = run_train(cfg, DIFFALIGN_CHECKPOINT_HOOK=f"kill:{step}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def resume_latest(cfg: Path, step: int) -> subprocess.CompletedProcess[str]:
    """``--resume latest`` of ``cfg`` in a subprocess; it must succeed, resuming from checkpoint ``step``."""
    proc = run_train(cfg, "--resume", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and f"step_{step}" in proc.stdout
    return proc


def launch_two_processes(
    cfg: Path, *extra: str, timeout: float | None = None, module: str = "diffalign"
) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --multi_gpu --num_processes 2`` of ``diffalign train --config cfg [extra...]`` on CPU
    (two gloo processes; ``--cpu`` would start one), in :func:`subprocess_env`, output captured. ``module``:
    the ``-m`` module each process runs (``pg_probe``: the same command, then whether a process group is left)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [*launch, "-m", module, "train", "--config", str(cfg), *extra]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------- comparing runs
def records(path: Path) -> list[dict]:
    """JSONL records without their wall-clock ``time`` values."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row.pop("time")
    return rows


def assert_same_run(ref: Path, run: Path, note: str = "") -> None:
    """The runs in ``ref`` and ``run`` logged the same metrics and evaluations and exported the same LoRA, bit for bit."""
    assert records(run / "metrics.jsonl") == records(ref / "metrics.jsonl"), note
    assert records(run / "eval.jsonl") == records(ref / "eval.jsonl"), note
    a = load_file(ref / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), note


# ---------------------------------------------------------------------------------- method registry
def registry_cleaner(*plugins: str) -> Callable[[], Iterator[None]]:
    """An autouse fixture (assign it to a module global) that unregisters the methods a test registered
    and forgets the plug-in modules ``plugins``, so that the next import registers them again."""

    @pytest.fixture(autouse=True)
    def clean_registry() -> Iterator[None]:
        from diffalign.methods import registered_methods
        from diffalign.methods.registry import unregister_method

        before = {e.name for e in registered_methods()}
        yield
        for entry in registered_methods():
            if entry.name not in before:
                unregister_method(entry.name)
        for name in plugins:
            sys.modules.pop(name, None)

    return clean_registry
