"""DDPO_IS: PPO-clipped policy gradient over the denoising chain (Black et al. 2024, arXiv 2305.13301; spec §2).

Per training step (one "epoch" of the reference): sample trajectories with log-probs under theta_old
(no gradient), score them, turn rewards into advantages, then take ``inner_epochs`` passes of PPO
updates over the stored transitions:

    A_i   = (R_i - mean) / (std + 1e-6)          per prompt once its buffer holds min_count rewards,
                                                 else over the gathered batch (ddpo-pytorch stat_tracking.py)
    A_i   = (R_i - mean(R)) / (std(R) + 1e-8)    without per-prompt tracking
    A^_i  = clamp(A_i, -adv_clip_max, adv_clip_max)
    rho   = exp(logp_theta(x_{t-1} | x_t, c) - logp_old)                         (paper Eq. 4, Sec. 4.3)
    L_k   = mean_i max(-A^_i rho_i, -A^_i clamp(rho_i, 1 - eps, 1 + eps))

Training recomputes log-probs of the stored ``x_{t-1}`` with the same guidance as sampling; every
trajectory gets its own random permutation of the step axis and the first
``int(T * timestep_fraction)`` steps of it are trained; one backward per step index, one optimizer
update every ``train.gradient_accumulation_steps`` minibatches.

A step is three separately testable parts: :meth:`DDPO.collect` (the shared on-policy rollouts of
:func:`diffalign.rollouts.collect`), :meth:`DDPO.local_advantages` (the stat tracker over every
process's rewards, then this process's share) and :meth:`DDPO.ppo_epochs`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffalign.errors import DiffalignError
from diffalign.methods.base import (
    Method,
    PromptBatch,
    StepContext,
    StepResult,
    backward_denoisers,
    check_minibatches,
)
from diffalign.methods.registry import MethodEntry, register_method
from diffalign.rollouts import Collected, Trajectories, collect
from diffalign.sampling import Sampler, denoise_step

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig, SampleConfig, TrainConfig


@dataclass
class DDPOConfig:
    """DDPO defaults from ddpo-pytorch ``config/base.py`` (see docs/training.md)."""

    clip_range: float = 1e-4  # eps of the PPO clip, tuned for log-probs averaged over latent elements
    adv_clip_max: float = 5.0
    inner_epochs: int = 1  # PPO passes over each batch of samples
    timestep_fraction: float = 1.0  # fraction of the T steps trained per trajectory
    train_batch_size: int = 4  # trajectories per minibatch (per process)
    per_prompt_stat_tracking: bool = True
    stat_buffer_size: int = 16
    stat_min_count: int = 16
    cfg: bool = True  # recompute log-probs with classifier-free guidance, as sampled

    def __post_init__(self) -> None:
        if self.clip_range <= 0:
            raise DiffalignError(f"ddpo.clip_range must be > 0, got {self.clip_range}")
        if self.adv_clip_max <= 0:
            raise DiffalignError(f"ddpo.adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.inner_epochs < 1 or self.train_batch_size < 1:
            raise DiffalignError("ddpo.inner_epochs and ddpo.train_batch_size must be >= 1")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise DiffalignError(f"ddpo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.stat_buffer_size < 1 or self.stat_min_count < 1:
            raise DiffalignError("ddpo.stat_buffer_size and ddpo.stat_min_count must be >= 1")


# --------------------------------------------------------------------------------- pure functions
def ppo_clip_loss(
    logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), negated to be minimized.

    Returns the scalar loss and ``approx_kl = 0.5 mean((logp - logp_old)^2)``, ``clipfrac =
    mean(|rho - 1| > eps)`` (detached).
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * torch.mean((logp - logp_old) ** 2),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
        }
    return loss, stats


def batch_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(R - mean) / (std + eps) over the whole (gathered) batch, population std."""
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + eps)).to(rewards.dtype)


