"""Exact ("gold") verifier for the shapes world: which (color, shape) objects does an image show?

Method
------
1. **Color unmixing.** Every pixel ``p`` is explained as a blend of the background and one palette
   color ``c``: ``p = BACKGROUND + alpha * (c - BACKGROUND)``. For each color, ``alpha`` is the
   least-squares coverage (clipped to [0, 1]) and the *residual* is the distance of the pixel from
   that background-to-color line. A pixel's color is the line with the smallest residual. This is
   exact for the renderer's anti-aliased edges (a blue edge pixel lies on the blue line, not near
   purple) and degrades gracefully under blur, noise and JPEG.
2. **Objects.** The *core* mask of a color is the pixels of that color with ``alpha >= 0.5``
   (the mid-contrast contour) and residual below ``RESIDUAL_MAX``; holes are filled and 8-connected
   components (``scipy.ndimage.label``) smaller than ``MIN_AREA`` (scaled by (size/64)^2) are noise.
   A component whose median residual exceeds ``COMPONENT_RESIDUAL_MAX`` is off-palette (a gray
   blob reads pixel-wise as a faded green, an orange one as yellow) and is not an object.
3. **Shape** from two cues measured on the *soft* coverage (each component gets the ``alpha`` of
   the pixels within ``SOFT_RADIUS`` px of its core that are nearer to it than to any other core,
   ramped so that faint ringing and noise below ``SOFT_LO`` count for nothing):

   - triangle: the row-mass distribution is skewed (an upward-pointing triangle has most of its
     mass at the bottom: skewness -0.57 with y pointing down; circles and squares: 0). Blur and
     noise are symmetric, so they shrink the skew only a little.
   - square vs circle: the soft area divided by the soft extents (``sum over columns of the max
     coverage`` and the same over rows): square 1.0, circle pi/4 = 0.785. Soft area and soft
     extents are (nearly) conserved by blur, so small squares do not drift toward circle fill
     ratios the way a thresholded mask's fill ratio does (a naive fill ratio was measured at
     0.93 shape accuracy at 32x32 + blur 0.6; this cue gives 1.00 there).

   A component whose extents are far from square (aspect > ``MAX_ASPECT``) or whose fill fits no
   shape is reported as shape ``"other"`` and never matches a prompt.
4. **Leftover.** Non-background pixels (RGB distance of the 3x3-mean color > ``NONBG_DIST`` from
   the background, components under ``SPECK_AREA`` dropped) that are not within
   ``EXPLAIN_RADIUS`` px of an accepted object, as a fraction of all non-background pixels (0 for
   a blank image). ``verify`` requires it to be <= ``max_leftover`` (default 0.02), so junk
   strokes, off-palette blobs, too-small palette blobs and noise images are rejected even when the
   objects are right.

Limits
------
- Objects must not overlap or touch: two same-colored touching objects merge into one component
  (wrong count, shape ``"other"`` or a wrong shape); different colors touching are separated by
  color but their blend pixels are unexplained. Objects cut by the image border get wrong shapes.
- Colors are the five palette colors on the world's light background. A changed background
  (dark, tinted by more than ~60 RGB units, textured) or off-palette colors (gray, orange, pink,
  dark red, brown) make pixels unexplained: the verdict is then "not correct", not a wrong color.
  Faded palette colors (a half-transparent object, coverage < 0.5) are not objects either.
- Shapes are the world's axis-aligned ones. A rotated square (diamond), a downward triangle, an
  ellipse or an outline-only shape reads as ``"other"``.
- Tolerance: junk below ``max_leftover`` of the non-background pixels passes (a 2x2 px dot next
  to a 20 px object does); palette-colored blobs of >= ``MIN_AREA`` px (about 5x5 at 64x64) count
  as objects.
- Measured on generator images (``scripts/measure_verifier.py --stress``, 500 images a row): exact
  (1.000) clean and under blur radius <= 1.5, pixel noise <= 24/255, JPEG quality >= 30, 2x
  down-sampling (+ blur 0.6) and 2x up-sampling; 0.998 at blur 2.0, 0.98 at noise 32/255, 0.996 at
  JPEG 20, 0.93 at 16x16. It breaks down at blur radius 2.5 (0.74: triangles lose their skew),
  JPEG 10 (0.91) and JPEG 30 after down-sampling to 32x32 (0.76: 8x8 blocks as big as objects).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from diffalign.errors import DiffalignError
from diffalign.shapes.world import BACKGROUND, COLORS, IMAGE_SIZE, SceneSpec, parse_caption

# All pixel thresholds are for a 64x64 image; areas scale with (size / 64) ** 2, radii with size / 64.
CORE_ALPHA = 0.5  # coverage of the mid-contrast contour
RESIDUAL_MAX = 70.0  # max RGB distance from a background-to-color line for a pixel to be that color
COMPONENT_RESIDUAL_MAX = 45.0  # max median residual of an object's core pixels (off-palette blobs fail)
MIN_AREA = 24.0  # components with fewer core pixels are noise (smallest object: 14px triangle, 98px)
SOFT_RADIUS = 2.0  # soft edge pixels within this distance of a core belong to it
SOFT_LO = 0.15  # coverage ramp SOFT_LO..1-SOFT_LO -> 0..1: drops faint noise/ringing, symmetric so edges stay put
EXPLAIN_RADIUS = 3.0  # non-background pixels within this distance of an object are explained
NONBG_DIST = 60.0  # RGB distance from the background beyond which a pixel is "non-background"
SPECK_AREA = 3.0  # non-background components smaller than this are ignored (isolated noise)
TRIANGLE_SKEW = -0.3  # row-mass skewness below this: triangle
SQUARE_FILL = 0.87  # soft fill above this: square (1.0), below: circle (pi/4); measured worst cases
# under the perturbations of scripts/measure_verifier.py: circle 0.84, square 0.90 (yellow, JPEG q=30)
FILL_RANGE = {"triangle": (0.35, 0.85), "circle": (0.6, SQUARE_FILL), "square": (SQUARE_FILL, 1.2)}
MAX_ASPECT = 1.6

_BG = np.asarray(BACKGROUND, dtype=np.float64)
_NAMES = list(COLORS)
_DIRS = np.asarray([COLORS[c] for c in _NAMES], dtype=np.float64) - _BG  # (K, 3)
_DIRS_SQ = (_DIRS**2).sum(1)


@dataclass(frozen=True)
class Detection:
    """One detected object: color, shape, bounding box of its core mask (x1, y1 exclusive)."""

    color: str
    shape: str
    x0: int
    y0: int
    x1: int
    y1: int
    area: int  # core pixels
    fill: float  # area / bounding-box area (of the core mask)
    soft_fill: float = 0.0  # soft area / soft extents: the shape cue (square 1.0, circle 0.785, triangle 0.5)
    skew: float = 0.0  # skewness of the row-mass distribution (triangle -0.57, others 0)


@dataclass
class Verdict:
    """The verifier's judgement of one image against one prompt.

    ``score`` is the number of detections matched to expected objects (multiset intersection of
    (color, shape)) divided by ``max(len(expected), len(found))``; 0 if nothing was found. It is
    1.0 exactly when the detected objects equal the expected ones, whatever the leftover;
    ``correct`` additionally requires ``leftover <= max_leftover``.
    """

    correct: bool
    score: float
    count_ok: bool
    color_ok: bool
    shape_ok: bool
    expected: list[tuple[str, str]] = field(default_factory=list)
    found: list[tuple[str, str]] = field(default_factory=list)
    leftover: float = 0.0


def _to_array(image: Any) -> np.ndarray:
    """Convert a uint8/float HxWx3 array, a PIL image or a 3xHxW torch tensor to float64 HxWx3 in 0..255."""
    expect = "expected an HxWx3 uint8 array (0-255), a PIL image, or a 3xHxW float tensor in [0, 1]"
    if hasattr(image, "convert") and hasattr(image, "size") and not isinstance(image, np.ndarray):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    elif type(image).__module__.startswith("torch"):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise DiffalignError(f"image tensor has shape {tuple(t.shape)}; {expect}")
        if t.dtype.is_floating_point:
            arr = t.float().numpy().transpose(1, 2, 0).astype(np.float64)
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
            if not np.isfinite(arr).all() or lo < -1e-3 or hi > 1 + 1e-3:
                raise DiffalignError(f"image tensor values span [{lo:.3g}, {hi:.3g}]; {expect}")
            arr = np.clip(arr, 0.0, 1.0) * 255.0
        else:
            arr = t.numpy().transpose(1, 2, 0).astype(np.float64)
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise DiffalignError(f"integer image tensor values outside 0..255; {expect}")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise DiffalignError(f"image array has shape {image.shape}; {expect}")
        if image.dtype == np.uint8:
            arr = image.astype(np.float64)
        elif np.issubdtype(image.dtype, np.floating):
            lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
            if not np.isfinite(image).all() or lo < -1e-3 or hi > 1 + 1e-3:
                raise DiffalignError(f"float image array values span [{lo:.3g}, {hi:.3g}]; {expect}")
            arr = np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0
        else:
            raise DiffalignError(f"image array has dtype {image.dtype}; {expect}")
    else:
        raise DiffalignError(f"cannot read an image from {type(image).__name__}; {expect}")
    if arr.shape[0] < 16 or arr.shape[1] < 16:
        raise DiffalignError(f"image is {arr.shape[1]}x{arr.shape[0]} px; need at least 16x16 ({expect})")
    return arr


def _shape_of(soft_fill: float, skew: float, aspect: float) -> str:
    if aspect > MAX_ASPECT:
        return "other"
    shape = "triangle" if skew < TRIANGLE_SKEW else ("square" if soft_fill >= SQUARE_FILL else "circle")
    lo, hi = FILL_RANGE[shape]
    return shape if lo <= soft_fill < hi else "other"


def detect(image: Any) -> tuple[list[Detection], float]:
    """Detect the objects of ``image``; return them (sorted by position) and the leftover fraction.

    ``image``: HxWx3 uint8 array, PIL image or 3xHxW float tensor in [0, 1], any resolution
    (thresholds scale with the image size relative to 64 px). ``leftover`` is the fraction of
    non-background pixels not explained by an accepted detection (0 for a blank image).
    """
    img = _to_array(image)
    h, w, _ = img.shape
    scale = float(np.sqrt(h * w)) / IMAGE_SIZE
    p = img - _BG  # (H, W, 3)
    alpha = np.clip(p @ _DIRS.T / _DIRS_SQ, 0.0, 1.0)  # (H, W, K)
    resid = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * _DIRS, axis=-1)  # (H, W, K)
    label = resid.argmin(-1)
    best_resid = resid.min(-1)
    best_alpha = np.take_along_axis(alpha, label[..., None], -1)[..., 0]
    colored = (best_alpha >= CORE_ALPHA) & (best_resid <= RESIDUAL_MAX)

    min_area = max(4.0, MIN_AREA * scale * scale)
    comps = np.zeros((h, w), dtype=np.int32)
    comp_color: list[int] = []
    for k in range(len(_NAMES)):
        mask = ndimage.binary_fill_holes(colored & (label == k))
        lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        sizes = ndimage.sum_labels(mask, lab, index=idx)
        # Off-palette blobs (gray, orange) come close to some color line pixel by pixel; their
        # median residual does not.
        med_resid = np.asarray(ndimage.median(resid[:, :, k], lab, index=idx))
        for i in np.flatnonzero((sizes >= min_area) & (med_resid <= COMPONENT_RESIDUAL_MAX)):
            # a filled hole may cover an object of another color found earlier: keep what is left
            free = (lab == i + 1) & (comps == 0)
            if free.sum() < min_area:
                continue
            comp_color.append(k)
            comps[free] = len(comp_color)

    detections: list[Detection] = []
    if comp_color:
        dist, (iy, ix) = ndimage.distance_transform_edt(comps == 0, return_indices=True)
        owner = np.where(dist <= max(1.0, SOFT_RADIUS * scale), comps[iy, ix], 0)
        for j, k in enumerate(comp_color, start=1):
            ys, xs = np.nonzero(comps == j)
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            wgt = np.where(owner == j, alpha[:, :, k], 0.0)
            wgt = np.clip((wgt - SOFT_LO) / (1.0 - 2.0 * SOFT_LO), 0.0, 1.0)
            area_soft = float(wgt.sum())
            width = float(wgt.max(0).sum())
            height = float(wgt.max(1).sum())
            rows = wgt.sum(1)
            yy = np.arange(h, dtype=np.float64)
            area_soft = max(area_soft, 1e-9)
            mu = float((rows * yy).sum() / area_soft)
            var = float((rows * (yy - mu) ** 2).sum() / area_soft)
            skew = float((rows * (yy - mu) ** 3).sum() / area_soft / max(var, 1e-9) ** 1.5)
            soft_fill = area_soft / max(width * height, 1e-9)
            aspect = max(width, height) / max(min(width, height), 1e-9)
            area = len(ys)
            detections.append(
                Detection(
                    color=_NAMES[k],
                    shape=_shape_of(soft_fill, skew, aspect),
                    x0=x0,
                    y0=y0,
                    x1=x1,
                    y1=y1,
                    area=area,
                    fill=area / float((x1 - x0) * (y1 - y0)),
                    soft_fill=soft_fill,
                    skew=skew,
                )
            )
        explained = dist <= EXPLAIN_RADIUS * scale + 1.0  # +1: the 3x3 mean below widens halos by a pixel
    else:
        explained = np.zeros((h, w), dtype=bool)

    # A 3x3 mean before thresholding: pixel noise averages out, strokes and blobs do not.
    nonbg = np.linalg.norm(ndimage.uniform_filter(p, size=(3, 3, 1), mode="nearest"), axis=-1) > NONBG_DIST
    lab, n = ndimage.label(nonbg, structure=np.ones((3, 3), dtype=bool))
    if n:
        sizes = ndimage.sum_labels(nonbg, lab, index=np.arange(1, n + 1))
        keep = np.concatenate([[False], sizes >= max(2.0, SPECK_AREA * scale * scale)])
        nonbg = keep[lab]
    total = int(nonbg.sum())
    leftover = float((nonbg & ~explained).sum()) / total if total else 0.0
    detections.sort(key=lambda d: (d.y0, d.x0))
    return detections, leftover


def _spec(prompt_or_spec: str | SceneSpec) -> SceneSpec:
    if isinstance(prompt_or_spec, SceneSpec):
        return prompt_or_spec
    if isinstance(prompt_or_spec, str):
        return parse_caption(prompt_or_spec)
    raise DiffalignError(f"expected a caption string or a SceneSpec, got {type(prompt_or_spec).__name__}")


def verify(image: Any, prompt_or_spec: str | SceneSpec, max_leftover: float = 0.02) -> Verdict:
    """Judge ``image`` against a caption (parsed with ``parse_caption``) or a ``SceneSpec``.

    ``correct`` is 1 when the multiset of detected (color, shape) equals the expected one and the
    leftover (unexplained non-background pixels) is at most ``max_leftover``. The per-attribute
    flags compare the object count, the multiset of colors and the multiset of shapes separately.
    """
    spec = _spec(prompt_or_spec)
    detections, leftover = detect(image)
    expected = sorted(spec.objects())
    found = sorted((d.color, d.shape) for d in detections)
    exp_c, found_c = Counter(expected), Counter(found)
    matched = sum((exp_c & found_c).values())
    score = matched / max(len(expected), len(found)) if found else 0.0
    return Verdict(
        correct=exp_c == found_c and leftover <= max_leftover,
        score=float(score),
        count_ok=len(found) == len(expected),
        color_ok=Counter(c for c, _ in expected) == Counter(c for c, _ in found),
        shape_ok=Counter(s for _, s in expected) == Counter(s for _, s in found),
        expected=expected,
        found=found,
        leftover=leftover,
    )


def verify_batch(images: Any, prompts: Sequence[str | SceneSpec], max_leftover: float = 0.02) -> list[Verdict]:
    """``verify`` for each (image, prompt) pair.

    ``images``: a sequence of images (anything ``detect`` takes), a uint8 Bx HxWx3 array or a
    Bx3xHxW float torch tensor in [0, 1].
    """
    if type(images).__module__.split(".")[0] == "torch":
        import torch  # lazy: only reached when torch already made the images

        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise DiffalignError(
                    f"image batch tensor has shape {tuple(images.shape)}; expected Bx3xHxW float in [0, 1]"
                )
            images = list(images.detach().cpu())
    elif isinstance(images, np.ndarray) and images.ndim != 4:
        raise DiffalignError(f"image batch array has shape {images.shape}; expected BxHxWx3 uint8")
    if len(images) != len(prompts):
        raise DiffalignError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    return [verify(img, pr, max_leftover) for img, pr in zip(images, prompts, strict=True)]


def gold_accuracy(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Aggregate verdicts: exact accuracy, mean score, per-attribute accuracies, found-any rate."""
    if not verdicts:
        raise DiffalignError("gold_accuracy needs at least one verdict")
    n = float(len(verdicts))
    return {
        "accuracy": sum(v.correct for v in verdicts) / n,
        "score": sum(v.score for v in verdicts) / n,
        "count_acc": sum(v.count_ok for v in verdicts) / n,
        "color_acc": sum(v.color_ok for v in verdicts) / n,
        "shape_acc": sum(v.shape_ok for v in verdicts) / n,
        "found_any": sum(bool(v.found) for v in verdicts) / n,
    }
