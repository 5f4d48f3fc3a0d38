"""ReNO's optimization core: the noise regularizer, the settings, and the loop over a generator callable.

Nothing here knows about diffusion pipelines or the reward zoo. The loop takes a generator
``G(z) -> images`` and a reward-loss callable ``images -> (L_R, {name: reward})`` and solves
(Eyring et al. 2024, arXiv 2406.04312; spec §7.1-7.2)

    z* = argmin_z  L_R(G(z, c), c) + lambda * R(z)
    L_R = sum_i w_i * l_i,         l_i = -r_i(G(z, c), c)                      (reward losses)
    R(z) = 0.5 * ||z||^2 - (d - 1) * log ||z||                                (noise-norm regularizer)

by ReNO's loop (ReNO ``training/trainer.py``): for ``it = 0 .. iters - 1`` generate ``x = G(z)``,
compute ``L_R`` and ``L = L_R + lambda * R(z)``, keep ``x`` as the :class:`Best` if ``L_R`` (the
regularizer excluded) is the lowest so far, then, except on the last iteration, backpropagate ``L``
to ``z``, clip the gradient norm of ``z`` and take an optimizer step: ``iters`` images and exactly
``iters - 1`` optimizer steps. Tests drive it with a toy generator (``sigmoid(z)`` as an image).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from diffalign.errors import DiffalignError

Generator = Callable[[torch.Tensor], torch.Tensor]  # G(z [1, ...]) -> images [1, 3, H, W] in [0, 1]
RewardLoss = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]  # images -> (L_R [], raw rewards)


# ------------------------------------------------------------------------------------------- regularizer
def noise_regularizer(z: torch.Tensor) -> torch.Tensor:
    """ReNO's noise regularization term per sample (the chi-distribution norm prior; spec §7.2), in float32.

    ``R(z) = 0.5 * ||z||^2 - (d - 1) * log ||z||`` with ``d`` the number of elements of one sample
    and ``||.||`` the L2 norm over all of them: the negative log-density of the norm of a
    d-dimensional standard Gaussian (a chi distribution) up to a constant. Its minimum is at
    ``||z|| = sqrt(d - 1)``, its gradient ``z * (1 - (d - 1) / ||z||^2)``. Computed in fp32 so that
    ``||z||^2`` does not overflow in fp16. ``z``: ``[B, ...]``; returns ``[B]``.
    """
    flat = z.float().reshape(z.shape[0], -1)
    d = flat.shape[1]
    norm = torch.linalg.vector_norm(flat, dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class RenoConfig:
    """Settings of one ReNO run (defaults: ReNO ``arguments.py`` and README; spec §7.4).

    The loop reads the optimizer, regularizer and strip settings; the generator
    (:mod:`diffalign.reno.generator`) reads ``num_steps``, ``guidance_scale``, ``eta``, ``seed``,
    ``size`` and ``checkpoint``.
    """

    iters: int = 50  # iterations = images generated; iters - 1 optimizer steps
    lr: float = 5.0  # learning rate on z (ReNO: 5; 10 for HyperSDXL)
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd: momentum + Nesterov; adam: eps = adam_eps
    momentum: float = 0.9  # SGD momentum (Nesterov when nesterov=True)
    nesterov: bool = True
    adam_eps: float = 1e-2  # Adam epsilon (ReNO's alternative optimizer)
    grad_clip: float | None = 0.1  # max L2 norm of the gradient of z per step; None: no clipping
    reg_weight: float = 0.01  # lambda of the noise-norm regularizer; 0 disables it (images degrade)
    num_steps: int = 1  # sampling steps of the few-step generator (trailing DDIM); Turbo models: 1
    guidance_scale: float = 0.0  # classifier-free guidance when > 1 (Turbo models run without: 0)
    eta: float = 0.0  # DDIM eta; > 0 adds sampler noise, re-drawn from `seed` every iteration
    seed: int = 0  # seed of the initial noise z0 (and of sampler noise when eta > 0)
    size: int | None = None  # image side in pixels (square); None: the pipeline's default
    strip_every: int = 5  # keep the image of every strip_every-th iteration (and the last) for strip.png
    checkpoint: bool = True  # activation checkpointing per UNet call and for the VAE decode

    def __post_init__(self) -> None:
        if int(self.iters) < 1:
            raise DiffalignError(f"reno: iters must be >= 1 (iters - 1 optimizer steps), got {self.iters}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DiffalignError(f"reno: lr must be a positive number, got {self.lr} (ReNO uses 5)")
        if self.optimizer not in ("sgd", "adam"):
            raise DiffalignError(f"reno: optimizer must be sgd or adam, got {self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise DiffalignError(f"reno: momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise DiffalignError("reno: Nesterov SGD needs momentum > 0; set momentum=0.9 or nesterov=False")
        if self.adam_eps <= 0:
            raise DiffalignError(f"reno: adam_eps must be > 0, got {self.adam_eps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise DiffalignError(f"reno: grad_clip must be > 0 (or None for no clipping), got {self.grad_clip}")
        if not (math.isfinite(self.reg_weight) and self.reg_weight >= 0):
            raise DiffalignError(f"reno: reg_weight must be >= 0, got {self.reg_weight} (ReNO uses 0.01)")
        if not 1 <= int(self.num_steps) <= 1000:
            raise DiffalignError(
                f"reno: num_steps must be between 1 and 1000, got {self.num_steps} (one-step models: 1; few-step: 2-4)"
            )
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise DiffalignError(
                f"reno: guidance_scale must be >= 0, got {self.guidance_scale} (0 for Turbo models, > 1 for CFG)"
            )
        if not 0.0 <= self.eta <= 1.0:
            raise DiffalignError(f"reno: eta must be in [0, 1], got {self.eta} (0: deterministic DDIM)")
        if self.size is not None and int(self.size) < 8:
            raise DiffalignError(f"reno: size must be at least 8 pixels, got {self.size}")
        if int(self.strip_every) < 1:
            raise DiffalignError(f"reno: strip_every must be >= 1, got {self.strip_every}")
        self.iters, self.num_steps, self.strip_every = int(self.iters), int(self.num_steps), int(self.strip_every)


# ------------------------------------------------------------------------------------------------ result
@dataclass
class RenoRecord:
    """One iteration: reward values (raw, not weighted), losses, gradient norm (before clipping), time."""

    iter: int
    rewards: dict[str, float]
    loss_reward: float  # L_R = -sum_i w_i r_i (what selects the best image)
    reg: float  # R(z), unweighted
    loss: float  # L_R + lambda R(z)
    grad_norm: float | None  # ||dL/dz|| before clipping; None on the last iteration (no step)
    z_norm: float  # ||z|| of the noise that generated this iteration's image
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Best:
    """The best iterate so far: the lowest reward loss ``L_R`` (regularizer excluded, as ReNO selects)."""

    iteration: int
    loss: float  # L_R of this iterate
    image: torch.Tensor  # [3, H, W] in [0, 1], CPU, float32
    rewards: dict[str, float]  # raw reward values of this iterate
    z: torch.Tensor  # the noise that generated `image` (float32; on CPU once the loop has ended)

    def beaten_by(self, loss: float) -> bool:
        """True when ``loss`` is strictly lower: on a tie the earlier iterate stays best."""
        return loss < self.loss


@dataclass
class RenoResult:
    """Output of the loop: images ``[3, H, W]`` in [0, 1] (CPU, float32), latents and the history."""

    prompt: str
    best: Best
    initial_image: torch.Tensor
    final_image: torch.Tensor
    final_latents: torch.Tensor  # z after iters - 1 steps
    records: list[RenoRecord]
    strip: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (iteration, image)

    @property
    def best_image(self) -> torch.Tensor:
        return self.best.image

    @property
    def best_iter(self) -> int:
        return self.best.iteration

    @property
    def best_rewards(self) -> dict[str, float]:
        return self.best.rewards

    @property
    def best_loss(self) -> float:
        """``L_R`` of the best image."""
        return self.best.loss

    @property
    def best_latents(self) -> torch.Tensor:
        """The z that generated ``best_image`` (``[1, C, h, w]``, float32, CPU)."""
        return self.best.z

    @property
    def initial_rewards(self) -> dict[str, float]:
        return self.records[0].rewards

    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken: one per iteration but the last."""
        return sum(r.grad_norm is not None for r in self.records)


