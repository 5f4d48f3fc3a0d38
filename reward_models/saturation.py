"""Colour saturation: a deliberately hackable, differentiable reward (a testbed for reward hacking).

Per pixel the HSV saturation ``s = (max(R, G, B) - min(R, G, B)) / max(R, G, B)`` (0 for grey, white and
black; 1 for a pure hue), averaged over the image (``mode=mean``) or counted as the soft fraction of
strongly coloured pixels (``mode=fraction``). With ``color=NAME`` (or a hue in degrees) only pixels of
that hue count: each pixel's saturation is multiplied by ``max(0, cos(hue - target)) ** sharpness``.

It is **not** a quality reward. On the shapes world every object is a saturated colour on a near-grey
background (saturation 0.017), so the reward rises with more, larger or smeared coloured regions:
adding objects, growing them or tinting the background, which the exact verifier (``shapes_gold``)
counts as wrong. Added to a proxy (``reward.rewards=[shapes_clip,saturation]``) it makes a hackable
reward, against which a guard such as Adv-GRPO's discriminator can be tested (issue 16,
``scripts/hacking_study.py``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from diffalign.errors import DiffalignError
from reward_models.base import Reward
from reward_models.registry import register_reward

# Named hues (degrees, the opponent-colour angle below): the shapes world's palette
# (diffalign/shapes/world.py COLORS) and the pure secondaries.
_NAMED_RGB: dict[str, tuple[float, float, float]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 20),
    "purple": (145, 55, 175),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
_EPS = 1e-6
_FRACTION_SOFTNESS = 0.02  # width of the sigmoid step of mode=fraction (saturation units)


def _opponent(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Opponent coordinates ``a = R - (G + B) / 2``, ``b = sqrt(3) / 2 (G - B)`` of ``[..., 3, ...]`` on dim -3."""
    r, g, b = rgb.unbind(dim=-3)
    return r - 0.5 * (g + b), (math.sqrt(3.0) / 2.0) * (g - b)


def hue_degrees(rgb: tuple[float, float, float]) -> float:
    """Hue angle (degrees in [0, 360)) of one RGB colour: ``atan2(b, a)`` of its opponent coordinates.

    Equal to the HSV hue for the primaries and secondaries (red 0, yellow 60, green 120, ...)."""
    t = torch.tensor(rgb, dtype=torch.float64).reshape(3, 1, 1)
    a, b = _opponent(t)
    if float(a.abs() + b.abs()) == 0.0:
        raise DiffalignError(f"saturation: colour {rgb} is grey and has no hue")
    return math.degrees(math.atan2(float(b), float(a))) % 360.0


def pixel_saturation(images: torch.Tensor) -> torch.Tensor:
    """HSV saturation ``(max - min) / max`` of each pixel of ``[B, 3, H, W]`` in [0, 1] -> ``[B, H, W]``.

    Differentiable (the gradient flows to the max and min channels); black pixels give 0."""
    hi = images.amax(dim=1)
    lo = images.amin(dim=1)
    return (hi - lo) / (hi + _EPS)


def hue_weight(images: torch.Tensor, target_degrees: float, sharpness: float) -> torch.Tensor:
    """``max(0, cos(hue - target)) ** sharpness`` per pixel of ``[B, 3, H, W]`` -> ``[B, H, W]`` (0 for grey)."""
    a, b = _opponent(images)
    t = math.radians(target_degrees)
    norm = torch.sqrt(a * a + b * b + _EPS**2)
    cos = (a * math.cos(t) + b * math.sin(t)) / norm
    return cos.clamp(min=0.0) ** sharpness


def parse_color(color: str) -> float:
    """A colour name (``red``, ``green``, ``blue``, ``yellow``, ``purple``, ``cyan``, ``magenta``) or a hue
    in degrees -> the target hue in degrees; anything else is a one-line :class:`DiffalignError`."""
    text = color.strip().lower()
    if text in _NAMED_RGB:
        return hue_degrees(_NAMED_RGB[text])
    try:
        value = float(text)
    except ValueError:
        raise DiffalignError(
            f"saturation: unknown color {color!r}; use one of {', '.join(_NAMED_RGB)} or a hue in degrees (0-360)"
        ) from None
    if not math.isfinite(value):
        raise DiffalignError(f"saturation: color hue must be a finite number of degrees, got {color!r}")
    return value % 360.0


@register_reward("saturation")
class Saturation(Reward):
    """Mean colour saturation of the image, in [0, 1]. Differentiable. A hacking testbed, not a quality reward.

    Options:
        mode: ``mean`` (default): the mean per-pixel HSV saturation ``(max - min) / max``;
            ``fraction``: the soft fraction of pixels whose (hue-weighted) saturation exceeds ``threshold``
            (a sigmoid step 0.02 wide, so it stays differentiable).
        threshold: the saturation that counts as "strongly coloured" for ``fraction`` (default 0.5, in (0, 1)).
        color: none (default: every hue counts), a colour name (the shapes palette ``red``, ``green``,
            ``blue``, ``yellow``, ``purple``, or ``cyan``, ``magenta``) or a hue in degrees: only that hue
            is rewarded, each pixel weighted by ``max(0, cos(hue - target)) ** sharpness``.
        sharpness: how narrowly ``color`` selects its hue (default 8: 30 degrees off -> 0.32, 60 -> 0.004).

    The prompt is ignored. White -> 0, pure red -> 1, an image half pure red and half white -> 0.5.
    """

    differentiable = True
    range = (0.0, 1.0)

    def __init__(
        self,
        mode: Literal["mean", "fraction"] = "mean",
        threshold: float = 0.5,
        color: str | None = None,
        sharpness: float = 8.0,
    ) -> None:
        super().__init__()
        if mode not in ("mean", "fraction"):
            raise DiffalignError(f"saturation: mode must be mean or fraction, got {mode!r}")
        if not 0.0 < threshold < 1.0:
            raise DiffalignError(f"saturation: threshold must be in (0, 1), got {threshold}")
        if not (math.isfinite(sharpness) and sharpness > 0):
            raise DiffalignError(f"saturation: sharpness must be a positive number, got {sharpness}")
        self.mode = mode
        self.threshold = float(threshold)
        self.color = color
        self.target = None if color is None else parse_color(color)
        self.sharpness = float(sharpness)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = images.float()
        sat = pixel_saturation(x)
        if self.target is not None:
            sat = sat * hue_weight(x, self.target, self.sharpness)
        if self.mode == "fraction":
            sat = torch.sigmoid((sat - self.threshold) / _FRACTION_SOFTNESS)
        return sat.mean(dim=(1, 2))
