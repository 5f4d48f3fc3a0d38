"""Offline Diffusion-DPO (diffalign/methods/dpo.py; spec §5.2) and ``diffalign prefs``: the VAE latent of
each image is encoded once, the loss is log 2 at the reference on the tiny SD and SDXL pipelines, winner and
loser share t and noise, ``prefs`` -> ``train`` end to end, a run killed inside a checkpoint resumes exactly
(the dataset position included), and bad preference files are one-line errors naming the file and line.
The loss against hand-computed values is in tests/test_pref_losses.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_grpo import pipe_rollout
from train_fixtures import (
    assert_same_run,
    kill_inside_checkpoint_save,
    records,
    resume_latest,
    run_train,
    tiny_config,
    write_config,
)

from diffalign.cli import main
from diffalign.config import TrainConfig
from diffalign.datasets import DatasetStream, JsonlDataset
from diffalign.methods.dpo import DiffusionDPO, DiffusionDPOConfig, noisy_pair
from diffalign.prefs import choice_from_rewards, margin_pairs

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def write_prefs(root: Path, n: int = 3, size: int = 16) -> Path:
    """``root/prefs.jsonl``: n pairs of random images (a bright winner, a dark loser)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        for kind, lo in (("w", 128), ("l", 0)):
            pixels = rng.integers(lo, lo + 128, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "img" / f"{i}{kind}.png")
        lines.append(json.dumps({"prompt": PROMPTS[i % 3], "winner": f"img/{i}w.png", "loser": f"img/{i}l.png"}))
    (root / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "prefs.jsonl"


# ------------------------------------------------------------------------------------------- pure parts
def test_margin_pairs_and_choices():
    assert margin_pairs([0.1, 0.9, 0.5, 0.3], max_pairs=2) == [(1, 0), (2, 3)]
    assert margin_pairs([1.0, 0.0, 1.0, 0.0], max_pairs=3) == [(0, 3), (2, 1)]  # correct vs incorrect
    assert margin_pairs([1.0, 1.0, 1.0], max_pairs=1) == []  # equal rewards never pair
    assert margin_pairs([0.5, 0.4, 0.0, 0.45], max_pairs=2, min_margin=0.1) == [(0, 2)]
    assert [choice_from_rewards(*r) for r in [(1, 0), (0, 1), (1, 1)]] == ["a", "b", "tie"]


def test_winner_and_loser_share_t_and_noise():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    z = torch.randn(2, 4, 2, 2)
    x, t, target = noisy_pair(sched, z, z, torch.Generator().manual_seed(0))
    assert torch.equal(t[:2], t[2:]) and torch.equal(target[:2], target[2:]) and torch.equal(x[:2], x[2:])
    vsched = DDIMScheduler.from_config(sched.config, prediction_type="v_prediction")
    _, t, v = noisy_pair(vsched, z, torch.zeros_like(z), torch.Generator().manual_seed(0))
    torch.testing.assert_close(v[:2], vsched.get_velocity(z, target[:2], t[:2]))


# ----------------------------------------------------------------------------------- the tiny pipelines
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_latents_cached_once_and_log2_at_the_reference(tmp_path, request, family):
    """Five steps of 2 pairs over a 3-pair dataset (two epochs): the VAE encodes each of the 6 images once;
    with LoRA B = 0 the first step's loss is log 2 exactly and the LoRA gets a gradient."""
    pipe_dir = request.getfixturevalue("sd_dir" if family == "sd" else "sdxl_dir")
    ctx, params = pipe_rollout(pipe_dir)
    calls = []
    encode = ctx.encode
    ctx.encode = lambda images: calls.append(images.shape[0]) or encode(images)
    stream = DatasetStream(JsonlDataset(write_prefs(tmp_path), ("winner", "loser")), seed=0)
    method = DiffusionDPO(DiffusionDPOConfig(beta=100.0), ctx.sample, TrainConfig())
    grads = []
    ctx.optimizer_step = lambda: grads.append(sum(float(p.grad.abs().sum()) for p in params if p.grad is not None))
    results = [method.step(ctx, [stream.next_batch(2)]) for _ in range(5)]
    assert sum(calls) == 6 == method.cache.encodes and len(method.cache.latents) == 6
    assert results[0].loss == pytest.approx(math.log(2), abs=1e-6) and grads[0] > 0
    assert results[0].stats["implicit_acc"] == 0.5 and results[0].reward.shape == (2,)
    # the cached latent is the VAE mean, scaled: decoding it gives back roughly the image
    batch = stream.next_batch(1)
    z = method.cache.get(ctx, batch, "winner")
    assert z.shape[1] == 4 and sum(calls) == 6


# ------------------------------------------------------------------------------------------- end to end
def test_prefs_then_train_dpo(tmp_path, sd_dir, capsys):
    out = tmp_path / "prefs"
    args = ["prefs", "--model", str(sd_dir), "--prompts", "shapes:train", "--num-prompts", "3", "--n", "4"]
    args += ["--steps", "3", "--reward", "train_fixtures:Brightness", "--pairs-per-prompt", "2", "--out", str(out)]
    assert main(args) == 0
    assert "12 images of 3 prompts, 6 pairs" in capsys.readouterr().out
    prefs = [json.loads(x) for x in (out / "prefs.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(prefs) == 6 and len(samples) == 12 and all(p["winner_reward"] > p["loser_reward"] for p in prefs)
    assert [s["seed"] for s in samples] == list(range(12))
    # each prompt's best is paired with its worst
    first = [s["reward"] for s in samples[:4]]
    assert prefs[0]["winner_reward"] == max(first) and prefs[0]["loser_reward"] == min(first)
    assert main(args) == 2 and "is not empty" in capsys.readouterr().err  # nothing is overwritten
    run = tmp_path / "run"
    cfg = tiny_config(
        sd_dir,
        run,
        "dpo",
        data={"train": str(out / "prefs.jsonl")},
        dpo={"beta": 100.0},
        train={"gradient_accumulation_steps": 2},
        eval={"every": 0, "num_prompts": 1, "seeds": [0]},
        checkpoint={"every": 0},
    )
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    assert "finished 3 steps of dpo" in capsys.readouterr().out
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [m["updates"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["data_margin"] > 0  # the winners score higher under the reward that ranked them


def test_dpo_killed_and_resumed_is_exact(tmp_path, sd_dir):
    write_prefs(tmp_path / "data", n=5)
    paths = {}
    for name in ("ref", "killed"):
        cfg = tiny_config(
            sd_dir,
            tmp_path / name,
            "dpo",
            data={"train": "data/prefs.jsonl"},
            dpo={"beta": 100.0},
            train={"steps": 4},
            eval={"every": 2, "num_prompts": 1, "seeds": [0]},
            checkpoint={"every": 2, "keep": 2},
        )
        paths[name] = write_config(tmp_path / f"{name}.yaml", cfg)
    proc = run_train(paths["ref"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in records(tmp_path / "ref" / "metrics.jsonl")] == [1, 2, 3, 4]
    kill_inside_checkpoint_save(paths["killed"], 4)
    resume_latest(paths["killed"], 2)
    assert_same_run(tmp_path / "ref", tmp_path / "killed")


def test_bad_preference_inputs_are_one_line(tmp_path, sd_dir, capsys):
    data = write_prefs(tmp_path / "data")
    good = data.read_text().splitlines()

    def error(lines=None, **over):
        path = tmp_path / "data" / "bad.jsonl"
        if lines is not None:
            path.write_text("\n".join(lines) + "\n")
        cfg = tiny_config(sd_dir, tmp_path / "run", "dpo", data={"train": str(path)}, **over)
        assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        return err

    bad = tmp_path / "data" / "bad.jsonl"
    missing = json.dumps(json.loads(good[1]) | {"loser": "img/nope.png"})
    assert f"{bad} line 2: image 'loser'" in error([good[0], missing])
    assert f"{bad} line 2 is not JSON" in error([good[0], "{oops", good[2]])
    assert "has no key 'winner'" in error([good[0], json.dumps({"prompt": "x", "loser": "img/0l.png"})])
    assert "holds no records" in error(["", "  "])
    assert "fewer than one batch of 2" in error([good[0]])
    assert "dpo.beta must be > 0" in error(good, dpo={"beta": 0})
    # prefs: a reward is needed to rank pairs; no margin anywhere -> no pairs
    base = ["prefs", "--model", str(sd_dir), "--prompts", "shapes:train", "--num-prompts", "1", "--steps", "2"]
    assert main([*base, "--out", str(tmp_path / "p1")]) == 2
    assert "give --reward NAME" in capsys.readouterr().err
    assert (
        main([*base, "--reward", "train_fixtures:Brightness", "--min-margin", "5", "--out", str(tmp_path / "p2")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no pairs" in err and "samples.jsonl" in err
