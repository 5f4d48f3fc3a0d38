"""``diffalign train``: fine-tune a LoRA with a registered method (reward backprop: AlignProp, DRaFT-K/LV,
ReFL; policy gradient: DDPO; or a plugin's, from ``plugins:`` in the config or ``DIFFALIGN_PLUGINS``)."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

EPILOG = """examples:
  diffalign train --config configs/shapes/alignprop.yaml
  diffalign train --config configs/shapes/ddpo.yaml --output-dir runs/ddpo-lr3e-4 train.lr=3e-4 train.steps=40
  diffalign train --config configs/shapes/draft_k.yaml --resume latest        # continue after a crash or kill
  accelerate launch --multi_gpu --num_processes 2 -m diffalign train --config configs/gpu/sd15_alignprop_pickscore.yaml

overrides are section.key=value (train.lr=1e-3, model.lora.rank=16, eval.seeds=[0,1,2],
reward.rewards=[shapes_clip]); see docs/training.md for every key. Outputs in the output directory:
config.yaml (resolved), metrics.jsonl, eval.jsonl, samples/eval_step_N.png, checkpoints/step_N/, lora/.

methods (train.method; its options live in the config section shown):
{methods}
a method of your own: register it in a module (docs/training.md) and list the module in the config's
plugins: [my_pkg.my_method], or in DIFFALIGN_PLUGINS=my_pkg.my_method (comma-separated) for this command."""


def _methods() -> list[Any]:
    """The registered methods, with those of DIFFALIGN_PLUGINS when they import (``run`` reports failures)."""
    from diffalign.methods import load_plugins, registered_methods
    from diffalign.methods.registry import PLUGINS_ENV, plugins_from_env

    with contextlib.suppress(Exception):  # the help must not fail; run() raises the one-line error
        load_plugins(plugins_from_env(), PLUGINS_ENV)
    return registered_methods()


def _method_lines(entries: list[Any]) -> str:
    """One help line per method: name, config section, the rewards it accepts."""
    width = max(len(e.name) for e in entries)
    swidth = max(len(e.section) for e in entries) + 1
    lines = []
    for e in entries:
        reward = "needs a differentiable reward" if e.needs_differentiable_reward else "any reward"
        lines.append(f"  {e.name:<{width}}  {e.section + ':':<{swidth}}  {reward}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``diffalign train ...`` without the leading ``diffalign``."""
    from diffalign.cli import main as cli_main

    return cli_main(["train", *(argv or [])])


def run(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign train`` (``args`` from the parser :func:`register` builds)."""
    from diffalign.config import DiffalignConfig
    from diffalign.methods import load_plugins
    from diffalign.methods.registry import PLUGINS_ENV, plugins_from_env
    from diffalign.trainer import Trainer

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"checkpoint.output_dir={args.output_dir}")
    env_plugins = plugins_from_env()
    load_plugins(env_plugins, PLUGINS_ENV)  # errors name the variable; the config records them in plugins:
    cfg = DiffalignConfig.from_yaml(args.config, overrides, plugins=env_plugins)
    Trainer(cfg, resume=args.resume).run()
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand; ``func`` is :func:`run`."""
    entries = _methods()
    parser = subparsers.add_parser(
        "train",
        help=f"train a LoRA against rewards ({', '.join(e.name for e in entries)})",
        description="Fine-tune a LoRA on a diffusers pipeline against one or more rewards.",
        epilog=EPILOG.format(methods=_method_lines(entries)),
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
