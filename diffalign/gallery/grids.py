"""Images to disk: numbered PNGs named by their captions, and captioned image grids.

Every grid diffalign writes (training samples, evaluation grids, ``diffalign sample``'s grid,
ReNO strips, before/after figures) says what it shows: a title line, the prompt of each row (or
of each image) and a label over each column (the seed). :func:`captioned_grid` also returns where
each row lies in the picture, so a script can crop rows without guessing the layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 11
LINE = 13  # pixels per text line
ROW_LABEL_WIDTH = 150  # pixels of the prompt column left of the rows
CAPTION_LINES = 2  # text lines under each image of a grid with per-image captions


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


@lru_cache(maxsize=1)
def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at :data:`FONT_SIZE` (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def wrap(text: str, width: int, lines: int) -> list[str]:
    """``text`` broken into at most ``lines`` lines of at most ``width`` pixels (the last one ends in … when cut)."""
    f = font()
    out: list[str] = []
    words = text.split()
    current = ""
    while words:
        candidate = f"{current} {words[0]}".strip()
        if f.getlength(candidate) <= width or not current:
            current = candidate
            words.pop(0)
            while f.getlength(current) > width and len(current) > 1:  # one word longer than the line
                current = current[:-1]
            continue
        out.append(current)
        current = ""
        if len(out) == lines:
            break
    if current and len(out) < lines:
        out.append(current)
    if words or (out and "".join(out).replace(" ", "") != text.replace(" ", "")):
        last = out[-1] if out else ""
        while last and f.getlength(last + "…") > width:
            last = last[:-1]
        out[-1:] = [last + "…"]
    return out[:lines]


@dataclass
class GridLayout:
    """Where things lie in a captioned grid (pixels): the header band (title, column labels) and each row."""

    header: int  # height of the band above the first row
    rows: list[tuple[int, int]] = field(default_factory=list)  # (top, bottom) of each row, captions included
    size: tuple[int, int] = (0, 0)  # (width, height) of the whole picture

    def to_json(self) -> dict:
        return {"header": self.header, "rows": [list(r) for r in self.rows], "size": list(self.size)}


def captioned_grid(
    images: torch.Tensor,
    ncol: int,
    *,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
    pad: int = 2,
    scale: int = 1,
) -> tuple[Image.Image, GridLayout]:
    """Tile [B, 3, H, W] images ``ncol`` per row (upscaled ``scale`` times, nearest) on white, with text.

    ``title``: one line above everything; ``col_labels``: one line above each column (e.g. seeds);
    ``row_labels``: up to as many lines as a row is high, left of each row (e.g. the prompt);
    ``captions``: up to :data:`CAPTION_LINES` lines under each image (e.g. prompt and reward). Text that does
    not fit ends in "…". Returns the picture and its :class:`GridLayout`.
    """
    b, _, h, w = images.shape
    th, tw = h * scale, w * scale
    nrow = (b + ncol - 1) // ncol
    left = ROW_LABEL_WIDTH + pad if row_labels is not None else 0
    header = (LINE + 4 if title else 0) + (LINE + 2 if col_labels is not None else 0)
    wrapped = [wrap(c, tw, CAPTION_LINES) for c in captions] if captions is not None else []
    below = max((len(w) for w in wrapped), default=0) * LINE + 2 if captions is not None else 0
    row_h = th + below + pad
    width = left + ncol * (tw + pad) + pad
    if title:
        width = max(width, int(font().getlength(title)) + 8)
    height = header + nrow * row_h + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    f = font()
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=f)
    if col_labels is not None:
        y = LINE + 4 if title else 0
        for c, label in enumerate(list(col_labels)[:ncol]):
            x = left + pad + c * (tw + pad)
            draw.text((x + 1, y), (wrap(label, tw, 1) or [""])[0], fill=(60, 60, 60), font=f)
    layout = GridLayout(header=header, size=(width, height))
    for r in range(nrow):
        top = header + r * row_h
        layout.rows.append((top, top + row_h + (pad if r == nrow - 1 else 0)))
        if row_labels is not None and r < len(row_labels):
            for k, line in enumerate(wrap(row_labels[r], ROW_LABEL_WIDTH - 4, max(1, th // LINE))):
                draw.text((4, top + pad + k * LINE), line, fill=(0, 0, 0), font=f)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        x, y = left + pad + c * (tw + pad), header + pad + r * row_h
        tile = to_pil(image)
        if scale != 1:
            tile = tile.resize((tw, th), Image.Resampling.NEAREST)
        canvas.paste(tile, (x, y))
        if i < len(wrapped):
            for k, line in enumerate(wrapped[i]):
                draw.text((x, y + th + 1 + k * LINE), line, fill=(0, 0, 0), font=f)
    return canvas, layout


def grid(images: torch.Tensor, ncol: int, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile [B, 3, H, W] images into one PIL image, ``ncol`` per row, white padding, no text."""
    return captioned_grid(images, ncol, pad=pad, scale=scale)[0]


def save_grid(
    images: torch.Tensor,
    path: Path,
    ncol: int = 8,
    scale: int = 2,
    *,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
    layout_json: bool = False,
) -> Path:
    """Write :func:`captioned_grid` of ``images`` (``ncol`` per row, upscaled ``scale`` times) to ``path``.

    With ``layout_json``, also ``path`` with suffix ``.json``: the :class:`GridLayout` (``rows``,
    ``header``, ``size``) plus the title and labels, so rows can be cropped without guessing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture, layout = captioned_grid(
        images, ncol, title=title, row_labels=row_labels, col_labels=col_labels, captions=captions, scale=scale
    )
    picture.save(path)
    if layout_json:
        info = layout.to_json() | {"title": title, "row_labels": list(row_labels or []), "col_labels": col_labels}
        path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return path
