"""Over-optimization study (issue 17): one flawed proxy vs worst-case (WCO) and uncertainty-weighted (UWO)
ensembles of flawed proxies, GRPO on the shapes world, held-out gold and the proxy against steps.

    python scripts/overoptimization.py                      # 3 variants x seeds 0 1 2, 40 steps, then the plot
    python scripts/overoptimization.py --dry-run            # the nine diffalign train commands
    python scripts/overoptimization.py --plot-only          # re-read runs/overoptimization/* and plot

The variants (configs/shapes/grpo_ensemble.yaml; its header says how the members and their flaws were made):

- ``single``: member 1 alone (a small shapes CLIP + 12 x the saturation of red): what a user with one
  learned proxy optimizes;
- ``wco``: the four members (each a CLIP of its own seed and data subset with a flaw of its own hue),
  each z-scored on 32 base-model samples, combined by their minimum (Coste et al. 2023, WCO);
- ``uwo``: the same members, mean - lambda x variance (UWO) with lambda 1 (the reference code's default
  coefficient): with diffalign's training default 0.1 the variance term of z-scored members was too weak
  to matter here (docs/training.md: gold drop 0.100 mean over 3 seeds, about the single proxy's 0.111).

Every run scores member 1 on the held-out images (``eval.rewards``), so the plotted proxy
(``eval.jsonl heldout/shapes_clip_flawed``) is the single run's own reward in all three variants, next to
the exact verifier's held-out gold accuracy. The verdict lines compare each ensemble's gold drop from its
peak to the end with the single proxy's (the issue's bar: at most half), mean over seeds, and say whether
the guardrail (``hacking: true`` in eval.jsonl) flagged the single-proxy runs.

Runs, resume, logs, threads and the table are scripts/hacking_study.py's (any of its options may follow,
e.g. ``--seeds 0 1 2 3 --steps 60 --jobs 1``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hacking_study  # noqa: E402

CONFIG = "configs/shapes/grpo_ensemble.yaml"
MEMBER_1 = "shapes_clip_flawed:model=local-dir:assets/shapes-ensemble/m1,flaw_color=red,flaw_weight=12"
VARIANTS = {
    "single": f"--config {CONFIG} reward.rewards='[\"{MEMBER_1}\"]' reward.combine=weighted "
    "reward.combine_options.normalize=none",
    "wco": f"--config {CONFIG} reward.combine=wco",
    "uwo": f"--config {CONFIG} reward.combine=uwo reward.combine_options.uwo_lambda=1.0",
}
DEFAULTS = [
    "--out",
    "runs/overoptimization",
    "--steps",
    "40",
    "--proxy-file",
    "eval",
    "--proxy-term",
    "heldout/shapes_clip_flawed=1",
    "--smooth",
    "1",
    "--png",
    "docs/images/overoptimization.png",
    "--title",
    "Over-optimization on the shapes world: one flawed proxy vs WCO / UWO ensembles (GRPO)",
]


def verdict(out: Path, seeds: list[int]) -> list[str]:
    """Lines comparing each ensemble's mean gold drop (peak -> end) with the single proxy's."""
    drops: dict[str, list[float]] = {}
    flagged: dict[str, list[bool]] = {}
    for name in VARIANTS:
        for seed in seeds:
            run = hacking_study.load_run(out / f"{name}-s{seed}", name, seed, [], 1, "eval")
            if run is not None:
                drops.setdefault(name, []).append(run.table_row()["drop"])
                flagged.setdefault(name, []).append(run.hacking)
    if "single" not in drops:
        return ["overoptimization: no single-proxy run with a gold evaluation yet"]
    base = sum(drops["single"]) / len(drops["single"])
    lines = [
        f"single proxy: gold drop peak -> end mean {base:.3f} (range {min(drops['single']):.3f}..{max(drops['single']):.3f}, "
        f"{len(drops['single'])} seeds), guardrail flagged {sum(flagged['single'])}/{len(flagged['single'])}"
    ]
    for name in ("wco", "uwo"):
        if name not in drops:
            continue
        mean = sum(drops[name]) / len(drops[name])
        ok = mean <= 0.5 * base
        lines.append(
            f"{name}: gold drop mean {mean:.3f} (range {min(drops[name]):.3f}..{max(drops[name]):.3f}), "
            f"{'at most' if ok else 'MORE than'} half the single proxy's ({0.5 * base:.3f}); "
            f"guardrail flagged {sum(flagged[name])}/{len(flagged[name])}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """hacking_study with this study's variants and defaults (later options override the defaults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    variants = (
        [] if any(a.startswith("--variant") for a in argv) else [f"--variant={k}={v}" for k, v in VARIANTS.items()]
    )
    args = hacking_study.build_parser().parse_args([*DEFAULTS, *variants, *argv])
    try:
        rc = hacking_study._main(args)
    except hacking_study.StudyError as err:
        print(f"overoptimization: {err}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print("\n".join(verdict(args.out, args.seeds)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
