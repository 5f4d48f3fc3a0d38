"""GRPO for diffusion: Flow-GRPO's group-relative PPO (Liu et al. 2025, arXiv 2505.05470; spec §6.1)
adapted to DDIM with eta > 0, on the shared on-policy rollouts (:mod:`diffalign.rollouts`).

Per training step, for each sampling batch: this process's distinct prompts (``batch.local``), each
sampled G = ``group_size`` times with its own initial noise at ``sample.eta`` (every DDIM step is a
Gaussian policy N(mu_theta, sigma_t^2 I), spec §1.2), scored, then

    A_i   = (R_i - mean_{g(i)} R) / (s + 1e-4)          s: std of the group, or of all the step's rewards
                                                       (GRPO, Shao et al. 2024, arXiv 2402.03300, Sec. 4.1.2)
    A^_i  = clamp(A_i, -adv_clip_max, adv_clip_max)
    rho   = exp(logp_theta(x_{k+1} | x_k, c) - logp_old)
    L     = mean_i max(-A^_i rho_i, -A^_i clamp(rho_i, 1 - eps, 1 + eps)) + beta * mean_i KL_i

for ``inner_epochs`` passes over minibatches of ``train_batch_size`` trajectories, on
``int(T * timestep_fraction)`` steps of each (:func:`diffalign.rollouts.timestep_subsample`), log-probs
recomputed with the current LoRA and the sampling guidance on the stored transitions. The KL to the
reference pi_ref (the same UNet with the LoRA disabled, ``ctx.reference()``), with ``beta > 0`` only:

    kl: mean  KL_i = mean_elements (mu_theta - mu_ref)^2 / (2 sigma_t^2)     exact KL of the two Gaussian
                                                                             steps per latent element
    kl: k3    KL_i = exp(d) - d - 1,  d = logp_ref - logp_theta               (GRPO Eq. 4, Schulman's k3)

A group lives on one process (:func:`diffalign.rollouts.grouped_prompts`): its id is the position of
its prompt in the step's global prompt list; advantages are computed on the gathered rewards of all
processes and each process trains on its own trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

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
from diffalign.methods.ddpo import PPOStats, ppo_minibatches
from diffalign.methods.grpo_loss import gaussian_mean_kl, grpo_loss, k3_kl
from diffalign.methods.registry import MethodEntry, register_method
from diffalign.rollouts import (
    Collected,
    Trajectories,
    collect,
    group_advantages,
    grouped_prompts,
    groups_on_one_process,
    timestep_subsample,
    zero_std_fraction,
)
from diffalign.sampling import Sampler, StepOutput, denoise_step

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig, SampleConfig, TrainConfig


@dataclass
class GRPOConfig:
    """The ``grpo:`` section; names as TRL's ``GRPOConfig`` / Flow-GRPO's config know them (docs/training.md)."""

    group_size: int = 8  # G images per prompt (TRL num_generations, Flow-GRPO sample.num_image_per_prompt)
    beta: float = 0.0  # KL weight to the reference (LoRA disabled); 0 skips the reference pass (TRL, Flow-GRPO base)
    # mean: exact Gaussian KL of a step per element; k3: estimator on log-probs; flow_grpo: the Flow-GRPO
    # reference code's form on flow pipelines, ||mu_theta - mu_ref||^2 / (2 g^2) without |dt| (spec §6.1)
    kl: Literal["mean", "k3", "flow_grpo"] = "mean"
    clip_range: float = 1e-4  # PPO eps on mean-reduced log-probs (TRL epsilon; Flow-GRPO train.clip_range)
    # std of the group or of the whole step (Flow-GRPO global_std); none: the raw reward, no baseline and no
    # scaling (A_i = R_i: Parrot Eq. 4's REINFORCE weight with reward.combine=pareto; rewards should be >= 0)
    adv_std: Literal["group", "global", "none"] = "global"
    adv_clip_max: float = 5.0  # clamp advantages to +-this
    timestep_fraction: float = 1.0  # fraction of the T steps (of the sde_window steps when set) trained per trajectory
    # W > 0: only the first W sampling steps are stochastic (sample.eta), the rest deterministic (eta 0, as
    # evaluation); training draws its steps from those W (Flow-GRPO-Fast's window at step 0). 0: all T steps
    sde_window: int = 0
    # true: the G samples of a prompt's group start from one initial noise x_T and differ only by the
    # sampler's per-step noise (DanceGRPO, Xue et al. 2025, arXiv 2505.07818), so a group's reward
    # differences come from the stochastic steps the policy gradient trains, not from x_T; needs eta > 0
    shared_noise: bool = False
    shuffle_timesteps: bool = True  # a random subset of steps per trajectory (DDPO); false: steps 0..K-1 (Flow-GRPO)
    inner_epochs: int = 1  # passes over each step's samples (TRL num_iterations, Flow-GRPO num_inner_epochs)
    train_batch_size: int = 4  # trajectories per minibatch, per process

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise DiffalignError(
                f"grpo.group_size must be >= 2 (a group of one has zero advantage), got {self.group_size}"
            )
        if self.beta < 0:
            raise DiffalignError(f"grpo.beta must be >= 0, got {self.beta}")
        if self.kl not in ("mean", "k3", "flow_grpo"):
            raise DiffalignError(f"grpo.kl must be 'mean', 'k3' or 'flow_grpo', got {self.kl!r}")
        if self.clip_range <= 0:
            raise DiffalignError(f"grpo.clip_range must be > 0, got {self.clip_range}")
        if self.adv_std not in ("group", "global", "none"):
            raise DiffalignError(f"grpo.adv_std must be 'group', 'global' or 'none', got {self.adv_std!r}")
        if self.adv_clip_max <= 0:
            raise DiffalignError(f"grpo.adv_clip_max must be > 0, got {self.adv_clip_max}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise DiffalignError(f"grpo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.inner_epochs < 1 or self.train_batch_size < 1:
            raise DiffalignError("grpo.inner_epochs and grpo.train_batch_size must be >= 1")
        if self.sde_window < 0:
            raise DiffalignError(f"grpo.sde_window must be >= 0 (0: every step stochastic), got {self.sde_window}")


@dataclass
class GRPOStats(PPOStats):
    """What the updates of one step did: DDPO's :class:`~diffalign.methods.ddpo.PPOStats` and the KLs."""

    kls: list[float] = field(default_factory=list)

    def record(self, loss: torch.Tensor, st: dict[str, torch.Tensor]) -> None:
        super().record(loss, st)
        self.kls.append(float(st["kl"]))

    def diagnostics(self) -> dict[str, float]:
        return {**super().diagnostics(), "kl": sum(self.kls) / max(len(self.kls), 1)}


