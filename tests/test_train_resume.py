"""Kill a training run (SIGKILL, at a chosen or random moment, also inside a checkpoint save), resume it,
and get the same metrics.jsonl, eval.jsonl and LoRA as an uninterrupted run, bit for bit on CPU.

Excluded from the comparison: the ``time`` key of each record (wall-clock seconds)."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_fixtures import (
    assert_same_run,
    kill_inside_checkpoint_save,
    resume_latest,
    run_train,
    subprocess_env,
    tiny_config,
    train_cmd,
    write_config,
)

from diffalign.cli import main


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
    kill_inside_checkpoint_save(cfg, 4)
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == [".tmp-step_4", "step_2"]  # the half-written checkpoint never looks complete
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # metrics of steps 3-4 beyond step_2
    resume_latest(cfg, 2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4", "step_6"]
    assert_same_run(ref, run)


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
            train_cmd(cfg, *args),
            env=subprocess_env(DIFFALIGN_CHECKPOINT_HOOK="sleep:0.4"),
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
    proc = run_train(cfg, "--resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(ref, run, note=f"kill delays after the first metrics line: {delays}")


def test_keep_best_protects_the_best_checkpoint_from_pruning(tmp_path):
    """``checkpoint.keep`` newest checkpoints plus the protected (best) step; the rest are pruned."""
    from types import SimpleNamespace

    import torch

    from diffalign.checkpoint import Checkpointer

    acc = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)
    ckpt = Checkpointer(tmp_path, keep=2, accelerator=acc)
    lora = {"unet.x.lora_A.default.weight": torch.zeros(2, 3), "unet.x.lora_B.default.weight": torch.zeros(3, 2)}
    for step in range(1, 6):
        ckpt.protect = {2} if step >= 2 else set()  # step 2 was the best evaluation
        ckpt.save(step, {"step": step}, lora, {})
    assert [s for s, _ in ckpt.checkpoints()] == [2, 4, 5]
    ckpt.protect = set()  # a better evaluation came: step 2 is an ordinary old checkpoint again
    ckpt.save(6, {"step": 6}, lora, {})
    assert [s for s, _ in ckpt.checkpoints()] == [5, 6]
