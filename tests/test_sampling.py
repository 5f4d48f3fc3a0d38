"""The sampler math against diffusers and against independent hand computations (spec §1.6)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from train_fixtures import FakeCombining

from diffalign import sampling
from diffalign.errors import DiffalignError
from diffalign.sampling import (
    DDIMSampler,
    Sampler,
    StepOutput,
    cfg_combine,
    ddim_step,
    ddim_step_with_logprob,
    denoise_step,
    draw_truncation,
    gaussian_log_prob,
    make_denoiser,
    make_sampler,
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


def test_sde_window_is_stochastic_only_in_its_first_steps():
    """sde_steps = W: the first W steps are the eta chain (same draws as without a window), the rest the
    deterministic DDIM chain from the W-th latent (eta 0, as evaluation samples), with log-prob 0 stored."""
    s = sched(6)

    def denoise(x, t):
        return 0.3 * x + 0.001 * t.float()

    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    full = sample_trajectory(denoise, s, x_T, eta=1.0, generator=torch.Generator().manual_seed(3))
    win = sample_trajectory(denoise, s, x_T, eta=1.0, generator=torch.Generator().manual_seed(3), sde_steps=2)
    assert torch.equal(win.latents[:, :3], full.latents[:, :3]) and torch.equal(
        win.log_probs[:, :2], full.log_probs[:, :2]
    )
    assert (win.log_probs[:, 2:] == 0).all() and not torch.equal(win.latents[:, 3], full.latents[:, 3])
    x = win.latents[:, 2]
    for k in range(2, 6):  # the hand-run deterministic tail
        t = win.timesteps[k]
        x, _ = ddim_step_with_logprob(s, denoise(x, t), t, x, eta=0.0)
        assert torch.allclose(x, win.latents[:, k + 1], atol=1e-6)
    every = sample_trajectory(denoise, s, x_T, eta=1.0, generator=torch.Generator().manual_seed(3), sde_steps=6)
    assert torch.equal(every.latents, full.latents)


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


# ------------------------------------------------------------------------ the sampler interface
class ToyUNet(torch.nn.Module):
    """A diffusers-UNet-shaped toy: eps = tanh(x) * mean(text) + 1e-3 t, elementwise per row."""

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
        from types import SimpleNamespace

        scale = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=torch.tanh(x) * scale + 1e-3 * t.float().reshape(-1, 1, 1, 1))


def test_denoise_step_is_the_hand_composed_cfg_and_ddim_step():
    s = sched(10)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    x, z, prev = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = s.timesteps[4]
    denoise = make_denoiser(ToyUNet(), cond, uncond, guidance_scale=5.0)
    ours = denoise_step(denoise, s, x, t, 1.0, noise=z)
    # by hand: two unguided network calls, CFG e_u + w (e_c - e_u), then the DDIM step (Eq. 12, 16)
    tt = t.reshape(1).expand(2)
    e_u = ToyUNet()(x, tt, encoder_hidden_states=uncond).sample
    e_c = ToyUNet()(x, tt, encoder_hidden_states=cond).sample
    eps = e_u + 5.0 * (e_c - e_u)
    hand = ddim_step(s, eps, t, x, eta=1.0, noise=z)
    for field in ("prev_sample", "log_prob", "mean", "std", "pred_original_sample"):
        assert torch.equal(getattr(ours, field), getattr(hand, field)), field
    assert torch.equal(ours.x0_pred, hand.pred_original_sample)
    # and the DDIM update is diffusers' own step with the same noise
    ref = s.step(eps, t, x, eta=1.0, variance_noise=z)
    assert (ours.prev_sample - ref.prev_sample).abs().max() < 1e-6
    assert (ours.x0_pred - ref.pred_original_sample).abs().max() < 1e-6
    # scoring a given x_{t-1} (DDPO's recomputation) goes through the same path
    scored = denoise_step(denoise, DDIMSampler(s), x, t, 1.0, prev_sample=prev)
    assert torch.equal(scored.log_prob, ddim_step(s, eps, t, x, eta=1.0, prev_sample=prev).log_prob)


@pytest.mark.parametrize("kw", [{}, {"prediction_type": "v_prediction"}])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ddim_sampler_logprob_is_the_independent_gaussian_density(kw, reduction):
    s = sched(20, **kw)
    sampler = make_sampler(s)
    sampler.logprob_reduction = reduction
    g = torch.Generator().manual_seed(2)
    x, m, prev = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    eta, t = 0.7, int(s.timesteps[6])
    out = sampler.step(m, t, x, eta, prev_sample=prev)
    # independently: DDIM Eq. 12 (mean) and Eq. 16 (sigma) from alphas_cumprod
    a_t, a_p = s.alphas_cumprod[t], s.alphas_cumprod[t - 1000 // 20]
    if kw:
        x0, e = a_t.sqrt() * x - (1 - a_t).sqrt() * m, a_t.sqrt() * m + (1 - a_t).sqrt() * x
    else:
        x0, e = (x - (1 - a_t).sqrt() * m) / a_t.sqrt(), m
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    mean = a_p.sqrt() * x0 + (1 - a_p - sigma**2).sqrt() * e
    dens = torch.distributions.Normal(mean, sigma).log_prob(prev)
    expected = dens.mean(dim=(1, 2, 3)) if reduction == "mean" else dens.sum(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, expected, rtol=1e-5, atol=1e-4)
    assert (sampler.predict_x0(m, t, x) - x0).abs().max() < 1e-5
    assert torch.equal(sampler.predict_x0(m, t, x), out.x0_pred)


def test_ddim_sampler_wraps_the_scheduler():
    s = sched(7)
    sampler = make_sampler(s)
    assert isinstance(sampler, DDIMSampler) and make_sampler(sampler) is sampler
    assert torch.equal(sampler.timesteps, s.timesteps) and sampler.num_steps == 7
    assert sampler.init_noise_sigma == s.init_noise_sigma
    x = torch.randn(1, 4, 2, 2)
    assert torch.equal(sampler.scale_model_input(x, s.timesteps[0]), x)
    sampler.set_steps(3)
    assert len(s.timesteps) == 3 and sampler.num_steps == 3


def test_make_sampler_names_the_supported_schedulers():
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with pytest.raises(
        DiffalignError, match="no sampler for EulerDiscreteScheduler; supported schedulers: DDIMScheduler"
    ):
        make_sampler(euler)
    with pytest.raises(DiffalignError) as err:
        sample_trajectory(lambda x, t: x, euler, torch.zeros(1, 1, 2, 2))
    assert "\n" not in str(err.value)


class FakeSampler(Sampler):
    """Not DDIM: x_{t-1} = x_t - 0.1 eps (+ 0.05 eta z), on its own grid, with a non-identity input scaling."""

    def __init__(self, scheduler=None, steps: int = 4) -> None:
        self.scheduler = scheduler
        self.set_steps(steps)

    @property
    def timesteps(self):
        return self._timesteps

    def set_steps(self, num_steps, device=None):
        self._timesteps = torch.arange(num_steps, 0, -1) * 100

    def scale_model_input(self, x_t, t):
        return 2.0 * x_t

    def predict_x0(self, model_output, t, x_t):
        return x_t - model_output

    def step(self, model_output, t, x_t, eta=1.0, *, generator=None, noise=None, prev_sample=None):
        mean = x_t - 0.1 * model_output
        std = torch.full((x_t.shape[0], 1, 1, 1), 0.05 * eta)
        if prev_sample is None:
            z = noise if noise is not None else torch.randn(x_t.shape, generator=generator)
            prev_sample = mean + std * z if eta > 0 else mean
        logp = gaussian_log_prob(prev_sample.detach(), mean, std) if eta > 0 else torch.zeros(x_t.shape[0])
        return StepOutput(prev_sample, logp, mean, std, self.predict_x0(model_output, t, x_t))


def test_a_new_sampler_plugs_into_the_samplers(monkeypatch):
    seen = []

    def denoise(x, t):
        seen.append((x.clone(), t))
        return 0.5 * x

    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectory(denoise, FakeSampler(), x_T, eta=0.0)
    x = x_T
    for k, t in enumerate([400, 300, 200, 100]):  # by hand: the network sees 2 x, the step is x - 0.1 eps
        assert torch.equal(seen[k][0], 2.0 * x) and int(seen[k][1]) == t
        x = x - 0.1 * (0.5 * (2.0 * x))
        assert torch.equal(traj.latents[:, k + 1], x)
    assert traj.timesteps.tolist() == [400, 300, 200, 100] and torch.equal(traj.log_probs, torch.zeros(2, 4))
    # gradients flow through the new step rule in the differentiable sampler
    net = CountingDenoiser()
    out, x0 = sample_differentiable(net, FakeSampler(), x_T, grad_from=2, eta=0.0, checkpoint=False)
    out.sum().backward()
    assert net.grad_calls == 2 and net.theta.grad.abs() > 0 and x0.shape == x_T.shape

    # a diffusers-like scheduler class registered once is wrapped wherever a scheduler is taken
    class FlowScheduler:
        pass

    monkeypatch.setitem(sampling._SAMPLERS, "FlowScheduler", FakeSampler)
    seen.clear()
    again = sample_trajectory(denoise, FlowScheduler(), x_T, eta=0.0)
    assert isinstance(make_sampler(FlowScheduler()), FakeSampler) and torch.equal(again.latents, traj.latents)


def test_ddpo_runs_on_a_new_sampler_unchanged():
    """DDPO samples and rescores through the sampler it is given: at theta_old every ratio is exactly 1."""
    from diffalign.config import SampleConfig, TrainConfig
    from diffalign.methods import PromptBatch
    from diffalign.methods.ddpo import DDPO, DDPOConfig

    w = torch.nn.Parameter(torch.tensor(0.3))

    class Ctx(FakeCombining):
        sample = SampleConfig(steps=4, eta=1.0, guidance_scale=1.0, batch_size=4)
        sampler = scheduler = FakeSampler(steps=4)
        generator = torch.Generator().manual_seed(0)
        rng = random.Random(0)
        checkpointing = False
        process_index = 0

        def denoiser(self, prompts):
            return lambda x, t: w * x

        def initial_latents(self, n, generator=None):
            return torch.randn(n, 4, 2, 2, generator=self.generator)

        def decode(self, latents, differentiable=False):
            return torch.sigmoid(latents[:, :3])

        def rewards(self, images, prompts):
            r = images.mean(dim=(1, 2, 3))
            return r, {"toy": r}

        def backward(self, loss):
            loss.backward()

        def optimizer_step(self):
            return 0.0

        def gather(self, t):
            return t

        def prompt_keys(self, prompts):
            return prompts

    ctx = Ctx()
    cfg = DDPOConfig(train_batch_size=2, per_prompt_stat_tracking=False)
    res = DDPO(cfg, ctx.sample, TrainConfig(method="ddpo")).step(ctx, [PromptBatch(list("abcd"), list("abcd"))])
    assert res.stats["approx_kl"] == 0.0 and res.stats["clipfrac"] == 0.0 and res.updates == 2
    assert w.grad is not None and w.grad.abs() > 0
