"""Reward backpropagation: AlignProp, DRaFT-K, DRaFT-LV and ReFL as truncation variants (spec §3).

All four maximize ``J(theta) = E_{c, x_T, noise}[ r(D(x_0(theta)), c) ]`` with pathwise gradients
through the sampler; they differ only in which sampler steps carry gradient:

    AlignProp (arXiv 2310.03739)  steps k* .. T-1, k* drawn per batch (uniform or gaussian), or fixed
    DRaFT-K   (arXiv 2309.17400)  the last K steps (k* = T - K); K = T is full DRaFT
    DRaFT-LV  (arXiv 2309.17400)  x_0 sampled without gradient, re-noised n times to the last
                                  timestep t_1: x_{t_1}^(j) = sqrt(a_t1) sg(x_0) + sqrt(1 - a_t1) eps_j,
                                  one differentiable step each; L = -(1/n) sum_j r(D(x_0^(j)))
    ReFL      (arXiv 2304.05977)  steps 0 .. j-1 without gradient, j ~ U{lo..hi} (a late step), one step
                                  with gradient; the reward is taken on the step's predicted x0 (Eq. 7)

Reward losses (per sample, minimized): ``neg`` = -r, ``abs_target`` = |r - target| (AlignProp's
aesthetic loss), ``hinge`` = max(0, target - r) (ReFL's ReLU(2 - r)), with r the combined signal of
``reward.combine``. The loss of a batch is ``loss_coeff * mean(L)`` (``grad_scale`` for ReFL), the mean
taken by :meth:`diffalign.combine.Combined.mean_loss`: over the selected samples only (Pareto), each
weighted (Ctrl-U's exp(-U)); one optimizer step per training step after
``train.gradient_accumulation_steps`` micro-batches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from diffalign.errors import DiffalignError
from diffalign.methods.base import Method, PromptBatch, StepContext, StepResult
from diffalign.methods.registry import MethodEntry, register_method
from diffalign.sampling import denoise_step, draw_truncation, sample_differentiable

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig, SampleConfig, TrainConfig

LossForm = Literal["neg", "abs_target", "hinge"]


# ------------------------------------------------------------------------------------------ configs
def _check_loss(section: str, coeff_name: str, coeff: float) -> None:
    if coeff <= 0:
        raise DiffalignError(f"{section}.{coeff_name} must be > 0, got {coeff}")


@dataclass
class AlignPropConfig:
    """AlignProp (Prabhudesai et al. 2023): randomized truncated backprop through the last steps."""

    truncation: Literal["uniform", "gaussian", "fixed", "none"] = "uniform"  # paper: uniform; repo: gaussian
    k: int = 1  # "fixed": gradient through the last k steps (k = 1 is AlignProp "K=1")
    gaussian_mean: float = 0.84  # "gaussian": first step with gradient ~ N(mean*T, std*T) (repo: 42 and 5 of T=50)
    gaussian_std: float = 0.1
    detach_input: bool = False  # DRTune's stop-gradient at the UNet input latent (sampling.sample_differentiable)
    loss: LossForm = "neg"
    target: float = 10.0  # for abs_target / hinge (AlignProp's aesthetic target is 10)
    loss_coeff: float = 0.01  # AlignProp multiplies the loss by 0.01 (Adam is nearly invariant to it)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise DiffalignError(f"alignprop.k must be >= 1, got {self.k}")
        if not 0.0 < self.gaussian_mean < 1.0 or self.gaussian_std <= 0:
            raise DiffalignError("alignprop.gaussian_mean must be in (0, 1) and gaussian_std > 0 (fractions of T)")
        _check_loss("alignprop", "loss_coeff", self.loss_coeff)


@dataclass
class DraftConfig:
    """DRaFT (Clark et al. 2024): ``draft_k`` backprops through the last k steps; ``draft_lv`` re-noises."""

    k: int = 1  # draft_k: gradient through the last k steps (k = sample.steps is full DRaFT)
    n_lv: int = 2  # draft_lv: re-noisings of x_0 per sample
    detach_input: bool = False  # draft_k: DRTune's stop-gradient at the UNet input latent
    loss: LossForm = "neg"
    target: float = 10.0
    loss_coeff: float = 1.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise DiffalignError(f"draft.k must be >= 1, got {self.k}")
        if self.n_lv < 1:
            raise DiffalignError(f"draft.n_lv must be >= 1, got {self.n_lv}")
        _check_loss("draft", "loss_coeff", self.loss_coeff)


@dataclass
class ReFLConfig:
    """ReFL (Xu et al. 2023): reward on the predicted x0 of one random late step."""

    min_step: float = 0.75  # j is drawn from steps [floor(min_step*T), ceil(max_step*T) - 1] (ReFL: 30..39 of 40)
    max_step: float = 1.0
    loss: LossForm = "hinge"  # ReFL: ReLU(target - r); "neg" for plain -r
    target: float = 2.0
    grad_scale: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_step < self.max_step <= 1.0:
            raise DiffalignError(
                f"refl.min_step and refl.max_step are fractions of the sampling steps with "
                f"0 <= min_step < max_step <= 1, got {self.min_step} and {self.max_step}"
            )
        _check_loss("refl", "grad_scale", self.grad_scale)


# --------------------------------------------------------------------------------- pure functions
def reward_loss(r: torch.Tensor, form: LossForm = "neg", target: float = 0.0) -> torch.Tensor:
    """Per-sample loss from rewards ``r`` [B]: -r, |r - target| or max(0, target - r)."""
    if form == "neg":
        return -r
    if form == "abs_target":
        return (r - target).abs()
    if form == "hinge":
        return torch.relu(target - r)
    raise DiffalignError(f"unknown reward loss {form!r}; use neg, abs_target or hinge")


def refl_step_range(num_steps: int, min_step: float, max_step: float) -> tuple[int, int]:
    """Inclusive range of ReFL's gradient step j for ``num_steps`` sampling steps."""
    lo = min(int(math.floor(min_step * num_steps)), num_steps - 1)
    hi = max(lo, min(int(math.ceil(max_step * num_steps)) - 1, num_steps - 1))
    return lo, hi


