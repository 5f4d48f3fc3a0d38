"""DiffusionNFT's pure functions over tensors (Zheng et al. 2025, arXiv 2509.16117, "DiffusionNFT: Online
Diffusion Reinforcement with Forward Process"; spec ../shared/specs/diffusionnft.md, §2 "as coded" in
NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``). Used by :mod:`diffalign.methods.nft`.

Symbols (rectified flow, spec §0)::

    x_sigma = (1 - sigma) x0 + sigma eps          -> flow_forward(x0, noise, sigma)
    u       = eps - x0                            the velocity target
    x0_hat(v) = x_sigma - sigma v                 (FlowMatchSampler.predict_x0); x0_hat(v) - x0 = sigma (u - v)
    r       = clamp(A_bar / (2 A_max) + 1/2, 0, 1)  the optimality probability, A_bar = clamp(A, +-A_max)
    v+      = beta v_theta + (1 - beta) sg(v_old)   implicit positive policy (paper Eq. "v+_theta")
    v-      = (1 + beta) sg(v_old) - beta v_theta   implicit negative policy ("v-_theta")
    l+-     = mean_e (x0_hat(v+-) - x0)^2 / sg(w+-),  w+- = max(mean_e |x0_hat(v+-) - x0|, 1e-5)   (x0_adaptive)
            = mean_e (v+- - u)^2                                                                   (velocity)
    L       = mean_i A_max (r_i l+_i + (1 - r_i) l-_i) / beta  +  kl_coef mean_i mean_e (v_theta - v_ref)^2

Old policy (spec §2.4): ``theta_old <- eta theta_old + (1 - eta) theta`` once per epoch, with
``eta = old_policy_decay(optimizer steps so far, decay_type)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch

from diffalign.errors import DiffalignError

AdvMode = Literal["all", "positive_only", "negative_only", "one_only", "binary"]
LossSpace = Literal["x0_adaptive", "velocity"]
ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")
LOSS_SPACES = ("x0_adaptive", "velocity")
WEIGHT_FLOOR = 1e-5  # the reference's floor of the adaptive weight


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample value [B] (or a scalar) against [B, C, H, W]."""
    return t.reshape(-1, 1, 1, 1) if t.ndim == 1 else t


