"""``diffalign train``: fine-tune a LoRA with reward backprop (AlignProp, DRaFT-K/LV, ReFL) or DDPO."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  diffalign train --config configs/shapes/alignprop.yaml
  diffalign train --config configs/shapes/ddpo.yaml --output-dir runs/ddpo-lr3e-4 train.lr=3e-4 train.steps=40
  diffalign train --config configs/shapes/draft_k.yaml --resume latest        # continue after a crash or kill
  accelerate launch --multi_gpu --num_processes 2 -m diffalign train --config configs/gpu/sd15_alignprop_pickscore.yaml

overrides are section.key=value (train.lr=1e-3, model.lora.rank=16, eval.seeds=[0,1,2],
reward.rewards=[shapes_clip]); see docs/training.md for every key. Outputs in the output directory:
config.yaml (resolved), metrics.jsonl, eval.jsonl, samples/eval_step_N.png, checkpoints/step_N/, lora/."""


def main(argv: list[str] | None = None) -> int:
    """``diffalign train ...`` without the leading ``diffalign``."""
    from diffalign.cli import main as cli_main

    return cli_main(["train", *(argv or [])])


def run(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign train`` (``args`` from the parser :func:`register` builds)."""
    from diffalign.config import DiffalignConfig
    from diffalign.trainer import Trainer

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"checkpoint.output_dir={args.output_dir}")
    cfg = DiffalignConfig.from_yaml(args.config, overrides)
    Trainer(cfg, resume=args.resume).run()
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand; ``func`` is :func:`run`."""
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA against rewards (alignprop, draft_k, draft_lv, refl, ddpo)",
        description="Fine-tune a LoRA on a diffusers pipeline against one or more rewards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML config (see configs/)")
    parser.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="continue from the newest checkpoint in the output directory, or from OUT/checkpoints/step_N",
    )
    parser.add_argument("--output-dir", metavar="DIR", help="overrides checkpoint.output_dir")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-3")
    parser.set_defaults(func=run)
    return parser
