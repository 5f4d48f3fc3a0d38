"""Reward-hacking study: train named variants over seeds, then plot held-out gold and the proxy vs step.

    python scripts/hacking_study.py                          # issue 16: Adv-GRPO vs GRPO on a hackable proxy
    python scripts/hacking_study.py --dry-run                # print the commands only
    python scripts/hacking_study.py --plot-only              # re-read OUT/<variant>-s<seed> and plot
    python scripts/hacking_study.py --variant wco='--config configs/shapes/grpo.yaml reward.combine=wco ...'

Each variant is ``diffalign train --config CONFIG [overrides]``, run once per seed into
``OUT/<variant>-s<seed>`` (``train.seed=S train.steps=N`` appended, so all runs have equal steps),
``--resume latest`` when that directory already holds checkpoints, skipped when its final LoRA and last
evaluation are there. Runs are subprocesses with ``OMP_NUM_THREADS=--threads`` and
``OMP_WAIT_POLICY=PASSIVE``, ``--jobs`` at a time, each logging to ``OUT/logs/<run>.log``. Then one PNG
(``--png``): held-out gold accuracy (``eval.jsonl`` ``gold/accuracy``) and the training proxy reward
(``metrics.jsonl``: the sum of ``--proxy-term KEY=WEIGHT``, by default ``reward/shapes_clip + W x
reward/saturation``, the hackable proxy without the adversarial term, so variants compare on one scale;
trailing mean over ``--smooth`` steps) against the step, per variant the mean over seeds as a line and
the min-max over seeds as a band; and a Markdown table per variant and seed: gold at step 0, peak
(step), end, drop from peak to end, end minus step 0, and whether the guardrail flagged
(``hacking: true`` in any evaluation).

Default variants (issue 16, the hacking-resistance figure; the configs are grpo.yaml / adv_grpo.yaml with
``reward.rewards=[shapes_clip,saturation(,adversarial)]``, nothing else changed):

- ``proxy-only``: ``--config configs/shapes/grpo_hackable.yaml reward.weights=[1,W]``
  (GRPO on the hackable proxy shapes_clip + W x saturation);
- ``proxy-adv``: ``--config configs/shapes/adv_grpo_hackable.yaml reward.weights=[1,W,A]``
  (Adv-GRPO: the same proxy plus A x the adversarial reward of a discriminator trained against the
  shapes generator's renders).

The choice of W = 6 (``--weight``): 64 base-model samples (assets/shapes-sd; 16 training prompts drawn
from shapes:train with ``random.Random(0)``, 4 each, 10 DDIM steps, eta 1, CFG 5: the training sampler),
``diffalign sample`` then ``diffalign score --reward shapes_clip --reward saturation --reward shapes_gold``:

    reward        mean    std (all 64)   std within a prompt's 4   min - max
    shapes_clip   0.812   0.174          0.145                     0.148 - 0.951
    saturation    0.128   0.054          0.017                     0.017 - 0.253
    shapes_gold   0.674   0.373          -                         0 - 1
    correlations: clip-saturation 0.16, saturation-gold 0.02, clip-gold 0.51

W x std(saturation) / std(shapes_clip) = 0.31 W over all samples (0.12 W within the groups GRPO's
advantages compare), so W = 6 gives 1.86x over all samples (0.72x within groups): the saturation term
matters from the first step, and more as the CLIP saturates near its 0.95 ceiling. A = 1 (``--adv-weight``):
the discriminator's clipped hinge score is of the order of +-1 once it has trained, a spread larger than
the proxy's; it is 0 at step 1 (the head starts at 0).

Figures: not measured yet. Cost, estimated from the GRPO measurements in docs/training.md (2-core CPU,
one thread per run, two runs at a time: 9-10 s a training step, about 30 s per evaluation of 150 images;
Adv-GRPO about 5 % more): about 14 minutes for a 60-step run with its 7 evaluations, so about 45 minutes
for 2 variants x 3 seeds with ``--jobs 2``, more when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOLD = "gold/accuracy"
DEFAULT_W = 6.0
DEFAULT_A = 1.0
DEFAULT_PNG = "docs/images/hacking_adv_grpo.png"


class StudyError(Exception):
    """A user-fixable problem with the study's arguments or files (printed as one line, exit 2)."""


@dataclass
class Variant:
    """One row of the variant table: ``diffalign train --config config *overrides``."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    label: str = ""

    def run_name(self, seed: int) -> str:
        """The run directory's name under OUT."""
        return f"{self.name}-s{seed}"


