"""JPEG (in)compressibility: the file size of the image encoded as JPEG.

Black et al., "Training Diffusion Models with Reinforcement Learning" (DDPO, ICLR 2024), section 5.1:
the reward is minus (compressibility) or plus (incompressibility) the size in kB of the image
saved by PIL as JPEG at quality 95 (reference code kvablack/ddpo-pytorch ``ddpo_pytorch/rewards.py``).
"""

from __future__ import annotations

import io

import numpy as np
import torch

from diffalign.errors import DiffalignError
from reward_models.base import Reward
from reward_models.registry import register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image of ``[B, 3, H, W]`` in [0, 1] saved as JPEG."""
    from PIL import Image

    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for arr in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class _JpegSize(Reward):
    """Shared implementation; ``sign`` is -1 for compressibility, +1 for incompressibility."""

    sign = -1.0
    differentiable = False

    def __init__(self, quality: int = 95) -> None:
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise DiffalignError(f"{self.name}: quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegSize):
    """Minus the JPEG size in kB (DDPO, Black et al. 2023): smaller files score higher. Not differentiable.

    Options: ``quality`` (PIL JPEG quality, default 95 as in DDPO). The prompt is ignored. The range
    grows with the resolution (a 512x512 SD image is typically 10-100 kB).
    """

    sign = -1.0
    range = (-100.0, 0.0)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegSize):
    """The JPEG size in kB (DDPO, Black et al. 2023): larger files score higher. Not differentiable.

    Options: ``quality`` (PIL JPEG quality, default 95 as in DDPO). The prompt is ignored.
    """

    sign = 1.0
    range = (0.0, 100.0)
