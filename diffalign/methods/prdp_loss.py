"""PRDP's objective as a pure function: proximal reward difference prediction over whole trajectories.

Deng et al. 2024, "PRDP: Proximal Reward Difference Prediction for Large-Scale Reward Finetuning of
Diffusion Models" (arXiv 2402.08714, CVPR 2024; spec ../shared/specs/algorithms.md §4). No public
training code exists; this follows the paper's Eq. 6-9, Algorithm 1 and its appendix listing of the
loss, line by line as docs/training.md ("PRDP") maps it. Symbols::

    logp      [N, T]  log pi_theta(x_{t-1} | x_t, c) of every stored step of N trajectories (with grad)
    logp_old  [N, T]  the same under theta_old, the sampling snapshot (stored at sampling time)
    logp_ref  [N, T]  the same under pi_ref, the pretrained model (LoRA disabled)
    rewards   [N]     r(x_0, c);  group_ids [N]: trajectories of one prompt share an id
    beta              KL weight (paper beta);  clip_range: eps of the stepwise proximal clip
"""

from __future__ import annotations

import torch


def prdp_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    beta: float,
    clip_range: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PRDP loss (paper Eq. 8 with the proximal update of Eq. 9 and the appendix listing; spec §4.2)::

        rho_t      = logp_t - logp_ref_t                                   per-step implicit reward (Eq. 6)
        rho_clip_t = clamp(rho_t, rho_old_t - eps, rho_old_t + eps)        rho_old_t = logp_old_t - logp_ref_t
        s          = mean_t rho_t,   s_clip = mean_t rho_clip_t             trajectory score (appendix: mean)
        for each pair i, j of one prompt with r_i > r_j:
            e      = (s_i - s_j - (r_i - r_j) / beta)^2                      RDP error (Eq. 8)
            e_clip = (s_clip_i - s_clip_j - (r_i - r_j) / beta)^2
            l_ij   = max(e, e_clip)                                          proximal, pessimistic (Eq. 9)
        L = mean over prompts of ( mean over that prompt's pairs of l_ij )
          (with ``weights`` w [N], the combiner's per-sample weights: the weighted mean with pair weight
          w_i w_j, so a pair with a sample outside Parrot's set P has weight 0)

    Pairs with equal rewards are left out (the appendix listing); a prompt with no such pair is left out of
    the mean over prompts; with no pair at all the loss is ``0 * logp.sum()`` (a zero that keeps the graph).
    Gradient flows through ``logp`` only. At theta = ref the loss is the mean of ``(dr / beta)^2``; at
    theta = theta_old ``l = e``; when predicted and true differences agree it is 0.

    Stats (detached): ``rdp_error`` (mean e over the pairs), ``clipfrac`` (steps whose log-ratio to theta_old
    left ``[-eps, eps]``), ``pairs`` (number of pairs), ``score_gap`` (mean ``s_i - s_j`` over the pairs,
    winner minus loser), ``ref_log_ratio`` (mean of ``s`` over the trajectories: the per-step log-ratio to the
    reference, an estimate of the per-step KL).
    """
    if logp.ndim != 2 or logp.shape != logp_old.shape or logp.shape != logp_ref.shape:
        raise ValueError(
            f"logp, logp_old, logp_ref must be [N, T] of one shape, got {tuple(logp.shape)}, "
            f"{tuple(logp_old.shape)}, {tuple(logp_ref.shape)}"
        )
    n = logp.shape[0]
    if rewards.shape != (n,) or group_ids.shape != (n,):
        raise ValueError(f"rewards and group_ids must be [N] with N={n}")
    if beta <= 0 or clip_range <= 0:
        raise ValueError(f"beta and clip_range must be > 0, got {beta}, {clip_range}")
    ref, old = logp_ref.detach(), logp_old.detach()
    rho = logp - ref
    rho_old = old - ref
    rho_clip = torch.minimum(torch.maximum(rho, rho_old - clip_range), rho_old + clip_range)
    s, s_clip = rho.mean(dim=1), rho_clip.mean(dim=1)
    r = rewards.detach().to(logp.dtype)
    ids = group_ids.to(logp.device)
    pair = (ids[:, None] == ids[None, :]) & (r[:, None] > r[None, :])  # i wins over j, same prompt
    target = (r[:, None] - r[None, :]) / beta
    e = (s[:, None] - s[None, :] - target) ** 2
    e_clip = (s_clip[:, None] - s_clip[None, :] - target) ** 2
    per_pair = torch.maximum(e, e_clip)
    # per prompt: mean over its pairs; then mean over prompts with at least one pair
    _, group = torch.unique(ids, return_inverse=True)
    num_groups = int(group.max()) + 1 if n else 0
    pair_f = pair.to(logp.dtype)
    if weights is not None:
        w = weights.detach().to(logp.device, logp.dtype).reshape(-1)
        pair_f = pair_f * (w[:, None] * w[None, :])
    per_row = (per_pair * pair_f).sum(dim=1)  # row i: pairs won by i
    count_row = pair_f.sum(dim=1)
    total = torch.zeros(num_groups, dtype=logp.dtype, device=logp.device).index_add(0, group, per_row)
    count = torch.zeros(num_groups, dtype=logp.dtype, device=logp.device).index_add(0, group, count_row)
    has = count > 0
    if bool(has.any()):
        loss = (total[has] / count[has]).mean()
    else:
        loss = 0.0 * logp.sum()
    with torch.no_grad():
        num_pairs = (pair_f > 0).to(logp.dtype).sum()
        denom = num_pairs.clamp_min(1)
        log_ratio_old = logp.detach() - old
        stats = {
            "rdp_error": (e * (pair_f > 0)).sum() / denom,
            "clipfrac": (log_ratio_old.abs() > clip_range).to(logp.dtype).mean(),
            "pairs": num_pairs,
            "score_gap": ((s[:, None] - s[None, :]) * (pair_f > 0)).sum() / denom,
            "ref_log_ratio": s.mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
