"""Peak memory and time of differentiable sampling: number of steps x gradient checkpointing (x OpenMP wait policy).

Each configuration runs in a fresh subprocess (so peaks do not mix), ``--repeat`` times (the median time is
reported), configurations interleaved so that a drift of the machine's speed touches all alike. Two memory figures: the bytes
of tensors autograd saves for backward during sampling (exact, what checkpointing removes), and
the growth of the process's peak RSS over its RSS just before sampling (what the OS sees, with
the allocator's caching). On GPU, torch.cuda.max_memory_allocated plays the second role.

    python benchmarks/bench_sampling.py                       # tiny SD pipeline built on the fly
    python benchmarks/bench_sampling.py --model assets/shapes-sd --batch 8
    # the demo's step (configs/shapes/alignprop.yaml): its LoRA targets, 2 threads, both OpenMP wait policies
    python benchmarks/bench_sampling.py --model assets/shapes-sd --batch 8 --steps 10 --threads 2 --repeat 3 \
        --targets to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2 --rank 8 \
        --wait-policy PASSIVE default
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(
    model: str, steps: int, checkpoint: bool, batch: int, size: int | None, threads: int, targets: str, rank: int
) -> dict:
    import torch

    from diffalign.pipelines import LoraSettings, add_lora, decode, encode_prompts, initial_latents, load_pipeline
    from diffalign.sampling import make_denoiser, sample_differentiable

    torch.set_num_threads(threads)
    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        import tempfile

        from tiny import build_sd

        tmp = Path(tempfile.mkdtemp())
        build_sd(tmp).save_pretrained(tmp / "pipe")
        model = str(tmp / "pipe")
    pipe = load_pipeline(model)
    add_lora(pipe, LoraSettings(rank=rank, alpha=float(rank), target_modules=targets.split(",") if targets else None))
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
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) of each configuration")
    p.add_argument(
        "--wait-policy",
        nargs="+",
        default=["PASSIVE"],
        help="OMP_WAIT_POLICY values to compare (PASSIVE, ACTIVE; 'default' leaves it unset)",
    )
    p.add_argument("--targets", default="", help="LoRA target modules, comma-separated (default: attention)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration (median seconds reported)")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        steps, ckpt = args._one.split(",")
        result = run_one(
            args.model, int(steps), ckpt == "1", args.batch, args.size, args.threads, args.targets, args.rank
        )
        print(json.dumps(result))
        return
    configs = [(steps, ckpt, policy) for steps in args.steps for ckpt in (False, True) for policy in args.wait_policy]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    common = [
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--threads",
        str(args.threads),
    ]
    common += ["--targets", args.targets, "--rank", str(args.rank)]
    for _ in range(max(1, args.repeat)):
        for steps, ckpt, policy in configs:
            # large blocks straight from mmap and no trimming delay: RSS follows live tensors, not the allocator's cache
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            env["OMP_NUM_THREADS"] = str(args.threads)
            env.pop("OMP_WAIT_POLICY", None)
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            cmd = [sys.executable, __file__, *common, "--_one", f"{steps},{int(ckpt)}"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            runs[(steps, ckpt, policy)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    lora = f"LoRA r={args.rank} on {args.targets or 'attention'}"
    print(
        f"model={args.model} batch={args.batch} size={args.size}px threads={args.threads}, full-chain backprop, {lora}"
    )
    print("graph MB: tensors autograd keeps for backward (the memory that scales with steps);")
    print("peak MB: growth of the process peak RSS during sampling + backward (includes allocator caching)")
    print(f"seconds: median of {max(1, args.repeat)} run(s); ratio: to the first row of the same steps")
    print(
        f"{'steps':>5} {'checkpoint':>10} {'wait policy':>11} {'graph MB':>9} {'peak MB':>9} {'seconds':>8} {'ratio':>6}"
    )
    for steps in args.steps:
        first = None
        for c in [c for c in configs if c[0] == steps]:
            rs = runs[c]
            seconds = statistics.median(r["seconds"] for r in rs)
            first = first or seconds
            r = rs[0]
            print(
                f"{steps:>5} {str(c[1]):>10} {c[2]:>11} {r['graph_mb']:>9} {max(x['peak_growth_mb'] for x in rs):>9} "
                f"{seconds:>8.2f} {seconds / first:>6.2f}"
            )


if __name__ == "__main__":
    main()
