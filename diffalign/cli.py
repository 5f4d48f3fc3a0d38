"""The ``diffalign`` command: one entry point, one subcommand per job.

    diffalign sample --model assets/shapes-sd --prompt "a red circle" --n 8 --out outputs/samples
    diffalign sample --run runs/shapes-alignprop --out outputs/eval-redrawn   (a run's evaluation images)
    diffalign score  --reward shapes_gold --images outputs/samples --prompts outputs/samples/prompts.jsonl --out scores.csv
    diffalign reno   --model assets/shapes-sd --prompt "two blue squares" --reward shapes_clip --out outputs/reno
    diffalign train  --config configs/shapes/draft_k.yaml        (the methods: diffalign train --help)
    diffalign prefs  --model assets/shapes-sd --prompts shapes:train --reward shapes_gold:mode=correct --out data/prefs
    diffalign label  --pairs data/pairs/pairs.jsonl --out data/pairs/labels.jsonl
    diffalign gallery --run runs/shapes-alignprop --reward shapes_clip --out outputs/gallery   (HTML page, scores)
    diffalign plot   --run runs/shapes-alignprop --run runs/shapes-ddpo --out outputs/curves   (training curves)

Errors the user can fix (a wrong path, an unknown reward, a bad option) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffalign.errors import DiffalignError
from diffalign.paths import check_output_path

# Subcommands living in their own modules, each exposing register(subparsers).
_MODULES = ("diffalign.scoring", "diffalign.reno", "diffalign.train", "diffalign.prefs", "diffalign.gallery.cli")

PROMPTS_JSONL = "prompts.jsonl"
GRID_PATH = Path("grid") / "grid.png"  # a subfolder: `diffalign score --images OUT` does not read it

SAMPLE_EPILOG = """examples:
  diffalign sample --model assets/shapes-sd --prompt 'two red circles' --n 8 --out outputs/samples
  diffalign score --reward shapes_gold --images outputs/samples \\
      --prompts outputs/samples/prompts.jsonl --out outputs/scores.csv
  diffalign sample --run runs/shapes-alignprop --out outputs/eval-final          # the final evaluation's images
  diffalign sample --run runs/shapes-alignprop --step 0 --out outputs/eval-base  # step 0: the base model

--run DIR redraws a training run's evaluation images: its eval prompts and seeds (DIR/eval_prompts.jsonl),
its sampler (sample.steps, sample.guidance_scale, eval.eta or sample.eta, negative prompt) and model from
DIR/config.yaml, the LoRA of --step (default: the final DIR/lora), and the generator seed of each image
(seed * 1000003 + prompt index, as the evaluation draws it); image k is prompt k // S, seed k % S (S seeds).
The model, prompt and sampler options do not go with --run.

writes into --out (a new directory, or one without images or prompts.jsonl; nothing is overwritten):
  NNNNN_<prompt-slug>.png  the images; image j of prompt i is number k = i*n + j
  prompts.jsonl            one {"file": ..., "prompt": ..., "seed": ...} object per image,
                           ready for `diffalign score --prompts`
  sample.json              the options of this run
  grid/grid.png            all images, one row per prompt (left out with --no-grid)

