"""Differentiable image preprocessing: resize (antialiased), center crop or pad, normalise.

The backbones' own preprocessors (open_clip's torchvision transform, transformers'
``CLIPImageProcessor`` / ``BitImageProcessor``) work on PIL images or detached tensors, so gradients
cannot flow through them. These functions do the same steps on a float tensor ``[B, 3, H, W]`` in
``[0, 1]``: the output sizes follow torchvision's rounding rules and the bicubic/bilinear resize uses
``antialias=True``, which follows PIL's filter when downsampling. The match to each backbone's
processor is measured in ``tests/test_rewards.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

# CLIP (OpenAI) normalisation, also used by BLIP / ImageReward, HPS and PickScore's processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet normalisation (DINOv2's BitImageProcessor).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Interpolation = Literal["bicubic", "bilinear", "nearest"]
ResizeMode = Literal["shortest", "longest", "squash"]

# PIL / transformers resample codes -> torch modes.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def interpolation_name(value: object) -> Interpolation:
    """Map a PIL/transformers resample code, a torchvision InterpolationMode or a name to a torch mode."""
    if isinstance(value, int) and value in _RESAMPLE:
        return _RESAMPLE[value]  # type: ignore[return-value]
    text = str(getattr(value, "value", value)).lower()
    for mode in ("bicubic", "bilinear", "nearest"):
        if mode in text:
            return mode  # type: ignore[return-value]
    raise ValueError(f"unsupported interpolation {value!r}; expected bicubic, bilinear or nearest")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: Interpolation = "bicubic") -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to ``size`` (h, w) with antialiasing; bicubic output is clamped to [0, 1]."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if interpolation == "nearest":
        return F.interpolate(images, size=size, mode="nearest-exact")
    out = F.interpolate(images, size=size, mode=interpolation, antialias=True, align_corners=False)
    # PIL and uint8 tensors clamp bicubic overshoot; keep the same range.
    return out.clamp(0.0, 1.0) if interpolation == "bicubic" else out


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """Output size of a shortest-edge resize, with torchvision's rule (long side truncated)."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(shortest * long / short)
    return (shortest, new_long) if height <= width else (new_long, shortest)


def center_crop_or_pad(
    images: torch.Tensor, size: tuple[int, int], fill: float = 0.0, offsets: Literal["round", "floor"] = "round"
) -> torch.Tensor:
    """Center-crop ``[B, C, H, W]`` to ``size``; pad with ``fill`` first where the image is smaller.

    ``offsets="round"`` places the crop as ``torchvision.transforms.functional.center_crop``
    (open_clip, BLIP/ImageReward, HPS); ``"floor"`` as transformers' image processors (CLIP, DINOv2).
    The two differ by one pixel when the margin is odd.
    """
    th, tw = size
    h, w = images.shape[-2:]
    if th > h or tw > w:
        pad = [(tw - w) // 2 if tw > w else 0, (tw - w + 1) // 2 if tw > w else 0]
        pad += [(th - h) // 2 if th > h else 0, (th - h + 1) // 2 if th > h else 0]
        images = F.pad(images, pad, value=fill)
        h, w = images.shape[-2:]
        if (h, w) == (th, tw):
            return images
    if offsets == "round":
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    else:
        top, left = (h - th) // 2, (w - tw) // 2
    return images[..., top : top + th, left : left + tw]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def preprocess(
    images: torch.Tensor,
    size: int | Sequence[int],
    crop: int | Sequence[int] | None,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: Interpolation = "bicubic",
    resize_mode: ResizeMode = "shortest",
    fill: float = 0.0,
) -> torch.Tensor:
    """Resize, center-crop (or pad) and normalise images in ``[0, 1]``, keeping the autograd graph.

    Args:
        images: ``[B, 3, H, W]`` float in ``[0, 1]``.
        size: for ``resize_mode="shortest"`` an int (or a square pair) is the target shortest edge
            (aspect kept, as torchvision ``Resize(int)``), a non-square pair is covered keeping the
            aspect (open_clip ``ResizeKeepRatio``); for ``"longest"`` the longest edge
            is fit into ``size`` (aspect kept, open_clip ``ResizeKeepRatio(longest=1)``, HPS's
            ``ResizeMaxSize``) and the rest padded with ``fill``; ``"squash"`` resizes to ``size`` exactly.
        crop: final ``(h, w)`` (or int) after center crop / pad; ``None`` skips cropping.
        mean, std: per-channel normalisation.
        interpolation: ``bicubic`` (CLIP, DINOv2, BLIP), ``bilinear`` or ``nearest``.
        fill: pad value in pixel space (0 = black, as open_clip and HPS pad).
    """
    h, w = images.shape[-2:]
    if resize_mode == "shortest":
        th, tw = _pair(size)
        if th == tw:
            target = shortest_edge_size(h, w, th)
        else:  # open_clip ResizeKeepRatio(longest=0): the smaller scale factor
            ratio = min(h / th, w / tw)
            target = (round(h / ratio), round(w / ratio))
    elif resize_mode == "longest":
        th, tw = _pair(size)
        ratio = max(h / th, w / tw)
        target = (round(h / ratio), round(w / ratio))
        crop = crop if crop is not None else (th, tw)
    elif resize_mode == "squash":
        target = _pair(size)
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; expected shortest, longest or squash")
    out = resize(images, target, interpolation)
    if crop is not None:
        out = center_crop_or_pad(out, _pair(crop), fill)
    return normalize(out, mean, std)
