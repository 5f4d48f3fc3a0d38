"""Batches of shapes-world images as tensors, for training the shipped assets and for tests."""

from __future__ import annotations

import numpy as np
import torch

from diffalign.shapes.splits import split_specs
from diffalign.shapes.world import IMAGE_SIZE, SceneSpec, render


def render_batch(specs: list[SceneSpec], seed: int, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render ``specs`` into a float tensor ``[B, 3, H, W]`` in [0, 1]; image ``i`` uses seed ``(seed, i)``."""
    images = [render(spec, np.random.default_rng([seed, i]), image_size)[0] for i, spec in enumerate(specs)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)


def random_specs(split: str, n: int, seed: int) -> list[SceneSpec]:
    """``n`` specs drawn uniformly with replacement from ``split`` (seeded)."""
    specs = split_specs(split)
    rng = np.random.default_rng(seed)
    return [specs[i] for i in rng.integers(0, len(specs), size=n)]
