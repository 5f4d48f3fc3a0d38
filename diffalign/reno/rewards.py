"""ReNO's reward assembly: differentiable rewards, their weights and names, and the reward loss ``L_R``.

    L_R = sum_i w_i * l_i,         l_i = -r_i(G(z, c), c)                      (reward losses)

ReNO writes each reward loss with a constant offset (``1 - s_HPS``, ``100 - CLIP logit``, ...);
constants do not change gradients or the arg-min, so here ``l_i`` is simply the negated reward and
reward weights are per reward (``--reward NAME,weight=W``). With another combiner
(:mod:`diffalign.combine`, the layer training uses too) ``L_R = -w r + penalty`` for the combined
signal ``r`` of the one image (its weight ``w``: Ctrl-U's exp(-U); penalty: its +U term): e.g. UWO over an
ensemble of proxies, ``-(mean_i r_i - lambda Var_i r_i)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from diffalign.errors import DiffalignError
from diffalign.reno.core import RewardLoss

if TYPE_CHECKING:
    from diffalign.combine import Combiner

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
    rewards: Sequence[RewardLike],
    weights: Sequence[float],
    names: Sequence[str],
    prompt: str,
    combiner: Combiner | None = None,
) -> RewardLoss:
    """``images [1, 3, H, W] -> (L_R, {name: r_i})`` for :func:`diffalign.reno.core.optimize_noise`.

    ``L_R = -sum_i w_i r_i(images, [prompt])`` (a 0-dim tensor, differentiable in the images) with the
    default weighted combiner; with ``combiner`` (:func:`diffalign.combine.build_combiner`, ``context="reno"``)
    ``L_R`` is :meth:`~diffalign.combine.Combined.mean_loss` of ``-signal`` for the one image. The dict
    holds the raw (unweighted) reward values as floats. ``rewards``, ``weights`` and ``names`` as
    :func:`build_rewards` returns them.
    """
    from diffalign.combine import build_combiner

    if combiner is None:
        combiner = build_combiner("weighted", names, weights, context="reno")

    def reward_loss(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        values = [r(images, [prompt]).reshape(-1)[:1] for r in rewards]
        terms = combiner(dict(zip(names, values, strict=True)))
        loss_reward = terms.mean_loss(-terms.signal)
        return loss_reward, {n: float(v.detach()[0]) for n, v in zip(names, values, strict=True)}

    return reward_loss


def calibrate_combiner(
    combiner: Combiner,
    rewards: Sequence[RewardLike],
    names: Sequence[str],
    prompt: str,
    generate: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    samples: int,
    seed: int,
) -> None:
    """Fit a stateful combiner's z-score statistics on ``samples`` images of the frozen generator from
    fresh noises (``seed``-derived, independent of ``z0``'s) for ``prompt``, without gradients: ReNO's
    calibration set, the initial "policy" of this prompt (spec §9.2). A no-op for stateless combiners."""
    if not combiner.needs_calibration:
        return
    g = torch.Generator().manual_seed(int(seed))
    values: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(samples):
            z = torch.randn(z0.shape, generator=g, dtype=torch.float32).to(z0.device)
            images = generate(z)
            for n, r in zip(names, rewards, strict=True):
                values[n].append(r(images, [prompt]).reshape(-1)[:1].detach().float().cpu())
    combiner.calibrate({n: torch.cat(v) for n, v in values.items()})
