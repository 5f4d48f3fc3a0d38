"""PRDP (diffalign/methods/prdp.py; spec §4): the two-pass gradient equals one autograd pass over the
full-trajectory loss on the tiny pipeline, groups per prompt, validation, a tiny CLI run and exact resume.
The loss itself against hand-computed values is in tests/test_pref_losses.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_ddpo_rollouts import FakeCtx
from test_grpo import pipe_rollout
from train_fixtures import tiny_config, write_config

from diffalign.cli import main
from diffalign.config import DiffalignConfig, TrainConfig
from diffalign.errors import DiffalignError
from diffalign.methods import PromptBatch
from diffalign.methods.prdp import PRDP, PRDPConfig, loss_gradient
from diffalign.methods.prdp_loss import prdp_loss


def grads(params):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize(("reduction", "fraction", "k"), [("sum", 1.0, 3), ("mean", 1.0, 3), ("sum", 0.67, 2)])
def test_two_pass_gradient_equals_single_pass_autograd(sd_dir, reduction, fraction, k):
    """T = 3, two prompts x G = 3 on the tiny SD pipeline with a non-zero LoRA (theta != ref) and theta_old
    shifted so that some steps are clipped: the per-step backward of G * logp accumulates exactly the
    gradient of one autograd pass through all K x 6 log-probs (K = 3, or the first 2 steps with
    timestep_fraction 0.67: the partial-trajectory score)."""
    ctx, params = pipe_rollout(sd_dir, steps=3, batch_size=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    cfg = PRDPConfig(
        group_size=3,
        beta=0.05,
        clip_range=0.02,
        logprob_reduction=reduction,
        train_batch_size=4,
        timestep_fraction=fraction,
    )
    method = PRDP(cfg, ctx.sample, TrainConfig())
    batch = PromptBatch(["a red circle", "two blue squares"], ["a red circle", "two blue squares"])
    rollout = method.collect(ctx, [batch], ctx.sampler)
    traj = rollout.trajectories
    assert traj.group_ids.tolist() == [0, 0, 0, 1, 1, 1] and traj.prompts[:3] == ["a red circle"] * 3
    rewards = torch.tensor([0.3, 0.1, 0.2, 0.0, 0.5, 0.1])
    scale = method.scale(traj)
    logp_ref = method.logprobs(ctx, traj, ctx.sampler, reference=True)
    assert method.trained_steps(traj) == k
    logp_old = traj.log_probs[:, :k].float() * scale + 0.03 * torch.randn(len(traj), k)  # some steps clip
    # two passes
    logp = method.logprobs(ctx, traj, ctx.sampler)
    assert logp.shape == logp_ref.shape == (6, k)
    loss, g, st = loss_gradient(logp, logp_old, logp_ref, rewards, traj.group_ids, cfg)
    assert 0 < st["clipfrac"] < 1 and st["pairs"].item() == 6
    method.backward_steps(ctx, traj, g, ctx.sampler)
    two_pass = grads(params)
    for p in params:
        p.grad = None
    # one pass: every log-prob in one graph
    denoise = ctx.denoiser(traj.prompts)
    rows = list(range(len(traj)))
    full = torch.stack(
        [method._step(denoise, ctx.sampler, traj, rows, k).log_prob.float() * scale for k in range(k)], dim=1
    )
    ref_loss, _ = prdp_loss(full, logp_old, logp_ref, rewards, traj.group_ids, cfg.beta, cfg.clip_range)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    one_pass = grads(params)
    assert sum(float(x.abs().sum()) for x in one_pass) > 0
    for a, b in zip(two_pass, one_pass, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())))


def test_fake_step_updates_and_reference_pass():
    """inner_epochs updates per step, the reference entered once per step (its log-probs do not change)."""
    ctx = FakeCtx(steps=3, batch_size=2, reward_fn=lambda images, prompts: images.mean(dim=(1, 2, 3)))
    method = PRDP(PRDPConfig(group_size=2, inner_epochs=3, beta=0.1, clip_range=1.0), ctx.sample, TrainConfig())
    result = method.step(ctx, [PromptBatch(["a", "b"], ["a", "b"])])
    assert result.updates == 3 == ctx.updates and ctx.reference_entries == 1
    assert result.reward.shape == (4,) and result.stats["pairs"] == 2.0
    assert {"rdp_error", "clipfrac", "score_gap", "ref_log_ratio", "first_loss", "zero_std_fraction"} <= set(
        result.stats
    )
    # at init theta = ref = theta_old: the first loss is the mean of (dr / beta)^2 over the two prompts
    r = result.reward
    want = float((((r[0] - r[1]).abs() / 0.1) ** 2 + ((r[2] - r[3]).abs() / 0.1) ** 2) / 2)
    assert result.stats["first_loss"] == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.eta=0"], "prdp needs sample.eta > 0"),
        (["prdp.group_size=1"], "prdp.group_size must be >= 2"),
        (["train.gradient_accumulation_steps=2"], "train.gradient_accumulation_steps must be 1"),
        (["prdp.logprob_reduction=max"], "prdp.logprob_reduction"),
        (["prdp.beta=0"], "prdp.beta must be > 0"),
    ],
)
def test_validation_errors(tmp_path, sd_dir, overrides, message):
    cfg = tiny_config(sd_dir, tmp_path / "run", "prdp", prdp={"group_size": 2})
    with pytest.raises(DiffalignError) as err:
        DiffalignConfig.from_yaml(write_config(tmp_path / "c.yaml", cfg), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------- end to end
def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def test_cli_trains_prdp_and_resumes_exactly(tmp_path, sd_dir, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(
        sd_dir,
        out,
        "prdp",
        prdp={"group_size": 2, "inner_epochs": 2, "beta": 0.01, "clip_range": 0.5, "train_batch_size": 3},
        eval={"every": 0, "num_prompts": 1, "seeds": [0]},
        checkpoint={"every": 1, "keep": 3},
    )
    path = str(write_config(tmp_path / "cfg.yaml", cfg))
    assert main(["train", "--config", path]) == 0
    assert "finished 3 steps of prdp" in capsys.readouterr().out
    first = rows(out / "metrics.jsonl")
    assert [m["step"] for m in first] == [1, 2, 3] and all(m["samples"] == 4 for m in first)
    assert first[-1]["updates"] == 6 and all(m["pairs"] >= 1 for m in first)
    assert main(["train", "--config", path, "--resume", str(out / "checkpoints" / "step_1")]) == 0
    assert rows(out / "metrics.jsonl") == first
