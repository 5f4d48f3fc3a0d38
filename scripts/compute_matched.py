"""Compute-matched comparison of training runs: held-out gold accuracy against training CPU-minutes.

    python scripts/compute_matched.py --rates runs/bench-steps/rates.json \\
        --method "GRPO=grpo:runs/grpo-s0,runs/grpo-s1,runs/grpo-s2" \\
        --method "PRDP=prdp:runs/prdp-s0,runs/prdp-s1,runs/prdp-s2" \\
        --budget 5 --budget 10 --png docs/images/compute_matched.png

Each ``--method LABEL=CONFIG:RUN[,RUN...]`` names runs of one config over several seeds; ``--offset
LABEL=MINUTES`` adds a method's fixed cost before its first step (an offline method's preference data, say)
to every evaluation after step 0. A run's
evaluation at step s is placed at ``s x rate`` minutes, ``rate`` being CONFIG's seconds per training step
measured alone on the machine by ``benchmarks/bench_method_steps.py`` (``--rates``), so runs measured two at
a time or under other load compare on the minutes they would take alone; evaluation time is not counted
(every method is evaluated the same way). Without ``--rates`` the runs' own ``time.elapsed`` of the step's
``metrics.jsonl`` record is used (then say so: it includes whatever else ran).

Output: one PNG of gold accuracy against minutes (per method the mean over seeds as a line and the
min-max as a band, the base at 0 minutes) and a Markdown table: per method and budget, the last
evaluation at or before the budget, gold mean and range over seeds (and proxy, diversity where logged).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Curve:
    """One run: evaluation records placed at training minutes."""

    run: Path
    points: list[tuple[float, dict[str, Any]]]  # (minutes, eval record), by step

    def at(self, minutes: float) -> dict[str, Any] | None:
        """The last evaluation at or before ``minutes`` (None when even the first is later)."""
        last = None
        for m, rec in self.points:
            if m <= minutes + 1e-6:  # the plot's grid rounds minutes to 6 decimals
                last = rec
        return last


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a missing file is a one-line exit."""
    if not path.is_file():
        raise SystemExit(f"compute_matched: {path} does not exist (is {path.parent} a finished diffalign run?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_curve(run: Path, rate: float | None, offset: float = 0.0) -> Curve:
    """Evaluations of ``run`` at ``step x rate / 60`` minutes, or at the run's own elapsed time; ``offset``
    minutes are added to every evaluation after step 0 (a fixed cost paid before training)."""
    evals = read_jsonl(run / "eval.jsonl")
    elapsed = {r["step"]: r["time"]["elapsed"] for r in read_jsonl(run / "metrics.jsonl") if "time" in r}
    points = []
    for rec in evals:
        step = int(rec["step"])
        if rate is not None:
            minutes = step * rate / 60.0
        elif step == 0:
            minutes = 0.0
        elif step in elapsed:
            minutes = elapsed[step] / 60.0
        else:
            continue
        points.append((minutes + (offset if step > 0 else 0.0), rec))
    return Curve(run, sorted(points, key=lambda p: p[0]))


def parse_method(text: str) -> tuple[str, str, list[Path]]:
    """``LABEL=CONFIG:RUN[,RUN...]`` -> (label, config, runs)."""
    label, sep, rest = text.partition("=")
    config, sep2, runs = rest.partition(":")
    if not sep or not sep2 or not label or not config or not runs:
        raise SystemExit(f"compute_matched: --method {text!r} is not LABEL=CONFIG:RUN[,RUN...]")
    return label, config, [Path(r) for r in runs.split(",") if r]


def parse_offset(text: str) -> tuple[str, float]:
    """``LABEL=MINUTES`` -> (label, minutes >= 0)."""
    label, sep, value = text.partition("=")
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not sep or not label or not minutes >= 0:
        raise SystemExit(f"compute_matched: --offset {text!r} is not LABEL=MINUTES (minutes >= 0)")
    return label, minutes


def summary(values: list[float]) -> str:
    """``mean (min..max)`` of values, 3 decimals."""
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}..{max(values):.3f})"


def table(methods: dict[str, list[Curve]], budgets: list[float], key: str = "gold/accuracy") -> str:
    """Markdown: per method and budget, the evaluations' ``key`` (and the proxy, diversity) over seeds."""
    lines = ["| method | minutes | seeds | gold accuracy mean (range) | gain over base | proxy | diversity |"]
    lines.append("|---|---|---|---|---|---|---|")
    for label, curves in methods.items():
        for b in budgets:
            recs = [c.at(b) for c in curves]
            recs = [r for r in recs if r is not None]
            base = [c.points[0][1][key] for c in curves if c.points and key in c.points[0][1]]
            gold = [r[key] for r in recs if key in r]
            gains = [g - statistics.mean(base) for g in gold] if base else []
            proxy = [v for r in recs for k, v in r.items() if k.startswith("heldout/") or k == "reward/shapes_clip"]
            div = [r["diversity"] for r in recs if "diversity" in r]
            steps = sorted({int(r["step"]) for r in recs})
            lines.append(
                f"| {label} | {b:g} (step {','.join(map(str, steps)) or '-'}) | {len(gold)} | {summary(gold)} | "
                f"{summary(gains) if gains else '-'} | {summary(proxy)} | {summary(div)} |"
            )
    return "\n".join(lines)


def plot(methods: dict[str, list[Curve]], png: Path, key: str = "gold/accuracy", title: str = "") -> None:
    """Gold accuracy vs minutes: per method the seeds' mean (line) and min-max (band) on a shared grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for label, curves in methods.items():
        grid = sorted({round(m, 6) for c in curves for m, _ in c.points})
        xs, mean, lo, hi = [], [], [], []
        for m in grid:
            vals = [r[key] for r in (c.at(m) for c in curves) if r is not None and key in r]
            if len(vals) == len(curves):
                xs.append(m)
                mean.append(statistics.mean(vals))
                lo.append(min(vals))
                hi.append(max(vals))
        (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} ({len(curves)} seeds)")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("training CPU-minutes (steps x the config's seconds per step alone)")
    ax.set_ylabel(f"held-out {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", action="append", required=True, help="LABEL=CONFIG:RUN[,RUN...] (repeat)")
    p.add_argument("--rates", type=Path, default=None, help="rates.json of benchmarks/bench_method_steps.py")
    p.add_argument("--offset", action="append", default=[], help="LABEL=MINUTES before a method's first step (repeat)")
    p.add_argument("--budget", type=float, action="append", default=[], help="minutes for the table (repeat)")
    p.add_argument("--png", type=Path, default=Path("outputs/compute_matched.png"))
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    rates = json.loads(args.rates.read_text())["rates"] if args.rates else None
    offsets = dict(parse_offset(text) for text in args.offset)
    methods: dict[str, list[Curve]] = {}
    for text in args.method:
        label, config, runs = parse_method(text)
        if rates is not None and config not in rates:
            raise SystemExit(f"compute_matched: {args.rates} has no rate for {config!r} (it has {sorted(rates)})")
        rate = rates[config]["step_seconds"] if rates is not None else None
        methods[label] = [load_curve(r, rate, offsets.get(label, 0.0)) for r in runs]
    unknown = sorted(set(offsets) - set(methods))
    if unknown:
        raise SystemExit(
            f"compute_matched: --offset {unknown[0]!r} names no --method label (labels: {sorted(methods)})"
        )
    plot(methods, args.png, title=args.title)
    budgets = args.budget or [max(m for cs in methods.values() for c in cs for m, _ in c.points)]
    print(table(methods, budgets))
    print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
