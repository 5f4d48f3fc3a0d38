"""The sampler math against diffusers and against independent hand computations (spec §1.6)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffalign.errors import DiffalignError
from diffalign.sampling import (
    cfg_combine,
    ddim_step,
    ddim_step_with_logprob,
    draw_truncation,
    gaussian_log_prob,
    sample_differentiable,
    sample_trajectory,
)

SD = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def sched(steps: int = 10, **kw) -> DDIMScheduler:
    s = DDIMScheduler(**(SD | kw))
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize(
    "kw", [{}, {"set_alpha_to_one": True}, {"prediction_type": "v_prediction"}, {"clip_sample": True}]
)
def test_eta0_matches_diffusers_step(kw):
    s = sched(10, **kw)
    g = torch.Generator().manual_seed(0)
    for t in s.timesteps:
        x = torch.randn(2, 4, 8, 8, generator=g)
        m = torch.randn(2, 4, 8, 8, generator=g)
        ours = ddim_step(s, m, t, x, eta=0.0)
        ref = s.step(m, t, x, eta=0.0)
        assert torch.equal(ours.prev_sample, ref.prev_sample) or (ours.prev_sample - ref.prev_sample).abs().max() < 1e-6
        assert (ours.pred_original_sample - ref.pred_original_sample).abs().max() < 1e-6


def test_eta1_matches_diffusers_step_with_same_noise():
    s = sched(10)
    x, m, z = torch.randn(3, 2, 4, 4, 4).unbind(0)
    t = s.timesteps[3]
    ours = ddim_step(s, m, t, x, eta=1.0, noise=z)
    ref = s.step(m, t, x, eta=1.0, variance_noise=z).prev_sample
    assert (ours.prev_sample - ref).abs().max() < 1e-6


def test_logprob_equals_independent_normal():
    s = sched(20)
    g = torch.Generator().manual_seed(1)
    x, m, prev = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t = int(s.timesteps[5])
    _, logp = ddim_step_with_logprob(s, m, t, x, eta=1.0, prev_sample=prev)
    # independent computation, written out from DDIM Eq. 12 / 16
    a = s.alphas_cumprod
    a_t, a_p = a[t], a[t - 1000 // 20]
    x0 = (x - (1 - a_t).sqrt() * m) / a_t.sqrt()
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    mean = a_p.sqrt() * x0 + (1 - a_p - var).sqrt() * m
    expected = torch.distributions.Normal(mean, var.sqrt()).log_prob(prev).mean(dim=(1, 2, 3))
    assert (logp - expected).abs().max() < 1e-5


def test_logprob_closed_form_at_mean_and_finite_for_own_sample():
    s = sched(10)
    x, m = torch.randn(2, 2, 4, 4, 4).unbind(0)
    t = s.timesteps[2]
    out = ddim_step(s, m, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.log_prob).all()
    at_mean = ddim_step(s, m, t, x, eta=1.0, prev_sample=out.mean)
    expected = -torch.log(out.std.flatten()[0]) - 0.5 * math.log(2 * math.pi)
    assert (at_mean.log_prob - expected).abs().max() < 1e-5
    # last step of SD's grid: alpha_prev = alphas_cumprod[0] < 1, so sigma > 0 and log-prob finite
    last = ddim_step(s, m, s.timesteps[-1], x, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert (last.std > 0).all() and torch.isfinite(last.log_prob).all()


def test_mean_vs_sum_reduction():
    x, mean = torch.randn(2, 3, 4, 5, 6).unbind(0)
    std = torch.full((3, 1, 1, 1), 0.7)
    assert torch.allclose(
        gaussian_log_prob(x, mean, std, "sum"), gaussian_log_prob(x, mean, std, "mean") * 4 * 5 * 6, atol=1e-4
    )


def test_eta1_variance_is_ddpm_posterior_variance():
    s = sched(1000, steps_offset=0)
    ddpm = DDPMScheduler(**{k: v for k, v in SD.items() if k not in ("set_alpha_to_one", "steps_offset")})
    x, m = torch.zeros(2, 1, 1, 1, 1).unbind(0)
    for t in (900, 500, 10):
        std = ddim_step(s, m, t, x, eta=1.0, prev_sample=x).std.flatten()[0]
        a_t, a_p, beta = ddpm.alphas_cumprod[t], ddpm.alphas_cumprod[t - 1], ddpm.betas[t]
        posterior = (1 - a_p) / (1 - a_t) * beta
        assert abs(float(std**2 - posterior)) < 1e-4 * float(posterior)  # fp32 cancellation in 1 - a_t / a_prev


def test_per_sample_timesteps_broadcast():
    s = sched(10)
    x, m, prev = torch.randn(3, 3, 4, 4, 4).unbind(0)
    ts = s.timesteps[[0, 4, 9]]
    batched = ddim_step(s, m, ts, x, eta=1.0, prev_sample=prev).log_prob
    single = torch.cat(
        [
            ddim_step(s, m[i : i + 1], int(ts[i]), x[i : i + 1], eta=1.0, prev_sample=prev[i : i + 1]).log_prob
            for i in range(3)
        ]
    )
    assert torch.allclose(batched, single, atol=1e-6)


def test_trajectory_recompute_logprobs():
    s = sched(8)
    w = torch.tensor(0.3)

    def denoise(x, t):
        return w * x + 0.001 * t.float()

    torch.manual_seed(0)
    traj = sample_trajectory(denoise, s, torch.randn(2, 4, 4, 4), eta=1.0, generator=torch.Generator().manual_seed(3))
    assert traj.latents.shape == (2, 9, 4, 4, 4) and traj.log_probs.shape == (2, 8)
    for k, t in enumerate(traj.timesteps):
        x = traj.latents[:, k]
        _, lp = ddim_step_with_logprob(s, denoise(x, t), t, x, eta=1.0, prev_sample=traj.latents[:, k + 1])
        assert (lp - traj.log_probs[:, k]).abs().max() < 1e-5


def test_cfg_combine_and_rescale():
    u, c = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.equal(cfg_combine(u, c, 5.0), 5 * c)
    c2 = torch.randn(2, 3, 4, 4)
    rescaled = cfg_combine(torch.zeros_like(c2), c2, 7.0, rescale=1.0)
    assert torch.allclose(rescaled.std(dim=(1, 2, 3)), c2.std(dim=(1, 2, 3)), atol=1e-5)


def test_draw_truncation():
    rng = random.Random(0)
    assert draw_truncation("none", 50) == 0
    assert draw_truncation("fixed", 50, k=1) == 49
    assert draw_truncation("fixed", 50, k=50) == 0
    assert all(1 <= draw_truncation("uniform", 50, rng=rng) < 50 for _ in range(200))
    g = [draw_truncation("gaussian", 50, rng=rng) for _ in range(500)]
    assert all(1 <= k < 50 for k in g) and 40 < sum(g) / len(g) < 44
    with pytest.raises(DiffalignError, match="between 1 and"):
        draw_truncation("fixed", 10, k=11)
    with pytest.raises(DiffalignError, match="unknown truncation mode"):
        draw_truncation("sometimes", 10)


class CountingDenoiser(torch.nn.Module):
    """A toy network with one parameter that counts calls made with gradient enabled."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(0.5))
        self.grad_calls = 0

    def forward(self, x, t):
        if torch.is_grad_enabled():
            self.grad_calls += 1
        return self.theta * torch.tanh(x) + 1e-4 * t.float()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_truncation_k_lets_gradient_through_exactly_k_steps(k):
    s = sched(6)
    net = CountingDenoiser()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out, _ = sample_differentiable(net, s, x_T, grad_from=6 - k, eta=0.0, checkpoint=False)
    assert net.grad_calls == k
    out.sum().backward()
    # independent: the same chain where the first 6-k network outputs are constants
    theta = torch.tensor(0.5, requires_grad=True)
    x = x_T
    for i, t in enumerate(s.timesteps):
        th = theta if i >= 6 - k else theta.detach()
        x = ddim_step(s, th * torch.tanh(x) + 1e-4 * t.float(), t, x, eta=0.0).prev_sample
    x.sum().backward()
    assert torch.allclose(net.theta.grad, theta.grad, atol=1e-6)
    assert net.theta.grad.abs() > 0


