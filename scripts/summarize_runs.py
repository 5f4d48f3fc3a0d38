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


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--curve", action="store_true", help="also print gold and proxy at every evaluation")
    args = p.parse_args()
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
        best = max(evals, key=lambda e: e["gold/accuracy"])
        first, last = evals[0], evals[-1]
        print(
            f"| {run.name} | {method} | {last['step']} | {elapsed.get(last['step'], 0) / 60:.1f} | "
            f"{first['gold/accuracy']:.3f} | {best['gold/accuracy']:.3f} ({best['step']}) | "
            f"{last['gold/accuracy']:.3f} | {first['reward']:.3f} -> {last['reward']:.3f} |"
        )
        curves += [(run.name, e, elapsed.get(e["step"], 0.0)) for e in evals]
    if args.curve:
        print("\n| run | step | minutes | gold accuracy | count / color / shape | proxy | diversity |")
        print("|---|---|---|---|---|---|---|")
        for name, e, sec in curves:
            print(
                f"| {name} | {e['step']} | {sec / 60:.1f} | {e['gold/accuracy']:.3f} | {e['gold/count_acc']:.2f} / "
                f"{e['gold/color_acc']:.2f} / {e['gold/shape_acc']:.2f} | {e['reward']:.3f} | {e['diversity']:.3f} |"
            )


if __name__ == "__main__":
    main()
