"""ReNO acceptance experiment on the shapes world: does optimizing the noise for a learned proxy reward
(``shapes_clip``) make more images correct according to the exact gold verifier?

For N held-out prompts (``diffalign.shapes.sample_prompts("heldout", N, seed)``) and ``--seeds``
noise seeds each, ReNO runs on the shapes pipeline; the base sample (iteration 0: the generator's
image from the unoptimized noise) and ReNO's best image (highest proxy reward) are both judged by
``diffalign.shapes.verifier.verify_batch``. Printed: gold accuracy / score before and after, proxy
reward before and after, seconds per iteration. The gap between proxy gain and gold gain is the
over-optimization ReNO's regularizer is meant to limit (spec §7.5: selection by the optimized reward
is optimistic, hence the held-out gold verifier).

Defaults: the shapes pipeline is an ordinary 20-step DDIM model trained with caption dropout, not a
distilled one-step model, so ReNO runs it with ``--steps 4`` trailing-DDIM steps (every UNet call
checkpointed) and classifier-free guidance ``--guidance 5`` (the ``diffalign sample`` default); the
base sample is that same 4-step generator at iteration 0. ReNO's own optimizer settings are kept
(50 iterations, Nesterov SGD, lr 5, gradient clip 0.1, lambda 0.01).

    python scripts/reno_shapes_eval.py --model assets/shapes-sd --n 64 --iters 50 --steps 4 --out runs/reno-shapes

Several ``--reward`` specs (or one with ``key=A|B``) and ``--combine`` optimize a combination, e.g. UWO
over the four flawed ensemble members (docs/training.md, issue 17; ensembles are z-scored per prompt on
32 images of fresh noises); the first reward is the proxy reported before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffalign.errors import DiffalignError  # noqa: E402


def evaluate(args: argparse.Namespace) -> dict:
    from diffalign.gallery import save_grid
    from diffalign.pipelines import load_pipeline
    from diffalign.reno import RenoConfig, reno
    from diffalign.shapes import sample_prompts
    from diffalign.shapes.verifier import gold_accuracy, verify_batch
    from reward_models import get_reward

    model = Path(args.model)
    if not (model / "model_index.json").is_file() and args.model == "assets/shapes-sd":
        raise DiffalignError(
            "the shapes pipeline is missing at assets/shapes-sd; build it with "
            "`python scripts/train_shapes_sd.py --export assets/shapes-sd`, or pass --model DIR"
        )
    device = torch.device(args.device)
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device, scheduler="keep")
    from diffalign.combine import CombineOptions, reward_keys
    from reward_models import RewardSpec
    from reward_models.registry import expand_members

    specs = [RewardSpec.parse(r) for r in expand_members(args.reward or ["shapes_clip"])]
    rewards = [get_reward(s, device=device) for s in specs]
    names = reward_keys(specs, "--reward")
    name = names[0]  # the proxy reported before/after: the first reward (a single proxy, or member 1)
    options = CombineOptions(normalize="zscore") if args.combine in ("wco", "uwo", "ensemble_mean") else None
    prompts = sample_prompts("heldout", args.n, seed=args.prompt_seed)
    rows, initial, best = [], [], []
    out = Path(args.out) if args.out else None
    t_start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        for s in range(args.seeds):
            seed = args.seed + i * args.seeds + s
            cfg = RenoConfig(
                iters=args.iters,
                lr=args.lr,
                num_steps=args.steps,
                guidance_scale=args.guidance,
                reg_weight=args.reg_weight,
                seed=seed,
            )
            result = reno(
                pipe, prompt, rewards, [s.weight for s in specs], cfg, combine=args.combine, combine_options=options
            )
            initial.append(result.initial_image)
            best.append(result.best_image)
            rows.append(
                {
                    "prompt": prompt,
                    "seed": seed,
                    "best_iter": result.best_iter,
                    "proxy_before": result.initial_rewards[name],
                    "proxy_after": result.best_rewards[name],
                    "s_per_iter": sum(r.seconds for r in result.records) / len(result.records),
                }
            )
            done = len(rows)
            print(
                f"[{done}/{args.n * args.seeds}] {prompt!r} seed {seed}: {name} "
                f"{rows[-1]['proxy_before']:.4f} -> {rows[-1]['proxy_after']:.4f} (best at {result.best_iter})",
                flush=True,
            )
    all_prompts = [r["prompt"] for r in rows]
    v_before = verify_batch(torch.stack(initial), all_prompts)
    v_after = verify_batch(torch.stack(best), all_prompts)
    for row, vb, va in zip(rows, v_before, v_after, strict=True):
        row |= {"gold_before": vb.correct, "gold_after": va.correct, "gold_score_before": vb.score}
        row["gold_score_after"] = va.score
    n = len(rows)
    summary = {
        "model": args.model,
        "reward": [str(s) for s in specs],
        "reward_name": name,
        "combine": args.combine,
        "n_prompts": args.n,
        "seeds": args.seeds,
        "iters": args.iters,
        "steps": args.steps,
        "guidance": args.guidance,
        "gold_before": gold_accuracy(v_before),
        "gold_after": gold_accuracy(v_after),
        "proxy_before": sum(r["proxy_before"] for r in rows) / n,
        "proxy_after": sum(r["proxy_after"] for r in rows) / n,
        "s_per_iter": sum(r["s_per_iter"] for r in rows) / n,
        "wall_s": time.perf_counter() - t_start,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "results.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        k = min(n, 16)  # first 16 pairs: top row base samples, bottom row ReNO best
        save_grid(
            torch.stack(initial[:k] + best[:k]),
            out / "before_after.png",
            ncol=k,
            title=f"ReNO on {summary['combine']} of {', '.join(names)[:60]}, the first {k} images (one per column)",
            row_labels=["base sample (iteration 0)", "ReNO best"],
            captions=all_prompts[:k] * 2,
        )
    return summary


def report(summary: dict) -> str:
    gb, ga = summary["gold_before"], summary["gold_after"]

    def attrs(g: dict) -> str:
        return f"{g['count_acc']:.2f}/{g['color_acc']:.2f}/{g['shape_acc']:.2f}"

    lines = [
        f"ReNO on {summary['model']}: {summary['n_prompts']} held-out prompts x {summary['seeds']} seed(s), "
        f"{summary['iters']} iterations, {summary['steps']} step(s), guidance {summary['guidance']:g}",
        f"{'':26}{'base (it 0)':>16}{'ReNO best':>16}",
        f"{'gold accuracy':26}{gb['accuracy']:>16.3f}{ga['accuracy']:>16.3f}",
        f"{'gold score':26}{gb['score']:>16.3f}{ga['score']:>16.3f}",
        f"{'gold count/color/shape':26}{attrs(gb):>16}{attrs(ga):>16}",
        f"optimized: {summary['combine']} of {len(summary['reward'])} reward(s); proxy reported: the first",
        f"{'proxy ' + summary['reward_name'][:20]:26}{summary['proxy_before']:>16.4f}{summary['proxy_after']:>16.4f}",
        f"seconds per iteration: {summary['s_per_iter']:.3f}  (wall {summary['wall_s']:.0f} s)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/shapes-sd", help="shapes pipeline directory")
    p.add_argument(
        "--reward",
        action="append",
        help="proxy reward spec to optimize (differentiable; repeat for several, e.g. ensemble members; default "
        "shapes_clip); the first one is reported before/after",
    )
    p.add_argument(
        "--combine",
        default="weighted",
        help="how several rewards combine (reward.combine: weighted, wco, uwo, ...; ensembles are z-scored on "
        "32 images of fresh noises per prompt, UWO lambda 0.5, the ReNO default)",
    )
    p.add_argument("--n", type=int, default=64, help="held-out prompts")
    p.add_argument("--seeds", type=int, default=1, help="noise seeds per prompt")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the held-out prompt draw")
    p.add_argument("--seed", type=int, default=0, help="first noise seed")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--steps", type=int, default=4, help="trailing-DDIM sampling steps of the generator")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (<= 1: off)")
    p.add_argument("--lr", type=float, default=5.0)
    p.add_argument("--reg-weight", type=float, default=0.01)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", help="write results.jsonl, summary.json and before_after.png here")
    args = p.parse_args(argv)
    try:
        if args.n < 1 or args.seeds < 1:
            raise DiffalignError("--n and --seeds must be >= 1")
        summary = evaluate(args)
    except DiffalignError as err:
        print(f"reno_shapes_eval: error: {err}", file=sys.stderr)
        return 2
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