def clip_advantages(adv: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    return torch.clamp(adv, -adv_clip_max, adv_clip_max)


class PerPromptStatTracker:
    """Per-prompt reward normalization of ddpo-pytorch (``stat_tracking.py``), with a checkpointable state.

    Each prompt keeps a FIFO of its last ``buffer_size`` rewards. The buffer is updated first; a
    prompt with fewer than ``min_count`` rewards is normalized by the stats of the whole batch, else
    by its own buffer (population std, + 1e-6).
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}
        self.last_per_prompt_fraction = 0.0

    def update(self, prompts: list[str], rewards: torch.Tensor | np.ndarray | list[float]) -> np.ndarray:
        prompts_arr = np.asarray(prompts)
        values = np.asarray(rewards.cpu() if isinstance(rewards, torch.Tensor) else rewards, dtype=np.float64)
        if len(prompts_arr) != len(values):
            raise ValueError(f"got {len(prompts_arr)} prompts for {len(values)} rewards")
        advantages = np.empty_like(values)
        per_prompt = 0
        for prompt in np.unique(prompts_arr):
            mask = prompts_arr == prompt
            mine = values[mask]
            buffer = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(mine.tolist())
            if len(buffer) < self.min_count:
                mean, std = np.mean(values), np.std(values) + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
                per_prompt += int(mask.sum())
            advantages[mask] = (mine - mean) / std
        self.last_per_prompt_fraction = per_prompt / max(len(values), 1)
        return advantages

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {k: list(v) for k, v in self.stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}


def ppo_permutations(rng: random.Random, n: int, num_steps: int) -> tuple[list[int], torch.Tensor]:
    """One inner epoch's shuffles, drawn from ``rng`` (ddpo-pytorch ``train.py``, spec §2.2):
    the order of the n trajectories, then an independent permutation of the step axis of each
    trajectory ([n, T] long; the first ``int(T * timestep_fraction)`` columns are trained)."""
    order = list(range(n))
    rng.shuffle(order)
    perms = []
    for _ in range(n):
        p = list(range(num_steps))
        rng.shuffle(p)
        perms.append(p)
    return order, torch.tensor(perms)


def ppo_minibatches(
    ctx: StepContext,
    stats: PPOStats,
    epochs: int,
    n: int,
    batch_size: int,
    accum: int,
    draw: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The PPO passes of one step, shared by DDPO and GRPO: per epoch, ``draw()`` gives the trajectory
    order [n] and the epoch's step choice; yields each whole minibatch's indices (``batch_size`` of the
    order) with that step choice. After the caller's work on every ``accum``-th minibatch, one
    ``ctx.optimizer_step()``, its gradient norm appended to ``stats.norms``."""
    for _ in range(epochs):
        order, steps = draw()
        for m in range(n // batch_size):
            yield order[m * batch_size : (m + 1) * batch_size], steps
            if (m + 1) % accum == 0:
                stats.norms.append(ctx.optimizer_step())


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


@dataclass
class PPOStats:
    """What the PPO passes of one step did: per-backward losses and diagnostics, per-update norms."""

    losses: list[float] = field(default_factory=list)
    approx_kls: list[float] = field(default_factory=list)
    clipfracs: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)

    def record(self, loss: torch.Tensor, st: dict[str, torch.Tensor]) -> None:
        """One backward's loss and the loss function's ``approx_kl`` and ``clipfrac``."""
        self.losses.append(float(loss.detach()))
        self.approx_kls.append(float(st["approx_kl"]))
        self.clipfracs.append(float(st["clipfrac"]))

    def diagnostics(self) -> dict[str, float]:
        """The step's means of the recorded diagnostics."""
        return {"approx_kl": _mean(self.approx_kls), "clipfrac": _mean(self.clipfracs)}

    def result(self, traj: Trajectories, adv: torch.Tensor, images: torch.Tensor, **stats: float) -> StepResult:
        """The step's :class:`StepResult`: mean loss and gradient norm, the diagnostics, the mean absolute
        advantage, then ``stats``."""
        return StepResult(
            loss=_mean(self.losses),
            rewards=traj.rewards,
            reward=traj.reward,
            grad_norm=_mean(self.norms),
            updates=len(self.norms),
            stats={**self.diagnostics(), "advantage_abs": float(adv.abs().mean()), **stats},
            images=images,
            prompts=list(traj.prompts[-len(images) :]) if images is not None else None,
        )


# ------------------------------------------------------------------------------------------ method
class DDPO(Method):
    """DDPO_IS on the shared rollouts (:func:`diffalign.rollouts.collect`); holds the per-prompt stat tracker.

    One step = :meth:`collect` (trajectories under theta_old) -> :meth:`local_advantages` (over all
    processes' rewards, this process's share) -> :meth:`ppo_epochs` (the clipped updates).
    """

    name = "ddpo"
    needs_differentiable_reward = False

    def __init__(self, cfg: DDPOConfig, sample: SampleConfig, train: TrainConfig) -> None:
        self.cfg, self.sample, self.train = cfg, sample, train
        self.tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)

    def batches_per_step(self) -> int:
        return self.sample.num_batches

    def updates_per_step(self) -> int:
        minibatches = self.sample.batch_size * self.sample.num_batches // self.cfg.train_batch_size
        return self.cfg.inner_epochs * (minibatches // self.train.gradient_accumulation_steps)

    def advantages(self, keys: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Clipped advantages of the gathered batch and the fraction normalized per prompt."""
        if self.cfg.per_prompt_stat_tracking:
            adv = torch.as_tensor(self.tracker.update(keys, rewards), dtype=torch.float32)
            frac = self.tracker.last_per_prompt_fraction
        else:
            adv, frac = batch_advantages(rewards.float().cpu()), 0.0
        return clip_advantages(adv, self.cfg.adv_clip_max), frac

    # 1. rollouts under theta_old
    def collect(self, ctx: StepContext, batches: list[PromptBatch], sampler: Sampler) -> Collected:
        """Sample and score every batch of the step (one trajectory per prompt; the group id of a sample
        is its global position in the step, so every sample is its own group)."""
        parts = []
        for b, batch in enumerate(batches):
            n, total = len(batch.local), len(batch.everyone)
            start = b * total + ctx.process_index * n
            parts.append(collect(ctx, batch.local, range(start, start + n), self.sample.eta, sampler=sampler))
        return Collected.cat(parts)

    # 2. advantages over all processes' samples, then this process's share (same order as everyone)
    def local_advantages(
        self, ctx: StepContext, rollout: Collected, batches: list[PromptBatch]
    ) -> tuple[torch.Tensor, float]:
        """This process's clipped advantages [N] (spec §2.2) and the fraction normalized per prompt.

        The advantages are computed on the gathered rewards of every process, keyed by the global
        prompts (``batch.everyone`` of each batch, as the tokenizer sees them), multiplied by the
        combiner's per-sample weights (:meth:`~diffalign.rollouts.Collected.weighted_advantages`: 0
        outside a Pareto selection), then the rows of this process are taken back out
        (:func:`diffalign.rollouts.local_share`)."""
        everyone = [p for batch in batches for p in batch.everyone]
        adv_all, per_prompt = self.advantages(ctx.prompt_keys(everyone), rollout.gathered_reward)
        adv = rollout.local(rollout.weighted_advantages(adv_all), ctx.process_index)  # 0 outside a selection
        return adv.to(rollout.trajectories.latents.device), per_prompt

    # 3. PPO updates over stored transitions
    def ppo_epochs(self, ctx: StepContext, traj: Trajectories, adv: torch.Tensor, sampler: Sampler) -> PPOStats:
        """``inner_epochs`` passes of the clipped surrogate over minibatches of ``train_batch_size``
        trajectories (spec §2.2): per minibatch and trained step index j, log pi_theta of the stored
        x_{k+1} recomputed with the sampling guidance, ``L_k`` backpropagated divided by
        ``n_train * accumulation``; an optimizer update every ``gradient_accumulation_steps`` minibatches."""
        latents, log_probs, timesteps, prompts = traj.latents, traj.log_probs, traj.timesteps, traj.prompts
        n, num_steps = latents.shape[0], len(timesteps)
        n_train = max(1, int(num_steps * self.cfg.timestep_fraction))
        tb, accum = self.cfg.train_batch_size, self.train.gradient_accumulation_steps
        stats = PPOStats()

        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            order, step_perm = ppo_permutations(ctx.rng, n, num_steps)
            return torch.tensor(order), step_perm

        for idx, step_perm in ppo_minibatches(ctx, stats, self.cfg.inner_epochs, n, tb, accum, draw):
            nets = backward_denoisers(ctx, [prompts[i] for i in idx.tolist()], n_train)
            for j, denoise in zip(range(n_train), nets, strict=True):
                ks = step_perm[idx, j]
                x_t, x_prev = latents[idx, ks], latents[idx, ks + 1]
                t = timesteps[ks]
                out = denoise_step(denoise, sampler, x_t, t, self.sample.eta, prev_sample=x_prev)
                loss, st = ppo_clip_loss(out.log_prob, log_probs[idx, ks], adv[idx], self.cfg.clip_range)
                ctx.backward(loss / (n_train * accum))
                stats.record(loss, st)
        return stats

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        sampler = ctx.sampler  # the same step rule samples and rescores
        rollout = self.collect(ctx, batches, sampler)
        adv, per_prompt = self.local_advantages(ctx, rollout, batches)
        st = self.ppo_epochs(ctx, rollout.trajectories, adv, sampler)
        images = rollout.images[-len(batches[-1].local) :]  # the last sampling batch's images
        return st.result(rollout.trajectories, adv, images, per_prompt_fraction=per_prompt, **rollout.stats)

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])


# ---------------------------------------------------------------------------------------- registry
def validate_ddpo(cfg: DiffalignConfig) -> None:
    """DDPO: eta > 0, whole minibatches and whole updates per inner epoch, log-probs with the sampling guidance."""
    s, d, accum = cfg.sample, cfg.method_config, cfg.train.gradient_accumulation_steps
    if s.eta <= 0:
        raise DiffalignError("ddpo needs sample.eta > 0 (log-probs are undefined for eta = 0); set sample.eta=1.0")
    per_step = s.batch_size * s.num_batches
    check_minibatches("ddpo", "sample.batch_size x sample.num_batches", per_step, d.train_batch_size, accum)
    if not d.cfg and s.guidance_scale != 1.0:
        raise DiffalignError(
            "ddpo.cfg=false recomputes log-probs without the guidance used for sampling, so ratios are not 1 "
            "at theta_old; set ddpo.cfg=true or sample.guidance_scale=1"
        )


register_method(MethodEntry("ddpo", DDPO, DDPOConfig, "ddpo", False, validate_ddpo))
