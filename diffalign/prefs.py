"""``diffalign prefs`` builds a preference dataset; ``diffalign label`` lets a person label pairs.

``prefs`` samples ``--n`` images per prompt from a pipeline (optionally with a LoRA) and scores them with
any rewards of the zoo (the weighted sum of the ``--reward`` specs). Two layouts:

- default (Diffusion-DPO, ``train.method: dpo``): each prompt's images sorted by reward, the best paired
  with the worst, the second best with the second worst, ... (at most ``--pairs-per-prompt`` pairs, each
  with a reward margin above ``--min-margin``; every image in at most one pair). For the shapes world,
  ``--reward shapes_gold:mode=correct`` gives exactly "correct vs incorrect" pairs. Writes
  ``prefs.jsonl`` (``prompt``, ``winner``, ``loser`` and their rewards and seeds) for ``data.train``.
- ``--pairs`` (D3PO on labelled pairs, ``train.method: d3po_human``): ``--n / 2`` pairs per prompt, the two
  members of a pair from one shared initial latent with independent DDIM noise (``--eta`` > 0), each pair's
  chain saved (``trajectories/NNNNN.pt``: latents [2, T+1, C, h, w], timesteps [T]). Writes
  ``pairs.jsonl`` (``prompt``, ``image_a``, ``image_b``, ``trajectory``) for ``diffalign label``; with
  ``--reward`` also ``labels.jsonl``, the pairs labelled by the reward (``choice`` a / b / tie).

Every sample is listed in ``samples.jsonl`` (file, prompt, seed, reward) and the options in
``prefs.json``. ``label`` shows the pairs of a ``pairs.jsonl`` in the terminal (prompt, paths and a
colour preview drawn with half-block characters; answer a, b, t(ie), s(kip) or q(uit)) and appends each
choice to ``--out`` at once (a second run continues where the first stopped), or writes a static HTML page
(``--html``) whose buttons record the choices in the browser and download them as ``labels.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from diffalign.errors import DiffalignError

PREFS_EPILOG = """examples:
  # shapes: 4 images per training prompt, pairs of a correct and an incorrect image (exact gold verifier)
  diffalign prefs --model assets/shapes-sd --prompts shapes:train --n 4 \\
      --reward shapes_gold:mode=correct --out data/shapes-prefs
  diffalign train --config configs/shapes/dpo.yaml data.train=data/shapes-prefs/prefs.jsonl

  # pairs from shared noise with their trajectories, for labelling by hand and D3PO
  diffalign prefs --model assets/shapes-sd --prompts shapes:train --num-prompts 50 --n 2 --pairs \\
      --eta 1 --out data/shapes-pairs
  diffalign label --pairs data/shapes-pairs/pairs.jsonl --out data/shapes-pairs/labels.jsonl