def renoise(x0: torch.Tensor, alpha_bar: torch.Tensor | float, noises: list[torch.Tensor]) -> torch.Tensor:
    """DRaFT-LV's re-noising: ``sqrt(a) sg(x0) + sqrt(1 - a) eps_j`` for each noise, stacked to [n*B, ...].

    ``x0`` must already be detached: the gradient of DRaFT-LV enters only through the final step.
    """
    if x0.requires_grad:
        raise RuntimeError("DRaFT-LV: x_0 must be detached before re-noising (sample it under no_grad)")
    a = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    return torch.cat([a.sqrt() * x0 + (1 - a).sqrt() * eps for eps in noises])


# ----------------------------------------------------------------------------------------- methods
class RewardBackprop(Method):
    """Shared step: for each micro-batch, differentiable images -> reward -> loss -> backward; one update."""

    needs_differentiable_reward = True
    loss_form: LossForm = "neg"
    target: float = 0.0
    coeff: float = 1.0

    def __init__(self, cfg, sample: SampleConfig, train: TrainConfig) -> None:
        self.cfg, self.sample, self.train = cfg, sample, train

    def batches_per_step(self) -> int:
        return self.train.gradient_accumulation_steps

    def images(self, ctx: StepContext, prompts: list[str]) -> tuple[torch.Tensor, list[str], dict[str, float]]:
        """Differentiable images for ``prompts``, the prompt of each image and per-batch stats."""
        raise NotImplementedError

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        losses, parts_all, combined, stats_all = [], [], [], []
        images = None
        for batch in batches:
            images, prompts, stats = self.images(ctx, batch.local)
            terms, parts = ctx.reward_terms(images, prompts)  # combined over this micro-batch (reward.combine)
            # mean over the selected samples of w_i * L(r_i) (+ a combiner's penalty): zero gradient outside P
            loss = self.coeff * terms.mean_loss(reward_loss(terms.signal, self.loss_form, self.target))
            ctx.backward(loss / len(batches))
            losses.append(float(loss.detach()))
            parts_all.append({k: v.detach() for k, v in parts.items()})
            combined.append(terms.signal.detach())
            stats_all.append(stats | terms.stats)
        grad_norm = ctx.optimizer_step()
        keys = stats_all[0].keys()
        return StepResult(
            loss=sum(losses) / len(losses),
            rewards={k: torch.cat([p[k] for p in parts_all]) for k in parts_all[0]},
            reward=torch.cat(combined),
            grad_norm=grad_norm,
            updates=1,
            stats={k: sum(s[k] for s in stats_all) / len(stats_all) for k in keys},
            images=images.detach() if images is not None else None,
            prompts=list(prompts) if images is not None else None,
        )

    def _sample(self, ctx: StepContext, prompts: list[str], grad_from: int, stop_at: int | None = None):
        denoise = ctx.denoiser(prompts)
        x_t = ctx.initial_latents(len(prompts))
        return sample_differentiable(
            denoise,
            ctx.scheduler,
            x_t,
            grad_from=grad_from,
            eta=self.sample.eta,
            generator=ctx.generator,
            checkpoint=ctx.checkpointing,
            stop_at=stop_at,
            detach_input=getattr(self.cfg, "detach_input", False),
        )


