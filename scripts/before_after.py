"""Side-by-side before/after figure from a training run's evaluation grids.

    python scripts/before_after.py runs/shapes-alignprop --rows 4 --out docs/images/alignprop_shapes_before_after.png

Reads ``samples/eval_step_0.png`` and the last ``samples/eval_step_N.png`` of the run (the same held-out
prompts in rows and seeds in columns, captioned), keeps the first ``--rows`` rows of each (located with
``eval_step_N.json``) and writes them next to each other with a caption above each half.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

CAPTION = 24  # pixels above each grid for its caption
GAP = 48  # pixels between the two grids


def eval_grids(run: Path) -> tuple[Path, Path, int]:
    """The step-0 grid, the last grid and its step; one-line SystemExit when the run has none."""
    steps = {}
    for f in (run / "samples").glob("eval_step_*.png"):
        m = re.fullmatch(r"eval_step_(\d+)\.png", f.name)
        if m:
            steps[int(m.group(1))] = f
    if 0 not in steps or len(steps) < 2:
        raise SystemExit(
            f"before_after: {run}/samples has no eval_step_0.png and later evaluation grid; "
            "run `diffalign train` with eval.every > 0 first"
        )
    last = max(steps)
    return steps[0], steps[last], last


def top_rows(grid: Image.Image, rows: int, ncol: int, layout: dict | None = None) -> Image.Image:
    """The first ``rows`` of an evaluation grid: with its layout (``eval_step_N.json``, written with the
    captioned grids) its title, seed labels and prompt column stay; without one (runs written before
    captions), a grid of bare square tiles, ``ncol`` to a row."""
    if layout and layout.get("rows"):
        bottom = layout["rows"][min(rows, len(layout["rows"])) - 1][1]
        return grid.crop((0, 0, grid.width, min(bottom, grid.height)))
    total_rows = max(1, round(grid.height * ncol / grid.width))
    height = round(grid.height * min(rows, total_rows) / total_rows)
    return grid.crop((0, 0, grid.width, height))


def layout_of(grid: Path) -> dict | None:
    """The grid's layout JSON (``eval_step_N.json`` beside ``eval_step_N.png``), or None."""
    path = grid.with_suffix(".json")
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def run_config(run: Path) -> tuple[int, str]:
    """Columns of the run's eval grids (one per ``eval.seeds`` entry) and its ``train.method``, from config.yaml."""
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        return len(cfg["eval"]["seeds"]), str(cfg["train"]["method"])
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise SystemExit(
            f"before_after: cannot read eval.seeds and train.method from {run}/config.yaml ({err}); "
            "pass a run directory"
        ) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a diffalign train output directory")
    p.add_argument("--rows", type=int, default=4, help="prompt rows to keep (default 4)")
    p.add_argument("--label", help="caption of the right half (default: '<train.method> LoRA' of the run)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    before_path, after_path, step = eval_grids(args.run)
    ncol, method = run_config(args.run)
    label = args.label or f"{method} LoRA"
    before = top_rows(Image.open(before_path).convert("RGB"), args.rows, ncol, layout_of(before_path))
    after = top_rows(Image.open(after_path).convert("RGB"), args.rows, ncol, layout_of(after_path))
    canvas = Image.new("RGB", (before.width + GAP + after.width, CAPTION + max(before.height, after.height)), "white")
    canvas.paste(before, (0, CAPTION))
    canvas.paste(after, (before.width + GAP, CAPTION))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), "base (step 0)", fill="black")
    draw.text((before.width + GAP + 4, 6), f"{label} (step {step})", fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out} ({before_path.name} | {after_path.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
