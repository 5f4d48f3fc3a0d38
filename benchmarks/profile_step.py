"""Where a training step's time and memory go: torch.profiler and an RSS trace of one ``diffalign train`` run.

Issue 19 item 3 asks for the profile of a step and the waste in it. This runs ``diffalign train`` in this
process on a config (e.g. the AlignProp and DDPO configs ``benchmarks/bench_trl.py`` writes, the TRL
comparison's settings), profiles the method's steps after the first (``--warmup``) with torch.profiler
(CPU), and samples the process's RSS every 5 ms. It prints:

- time: the profiled steps' wall seconds and the share of them spent inside aten operators, grouped by
  kind (convolution, matmul, attention, normalization, activation, element-wise, the rest); the share
  outside every operator is Python, module dispatch, hooks and autograd bookkeeping: the most that
  removing overhead could save;
- memory: RSS after the imports of the command, before the first step (pipeline loaded, evaluation
  done), and the peak during the warm-up steps (before the profiler, whose records take memory of their
  own): the difference is what the training itself holds.

    python benchmarks/bench_trl.py --out runs/bench-trl --sides diffalign --updates 1   # writes the configs
    python benchmarks/profile_step.py runs/bench-trl/diffalign-alignprop.yaml --steps 3
    python benchmarks/profile_step.py runs/bench-trl/diffalign-ddpo.yaml --steps 3 --json runs/prof-ddpo.json

Run it alone on the machine (``--threads``, default 2, sets torch's threads); absolute seconds are
noisy, the shares are what it is for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# aten operator name fragments -> kind (first match wins; forward and backward kernels alike)
KINDS = (
    ("convolution", ("conv",)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("attention", ("attention", "softmax")),
    ("normalization", ("norm",)),
    ("activation", ("silu", "gelu", "sigmoid", "tanh", "relu")),
    ("element-wise", ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::copy_", "aten::fill_")),
)


def kind_of(op: str) -> str:
    """The kind of an aten operator name (``rest`` when none of :data:`KINDS` matches)."""
    for kind, fragments in KINDS:
        if any(f in op for f in fragments):
            return kind
    return "rest"


def rss_mb() -> float:
    """This process's resident set size in MB (``/proc/self/status``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssTrace:
    """Samples the RSS every ``period`` seconds in a daemon thread; ``peak`` is the largest sample."""

    def __init__(self, period: float = 0.005) -> None:
        self.peak, self.period, self.done = rss_mb(), period, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.done.wait(self.period):
            self.peak = max(self.peak, rss_mb())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="a diffalign config (YAML)")
    p.add_argument("--steps", type=int, default=3, help="train.steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="steps not profiled at the start (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if not args.config.is_file():
        raise SystemExit(f"profile_step: config {args.config} does not exist")
    if args.steps <= args.warmup:
        raise SystemExit("profile_step: --steps must be larger than --warmup")
    trace = RssTrace()
    sys.path.insert(0, str(ROOT))  # the benchmarks.* reward plug-ins
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    import yaml

    from diffalign.cli import main as cli_main
    from diffalign.methods.registry import get_method

    rss_imports = rss_mb()
    method = (yaml.safe_load(args.config.read_text()) or {}).get("train", {}).get("method", "alignprop")
    method_cls = get_method(method).cls
    state: dict = {"n": 0, "seconds": 0.0, "rss_first_step": None, "rss_peak_warmup": None}
    prof = profile(activities=[ProfilerActivity.CPU])
    original = method_cls.step

    def step(self, ctx, batches):  # the method's step, profiled after the warm-up
        state["n"] += 1
        if state["n"] == 1:
            state["rss_first_step"] = rss_mb()
        if state["n"] <= args.warmup:
            return original(self, ctx, batches)
        if state["n"] == args.warmup + 1:
            state["rss_peak_warmup"] = trace.peak  # the profiler's own records would inflate the RSS
            prof.start()
        t0 = time.perf_counter()
        try:
            return original(self, ctx, batches)
        finally:
            state["seconds"] += time.perf_counter() - t0
            if state["n"] == args.steps:
                prof.stop()  # the last step: the final evaluation stays out of the profile

    method_cls.step = step
    try:
        with tempfile.TemporaryDirectory() as out:
            rc = cli_main(["train", "--config", str(args.config), "--output-dir", out, f"train.steps={args.steps}"])
    finally:
        method_cls.step = original
        trace.done.set()
    if rc:
        raise SystemExit(f"profile_step: diffalign train exited {rc}")
    # self time of every aten operator (children excluded, so nothing counts twice)
    by_kind: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.key.startswith("aten::"):
            by_kind[kind_of(evt.key)] = by_kind.get(kind_of(evt.key), 0.0) + evt.self_cpu_time_total / 1e6
    # with several threads an operator's self time can exceed wall time; report shares of the wall
    wall = state["seconds"]
    steps = state["n"] - args.warmup
    in_ops = sum(by_kind.values())
    report = {
        "config": str(args.config),
        "method": method,
        "threads": args.threads,
        "profiled_steps": steps,
        "seconds_per_step": wall / steps,
        "share_in_aten_ops": in_ops / wall,
        "share_by_kind": {k: v / wall for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "rss_mb": {
            "after_imports": rss_imports,
            "before_first_step": state["rss_first_step"],
            "peak": state["rss_peak_warmup"],
        },
    }
    print(f"{method}: {report['seconds_per_step']:.2f} s per step over {steps} profiled step(s)")
    print(f"  inside aten operators: {100 * report['share_in_aten_ops']:.1f} % of the step's wall time")
    for kind, share in report["share_by_kind"].items():
        print(f"    {kind:14s} {100 * share:5.1f} %")
    r = report["rss_mb"]
    print(
        f"  RSS MB: after imports {r['after_imports']:.0f}, before the first step {r['before_first_step']:.0f}, "
        f"peak {r['peak']:.0f} (training holds {r['peak'] - r['before_first_step']:.0f} above the loaded pipeline)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