def default_variants(weight: float = DEFAULT_W, adv_weight: float = DEFAULT_A) -> list[Variant]:
    """Issue 16's pair: GRPO on the hackable proxy, and Adv-GRPO on the same proxy plus the adversarial reward."""
    return [
        Variant(
            "proxy-only",
            "configs/shapes/grpo_hackable.yaml",
            [f"reward.weights=[1,{weight:g}]"],
            f"proxy only (GRPO, shapes_clip + {weight:g} x saturation)",
        ),
        Variant(
            "proxy-adv",
            "configs/shapes/adv_grpo_hackable.yaml",
            [f"reward.weights=[1,{weight:g},{adv_weight:g}]"],
            f"proxy + adversarial (Adv-GRPO, + {adv_weight:g} x adversarial)",
        ),
    ]


def parse_variant(text: str, default_config: str) -> Variant:
    """``NAME=[--config FILE] key=value ...`` (shell words) -> a :class:`Variant`."""
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name or not all(c.isalnum() or c in "-_.+" for c in name):
        raise StudyError(
            f"--variant {text!r}: write NAME='[--config FILE] key=value ...' with NAME of letters, digits, - _ . +"
        )
    try:
        words = shlex.split(rest)
    except ValueError as err:
        raise StudyError(f"--variant {name}: cannot split {rest!r} into words ({err})") from None
    config, overrides = default_config, []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--config":
            if i + 1 >= len(words):
                raise StudyError(f"--variant {name}: --config needs a file")
            config, i = words[i + 1], i + 2
            continue
        if word.startswith("--config="):
            config = word.split("=", 1)[1]
        elif "=" not in word or word.startswith("-"):
            raise StudyError(f"--variant {name}: {word!r} is not a section.key=value override (or --config FILE)")
        else:
            overrides.append(word)
        i += 1
    return Variant(name, config, overrides, name)


def parse_terms(items: Sequence[str]) -> list[tuple[str, float]]:
    """``KEY=WEIGHT`` items (split at the last ``=``, so a key may hold ``=``) -> (key, weight) pairs."""
    terms = []
    for item in items:
        key, eq, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not eq or not key or not math.isfinite(weight):
            raise StudyError(f"--proxy-term {item!r}: write KEY=WEIGHT, e.g. reward/saturation=6")
        terms.append((key, weight))
    return terms


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; missing file -> []; a torn last line (a run being written) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def is_complete(run: Path, steps: int) -> bool:
    """Whether a run directory holds its final LoRA and an evaluation at ``steps`` or later."""
    evals = read_jsonl(run / "eval.jsonl")
    return (run / "lora").is_dir() and bool(evals) and int(evals[-1].get("step", -1)) >= steps


def has_checkpoints(run: Path) -> bool:
    """Whether ``run/checkpoints/step_N`` exists (then ``--resume latest`` continues it)."""
    ckpt = run / "checkpoints"
    return ckpt.is_dir() and any(p.name.startswith("step_") for p in ckpt.iterdir())


def resolve_config(variant: Variant) -> str:
    """The variant's config as given when it exists from here, else inside the checkout; else a StudyError."""
    if Path(variant.config).is_file():
        return variant.config
    if not Path(variant.config).is_absolute() and (ROOT / variant.config).is_file():
        return str(ROOT / variant.config)
    raise StudyError(f"variant {variant.name}: config {variant.config} does not exist")


def command(variant: Variant, seed: int, out: Path, steps: int, extra: Sequence[str]) -> list[str]:
    """The ``diffalign train`` command of one run (``--resume latest`` when it has checkpoints)."""
    run = out / variant.run_name(seed)
    cmd = [sys.executable, "-m", "diffalign", "train", "--config", variant.config, "--output-dir", str(run)]
    if has_checkpoints(run):
        cmd += ["--resume", "latest"]
    return cmd + [*variant.overrides, *extra, f"train.seed={seed}", f"train.steps={steps}"]


