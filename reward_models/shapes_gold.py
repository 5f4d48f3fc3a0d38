"""The exact ("gold") verifier of the shapes world as a black-box reward.

Wraps :mod:`diffalign.shapes.verifier`: nearest-palette colour unmixing, connected components and
shape cues decide which (colour, shape) objects an image shows; the prompt (a shapes caption such as
``"two red circles and a blue square"``) says which it should show. Not differentiable. Use it as the
ground truth against which a learned proxy (``shapes_clip``) is over-optimised, in the spirit of
Gao et al., "Scaling Laws for Reward Model Overoptimization" (ICML 2023).
"""

from __future__ import annotations

from typing import Literal

import torch

from diffalign.errors import DiffalignError
from reward_models.base import Reward
from reward_models.registry import register_reward


@register_reward("shapes_gold")
class ShapesGold(Reward):
    """Shapes-world verifier score. Not differentiable.

    Options:
        mode: ``score`` (default): matched objects / max(expected, found), in [0, 1];
            ``correct``: 1.0 when the objects match exactly and the leftover is small, else 0.0.
        max_leftover: fraction of unexplained non-background pixels allowed for ``correct`` (default 0.02).

    Prompts must be shapes captions; anything else is a one-line DiffalignError.
    """

    differentiable = False
    range = (0.0, 1.0)

    def __init__(self, mode: Literal["score", "correct"] = "score", max_leftover: float = 0.02) -> None:
        super().__init__()
        if mode not in ("score", "correct"):
            raise DiffalignError(f"shapes_gold: mode must be score or correct, got {mode!r}")
        if not 0.0 <= max_leftover <= 1.0:
            raise DiffalignError(f"shapes_gold: max_leftover must be in [0, 1], got {max_leftover}")
        self.mode = mode
        self.max_leftover = float(max_leftover)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from diffalign.shapes.verifier import verify_batch
        from diffalign.shapes.world import parse_caption

        specs = [parse_caption(p) for p in prompts]  # DiffalignError naming the caption on failure
        verdicts = verify_batch(images.detach().float().cpu(), specs, self.max_leftover)
        values = [float(v.correct) if self.mode == "correct" else float(v.score) for v in verdicts]
        return torch.tensor(values, dtype=torch.float32, device=images.device)