class AlignProp(RewardBackprop):
    """Gradient through steps k* .. T-1 with k* drawn by ``alignprop.truncation`` (AlignProp Sec. 4)."""

    name = "alignprop"

    def __init__(self, cfg: AlignPropConfig, sample: SampleConfig, train: TrainConfig) -> None:
        super().__init__(cfg, sample, train)
        self.loss_form, self.target, self.coeff = cfg.loss, cfg.target, cfg.loss_coeff

    def grad_from(self, rng: random.Random) -> int:
        t = self.sample.steps
        c = self.cfg
        return draw_truncation(c.truncation, t, k=c.k, mean=c.gaussian_mean * t, std=c.gaussian_std * t, rng=rng)

    def images(self, ctx, prompts):
        k_star = self.grad_from(ctx.rng)
        x0, _ = self._sample(ctx, prompts, grad_from=k_star)
        stats = {"grad_steps": float(self.sample.steps - k_star)}
        return ctx.decode(x0, differentiable=True), prompts, stats


class DraftK(RewardBackprop):
    """DRaFT-K: gradient through the last K steps only (K fixed; K = T is full DRaFT)."""

    name = "draft_k"

    def __init__(self, cfg: DraftConfig, sample: SampleConfig, train: TrainConfig) -> None:
        super().__init__(cfg, sample, train)
        self.loss_form, self.target, self.coeff = cfg.loss, cfg.target, cfg.loss_coeff

    def images(self, ctx, prompts):
        k_star = draw_truncation("fixed", self.sample.steps, k=self.cfg.k)
        x0, _ = self._sample(ctx, prompts, grad_from=k_star)
        return ctx.decode(x0, differentiable=True), prompts, {"grad_steps": float(self.cfg.k)}


class DraftLV(RewardBackprop):
    """DRaFT-LV: n re-noisings of a no-grad sample to the last timestep, one differentiable step each."""

    name = "draft_lv"

    def __init__(self, cfg: DraftConfig, sample: SampleConfig, train: TrainConfig) -> None:
        super().__init__(cfg, sample, train)
        self.loss_form, self.target, self.coeff = cfg.loss, cfg.target, cfg.loss_coeff

    def images(self, ctx, prompts):
        from diffusers.utils.torch_utils import randn_tensor

        n = self.cfg.n_lv
        with torch.no_grad():
            x0, _ = self._sample(ctx, prompts, grad_from=self.sample.steps)
        x0 = x0.detach()
        t1 = ctx.scheduler.timesteps[-1]
        a = ctx.scheduler.alphas_cumprod[int(t1)]
        noises = [randn_tensor(x0.shape, generator=ctx.generator, device=x0.device, dtype=x0.dtype) for _ in range(n)]
        x_t1 = renoise(x0, a, noises)
        many = [p for _ in range(n) for p in prompts]
        denoise = ctx.denoiser(many)
        noise = None  # the step noise, drawn in x_t1's dtype (the network never draws from ctx.generator)
        if self.sample.eta > 0:
            noise = randn_tensor(x_t1.shape, generator=ctx.generator, device=x_t1.device, dtype=x_t1.dtype)
        step = denoise_step(
            denoise, ctx.scheduler, x_t1, t1, self.sample.eta, noise=noise, checkpoint=ctx.checkpointing
        )
        return ctx.decode(step.prev_sample, differentiable=True), many, {"n_lv": float(n)}


