"""The ``diffalign`` command: one entry point, one subcommand per job.

    diffalign sample --model assets/shapes-sd --prompt "a red circle" --n 8 --out outputs/samples
    diffalign score  --reward shapes_gold --images outputs/samples --prompts prompts.txt --out scores.csv
    diffalign reno   --model assets/shapes-sd --prompt "two blue squares" --reward shapes_clip --out outputs/reno
    diffalign train  --config configs/shapes/draft_k.yaml        (alignprop, draft_k, draft_lv, refl, ddpo)

Errors the user can fix (a wrong path, an unknown reward, a bad option) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from diffalign.errors import DiffalignError

# Subcommands living in their own modules, each exposing register(subparsers).
_MODULES = ("diffalign.scoring", "diffalign.reno", "diffalign.train")


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """Prompts from --prompt or a text file (one per line); errors name the fix."""
    if prompt is not None:
        if not prompt.strip():
            raise DiffalignError("--prompt is empty; pass some text, e.g. --prompt 'a red circle'")
        return [prompt]
    if prompts_file is None:
        raise DiffalignError("give --prompt TEXT or --prompts FILE")
    path = Path(prompts_file)
    if not path.is_file():
        raise DiffalignError(f"prompt file {prompts_file} does not exist")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise DiffalignError(f"prompt file {prompts_file} has no prompts: write one prompt per line")
    return lines


def _sample(args: argparse.Namespace) -> int:
    import torch

    from diffalign.gallery import save_grid, save_images
    from diffalign.pipelines import load_lora, load_pipeline

    prompts = read_prompts(args.prompt, args.prompts)
    pipe = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    if args.lora:
        load_lora(pipe, args.lora)
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    images, captions = [], []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(args.device).manual_seed(args.seed + i)
        batch = pipe(
            [prompt] * args.n, num_inference_steps=args.steps, guidance_scale=args.cfg, generator=gen, output_type="pt"
        ).images
        images.append(batch.cpu())
        captions += [prompt] * args.n
    images = torch.cat(images)
    files = save_images(images, out, captions)
    save_grid(images, out / "grid.png", ncol=args.n)
    print(f"wrote {len(files)} images and grid.png to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffalign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from diffalign import __version__

    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "sample",
        help="generate images from a pipeline (optionally with a LoRA)",
        epilog="example: diffalign sample --model assets/shapes-sd --prompt 'two red circles' --n 8 --out outputs/samples",
    )
    p.add_argument("--model", required=True, help="hub id or local diffusers pipeline directory")
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", help="LoRA directory (diffusers format) to apply")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_sample)
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DiffalignError as exc:
        print(f"diffalign {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
