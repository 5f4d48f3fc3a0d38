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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffalign.errors import DiffalignError
from diffalign.methods.base import Method, PromptBatch, StepContext, StepResult
from diffalign.methods.registry import MethodEntry, register_method
from diffalign.sampling import denoise_step, make_sampler, sample_trajectory

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


# ------------------------------------------------------------------------------------------ method
class DDPO(Method):
    """DDPO_IS with the trainer's rollout helpers; holds the per-prompt stat tracker."""

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

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        # 1. rollouts under theta_old
        sampler = make_sampler(ctx.scheduler)  # the same step rule samples and rescores (spec §2.5)
        lat, logps, prompts, parts_all, combined, everyone, gathered = [], [], [], [], [], [], []
        images = None
        with torch.no_grad():
            for batch in batches:
                traj = sample_trajectory(
                    ctx.denoiser(batch.local),
                    sampler,
                    ctx.initial_latents(len(batch.local)),
                    eta=self.sample.eta,
                    generator=ctx.generator,
                )
                images = ctx.decode(traj.final)
                r, parts = ctx.rewards(images, batch.local)
                lat.append(traj.latents)
                logps.append(traj.log_probs)
                prompts += batch.local
                parts_all.append(parts)
                combined.append(r)
                everyone += batch.everyone
                gathered.append(ctx.gather(r).cpu())
        latents, log_probs = torch.cat(lat), torch.cat(logps)
        timesteps = sampler.timesteps
        # 2. advantages over all processes' samples, then this process's share (same order as everyone)
        adv_all, per_prompt = self.advantages(ctx.prompt_keys(everyone), torch.cat(gathered))
        n_local = len(batches[0].local)
        pi = ctx.process_index
        adv = torch.cat([adv_all[b * len(x.everyone) + pi * n_local :][:n_local] for b, x in enumerate(batches)]).to(
            latents.device
        )
        # 3. PPO updates over stored transitions
        n, num_steps = latents.shape[0], len(timesteps)
        n_train = max(1, int(num_steps * self.cfg.timestep_fraction))
        tb, accum = self.cfg.train_batch_size, self.train.gradient_accumulation_steps
        losses, kls, clipfracs, norms = [], [], [], []
        for _ in range(self.cfg.inner_epochs):
            order = list(range(n))
            ctx.rng.shuffle(order)
            perms = []
            for _ in range(n):  # an independent permutation of the step axis per trajectory
                p = list(range(num_steps))
                ctx.rng.shuffle(p)
                perms.append(p)
            step_perm = torch.tensor(perms)
            for m in range(n // tb):
                idx = torch.tensor(order[m * tb : (m + 1) * tb])
                denoise = ctx.denoiser([prompts[i] for i in idx.tolist()])
                for j in range(n_train):
                    ks = step_perm[idx, j]
                    x_t, x_prev = latents[idx, ks], latents[idx, ks + 1]
                    t = timesteps[ks]
                    out = denoise_step(denoise, sampler, x_t, t, self.sample.eta, prev_sample=x_prev)
                    loss, st = ppo_clip_loss(out.log_prob, log_probs[idx, ks], adv[idx], self.cfg.clip_range)
                    ctx.backward(loss / (n_train * accum))
                    losses.append(float(loss.detach()))
                    kls.append(float(st["approx_kl"]))
                    clipfracs.append(float(st["clipfrac"]))
                if (m + 1) % accum == 0:
                    norms.append(ctx.optimizer_step())
        return StepResult(
            loss=sum(losses) / len(losses),
            rewards={k: torch.cat([p[k] for p in parts_all]) for k in parts_all[0]},
            reward=torch.cat(combined),
            grad_norm=sum(norms) / max(len(norms), 1),
            updates=len(norms),
            stats={
                "approx_kl": sum(kls) / len(kls),
                "clipfrac": sum(clipfracs) / len(clipfracs),
                "advantage_abs": float(adv.abs().mean()),
                "per_prompt_fraction": per_prompt,
            },
            images=images,
        )

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
    if per_step % d.train_batch_size:
        raise DiffalignError(
            f"ddpo: samples per step per process (sample.batch_size x sample.num_batches = {per_step}) must be "
            f"divisible by ddpo.train_batch_size ({d.train_batch_size})"
        )
    minibatches = per_step // d.train_batch_size
    if minibatches % accum:
        raise DiffalignError(
            f"ddpo: {minibatches} minibatches per inner epoch is not divisible by "
            f"train.gradient_accumulation_steps ({accum}); an update would be lost"
        )
    if not d.cfg and s.guidance_scale != 1.0:
        raise DiffalignError(
            "ddpo.cfg=false recomputes log-probs without the guidance used for sampling, so ratios are not 1 "
            "at theta_old; set ddpo.cfg=true or sample.guidance_scale=1"
        )


register_method(MethodEntry("ddpo", DDPO, DDPOConfig, "ddpo", False, validate_ddpo))
