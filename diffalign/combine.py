"""Combine several rewards into one training signal (pure functions over tensors).

``weighted_sum`` is the linear scalarization ``r = sum_i w_i r_i`` used by DRaFT and PRDP for
multi-reward training (e.g. PickScore x10 + HPSv2 x2 + aesthetic x0.05). Weights are checked against
the reward count, as trl's ``GRPOConfig.reward_weights`` are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from diffalign.errors import DiffalignError


def check_weights(names: Sequence[str], weights: Mapping[str, float] | Sequence[float]) -> list[float]:
    """Weights in the order of ``names``; one per reward, finite numbers."""
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        extra = [k for k in weights if k not in names]
        if missing or extra:
            raise DiffalignError(
                f"reward weights name {sorted(weights)} but the rewards are {list(names)}; give one weight per reward"
            )
        out = [float(weights[n]) for n in names]
    else:
        out = [float(w) for w in weights]
        if len(out) != len(names):
            raise DiffalignError(f"got {len(out)} reward weights for {len(names)} rewards; give one weight per reward")
    if not all(torch.isfinite(torch.tensor(w)) for w in out):
        raise DiffalignError(f"reward weights must be finite numbers, got {out}")
    return out


def weighted_sum(values: Mapping[str, torch.Tensor], weights: Mapping[str, float] | Sequence[float]) -> torch.Tensor:
    """``sum_i w_i * values[name_i]`` for per-reward tensors ``[B]`` (same shape); keeps gradients."""
    if not values:
        raise DiffalignError("no rewards to combine")
    names = list(values)
    ws = check_weights(names, weights)
    shapes = {tuple(v.shape) for v in values.values()}
    if len(shapes) != 1:
        raise DiffalignError(f"rewards to combine have different shapes: {sorted(shapes)}")
    total = ws[0] * values[names[0]]
    for w, name in zip(ws[1:], names[1:], strict=True):
        total = total + w * values[name]
    return total
