"""Where a LoRA's gold gain comes from: gold accuracy of a base pipeline and of trained LoRAs on the shapes
world's training and held-out compositions, by scene kind (one object, "two X", two different objects).

    python scripts/gold_by_kind.py --model assets/shapes-flow --lora runs/shapes-flow-nft --seeds 3
    python scripts/gold_by_kind.py --model assets/shapes-sd --lora runs/shapes-grpo/lora --every 3 --json out.json

The held-out split (diffalign.shapes.splits) holds two-object scenes only: pairs of object types that never
co-occur in training and a few "two X" scenes. A run's own evaluation (``eval.jsonl``) scores that split; this
script also scores the training compositions, so that a gain a method makes on the prompts it trained on (a
single object drawn once instead of twice, say) is told apart from a gain that generalizes to unseen
compositions. Images are drawn as a run's evaluation draws them (:func:`diffalign.evaluation.generate_images`:
the sampler's deterministic chain at ``--eta``, one generator per (prompt, seed)), so base and LoRA rows see
the same initial noise. ``--lora`` takes a LoRA directory or file, or a run directory (its final LoRA).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffalign.errors import DiffalignError  # noqa: E402

KINDS = ("single", "two", "pair")


def scene_kind(prompt: str) -> str:
    """'single' (one object), 'two' (two objects of one type) or 'pair' (two different objects)."""
    from diffalign.shapes import parse_caption

    groups = parse_caption(prompt).groups
    if len(groups) > 1:
        return "pair"
    return "two" if groups[0].count == 2 else "single"


def summarize(prompts: list[str], verdicts: list[Any]) -> dict[str, Any]:
    """Accuracy (and count / color / shape accuracy) over all images and per scene kind present."""

    def stats(vs: list[Any]) -> dict[str, Any]:
        n = len(vs)
        return {
            "n": n,
            "accuracy": sum(v.correct for v in vs) / n,
            "count": sum(v.count_ok for v in vs) / n,
            "color": sum(v.color_ok for v in vs) / n,
            "shape": sum(v.shape_ok for v in vs) / n,
        }

    kinds = [scene_kind(p) for p in prompts]
    out = {"all": stats(verdicts)}
    for kind in KINDS:
        mine = [v for k, v in zip(kinds, verdicts, strict=True) if k == kind]
        if mine:
            out[kind] = stats(mine)
    return out


def lora_path(given: str) -> Path:
    """A LoRA file or directory as given, or a run directory's final LoRA (its newest checkpoint's while the run
    is unfinished: :meth:`diffalign.gallery.rundir.RunDir.lora`); a missing path is a one-line error."""
    path = Path(given)
    if (path / "config.yaml").is_file():
        from diffalign.gallery.rundir import RunDir

        return RunDir.open(path).lora()[0]
    if not path.exists():
        raise DiffalignError(f"--lora {given}: no such file or directory (give a LoRA directory or a run directory)")
    return path


@torch.no_grad()
def measure(
    model: str,
    lora: str | None,
    splits: list[str],
    seeds: int,
    every: int,
    steps: int,
    cfg: float,
    eta: float,
    batch_size: int = 48,
) -> dict[str, Any]:
    """Gold statistics of ``model`` (with ``lora`` loaded when given) per split."""
    from diffalign.config import SampleConfig
    from diffalign.evaluation import PipelineSampler, generate_images
    from diffalign.pipelines import load_lora, load_pipeline
    from diffalign.shapes import split_prompts
    from diffalign.shapes.verifier import verify_batch

    pipe = load_pipeline(model, device="cpu")
    if lora is not None:
        load_lora(pipe, lora_path(lora))
    ctx = PipelineSampler(pipe, SampleConfig(steps=steps, guidance_scale=cfg, eta=eta))
    result: dict[str, Any] = {}
    for split in splits:
        prompts = split_prompts(split)[::every]
        items = [(i, s) for i in range(len(prompts)) for s in range(seeds)]
        images = generate_images(ctx, prompts, items, eta, batch_size=batch_size)
        drawn = [prompts[i] for i, _ in items]
        result[split] = summarize(drawn, verify_batch(images, drawn))
    return result


def table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per (model, split), accuracy overall and per kind (count / color / shape)."""
    lines = ["| model | split | images | gold | single | two | pair |", "|---|---|---|---|---|---|---|"]
    for name, splits in rows.items():
        for split, s in splits.items():
            cells = [
                f"{s[k]['accuracy']:.3f} ({s[k]['count']:.2f} / {s[k]['color']:.2f} / {s[k]['shape']:.2f})"
                if k in s
                else "-"
                for k in KINDS
            ]
            lines.append(
                f"| {name} | {split} | {s['all']['n']} | {s['all']['accuracy']:.3f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="assets/shapes-sd", help="pipeline directory or hub id")
    p.add_argument("--lora", action="append", default=[], help="a LoRA or run directory; repeat for several")
    p.add_argument("--splits", nargs="+", default=["train", "heldout"], choices=["train", "heldout"])
    p.add_argument("--seeds", type=int, default=3, help="images per prompt (evaluation seeds 0..N-1)")
    p.add_argument("--every", type=int, default=1, help="every k-th prompt of each split (1: all)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=0.0, help="0: the deterministic sampler, as the configs' evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--batch-size",
        type=int,
        default=48,
        help="images per sampling batch (30: a run's evaluation batches, whose images it then repeats bit for bit)",
    )
    p.add_argument("--no-base", action="store_true", help="skip the base pipeline's row")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.every < 1 or args.batch_size < 1:
        raise SystemExit("gold_by_kind: --seeds, --every and --batch-size must be >= 1")
    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, Any]] = {}
    try:
        for lora in ([] if args.no_base else [None]) + args.lora:
            name = "base" if lora is None else lora
            rows[name] = measure(
                args.model, lora, args.splits, args.seeds, args.every, args.steps, args.cfg, args.eta, args.batch_size
            )
            print(f"gold_by_kind: measured {name}", file=sys.stderr, flush=True)
    except DiffalignError as exc:
        raise SystemExit(f"gold_by_kind: {exc}") from None
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
