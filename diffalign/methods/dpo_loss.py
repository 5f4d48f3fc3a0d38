"""DPO for diffusion models as pure functions: offline Diffusion-DPO and D3PO's per-step DPO.

Both are the DPO loss of Rafailov et al. 2023 (arXiv 2305.18290, Eq. 7),
``-log sigma(beta * (implicit reward of the winner - implicit reward of the loser))``, with the
implicit reward of a diffusion model written two ways (spec ../shared/specs/algorithms.md §5):

- :func:`diffusion_dpo_loss`: Wallace et al. 2023 (arXiv 2311.12908), Eq. 14 (the ELBO surrogate): the
  implicit reward of an image is minus its denoising error relative to the reference at one shared
  (t, noise); SalesforceAIResearch/DiffusionDPO ``train.py`` computes exactly this.
- :func:`d3po_loss`: Yang et al. 2023 (arXiv 2311.13231), Eq. 10 / 11: the implicit reward of a
  denoising step is its log-ratio ``log pi_theta / pi_ref`` on a stored transition, the ratio clamped
  to ``[1 - eps, 1 + eps]`` as yk7333/d3po ``scripts/rm/train_d3po.py`` does.

Every loss is minimized; inputs are per-pair tensors [B]; the stats returned are detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2 = math.log(2.0)


def diffusion_dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, Eq. 14; spec §5.2)::

        d_theta = e_theta(w) - e_theta(l)          e = ||eps - eps_hat(z_t, t, c)||^2 / (C H W)
        d_ref   = e_ref(w)   - e_ref(l)            (the same t and eps for w and l; ref under no_grad)
        u       = -(beta / 2) * (d_theta - d_ref)
        L       = -mean log sigma(u)

    The paper's ``T * omega(lambda_t)`` weight is folded into ``beta`` (DiffusionDPO ``--beta_dpo``,
    5000 for SD 1.5 and SDXL). At theta = ref, ``u = 0`` and ``L = log 2`` exactly; swapping winner and
    loser flips the sign of ``u`` and of the gradient. Stats: ``implicit_acc = mean(u > 0)`` (ties
    count half, as 0.5), ``model_loss`` = mean of theta's errors, ``ref_loss``, ``reward_margin = mean(u)``.
    """
    if not (err_w.shape == err_l.shape == ref_err_w.shape == ref_err_l.shape) or err_w.ndim != 1:
        raise ValueError(
            f"need four [B] tensors, got {tuple(err_w.shape)}, {tuple(err_l.shape)}, {tuple(ref_err_w.shape)}, "
            f"{tuple(ref_err_l.shape)}"
        )
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    model_diff = err_w - err_l
    ref_diff = (ref_err_w - ref_err_l).detach()
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        stats = {
            "implicit_acc": ((inside > 0).float() + 0.5 * (inside == 0).float()).mean(),
            "model_loss": 0.5 * (err_w.mean() + err_l.mean()),
            "ref_loss": 0.5 * (ref_err_w.mean() + ref_err_l.mean()),
            "reward_margin": inside.mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def d3po_loss(
    logp_a: torch.Tensor,
    logp_b: torch.Tensor,
    ref_a: torch.Tensor,
    ref_b: torch.Tensor,
    preference: torch.Tensor,
    beta: float,
    eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D3PO's per-step DPO loss (Yang et al. 2023, arXiv 2311.13231, Eq. 11 with the reference code's clamp;
    spec §5.1) on one denoising step of B pairs (a, b)::

        h^a = preference,  h^b = -preference              +1: a preferred, -1: b preferred, 0: tie
        rho^a = clamp(exp(logp_theta^a - logp_ref^a), 1 - eps, 1 + eps)     (likewise b)
        L = -mean_pairs log sigma( beta * (h^a log rho^a + h^b log rho^b) )

    ``logp_*`` are log pi_theta of the stored transitions (with gradient), ``ref_*`` the reference's
    (detached here). A step whose ratio leaves the band gets no gradient (the clamp); a tie gives the
    constant ``log 2`` with zero gradient and counts in the mean, as in the reference. At theta = ref
    every pair's loss is ``log 2`` and the gradient w.r.t. the winner's log-prob is ``-beta / (2 B)``.
    Stats: ``ratio_clipfrac`` (ratios outside the band), ``implicit_acc`` over non-tied pairs.
    """
    if not (logp_a.shape == logp_b.shape == ref_a.shape == ref_b.shape == preference.shape) or logp_a.ndim != 1:
        raise ValueError("logp_a, logp_b, ref_a, ref_b and preference must all be [B] tensors")
    if beta <= 0 or not 0 < eps < 1:
        raise ValueError(f"need beta > 0 and 0 < eps < 1, got beta={beta}, eps={eps}")
    h = preference.to(logp_a.dtype)
    delta_a, delta_b = logp_a - ref_a.detach(), logp_b - ref_b.detach()
    log_rho_a = torch.log(torch.clamp(torch.exp(delta_a), 1.0 - eps, 1.0 + eps))
    log_rho_b = torch.log(torch.clamp(torch.exp(delta_b), 1.0 - eps, 1.0 + eps))
    inside = beta * (h * log_rho_a - h * log_rho_b)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        lo, hi = math.log(1.0 - eps), math.log(1.0 + eps)
        out = torch.cat([(delta_a < lo) | (delta_a > hi), (delta_b < lo) | (delta_b > hi)]).float()
        decided = h != 0
        acc = (inside[decided] > 0).float().mean() if bool(decided.any()) else torch.zeros((), dtype=inside.dtype)
        stats = {
            "ratio_clipfrac": out.mean(),
            "implicit_acc": acc,
            "log_ratio_abs": 0.5 * (delta_a.abs().mean() + delta_b.abs().mean()),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def preference_from_rewards(
    reward_a: torch.Tensor, reward_b: torch.Tensor, rewards_a: torch.Tensor | None = None, rewards_b=None
) -> torch.Tensor:
    """+1 / -1 / 0 per pair: which member the reward prefers (spec §5.1, "reward-model mode").

    Scalars ``reward_a``, ``reward_b`` [B]: the sign of ``reward_a - reward_b`` (equal: 0). With reward
    vectors ``rewards_a``, ``rewards_b`` [B, R] (several rewards) instead: Pareto dominance, a member wins
    iff it is >= in every reward and > in at least one; incomparable or equal pairs are ties (0).
    """
    if rewards_a is not None:
        ge, gt = (rewards_a >= rewards_b).all(dim=1), (rewards_a > rewards_b).any(dim=1)
        le, lt = (rewards_a <= rewards_b).all(dim=1), (rewards_a < rewards_b).any(dim=1)
        return (ge & gt).long() - (le & lt).long()
    return torch.sign(reward_a - reward_b).long()
