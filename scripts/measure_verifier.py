"""Measure the shapes gold verifier on perturbed generator images and print an accuracy table.

Usage: ``python scripts/measure_verifier.py [--n 500] [--seed 0]``. Half the images use 'train'
prompts, half 'heldout' prompts (``sample_prompts``); each image is rendered with its own seeded
rng, perturbed, and verified against its own prompt. Rows "noise-image" (uniform random pixels)
and "blank" (all background) are verified against the same prompts and should score ~0.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from diffalign.shapes.splits import sample_prompts
from diffalign.shapes.verifier import gold_accuracy, verify_batch
from diffalign.shapes.world import BACKGROUND, parse_caption, render

Perturb = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _blur(radius: float) -> Perturb:
    return lambda img, rng: np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def _noise(std: float) -> Perturb:
    def f(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.clip(img + rng.normal(0.0, std, img.shape), 0, 255).round().astype(np.uint8)

    return f


def _jpeg(quality: int) -> Perturb:
    def f(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))

    return f


def _resize(size: int, then: Perturb | None = None) -> Perturb:
    def f(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BOX))
        return then(out, rng) if then else out

    return f


PERTURBATIONS: dict[str, Perturb] = {
    "clean": lambda img, rng: img,
    "blur r=0.6": _blur(0.6),
    "blur r=1.0": _blur(1.0),
    "noise 8/255": _noise(8.0),
    "noise 16/255": _noise(16.0),
    "jpeg q=30": _jpeg(30),
    "jpeg q=60": _jpeg(60),
    "down 32px": _resize(32),
    "down 32px + blur 0.6": _resize(32, _blur(0.6)),
    "up 128px bicubic": lambda img, rng: np.asarray(Image.fromarray(img).resize((128, 128), Image.Resampling.BICUBIC)),
    "noise-image": lambda img, rng: rng.integers(0, 256, img.shape, dtype=np.uint8),
    "blank": lambda img, rng: np.broadcast_to(np.asarray(BACKGROUND, np.uint8), img.shape).copy(),
}
# Beyond the tested envelope (``--stress``): where the verifier starts to fail.
STRESS: dict[str, Perturb] = {
    "blur r=1.5": _blur(1.5),
    "blur r=2.0": _blur(2.0),
    "blur r=2.5": _blur(2.5),
    "noise 24/255": _noise(24.0),
    "noise 32/255": _noise(32.0),
    "jpeg q=20": _jpeg(20),
    "jpeg q=10": _jpeg(10),
    "down 24px": _resize(24),
    "down 16px": _resize(16),
    "down 32px + blur 1.0": _resize(32, _blur(1.0)),
    "down 32px + noise 16": _resize(32, _noise(16.0)),
    "down 32px + jpeg q=30": _resize(32, _jpeg(30)),
}


def eval_set(n: int, seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    """``n`` prompts (half train, half heldout) and their clean renders, seeded."""
    prompts = sample_prompts("train", n - n // 2, seed=seed) + sample_prompts("heldout", n // 2, seed=seed)
    images = [render(parse_caption(p), np.random.default_rng([seed, i]))[0] for i, p in enumerate(prompts)]
    return prompts, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="images per perturbation (default 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stress", action="store_true", help="also run harsher perturbations, beyond the tested envelope")
    args = ap.parse_args()
    prompts, images = eval_set(args.n, args.seed)
    cols = ["accuracy", "score", "count_acc", "color_acc", "shape_acc", "found_any"]
    print(f"shapes gold verifier, n={args.n} images per row (train+heldout prompts), seed={args.seed}")
    print(f"| {'perturbation':<22} | " + " | ".join(f"{c:>9}" for c in cols) + " |")
    print(f"|{'-' * 24}|" + "|".join("-" * 11 for _ in cols) + "|")
    t0 = time.perf_counter()
    rows = PERTURBATIONS | (STRESS if args.stress else {})
    for name, fn in rows.items():
        rng = np.random.default_rng([args.seed, 12345])
        acc = gold_accuracy(verify_batch([fn(img, rng) for img in images], prompts))
        print(f"| {name:<22} | " + " | ".join(f"{acc[c]:>9.3f}" for c in cols) + " |", flush=True)
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
