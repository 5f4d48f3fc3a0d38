"""Mean brightness of an image: the benchmarks' simple differentiable reward (benchmarks/bench_trl.py).

The same score on both sides of the TRL comparison, so neither pays for a reward model:

- diffalign loads it as a plug-in, ``reward.rewards=[benchmarks.brightness_reward:Brightness]`` (run from the
  repository root, or with it on ``PYTHONPATH``);
- TRL gets :func:`trl_reward_fn`, the ``reward_function(images, prompts, metadata) -> (rewards, info)`` its
  DDPO and AlignProp trainers call, through :func:`brightness` (no diffalign import, so TRL's venv can load
  this file on its own).

Images are ``[B, 3, H, W]`` in ``[0, 1]`` (TRL's ``output_type="pt"`` and diffalign's decode both give that);
the score is the mean over pixels and channels, in ``[0, 1]``.
"""

from __future__ import annotations

import torch


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean of ``[B, 3, H, W]`` images over channels and pixels -> ``[B]`` (differentiable)."""
    return images.float().mean(dim=(1, 2, 3))


def trl_reward_fn(images: torch.Tensor, prompts, metadata) -> tuple[torch.Tensor, dict]:
    """TRL's reward-function protocol (``DDPOTrainer`` and ``AlignPropTrainer``): scores and an info dict."""
    return brightness(images), {}


try:  # the diffalign plug-in; absent in TRL's venv, which needs only the functions above
    from reward_models.base import Reward
except ImportError:  # pragma: no cover - TRL's venv
    Reward = None

if Reward is not None:

    class Brightness(Reward):
        """``benchmarks.brightness_reward:Brightness``: mean pixel brightness, differentiable, range [0, 1]."""

        name = "brightness"
        differentiable = True
        range = (0.0, 1.0)

        def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return brightness(images)