def step_kl(kind: str, out: StepOutput, ref: StepOutput) -> torch.Tensor:
    """Per-sample KL [B] of the policy's step ``out`` to the reference's ``ref`` on the same transition.

    ``mean``: ``||mu_theta - mu_ref||^2 / (2 sigma_t^2)`` averaged over latent elements (the exact KL of
    the two Gaussians, which share sigma_t, per element: the scale of the mean-reduced log-probs;
    :func:`~diffalign.methods.grpo_loss.gaussian_mean_kl`). ``k3``: :func:`~diffalign.methods.grpo_loss.k3_kl`
    on the log-probs of the stored x_{k+1}. ``flow_grpo`` (flow steps only): Flow-GRPO's code, which divides by
    the noise scale g^2 instead of the step variance g^2 |dt| (spec §6.1 pitfall o), i.e. ``mean`` times |dt|.
    """
    if kind == "mean":
        return gaussian_mean_kl(out.mean, ref.mean.to(out.mean.dtype), out.std)
    if kind == "flow_grpo":
        if out.dt is None:
            raise DiffalignError("grpo.kl=flow_grpo is Flow-GRPO's form for flow pipelines (SD3); use kl=mean or k3")
        return gaussian_mean_kl(out.mean, ref.mean.to(out.mean.dtype), out.std) * out.dt.abs().reshape(-1)
    return k3_kl(out.log_prob, ref.log_prob.to(out.log_prob.dtype))


