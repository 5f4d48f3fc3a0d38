"""``diffalign score``: score a folder of images with one or more rewards; write CSV or JSONL.

One row per image: ``file``, ``prompt`` and one column per reward (named after the reward; the full
spec when two rewards share a name), plus ``weighted_sum`` = sum_i w_i r_i when any spec sets
``weight=`` (rewards without it weigh 1). Prompts come from a text file (one line per image, matched
to the images sorted by file name, or a single line for all) or a JSONL file of
``{"file": ..., "prompt": ...}`` objects (other keys, such as the ``seed`` that ``diffalign sample``
writes, are ignored).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from diffalign.errors import DiffalignError
from diffalign.paths import check_output_path
from reward_models.loading import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WEIGHTED_SUM = "weighted_sum"
EPILOG = """examples:
  diffalign sample --model assets/shapes-sd --prompt 'two red circles' --n 8 --out outputs/samples
  diffalign score --reward shapes_gold --reward jpeg_compressibility:weight=0.01 \\
      --images outputs/samples --prompts outputs/samples/prompts.jsonl --out outputs/scores.csv

prompts: a .txt file with one line per image (images sorted by file name) or a single line for all,
or a .jsonl file of {"file": "NAME.png", "prompt": "..."} objects (other keys, such as the "seed"
that `diffalign sample` writes into its prompts.jsonl, are ignored). Only the images directly inside
--images are scored (not sample's grid/ subfolder). --out ending in .csv writes CSV, anything else JSONL.

columns: file, prompt, one per reward (its name; the full spec when two share a name) and, when any
--reward sets weight=W, weighted_sum = sum of w_i * r_i over the rewards (w_i = 1 where weight= is not
given). Reward specs: NAME[:key=value,...,weight=W] or pkg.module:ClassName[:key=value,...]; see
reward_models/README.md for the rewards and their options."""


def list_images(images_dir: Path) -> list[Path]:
    """Image files directly inside ``images_dir``, sorted by name."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DiffalignError(f"images directory {str(images_dir)!r} does not exist")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DiffalignError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(images_dir)!r}")
    return files


def read_prompts(prompts: Path, files: list[Path]) -> list[str]:
    """One prompt per image file, from a ``.txt`` (per line or one line for all) or ``.jsonl`` file."""
    prompts = Path(prompts)
    if prompts.is_dir():
        raise DiffalignError(f"prompts file {str(prompts)!r} is a directory; give a .txt or .jsonl file")
    if not prompts.is_file():
        raise DiffalignError(f"prompts file {str(prompts)!r} does not exist")
    try:
        text = prompts.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DiffalignError(
            f"prompts file {str(prompts)!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise DiffalignError(f"cannot read prompts file {str(prompts)!r}: {err.strerror or err}") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not any(line.strip() for line in lines):
        raise DiffalignError(f"prompts file {str(prompts)!r} is empty; give one prompt per line (or one for all)")
    if prompts.suffix.lower() == ".jsonl":
        by_file: dict[str, str] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DiffalignError(f"{prompts}:{number}: not valid JSON ({err.msg})") from err
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("file"), str)
                or not isinstance(row.get("prompt"), str)
            ):
                got = type(row).__name__ if not isinstance(row, dict) else f"keys {sorted(row)}"
                raise DiffalignError(
                    f'{prompts}:{number}: expected an object {{"file": "NAME.png", "prompt": "..."}} with string '
                    f"values, got {got}"
                )
            by_file[Path(row["file"]).name] = row["prompt"]
        missing = [f.name for f in files if f.name not in by_file]
        if missing:
            raise DiffalignError(
                f"{prompts} has no prompt for {len(missing)} of {len(files)} images (first: {missing[0]})"
            )
        return [by_file[f.name] for f in files]
    if len(lines) == 1:
        return lines * len(files)
    if len(lines) != len(files):
        raise DiffalignError(
            f"{prompts} has {len(lines)} prompts for {len(files)} images; give one line per image "
            "(matched to the images sorted by file name) or a single line for all"
        )
    return lines


def _columns(rewards: list[Any]) -> list[str]:
    names = [r.name for r in rewards]
    return [str(r.spec) if names.count(r.name) > 1 else r.name for r in rewards]


_OUTPUT_FILE_MESSAGES = {  # check_output_file's wording (diffalign.paths.check_output_path)
    "wrong_kind": "{what} {out!r} is a directory; give a file path ending in .csv or .jsonl",
    "parent_file": "cannot write {what} {out!r}: {existing!r} is a file, not a directory",
    "not_writable": "cannot write {what} {out!r}: {existing!r} is not writable; pick another path",
}


def check_output_file(out: Path) -> Path:
    """Check that file ``out`` can be written (not a directory, under a writable directory) without creating it."""
    return check_output_path(out, "--out", kind="file", messages=_OUTPUT_FILE_MESSAGES, absolute=True)


