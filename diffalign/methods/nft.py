"""DiffusionNFT: online RL on the forward process (Zheng et al. 2025, arXiv 2509.16117; spec
../shared/specs/diffusionnft.md), on flow-matching (SD3) pipelines.

No likelihoods and no SDE: per training step (one "epoch" of the reference), for each sampling batch,
this process's prompts are sampled G = ``group_size`` times each with the deterministic ODE
(``sample.eta: 0``) under the **old policy** theta_old, a second LoRA adapter (``"old"``) next to the
trained one (``"default"``); only the clean latents x0, their prompts and rewards are kept. Then
(:mod:`diffalign.methods.nft_loss` holds the pure functions)::

    A_i = (R_i - mean_{g(i)} R) / (std + 1e-4)     group-relative (GRPO's advantages, global std by default)
    r_i = clamp(clamp(A_i, +-A_max) / (2 A_max) + 1/2, 0, 1)                      optimality probability
    per sample, J = int(T * timestep_fraction) distinct rollout-grid sigmas, each with fresh eps:
        x_sigma = (1 - sigma) x0 + sigma eps;  v_old (adapter "old"), v_ref (adapters off, kl_coef > 0 only),
        v_theta (adapter "default", with gradient): all conditional (guidance 1; FLUX-dev: its embedded
        guidance = sample.guidance_scale, which is not CFG), timestep 1000 sigma
        L = A_max mean_i (r_i l+_i + (1 - r_i) l-_i) / beta + kl_coef mean (v_theta - v_ref)^2
    backward L / (J * accumulation); an optimizer update every ``train.gradient_accumulation_steps``
    minibatches of ``train_batch_size`` samples; ``inner_epochs`` passes
    after the step's updates:  theta_old <- eta theta_old + (1 - eta) theta,  eta = decay(optimizer steps so far)

theta_old starts equal to theta (copied in :meth:`NFT.configure`) and is the method's own state: its
parameters are the module ``old`` of :meth:`NFT.modules`, so every checkpoint holds it
(``method_modules.safetensors``) and a resumed run continues bit for bit; the optimizer-step counter
that drives eta is in :meth:`NFT.state_dict`. The exported LoRA (``OUT/lora``) is theta, the trained adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from diffalign.errors import DiffalignError
from diffalign.methods.base import PromptBatch, StepContext, StepResult, backward_denoisers, check_minibatches
from diffalign.methods.grpo import GRPO
from diffalign.methods.nft_loss import (
    ADV_MODES,
    DECAY_TYPES,
    LOSS_SPACES,
    AdvMode,
    LossSpace,
    draw_train_sigmas,
    flow_forward,
    nft_loss,
    old_policy_decay,
    reward_probability,
    soft_update_,
)
from diffalign.methods.registry import MethodEntry, register_method
from diffalign.rollouts import Trajectories, timestep_subsample

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig, SampleConfig, TrainConfig

OLD_ADAPTER = "old"
T_DISTS = ("rollout_grid", "uniform", "logit_normal")


@dataclass
class NFTConfig:
    """The ``nft:`` section; docs/training.md maps each key to NVlabs/DiffusionNFT's config."""

    group_size: int = 8  # G images per prompt (reference sample.num_image_per_prompt, 24)
    nft_beta: float = 1.0  # mixing strength beta of v+- (reference config.beta: 1.0; 0.1 for OCR)
    kl_coef: float = 1e-4  # weight of mean (v_theta - v_ref)^2 to the LoRA-disabled base (reference train.beta)
    adv_clip_max: float = 5.0  # A_max: advantage clip and the loss scale (reference train.adv_clip_max)
    adv_mode: AdvMode = "all"  # all | positive_only | negative_only | one_only | binary (reference train.adv_mode)
    adv_std: Literal["group", "global"] = "global"  # std of the group or of the whole step (reference global_std)
    decay_type: int = 1  # old-policy EMA schedule 0 | 1 | 2 (reference decay_type; 2 is its OCR recipe)
    loss_space: LossSpace = "x0_adaptive"  # x0_adaptive (reference code) | velocity (paper pseudocode)
    # training sigmas: the rollout grid (reference), or drawn with the scheduler's shift
    train_t_dist: Literal["rollout_grid", "uniform", "logit_normal"] = "rollout_grid"
    timestep_fraction: float = 0.99  # J = int(T * fraction) sigmas per sample (reference train.timestep_fraction)
    train_batch_size: int = 4  # samples per minibatch, per process (reference train.batch_size, 9)
    inner_epochs: int = 1  # passes over each step's samples (reference train.num_inner_epochs)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise DiffalignError(
                f"nft.group_size must be >= 2 (a group of one has zero advantage), got {self.group_size}"
            )
        if self.nft_beta <= 0:
            raise DiffalignError(f"nft.nft_beta must be > 0 (the loss divides by it), got {self.nft_beta}")
        if self.kl_coef < 0:
            raise DiffalignError(f"nft.kl_coef must be >= 0, got {self.kl_coef}")
        if self.adv_clip_max <= 0:
            raise DiffalignError(f"nft.adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.adv_mode not in ADV_MODES:
            raise DiffalignError(f"nft.adv_mode must be one of {', '.join(ADV_MODES)}, got {self.adv_mode!r}")
        if self.adv_std not in ("group", "global"):
            raise DiffalignError(f"nft.adv_std must be 'group' or 'global', got {self.adv_std!r}")
        if self.decay_type not in DECAY_TYPES:
            raise DiffalignError(f"nft.decay_type must be 0, 1 or 2, got {self.decay_type!r}")
        if self.loss_space not in LOSS_SPACES:
            raise DiffalignError(f"nft.loss_space must be one of {', '.join(LOSS_SPACES)}, got {self.loss_space!r}")
        if self.train_t_dist not in T_DISTS:
            raise DiffalignError(f"nft.train_t_dist must be one of {', '.join(T_DISTS)}, got {self.train_t_dist!r}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise DiffalignError(f"nft.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.inner_epochs < 1 or self.train_batch_size < 1:
            raise DiffalignError("nft.inner_epochs and nft.train_batch_size must be >= 1")


class AdapterParameters(torch.nn.Module):
    """A module that holds (shares, never copies) the parameters of a pipeline's extra LoRA adapter, so the
    trainer saves and restores them as the method's module (state-dict keys: the qualified names with
    ``.`` written ``__``)."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name.replace(".", "__"), p)


@dataclass
class NFTStats:
    """What the updates of one step did: per-backward losses and diagnostics, per-update gradient norms."""

    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def record(self, loss: torch.Tensor, st: dict[str, torch.Tensor]) -> None:
        self.losses.append(float(loss.detach()))
        for k, v in st.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


class NFT(GRPO):
    """DiffusionNFT (module docstring): GRPO's group rollouts and advantages (:class:`GRPO`), sampled by the
    old adapter with the ODE; the negative-aware forward-process loss; the old policy's soft update."""

    name = "nft"
    needs_differentiable_reward = False

    def __init__(self, cfg: NFTConfig, sample: SampleConfig, train: TrainConfig) -> None:
        self.cfg, self.sample, self.train = cfg, sample, train
        self.pipe: Any = None
        self.old: AdapterParameters | None = None
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (old, trained) LoRA tensors
        self.updates = 0  # optimizer steps so far: eta = decay(updates)
        self.last_decay = 0.0
        self.train_guidance = 1.0  # the velocities' guidance in training (FLUX: its embedded guidance)

    # ------------------------------------------------------------------------------ method-owned state
    def configure(self, ctx: StepContext) -> None:
        """Add the old policy: adapter ``"old"`` = a frozen copy of the trained LoRA (spec §2.4 "Init")."""
        from diffalign.pipelines import add_adapter_copy, family_of, lora_adapter_of

        self.pipe = ctx.pipe
        # CFG pipelines train the conditional velocity alone (guidance 1, CFG-free as the paper); FLUX-dev's
        # guidance is an input of the distilled transformer, not CFG, so its training calls see the sampling one
        if family_of(self.pipe) == "flux":
            self.train_guidance = float(self.sample.guidance_scale)
        old = add_adapter_copy(self.pipe, OLD_ADAPTER, source="default")
        self.old = AdapterParameters(old)
        trained = {
            f"{model}.{n}": p
            for model in sorted({key.split(".", 1)[0] for key in old})
            for n, p in getattr(self.pipe, model).named_parameters()
            if lora_adapter_of(n) == "default"
        }
        self.pairs = []
        for key, p_old in old.items():
            parts = key.split(".")
            i = next(j for j, part in enumerate(parts[:-1]) if part.startswith("lora_")) + 1
            self.pairs.append((p_old, trained[".".join([*parts[:i], "default", *parts[i + 1 :]])]))

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"old": self.old} if self.old is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "last_decay": self.last_decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.last_decay = int(state["updates"]), float(state["last_decay"])

    def old_policy(self):
        """Context manager: the pipeline computes with the old adapter (sampling, v_old)."""
        from diffalign.pipelines import active_adapter

        return active_adapter(self.pipe, OLD_ADAPTER)

    def update_old_policy(self) -> float:
        """``theta_old <- eta theta_old + (1 - eta) theta`` with eta = decay(optimizer steps so far) (spec §2.4)."""
        eta = old_policy_decay(self.updates, self.cfg.decay_type)
        soft_update_([o for o, _ in self.pairs], [t for _, t in self.pairs], eta)
        self.last_decay = eta
        return eta

    # ------------------------------------------------------------------------------------------ training
    def train_sigmas(
        self, ctx: StepContext, traj: Trajectories, steps: torch.Tensor, idx: torch.Tensor, j: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [B], timestep 1000 sigma [B]) of the j-th training point of the minibatch ``idx``."""
        if self.cfg.train_t_dist == "rollout_grid":
            t = traj.timesteps[steps[idx, j].to(traj.timesteps.device)].to(like.device)
            sigma = ctx.sampler.sigmas(t, like)[0].reshape(-1)
            return sigma, t
        # the flow sampler's shift (FLUX: the one its dynamic shift mu amounts to), else the scheduler's
        shift = getattr(ctx.sampler, "shift", None)
        shift = float(getattr(ctx.sampler.scheduler.config, "shift", 1.0) if shift is None else shift)
        sigma = draw_train_sigmas(len(idx), self.cfg.train_t_dist, shift, ctx.generator).to(like.device)
        return sigma, sigma * 1000

    def train_epochs(
        self, ctx: StepContext, traj: Trajectories, r: torch.Tensor, sampler: Any = None, w: torch.Tensor | None = None
    ) -> NFTStats:
        """``inner_epochs`` passes over minibatches of ``train_batch_size`` samples (module docstring), each
        trained at J sigmas with fresh noise; one optimizer update every ``gradient_accumulation_steps``
        minibatches. Order, sigmas and noise come from ``ctx.generator``. ``w`` [N]: the combiner's
        per-sample weights (none: all 1)."""
        cfg, accum = self.cfg, self.train.gradient_accumulation_steps
        n, tb = len(traj), cfg.train_batch_size
        x0_all = traj.latents[:, -1]
        stats = NFTStats()
        for _ in range(cfg.inner_epochs):
            order = torch.randperm(n, generator=ctx.generator)
            steps = timestep_subsample(n, traj.num_steps, cfg.timestep_fraction, ctx.generator).cpu()
            k = steps.shape[1]
            for m in range(n // tb):
                idx = order[m * tb : (m + 1) * tb]
                prompts = [traj.prompts[i] for i in idx.tolist()]
                x0 = x0_all[idx.to(x0_all.device)]
                r_mb = r[idx.to(r.device)]
                w_mb = None if w is None else w[idx.to(w.device)]
                with torch.no_grad():
                    with self.old_policy():
                        old_denoise = ctx.denoiser(prompts, guidance_scale=self.train_guidance)
                    ref_denoise = None
                    if cfg.kl_coef > 0:
                        with ctx.reference():
                            ref_denoise = ctx.denoiser(prompts, guidance_scale=self.train_guidance)
                nets = backward_denoisers(ctx, prompts, k, guidance_scale=self.train_guidance)
                for j, net in zip(range(k), nets, strict=True):
                    sigma, t = self.train_sigmas(ctx, traj, steps, idx, j, x0)
                    noise = torch.randn(x0.shape, generator=ctx.generator).to(x0.device)
                    x_in = flow_forward(x0, noise, sigma).to(x0.dtype)
                    with torch.no_grad():
                        with self.old_policy():
                            v_old = old_denoise(x_in, t)
                        v_ref = None
                        if ref_denoise is not None:
                            with ctx.reference():
                                v_ref = ref_denoise(x_in, t)
                    v = net(x_in, t)
                    loss, st = nft_loss(
                        v, v_old, x0, noise, sigma, r_mb, cfg.nft_beta, cfg.adv_clip_max, cfg.loss_space, v_ref,
                        cfg.kl_coef, w_mb,
                    )  # fmt: skip
                    ctx.backward(loss / (k * accum))
                    stats.record(loss, st)
                if (m + 1) % accum == 0:
                    stats.norms.append(ctx.optimizer_step())
        return stats

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        with self.old_policy():  # rollouts come from theta_old (spec §2.4), with the ODE (sample.eta = 0)
            rollout = self.collect(ctx, batches, ctx.sampler)
        adv, group_stats = self.local_advantages(ctx, rollout)
        r = reward_probability(adv, self.cfg.adv_clip_max, self.cfg.adv_mode)
        traj = rollout.trajectories
        w = rollout.local_weights(ctx.process_index)
        st = self.train_epochs(ctx, traj, r, w=None if w is None else w.to(r.device))
        self.updates += len(st.norms)
        eta = self.update_old_policy()
        images = rollout.images[-len(batches[-1].local) * self.cfg.group_size :]
        return StepResult(
            loss=sum(st.losses) / max(len(st.losses), 1),
            rewards=traj.rewards,
            reward=traj.reward,
            grad_norm=sum(st.norms) / max(len(st.norms), 1),
            updates=len(st.norms),
            stats={
                **st.means(),
                "old_decay": eta,
                "advantage_abs": float(adv.abs().mean()),
                "r_mean": float(r.mean()),
                **group_stats,
                **rollout.stats,
            },
            images=images,
            prompts=list(traj.prompts[-len(images) :]),
        )


# ---------------------------------------------------------------------------------------- registry
def validate_nft(cfg: DiffalignConfig) -> None:
    """DiffusionNFT: the deterministic ODE rollouts (eta 0), whole minibatches and whole updates per epoch."""
    s, g, accum = cfg.sample, cfg.method_config, cfg.train.gradient_accumulation_steps
    if s.eta != 0:
        raise DiffalignError(
            f"nft samples with the deterministic ODE and needs no log-probs; set sample.eta=0 (got {s.eta})"
        )
    per_step = s.batch_size * s.num_batches * g.group_size
    what = "sample.batch_size x sample.num_batches x nft.group_size"
    check_minibatches("nft", what, per_step, g.train_batch_size, accum)


register_method(MethodEntry("nft", NFT, NFTConfig, "nft", False, validate_nft, samplers=("flow",)))
