"""Method math against hand-computed values (spec §2.6, §3) and truncation behaviour through the sampler."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from train_fixtures import FakeCombining

from diffalign.combine import weighted_sum
from diffalign.config import SampleConfig, TrainConfig
from diffalign.errors import DiffalignError
from diffalign.evaluation import degradation, guard, pairwise_rms
from diffalign.methods import PromptBatch
from diffalign.methods.ddpo import (
    PerPromptStatTracker,
    batch_advantages,
    clip_advantages,
    ppo_clip_loss,
)
from diffalign.methods.reward_backprop import (
    AlignProp,
    AlignPropConfig,
    DraftConfig,
    DraftK,
    DraftLV,
    ReFL,
    ReFLConfig,
    refl_step_range,
    renoise,
    reward_loss,
)
from diffalign.prompts import PromptSampler
from diffalign.sampling import make_sampler

EPS = 1e-4


# ------------------------------------------------------------------------------------------ PPO-clip
def test_ppo_at_theta_old_ratio_one():
    adv = torch.tensor([1.0, -2.0, 0.5, 0.5])
    logp = torch.tensor([-1.0, -2.0, 0.3, 0.7], requires_grad=True)
    loss, stats = ppo_clip_loss(logp, logp.detach().clone(), adv, EPS)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=0)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 4)  # d/dlogp of -A * exp(logp - old) at ratio 1


def test_ppo_clipped_positive_advantage_has_zero_gradient():
    old = torch.zeros(1)
    logp = torch.tensor([math.log1p(2 * EPS)], requires_grad=True)  # rho = 1 + 2 eps
    loss, stats = ppo_clip_loss(logp, old, torch.tensor([2.0]), EPS)
    assert loss.item() == pytest.approx(-2.0 * (1 + EPS), rel=1e-6)
    assert stats["clipfrac"].item() == 1.0
    loss.backward()
    assert logp.grad.item() == 0.0


def test_ppo_negative_advantage_keeps_unclipped_term():
    old = torch.zeros(1)
    logp = torch.tensor([math.log1p(2 * EPS)], requires_grad=True)
    loss, _ = ppo_clip_loss(logp, old, torch.tensor([-2.0]), EPS)
    assert loss.item() == pytest.approx(2.0 * (1 + 2 * EPS), rel=1e-6)
    loss.backward()
    assert logp.grad.item() == pytest.approx(2.0 * (1 + 2 * EPS), rel=1e-6)  # d(-A rho)/dlogp = -A rho


def test_ppo_stats_hand_computed():
    old = torch.zeros(2)
    logp = torch.tensor([0.1, 0.0])
    _, stats = ppo_clip_loss(logp, old, torch.ones(2), EPS)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0) / 2)
    assert stats["clipfrac"].item() == 0.5


# ---------------------------------------------------------------------------------------- advantages
def test_stat_tracker_uses_batch_stats_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
    adv = tracker.update(["a", "a", "b", "b"], [1.0, 3.0, 5.0, 7.0])
    expected = (np.array([1, 3, 5, 7]) - 4.0) / (math.sqrt(5) + 1e-6)
    np.testing.assert_allclose(adv, expected, rtol=1e-12)
    assert tracker.last_per_prompt_fraction == 0.0
    for _ in range(7):  # 2 + 7 * 2 = 16 rewards per prompt
        tracker.update(["a", "a", "b", "b"], [1.0, 3.0, 5.0, 7.0])
    adv = tracker.update(["a", "a", "b", "b"], [1.0, 3.0, 5.0, 7.0])
    # per-prompt buffers: a = {1, 3} x 9 -> mean 2, std 1; b = {5, 7} x 9 -> mean 6, std 1
    np.testing.assert_allclose(adv, [-1 / (1 + 1e-6), 1 / (1 + 1e-6), -1 / (1 + 1e-6), 1 / (1 + 1e-6)], rtol=1e-12)
    assert tracker.last_per_prompt_fraction == 1.0


def test_stat_tracker_buffer_is_fifo_and_state_round_trips():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a"] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert list(tracker.stats["a"]) == [3.0, 4.0, 5.0]
    other = PerPromptStatTracker(1, 1)
    other.load_state_dict(tracker.state_dict())
    np.testing.assert_array_equal(other.update(["a", "b"], [6.0, 1.0]), tracker.update(["a", "b"], [6.0, 1.0]))


def test_advantage_clip_and_batch_normalization():
    assert clip_advantages(torch.tensor([7.0, -7.0, 1.0]), 5.0).tolist() == [5.0, -5.0, 1.0]
    adv = batch_advantages(torch.tensor([1.0, 3.0, 5.0, 7.0]))
    torch.testing.assert_close(adv, (torch.tensor([1.0, 3.0, 5.0, 7.0]) - 4) / (math.sqrt(5) + 1e-8))


# ------------------------------------------------------------------------------------ reward losses
def test_reward_loss_forms():
    r = torch.tensor([1.0, 3.0])
    assert reward_loss(r, "neg").tolist() == [-1.0, -3.0]
    assert reward_loss(r, "abs_target", 2.0).tolist() == [1.0, 1.0]
    assert reward_loss(r, "hinge", 2.0).tolist() == [1.0, 0.0]


def test_refl_hinge_above_target_gives_zero_loss_and_zero_grads():
    w = torch.tensor(3.0, requires_grad=True)
    r = w * torch.tensor([1.0, 2.0])  # 3 and 6, both >= target 2
    loss = 1e-3 * reward_loss(r, "hinge", 2.0).mean()
    loss.backward()
    assert loss.item() == 0.0 and w.grad.item() == 0.0


def test_refl_step_range():
    assert refl_step_range(40, 0.75, 1.0) == (30, 39)  # ImageReward's ReFL: j in [30, 39] of 40
    assert refl_step_range(20, 0.75, 1.0) == (15, 19)
    assert refl_step_range(3, 0.9, 1.0) == (2, 2)


def test_weighted_sum_checks_weight_count():
    values = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])}
    assert weighted_sum(values, [1.0, 0.5]).tolist() == [6.0, 12.0]
    assert weighted_sum(values, {"a": 2.0, "b": 0.0}).tolist() == [2.0, 4.0]
    with pytest.raises(DiffalignError, match="got 1 reward weights for 2 rewards"):
        weighted_sum(values, [1.0])


# ------------------------------------------------------------------------- truncation via the sampler
class FakeCtx(FakeCombining):
    """A StepContext over a toy model: denoise(x, t) = w * x; decode = sigmoid; reward = mean pixel."""

    def __init__(self, steps: int = 6, eta: float = 0.0, reward_scale: float = 1.0) -> None:
        self.sample = SampleConfig(steps=steps, eta=eta, guidance_scale=1.0, batch_size=2)
        self.scheduler = DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1
        )
        self.scheduler.set_timesteps(steps)
        self.sampler = make_sampler(self.scheduler)
        self.generator = torch.Generator().manual_seed(0)
        self.rng = random.Random(0)
        self.checkpointing = False
        self.w = torch.nn.Parameter(torch.tensor(0.1))
        self.calls: list[tuple[int, bool]] = []  # (batch, grad enabled)
        self.input_grad: list[bool] = []  # whether each network input carries a graph
        self.reward_scale = reward_scale
        self.process_index = 0

    def denoiser(self, prompts):
        def denoise(x, t):
            self.calls.append((x.shape[0], torch.is_grad_enabled()))
            self.input_grad.append(x.requires_grad)
            return self.w * x

        return denoise

    def initial_latents(self, n, generator=None):
        return torch.randn(n, 4, 2, 2, generator=self.generator)

    def decode(self, latents, differentiable=False):
        return torch.sigmoid(latents[:, :3])

    def rewards(self, images, prompts):
        r = self.reward_scale * images.mean(dim=(1, 2, 3))
        return r, {"toy": r}

    def backward(self, loss):
        loss.backward()

    def optimizer_step(self):
        return float(self.w.grad.abs()) if self.w.grad is not None else 0.0


def _batch(n=2):
    prompts = [f"p{i}" for i in range(n)]
    return [PromptBatch(prompts, prompts)]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_draft_k_gradient_through_exactly_k_steps(k):
    ctx = FakeCtx(steps=6)
    method = DraftK(DraftConfig(k=k), ctx.sample, TrainConfig(method="draft_k"))
    result = method.step(ctx, _batch())
    assert [g for _, g in ctx.calls] == [False] * (6 - k) + [True] * k
    assert ctx.w.grad is not None and ctx.w.grad.abs().item() > 0
    assert result.stats["grad_steps"] == k and result.updates == 1


def test_alignprop_fixed_and_random_truncation():
    ctx = FakeCtx(steps=6)
    method = AlignProp(AlignPropConfig(truncation="fixed", k=2), ctx.sample, TrainConfig())
    method.step(ctx, _batch())
    assert [g for _, g in ctx.calls] == [False] * 4 + [True] * 2
    ctx = FakeCtx(steps=6)
    method = AlignProp(AlignPropConfig(truncation="uniform"), ctx.sample, TrainConfig())
    for _ in range(5):
        ctx.calls.clear()
        res = method.step(ctx, _batch())
        flags = [g for _, g in ctx.calls]
        first = flags.index(True)
        assert 1 <= first < 6 and all(flags[first:]) and res.stats["grad_steps"] == 6 - first


@pytest.mark.parametrize("detach", [False, True])
def test_detach_input_reaches_the_sampler(detach):
    ctx = FakeCtx(steps=4)
    cfg = AlignPropConfig(truncation="none", detach_input=detach)
    AlignProp(cfg, ctx.sample, TrainConfig()).step(ctx, _batch())
    assert ctx.input_grad == [False] + [not detach] * 3  # x_T has no graph; later inputs do unless detached
    ctx = FakeCtx(steps=4)
    DraftK(DraftConfig(k=4, detach_input=detach), ctx.sample, TrainConfig(method="draft_k")).step(ctx, _batch())
    assert ctx.input_grad == [False] + [not detach] * 3 and ctx.w.grad.abs().item() > 0


def test_draft_lv_detaches_x0_and_renoises_n_times():
    with pytest.raises(RuntimeError, match="detached"):
        renoise(torch.zeros(2, 4, requires_grad=True), 0.9, [torch.zeros(2, 4)])
    x0, eps = torch.ones(2, 4), [torch.zeros(2, 4), torch.ones(2, 4), -torch.ones(2, 4)]
    out = renoise(x0, torch.tensor(0.81), eps)
    assert out.shape == (6, 4)
    torch.testing.assert_close(out[2:4], torch.full((2, 4), 0.9 + math.sqrt(0.19)))
    ctx = FakeCtx(steps=5, eta=1.0)
    method = DraftLV(DraftConfig(n_lv=3), ctx.sample, TrainConfig(method="draft_lv"))
    res = method.step(ctx, _batch(2))
    # 5 no-grad sampling calls on the batch, then one differentiable call on the n=3 re-noisings
    assert ctx.calls == [(2, False)] * 5 + [(6, True)]
    assert res.rewards["toy"].shape == (6,) and ctx.w.grad.abs().item() > 0


def test_refl_one_grad_step_and_hinge_zero_grad():
    ctx = FakeCtx(steps=8)
    method = ReFL(ReFLConfig(min_step=0.5, max_step=0.75), ctx.sample, TrainConfig(method="refl"))
    res = method.step(ctx, _batch())
    j = int(res.stats["refl_step"])
    assert 4 <= j <= 5
    assert [g for _, g in ctx.calls] == [False] * j + [True]  # stops after step j
    # rewards far above the hinge target: zero loss and exactly zero gradient
    ctx = FakeCtx(steps=8, reward_scale=100.0)
    res = ReFL(ReFLConfig(target=2.0), ctx.sample, TrainConfig(method="refl")).step(ctx, _batch())
    assert res.loss == 0.0 and ctx.w.grad is not None and ctx.w.grad.item() == 0.0


# ------------------------------------------------------------------------------------ data and eval
def test_prompt_sampler_resumes_exactly():
    prompts = [f"p{i}" for i in range(5)]
    a = PromptSampler(prompts, seed=3)
    first = a.next(7)
    assert sorted(first[:5]) == sorted(prompts)  # one full shuffled pass, then the next pass
    b = PromptSampler(prompts, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.next(9) == b.next(9)


def test_guardrail_and_diversity():
    first = {"step": 0, "reward": 0.1, "gold/score": 0.5}
    assert guard(first, {"reward": 0.3, "gold/score": 0.4}, "gold/score", 0.05)["hacking"] is True
    assert guard(first, {"reward": 0.3, "gold/score": 0.47}, "gold/score", 0.05)["hacking"] is False
    assert guard(first, {"reward": 0.05, "gold/score": 0.1}, "gold/score", 0.05)["hacking"] is False
    assert guard(first, {"reward": 0.3}, None, 0.05) == {"hacking": False, "guard/metric": None}
    # the degradation guard: against the best earlier value, whatever the proxy did
    best = {"step": 60, "value": 0.68}
    fell = degradation(best, {"reward": 0.4, "gold/score": 0.41}, "gold/score", 0.1)
    assert (
        fell["degraded"] is True and fell["guard/best_step"] == 60 and fell["guard/below_best"] == pytest.approx(0.27)
    )
    assert degradation(best, {"reward": 0.4, "gold/score": 0.59}, "gold/score", 0.1)["degraded"] is False
    assert degradation(best, {"gold/score": 0.7}, "gold/score", 0.0)["degraded"] is False  # above the best
    assert degradation(None, {"gold/score": 0.1}, "gold/score", 0.1) == {"degraded": False}  # first evaluation
    same = torch.zeros(3, 3, 2, 2)
    assert pairwise_rms(same) == 0.0
    two = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    assert pairwise_rms(two) == pytest.approx(1.0)


def test_ddim_step_in_half_precision_is_finite_and_rescorable():
    """bf16 latents (mixed precision): schedule math runs in float32; the returned x_{t-1} rescores exactly."""
    from diffalign.sampling import ddim_step

    sched = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1
    )
    sched.set_timesteps(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g).bfloat16()
    for t in sched.timesteps:
        eps = torch.randn(2, 4, 4, 4, generator=g).bfloat16()
        out = ddim_step(sched, eps, t, x, eta=1.0, generator=g)
        assert out.prev_sample.dtype == torch.bfloat16 and torch.isfinite(out.log_prob).all()
        again = ddim_step(sched, eps, t, x, eta=1.0, prev_sample=out.prev_sample)
        torch.testing.assert_close(again.log_prob, out.log_prob, rtol=0, atol=0)
        x = out.prev_sample
