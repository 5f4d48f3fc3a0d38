"""Where can a shapes proxy be fooled? Compare its score of a correct render with renders that are
wrong in one way (one object dropped, one object added, one color or one shape swapped).

    python scripts/probe_proxy.py --reward shapes_clip --repeats 3

For each held-out caption (x ``--repeats`` random layouts) and each kind of error, prints how often
the proxy scores the correct render above the wrong one for the same caption. 0.5 is chance: an
error kind near 0.5 is one that training against the proxy will not remove (and may add).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffalign.shapes.splits import split_prompts  # noqa: E402
from diffalign.shapes.world import COLORS, MAX_OBJECTS, SHAPES, SceneSpec, parse_caption, render  # noqa: E402


def variants(spec: SceneSpec, rng: np.random.Generator) -> dict[str, SceneSpec]:
    """One wrong scene per kind of error (kinds that do not apply to ``spec`` are left out)."""
    objs = spec.objects()
    out = {}
    if len(objs) > 1:
        out["drop one object"] = SceneSpec.from_objects(objs[:-1])
    if len(objs) < MAX_OBJECTS:
        out["add one object"] = SceneSpec.from_objects(objs + [objs[0]])
    color = [c for c in COLORS if c != objs[0][0]][rng.integers(len(COLORS) - 1)]
    shape = [s for s in SHAPES if s != objs[0][1]][rng.integers(len(SHAPES) - 1)]
    out["swap a color"] = SceneSpec.from_objects([(color, objs[0][1])] + objs[1:])
    out["swap a shape"] = SceneSpec.from_objects([(objs[0][0], shape)] + objs[1:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", default="shapes_clip", help="reward spec (get_reward syntax)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from reward_models import get_reward

    reward = get_reward(args.reward)
    rng = np.random.default_rng(args.seed)

    def image(spec: SceneSpec) -> torch.Tensor:
        return torch.from_numpy(render(spec, rng, 64)[0]).permute(2, 0, 1).float() / 255.0

    wins: dict[str, list[float]] = {}
    for caption in split_prompts(args.split) * args.repeats:
        spec = parse_caption(caption)
        good = image(spec)
        for kind, wrong in variants(spec, rng).items():
            with torch.no_grad():
                s = reward(torch.stack([good, image(wrong)]), [caption, caption])
            wins.setdefault(kind, []).append(float(s[0] > s[1]))
    for kind, values in wins.items():
        print(f"{kind:16s} proxy prefers the correct render in {sum(values) / len(values):.2f} of {len(values)} pairs")


if __name__ == "__main__":
    main()
