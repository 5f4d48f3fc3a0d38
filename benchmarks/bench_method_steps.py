"""Seconds per training step of each method's shipped shapes config, one process at a time.

Each config runs ``--steps`` training steps in a fresh ``diffalign train`` subprocess (no checkpoints, the
evaluation only before and after training), alone on the machine with ``--threads`` torch threads; the
figure is the median ``time.step_seconds`` of its ``metrics.jsonl`` over the steps after the first (the
first pays for lazy initialisation), and the evaluation's seconds from ``eval.jsonl``. These are the
rates that turn a run's steps into CPU-minutes for the compute-matched comparisons
(``scripts/compute_matched.py``), because the runs themselves are often measured two at a time or under
other load, where their own clocks overstate the minutes.

    python benchmarks/bench_method_steps.py --out runs/bench-steps            # every configs/shapes/*.yaml method
    python benchmarks/bench_method_steps.py --config grpo --config prdp --steps 4 --json rates.json
    python benchmarks/bench_method_steps.py --config runs/prdp-s0/config.yaml --threads 1   # exactly what a run ran

Run it on an otherwise idle machine: two torch processes at once slow each other (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ["alignprop", "draft_k", "draft_lv", "refl", "ddpo", "grpo", "prdp", "d3po", "dpo", "adv_grpo"]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_rate(run: Path) -> dict[str, float]:
    """Median seconds per training step (steps after the first) and per evaluation of a finished run."""
    steps = [r["time"]["step_seconds"] for r in read_jsonl(run / "metrics.jsonl") if "time" in r]
    evals = [r["time"]["seconds"] for r in read_jsonl(run / "eval.jsonl") if "time" in r]
    if not steps:
        raise SystemExit(f"bench_method_steps: {run / 'metrics.jsonl'} has no timed step; see {run}.log")
    later = steps[1:] or steps
    return {
        "step_seconds": statistics.median(later),
        "step_seconds_min": min(later),
        "step_seconds_max": max(later),
        "eval_seconds": statistics.median(evals) if evals else float("nan"),
        "steps_timed": len(later),
    }


def is_yaml_path(name: str) -> bool:
    """Whether ``--config`` names a YAML file (a run's ``config.yaml``) rather than a configs/shapes name."""
    return name.endswith((".yaml", ".yml"))


def config_path(name: str) -> Path:
    """configs/shapes/NAME.yaml for a name, or the YAML file itself for a path (a run's ``config.yaml``)."""
    return Path(name) if is_yaml_path(name) else ROOT / "configs" / "shapes" / f"{name}.yaml"


def run_dir_name(name: str) -> str:
    """A directory name for a config: the name, or for a run's ``config.yaml`` its run directory's name."""
    if not is_yaml_path(name):
        return name
    path = Path(name)
    return path.parent.name if path.stem == "config" and path.parent.name else path.stem


def run_config(name: str, out: Path, steps: int, threads: int, extra: list[str]) -> dict[str, float]:
    """``diffalign train`` of ``config_path(name)`` for ``steps`` steps into OUT/``run_dir_name(name)``; its rates."""
    run = out / run_dir_name(name)
    cmd = [sys.executable, "-m", "diffalign", "train", "--config", str(config_path(name))]
    cmd += ["--output-dir", str(run), f"train.steps={steps}", "eval.every=0", "checkpoint.every=0"]
    cmd += ["log.progress=false", "log.sample_every=0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    log_path = out / f"{run.name}.log"
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise SystemExit(f"bench_method_steps: {name} exited {rc}; see {log_path}")
    return {**step_rate(run), "wall_seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        action="append",
        help="a configs/shapes name or a YAML path such as a run's config.yaml (repeat; default: every method's)",
    )
    p.add_argument("--steps", type=int, default=5, help="training steps per config (the first is not timed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-steps")
    p.add_argument("--json", type=Path, default=None, help="write {config: rates} here (default OUT/rates.json)")
    p.add_argument("--extra", action="append", default=[], help="an override added to every run (key=value)")
    args = p.parse_args(argv)
    if args.steps < 2:
        raise SystemExit("bench_method_steps: --steps must be >= 2 (the first step is not timed)")
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.config or DEFAULT_CONFIGS
    missing = [n for n in names if not config_path(n).is_file()]
    if missing:
        raise SystemExit(
            f"bench_method_steps: no config {config_path(missing[0])}; give a YAML path or one of {DEFAULT_CONFIGS}"
        )
    dirs = [run_dir_name(n) for n in names]
    clash = [d for d in dirs if dirs.count(d) > 1]
    if clash:
        raise SystemExit(f"bench_method_steps: two configs would share the run directory {clash[0]!r}")
    rates = {}
    width = max(12, *(len(n) for n in names))
    print(f"{'config':<{width}} {'s/step':>8} {'min':>7} {'max':>7} {'s/eval':>7}")
    for name in names:
        r = rates[name] = run_config(name, args.out, args.steps, args.threads, args.extra)
        print(
            f"{name:<{width}} {r['step_seconds']:8.2f} {r['step_seconds_min']:7.2f} {r['step_seconds_max']:7.2f} "
            f"{r['eval_seconds']:7.1f}",
            flush=True,
        )
    dest = args.json or args.out / "rates.json"
    dest.write_text(json.dumps({"threads": args.threads, "steps": args.steps, "rates": rates}, indent=1))
    print(f"rates: {dest}")


if __name__ == "__main__":
    main()
