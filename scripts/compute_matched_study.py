"""One command for the compute-matched comparison of docs/benchmarks.md: every method's runs over seeds,
Diffusion-DPO's preference set, each config's seconds per step, then the plot and the table.

    python scripts/compute_matched_study.py                          # everything into runs/compute-matched
    python scripts/compute_matched_study.py --dry-run                # print the commands only
    python scripts/compute_matched_study.py --only GRPO --only AlignProp --seeds 0 1 2
    python scripts/compute_matched_study.py --plot-only              # rates, plot and table from finished runs

What it does, in order (each stage skips what OUT already holds, so a killed study resumes where it stopped):

1. ``diffalign prefs`` with the exact gold verifier (correct vs incorrect images) into OUT/shapes-prefs, once,
   timed: its minutes become Diffusion-DPO's ``--offset`` (the preference set is paid for before training);
2. ``diffalign train`` of each method and seed into OUT/<key>-s<seed> (``--resume latest`` when the run holds
   checkpoints, skipped when its final LoRA and last evaluation are there), ``--jobs`` at a time, each
   with ``OMP_NUM_THREADS=--threads`` (logs in OUT/logs);
3. ``benchmarks/bench_method_steps.py --config OUT/<key>-s<first seed>/config.yaml``: the seconds per step of
   each run's own config, measured alone, one config after another, at ``--threads`` (OUT/bench/rates.json;
   configs already there are not timed again). Runs made several at a time overstate their own clocks, so
   every evaluation is placed at ``step x rate`` minutes;
4. ``scripts/compute_matched.py``: the PNG (``--png``) of held-out gold accuracy against training minutes
   (mean over seeds and min-max band per method) and the Markdown table at each ``--budget``.

Every method trains with the exact gold verifier's score as its reward (Diffusion-DPO on gold-ranked pairs,
Adv-GRPO with its adversarial reward alone, never the gold), except the reward-backprop methods, which
need a differentiable reward and train on the proxy with their shipped configs (AlignProp: the demo's
config, ``make demo``; DRaFT-K, DRaFT-LV, ReFL); evaluation is the same for all: 30 held-out compositions
x 5 seeds, gold accuracy, proxy and diversity. Cost on the 2-core CPU of docs/benchmarks.md: about 4.5
hours of runs with ``--jobs 2`` at one thread each, plus about 20 minutes of rate measurement (which
should run alone).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compute_matched  # noqa: E402
import hacking_study  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOLD_REWARD = ["reward.rewards=[shapes_gold]", "eval.rewards=[shapes_clip]"]  # gold as reward, proxy logged
# Every run is evaluated on the same 150 images (30 held-out prompts x seeds 0-4), whatever its config's own
# evaluation set (the demo's alignprop.yaml evaluates 300).
EVAL_SEEDS = "eval.seeds=[0,1,2,3,4]"
PREFS_KEY = "prefs_seconds"


@dataclass
class Method:
    """One method of the comparison: ``diffalign train --config CONFIG *overrides`` for ``steps`` steps."""

    key: str  # run directories OUT/<key>-s<seed>
    label: str  # legend and table
    config: str
    steps: int
    overrides: list[str] = field(default_factory=list)
    bench_steps: int = 4  # steps bench_method_steps.py times (the first is not counted)
    needs_prefs: bool = False

    def run_dir(self, out: Path, seed: int) -> Path:
        return out / f"{self.key}-s{seed}"


def default_methods() -> list[Method]:
    """The methods and settings of docs/benchmarks.md's compute-matched figure."""
    fast = ["sample.num_batches=2", "train.lr=2e-3"]  # PRDP and D3PO: 16 trajectories a step, lr 2e-3
    return [
        Method("grpo", "GRPO", "configs/shapes/grpo.yaml", 60, [*GOLD_REWARD]),
        # eta 1: the rollouts of the table's PRDP rows (configs/shapes/prdp.yaml ships eta 0.5 since 2026-12-01)
        Method(
            "prdp",
            "PRDP",
            "configs/shapes/prdp.yaml",
            40,
            [*GOLD_REWARD, *fast, "prdp.timestep_fraction=0.3", "sample.eta=1.0"],
        ),
        Method(
            "d3po",
            "D3PO",
            "configs/shapes/d3po.yaml",
            40,
            [
                *GOLD_REWARD,
                *fast,
                "d3po.timestep_fraction=0.3",
                "d3po.shuffle_timesteps=false",
                "train.gradient_accumulation_steps=4",
            ],
        ),
        Method("ddpo", "DDPO", "configs/shapes/ddpo.yaml", 60, [*GOLD_REWARD]),
        # 400 of the shipped config's 800 steps (constant lr: the same trajectory), evaluated every 50 as measured
        Method(
            "dpo",
            "Diffusion-DPO (gold-ranked pairs)",
            "configs/shapes/dpo.yaml",
            400,
            ["eval.every=50"],
            needs_prefs=True,
        ),
        Method(
            "adv", "Adv-GRPO (adversarial reward)", "configs/shapes/adv_grpo.yaml", 20, ["eval.rewards=[shapes_clip]"]
        ),
        # reward backprop needs a differentiable reward: the proxy, as the demo; K varies per step, so time more.
        Method("alignprop", "AlignProp (proxy reward)", "configs/shapes/alignprop.yaml", 100, ["eval.every=25"], 16),
        # the other reward-backprop methods, on the proxy with their shipped configs
        Method("draft_k", "DRaFT-K (proxy reward)", "configs/shapes/draft_k.yaml", 200, [], 8),
        Method("draft_lv", "DRaFT-LV (proxy reward)", "configs/shapes/draft_lv.yaml", 200, [], 8),
        Method("refl", "ReFL (proxy reward)", "configs/shapes/refl.yaml", 200, [], 8),
    ]