# -------------------------------------------------------------------------------------------------- loop
def make_optimizer(z: torch.Tensor, cfg: RenoConfig) -> torch.optim.Optimizer:
    """Nesterov-momentum SGD (ReNO's default) or Adam with ``cfg.adam_eps``, over the noise ``z`` only."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([z], lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.Adam([z], lr=cfg.lr, eps=cfg.adam_eps)


def optimize_noise(
    generate: Generator,
    reward_loss: RewardLoss,
    z0: torch.Tensor,
    cfg: RenoConfig,
    prompt: str = "",
    progress: bool = False,
) -> RenoResult:
    """ReNO's loop (spec §7.2): minimize ``L_R(G(z)) + lambda * R(z)`` over ``z`` from ``z0``.

    Args:
        generate: ``G(z) -> images [1, 3, H, W]`` in [0, 1], differentiable in ``z`` (any sampler
            noise fixed, so that the same ``z`` gives the same image).
        reward_loss: ``images -> (L_R, rewards)``: the scalar reward loss ``L_R = -sum_i w_i r_i``
            (differentiable in the images) and the raw reward values ``{name: float}`` for the records.
        z0: the initial noise ``[1, ...]`` in standard-Gaussian units; not modified.
        cfg: iterations, optimizer, ``grad_clip``, ``reg_weight`` (lambda) and ``strip_every``.
        prompt: stored on the result and shown on the progress bar.
        progress: show a tqdm bar with the live reward values and the best so far.

    Returns a :class:`RenoResult` whose :class:`Best` minimizes ``L_R`` (the regularizer excluded)
    over all ``cfg.iters`` generated images, iteration 0 (``G(z0)``) included.
    """
    z = z0.detach().clone().requires_grad_(True)
    opt = make_optimizer(z, cfg)
    records: list[RenoRecord] = []
    strip: list[tuple[int, torch.Tensor]] = []
    best: Best | None = None
    initial = final = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iters, desc=f"reno {prompt[:30]!r}", unit="it", leave=False)
    try:
        for it in range(cfg.iters):
            t0 = time.perf_counter()
            last = it == cfg.iters - 1
            z_norm = float(z.detach().float().norm())
            # 1. image from the current noise (gradients reach z only: weights are frozen or not asked for)
            image = generate(z)
            # 2. reward losses l_i = -r_i and L_R = sum_i w_i l_i
            loss_reward, scores = reward_loss(image)
            # 3. regularizer R(z) in fp32 (spec §7.2) and L = L_R + lambda R(z)
            reg = noise_regularizer(z).sum()
            loss = loss_reward + cfg.reg_weight * reg
            # 4. keep the image if L_R is the lowest so far (regularizer excluded, as ReNO selects)
            lr_value = float(loss_reward.detach())
            img = image[0].detach().float().cpu()
            if best is None or best.beaten_by(lr_value):
                best = Best(iteration=it, loss=lr_value, image=img, rewards=scores, z=z.detach().clone())
            if it == 0:
                initial = img
            if it % cfg.strip_every == 0 or last:
                strip.append((it, img))
            final = img
            # 5. except on the last iteration: backprop to z, clip its gradient norm, optimizer step
            grad_norm = None
            if not last:
                (grad,) = torch.autograd.grad(loss, [z])
                z.grad = grad
                if cfg.grad_clip is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_([z], cfg.grad_clip))
                else:
                    grad_norm = float(grad.norm())
                opt.step()
                opt.zero_grad(set_to_none=True)
            records.append(
                RenoRecord(
                    iter=it,
                    rewards=scores,
                    loss_reward=lr_value,
                    reg=float(reg.detach()),
                    loss=float(loss.detach()),
                    grad_norm=grad_norm,
                    z_norm=z_norm,
                    seconds=time.perf_counter() - t0,
                )
            )
            if bar is not None:
                bar.set_postfix({n: f"{v:.4g}" for n, v in scores.items()} | {"best": f"{-best.loss:.4g}"})
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    assert best is not None and initial is not None and final is not None
    best.z = best.z.cpu()
    return RenoResult(
        prompt=prompt,
        best=best,
        initial_image=initial,
        final_image=final,
        final_latents=z.detach().cpu(),
        records=records,
        strip=strip,
    )
