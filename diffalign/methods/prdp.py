"""PRDP: proximal reward difference prediction (Deng et al. 2024, arXiv 2402.08714; spec §4).

Algorithm 1 of the paper on the shared on-policy rollouts (:mod:`diffalign.rollouts`): per training step
("epoch"), theta_old is the current LoRA; each process samples its ``sample.batch_size`` prompts of every
sampling batch ``group_size`` times (a group per prompt, on one process) at ``sample.eta`` (> 0: the
DDPM-like sampler of the paper), with the log-probs of every step; the samples are scored by the combined
training reward. The reference's log-probs of every stored step are computed once (LoRA disabled,
``ctx.reference()``, no gradient). Then ``inner_epochs`` (the paper's K) gradient updates, each on the
full-trajectory loss of :func:`diffalign.methods.prdp_loss.prdp_loss` over all T steps (or the first
K = int(T * ``timestep_fraction``) of them, our partial-trajectory variant), by the exact
two-pass gradient of spec §4.2:

1. a no-grad pass recomputes ``logp_theta`` [N, T] of every stored transition (before the first update
   theta = theta_old, so the log-probs stored at sampling time are used and this pass is skipped);
2. the loss is evaluated on a detached copy ``l`` of it and ``G = dL/dl`` [N, T] by autograd (this is
   the spec's per-trajectory coefficient ``g_i / T``, zero on clipped steps and on the inactive branch of
   the max, with no hand-derived formula to get wrong);
3. per step t (and per chunk of ``train_batch_size`` trajectories) the UNet runs with gradient and
   ``sum_i G[i, t] * logp_theta[i, t]`` is backpropagated; the gradients accumulate over the T steps into
   exactly ``dL/dtheta`` (theta does not change between the passes), with one step's activations in memory;
4. one optimizer update.

Log-probs are those of :mod:`diffalign.sampling` (mean over latent elements) times the element count
C*H*W with ``logprob_reduction: sum`` (default; the paper's full Gaussian density, which its beta and
eps are tuned for), or left as means with ``mean``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from diffalign.errors import DiffalignError
from diffalign.methods.base import Method, PromptBatch, StepContext, StepResult, backward_denoisers
from diffalign.methods.prdp_loss import prdp_loss
from diffalign.methods.registry import MethodEntry, register_method
from diffalign.rollouts import Collected, Trajectories, collect, grouped_prompts, zero_std_fraction
from diffalign.sampling import Sampler, denoise_step

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig, SampleConfig, TrainConfig


@dataclass
class PRDPConfig:
    """The ``prdp:`` section; names and defaults from the paper (Table 4, small-scale column; docs/training.md)."""

    group_size: int = 16  # B: images per prompt (all pairs within a prompt are used)
    beta: float = 3.0e-5  # KL weight beta (on summed log-probs; Table 4: 3e-5 small-scale, 3e-6 large-scale)
    clip_range: float = 1.0e-6  # eps: the per-step log-ratio to theta_old is clipped to [-eps, eps] (Table 4)
    inner_epochs: int = 10  # K: gradient updates per epoch of samples (Table 4: 10 small-scale, 1 large-scale)
    logprob_reduction: Literal["sum", "mean"] = "sum"  # sum: the paper's density over all latent elements
    train_batch_size: int = 8  # trajectories per UNet call in the two passes (memory only; the update is exact)
    # Fraction of the T steps in the trajectory score s(tau): the first int(T * f) steps (1.0: the paper's
    # full trajectory). < 1 is our partial-trajectory variant (docs/training.md): cost 2K instead of 2T UNet
    # calls per trajectory, and the early steps, where layout and counts are decided, carry the objective.
    timestep_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise DiffalignError(f"prdp.group_size must be >= 2 (pairs within a prompt), got {self.group_size}")
        if not self.beta > 0:
            raise DiffalignError(f"prdp.beta must be > 0, got {self.beta}")
        if not self.clip_range > 0:
            raise DiffalignError(f"prdp.clip_range must be > 0, got {self.clip_range}")
        if self.logprob_reduction not in ("sum", "mean"):
            raise DiffalignError(f"prdp.logprob_reduction must be 'sum' or 'mean', got {self.logprob_reduction!r}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise DiffalignError(f"prdp.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.inner_epochs < 1 or self.train_batch_size < 1:
            raise DiffalignError("prdp.inner_epochs and prdp.train_batch_size must be >= 1")


def loss_gradient(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    rewards: torch.Tensor,
    ids: torch.Tensor,
    cfg,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Step 2 of the module docstring: the loss at the (detached) ``logp`` [N, T] and ``G = dL/dlogp`` [N, T]."""
    leaf = logp.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss, stats = prdp_loss(leaf, logp_old, logp_ref, rewards, ids, cfg.beta, cfg.clip_range, weights)
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(leaf)
    return loss.detach(), grad.detach(), stats


