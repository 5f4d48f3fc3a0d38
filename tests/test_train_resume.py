"""Kill a training run (SIGKILL, at a chosen or random moment, also inside a checkpoint save), resume it,
and get the same metrics.jsonl, eval.jsonl and LoRA as an uninterrupted run, bit for bit on CPU.

Excluded from the comparison: the ``time`` key of each record (wall-clock seconds)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny_config, write_config

from diffalign.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    return env | extra


def _cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffalign", "train", "--config", str(cfg), *extra]


def _records(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row.pop("time")
    return rows


def _assert_same_run(ref: Path, run: Path, note: str = "") -> None:
    assert _records(run / "metrics.jsonl") == _records(ref / "metrics.jsonl"), note
    assert _records(run / "eval.jsonl") == _records(ref / "eval.jsonl"), note
    a = load_file(ref / "lora/pytorch_lora_weights.safetensors")
    b = load_file(run / "lora/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), note


def _config(tmp_path: Path, sd_dir: Path, out: Path, method: str) -> Path:
    extra = {"train": {"steps": 6}, "eval": {"every": 3}, "checkpoint": {"every": 2, "keep": 2}}
    if method == "ddpo":
        extra["ddpo"] = {"train_batch_size": 1, "per_prompt_stat_tracking": True, "stat_min_count": 2}
        extra["prompts"] = {"train": ["a red circle", "two blue squares", "a green square"], "eval": "shapes:heldout"}
    return write_config(tmp_path / f"{out.name}.yaml", tiny_config(sd_dir, out, method, **extra))


@pytest.mark.parametrize("method", ["ddpo"])
def test_kill_inside_checkpoint_save_then_resume(tmp_path, sd_dir, method):
    ref = tmp_path / "ref"
    assert main(["train", "--config", str(_config(tmp_path, sd_dir, ref, method))]) == 0
    run = tmp_path / "killed"
    cfg = _config(tmp_path, sd_dir, run, method)
    proc = subprocess.run(_cmd(cfg), env=_env(DIFFALIGN_CHECKPOINT_HOOK="kill:4"), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == [".tmp-step_4", "step_2"]  # the half-written checkpoint never looks complete
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # metrics of steps 3-4 beyond step_2
    proc = subprocess.run(_cmd(cfg, "--resume", "latest"), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from" in proc.stdout and "step_2" in proc.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4", "step_6"]
    _assert_same_run(ref, run)


def test_kill_at_random_moments_then_resume(tmp_path, sd_dir):
    ref = tmp_path / "ref"
    assert main(["train", "--config", str(_config(tmp_path, sd_dir, ref, "alignprop"))]) == 0
    run = tmp_path / "killed"
    cfg = _config(tmp_path, sd_dir, run, "alignprop")
    rng = random.Random()
    delays = []
    args: list[str] = []
    for _ in range(2):  # two kills, each at a random moment once training has started
        proc = subprocess.Popen(
            _cmd(cfg, *args),
            env=_env(DIFFALIGN_CHECKPOINT_HOOK="sleep:0.4"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        metrics = run / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().strip():
                break
            time.sleep(0.05)
        delays.append(rng.uniform(0.0, 2.5))
        time.sleep(delays[-1])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        args = ["--resume", "latest"]
    proc = subprocess.run(_cmd(cfg, "--resume", "latest"), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(ref, run, note=f"kill delays after the first metrics line: {delays}")