def prefs_command(out: Path) -> list[str]:
    """The preference set of docs/benchmarks.md: 8 images per training prompt, 4 correct-vs-incorrect pairs."""
    return [
        sys.executable,
        "-m",
        "diffalign",
        "prefs",
        "--model",
        "assets/shapes-sd",
        "--prompts",
        "shapes:train",
        "--n",
        "8",
        "--pairs-per-prompt",
        "4",
        "--reward",
        "shapes_gold:mode=correct",
        "--out",
        str(out / "shapes-prefs"),
    ]


def train_command(method: Method, seed: int, out: Path) -> list[str]:
    """``diffalign train`` of one run (``--resume latest`` when it holds checkpoints)."""
    run = method.run_dir(out, seed)
    cmd = [sys.executable, "-m", "diffalign", "train", "--config", method.config, "--output-dir", str(run)]
    if hacking_study.has_checkpoints(run):
        cmd += ["--resume", "latest"]
    extra = [f"data.train={out / 'shapes-prefs' / 'prefs.jsonl'}"] if method.needs_prefs else []
    tail = [f"train.seed={seed}", f"train.steps={method.steps}", "log.progress=false"]
    return cmd + [EVAL_SEEDS, *method.overrides, *extra, *tail]


def bench_command(method: Method, config: Path, out: Path, threads: int) -> list[str]:
    """``bench_method_steps.py`` of one run's config.yaml, its rates into OUT/bench/<key>.json."""
    return [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_method_steps.py"),
        "--config",
        str(config),
        "--steps",
        str(method.bench_steps),
        "--threads",
        str(threads),
        "--out",
        str(out / "bench"),
        "--json",
        str(out / "bench" / f"{method.key}.json"),
    ]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def rate_config(run: Path) -> Path:
    """The config whose rate places ``run``'s evaluations: its config.yaml, resolved (the rates' key; the
    bench runs from the checkout)."""
    return (run / "config.yaml").resolve()


def timed_rates(method: Method, config: Path, out: Path) -> dict[str, dict]:
    """OUT/bench/<key>.json's rates when they hold ``config``'s, else {} (then it still needs timing)."""
    rates = read_json(out / "bench" / f"{method.key}.json").get("rates", {})
    return rates if str(config) in rates else {}


def select(methods: list[Method], only: list[str]) -> list[Method]:
    """The methods named by ``--only`` (key or label, case-insensitive), all when none; unknown -> one line."""
    if not only:
        return methods
    names = {m.key.lower(): m for m in methods} | {m.label.split(" (")[0].lower(): m for m in methods}
    unknown = [o for o in only if o.lower() not in names]
    if unknown:
        keys = ", ".join(m.key for m in methods)
        raise hacking_study.StudyError(f"--only {unknown[0]!r} is not a method of the study (one of: {keys})")
    chosen = {id(names[o.lower()]) for o in only}
    return [m for m in methods if id(m) in chosen]


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/compute-matched"), help="runs go to OUT/<key>-s<seed>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each run (default: 0 1 2)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        help="a method key or label (repeat; default: all ten of the figure)",
    )
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run and rate (default 1)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time (default 2; rates run alone)")
    p.add_argument("--budget", type=float, action="append", default=[], help="minutes for the table (repeat)")
    p.add_argument("--png", type=Path, default=Path("docs/images/compute_matched.png"), help="the figure")
    p.add_argument("--title", default="shapes world, 1 CPU thread: held-out gold vs training minutes (seeds 0-2)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--plot-only", action="store_true", help="train nothing: rates (if missing), plot, table")
    return p


