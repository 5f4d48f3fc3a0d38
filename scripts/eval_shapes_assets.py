"""Measure the shipped shapes assets: base pipeline gold accuracy per split, how often any shape
appears, sampling speed, and how well the proxy CLIP agrees with gold (Spearman) on base samples.

    python scripts/eval_shapes_assets.py --model assets/shapes-sd --clip assets/shapes-clip --n 128

Prints one JSON line per measurement and a summary; ``--grid FILE`` writes a PNG grid of data
(top rows) versus base samples (bottom rows) for docs/shapes.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffalign.gallery import captioned_grid  # noqa: E402
from diffalign.shapes import parse_caption, sample_prompts  # noqa: E402
from diffalign.shapes.data import render_batch  # noqa: E402
from diffalign.shapes.verifier import gold_accuracy, verify_batch  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int, cfg: float, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        out.append(
            pipe(
                prompts[i : i + batch], num_inference_steps=steps, guidance_scale=cfg, generator=gen, output_type="pt"
            ).images
        )
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/shapes-sd")
    p.add_argument("--clip", default="assets/shapes-clip", help="proxy CLIP directory ('' to skip)")
    p.add_argument("--n", type=int, default=128, help="samples per split")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--splits", nargs="+", default=["train", "heldout"])
    p.add_argument("--grid", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from diffalign.pipelines import load_pipeline

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    reward = None
    if args.clip:
        from reward_models import get_reward

        reward = get_reward(f"shapes_clip:model=local-dir:{args.clip}")
    summary = {"model": args.model, "steps": args.steps, "cfg": args.cfg}
    for split in args.splits:
        prompts = sample_prompts(split, args.n, seed=args.seed + 1)
        images = generate(pipe, prompts, args.seed, args.steps, args.cfg)
        verdicts = verify_batch(images, prompts)
        gold = gold_accuracy(verdicts)
        row = {"split": split, "n": len(prompts)} | {k: round(v, 4) for k, v in gold.items()}
        if reward is not None:
            proxy = reward(images, prompts).tolist()
            row["proxy_mean"] = round(sum(proxy) / len(proxy), 4)
            row["spearman_proxy_gold_score"] = round(spearman(proxy, [v.score for v in verdicts]), 4)
        print(json.dumps(row), flush=True)
        summary[split] = row
        if args.grid and split == "heldout":
            data = render_batch([parse_caption(q) for q in prompts[:16]], seed=99)
            grid_img, _ = captioned_grid(
                torch.cat([data, images[:16].cpu()]),
                ncol=8,
                scale=3,
                title="held-out prompts: rows 1-2 rendered data, rows 3-4 the pipeline's samples (same prompts)",
                captions=prompts[:16] * 2,
            )
            args.grid.parent.mkdir(parents=True, exist_ok=True)
            grid_img.save(args.grid)
    t0 = time.perf_counter()
    generate(pipe, sample_prompts("heldout", 16, seed=5), 0, args.steps, args.cfg, batch=16)
    summary["seconds_16_images"] = round(time.perf_counter() - t0, 2)
    summary["threads"] = args.threads
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