def flow_forward(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The rectified-flow forward process ``x_sigma = (1 - sigma) x0 + sigma eps`` in float32 (spec §2.2 item 1);
    ``sigma`` is [B] or broadcastable to the sample."""
    sigma = _per_sample(torch.as_tensor(sigma, dtype=torch.float32, device=x0.device))
    return (1 - sigma) * x0.float() + sigma * noise.float()


def reward_probability(advantages: torch.Tensor, adv_clip_max: float = 5.0, adv_mode: AdvMode = "all") -> torch.Tensor:
    """The optimality probability r in [0, 1] of each sample (paper: ``r = 1/2 + 1/2 clip((R - mean) / Z, -1, 1)``;
    spec §2.1 items 4-5, the code's form)::

        A_bar = clamp(A, -A_max, A_max), then adv_mode: all (as is), positive_only (clamp to [0, A_max]),
                negative_only (clamp to [-A_max, 0]), one_only (1 if A_bar > 0 else 0), binary (sign)
        r     = clamp(A_bar / (2 A_max) + 1/2, 0, 1)

    So A = 0 -> 1/2, A = A_max / 2 -> 3/4, A <= -A_max -> 0, A >= A_max -> 1. Computed in float32.
    """
    if adv_clip_max <= 0:
        raise DiffalignError(f"nft.adv_clip_max must be > 0, got {adv_clip_max}")
    a = torch.clamp(advantages.float(), -adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        a = a.clamp(min=0.0)
    elif adv_mode == "negative_only":
        a = a.clamp(max=0.0)
    elif adv_mode == "one_only":
        a = (a > 0).float()
    elif adv_mode == "binary":
        a = torch.sign(a)
    elif adv_mode != "all":
        raise DiffalignError(f"nft.adv_mode must be one of {', '.join(ADV_MODES)}, got {adv_mode!r}")
    return torch.clamp(a / (2 * adv_clip_max) + 0.5, 0.0, 1.0)


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit positive and negative velocities around the frozen old policy (paper Sec. 3.2, "implicit
    parameterization"; spec §2.2 item 3)::

        v+ = beta v_theta + (1 - beta) sg(v_old)        v- = (1 + beta) sg(v_old) - beta v_theta

    Their mean weighted (1/2, 1/2) is ``sg(v_old)`` whatever v_theta; at v_theta = v_old both equal v_old;
    at beta = 1, v+ = v_theta and v- = 2 v_old - v_theta.
    """
    old = v_old.detach()
    return beta * v_theta + (1 - beta) * old, (1 + beta) * old - beta * v_theta


def adaptive_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor, floor: float = WEIGHT_FLOOR) -> torch.Tensor:
    """Per-sample self-normalized x0 regression [B] (paper Sec. 3.3, "adaptive loss weighting"; spec §2.2 items
    5-6): ``mean_e (x0_hat - x0)^2 / sg(w)``, ``w = max(mean_e |x0_hat - x0|, floor)``, w in float64 (as the
    reference) and the loss in float32. Equals ``sigma mean(d^2) / mean|d|`` for ``d = v - u`` above the floor."""
    diff = x0_pred.float() - x0.float()
    dims = tuple(range(1, diff.ndim))
    with torch.no_grad():
        w = diff.detach().double().abs().mean(dim=dims, keepdim=True).clamp(min=floor).float()
    return (diff**2 / w).mean(dim=dims)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
    loss_space: LossSpace = "x0_adaptive",
    v_ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss on one micro-batch at one training sigma per sample (paper Eq. "L(theta)", the
    negative-aware objective ``E[r ||v+ - u||^2 + (1 - r) ||v- - u||^2]``; spec §2.2, the code's form)::

        x_sigma = (1 - sigma) x0 + sigma eps;  u = eps - x0;  (v+, v-) = implicit_policies(v_theta, v_old, beta)
        x0_adaptive:  l+- = mean_e (x_sigma - sigma v+- - x0)^2 / sg(max(mean_e |x_sigma - sigma v+- - x0|, 1e-5))
        velocity:     l+- = mean_e (v+- - u)^2                      (the paper's pseudocode, spec §5 pitfall 1)
        L_pol = mean_i w_i adv_clip_max (r_i l+_i + (1 - r_i) l-_i) / beta      (w_i = 1 without ``weight``)
        L     = L_pol + kl_coef mean_i mean_e (v_theta - sg(v_ref))^2   (the reference code's KL, to the base)

    ``v_theta`` carries the gradient; ``v_old``, ``v_ref``, ``x0``, ``noise``, ``sigma`` [B] and ``r`` [B] are
    constants; ``weight`` [B] (optional, constant) is the reward combiner's per-sample weight (Parrot's
    selection mask x Ctrl-U's exp(-U)): a sample with weight 0 adds exactly nothing to the policy term
    (with r = 1/2 it would otherwise still pull v_theta toward v_old). Velocities may be half precision; everything is computed in float32 (the adaptive weights in
    float64). Returns the loss and detached diagnostics named as the reference logs them: ``policy_loss``,
    ``kl_div`` (with ``v_ref`` only), ``old_deviate`` = mean (v_theta - v_old)^2, ``x0_norm`` = mean x0^2,
    ``positive_loss`` / ``negative_loss`` (means of l+ and l-).
    """
    if beta <= 0:
        raise DiffalignError(f"nft.nft_beta must be > 0, got {beta}")
    if loss_space not in LOSS_SPACES:
        raise DiffalignError(f"nft.loss_space must be one of {', '.join(LOSS_SPACES)}, got {loss_space!r}")
    vt, vo = v_theta.float(), v_old.float().detach()
    x0f, eps = x0.float().detach(), noise.float().detach()
    sig = _per_sample(torch.as_tensor(sigma, dtype=torch.float32, device=vt.device))
    r = r.float().detach().reshape(-1).to(vt.device)
    v_pos, v_neg = implicit_policies(vt, vo, beta)
    dims = tuple(range(1, vt.ndim))
    if loss_space == "x0_adaptive":
        x_t = (1 - sig) * x0f + sig * eps
        l_pos = adaptive_x0_error(x_t - sig * v_pos, x0f)
        l_neg = adaptive_x0_error(x_t - sig * v_neg, x0f)
    else:
        u = eps - x0f
        l_pos = ((v_pos - u) ** 2).mean(dim=dims)
        l_neg = ((v_neg - u) ** 2).mean(dim=dims)
    per_sample = adv_clip_max * (r * l_pos + (1 - r) * l_neg) / beta
    if weight is not None:
        per_sample = per_sample * weight.float().detach().reshape(-1).to(vt.device)
    policy = per_sample.mean()
    loss = policy
    stats = {
        "policy_loss": policy.detach(),
        "old_deviate": ((vt.detach() - vo) ** 2).mean(),
        "x0_norm": (x0f**2).mean(),
        "positive_loss": l_pos.detach().mean(),
        "negative_loss": l_neg.detach().mean(),
    }
    if v_ref is not None:
        kl_i = ((vt - v_ref.float().detach()) ** 2).mean(dim=dims)
        stats["kl_div"] = kl_i.detach().mean()
        if kl_coef:
            loss = loss + kl_coef * kl_i.mean()
    return loss, stats


# ------------------------------------------------------------------------------------------ old policy
DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}  # (flat, uprate, uphold)


def old_policy_decay(step: int, decay_type: int = 1) -> float:
    """The old policy's EMA rate eta after ``step`` optimizer steps (paper: eta_i; spec §2.4)::

        eta = 0 if step < flat else min(uprate (step - flat), uphold)

    ``decay_type`` 0: (flat, uprate, uphold) = (0, 0, 0), a copy (on-policy); 1 (default): (0, 0.001, 0.5);
    2 (the reference's OCR recipe): (75, 0.0075, 0.999).
    """
    if decay_type not in DECAY_TYPES:
        raise DiffalignError(f"nft.decay_type must be 0, 1 or 2, got {decay_type!r}")
    if step < 0:
        raise DiffalignError(f"old_policy_decay: step must be >= 0, got {step}")
    flat, uprate, uphold = DECAY_TYPES[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@torch.no_grad()
def soft_update_(old: Iterable[torch.Tensor], new: Iterable[torch.Tensor], eta: float) -> None:
    """``p_old <- eta p_old + (1 - eta) p`` for every pair, in place (spec §2.4; per LoRA factor, so the old
    weight delta is the product of the averaged factors, spec §5 pitfall 5). eta = 0 copies exactly."""
    if not 0.0 <= eta <= 1.0 or math.isnan(eta):
        raise DiffalignError(f"the old policy's decay must be in [0, 1], got {eta}")
    old, new = list(old), list(new)
    if len(old) != len(new):
        raise ValueError(f"soft_update_: {len(old)} old tensors but {len(new)} new ones")
    for o, n in zip(old, new, strict=True):
        if o.shape != n.shape:
            raise ValueError(f"soft_update_: shapes differ, {tuple(o.shape)} vs {tuple(n.shape)}")
        if eta == 0.0:
            o.copy_(n)
        else:
            o.mul_(eta).add_(n.to(o.dtype), alpha=1.0 - eta)


# ------------------------------------------------------------------------------------------ training sigmas
def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift ``sigma = shift s / (1 + (shift - 1) s)`` (what FlowMatchEulerDiscreteScheduler
    applies to its grid)."""
    return shift * s / (1 + (shift - 1) * s)


def draw_train_sigmas(
    n: int, dist: Literal["uniform", "logit_normal"], shift: float, generator: torch.Generator
) -> torch.Tensor:
    """n training sigmas off the rollout grid (spec §5 pitfall 7), shifted like the sampler's grid: ``uniform``
    s ~ U(0, 1); ``logit_normal`` s = sigmoid(N(0, 1)) (SD3's training density); then :func:`shift_sigma`,
    clamped to [1e-3, 1]. Drawn from ``generator`` (CPU)."""
    if dist == "uniform":
        s = torch.rand(n, generator=generator)
    elif dist == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        raise DiffalignError(f"nft.train_t_dist must be rollout_grid, uniform or logit_normal, got {dist!r}")
    return shift_sigma(s, shift).clamp(1e-3, 1.0)