class PRDP(Method):
    """PRDP on the shared rollouts with the two-pass exact gradient (module docstring)."""

    name = "prdp"
    needs_differentiable_reward = False

    def __init__(self, cfg: PRDPConfig, sample: SampleConfig, train: TrainConfig) -> None:
        self.cfg, self.sample, self.train = cfg, sample, train

    def batches_per_step(self) -> int:
        return self.sample.num_batches

    def updates_per_step(self) -> int:
        return self.cfg.inner_epochs

    # 1. groups of trajectories per prompt
    def collect(self, ctx: StepContext, batches: list[PromptBatch], sampler: Sampler) -> Collected:
        """G trajectories per local prompt; a group's id is its prompt's position in the step's global list."""
        g, parts, offset = self.cfg.group_size, [], 0
        for batch in batches:
            n_proc = len(batch.everyone) // max(len(batch.local), 1)
            prompts, ids = grouped_prompts(batch.everyone, g, n_proc, ctx.process_index)
            ids = [offset + i for i in ids]
            parts.append(collect(ctx, prompts, ids, self.sample.eta, sampler=sampler, select_in_groups=True))
            offset += len(batch.everyone)
        return Collected.cat(parts)

    def scale(self, traj: Trajectories) -> float:
        """Mean-reduced log-probs -> the configured reduction (x C*H*W for ``sum``)."""
        return float(traj.latents[0, 0].numel()) if self.cfg.logprob_reduction == "sum" else 1.0

    def trained_steps(self, traj: Trajectories) -> int:
        """K: the score s(tau) covers steps 0..K-1, K = max(1, int(T * timestep_fraction))."""
        return max(1, int(traj.num_steps * self.cfg.timestep_fraction))

    # 2. log-probs of every stored step (no gradient), under the policy or inside ctx.reference()
    def logprobs(self, ctx: StepContext, traj: Trajectories, sampler: Sampler, reference: bool = False) -> torch.Tensor:
        """``log pi(x_{k+1} | x_k, c)`` [N, K] of the first K stored transitions (:meth:`trained_steps`), in
        chunks of ``train_batch_size``."""
        n, tb, out = len(traj), self.cfg.train_batch_size, []
        with torch.no_grad():
            ctx_ref = ctx.reference() if reference else contextlib.nullcontext()
            with ctx_ref:
                for start in range(0, n, tb):
                    rows = list(range(start, min(start + tb, n)))
                    denoise = ctx.denoiser([traj.prompts[i] for i in rows])
                    cols = [
                        self._step(denoise, sampler, traj, rows, k).log_prob for k in range(self.trained_steps(traj))
                    ]
                    out.append(torch.stack(cols, dim=1))
        return torch.cat(out).float() * self.scale(traj)

    def _step(self, denoise, sampler: Sampler, traj: Trajectories, rows: list[int], k: int):
        idx = torch.tensor(rows)
        t = traj.timesteps[k] if traj.timesteps.ndim == 1 else traj.timesteps[idx, k]
        lat = traj.latents
        return denoise_step(denoise, sampler, lat[idx, k], t, self.sample.eta, prev_sample=lat[idx, k + 1])

    # 3. the per-step backward of sum_i G[i, t] logp_theta[i, t]
    def backward_steps(self, ctx: StepContext, traj: Trajectories, grad: torch.Tensor, sampler: Sampler) -> None:
        """Accumulate ``dL/dtheta = sum_t sum_i G[i, t] d logp_theta[i, t] / dtheta``, one UNet call per step and
        chunk of trajectories (chunks whose coefficients are all zero are skipped)."""
        n, tb, scale = len(traj), self.cfg.train_batch_size, self.scale(traj)
        for start in range(0, n, tb):
            rows = list(range(start, min(start + tb, n)))
            g = grad[rows]
            if not bool((g != 0).any()):
                continue
            nets = backward_denoisers(ctx, [traj.prompts[i] for i in rows], grad.shape[1])
            for k, denoise in zip(range(grad.shape[1]), nets, strict=True):
                coeff = g[:, k].to(traj.latents.device)
                if not bool((coeff != 0).any()):
                    continue
                logp = self._step(denoise, sampler, traj, rows, k).log_prob.float() * scale
                ctx.backward((coeff * logp).sum())

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        sampler = ctx.sampler
        rollout = self.collect(ctx, batches, sampler)
        traj = rollout.trajectories
        rewards, ids = traj.reward.detach().float().cpu(), traj.group_ids.cpu()
        w = rollout.local_weights(ctx.process_index)  # the combiner's mask x weight: pair weights w_i w_j
        w = None if w is None else w.float().cpu()
        logp_old = traj.log_probs[:, : self.trained_steps(traj)].float().cpu() * self.scale(traj)
        logp_ref = self.logprobs(ctx, traj, sampler, reference=True).cpu()
        losses, norms, stats = [], [], []
        for epoch in range(self.cfg.inner_epochs):
            # theta = theta_old before the first update: the sampling pass already gave these log-probs
            logp = logp_old if epoch == 0 else self.logprobs(ctx, traj, sampler).cpu()
            loss, grad, st = loss_gradient(logp, logp_old, logp_ref, rewards, ids, self.cfg, w)
            self.backward_steps(ctx, traj, grad, sampler)
            norms.append(ctx.optimizer_step())
            losses.append(float(loss))
            stats.append(st)
        out = {k: sum(float(s[k]) for s in stats) / len(stats) for k in stats[0]}
        out["first_loss"] = losses[0]
        out["zero_std_fraction"] = zero_std_fraction(rollout.gathered_reward, rollout.gathered_group_ids)
        return StepResult(
            loss=sum(losses) / len(losses),
            rewards=traj.rewards,
            reward=traj.reward,
            grad_norm=sum(norms) / len(norms),
            updates=len(norms),
            stats={**out, **rollout.stats},
            images=rollout.images[-len(batches[-1].local) * self.cfg.group_size :],
        )


# ---------------------------------------------------------------------------------------- registry
def validate_prdp(cfg: DiffalignConfig) -> None:
    """PRDP: eta > 0 (log-probs); one update is the whole step's batch (no gradient accumulation)."""
    if cfg.sample.eta <= 0:
        raise DiffalignError(
            "prdp needs sample.eta > 0 (each step must be a Gaussian policy; log-probs are undefined for eta = 0); "
            "set sample.eta=1.0 (evaluate at eta 0 with eval.eta)"
        )
    if cfg.train.gradient_accumulation_steps != 1:
        raise DiffalignError(
            "prdp makes prdp.inner_epochs updates per step, each over all of the step's trajectories; "
            "train.gradient_accumulation_steps must be 1 (raise sample.num_batches for a larger batch)"
        )


register_method(MethodEntry("prdp", PRDP, PRDPConfig, "prdp", False, validate_prdp))
