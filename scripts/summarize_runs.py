"""Summarize ``diffalign train`` run directories as a Markdown table (for docs and closing notes).

    python scripts/summarize_runs.py runs/shapes-alignprop runs/shapes-ddpo [--curve]

Per run: method, steps, wall-clock of training (``metrics.jsonl`` elapsed, evaluations included),
held-out gold accuracy at step 0, at its best evaluation and at the end, and the proxy reward at step 0
and at the end. ``--curve`` adds one row per evaluation (gold vs wall-clock).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

GOLD = "gold/accuracy"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--curve", action="store_true", help="also print gold and proxy at every evaluation")
    args = p.parse_args(argv)
    print(
        "| run | method | steps | minutes (training loop) | gold start | gold best (step) | gold end | proxy start -> end |"
    )
    print("|---|---|---|---|---|---|---|---|")
    curves = []
    for run in args.runs:
        if not (run / "config.yaml").is_file():
            sys.exit(f"summarize_runs: {run} is not a run directory (no config.yaml); pass OUT of diffalign train")
        evals, metrics = rows(run / "eval.jsonl"), rows(run / "metrics.jsonl")
        if not evals:
            print(f"| {run.name} | (no evaluation yet) | | | | | | |")
            continue
        method = yaml.safe_load((run / "config.yaml").read_text())["train"]["method"]
        elapsed = {m["step"]: m["time"]["elapsed"] for m in metrics}
        key = GOLD if GOLD in evals[0] else "reward"  # runs on non-shapes prompts have no gold
        best = max(evals, key=lambda e: e.get(key, float("-inf")))
        first, last = evals[0], evals[-1]
        if key == GOLD:
            gold = f"{first[GOLD]:.3f} | {best[GOLD]:.3f} ({best['step']}) | {last[GOLD]:.3f}"
        else:
            gold = f"n/a | n/a (best reward at step {best['step']}) | n/a"
        print(
            f"| {run.name} | {method} | {last['step']} | {elapsed.get(last['step'], 0) / 60:.1f} | "
            f"{gold} | {first['reward']:.3f} -> {last['reward']:.3f} |"
        )
        curves += [(run.name, e, elapsed.get(e["step"], 0.0)) for e in evals]
    if args.curve:
        print("\n| run | step | minutes | gold accuracy | count / color / shape | proxy | diversity |")
        print("|---|---|---|---|---|---|---|")
        for name, e, sec in curves:
            parts = " / ".join(_num(e.get(f"gold/{k}_acc"), 2) for k in ("count", "color", "shape"))
            print(
                f"| {name} | {e['step']} | {sec / 60:.1f} | {_num(e.get(GOLD))} | {parts} | {_num(e.get('reward'))} | "
                f"{_num(e.get('diversity'))} |"
            )


def _num(value: float | None, digits: int = 3) -> str:
    """A figure with ``digits`` decimals, or n/a when the run did not record it."""
    return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