def run_all(
    jobs: list[tuple[str, list[str]]],
    out: Path,
    threads: int,
    parallel: int,
    poll: float = 2.0,
    tag: str = "hacking_study",
) -> list[str]:
    """Run the commands, ``parallel`` at a time, logs in ``OUT/logs``; returns the names of failed runs.
    ``tag`` prefixes the progress lines (the calling script's name)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS=str(threads))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            log = open(logs / f"{name}.log", "a", encoding="utf-8")  # noqa: SIM115 (closed when the run ends)
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            print(f"{tag}: start {name} (log: {logs / f'{name}.log'})", flush=True)
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((name, proc, log))
        time.sleep(poll)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"{tag}: {name} {status}", flush=True)
            if proc.returncode != 0:
                failed.append(name)
    return failed


@dataclass
class Run:
    """One run's curves: gold per evaluation step, the proxy per training step, the guardrail."""

    variant: str
    seed: int
    gold: list[tuple[int, float]]
    proxy: list[tuple[int, float]]
    hacking: bool

    def table_row(self) -> dict[str, Any]:
        """Gold at step 0, peak (and its step), end, drop from peak to end, end minus step 0."""
        start = self.gold[0][1]
        peak_step, peak = max(self.gold, key=lambda p: (p[1], -p[0]))
        end_step, end = self.gold[-1]
        return {
            "start": start,
            "peak": peak,
            "peak_step": peak_step,
            "end": end,
            "end_step": end_step,
            "drop": peak - end,
            "gain": end - start,
        }


def load_run(
    path: Path, variant: str, seed: int, terms: list[tuple[str, float]], smooth: int, proxy_file: str = "metrics"
) -> Run | None:
    """Read a run directory (``None`` when it has no gold evaluation yet); the proxy terms come from
    ``metrics.jsonl`` (training batches, ``proxy_file="metrics"``) or ``eval.jsonl`` (held-out images)."""
    evals = read_jsonl(path / "eval.jsonl")
    gold = sorted((int(e["step"]), float(e[GOLD])) for e in evals if isinstance(e.get(GOLD), (int, float)))
    if not gold:
        return None
    proxy = []
    for m in evals if proxy_file == "eval" else read_jsonl(path / "metrics.jsonl"):
        if all(isinstance(m.get(k), (int, float)) for k, _ in terms):
            proxy.append((int(m["step"]), sum(w * float(m[k]) for k, w in terms)))
    proxy.sort()
    if smooth > 1 and proxy:
        values = [v for _, v in proxy]
        proxy = [
            (s, sum(values[max(0, i - smooth + 1) : i + 1]) / (i + 1 - max(0, i - smooth + 1)))
            for i, (s, _) in enumerate(proxy)
        ]
    hacking = any(bool(e.get("hacking")) for e in evals)
    return Run(variant, seed, gold, proxy, hacking)


