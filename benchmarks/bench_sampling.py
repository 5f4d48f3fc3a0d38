"""Peak memory and time of differentiable sampling: number of steps x gradient checkpointing.

Each configuration runs in a fresh subprocess (so peaks do not mix). Two memory figures: the bytes
of tensors autograd saves for backward during sampling (exact, what checkpointing removes), and
the growth of the process's peak RSS over its RSS just before sampling (what the OS sees, with
the allocator's caching). On GPU, torch.cuda.max_memory_allocated plays the second role.

    python benchmarks/bench_sampling.py                       # tiny SD pipeline built on the fly
    python benchmarks/bench_sampling.py --model assets/shapes-sd --batch 8
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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(model: str, steps: int, checkpoint: bool, batch: int, size: int | None) -> dict:
    import torch

    from diffalign.pipelines import LoraSettings, add_lora, decode, encode_prompts, initial_latents, load_pipeline
    from diffalign.sampling import make_denoiser, sample_differentiable

    torch.set_num_threads(1)
    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        import tempfile

        from tiny import build_sd

        tmp = Path(tempfile.mkdtemp())
        build_sd(tmp).save_pretrained(tmp / "pipe")
        model = str(tmp / "pipe")
    pipe = load_pipeline(model)
    add_lora(pipe, LoraSettings(rank=4))
    cond = encode_prompts(pipe, ["a red circle"] * batch)
    pipe.scheduler.set_timesteps(steps)
    x = initial_latents(pipe, batch, torch.Generator().manual_seed(0), size, size)
    denoise = make_denoiser(pipe.unet, guidance_scale=5.0, **cond.denoiser_kwargs())
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    before = _rss_mb()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, _ = sample_differentiable(denoise, pipe.scheduler, x, grad_from=0, checkpoint=checkpoint)
    decode(pipe, z, differentiable=True).mean().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    graph_mb = sum(saved.values()) / 2**20
    return {
        "steps": steps,
        "checkpoint": checkpoint,
        "graph_mb": round(graph_mb, 1),
        "peak_growth_mb": round(peak - before, 1),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="image size (tiny model: 64 px = 32x32 latents)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        steps, ckpt = args._one.split(",")
        print(json.dumps(run_one(args.model, int(steps), ckpt == "1", args.batch, args.size)))
        return
    rows = []
    for steps in args.steps:
        for ckpt in (False, True):
            cmd = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--size",
                str(args.size),
            ]
            # large blocks straight from mmap and no trimming delay: RSS follows live tensors, not the allocator's cache
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            out = subprocess.run(
                cmd + ["--_one", f"{steps},{int(ckpt)}"], capture_output=True, text=True, check=True, env=env
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"model={args.model} batch={args.batch} size={args.size}px, full-chain backprop (grad_from=0), LoRA r=4")
    print("graph MB: tensors autograd keeps for backward (the memory that scales with steps);")
    print("peak MB: growth of the process peak RSS during sampling + backward (includes allocator caching)")
    print(f"{'steps':>5} {'checkpoint':>10} {'graph MB':>9} {'peak MB':>9} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['steps']:>5} {str(r['checkpoint']):>10} {r['graph_mb']:>9} {r['peak_growth_mb']:>9} {r['seconds']:>8}"
        )


if __name__ == "__main__":
    main()