seeds: image k (image j of prompt i, k = i*n + j) is drawn with seed --seed + k: its own CPU
torch.Generator draws its initial noise and, with --eta > 0, its DDIM noise. So --batch-size changes
no image beyond float rounding of batched kernels (at most 1/255 on a few pixels), and
`--prompt P --n 1 --seed S` with the run's other options redraws the image whose seed is S in
prompts.jsonl (the run's options are in sample.json)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's line breaks; appends ``(default: X)`` to options that have one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """Prompts from --prompt or a UTF-8 text file (one per line); errors name the fix."""
    if prompt is not None:
        if not prompt.strip():
            raise DiffalignError("--prompt is empty; pass some text, e.g. --prompt 'a red circle'")
        return [prompt]
    if prompts_file is None:
        raise DiffalignError("give --prompt TEXT or --prompts FILE")
    path = Path(prompts_file)
    if path.is_dir():
        raise DiffalignError(f"prompt file {prompts_file} is a directory; give a text file with one prompt per line")
    if not path.is_file():
        raise DiffalignError(f"prompt file {prompts_file} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DiffalignError(
            f"prompt file {prompts_file} is not UTF-8 text ({err.reason} at byte {err.start}); "
            "save it as UTF-8 with one prompt per line"
        ) from None
    except OSError as err:
        raise DiffalignError(f"cannot read prompt file {prompts_file}: {err.strerror or err}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DiffalignError(f"prompt file {prompts_file} has no prompts: write one prompt per line")
    return lines


_WRITABLE_DIR_MESSAGES = {  # check_writable_dir's wording (diffalign.paths.check_output_path)
    "wrong_kind": "{what} {out!r} is an existing file; give a directory path",
    "parent_file": "cannot create {what} {out!r}: {existing!r} is a file, not a directory",
    "not_writable": "cannot write {what} {out!r}: {existing!r} is not writable; pick another",
}


def check_writable_dir(path: Path, what: str = "output directory") -> Path:
    """Check that directory ``path`` exists or can be created, without creating it; returns it.

    Raises DiffalignError when ``path`` is an existing file, when one of its parents is a file, or
    when the nearest existing parent is not writable.
    """
    return check_output_path(path, what, messages=_WRITABLE_DIR_MESSAGES, absolute=True)


def make_dir(path: Path, what: str = "output directory") -> Path:
    """``mkdir -p path`` with a one-line DiffalignError when it fails."""
    check_writable_dir(path, what)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiffalignError(f"cannot create {what} {str(path)!r}: {err.strerror or err}") from None
    return Path(path)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"64"`` -> (64, 64), ``"48x64"`` -> (48, 64) (height x width), None -> None; one-line errors."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise DiffalignError(f"--size {text!r} is not a size; give HxW in pixels (e.g. 512x768) or one side (512)")
    return (values[0], values[-1])


def check_size(size: tuple[int, int], vae_scale_factor: int) -> None:
    """Height and width must be multiples of the VAE scale factor and of 8 (diffusers' pipelines check 8)."""
    multiple = math.lcm(8, int(vae_scale_factor))
    bad = [v for v in size if v % multiple]
    if bad:
        lower, upper = bad[0] // multiple * multiple, (bad[0] // multiple + 1) * multiple
        near = f"{lower} or {upper}" if lower else str(upper)
        raise DiffalignError(
            f"--size {size[0]}x{size[1]}: {bad[0]} is not a multiple of {multiple} (this pipeline's VAE scale "
            f"factor is {vae_scale_factor} and diffusers needs multiples of 8); try {near}"
        )


def parse_device(text: str, fix: str = "use e.g. cpu or cuda") -> Any:
    """A ``torch.device`` from --device, with one-line errors for a bad name (ending in ``; fix`` unless
    ``fix`` is empty) or missing CUDA."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as err:
        raise DiffalignError(f"unknown device {text!r}: {err}" + (f"; {fix}" if fix else "")) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffalignError(f"device {text!r} requested but CUDA is not available; use --device cpu")
    return device


def image_seed(base_seed: int, prompt_index: int, image_index: int, n: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index``: ``base_seed + prompt_index * n + image_index``."""
    return base_seed + prompt_index * n + image_index


def _check_sample_args(args: argparse.Namespace) -> None:
    for option, value in (("--n", args.n), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise DiffalignError(f"{option} must be at least 1, got {value}")
    if not 0.0 <= args.eta <= 1.0:
        raise DiffalignError(f"--eta must be between 0 (deterministic DDIM) and 1 (DDPM-like), got {args.eta:g}")


def _existing_outputs(out: Path) -> list[str]:
    from diffalign.scoring import IMAGE_SUFFIXES

    if not out.is_dir():
        return []
    ours = {PROMPTS_JSONL, "sample.json", GRID_PATH.parent.name}
    try:
        names = [
            p.name for p in out.iterdir() if p.name in ours or (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        ]
    except OSError as err:
        raise DiffalignError(f"cannot list --out {str(out)!r}: {err.strerror or err}") from None
    return sorted(names)


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """Turn an OSError while writing into ``out`` into a one-line DiffalignError."""
    try:
        yield
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        raise DiffalignError(f"cannot write into --out {str(out)!r}{where}: {err.strerror or err}") from None


_RUN_SETS = ("--model", "--lora", "--n", "--steps", "--guidance", "--eta", "--size", "--negative-prompt", "--seed")


class _Given(argparse.Action):
    """``store``, and remember that the option was given (``args.given``): --run refuses sampler options."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def _check_out(out: Path) -> Path:
    out = check_writable_dir(out, "--out directory")
    existing = _existing_outputs(out)
    if existing:
        raise DiffalignError(
            f"--out {str(out)!r} already holds {len(existing)} earlier output file(s) (first: {existing[0]}); "
            "pass a new --out directory, nothing is overwritten"
        )
    return out


def _sample_run(args: argparse.Namespace) -> int:
    """``diffalign sample --run DIR``: the run's evaluation images, drawn as its evaluation draws them."""
    import torch

    from diffalign.evaluation import PipelineSampler, generate_images, generator_seed
    from diffalign.gallery import save_grid, save_images
    from diffalign.gallery.rundir import RunDir
    from diffalign.pipelines import load_lora, load_pipeline, lora_rank

    given = [
        opt
        for opt in _RUN_SETS
        if opt[2:].replace("-", "_") in getattr(args, "given", set())
        or (opt in ("--model", "--lora", "--size", "--negative-prompt") and getattr(args, opt[2:].replace("-", "_")))
    ]
    if given:
        raise DiffalignError(
            f"{given[0]} does not go with --run: the run's config.yaml sets the model, sampler and prompts "
            "(use --step N for another checkpoint's LoRA)"
        )
    batch_size = args.batch_size if "batch_size" in getattr(args, "given", set()) else None
    if batch_size is not None and batch_size < 1:
        raise DiffalignError(f"--batch-size must be at least 1, got {batch_size}")
    run = RunDir.open(args.run)
    lora, step = run.lora(args.step)
    if lora is not None:
        lora_rank(lora)  # a missing or damaged LoRA file fails here, before the model loads
    prompts, seeds = run.eval_items()
    device = parse_device(args.device)
    out = _check_out(Path(args.out))
    cfg = run.config
    pipe = load_pipeline(cfg.model.pretrained, dtype=run.dtype(), device=device, attention=cfg.model.attention)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        load_lora(pipe, lora)
    items = [(i, s) for i in range(len(prompts)) for s in seeds]
    with torch.no_grad():
        images = generate_images(
            PipelineSampler(pipe, cfg.sample), prompts, items, run.eval_eta(), batch_size or cfg.eval.batch_size
        )
    make_dir(out, "--out directory")
    settings = {"run": str(run.path), "step": step, "lora": str(lora) if lora else None, "seeds": seeds}
    with _writing(out):
        (out / "sample.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        paths = save_images(images, out, [prompts[i] for i, _ in items])
        with (out / PROMPTS_JSONL).open("w", encoding="utf-8") as index:
            for (i, seed), path in zip(items, paths, strict=True):
                row = {"file": path.name, "prompt": prompts[i], "seed": seed, "prompt_index": i}
                index.write(json.dumps(row | {"generator_seed": generator_seed(seed, i), "step": step}) + "\n")
        if not args.no_grid:
            title = f"{run.label} step {step}: evaluation images redrawn"
            cols = [f"seed {s}" for s in seeds]
            save_grid(
                images,
                out / GRID_PATH,
                ncol=len(seeds),
                title=title,
                row_labels=prompts,
                col_labels=cols,
                layout_json=True,
            )
    what = f"the LoRA {lora}" if lora else "the base model (step 0)"
    print(f"diffalign sample: wrote the {len(items)} evaluation images of {run.path} with {what} to {out}")
    print(f"  {len(prompts)} prompts x seeds {seeds}; sampler and generator seeds as in its evaluation")
    if not args.no_grid:
        print(f"  grid (one row per prompt): {out / GRID_PATH}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign sample``: images, prompts.jsonl, sample.json and grid/grid.png in --out."""
    import torch

    from diffalign.gallery import save_grid, save_images
    from diffalign.pipelines import draw_images, load_lora, load_pipeline

    if args.run is not None:
        return _sample_run(args)
    if args.step is not None:
        raise DiffalignError("--step goes with --run DIR only (it picks a checkpoint of that run)")
    if args.model is None:
        raise DiffalignError("give --model ID_OR_PATH (or --run DIR to redraw a training run's evaluation images)")
    prompts = read_prompts(args.prompt, args.prompts)
    _check_sample_args(args)
    size = parse_size(args.size)
    device = parse_device(args.device)
    out = _check_out(Path(args.out))
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device)
    if size is not None:
        check_size(size, pipe.vae_scale_factor)
    if args.lora:
        load_lora(pipe, args.lora)
    pipe.set_progress_bar_config(disable=True)

    # image k = i * n + j: prompt i, image j, seed --seed + k
    jobs = [(prompt, image_seed(args.seed, i, j, args.n)) for i, prompt in enumerate(prompts) for j in range(args.n)]
    make_dir(out, "--out directory")
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "run", "step", "given", "argv")}
    kept: list[torch.Tensor] = []
    shape = (0, 0)
    with _writing(out):
        (out / "sample.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        index = (out / PROMPTS_JSONL).open("w", encoding="utf-8")
    with index:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            images = draw_images(
                pipe,
                [prompt for prompt, _ in batch],
                [seed for _, seed in batch],
                steps=args.steps,
                guidance=args.guidance,
                eta=args.eta,
                negative_prompt=args.negative_prompt,
                size=size,
            )
            shape = tuple(images.shape[-2:])
            with _writing(out):
                paths = save_images(images, out, [prompt for prompt, _ in batch], start=start)
                for (prompt, seed), path in zip(batch, paths, strict=True):
                    index.write(json.dumps({"file": path.name, "prompt": prompt, "seed": seed}) + "\n")
                index.flush()
            if not args.no_grid:
                kept.append(images)
    if kept:
        with _writing(out):
            title = f"{args.model}" + (f" + LoRA {args.lora}" if args.lora else "")
            title += f": {args.steps} DDIM steps, guidance {args.guidance:g}, eta {args.eta:g}"
            captions = [f"seed {seed}" for _, seed in jobs]
            save_grid(
                torch.cat(kept),
                out / GRID_PATH,
                ncol=args.n,
                title=title,
                row_labels=prompts,
                captions=captions,
                layout_json=True,
            )

    seeds = f"{jobs[0][1]}..{jobs[-1][1]}" if len(jobs) > 1 else str(jobs[0][1])
    print(f"diffalign sample: wrote {len(jobs)} images ({shape[0]}x{shape[1]}) and {PROMPTS_JSONL} to {out}")
    print(f"  seeds {seeds}: image j of prompt i has seed {args.seed} + i*{args.n} + j (the 'seed' in {PROMPTS_JSONL})")
    if kept:
        print(f"  grid (one row per prompt): {out / GRID_PATH}")
    print(
        f"  score: diffalign score --reward NAME --images {out} --prompts {out / PROMPTS_JSONL} --out {out}-scores.csv"
    )
    return 0


def _register_sample(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sample",
        help="generate images from a pipeline (optionally with a LoRA), with prompts.jsonl for `score`",
        description="Generate n images per prompt with the pipeline's own sampler (DDIM) and write them, "
        "with prompts.jsonl (file, prompt, seed), into a new --out directory.",
        epilog=SAMPLE_EPILOG,
        formatter_class=HelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help="UTF-8 text file, one prompt per line")
    src.add_argument(
        "--run",
        metavar="DIR",
        help="a diffalign train output directory: redraw its evaluation images (prompts, seeds, sampler, LoRA)",
    )
    p.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="with --run: the LoRA of checkpoints/step_N (0: the base model; default: the final lora/)",
    )
    p.add_argument(
        "--model", metavar="ID_OR_PATH", help="hub id or local diffusers pipeline directory (not with --run)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, or without earlier images)")
    p.add_argument("--n", type=int, default=4, action=_Given, metavar="N", help="images per prompt")
    p.add_argument("--steps", type=int, default=20, action=_Given, metavar="N", help="DDIM steps")
    p.add_argument(
        "--guidance",
        "--cfg",
        dest="guidance",
        type=float,
        default=5.0,
        action=_Given,
        metavar="G",
        help="classifier-free guidance scale",
    )
    p.add_argument(
        "--eta", type=float, default=0.0, action=_Given, metavar="ETA", help="DDIM eta: 0 deterministic, 1 DDPM-like"
    )
    p.add_argument(
        "--size",
        metavar="HxW",
        help="image height x width in pixels, or one side for square (multiples of 8 and of the VAE scale "
        "factor; default: the pipeline's, e.g. 64 for assets/shapes-sd, 512 for SD 1.5)",
    )
    p.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt for every image (used when guidance > 1)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        action=_Given,
        metavar="S",
        help="base seed: image k (k = i*n + j) gets seed S + k",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        action=_Given,
        metavar="B",
        help="images per pipeline call; each image keeps its own seed, so B changes no image beyond float rounding "
        "(with --run: the run's eval.batch_size unless given)",
    )
    p.add_argument("--lora", metavar="DIR", help="LoRA directory (diffusers format) to apply")
    p.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", metavar="T", help="model dtype: float32, float16 or bfloat16")
    p.add_argument("--no-grid", action="store_true", help=f"do not write {GRID_PATH.as_posix()}")
    p.set_defaults(func=_sample)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``diffalign`` parser: ``sample`` here, the other subcommands from their modules' ``register``."""
    parser = argparse.ArgumentParser(
        prog="diffalign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from diffalign import __version__

    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_sample(sub)
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that a command's ``KEY=VALUE`` overrides may also follow its options.

    argparse fills a positional list only once, so ``train --config C a=1 --output-dir D b=2`` would
    reject ``b=2``; here such trailing overrides join ``args.overrides`` in command-line order. Anything
    else argparse did not recognize is still its usual one-line usage error (exit 2).
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``diffalign`` with ``argv``; returns the exit code (2 and one line on stderr for a DiffalignError)."""
    parser = build_parser()
    args = parse(parser, argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for outputs that record it
    try:
        return int(args.func(args) or 0)
    except DiffalignError as exc:
        print(f"diffalign {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