def band(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step present in any curve: steps, mean, min and max over the curves that have it."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (
        steps,
        [sum(by_step[s]) / len(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def plot(runs: dict[str, list[Run]], labels: dict[str, str], proxy_label: str, png: Path, title: str) -> None:
    """Two panels (gold, proxy) vs step: per variant the mean over seeds and a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    starts = [r.gold[0][1] for rs in runs.values() for r in rs if r.gold[0][0] == 0]
    for n, (name, rs) in enumerate(runs.items()):
        color = colors[n % len(colors)]
        label = f"{labels.get(name, name)} ({len(rs)} seed{'s' * (len(rs) != 1)})"
        for ax, curves, marker in ((axes[0], [r.gold for r in rs], "o"), (axes[1], [r.proxy for r in rs], None)):
            steps, mean, lo, hi = band([c for c in curves if c])
            if not steps:
                continue
            ax.plot(steps, mean, color=color, marker=marker, markersize=3, label=label)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.18, linewidth=0)
    if starts:
        axes[0].axhline(sum(starts) / len(starts), color="0.4", linestyle="--", linewidth=1, label="base (step 0)")
    axes[0].set_title("held-out gold accuracy (eval.jsonl gold/accuracy)", fontsize=9)
    axes[1].set_title(f"proxy reward ({proxy_label})", fontsize=9)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gold accuracy")
    axes[1].set_ylabel("proxy")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title + " (line: mean over seeds, band: min-max)", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def table(runs: dict[str, list[Run]]) -> str:
    """The Markdown table: one row per variant and seed, and the mean over seeds per variant."""
    lines = [
        "| variant | seed | gold step 0 | peak (step) | end (step) | drop peak->end | end - step 0 | hacking flagged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        rows = [(r, r.table_row()) for r in rs]
        for r, t in rows:
            lines.append(
                f"| {name} | {r.seed} | {t['start']:.3f} | {t['peak']:.3f} ({t['peak_step']}) | "
                f"{t['end']:.3f} ({t['end_step']}) | {t['drop']:.3f} | {t['gain']:+.3f} | {'yes' if r.hacking else 'no'} |"
            )
        if len(rows) > 1:
            mean = {k: sum(t[k] for _, t in rows) / len(rows) for k in ("start", "peak", "end", "drop", "gain")}
            flagged = sum(r.hacking for r, _ in rows)
            lines.append(
                f"| {name} | mean | {mean['start']:.3f} | {mean['peak']:.3f} | {mean['end']:.3f} | "
                f"{mean['drop']:.3f} | {mean['gain']:+.3f} | {flagged}/{len(rows)} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/hacking-adv-grpo"), help="runs go to OUT/<variant>-s<seed>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each run (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=60, help="train.steps of every run (default: 60)")
    p.add_argument("--weight", type=float, default=DEFAULT_W, help=f"W of the saturation term (default {DEFAULT_W:g})")
    p.add_argument(
        "--adv-weight", type=float, default=DEFAULT_A, help=f"A of the adversarial term (default {DEFAULT_A:g})"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME='[--config FILE] key=value ...'",
        help="a variant (repeat; replaces the default table): its config and overrides",
    )
    p.add_argument(
        "--config",
        default="configs/shapes/grpo.yaml",
        help="config of a --variant that names none (default: %(default)s)",
    )
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE", help="override for every run (repeat)")
    p.add_argument(
        "--proxy-term",
        action="append",
        default=[],
        metavar="KEY=WEIGHT",
        help="metrics.jsonl key and weight of the plotted proxy (repeat; default reward/shapes_clip=1, "
        "reward/saturation=W; 'reward' is the combined training reward)",
    )
    p.add_argument(
        "--proxy-file",
        choices=("metrics", "eval"),
        default="metrics",
        help="read the proxy terms from metrics.jsonl (training batches, default) or eval.jsonl (held-out images, "
        "e.g. heldout/NAME of eval.rewards, the same key in every variant)",
    )
    p.add_argument("--smooth", type=int, default=5, help="trailing mean over this many steps of the proxy (default 5)")
    p.add_argument("--png", type=Path, default=Path(DEFAULT_PNG), help="the figure (default: %(default)s)")
    p.add_argument("--title", default="Reward hacking on the shapes world: GRPO vs Adv-GRPO on a hackable proxy")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (default 1)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--plot-only", action="store_true", help="do not train: read the run directories and plot")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run (unless --plot-only / --dry-run) the variants over the seeds, then plot and print the table."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except StudyError as err:
        print(f"hacking_study: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.threads < 1 or args.jobs < 1 or args.smooth < 1 or not args.seeds:
        raise StudyError("--steps, --threads, --jobs and --smooth must be >= 1 and --seeds list at least one seed")
    variants = [parse_variant(v, args.config) for v in args.variant] or default_variants(args.weight, args.adv_weight)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise StudyError(f"variant names must differ, got {names}")
    for item in args.extra:
        if "=" not in item:
            raise StudyError(f"--extra {item!r}: write section.key=value")
    terms = parse_terms(args.proxy_term or ["reward/shapes_clip=1", f"reward/saturation={args.weight:g}"])
    out = args.out
    failed: list[str] = []

    if not args.plot_only:
        jobs = []
        for v in variants:
            v.config = resolve_config(v)
            for seed in args.seeds:
                run = out / v.run_name(seed)
                if is_complete(run, args.steps):
                    print(f"hacking_study: {v.run_name(seed)} is complete ({run}); skipped")
                    continue
                jobs.append((v.run_name(seed), command(v, seed, out, args.steps, args.extra)))
        prefix = f"OMP_NUM_THREADS={args.threads} OMP_WAIT_POLICY=PASSIVE "
        if args.dry_run:
            for _, cmd in jobs:
                print(prefix + shlex.join(cmd))
            return 0
        failed = run_all(jobs, out, args.threads, args.jobs) if jobs else []
        if failed:
            print(f"hacking_study: failed runs: {', '.join(failed)} (see {out / 'logs'})", file=sys.stderr)

    runs: dict[str, list[Run]] = {}
    for v in variants:
        for seed in args.seeds:
            loaded = load_run(out / v.run_name(seed), v.name, seed, terms, args.smooth, args.proxy_file)
            if loaded is None:
                print(f"hacking_study: {out / v.run_name(seed)} has no gold evaluation; left out")
                continue
            runs.setdefault(v.name, []).append(loaded)
    if not runs:
        raise StudyError(f"no run under {out} has an eval.jsonl with {GOLD}; run the study first (without --plot-only)")
    proxy_label = " + ".join(
        f"{w:g} x {k.removeprefix('reward/')}" if w != 1 else k.removeprefix("reward/") for k, w in terms
    )
    source = "eval.jsonl, held-out" if args.proxy_file == "eval" else "metrics.jsonl"
    plot(runs, {v.name: v.label or v.name for v in variants}, f"{source}: {proxy_label}", args.png, args.title)
    print(table(runs))
    print(f"hacking_study: wrote {args.png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