def read_image(path: Path) -> torch.Tensor:
    """:func:`reward_models.loading.load_image`, with any failure to decode the file as a DiffalignError naming it."""
    from reward_models.loading import one_line

    try:
        return load_image(path)
    except DiffalignError:
        raise
    except Exception as err:  # PIL raises SyntaxError, DecompressionBombError, ... for some broken files
        raise DiffalignError(
            f"cannot read image {str(path)!r}: {type(err).__name__}: {one_line(err)}; fix or remove the file"
        ) from None


def score_images(
    reward_specs: list[str],
    images_dir: Path,
    prompts: Path,
    out: Path,
    batch_size: int = 16,
    device: str = "cpu",
) -> Path:
    """Score every image in ``images_dir`` with each reward; write ``out`` (CSV if ``.csv``, else JSONL).

    Images of different sizes are batched separately. When any spec sets ``weight=``, a
    ``weighted_sum`` column holds sum_i w_i r_i (weight 1 where not given). Returns ``out``. Raises
    DiffalignError for an empty, unreadable or mismatched prompts file, a directory without images, an
    unreadable image, a bad reward spec, a bad device or an ``out`` that cannot be written.
    """
    from tqdm import tqdm

    from diffalign.cli import parse_device
    from diffalign.combine import check_weights
    from reward_models import RewardSpec, get_reward
    from reward_models.registry import reward_class

    if not reward_specs:
        raise DiffalignError("no rewards given; pass at least one --reward NAME[:key=value,...]")
    if batch_size < 1:
        raise DiffalignError(f"batch size must be at least 1, got {batch_size}")
    dev = parse_device(device, fix="")
    parsed = [RewardSpec.parse(spec) for spec in reward_specs]
    for spec in parsed:  # fail fast on a misspelt reward, before reading any image
        reward_class(spec.name)
    out = check_output_file(Path(out))
    files = list_images(Path(images_dir))
    prompt_list = read_prompts(Path(prompts), files)
    rewards = [get_reward(spec, device=dev) for spec in reward_specs]
    columns = _columns(rewards)
    combine = any("weight" in spec.raw for spec in parsed)
    weights = check_weights(columns, [spec.weight for spec in parsed]) if combine else []
    scores: dict[str, list[float]] = {c: [0.0] * len(files) for c in columns}
    with tqdm(total=len(files), unit="img", desc="scoring") as bar:
        for start in range(0, len(files), batch_size):
            idx = list(range(start, min(start + batch_size, len(files))))
            by_size: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
            for i in idx:
                img = read_image(files[i])
                by_size[tuple(img.shape[-2:])].append((i, img))
            for group in by_size.values():
                ids = [i for i, _ in group]
                batch = torch.stack([img for _, img in group]).to(dev)
                group_prompts = [prompt_list[i] for i in ids]
                for column, reward in zip(columns, rewards, strict=True):
                    with torch.no_grad():
                        values = reward(batch, group_prompts).tolist()
                    for i, v in zip(ids, values, strict=True):
                        scores[column][i] = float(v)
            bar.update(len(idx))
    fields = [*columns, WEIGHTED_SUM] if combine else columns
    if combine:
        scores[WEIGHTED_SUM] = [
            sum(w * scores[c][i] for w, c in zip(weights, columns, strict=True)) for i in range(len(files))
        ]
    rows = [
        {"file": f.name, "prompt": p, **{c: scores[c][i] for c in fields}}
        for i, (f, p) in enumerate(zip(files, prompt_list, strict=True))
    ]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8", newline="") as fh:
            if out.suffix.lower() == ".csv":
                writer = csv.DictWriter(fh, fieldnames=["file", "prompt", *fields])
                writer.writeheader()
                writer.writerows(rows)
            else:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
    except OSError as err:
        raise DiffalignError(f"cannot write --out {str(out)!r}: {err.strerror or err}") from None
    return out


def run(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign score`` (``args`` from the parser :func:`register` builds)."""
    out = score_images(args.reward, args.images, args.prompts, args.out, args.batch_size, args.device)
    print(f"diffalign score: wrote scores to {out}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``score`` subcommand to an ``argparse`` subparsers object; ``func`` is :func:`run`."""
    from diffalign.cli import HelpFormatter

    parser = subparsers.add_parser(
        "score",
        help="score a folder of images with one or more rewards",
        description="Score every image in a folder with one or more rewards and write CSV or JSONL.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[:key=value,...]",
        help="a reward spec; repeat for several (e.g. clip_score:model=ViT-B-32,pretrained=openai); "
        f"weight=W on any adds the {WEIGHTED_SUM} column",
    )
    parser.add_argument(
        "--images",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder of images (only the files directly inside are scored)",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        required=True,
        metavar="FILE",
        help="prompts .txt or .jsonl, e.g. sample's OUT/prompts.jsonl",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="output file: .csv writes CSV, else JSONL"
    )
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per batch")
    parser.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cpu or cuda")
    parser.set_defaults(func=run)
    return parser
