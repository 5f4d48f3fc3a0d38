"""Pareto study (issue 17): Parrot's non-dominated selection vs the weighted sum of two conflicting rewards.

    python scripts/pareto_study.py                 # train 2 variants x seeds 0 1 2, draw held-out images, plot
    python scripts/pareto_study.py --dry-run       # the diffalign train commands
    python scripts/pareto_study.py --plot-only     # re-read the runs and the gallery's scores; plot
    python scripts/pareto_study.py --second jpeg_compressibility --weight 1 --out runs/pareto-jpeg   # another pair

Both variants are GRPO on the shapes world (configs/shapes/grpo.yaml) with the rewards
``shapes_clip`` (the proxy: is the image what the caption says?) and ``saturation`` (mean colour
saturation: more, larger or smeared coloured regions), weights ``[1, W]`` (``--weight``, default 6), the
same prompts, seeds and steps (equal compute: every step samples the same 32 trajectories); ``--second``
takes another zoo reward in place of ``saturation`` (e.g. ``jpeg_compressibility``, DDPO's, with W = 1: its
spread within a prompt's group of base samples, 0.16 kB, matches the CLIP's, 0.15):

- ``weighted``: ``reward.combine=weighted``: every sample's reward is ``clip + W sat``;
- ``pareto``: ``reward.combine=pareto``: Parrot (Lee et al. 2024, Algorithm 1): only the non-dominated
  samples of each prompt's group train (advantage 0 for the others), with the same reward;
- ``dominance`` (``--variants weighted pareto dominance``): ``pareto_signal=dominance``, every sample's
  reward is minus the number of samples of its group that dominate it (no weighting, nobody masked);
- ``pareto_raw`` (``--variants weighted pareto_raw``): Parrot's Eq. 4 as written: the non-dominated samples
  train with their raw reward as the REINFORCE weight (``grpo.adv_std=none``: no group baseline, no
  scaling), so every selected sample is reinforced, the front's extremes included; the others get 0.
- ``pareto_batch`` (``--variants weighted pareto_batch``): the same with the selection over the sampling
  batch (``reward.combine_options.pareto_groups=false``), as the paper's Algorithm 1 writes it: one front per
  sampling batch (16 samples: 4 prompts x 4), across prompts, instead of one per prompt's group.

Then ``diffalign gallery`` draws every run's held-out images (30 held-out compositions x 5 seeds, the
evaluation's draws) plus the base model's and scores them with both rewards and the gold verifier
(OUT/gallery: scores.jsonl and a browsable page). The figure of merit is the hypervolume of the
(shapes_clip, saturation) points of a run's 150 images: the area dominated by them above a reference
point (the component-wise minimum over every image of every variant, base included), one number per
run; reported per seed, as mean and range per variant, next to the base model's. The PNG
(``--png``) shows each variant's non-dominated front (pooled over seeds) over all its points, and the
mean rewards and gold accuracy per variant.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hacking_study  # noqa: E402

KEYS = ("shapes_clip", "saturation")  # the default pair; --second replaces the second reward
CONFIG = "configs/shapes/grpo.yaml"


VARIANTS = ("weighted", "pareto", "dominance", "pareto_raw", "pareto_batch")


def variants(weight: float, second: str = KEYS[1], names: tuple[str, ...] = VARIANTS[:2]) -> dict[str, str]:
    """The variants' overrides of configs/shapes/grpo.yaml (``names`` picks them, in VARIANTS' order)."""
    # sample.eta=1: the eta the study was measured with (configs/shapes/grpo.yaml now samples at 0.5)
    common = f"--config {CONFIG} sample.eta=1.0 reward.rewards=[shapes_clip,{second}] reward.weights=[1,{weight:g}]"
    every = {
        "weighted": f"{common} reward.combine=weighted",
        "pareto": f"{common} reward.combine=pareto",
        "dominance": f"{common} reward.combine=pareto reward.combine_options.pareto_signal=dominance",
        "pareto_raw": f"{common} reward.combine=pareto grpo.adv_std=none",
        "pareto_batch": f"{common} reward.combine=pareto grpo.adv_std=none reward.combine_options.pareto_groups=false",
    }
    return {k: v for k, v in every.items() if k in names}


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points of a 2-D set (both coordinates maximized), sorted by the first one
    descending (so the second ascends); duplicates kept once."""
    out: list[tuple[float, float]] = []
    best_y = -float("inf")
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            out.append((x, y))
            best_y = y
    return out


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` and dominating ``ref`` (2-D, both maximized): the union of the
    rectangles ``[ref_x, x] x [ref_y, y]``, summed as slabs along the front."""
    pts = [(x, y) for x, y in front(points) if x > ref[0] and y > ref[1]]
    area, prev_y = 0.0, ref[1]
    for x, y in pts:  # x descending, y ascending
        area += (x - ref[0]) * (y - prev_y)
        prev_y = y
    return area


def read_scores(path: Path) -> dict[str, list[dict]]:
    """scores.jsonl of a gallery, rows grouped by variant label."""
    rows: dict[str, list[dict]] = {}
    for row in hacking_study.read_jsonl(path):
        rows.setdefault(row["label"], []).append(row)
    return rows


COLORS = {
    "base": "0.45",
    "weighted": "tab:blue",
    "pareto": "tab:red",
    "dominance": "tab:green",
    "pareto_raw": "tab:purple",
    "pareto_batch": "tab:brown",
}


def family(label: str) -> str:
    """The variant a gallery column belongs to: ``weighted-s1`` -> ``weighted``; the base model -> ``base``."""
    name = label.split("-s")[0]
    return name if name in COLORS else "base"


def points(rs: list[dict], keys: tuple[str, str]) -> list[tuple[float, float]]:
    """The (reward 1, reward 2) point of every gallery row."""
    return [(r["scores"][keys[0]], r["scores"][keys[1]]) for r in rs]


def summarize(
    rows: dict[str, list[dict]], keys: tuple[str, str] = KEYS
) -> tuple[dict[str, dict[str, float]], tuple[float, float]]:
    """Per gallery variant: hypervolume, mean rewards and gold accuracy; and the reference point."""
    every = [p for rs in rows.values() for p in points(rs, keys)]
    ref = (min(p[0] for p in every), min(p[1] for p in every))
    table = {}
    for label, rs in rows.items():
        pts = points(rs, keys)
        table[label] = {
            "hypervolume": hypervolume(pts, ref),
            keys[0]: sum(p[0] for p in pts) / len(pts),
            keys[1]: sum(p[1] for p in pts) / len(pts),
            "gold/accuracy": sum(r["scores"].get("gold/accuracy", 0.0) for r in rs) / len(rs),
            "front_size": float(len(front(pts))),
        }
    return table, ref


def plot(
    rows: dict[str, list[dict]],
    table: dict[str, dict[str, float]],
    png: Path,
    title: str,
    keys: tuple[str, str] = KEYS,
) -> None:
    """Points and pooled non-dominated fronts per variant family (base and each variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    families: dict[str, list[tuple[float, float]]] = {}
    for label, rs in rows.items():
        families.setdefault(family(label), []).extend(points(rs, keys))
    for name, pts in families.items():
        c = COLORS[name]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, color=c, alpha=0.25)
        f = front(pts)
        hv = [v["hypervolume"] for k, v in table.items() if family(k) == name]
        ax.step(
            [p[0] for p in f],
            [p[1] for p in f],
            where="post",
            color=c,
            linewidth=2,
            label=f"{name}: front of {len(pts)} images; HV per run {sum(hv) / len(hv):.4f} (mean)",
        )
    ax.set_xlabel(f"{keys[0]} (held-out)")
    ax.set_ylabel(f"{keys[1]} (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def report(table: dict[str, dict[str, float]], ref: tuple[float, float], keys: tuple[str, str] = KEYS) -> str:
    """The Markdown table per run, then mean and range of the hypervolume per variant."""
    lines = [
        f"reference point ({keys[0]}, {keys[1]}) = ({ref[0]:.4f}, {ref[1]:.4f})",
        f"| run | hypervolume | front size | mean {keys[0]} | mean {keys[1]} | gold accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for label, t in table.items():
        lines.append(
            f"| {label} | {t['hypervolume']:.4f} | {t['front_size']:.0f} | {t[keys[0]]:.3f} | {t[keys[1]]:.3f} | "
            f"{t['gold/accuracy']:.3f} |"
        )
    for family in VARIANTS:
        hv = [t["hypervolume"] for k, t in table.items() if k.startswith(family + "-s")]
        if hv:
            lines.append(
                f"{family}: hypervolume mean {sum(hv) / len(hv):.4f} (range {min(hv):.4f}..{max(hv):.4f}, {len(hv)} seeds)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/pareto"), help="runs go to OUT/<variant>-s<seed>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20, help="train.steps of every run (default 20)")
    p.add_argument("--weight", type=float, default=6.0, help="W of the second reward (default 6)")
    p.add_argument(
        "--second",
        default=KEYS[1],
        help="the second reward, a zoo name (default saturation; e.g. jpeg_compressibility --weight 1)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS[:2]),
        help="which variants to train and compare (default: weighted pareto)",
    )
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run and of the gallery (default 1)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--png", type=Path, default=Path("docs/images/pareto_fronts.png"))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="do not train or draw: read OUT/gallery/scores.jsonl")
    args = p.parse_args(argv)
    keys = (KEYS[0], args.second)
    chosen = variants(args.weight, args.second, tuple(args.variants))
    study = [
        "--out",
        str(args.out),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--jobs",
        str(args.jobs),
        "--seeds",
        *map(str, args.seeds),
        "--proxy-term",
        "reward/shapes_clip=1",
        "--proxy-term",
        f"reward/{args.second}={args.weight:g}",
        "--png",
        str(args.png.with_name(args.png.stem + "_training.png")),
        "--title",
        f"{' vs '.join(args.variants)}: GRPO on shapes_clip + W x {args.second}",
        *[f"--variant={k}={v}" for k, v in chosen.items()],
    ]
    study += ["--dry-run"] if args.dry_run else (["--plot-only"] if args.plot_only else [])
    try:
        rc = hacking_study._main(hacking_study.build_parser().parse_args(study))
    except hacking_study.StudyError as err:
        print(f"pareto_study: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return rc
    gallery = args.out / "gallery"
    if not (gallery / "scores.jsonl").is_file():
        if args.plot_only:
            print(f"pareto_study: {gallery / 'scores.jsonl'} is missing; run without --plot-only", file=sys.stderr)
            return 2
        runs = [f"--run={v}-s{s}={args.out / f'{v}-s{s}'}" for v in chosen for s in args.seeds]
        cmd = [sys.executable, "-m", "diffalign", "gallery", *runs, "--prompts", "shapes:heldout"]
        cmd += [
            "--num-prompts",
            "30",
            "--seeds",
            "0-4",
            "--reward",
            keys[0],
            "--reward",
            keys[1],
            "--out",
            str(gallery),
        ]
        print("pareto_study: " + " ".join(cmd), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
        subprocess.run(cmd, check=True, env=env)
    rows = read_scores(gallery / "scores.jsonl")
    table, ref = summarize(rows, keys)
    plot(
        rows,
        table,
        args.png,
        f"Held-out fronts ({keys[0]}, {keys[1]}): {' vs '.join(args.variants)}, {args.steps} GRPO steps",
        keys,
    )
    print(report(table, ref, keys))
    print(f"pareto_study: wrote {args.png}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
