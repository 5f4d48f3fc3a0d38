"""The shapes world: scene specs, English captions and a deterministic renderer.

A scene is a small multiset of flat objects, each a (color, shape) pair, drawn on a light
background. ``SceneSpec`` is the structured form, ``caption`` / ``parse_caption`` convert to and
from English ("two red circles", "a blue square and a yellow triangle"), and ``render`` draws a
scene with a seeded ``numpy.random.Generator`` so that the same seed always gives the same pixels.

World version 1 (``WORLD_VERSION``): 64x64 RGB, 5 colors, 3 shapes, 1-2 objects (the renderer and
captions support up to 3; the shipped splits use at most 2 so that a CPU-trained model learns it).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from diffalign.errors import DiffalignError

WORLD_VERSION = 1
IMAGE_SIZE = 64
BACKGROUND = (240, 240, 236)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 20),
    "purple": (145, 55, 175),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
WORD_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
MAX_OBJECTS = 3
# Object sizes (bounding-box side, pixels at 64x64) and the minimum gap between bounding boxes.
MIN_SIZE, MAX_SIZE, MIN_GAP = 14, 22, 3
_SUPERSAMPLE = 4


@dataclass(frozen=True, order=True)
class Group:
    """``count`` objects of one ``color`` and ``shape``."""

    count: int
    color: str
    shape: str

    def phrase(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{NUMBER_WORDS[self.count]} {self.color} {noun}"


@dataclass(frozen=True)
class SceneSpec:
    """A scene as a canonical tuple of groups (sorted by color then shape order)."""

    groups: tuple[Group, ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise DiffalignError("a shapes scene needs at least one object")
        for g in self.groups:
            if g.color not in COLORS:
                raise DiffalignError(f"unknown color {g.color!r}; the shapes world has {', '.join(COLORS)}")
            if g.shape not in SHAPES:
                raise DiffalignError(f"unknown shape {g.shape!r}; the shapes world has {', '.join(SHAPES)}")
            if g.count < 1:
                raise DiffalignError(f"object count must be >= 1, got {g.count}")
        if self.num_objects > MAX_OBJECTS:
            raise DiffalignError(f"a shapes scene has at most {MAX_OBJECTS} objects, got {self.num_objects}")
        keys = [(g.color, g.shape) for g in self.groups]
        if len(set(keys)) != len(keys):
            raise DiffalignError("a shapes scene lists the same color and shape twice; merge them into one count")

    @classmethod
    def from_objects(cls, objects: list[tuple[str, str]]) -> SceneSpec:
        """Build the canonical spec from a list of (color, shape) objects."""
        counts = Counter(objects)
        order = {c: i for i, c in enumerate(COLORS)}
        sorder = {s: i for i, s in enumerate(SHAPES)}
        keys = sorted(counts, key=lambda k: (order.get(k[0], 99), sorder.get(k[1], 99), k))
        return cls(tuple(Group(counts[k], k[0], k[1]) for k in keys))

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def objects(self) -> list[tuple[str, str]]:
        """The flat list of (color, shape), one entry per object."""
        return [(g.color, g.shape) for g in self.groups for _ in range(g.count)]

    def caption(self) -> str:
        phrases = [g.phrase() for g in self.groups]
        if len(phrases) == 1:
            return phrases[0]
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_PHRASE = re.compile(r"^(a|an|one|two|three)\s+([a-z]+)\s+([a-z]+?)s?$")


def parse_caption(text: str) -> SceneSpec:
    """Parse a caption written by :meth:`SceneSpec.caption` (any group order) back into a spec."""
    cleaned = text.strip().lower().rstrip(".")
    parts = [p.strip() for p in re.split(r",\s*|\s+and\s+", cleaned) if p.strip()]
    if not parts:
        raise DiffalignError(f"cannot parse shapes caption {text!r}: it is empty")
    objects: list[tuple[str, str]] = []
    for part in parts:
        m = _PHRASE.match(part)
        if not m or m.group(2) not in COLORS or m.group(3) not in SHAPES:
            raise DiffalignError(
                f"cannot parse shapes caption {text!r} at {part!r}; expected phrases like "
                f"'two red circles' with colors {'/'.join(COLORS)} and shapes {'/'.join(SHAPES)}"
            )
        objects += [(m.group(2), m.group(3))] * WORD_NUMBERS[m.group(1)]
    return SceneSpec.from_objects(objects)


@dataclass(frozen=True)
class Placement:
    """Where one object was drawn: its color, shape and bounding box (x0, y0, size) in pixels."""

    color: str
    shape: str
    x0: int
    y0: int
    size: int


def _place(n: int, rng: np.random.Generator, image_size: int) -> list[tuple[int, int, int]]:
    """Non-overlapping boxes (x0, y0, size) with at least MIN_GAP pixels between them."""
    for _ in range(1000):
        boxes: list[tuple[int, int, int]] = []
        for _ in range(n):
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            for _ in range(100):
                x0 = int(rng.integers(2, image_size - size - 1))
                y0 = int(rng.integers(2, image_size - size - 1))
                if all(
                    x0 + size + MIN_GAP <= bx
                    or bx + bs + MIN_GAP <= x0
                    or y0 + size + MIN_GAP <= by
                    or by + bs + MIN_GAP <= y0
                    for bx, by, bs in boxes
                ):
                    boxes.append((x0, y0, size))
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
    raise DiffalignError(f"could not place {n} objects in a {image_size}px image")  # pragma: no cover


def render(
    spec: SceneSpec, rng: np.random.Generator, image_size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[Placement]]:
    """Draw ``spec`` as an ``image_size`` square uint8 RGB array; anti-aliased by supersampling.

    Object order, sizes and positions come from ``rng`` only, so a seed fixes the image.
    """
    objects = spec.objects()
    order = rng.permutation(len(objects))
    boxes = _place(len(objects), rng, image_size)
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * s, image_size * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    placements = []
    for idx, (x0, y0, size) in zip(order, boxes, strict=True):
        color, shape = objects[int(idx)]
        fill = COLORS[color]
        box = (x0 * s, y0 * s, (x0 + size) * s - 1, (y0 + size) * s - 1)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
        placements.append(Placement(color, shape, x0, y0, size))
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8).copy(), placements