writes into --out (a new or empty directory):
  images/NNNNN.png     the samples (image j of prompt i is number i*n + j, seed --seed + i*n + j)
  samples.jsonl        one {"file", "prompt", "seed", "reward", "rewards"} object per image
  prefs.jsonl          (default) {"prompt", "winner", "loser", "winner_reward", "loser_reward", ...}
  pairs.jsonl          (--pairs) {"prompt", "image_a", "image_b", "trajectory"} for diffalign label
  labels.jsonl         (--pairs with --reward) the same with "choice": a, b or tie, from the reward
  trajectories/*.pt    (--pairs) each pair's latents x_T .. x_0 and timesteps
  prefs.json           the options of this run"""

LABEL_EPILOG = """examples:
  diffalign label --pairs data/shapes-pairs/pairs.jsonl --out data/shapes-pairs/labels.jsonl
  diffalign label --pairs data/shapes-pairs/pairs.jsonl --html data/shapes-pairs/label.html

terminal: each pair shows its prompt, both image paths and a colour preview (A left, B right); type
  a or b (the better image), t (tie), s (skip) or q (quit). Each answer is appended to --out at once;
  a pair already in --out is not asked again, so a later run continues.
html: a static page (open it in a browser, no server); click A, B or tie under each pair, then
  "download labels.jsonl" and save the file next to the page (its paths are relative to the page).
  Choices are also kept in the browser's local storage until the page is reloaded elsewhere.

labels.jsonl: one {"prompt", "image_a", "image_b", "trajectory", "choice"} object per labelled pair,
choice a, b or tie; train on it with train.method=d3po_human and data.train=labels.jsonl."""

CHOICE_KEYS = {"a": "a", "b": "b", "t": "tie", "tie": "tie"}


# ------------------------------------------------------------------------------------------- pairing
def margin_pairs(rewards: list[float], max_pairs: int, min_margin: float = 0.0) -> list[tuple[int, int]]:
    """(winner, loser) index pairs of one prompt's samples: best with worst, second best with second worst, ...

    Sorted by reward (ties by index), pair k is ``(order[k], order[-1-k])`` for k < ``max_pairs`` and
    k < n // 2, kept only while its margin exceeds ``min_margin`` (so equal rewards never pair). Every
    sample is in at most one pair, and the pairs come in decreasing margin.
    """
    order = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
    out = []
    for k in range(min(max_pairs, len(rewards) // 2)):
        w, lo = order[k], order[-1 - k]
        if rewards[w] - rewards[lo] > min_margin:
            out.append((w, lo))
    return out


def choice_from_rewards(reward_a: float, reward_b: float, min_margin: float = 0.0) -> str:
    """``a`` / ``b`` when one member's reward exceeds the other's by more than ``min_margin``, else ``tie``."""
    if reward_a - reward_b > min_margin:
        return "a"
    if reward_b - reward_a > min_margin:
        return "b"
    return "tie"


# --------------------------------------------------------------------------------------------- prefs
def _rewards(specs: list[str], device: Any):
    from diffalign.combine import reward_keys
    from reward_models import RewardSpec, get_reward

    parsed = [RewardSpec.parse(s) for s in specs]
    keys = reward_keys(parsed, "--reward")
    return [(k, s.weight, get_reward(s, device=device)) for k, s in zip(keys, parsed, strict=True)]


def _score(rewards, images, prompts) -> tuple[list[float], list[dict[str, float]]]:
    import torch

    if not rewards:
        return [0.0] * len(prompts), [{} for _ in prompts]
    with torch.no_grad():
        parts = {k: r(images, prompts).detach().float().cpu() for k, _, r in rewards}
    for k, v in parts.items():
        if not torch.isfinite(v).all():
            raise DiffalignError(f"reward {k!r} returned NaN or inf; check the reward and its inputs")
    total = sum(w * parts[k] for k, w, _ in rewards)
    return [float(x) for x in total], [{k: float(v[i]) for k, v in parts.items()} for i in range(len(prompts))]


def _check_out(out: Path) -> Path:
    from diffalign.cli import check_writable_dir

    out = check_writable_dir(out, "--out directory")
    if out.is_dir() and any(out.iterdir()):
        raise DiffalignError(f"--out {str(out)!r} is not empty; pass a new directory, nothing is overwritten")
    return out


def _prompts(args: argparse.Namespace) -> list[str]:
    from diffalign.prompts import load_prompts

    prompts = load_prompts(args.prompts, "--prompts")
    if args.num_prompts < 0:
        raise DiffalignError(f"--num-prompts must be >= 0 (0 = all), got {args.num_prompts}")
    if 0 < args.num_prompts < len(prompts):
        keep = sorted(random.Random(args.seed).sample(range(len(prompts)), args.num_prompts))
        prompts = [prompts[i] for i in keep]
    return prompts


def _check_args(args: argparse.Namespace) -> None:
    for option, value in (("--n", args.n), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise DiffalignError(f"{option} must be at least 1, got {value}")
    if args.pairs_per_prompt < 1:
        raise DiffalignError(f"--pairs-per-prompt must be at least 1, got {args.pairs_per_prompt}")
    if args.min_margin < 0:
        raise DiffalignError(f"--min-margin must be >= 0, got {args.min_margin:g}")
    if not 0.0 <= args.eta <= 1.0:
        raise DiffalignError(f"--eta must be between 0 and 1, got {args.eta:g}")
    if args.pairs:
        if args.n % 2:
            raise DiffalignError(f"--pairs samples --n / 2 pairs per prompt: --n must be even, got {args.n}")
        if args.eta <= 0:
            raise DiffalignError("--pairs stores chains for D3PO, whose steps need --eta > 0 (e.g. --eta 1)")
    elif not args.reward:
        raise DiffalignError("give --reward NAME (the pairs are ranked by it), or --pairs to label pairs by hand")
    elif args.n < 2:
        raise DiffalignError(f"--n must be at least 2 to form a pair, got {args.n}")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def run_prefs(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign prefs`` (module docstring)."""
    import torch

    from diffalign.cli import _writing, image_seed, make_dir, parse_device
    from diffalign.gallery import to_pil
    from diffalign.pipelines import draw_images, load_lora, load_pipeline

    _check_args(args)
    prompts = _prompts(args)
    device = parse_device(args.device)
    out = _check_out(Path(args.out))
    rewards = _rewards(args.reward or [], device)
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device)
    if args.lora:
        load_lora(pipe, args.lora)
    pipe.set_progress_bar_config(disable=True)
    make_dir(out / "images", "--out directory")
    samples: list[dict[str, Any]] = []

    def save(images: torch.Tensor, index: int) -> list[str]:
        names = []
        for j, image in enumerate(images):
            name = f"images/{index + j:05d}.png"
            to_pil(image).save(out / name)
            names.append(name)
        return names

    with _writing(out):
        (out / "prefs.json").write_text(
            json.dumps({k: v for k, v in vars(args).items() if k not in ("func", "command")}, indent=1) + "\n"
        )
        if args.pairs:
            rows, labels = _sample_pairs(args, pipe, prompts, rewards, save, samples, out)
            _write_jsonl(out / "pairs.jsonl", rows)
            if rewards:
                _write_jsonl(out / "labels.jsonl", labels)
        else:
            jobs = [(p, image_seed(args.seed, i, j, args.n)) for i, p in enumerate(prompts) for j in range(args.n)]
            for start in range(0, len(jobs), args.batch_size):
                batch = jobs[start : start + args.batch_size]
                images = draw_images(
                    pipe,
                    [p for p, _ in batch],
                    [s for _, s in batch],
                    steps=args.steps,
                    guidance=args.guidance,
                    eta=args.eta,
                )
                total, parts = _score(rewards, images.to(device), [p for p, _ in batch])
                for (prompt, seed), name, r, part in zip(batch, save(images, start), total, parts, strict=True):
                    samples.append({"file": name, "prompt": prompt, "seed": seed, "reward": r, "rewards": part})
            rows = []
            for i, prompt in enumerate(prompts):
                mine = samples[i * args.n : (i + 1) * args.n]
                for w, lo in margin_pairs([s["reward"] for s in mine], args.pairs_per_prompt, args.min_margin):
                    rows.append(
                        {
                            "prompt": prompt,
                            "winner": mine[w]["file"],
                            "loser": mine[lo]["file"],
                            "winner_reward": mine[w]["reward"],
                            "loser_reward": mine[lo]["reward"],
                            "winner_seed": mine[w]["seed"],
                            "loser_seed": mine[lo]["seed"],
                        }
                    )
            _write_jsonl(out / "samples.jsonl", samples)
            if not rows:
                raise DiffalignError(
                    f"no pairs: no prompt's {args.n} samples differ in reward by more than --min-margin "
                    f"{args.min_margin:g} (samples and their rewards: {out / 'samples.jsonl'}); raise --n or use "
                    "another reward"
                )
            _write_jsonl(out / "prefs.jsonl", rows)
        if args.pairs:
            _write_jsonl(out / "samples.jsonl", samples)
    what = "pairs.jsonl" + (" and labels.jsonl" if args.pairs and rewards else "") if args.pairs else "prefs.jsonl"
    print(f"diffalign prefs: {len(samples)} images of {len(prompts)} prompts, {len(rows)} pairs -> {out / what}")
    if args.pairs:
        print(f"  label them: diffalign label --pairs {out / 'pairs.jsonl'} --out {out / 'labels.jsonl'}")
    else:
        print(f"  train: diffalign train --config configs/shapes/dpo.yaml data.train={out / 'prefs.jsonl'}")
    return 0


def _sample_pairs(args, pipe, prompts, rewards, save, samples, out):
    """``--pairs``: per prompt, n/2 pairs from shared x_T (its own seeded generator), chains saved."""
    import torch

    from diffalign.pipelines import backbone, encode_prompts, initial_latents, pipeline_sampler
    from diffalign.sampling import decode_latents, make_denoiser, sample_trajectory

    (out / "trajectories").mkdir(exist_ok=True)
    sampler = pipeline_sampler(pipe, args.steps, device=backbone(pipe).device)
    half = args.n // 2
    rows, labels = [], []
    for i, prompt in enumerate(prompts):
        seed = args.seed + i
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            cond = encode_prompts(pipe, [prompt] * args.n, None, guidance=args.guidance != 1.0)
            denoise = make_denoiser(backbone(pipe), guidance_scale=args.guidance, **cond.denoiser_kwargs())
            x_T = initial_latents(pipe, half, generator).repeat_interleave(2, dim=0)
            traj = sample_trajectory(denoise, sampler, x_T, eta=args.eta, generator=generator)
            images = decode_latents(pipe.vae, traj.final).cpu()
        total, parts = _score(rewards, images.to(backbone(pipe).device), [prompt] * args.n)
        names = save(images, i * args.n)
        for j, name in enumerate(names):
            samples.append({"file": name, "prompt": prompt, "seed": seed, "reward": total[j], "rewards": parts[j]})
        for k in range(half):
            a, b = 2 * k, 2 * k + 1
            number = i * half + k
            path = f"trajectories/{number:05d}.pt"
            torch.save(
                {"latents": traj.latents[[a, b]].float().cpu().contiguous(), "timesteps": traj.timesteps.cpu()},
                out / path,
            )
            row = {"prompt": prompt, "image_a": names[a], "image_b": names[b], "trajectory": path}
            rows.append(row)
            if rewards:
                choice = choice_from_rewards(total[a], total[b], args.min_margin)
                labels.append({**row, "choice": choice, "reward_a": total[a], "reward_b": total[b]})
    return rows, labels


# --------------------------------------------------------------------------------------------- label
def _read_pairs(path: Path):
    from diffalign.datasets import JsonlDataset

    return JsonlDataset(path, ("image_a", "image_b"), key="--pairs")


def _relative(target: Path, base: Path) -> str:
    return os.path.relpath(target.resolve(), base.resolve())


def _label_row(record, src: Path, base: Path, choice: str) -> dict[str, Any]:
    """A label record with its paths relative to ``base`` (those of ``pairs.jsonl`` are relative to ``src``)."""
    row: dict[str, Any] = {
        "prompt": record.prompt,
        "image_a": _relative(record.images["image_a"], base),
        "image_b": _relative(record.images["image_b"], base),
    }
    traj = record.data.get("trajectory")
    if isinstance(traj, str) and traj:
        p = Path(traj).expanduser()
        row["trajectory"] = _relative(p if p.is_absolute() else src / p, base)
    row["choice"] = choice
    return row


def preview(path_a: Path, path_b: Path, width: int = 32) -> str:
    """Both images side by side as ANSI 24-bit colour half blocks (two pixel rows per text line)."""
    from PIL import Image

    def load(p: Path) -> Image.Image:
        with Image.open(p) as im:
            im = im.convert("RGB")
            h = max(2, round(im.height * width / im.width) // 2 * 2)
            return im.resize((width, h))

    a, b = load(path_a), load(path_b)
    h = max(a.height, b.height)
    lines = []
    for y in range(0, h, 2):
        parts = []
        for im in (a, b):
            for x in range(width):
                top = im.getpixel((x, y)) if y < im.height else (0, 0, 0)
                bot = im.getpixel((x, y + 1)) if y + 1 < im.height else (0, 0, 0)
                parts.append(f"\x1b[38;2;{top[0]};{top[1]};{top[2]}m\x1b[48;2;{bot[0]};{bot[1]};{bot[2]}m\u2580")
            parts.append("\x1b[0m  ")
        lines.append("".join(parts) + "\x1b[0m")
    return "\n".join(lines)


def _labelled(out: Path) -> set[tuple[str, str]]:
    if not out.is_file():
        return set()
    done = set()
    for number, line in enumerate(out.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add((str((out.parent / row["image_a"]).resolve()), str((out.parent / row["image_b"]).resolve())))
        except (ValueError, KeyError, TypeError):
            raise DiffalignError(
                f"--out {out} line {number} is not a label record (JSON with image_a, image_b); fix or move the file"
            ) from None
    return done


def _label_terminal(args: argparse.Namespace, dataset) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise DiffalignError(f"--out {out} is a directory; give the labels file, e.g. labels.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _labelled(out)
    base = dataset.path.parent
    todo = [
        r
        for r in dataset.records
        if (str(r.images["image_a"].resolve()), str(r.images["image_b"].resolve())) not in done
    ]
    counts = {"a": 0, "b": 0, "tie": 0, "skip": 0}
    print(f"diffalign label: {len(todo)} of {len(dataset)} pairs to label ({len(dataset) - len(todo)} in {out})")
    with open(out, "a", encoding="utf-8") as fh:
        for n, record in enumerate(todo, start=1):
            print(f"\n[{n}/{len(todo)}] {record.prompt}")
            print(f"  A: {record.images['image_a']}\n  B: {record.images['image_b']}")
            if not args.no_preview:
                print(preview(record.images["image_a"], record.images["image_b"], args.preview_width))
            while True:
                print("better image? [a/b/t(ie)/s(kip)/q(uit)] ", end="", flush=True)
                line = sys.stdin.readline()
                if not line:  # end of input
                    answer = "q"
                    break
                answer = line.strip().lower()
                if answer in CHOICE_KEYS or answer in ("s", "skip", "q", "quit"):
                    break
                print(f"  {answer!r}: type a, b, t, s or q")
            if answer in ("q", "quit"):
                break
            if answer in ("s", "skip"):
                counts["skip"] += 1
                continue
            choice = CHOICE_KEYS[answer]
            counts[choice] += 1
            fh.write(json.dumps(_label_row(record, base, out.parent, choice)) + "\n")
            fh.flush()
    print(
        f"diffalign label: recorded {counts['a'] + counts['b'] + counts['tie']} choices (a {counts['a']}, b {counts['b']}, "
        f"tie {counts['tie']}; skipped {counts['skip']}) in {out}"
    )
    return 0


HTML_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>diffalign label</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.pair {{ border-bottom: 1px solid #ccc; padding: 0.5em 0; }}
.pair img {{ width: {size}px; image-rendering: pixelated; margin-right: 1em; border: 3px solid transparent; }}
.pair img.chosen {{ border-color: #2a2; }}
button.on {{ background: #2a2; color: white; }}
#bar {{ position: sticky; top: 0; background: white; padding: 0.5em 0; }}
</style></head><body>
<div id="bar"><b>diffalign label</b>: <span id="count"></span>
<button onclick="download()">download labels.jsonl</button>
(save it next to this page; train with train.method=d3po_human data.train=labels.jsonl)</div>
<div id="pairs"></div>
<script>
const PAIRS = {pairs};
const KEY = "diffalign-label:" + {key};
let choices = JSON.parse(localStorage.getItem(KEY) || "{{}}");
function render() {{
  const root = document.getElementById("pairs");
  root.innerHTML = "";
  PAIRS.forEach((p, i) => {{
    const d = document.createElement("div");
    d.className = "pair";
    const c = choices[i];
    d.innerHTML = `<div>${{i + 1}}. ${{p.prompt.replace(/</g, "&lt;")}}</div>
      <img src="${{p.image_a}}" class="${{c === "a" ? "chosen" : ""}}" title="A">
      <img src="${{p.image_b}}" class="${{c === "b" ? "chosen" : ""}}" title="B"><br>` +
      ["a", "b", "tie"].map(k => `<button class="${{c === k ? "on" : ""}}" onclick="pick(${{i}}, '${{k}}')">${{k === "tie" ? "tie" : k.toUpperCase()}}</button>`).join(" ");
    root.appendChild(d);
  }});
  document.getElementById("count").textContent = Object.keys(choices).length + " of " + PAIRS.length + " labelled";
}}
function pick(i, k) {{ choices[i] = k; localStorage.setItem(KEY, JSON.stringify(choices)); render(); }}
function download() {{
  const lines = PAIRS.map((p, i) => choices[i] ? JSON.stringify(Object.assign({{}}, p, {{choice: choices[i]}})) : null)
    .filter(x => x !== null).join("\\n") + "\\n";
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([lines], {{type: "application/jsonl"}}));
  a.download = "labels.jsonl";
  a.click();
}}
render();
</script></body></html>
"""


def _label_html(args: argparse.Namespace, dataset) -> int:
    page = Path(args.html)
    if page.is_dir():
        raise DiffalignError(f"--html {page} is a directory; give the page's file name, e.g. label.html")
    page.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for record in dataset.records:
        row = _label_row(record, dataset.path.parent, page.parent, "")
        row.pop("choice")
        rows.append(row)
    text = HTML_TEMPLATE.format(
        pairs=json.dumps(rows).replace("</", "<\\/"), key=json.dumps(str(page.resolve())), size=args.preview_width * 4
    )
    page.write_text(text, encoding="utf-8")
    print(f"diffalign label: wrote {page} ({len(rows)} pairs); open it in a browser, then download labels.jsonl")
    return 0


def run_label(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign label`` (module docstring)."""
    if args.out is None and args.html is None:
        raise DiffalignError("give --out labels.jsonl (label in the terminal) or --html page.html (label in a browser)")
    if args.preview_width < 4:
        raise DiffalignError(f"--preview-width must be at least 4, got {args.preview_width}")
    dataset = _read_pairs(Path(args.pairs))
    if args.html is not None:
        _label_html(args, dataset)
    if args.out is not None:
        _label_terminal(args, dataset)
    return 0


# --------------------------------------------------------------------------------------------- parsers
def register(subparsers: Any) -> None:
    """Add ``prefs`` and ``label`` to the ``diffalign`` subcommands."""
    from diffalign.cli import HelpFormatter

    p = subparsers.add_parser(
        "prefs",
        help="build a preference dataset (pairs ranked by a reward, or shared-noise pairs to label)",
        description="Sample N images per prompt, score them with rewards and write preference pairs: "
        "prefs.jsonl for Diffusion-DPO (train.method=dpo), or with --pairs shared-noise pairs with their "
        "trajectories for `diffalign label` and D3PO (train.method=d3po_human).",
        epilog=PREFS_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="ID_OR_PATH", help="hub id or local diffusers pipeline directory")
    p.add_argument(
        "--prompts", required=True, metavar="SOURCE", help="shapes:train, shapes:heldout or a text file (one per line)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument(
        "--reward",
        action="append",
        metavar="NAME[:key=value,...]",
        help="a reward spec (repeat for several: their weighted sum, weight=W); required without --pairs",
    )
    p.add_argument("--n", type=int, default=4, metavar="N", help="images per prompt")
    p.add_argument(
        "--num-prompts", type=int, default=0, metavar="M", help="a seeded random subset of M prompts (0: all)"
    )
    p.add_argument("--pairs-per-prompt", type=int, default=1, metavar="K", help="most pairs kept per prompt")
    p.add_argument(
        "--min-margin", type=float, default=0.0, metavar="R", help="keep a pair only if its reward margin exceeds R"
    )
    p.add_argument("--pairs", action="store_true", help="shared-noise pairs with trajectories, for labelling and D3PO")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, metavar="G", help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, metavar="ETA", help="DDIM eta (--pairs needs > 0)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="base seed (image k = i*n + j gets S + k)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per pipeline call")
    p.add_argument("--lora", metavar="DIR", help="LoRA directory (diffusers format) to sample from")
    p.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", metavar="T", help="model dtype: float32, float16 or bfloat16")
    p.set_defaults(func=run_prefs)

    q = subparsers.add_parser(
        "label",
        help="label image pairs by hand (terminal or a static HTML page) into labels.jsonl",
        description="Show the pairs of a pairs.jsonl (written by `diffalign prefs --pairs`) and record which "
        "image is better, in the terminal (--out) or with a static HTML page (--html).",
        epilog=LABEL_EPILOG,
        formatter_class=HelpFormatter,
    )
    q.add_argument("--pairs", required=True, metavar="FILE", help="pairs.jsonl: prompt, image_a, image_b[, trajectory]")
    q.add_argument("--out", metavar="FILE", help="labels.jsonl to append the terminal's choices to")
    q.add_argument("--html", metavar="FILE", help="write a static labelling page here instead")
    q.add_argument("--no-preview", action="store_true", help="do not draw the images in the terminal")
    q.add_argument("--preview-width", type=int, default=32, metavar="W", help="preview width in characters per image")
    q.set_defaults(func=run_label)
