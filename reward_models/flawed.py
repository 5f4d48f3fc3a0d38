"""A shapes CLIP with a planted, known flaw: a proxy built to be over-optimized (reward-hacking studies).

``shapes_clip_flawed`` = the CLIP score of a shapes CLIP (``model``: the shipped proxy by default, or an
ensemble member ``local-dir:assets/shapes-ensemble/m1``) **plus** ``flaw_weight`` x the colour saturation
of one hue (:class:`reward_models.saturation.Saturation` with ``color=flaw_color``)::

    r(x, c) = clip(x, c) + w_flaw * sat_hue(x)

It stands for what learned proxies do in practice (Gao et al. 2022; Coste et al. 2023): each has its own
spurious preference, which an optimizer finds and which the exact verifier (``shapes_gold``) does not
share. Here the preference is explicit and measurable: more, larger or smeared regions of the flaw's
hue raise the proxy and break the scene. Ensemble members with *different* flaw hues disagree exactly
where one of them is being exploited, which is what worst-case (``reward.combine: wco``) and
uncertainty-weighted (``uwo``) optimization use (issue 17's over-optimization study,
``scripts/overoptimization.py``). Not a quality reward.
"""

from __future__ import annotations

import math

import torch

from diffalign.errors import DiffalignError
from reward_models.base import Reward
from reward_models.clip_score import ShapesClipScore
from reward_models.registry import register_reward
from reward_models.saturation import Saturation


@register_reward("shapes_clip_flawed")
class ShapesClipFlawed(Reward):
    """The shapes CLIP score plus ``flaw_weight`` x the saturation of the hue ``flaw_color``. Differentiable.

    Options:
        model: the shapes CLIP (``local-dir:DIR``; default the shipped ``assets/shapes-clip``).
        flaw_color: the rewarded hue: a shapes colour (``red``, ``green``, ``blue``, ``yellow``, ``purple``),
            ``cyan``, ``magenta``, a hue in degrees, or ``any`` (every hue, the plain mean saturation).
        flaw_weight: the flaw's weight ``w_flaw`` (default 6: see scripts/overoptimization.py for how it was
            calibrated against the CLIP's spread on base samples).
        sharpness: how narrowly ``flaw_color`` selects its hue (as :class:`Saturation`; default 8).
    """

    differentiable = True
    range = (-1.0, 7.0)

    def __init__(
        self, model: str | None = None, flaw_color: str = "red", flaw_weight: float = 6.0, sharpness: float = 8.0
    ) -> None:
        super().__init__()
        if not (math.isfinite(flaw_weight) and flaw_weight >= 0):
            raise DiffalignError(f"shapes_clip_flawed: flaw_weight must be a number >= 0, got {flaw_weight}")
        self.clip = ShapesClipScore(model=model)
        color = None if str(flaw_color).strip().lower() == "any" else str(flaw_color)
        self.flaw = Saturation(color=color, sharpness=sharpness)
        self.flaw_weight = float(flaw_weight)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.clip.score(images, prompts) + self.flaw_weight * self.flaw.score(images, prompts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, flaw_color={self.flaw.color or 'any'!r}, flaw_weight={self.flaw_weight:g}"


__all__ = ["ShapesClipFlawed"]
