"""``diffalign reno``: the argparse subcommand (:func:`register`, :func:`run`) and the output files.

Per prompt, ``OUT/<index>_<slug>/`` holds best.png, final.png, initial.png, strip.png and
rewards.jsonl (:func:`save_result`); ``OUT/summary.jsonl`` one :func:`summary_row` per prompt.
:func:`check_out_dir` refuses, before any model loads, an ``--out`` that cannot hold them, and
:func:`_writing` turns a failed write into a one-line :class:`DiffalignError`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.combine import CombineOptions, build_combiner, combiner_names
from diffalign.config import section_from_pairs
from diffalign.errors import DiffalignError
from diffalign.paths import check_output_path
from diffalign.reno.api import reno
from diffalign.reno.core import RenoConfig, RenoResult
from diffalign.reno.rewards import build_rewards, check_differentiable

EPILOG = """example:
  diffalign reno --model stabilityai/sd-turbo --device cuda --dtype float16 \\
      --prompt "a photo of a red cube on top of a blue sphere" \\
      --reward clip_score:model=ViT-B-32,pretrained=openai,weight=1 --reward hps:weight=5 \\
      --iters 50 --lr 5 --out outputs/reno

  diffalign reno --model assets/shapes-sd --prompts prompts.txt --reward shapes_clip --steps 4 --guidance 5 \\
      --out outputs/reno

