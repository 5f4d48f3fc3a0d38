"""Images to disk: numbered PNGs named by their captions, and image grids (training samples, evaluation before/after)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL RGB."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe form of ``text``: lower case, runs of other characters as ``-``, at most ``max_len``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len] or "prompt"


def image_name(index: int, caption: str | None = None) -> str:
    """The file name of image number ``index``: ``00012_<caption-slug>.png`` (or ``00012.png``)."""
    return f"{index:05d}" + (f"_{slug(caption)}" if caption else "") + ".png"


def save_images(images: torch.Tensor, out_dir: Path, captions: list[str] | None = None, start: int = 0) -> list[Path]:
    """Write ``images`` [B, 3, H, W] as :func:`image_name` files numbered from ``start``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out_dir / image_name(start + i, captions[i] if captions else None)
        to_pil(image).save(path)
        paths.append(path)
    return paths


def grid(images: torch.Tensor, ncol: int, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile [B, 3, H, W] images into one PIL image, ``ncol`` per row, white padding."""
    b, _, h, w = images.shape
    nrow = (b + ncol - 1) // ncol
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        canvas.paste(to_pil(image), (pad + c * (w + pad), pad + r * (h + pad)))
    if scale != 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    return canvas


def save_grid(images: torch.Tensor, path: Path, ncol: int = 8, scale: int = 2) -> Path:
    """Write :func:`grid` of ``images`` (``ncol`` per row, upscaled ``scale`` times) to ``path``; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, ncol, scale=scale).save(path)
    return path