def main(argv: list[str] | None = None) -> int:
    """Prefs, runs, rates, plot (see the module docstring); one-line errors exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except hacking_study.StudyError as err:
        print(f"compute_matched_study: {err}", file=sys.stderr)
        return 2


def _run_logged(name: str, cmd: list[str], out: Path, threads: int) -> None:
    """One command alone (``hacking_study.run_all`` with one job); a failure is a one-line StudyError."""
    if hacking_study.run_all([(name, cmd)], out, threads, 1, tag="compute_matched_study"):
        raise hacking_study.StudyError(f"{name} failed; see {out / 'logs' / (name + '.log')}")


def _main(args: argparse.Namespace) -> int:
    if args.threads < 1 or args.jobs < 1 or not args.seeds:
        raise hacking_study.StudyError("--threads and --jobs must be >= 1 and --seeds list at least one seed")
    methods = select(default_methods(), args.only)
    out: Path = args.out
    for m in methods:
        m.config = hacking_study.resolve_config(hacking_study.Variant(m.key, m.config))
    prefix = f"OMP_NUM_THREADS={args.threads} OMP_WAIT_POLICY=PASSIVE "
    timing = out / "timing.json"
    prefs_file = out / "shapes-prefs" / "prefs.jsonl"
    want_prefs = any(m.needs_prefs for m in methods) and not prefs_file.is_file()
    jobs = [
        (m.run_dir(out, s).name, train_command(m, s, out))
        for m in methods
        for s in args.seeds
        if not hacking_study.is_complete(m.run_dir(out, s), m.steps)
    ]
    if args.dry_run:
        if want_prefs:
            print(prefix + shlex.join(prefs_command(out)))
        for _, cmd in jobs:
            print(prefix + shlex.join(cmd))
        for m in methods:
            config = rate_config(m.run_dir(out, args.seeds[0]))
            if not timed_rates(m, config, out):
                print(prefix + shlex.join(bench_command(m, config, out, args.threads)))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        if want_prefs:
            start = time.perf_counter()
            _run_logged("prefs", prefs_command(out), out, args.threads)
            timing.write_text(json.dumps({**read_json(timing), PREFS_KEY: time.perf_counter() - start}))
        failed = hacking_study.run_all(jobs, out, args.threads, args.jobs, tag="compute_matched_study") if jobs else []
        if failed:
            raise hacking_study.StudyError(f"failed runs: {', '.join(failed)} (see {out / 'logs'})")

    rates: dict[str, dict] = {}
    method_args, offsets = [], []
    prefs_seconds = read_json(timing).get(PREFS_KEY)
    for m in methods:
        runs = [m.run_dir(out, s) for s in args.seeds if (m.run_dir(out, s) / "eval.jsonl").is_file()]
        if not runs:
            print(f"compute_matched_study: no finished run of {m.key} under {out}; left out")
            continue
        config = rate_config(runs[0])
        timed = timed_rates(m, config, out)
        if not timed:
            (out / "bench").mkdir(parents=True, exist_ok=True)
            print(f"compute_matched_study: timing {config} alone ({m.bench_steps} steps)", flush=True)
            proc = subprocess.run(bench_command(m, config, out, args.threads), cwd=ROOT, check=False)
            if proc.returncode != 0:
                raise hacking_study.StudyError(f"timing {config} failed (exit {proc.returncode})")
            timed = timed_rates(m, config, out)
        rates |= timed
        method_args += ["--method", f"{m.label}={config}:{','.join(map(str, runs))}"]
        if m.needs_prefs and prefs_seconds is not None:
            offsets += ["--offset", f"{m.label}={prefs_seconds / 60:.2f}"]
    if not method_args:
        raise hacking_study.StudyError(f"no finished run under {out}; run the study first (without --plot-only)")
    rates_file = out / "bench" / "rates.json"
    rates_file.write_text(json.dumps({"threads": args.threads, "rates": rates}, indent=1))
    budgets = [x for b in args.budget or [3, 5, 10, 13] for x in ("--budget", f"{b:g}")]
    return compute_matched.main(
        ["--rates", str(rates_file), *method_args, *offsets, *budgets, "--png", str(args.png), "--title", args.title]
    )


if __name__ == "__main__":
    sys.exit(main())
