"""ReNO cost per iteration: sampling steps (1 vs 4) x activation checkpointing (on vs off).

Each configuration runs in a fresh subprocess so that peaks do not mix. Memory is the growth of
the process's peak RSS during the ReNO loop over its RSS just before it (the high-water mark is
reset through ``/proc/self/clear_refs`` where Linux allows it), i.e. what the graph through the
generator, the VAE decoder and the reward costs. Time is the mean seconds per iteration (forward,
backward to the noise, optimizer step), the first iteration excluded. CPU only; on GPU use
``torch.cuda.max_memory_allocated`` the same way.

    python benchmarks/bench_reno.py                      # assets/shapes-sd if present, else a tiny SD
    python benchmarks/bench_reno.py --model tiny --width 32 --size 64
    python benchmarks/bench_reno.py --model assets/shapes-sd --reward shapes_clip
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES_SD = ROOT / "assets" / "shapes-sd"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _redness():
    import torch

    from reward_models import Reward

    class Redness(Reward):
        """Mean red minus mean green/blue: a reward without weights, so the table shows the generator's cost."""

        name = "redness"
        differentiable = True

        def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))

    return Redness()


def _tiny_pipeline(width: int) -> str:
    """The test suite's tiny SD pipeline with a UNet of ``(width, 2 * width)`` channels, saved to a temp dir."""
    import tempfile

    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_sd

    tmp = Path(tempfile.mkdtemp())
    pipe = build_sd(tmp)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(width, 2 * width),
        layers_per_block=2,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=min(32, width),
    )
    pipe.register_modules(unet=unet)
    pipe.save_pretrained(tmp / "pipe")
    return str(tmp / "pipe")


def run_one(model: str, reward: str, steps: int, checkpoint: bool, iters: int, size: int | None, width: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from diffalign.pipelines import load_pipeline
    from diffalign.reno import RenoConfig, reno

    torch.set_num_threads(1)
    if model == "tiny":
        model = _tiny_pipeline(width)
    pipe = load_pipeline(model, scheduler="keep")
    rewards = [_redness()] if reward == "redness" else [reward]
    cfg = RenoConfig(iters=2, num_steps=steps, checkpoint=checkpoint, size=size)
    reno(pipe, "two blue squares", rewards, None, cfg)  # warm-up (one backward): lazy imports, caches, reward load
    cfg = RenoConfig(iters=iters, num_steps=steps, checkpoint=checkpoint, size=size)
    before = _rss_mb()
    exact = _reset_peak()
    t0 = time.perf_counter()
    result = reno(pipe, "two blue squares", rewards, None, cfg)
    total = time.perf_counter() - t0
    peak = _peak_mb()
    per_iter = sum(r.seconds for r in result.records[1:]) / max(1, len(result.records) - 1)
    side = result.best_image.shape[-1]
    return {
        "steps": steps,
        "checkpoint": checkpoint,
        "size": side,
        "s_per_iter": round(per_iter, 3),
        "total_s": round(total, 2),
        "peak_growth_mb": round(peak - before, 1),
        "peak_exact": exact,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline dir, or 'tiny' (default: assets/shapes-sd if present)")
    p.add_argument("--reward", default="redness", help="reward spec, or 'redness' (built in, no weights)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: 64 for tiny, else the model's)")
    p.add_argument("--width", type=int, default=32, help="tiny model: UNet channels (width, 2 * width)")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args()
    model = args.model or (str(SHAPES_SD) if (SHAPES_SD / "model_index.json").is_file() else "tiny")
    size = args.size if args.size is not None else (64 if model == "tiny" else None)
    if args._one:
        steps, ckpt = args._one.split(",")
        print(json.dumps(run_one(model, args.reward, int(steps), ckpt == "1", args.iters, size, args.width)))
        return
    rows = []
    for steps in args.steps:
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--model", model, "--reward", args.reward, "--iters", str(args.iters)]
            cmd += ["--width", str(args.width)]
            cmd += ["--size", str(size)] if size else []
            # glibc: serve every allocation over 64 kB by mmap and give it back on free, so RSS follows live tensors
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            out = subprocess.run(cmd + ["--_one", f"{steps},{int(ckpt)}"], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"configuration steps={steps} checkpoint={ckpt} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    name = f"tiny SD, UNet ({args.width}, {2 * args.width})" if model == "tiny" else model
    print(f"model={name} reward={args.reward} size={rows[0]['size']}px iters={args.iters}, one torch thread")
    print(f"{'steps':>5} {'checkpoint':>10} {'s/iter':>8} {'peak MB':>9}")
    for r in rows:
        print(f"{r['steps']:>5} {str(r['checkpoint']):>10} {r['s_per_iter']:>8} {r['peak_growth_mb']:>9}")
    if not all(r["peak_exact"] for r in rows):
        print("(peak RSS could not be reset: numbers include the warm-up run's peak)")


if __name__ == "__main__":
    main()