class ReFL(RewardBackprop):
    """ReFL: no-grad steps 0..j-1, one step with gradient, reward on that step's predicted x0."""

    name = "refl"

    def __init__(self, cfg: ReFLConfig, sample: SampleConfig, train: TrainConfig) -> None:
        super().__init__(cfg, sample, train)
        self.loss_form, self.target, self.coeff = cfg.loss, cfg.target, cfg.grad_scale

    def draw_step(self, rng: random.Random) -> int:
        lo, hi = refl_step_range(self.sample.steps, self.cfg.min_step, self.cfg.max_step)
        return rng.randint(lo, hi)

    def images(self, ctx, prompts):
        j = self.draw_step(ctx.rng)
        _, x0_hat = self._sample(ctx, prompts, grad_from=j, stop_at=j + 1)
        return ctx.decode(x0_hat, differentiable=True), prompts, {"refl_step": float(j)}


# ---------------------------------------------------------------------------------------- registry
def validate_reward_backprop(cfg: DiffalignConfig) -> None:
    """Checks every reward-backprop method shares: one sampling batch per micro-batch."""
    if cfg.sample.num_batches != 1:
        raise DiffalignError(
            f"sample.num_batches is for online policy methods (ddpo, grpo, ...); {cfg.train.method} takes train.gradient_accumulation_steps micro-batches "
            "per update: set sample.num_batches=1"
        )


def validate_alignprop(cfg: DiffalignConfig) -> None:
    """AlignProp: a fixed truncation within the sampler's steps; random truncation needs two steps."""
    validate_reward_backprop(cfg)
    c, steps = cfg.method_config, cfg.sample.steps
    if c.truncation == "fixed" and c.k > steps:
        raise DiffalignError(f"alignprop.k={c.k} exceeds sample.steps={steps}; lower alignprop.k")
    if c.truncation in ("uniform", "gaussian") and steps < 2:
        raise DiffalignError("alignprop's random truncation needs sample.steps >= 2; use alignprop.truncation=fixed")


def validate_draft_k(cfg: DiffalignConfig) -> None:
    """DRaFT-K: K within the sampler's steps."""
    validate_reward_backprop(cfg)
    k, steps = cfg.method_config.k, cfg.sample.steps
    if k > steps:
        raise DiffalignError(f"draft.k={k} exceeds sample.steps={steps}; lower draft.k")


# AlignProp, DRaFT-K and ReFL only ask the sampler for differentiable steps and x0_hat, so they run on flow
# pipelines too (sample.eta: the flow SDE's noise level, 0 = the ODE); DRaFT-LV re-noises x0 with DDIM's
# alpha_bar, so it stays DDIM-only.
FLOW_TOO = ("ddim", "flow")
register_method(
    MethodEntry("alignprop", AlignProp, AlignPropConfig, "alignprop", True, validate_alignprop, samplers=FLOW_TOO)
)
register_method(MethodEntry("draft_k", DraftK, DraftConfig, "draft", True, validate_draft_k, samplers=FLOW_TOO))
register_method(MethodEntry("draft_lv", DraftLV, DraftConfig, "draft", True, validate_reward_backprop))
register_method(MethodEntry("refl", ReFL, ReFLConfig, "refl", True, validate_reward_backprop, samplers=FLOW_TOO))
