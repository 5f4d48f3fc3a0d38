"""ReNO's reward assembly: differentiable rewards, their weights and names, and the reward loss ``L_R``.

    L_R = sum_i w_i * l_i,         l_i = -r_i(G(z, c), c)                      (reward losses)

ReNO writes each reward loss with a constant offset (``1 - s_HPS``, ``100 - CLIP logit``, ...);
constants do not change gradients or the arg-min, so here ``l_i`` is simply the negated reward and
reward weights are per reward (``--reward NAME,weight=W``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from diffalign.errors import DiffalignError
from diffalign.reno.core import RewardLoss

RewardLike = Any  # a reward_models.Reward, or any module/callable with `differentiable` and `name`


def check_differentiable(rewards: Sequence[RewardLike]) -> None:
    """One-line error before any work if a reward cannot pass gradients to the pixels."""
    from reward_models import Reward, RewardSpec, require_differentiable

    registered = [r for r in rewards if isinstance(r, (str, RewardSpec, Reward))]
    require_differentiable(registered, "reno")
    for r in rewards:
        if not isinstance(r, (str, RewardSpec, Reward)) and not getattr(r, "differentiable", False):
            name = getattr(r, "name", type(r).__name__)
            raise DiffalignError(
                f"method 'reno' backpropagates through the reward, but reward '{name}' is not marked "
                "differentiable (set differentiable = True on it if gradients reach the pixels)"
            )


def build_rewards(
    rewards: Sequence[RewardLike], weights: Sequence[float] | None, device: torch.device | str
) -> tuple[list[RewardLike], list[float], list[str]]:
    """Rewards (built from spec strings on ``device``), their weights and unique names.

    Weights default to each spec's ``weight=`` (1.0 when absent). Raises :class:`DiffalignError` for
    no rewards, a non-differentiable reward, a bad spec or a weight count that does not match.
    """
    from reward_models import get_reward

    if not rewards:
        raise DiffalignError(
            "reno needs at least one reward, e.g. --reward clip_score:model=ViT-B-32,pretrained=openai"
        )
    rewards = list(rewards)
    check_differentiable(rewards)
    built = [get_reward(r, device=device) if isinstance(r, str) else r for r in rewards]
    if weights is None:
        weights = [float(getattr(getattr(r, "spec", None), "weight", 1.0)) for r in built]
    weights = [float(w) for w in weights]
    if len(weights) != len(built):
        raise DiffalignError(f"reno: got {len(weights)} weights for {len(built)} rewards; give one weight per reward")
    if not all(math.isfinite(w) for w in weights):
        raise DiffalignError(f"reno: reward weights must be finite numbers, got {weights}")
    names = [str(getattr(r, "name", type(r).__name__)) for r in built]
    if len(set(names)) < len(names):  # the same reward twice: name them by spec, then by position
        names = [str(getattr(r, "spec", n)) for r, n in zip(built, names, strict=True)]
        names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
    return built, weights, names


def make_reward_loss(
    rewards: Sequence[RewardLike], weights: Sequence[float], names: Sequence[str], prompt: str
) -> RewardLoss:
    """``images [1, 3, H, W] -> (L_R, {name: r_i})`` for :func:`diffalign.reno.core.optimize_noise`.

    ``L_R = -sum_i w_i r_i(images, [prompt])`` (a 0-dim tensor, differentiable in the images); the
    dict holds the raw (unweighted) reward values as floats. ``rewards``, ``weights`` and ``names``
    as :func:`build_rewards` returns them.
    """

    def reward_loss(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        values = [r(images, [prompt]).reshape(-1)[0] for r in rewards]
        loss_reward = sum((-w * v for w, v in zip(weights, values, strict=True)), torch.zeros((), device=images.device))
        return loss_reward, {n: float(v.detach()) for n, v in zip(names, values, strict=True)}

    return reward_loss
