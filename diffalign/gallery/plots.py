"""Training curves as PNGs (matplotlib, Agg backend) from runs' ``metrics.jsonl`` and ``eval.jsonl``.

One PNG per quantity, two panels: against the training step and against training wall-clock time
(the cumulative ``time.step_seconds`` of metrics.jsonl: the seconds spent in training steps, so
evaluation, checkpoints, start-up and pauses between a kill and a resume do not count). Every run is
one line on each axis, so several runs compare on one figure. A quantity no run has (gold on a
real-model run) is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (file stem, title, source file, keys): the keys present in the records are drawn (a "*" ends a prefix).
PLOTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("train_reward", "training reward (combined, on training samples)", "metrics", ("reward",)),
    ("train_rewards", "training rewards, each", "metrics", ("reward/*",)),
    ("eval_reward", "evaluation: training reward on held-out prompts", "eval", ("reward",)),
    ("heldout", "evaluation: held-out rewards (never trained on)", "eval", ("heldout/*",)),
    ("gold", "evaluation: gold verifier (shapes)", "eval", ("gold/accuracy", "gold/score")),
    ("diversity", "evaluation: diversity (pixel RMS across seeds)", "eval", ("diversity",)),
    ("grad_norm", "gradient norm (before clipping)", "metrics", ("grad_norm",)),
)


@dataclass
class Curves:
    """One run's records: its label, metrics.jsonl and eval.jsonl rows."""

    label: str
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]]

    def clock(self) -> dict[int, float]:
        """Step -> training seconds up to the end of that step (step 0 -> 0)."""
        total, out = 0.0, {0: 0.0}
        for r in sorted(self.metrics, key=lambda r: r.get("step", 0)):
            t = r.get("time") or {}
            total += float(t.get("step_seconds", 0.0) or 0.0)
            out[int(r.get("step", 0))] = total
        return out


def _keys(rows: list[dict[str, Any]], patterns: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        for row in rows:
            for key, value in row.items():
                hit = key.startswith(pattern[:-1]) if pattern.endswith("*") else key == pattern
                if hit and isinstance(value, (int, float)) and not isinstance(value, bool) and key not in found:
                    found.append(key)
    return found


def write_plots(runs: Sequence[Curves], out_dir: Path) -> list[tuple[Path, str]]:
    """Write the :data:`PLOTS` that any run has data for into ``out_dir``; returns (path, title) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for stem, title, source, patterns in PLOTS:
        keys = _keys([r for run in runs for r in (run.metrics if source == "metrics" else run.evals)], patterns)
        if not keys:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=80)
        styles = ["-", "--", ":", "-."]
        for n, run in enumerate(runs):
            rows = run.metrics if source == "metrics" else run.evals
            clock = run.clock()
            for k, key in enumerate(keys):
                pts = [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
                if not pts:
                    continue
                steps, values = zip(*sorted(pts), strict=True)
                label = run.label if len(keys) == 1 else f"{run.label}: {key}"
                style = dict(color=colors[n % len(colors)], linestyle=styles[k % len(styles)], label=label)
                marker = "o" if source == "eval" else None
                axes[0].plot(steps, values, marker=marker, markersize=3, **style)
                timed = [(clock[s], v) for s, v in zip(steps, values, strict=True) if s in clock]
                if timed:
                    axes[1].plot(*zip(*timed, strict=True), marker=marker, markersize=3, **style)
        axes[0].set_xlabel("training step")
        axes[1].set_xlabel("training time (s, steps only)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.set_ylabel(keys[0] if len(keys) == 1 else "value")
        axes[0].legend(fontsize=7, loc="best")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append((path, title))
    return written