class GRPO(Method):
    """Group-relative PPO with an optional KL to the LoRA-disabled reference (module docstring)."""

    name = "grpo"
    needs_differentiable_reward = False

    def __init__(self, cfg: GRPOConfig, sample: SampleConfig, train: TrainConfig) -> None:
        self.cfg, self.sample, self.train = cfg, sample, train

    def batches_per_step(self) -> int:
        return self.sample.num_batches

    def samples_per_step(self) -> int:
        """Trajectories per process per step: num_batches x batch_size prompts x group_size."""
        return self.sample.num_batches * self.sample.batch_size * self.cfg.group_size

    def updates_per_step(self) -> int:
        minibatches = self.samples_per_step() // self.cfg.train_batch_size
        return self.cfg.inner_epochs * (minibatches // self.train.gradient_accumulation_steps)

    # 1. rollouts: G trajectories per local prompt
    def collect(self, ctx: StepContext, batches: list[PromptBatch], sampler: Sampler) -> Collected:
        """Sample every batch's local prompts G times each (a group per prompt, on this process).

        A group's id is the position of its prompt in the step's global list (batch b's prompts
        follow batch b-1's), so ids are unique over processes and batches."""
        g, parts, offset = self.cfg.group_size, [], 0
        window = getattr(self.cfg, "sde_window", 0) or None  # NFT (a subclass) samples with the ODE: no window
        for batch in batches:
            n_proc = len(batch.everyone) // max(len(batch.local), 1)
            prompts, ids = grouped_prompts(batch.everyone, g, n_proc, ctx.process_index)
            if prompts[::g] != list(batch.local):
                raise RuntimeError("batch.local is not this process's contiguous slice of batch.everyone")
            ids = [offset + i for i in ids]
            parts.append(
                collect(
                    ctx,
                    prompts,
                    ids,
                    self.sample.eta,
                    sampler=sampler,
                    select_in_groups=True,
                    sde_steps=window,
                    share_noise=g if getattr(self.cfg, "shared_noise", False) else 1,
                )
            )
            offset += len(batch.everyone)
        return Collected.cat(parts)

    # 2. group-relative advantages over all processes, this process's share
    def local_advantages(self, ctx: StepContext, rollout: Collected) -> tuple[torch.Tensor, dict[str, float]]:
        """This process's clipped advantages [N] and the step's group statistics (over all processes)."""
        rewards, ids = rollout.gathered_reward, rollout.gathered_group_ids
        if not groups_on_one_process(ids, rollout.num_processes, rollout.batches):
            raise RuntimeError("a GRPO group straddles processes; its samples must come from one process")
        if self.cfg.adv_std == "none":  # Parrot Eq. 4: REINFORCE weighted by the raw reward
            adv_all = rewards.detach().float().clone()
        else:
            adv_all = group_advantages(rewards.double(), ids, std=self.cfg.adv_std).float()
        adv_all = torch.clamp(adv_all, -self.cfg.adv_clip_max, self.cfg.adv_clip_max)
        adv_all = rollout.weighted_advantages(adv_all)  # 0 outside a Pareto selection (within each group)
        adv = rollout.local(adv_all, ctx.process_index).to(rollout.trajectories.latents.device)
        return adv, {"zero_std_fraction": zero_std_fraction(rewards, ids)}

    # 3. clipped ratio updates with the KL to the reference
    def train_epochs(self, ctx: StepContext, traj: Trajectories, adv: torch.Tensor, sampler: Sampler) -> GRPOStats:
        """``inner_epochs`` passes over minibatches of ``train_batch_size`` trajectories (module docstring).

        Per minibatch: the reference steps first (``beta > 0`` only; no gradient, inside
        ``ctx.reference()``, denoiser built there so text-encoder LoRA is off too), then per trained step
        the policy's log-prob of the stored x_{k+1}, :func:`grpo_loss` backpropagated divided by
        ``K * accumulation``; an optimizer update every ``gradient_accumulation_steps`` minibatches.
        The trajectory order (``torch.randperm``) and the trained steps
        (:func:`~diffalign.rollouts.timestep_subsample`) are drawn from ``ctx.generator``.
        """
        cfg, eta = self.cfg, self.sample.eta
        latents, log_probs, timesteps, prompts = traj.latents, traj.log_probs, traj.timesteps, traj.prompts
        n, tb, accum = len(traj), cfg.train_batch_size, self.train.gradient_accumulation_steps
        stats = GRPOStats()

        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            order = torch.randperm(n, generator=ctx.generator)
            steps = timestep_subsample(
                n, cfg.sde_window or traj.num_steps, cfg.timestep_fraction, ctx.generator, shuffle=cfg.shuffle_timesteps
            )
            return order, steps.cpu()

        for idx, steps in ppo_minibatches(ctx, stats, cfg.inner_epochs, n, tb, accum, draw):
            k = steps.shape[1]
            mb_prompts = [prompts[i] for i in idx.tolist()]
            transitions = []
            for j in range(k):
                ks = steps[idx, j]
                transitions.append((latents[idx, ks], latents[idx, ks + 1], timesteps[ks], log_probs[idx, ks]))
            refs: list[StepOutput | None] = [None] * k
            if cfg.beta > 0:
                with torch.no_grad(), ctx.reference():
                    ref_denoise = ctx.denoiser(mb_prompts)
                    refs = [
                        denoise_step(ref_denoise, sampler, x, t, eta, prev_sample=xp) for x, xp, t, _ in transitions
                    ]
            nets = backward_denoisers(ctx, mb_prompts, k)
            for (x_t, x_prev, t, logp_old), ref, denoise in zip(transitions, refs, nets, strict=True):
                out = denoise_step(denoise, sampler, x_t, t, eta, prev_sample=x_prev)
                kl = step_kl(cfg.kl, out, ref) if ref is not None else None
                loss, st = grpo_loss(out.log_prob, logp_old, adv[idx.to(adv.device)], cfg.clip_range, kl, cfg.beta)
                ctx.backward(loss / (k * accum))
                stats.record(loss, st)
        return stats

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        sampler = ctx.sampler  # the same step rule samples and rescores
        rollout = self.collect(ctx, batches, sampler)
        adv, group_stats = self.local_advantages(ctx, rollout)
        st = self.train_epochs(ctx, rollout.trajectories, adv, sampler)
        images = rollout.images[-len(batches[-1].local) * self.cfg.group_size :]
        return st.result(rollout.trajectories, adv, images, **group_stats, **rollout.stats)


# ---------------------------------------------------------------------------------------- registry
def validate_grpo(cfg: DiffalignConfig) -> None:
    """GRPO: eta > 0 (log-probs), whole minibatches and whole updates per inner epoch."""
    s, g, accum = cfg.sample, cfg.method_config, cfg.train.gradient_accumulation_steps
    if s.eta <= 0:
        raise DiffalignError(
            "grpo needs sample.eta > 0 (each step must be a Gaussian policy; log-probs are undefined for eta = 0); "
            "set sample.eta=1.0 for DDIM or the flow SDE's noise level 0.7 for SD3 (evaluate at eta 0 with eval.eta)"
        )
    if g.sde_window > s.steps:
        raise DiffalignError(
            f"{cfg.train.method}.sde_window ({g.sde_window}) must be at most sample.steps ({s.steps}); 0: all steps"
        )
    per_step = s.batch_size * s.num_batches * g.group_size
    what = "sample.batch_size x sample.num_batches x grpo.group_size"
    check_minibatches("grpo", what, per_step, g.train_batch_size, accum)


register_method(MethodEntry("grpo", GRPO, GRPOConfig, "grpo", False, validate_grpo, samplers=("ddim", "flow")))
