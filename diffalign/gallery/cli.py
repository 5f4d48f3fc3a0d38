"""``diffalign gallery`` (side-by-side HTML comparison with scores) and ``diffalign plot`` (training curves).

The gallery draws the same prompts and seeds with the base model, each run's LoRA (with the sampler
that run trained and evaluated with) and, optionally, ReNO on the base model; scores every image
with the chosen rewards (and the gold verifier for shapes prompts); and writes OUT/index.html with
the images, OUT/scores.jsonl, OUT/summary.json and the runs' training curves in OUT/plots/.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffalign.errors import DiffalignError

GALLERY_EPILOG = """examples:
  diffalign gallery --run runs/shapes-alignprop --run runs/shapes-ddpo --reward shapes_clip --out outputs/gallery
  diffalign gallery --run AlignProp=runs/shapes-alignprop --reno shapes_clip --prompts shapes:heldout \\
      --num-prompts 6 --seeds 0-3 --reward shapes_clip --out outputs/gallery-reno
  diffalign gallery --base assets/shapes-sd --prompts prompts.txt --seeds 0,1 --reward shapes_clip --out outputs/base

columns: base (the model the runs trained on; --base, default the first run's model.pretrained), one per
--run (its final lora/, or its newest checkpoint while it trains; label with LABEL=DIR), and ReNO on the
base model with --reno. Image (prompt i, seed s) of every column starts from the same noise: the CPU
generator seeded with s * 1000003 + i, as the training evaluation draws it; each run samples with its
own sample.steps, sample.guidance_scale and eval.eta (the base uses the first run's settings, or
the sample defaults without --run). With a run's own eval prompts and seeds (the defaults), its column
shows its final evaluation images.

writes into --out (new, or without an earlier index.html):
  index.html          open it in a browser (no server needed); images/ and plots/ beside it
  scores.jsonl        one {"variant", "prompt_index", "prompt", "seed", "file", "scores"} line per image
  summary.json        per variant and score: mean over all images and the spread over seeds
  plots/*.png         training curves of the runs (also: diffalign plot)
  gallery.json        the command's settings"""

PLOT_EPILOG = """example:
  diffalign plot --run runs/shapes-alignprop --run DDPO=runs/shapes-ddpo --out outputs/curves

writes one PNG per quantity that any run logged: train_reward, train_rewards, eval_reward, heldout,
gold, diversity, grad_norm; each against the training step and against training time (the sum of
time.step_seconds in metrics.jsonl), every run one line."""


# ------------------------------------------------------------------------------------------------ inputs
def parse_seeds(text: str) -> list[int]:
    """``"0-3"`` -> [0, 1, 2, 3]; ``"0,2,5"``; ``"0-1,7"``; one-line error for anything else."""
    seeds: list[int] = []
    bad = DiffalignError(f"--seeds {text!r} is not a list of seeds; give e.g. 0-3 or 0,1,5 (non-negative integers)")
    for part in text.replace(" ", "").split(","):
        if not part:
            raise bad
        lo, sep, hi = part.partition("-")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise bad from None
        if a < 0 or b < a:
            raise bad
        seeds += [s for s in range(a, b + 1) if s not in seeds]
    if len(seeds) > 64:
        raise DiffalignError(f"--seeds {text!r} lists {len(seeds)} seeds; at most 64")
    return seeds


def parse_run(text: str) -> tuple[str | None, str]:
    """``DIR`` or ``LABEL=DIR`` -> (label or None, dir)."""
    if "=" in text and not Path(text).exists():
        label, path = text.split("=", 1)
        if label.strip() and path.strip():
            return label.strip(), path.strip()
    return None, text


def open_runs(specs: list[str]) -> list[Any]:
    from diffalign.gallery.rundir import RunDir

    runs = []
    for spec in specs:
        label, path = parse_run(spec)
        runs.append(RunDir.open(path, label))
    labels = [r.label for r in runs]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise DiffalignError(f"two --run share the label {dup!r}; name them with --run LABEL=DIR")
    return runs


def _same_model(a: str, b: str) -> bool:
    from diffalign.paths import resolve_local

    ra, rb = resolve_local(a), resolve_local(b)
    return (ra.resolve() == rb.resolve()) if ra is not None and rb is not None else a == b


# ------------------------------------------------------------------------------------------------ plots
def curves_of(runs: list[Any]) -> list[Any]:
    from diffalign.gallery.plots import Curves

    return [Curves(r.label, r.metrics(), r.evals()) for r in runs]


def run_plot(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign plot``."""
    from diffalign.cli import check_writable_dir
    from diffalign.gallery.plots import write_plots

    runs = open_runs(args.run)
    curves = curves_of(runs)  # every run's metrics.jsonl and eval.jsonl, read before anything is written
    out = check_writable_dir(Path(args.out), "--out directory")
    written = write_plots(curves, out)
    if not written:
        raise DiffalignError("the runs' metrics.jsonl and eval.jsonl hold no records yet; nothing to plot")
    print(f"diffalign plot: wrote {len(written)} plot(s) of {len(runs)} run(s) to {out}")
    for path, title in written:
        print(f"  {path.name}: {title}")
    return 0


# ------------------------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    """One column: an id (folder name), a label, and how to draw it."""

    id: str
    label: str
    kind: str  # base | run | reno
    run: Any = None
    lora: Path | None = None
    step: int | None = None
    sample: Any = None  # SampleConfig
    eta: float = 0.0
    dtype: str = "float32"


def _variant_id(label: str, taken: set[str]) -> str:
    from diffalign.gallery.grids import slug

    base = slug(label, 30) or "variant"
    vid, n = base, 2
    while vid in taken:
        vid, n = f"{base}-{n}", n + 1
    taken.add(vid)
    return vid


def build_variants(args: argparse.Namespace, runs: list[Any], base: str) -> list[Variant]:
    from diffalign.config import SampleConfig
    from diffalign.pipelines import lora_rank

    taken: set[str] = set()
    first = runs[0] if runs else None
    sample = first.config.sample if first else SampleConfig()
    eta = first.eval_eta() if first else sample.eta
    dtype = first.dtype() if first else args.dtype
    out = [Variant(_variant_id("base", taken), "base", "base", sample=sample, eta=eta, dtype=dtype)]
    for run in runs:
        if not _same_model(str(run.config.model.pretrained), base):
            raise DiffalignError(
                f"run {run.path} was trained on {run.config.model.pretrained}, not on the base {base}; "
                "compare runs of one base model (or pass --base with that model)"
            )
        lora, step = run.lora()
        lora_rank(lora)  # a missing or damaged LoRA file fails here, before any model loads
        label = run.label if step == run.config.train.steps else f"{run.label} @ step {step}"
        out.append(
            Variant(
                _variant_id(run.label, taken),
                label,
                "run",
                run=run,
                lora=lora,
                step=step,
                sample=run.config.sample,
                eta=run.eval_eta(),
                dtype=run.dtype(),
            )
        )
    if args.reno:
        label = f"ReNO ({', '.join(args.reno)}; {args.reno_iters} it.)"
        out.append(Variant(_variant_id("reno", taken), label, "reno", sample=sample, eta=0.0, dtype=args.dtype))
    return out


def _latents(pipe: Any, prompt_index: int, seed: int) -> Any:
    """z of image (prompt_index, seed) in standard-Gaussian units: the evaluation's first draw."""
    import torch

    from diffalign.evaluation import generator_seed
    from diffalign.pipelines import initial_latents

    gen = torch.Generator().manual_seed(generator_seed(seed, prompt_index))
    z = initial_latents(pipe, 1, [gen]).float()
    sigma = float(pipe.scheduler.init_noise_sigma)
    return z / sigma if sigma != 1.0 else z


def draw_variant(v: Variant, args: argparse.Namespace, base: str, prompts: list[str], seeds: list[int], device: Any):
    """Images ``[P * S, 3, H, W]`` of variant ``v``, prompt-major."""
    import torch

    from diffalign.evaluation import PipelineSampler, generate_images
    from diffalign.pipelines import load_lora, load_pipeline

    items = [(i, s) for i in range(len(prompts)) for s in seeds]
    dtype = "float32" if device.type == "cpu" else v.dtype  # a bf16 / fp16 run drawn on a CPU: float32
    if v.kind in ("base", "run"):
        pipe = load_pipeline(base, dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        if v.lora is not None:
            load_lora(pipe, v.lora)
        batch = v.run.config.eval.batch_size if v.run is not None else 16
        with torch.no_grad():
            return generate_images(PipelineSampler(pipe, v.sample), prompts, items, v.eta, batch)
    from diffalign.reno import RenoConfig, reno
    from diffalign.reno.rewards import build_rewards

    pipe = load_pipeline(base, dtype=dtype, device=device, scheduler="keep")
    pipe.set_progress_bar_config(disable=True)
    rewards, weights, _ = build_rewards(list(args.reno), None, device)
    images = []
    for n, (i, s) in enumerate(items):
        cfg = RenoConfig(
            iters=args.reno_iters,
            lr=args.reno_lr,
            num_steps=args.reno_steps,
            guidance_scale=v.sample.guidance_scale if args.reno_guidance is None else args.reno_guidance,
            seed=s,
        )
        result = reno(pipe, prompts[i], rewards, weights, cfg, latents=_latents(pipe, i, s))
        images.append(result.best_image[None].float().cpu())
        print(f"  reno {n + 1}/{len(items)}: best at iteration {result.best_iter}", file=sys.stderr)
    return torch.cat(images)


def score_all(
    images: Any, prompts: list[str], specs: list[Any], rewards: list[Any], gold: bool, device: Any
) -> dict[str, list]:
    """``{score name: [value per image]}``: each reward, then ``gold/accuracy`` and ``gold/score``."""
    import torch

    from diffalign.combine import reward_keys

    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for key, reward in zip(reward_keys(specs, "--reward"), rewards, strict=True):
            values = []
            for start in range(0, len(prompts), 32):
                chunk = images[start : start + 32].to(device)
                values += reward(chunk, prompts[start : start + 32]).float().cpu().tolist()
            out[key] = values
    if gold:
        from diffalign.shapes.verifier import verify_batch

        verdicts = verify_batch(images, prompts)
        out["gold/accuracy"] = [float(v.correct) for v in verdicts]
        out["gold/score"] = [float(v.score) for v in verdicts]
    for key, values in out.items():
        if not all(math.isfinite(x) for x in values):
            raise DiffalignError(f"reward {key} returned NaN or inf on a gallery image; check that reward")
    return out


def summarize(rows: list[dict[str, Any]], seeds: list[int]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per variant and score: (mean over all images, standard deviation over seeds of the per-seed means)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for vid in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == vid]
        out[vid] = {}
        for key in mine[0]["scores"]:
            values = [r["scores"][key] for r in mine]
            per_seed = []
            for s in seeds:
                vs = [r["scores"][key] for r in mine if r["seed"] == s]
                if vs:
                    per_seed.append(sum(vs) / len(vs))
            m = sum(per_seed) / len(per_seed)
            spread = math.sqrt(sum((x - m) ** 2 for x in per_seed) / (len(per_seed) - 1)) if len(per_seed) > 1 else 0.0
            out[vid][key] = (sum(values) / len(values), spread)
    return out


# ------------------------------------------------------------------------------------------------ gallery
def run_gallery(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign gallery``."""
    from diffalign.cli import check_writable_dir, make_dir, parse_device
    from diffalign.gallery.grids import to_pil
    from diffalign.gallery.page import Cell, render
    from diffalign.gallery.plots import write_plots
    from diffalign.prompts import eval_prompts, load_prompts, non_shapes_prompt
    from reward_models import RewardSpec, get_reward

    t0 = time.perf_counter()
    if not args.run and not args.base:
        raise DiffalignError("give --run DIR (a diffalign train output) and/or --base MODEL")
    if args.num_prompts is not None and args.num_prompts < 0:
        raise DiffalignError(f"--num-prompts must be >= 0 (0 = all), got {args.num_prompts}")
    if args.reno_iters < 1 or args.reno_steps < 1:
        raise DiffalignError("--reno-iters and --reno-steps must be at least 1")
    specs = [RewardSpec.parse(s) for s in args.reward or []]
    if args.reno:
        from diffalign.reno.rewards import check_differentiable

        check_differentiable([RewardSpec.parse(s) for s in args.reno])
    runs = open_runs(args.run or [])
    base = args.base or str(runs[0].config.model.pretrained)
    if args.prompts is not None:
        prompts = load_prompts(args.prompts, "--prompts")
    elif runs:
        prompts = runs[0].eval_items()[0]
    else:
        raise DiffalignError("give --prompts FILE (or shapes:heldout) when no --run is given")
    prompts = eval_prompts(prompts, args.num_prompts) if args.num_prompts else prompts
    seeds = parse_seeds(args.seeds) if args.seeds else (runs[0].eval_items()[1] if runs else [0, 1, 2, 3])
    gold = args.gold == "on" or (args.gold == "auto" and non_shapes_prompt(prompts) is None)
    if not specs and not gold:
        raise DiffalignError("give at least one --reward NAME to score with (these prompts are not shapes captions)")
    curves = curves_of(runs)  # metrics.jsonl and eval.jsonl of every run: a missing one fails before any work
    variants = build_variants(args, runs, base)
    out = check_writable_dir(Path(args.out), "--out directory")
    if (out / "index.html").exists():
        raise DiffalignError(f"--out {str(out)!r} already holds index.html; pass a new --out directory")
    device = parse_device(args.device)
    rewards = [get_reward(s, device=device) for s in specs]  # unknown names fail here, before drawing
    make_dir(out, "--out directory")

    rows: list[dict[str, Any]] = []
    cells: dict[tuple[int, str], Cell] = {}
    items = [(i, s) for i in range(len(prompts)) for s in seeds]
    size = (0, 0)
    for v in variants:
        t = time.perf_counter()
        images = draw_variant(v, args, base, prompts, seeds, device)
        size = tuple(images.shape[-2:])
        scores = score_all(images, [prompts[i] for i, _ in items], specs, rewards, gold, device)
        folder = out / "images" / v.id
        folder.mkdir(parents=True, exist_ok=True)
        for n, (i, s) in enumerate(items):
            rel = f"images/{v.id}/{i:03d}_s{s}.png"
            to_pil(images[n]).save(out / rel)
            row_scores = {k: float(vals[n]) for k, vals in scores.items()}
            rows.append(
                {"variant": v.id, "label": v.label, "prompt_index": i, "prompt": prompts[i], "seed": s}
                | {"file": rel, "scores": row_scores}
            )
            cells.setdefault((i, v.id), Cell()).images.append((f"img-{v.id}-{i}-{s}", rel, s, row_scores))
        print(f"diffalign gallery: {v.label}: {len(items)} images in {time.perf_counter() - t:.1f} s")
        del images

    summary = summarize(rows, seeds)
    score_names = list(rows[0]["scores"]) if rows else []
    default_key = "gold/score" if "gold/score" in score_names else (score_names[0] if score_names else "")
    plots = [(f"plots/{p.name}", title) for p, title in write_plots(curves, out / "plots")] if curves else []
    with open(out / "scores.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    labels = {v.id: v.label for v in variants}
    (out / "summary.json").write_text(
        json.dumps(
            {labels[v]: {k: {"mean": m, "seed_spread": sd} for k, (m, sd) in d.items()} for v, d in summary.items()},
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    command = "diffalign " + " ".join(shlex.quote(a) for a in getattr(args, "argv", ["gallery"]))
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "argv")} | {"command": command}
    (out / "gallery.json").write_text(json.dumps(settings | {"prompts_used": prompts}, indent=1) + "\n")
    meta = [
        f"base model <code>{html.escape(base)}</code>; {len(prompts)} prompts × seeds {html.escape(str(seeds))}; "
        f"{size[0]}×{size[1]} px; scores: {html.escape(', '.join(score_names))}",
        "columns: " + html.escape("; ".join(_describe(v) for v in variants)),
        f"written {time.strftime('%Y-%m-%d %H:%M')} by <code>{html.escape(command)}</code>",
    ]
    page = render(
        title="diffalign gallery",
        meta=meta,
        variants=[(v.id, v.label) for v in variants],
        prompts=prompts,
        cells=cells,
        score_names=score_names,
        summary=summary,
        plots=plots,
        default_key=default_key,
        thumb=args.thumb,
        pixelated=max(size) <= 128,
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    print(f"diffalign gallery: wrote {out / 'index.html'} ({len(rows)} images, {len(variants)} columns", end="")
    print(f", {len(plots)} plots) in {time.perf_counter() - t0:.0f} s")
    for v in variants:
        means = ", ".join(f"{k} {m:.3f}±{sd:.3f}" for k, (m, sd) in summary[v.id].items())
        print(f"  {v.label}: {means}")
    print(f"  open: file://{(out / 'index.html').resolve()}")
    return 0


def _describe(v: Variant) -> str:
    s = v.sample
    if v.kind == "reno":
        return f"{v.label}: noise optimization on the base model"
    what = f"LoRA {v.lora}" if v.lora else "no LoRA"
    return f"{v.label}: {what}, {s.steps} DDIM steps, guidance {s.guidance_scale:g}, eta {v.eta:g}"


# ------------------------------------------------------------------------------------------------ parsers
def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``gallery`` and ``plot``."""
    from diffalign.cli import HelpFormatter

    p = subparsers.add_parser(
        "gallery",
        help="HTML page comparing base, trained LoRAs and ReNO on the same prompts and seeds, with scores",
        description="Draw the same prompts and seeds with the base model, each run's LoRA and optionally ReNO; "
        "score every image; write one static HTML page (no server) with the images, scores and training curves.",
        epilog=GALLERY_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--run", action="append", metavar="[LABEL=]DIR", help="a diffalign train output directory; repeat")
    p.add_argument("--base", metavar="ID_OR_PATH", help="the base model (default: the first run's model.pretrained)")
    p.add_argument(
        "--reno",
        action="append",
        metavar="REWARD",
        help="add a ReNO column on the base model optimizing this differentiable reward spec; repeat for several",
    )
    p.add_argument("--reno-iters", type=int, default=10, metavar="N", help="ReNO iterations per image")
    p.add_argument("--reno-steps", type=int, default=4, metavar="N", help="ReNO sampling steps (trailing DDIM)")
    p.add_argument("--reno-lr", type=float, default=5.0, metavar="LR", help="ReNO learning rate on the noise")
    p.add_argument(
        "--reno-guidance", type=float, metavar="G", help="ReNO CFG scale (default: the base column's guidance)"
    )
    p.add_argument(
        "--prompts",
        metavar="FILE|shapes:SPLIT",
        help="prompt file (one per line), shapes:heldout or shapes:train (default: the first run's eval prompts)",
    )
    p.add_argument(
        "--num-prompts", type=int, metavar="N", help="a fixed seeded subset of N prompts (default: all of them)"
    )
    p.add_argument("--seeds", metavar="LIST", help="seeds, e.g. 0-3 or 0,1,5 (default: the first run's eval.seeds)")
    p.add_argument(
        "--reward",
        action="append",
        metavar="SPEC",
        help="a reward to score every image with (reward_models spec, e.g. shapes_clip); repeat for several",
    )
    p.add_argument(
        "--gold",
        choices=("auto", "on", "off"),
        default="auto",
        help="score with the shapes gold verifier (auto: when every prompt is a shapes caption)",
    )
    p.add_argument("--thumb", type=int, default=112, metavar="PX", help="thumbnail side on the page")
    p.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", metavar="T", help="model dtype of the base and ReNO without --run")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, or without index.html)")
    p.set_defaults(func=run_gallery)

    q = subparsers.add_parser(
        "plot",
        help="training-curve PNGs (rewards, held-out, gold, diversity, grad norm) of one or more runs",
        description="Plot the runs' metrics.jsonl and eval.jsonl against step and training time, one line per run.",
        epilog=PLOT_EPILOG,
        formatter_class=HelpFormatter,
    )
    q.add_argument("--run", action="append", required=True, metavar="[LABEL=]DIR", help="a run directory; repeat")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory for the PNGs")
    q.set_defaults(func=run_plot)
    return p
