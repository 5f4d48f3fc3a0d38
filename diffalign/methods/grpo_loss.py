"""GRPO's loss as pure functions: the clipped group-relative surrogate and two KL-to-reference terms.

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470; spec ../shared/specs/algorithms.md §6.1) adapted to DDIM
with eta > 0: each denoising step is a Gaussian policy N(mu_theta, sigma_t^2 I) (spec §1.2), the
advantages are group z-scores (:func:`diffalign.rollouts.group_advantages`), clamped to
``±adv_clip_max`` by the caller. Symbols::

    logp      -> log pi_theta(x_{k+1} | x_k, c)      (recomputed with grad, mean-reduced like the stored one)
    logp_old  -> log pi_theta_old(x_{k+1} | x_k, c)  (stored at sampling time)
    rho       -> exp(logp - logp_old)
    eps       -> ``clip_range``                        beta -> ``beta`` (KL weight)

Which KL: Flow-GRPO's code penalizes the distance between the means of the two Gaussians
(:func:`gaussian_mean_kl`); DeepSeekMath's GRPO (and TRL's ``GRPOTrainer``) uses the k3 estimator on
log-probs (:func:`k3_kl`). :func:`grpo_loss` takes either as a precomputed per-sample tensor.
"""

from __future__ import annotations

from typing import Literal

import torch


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || pi_ref), per element (Schulman 2020, "Approximating KL Divergence";
    GRPO, Shao et al. 2024, arXiv 2402.03300, Eq. 4)::

        k3 = pi_ref / pi - log(pi_ref / pi) - 1 = exp(d) - d - 1,   d = logp_ref - logp

    Non-negative, exactly 0 where ``logp == logp_ref``, with zero gradient there; unbiased for the
    KL when ``logp`` is the full log-density of a sample drawn from pi. On diffalign's mean-reduced
    log-probs (spec §1.2) it is a KL proxy on the per-element geometric mean ratio, not the KL of
    the step (that is :func:`gaussian_mean_kl`). Computed as ``expm1(d) - d`` for precision.
    """
    d = logp_ref - logp
    return (torch.expm1(d) - d).clamp_min(0.0)


def gaussian_mean_kl(
    mean: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor | float,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """KL between two Gaussian steps with the same std, per sample [B] (spec §6.1, "KL (if beta > 0)")::

        KL( N(mu, s^2 I) || N(mu_ref, s^2 I) ) = ||mu - mu_ref||^2 / (2 s^2)

    ``reduction="sum"`` is that exact KL over the latent elements; ``"mean"`` (default) divides it by
    the element count C*H*W, the scale of diffalign's mean-reduced log-probs (spec §1.2).

    Flow-GRPO's code (flow_grpo ``train_sd3.py``) computes ``mean_elements((mu - mu_ref)^2) / (2 g^2)``
    with ``g`` the SDE noise scale, omitting the step's ``|dt|`` from the variance ``g^2 |dt|``: pass
    ``std=g`` for parity with its beta values, ``std=g * sqrt(|dt|)`` (or, for DDIM, ``sigma_t`` =
    ``StepOutput.std``) for the exact KL. ``std`` is a float, a [B] tensor (one per sample) or a tensor
    broadcastable to ``mean``; gradients flow through ``mean`` (and ``mean_ref`` if it has any; the
    caller computes the reference under ``no_grad``).
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean shape {tuple(mean.shape)} != mean_ref shape {tuple(mean_ref.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if std.ndim == 1 and mean.ndim > 1 and std.shape[0] == mean.shape[0]:
        std = std.reshape(-1, *([1] * (mean.ndim - 1)))
    elem = (mean - mean_ref) ** 2 / (2 * std**2)
    dims = tuple(range(1, mean.ndim))
    if not dims:
        return elem
    return elem.mean(dim=dims) if reduction == "mean" else elem.sum(dim=dims)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO's per-step loss (arXiv 2505.05470, its GRPO objective negated to be minimized, = PPO's
    clipped surrogate, Schulman et al. 2017, Eq. 7, plus a KL penalty; spec §6.1 "Loss")::

        rho = exp(logp - logp_old)
        L   = mean_i max(-A_i rho_i, -A_i clamp(rho_i, 1 - eps, 1 + eps)) + beta * mean_i kl_i

    All inputs are [B] (one sampling step of B trajectories); ``advantages`` are used as given
    (already group-normalized and clamped). With ``beta == 0`` the KL term is skipped entirely
    (``kl`` may be None or anything finite or not); ``beta > 0`` needs ``kl``.

    Returns the scalar loss and detached stats: ``policy_loss``; ``clipfrac = mean(|rho - 1| > eps)``;
    ``approx_kl = 0.5 mean((logp - logp_old)^2)`` (to theta_old, as DDPO logs it); ``kl`` = mean of the
    given KL (0 without one); ``ratio`` = mean rho. At ``logp == logp_old``: rho = 1, the loss is
    ``-mean(A) + beta * mean(kl)`` and its gradient w.r.t. ``logp`` is ``-A / B``.
    """
    if not (logp.shape == logp_old.shape == advantages.shape):
        raise ValueError(
            f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and kl is None:
        raise ValueError("beta > 0 needs a kl tensor")
    if kl is not None and kl.shape != logp.shape:
        raise ValueError(f"kl shape {tuple(kl.shape)} != logp shape {tuple(logp.shape)}")
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped, clipped))
    loss = policy_loss + beta * torch.mean(kl) if beta > 0 else policy_loss
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss.detach(),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
            "approx_kl": 0.5 * torch.mean(log_ratio**2),
            "kl": torch.mean(kl) if kl is not None else torch.zeros((), dtype=logp.dtype, device=logp.device),
            "ratio": torch.mean(ratio),
        }
    return loss, stats
