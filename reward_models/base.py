"""The reward protocol shared by every model in the zoo.

A reward maps a batch of images (``float`` tensor ``[B, 3, H, W]`` in ``[0, 1]``) and one prompt per
image to a ``float32`` tensor ``[B]``. It declares whether gradients flow from the score back to the
pixels (``differentiable``): reward-backprop methods (AlignProp, DRaFT, ReFL, ReNO) need that,
policy-gradient methods (DDPO, GRPO, ...) do not.

Every reward checks its inputs the same way (:func:`check_inputs`) so that a caller who passes
``[-1, 1]`` images, ``uint8`` pixels, channels-last tensors or the wrong number of prompts gets one
clear line instead of a silently wrong score.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    from reward_models.registry import RewardSpec

# Values may overshoot [0, 1] by this much (e.g. a VAE decode before clamping, bicubic ringing).
RANGE_TOLERANCE = 1e-3


def check_inputs(images: object, prompts: object, name: str = "reward") -> list[str]:
    """Validate a reward call; return the prompts as a list.

    Raises :class:`DiffalignError` (one line) for: a non-tensor, a tensor that is not ``[B, 3, H, W]``,
    an integer tensor, non-finite values, values outside ``[0, 1]`` (naming the likely range the
    caller used: ``[-1, 1]`` or ``0..255``), an empty batch, a single string instead of a list of
    prompts, or a prompt count different from the batch size.
    """
    where = f"reward '{name}'"
    if not isinstance(images, torch.Tensor):
        raise DiffalignError(
            f"{where}: images must be a float tensor [B, 3, H, W] with values in [0, 1], got {type(images).__name__}"
        )
    shape = tuple(images.shape)
    if images.ndim != 4 or images.shape[1] != 3:
        hint = ""
        if images.ndim == 4 and images.shape[-1] == 3:
            hint = " (this looks channels-last: use images.permute(0, 3, 1, 2))"
        elif images.ndim == 3 and images.shape[0] == 3:
            hint = " (a single image: use images.unsqueeze(0))"
        raise DiffalignError(f"{where}: images have shape {shape}; expected [B, 3, H, W]{hint}")
    if images.shape[0] == 0:
        raise DiffalignError(f"{where}: got an empty batch of images")
    if not images.dtype.is_floating_point:
        raise DiffalignError(
            f"{where}: images have dtype {images.dtype}; expected float values in [0, 1] "
            "(for 0-255 pixels use images.float() / 255)"
        )
    with torch.no_grad():
        flat = images.detach()
        if not bool(torch.isfinite(flat).all()):
            raise DiffalignError(f"{where}: images contain NaN or infinite values")
        lo, hi = (float(v) for v in torch.aminmax(flat.float()))
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        if hi > 1.5:
            hint = "; this looks like 0-255 pixels: divide by 255"
        elif lo < -RANGE_TOLERANCE:
            hint = "; this looks like [-1, 1] (diffusers decoder output): map with (images + 1) / 2 and clamp"
        else:
            hint = "; clamp to [0, 1]"
        raise DiffalignError(f"{where}: image values span [{lo:.3g}, {hi:.3g}]; expected [0, 1]{hint}")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise DiffalignError(f"{where}: prompts must be a list of strings, one per image, got {type(prompts).__name__}")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise DiffalignError(
            f"{where}: got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image"
        )
    if not all(isinstance(p, str) for p in prompts):
        bad = next(p for p in prompts if not isinstance(p, str))
        raise DiffalignError(f"{where}: prompts must be strings, got a {type(bad).__name__}")
    return prompts


class Reward(torch.nn.Module, metaclass=abc.ABCMeta):
    """Base class of every reward: ``reward(images, prompts) -> Tensor[B]`` (float32).

    Subclasses set the class attributes and implement :meth:`score`; :meth:`forward` validates the
    inputs, moves the images to the reward's device, runs ``score`` (under ``no_grad`` when the
    reward is not differentiable) and checks the output.

    Attributes:
        name: the registry name (``clip_score``, ``aesthetic``, ...).
        differentiable: whether ``d score / d images`` is meaningful; only then does ``forward``
            build a graph back to the pixels.
        range: the typical range of the score, for documentation and normalisation (not a clamp).
        spec: the :class:`~reward_models.registry.RewardSpec` it was built from (``get_reward`` sets it).
        standalone: whether it scores on its own (``diffalign score``, galleries); ``adversarial`` does not.

    A reward has no training mode: ``train()`` keeps every sub-module in eval mode (dropout off), and
    backbones are frozen (``requires_grad=False``) so gradients reach only the images.
    """

    name: str = "reward"
    differentiable: bool = False
    range: tuple[float, float] = (0.0, 1.0)
    spec: RewardSpec | None = None  # set by get_reward: the parsed spec (its weight is for combining)
    standalone: bool = True  # false: scores only inside the training run that binds it (``adversarial``)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` against ``prompts`` (one per image); return ``[B]``."""
        prompt_list = check_inputs(images, prompts, self.name)
        device = self.device
        if device is not None and images.device != device:
            images = images.to(device)
        if self.differentiable:
            out = self.score(images, prompt_list)
        else:
            with torch.no_grad():
                out = self.score(images, prompt_list).detach()
        if out.shape != (images.shape[0],):
            raise RuntimeError(f"reward '{self.name}' returned shape {tuple(out.shape)}, expected ({images.shape[0]},)")
        return out.float()

    @abc.abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Compute the scores of validated inputs (images on the reward's device); return ``[B]``."""

    @property
    def device(self) -> torch.device | None:
        """Device of the reward's weights, or ``None`` for a reward without weights."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return None

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the reward's weights (images are cast to it), float32 without weights."""
        for t in self.parameters():
            if t.dtype.is_floating_point:
                return t.dtype
        return torch.float32

    def train(self, mode: bool = True) -> Reward:
        """Rewards stay in eval mode: dropout and similar layers are always off."""
        return super().train(False)

    def freeze(self) -> Reward:
        """Put the reward in eval mode with all weights frozen; gradients then reach only the inputs."""
        self.requires_grad_(False)
        return super().train(False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}, range={self.range}"