def test_checkpointed_gradient_equals_plain_and_finite_difference():
    s = sched(5)
    net = CountingDenoiser()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    noises = [torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    grads = []
    for ckpt in (False, True):
        net.theta.grad = None
        out, _ = sample_differentiable(net, s, x_T, grad_from=0, eta=1.0, noises=noises, checkpoint=ckpt)
        out.pow(2).mean().backward()
        grads.append(net.theta.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    with torch.no_grad():
        vals = []
        for d in (1e-3, -1e-3):
            net.theta += d
            vals.append(sample_differentiable(net, s, x_T, eta=1.0, noises=noises, checkpoint=False)[0].pow(2).mean())
            net.theta -= d
    fd = (vals[0] - vals[1]) / 2e-3
    assert abs(float(fd - grads[0])) < 1e-3 * max(1.0, abs(float(fd)))


def test_detach_input_gradient_is_the_frozen_input_derivative():
    """DRTune's stop-gradient: d/dtheta of the chain with every network input held at its sampled value."""
    s = sched(5)
    net = CountingDenoiser()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    noises = [torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    grads = {}
    for detach in (False, True):
        net.theta.grad = None
        out, _ = sample_differentiable(net, s, x_T, eta=1.0, noises=noises, checkpoint=True, detach_input=detach)
        out.pow(2).mean().backward()
        grads[detach] = float(net.theta.grad)
    with torch.no_grad():  # the network inputs of the chain at theta = 0.5
        inputs, x = [], x_T
        for k, t in enumerate(s.timesteps):
            inputs.append(x)
            x = ddim_step(s, net(x, t), t, x, eta=1.0, noise=noises[k]).prev_sample

        def frozen_chain(theta: float) -> float:  # the linear path keeps x, the network sees the frozen input
            x = x_T
            for k, t in enumerate(s.timesteps):
                eps = theta * torch.tanh(inputs[k]) + 1e-4 * t.float()
                x = ddim_step(s, eps, t, x, eta=1.0, noise=noises[k]).prev_sample
            return float(x.pow(2).mean())

        fd = (frozen_chain(0.5 + 1e-3) - frozen_chain(0.5 - 1e-3)) / 2e-3
    assert abs(grads[True] - fd) < 1e-3 * max(1.0, abs(fd))
    assert abs(grads[True] - grads[False]) > 1e-3 * abs(grads[False])  # not the full-chain gradient


def test_ddim_step_requires_set_timesteps():
    s = DDIMScheduler(**SD)
    with pytest.raises(DiffalignError, match="set_timesteps"):
        ddim_step(s, torch.zeros(1, 1, 2, 2), 10, torch.zeros(1, 1, 2, 2))
    with pytest.raises(DiffalignError, match="logprob_reduction"):
        gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 1), "max")