outputs, per prompt in OUT/<index>_<slug>/: best.png (lowest reward loss), final.png, initial.png,
strip.png (every --strip-every iterations), rewards.jsonl (one line per iteration); and
OUT/summary.jsonl (initial and best reward per reward, per prompt). Only differentiable rewards
can be optimized; see reward_models/README.md for the rewards and their options."""


# ------------------------------------------------------------------------------------------------ output
def strip_image(
    strip: Sequence[tuple[int, torch.Tensor]],
    min_side: int = 96,
    title: str | None = None,
    labels: dict[int, str] | None = None,
):
    """The strip images side by side (upscaled to ``min_side`` px), each labelled with its iteration
    (and ``labels[iteration]``, e.g. its reward, under it), under a ``title`` line (e.g. the prompt)."""
    from diffalign.gallery.grids import captioned_grid

    images = torch.stack([img.detach().float().cpu() for _, img in strip])
    scale = max(1, math.ceil(min_side / min(images.shape[-2:])))
    captions = [f"it {it}" + (f" {labels[it]}" if labels and it in labels else "") for it, _ in strip]
    return captioned_grid(images, len(strip), title=title, captions=captions, scale=scale)[0]


_OUT_MESSAGES = {  # check_out_dir's wording (diffalign.paths.OUTPUT_MESSAGES otherwise)
    "wrong_kind": "{what} {out} is an existing file, not a directory; {fix}",
    "entry_not_dir": "{entry} is a file, but ReNO writes its results into a folder there; {fix}",
    "entry_not_file": "{entry} is a directory, but ReNO writes a file there; {fix}",
}


@contextlib.contextmanager
def _writing(where: Path) -> Iterator[None]:
    """Turn a failed write under ``where`` (disk full, permissions, a file in the way) into a one-line error."""
    from diffalign.checkpoint import is_write_failure, one_line, write_fix

    try:
        yield
    except Exception as err:
        if not is_write_failure(err):
            raise
        raise DiffalignError(
            f"cannot write ReNO results to {where} ({one_line(err)}); {write_fix(err, where)} or choose another --out"
        ) from None


def check_out_dir(out: Path, dirs: Sequence[str] = ()) -> None:
    """Refuse, before any model loads, an ``--out`` that cannot hold the results.

    ``out`` must be a directory or creatable (no file at it or among its parents) and writable; the
    per-prompt folders ``dirs`` inside it and ``summary.jsonl`` must not be of the wrong kind.
    Nothing is created or changed here (:func:`diffalign.paths.check_output_path`).
    """
    check_output_path(
        out,
        "--out",
        "choose another --out",
        entries={**dict.fromkeys(dirs, "dir"), "summary.jsonl": "file"},
        messages=_OUT_MESSAGES,
    )


def result_dir_name(index: int, prompt: str) -> str:
    """The folder of prompt number ``index`` inside ``--out``: ``000_a-red-circle``."""
    from diffalign.gallery import slug

    return f"{index:03d}_{slug(prompt)}"


def save_result(result: RenoResult, out_dir: Path) -> Path:
    """Write best.png, final.png, initial.png, strip.png and rewards.jsonl into ``out_dir``.

    A failed write (disk full, not writable, a file where a folder belongs) is a :class:`DiffalignError`.
    """
    from diffalign.gallery import to_pil

    with _writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        to_pil(result.best_image).save(out_dir / "best.png")
        to_pil(result.final_image).save(out_dir / "final.png")
        to_pil(result.initial_image).save(out_dir / "initial.png")
        name = next(iter(result.records[0].rewards), None) if result.records else None
        labels = {r.iter: f"{name} {r.rewards[name]:.3g}" for r in result.records if name in r.rewards}
        title = f"ReNO: {result.prompt} (best: iteration {result.best_iter})"
        strip_image(result.strip, title=title, labels=labels).save(out_dir / "strip.png")
        with (out_dir / "rewards.jsonl").open("w", encoding="utf-8") as fh:
            for rec in result.records:
                fh.write(json.dumps(rec.to_json()) + "\n")
    return out_dir


def summary_row(index: int, result: RenoResult, out_dir: Path) -> dict[str, Any]:
    return {
        "index": index,
        "prompt": result.prompt,
        "dir": out_dir.name,
        "best_iter": result.best_iter,
        "initial": result.initial_rewards,
        "best": result.best_rewards,
        "initial_loss": result.records[0].loss_reward,
        "best_loss": result.best_loss,
        "seconds_per_iter": sum(r.seconds for r in result.records) / len(result.records),
    }


# --------------------------------------------------------------------------------------------------- cli
def run(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign reno`` (``args`` from the parser :func:`register` builds)."""
    from diffalign.cli import read_prompts
    from diffalign.pipelines import load_pipeline, lora_rank
    from reward_models import RewardSpec
    from reward_models.registry import expand_members

    prompts = read_prompts(args.prompt, args.prompts)
    out = Path(args.out)
    check_out_dir(out, [result_dir_name(i, p) for i, p in enumerate(prompts)])
    cfg = RenoConfig(
        iters=args.iters,
        lr=args.lr,
        optimizer=args.optimizer,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        reg_weight=args.reg_weight,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        size=args.size,
        strip_every=args.strip_every,
        checkpoint=not args.no_checkpoint,
    )
    specs = [RewardSpec.parse(s) for s in expand_members(args.reward)]
    check_differentiable(specs)  # before loading anything
    combine_options = section_from_pairs(CombineOptions, args.combine_option or [], "combine_options")
    positions = [f"reward{i}" for i in range(len(specs))]  # the combiner's checks need the count and the weights
    build_combiner(args.combine, positions, [s.weight for s in specs], combine_options, context="reno")
    if args.lora:
        lora_rank(args.lora)  # a missing or damaged LoRA file fails here, before the model loads
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError) as err:
        raise DiffalignError(f"unknown device {args.device!r}: {err}") from None
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device, scheduler="keep")  # see noise_scale
    rewards, weights, names = build_rewards(list(args.reward), None, device)
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(prompts):
        result = reno(
            pipe,
            prompt,
            rewards,
            weights,
            cfg,
            lora=args.lora,
            progress=True,
            combine=args.combine,
            combine_options=combine_options,
        )
        out_dir = save_result(result, out / result_dir_name(i, prompt))
        rows.append(summary_row(i, result, out_dir))
        gains = ", ".join(f"{n} {result.initial_rewards[n]:.4g} -> {result.best_rewards[n]:.4g}" for n in names)
        print(f"[{i + 1}/{len(prompts)}] {prompt!r}: best at iteration {result.best_iter}: {gains}")
    with _writing(out), (out / "summary.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {len(prompts)} result folder(s) and summary.jsonl to {out}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reno`` subcommand to an ``argparse`` subparsers object; ``func`` is :func:`run`."""
    d = RenoConfig()
    p = subparsers.add_parser(
        "reno",
        help="optimize the initial noise of a one-/few-step model for rewards (ReNO, no training)",
        description="ReNO (Eyring et al. 2024): per prompt, optimize the initial noise of a frozen one-step or "
        "few-step generator with differentiable rewards and a noise-norm regularizer; keep the best image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line")
    p.add_argument("--model", required=True, metavar="ID_OR_PATH", help="hub id or local diffusers pipeline directory")
    p.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[:key=value,...,weight=W]",
        help="a differentiable reward spec; repeat for several (weights via weight=W, default 1)",
    )
    p.add_argument(
        "--combine",
        default="weighted",
        choices=combiner_names(),
        help="how the rewards combine (docs/training.md, 'Combining rewards'; default weighted: sum_i w_i r_i)",
    )
    p.add_argument(
        "--combine-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the combiner (reward.combine_options in training), e.g. uwo_lambda=0.5; repeatable",
    )
    p.add_argument(
        "--iters", type=int, default=d.iters, help=f"iterations (iters - 1 optimizer steps; default {d.iters})"
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate on the noise (default {d.lr:g})")
    p.add_argument(
        "--optimizer", choices=("sgd", "adam"), default=d.optimizer, help="sgd (Nesterov, momentum 0.9) or adam"
    )
    p.add_argument(
        "--grad-clip", type=float, default=d.grad_clip, help="max gradient norm of z; 0 disables (default 0.1)"
    )
    p.add_argument(
        "--reg-weight", type=float, default=d.reg_weight, help="lambda of the noise regularizer (default 0.01)"
    )
    p.add_argument(
        "--steps", type=int, default=d.num_steps, help="sampling steps, trailing DDIM (default 1: Turbo models)"
    )
    p.add_argument("--guidance", type=float, default=d.guidance_scale, help="CFG scale; <= 1 disables (default 0)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initial noise (default 0)")
    p.add_argument("--strip-every", type=int, default=d.strip_every, help="strip.png shows every N-th iteration")
    p.add_argument(
        "--no-checkpoint", action="store_true", help="disable activation checkpointing (faster, more memory)"
    )
    p.add_argument("--lora", metavar="DIR", help="LoRA directory (diffusers format) applied to the model")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16 or bfloat16 (default float32)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=run)
    return p
