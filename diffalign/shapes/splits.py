"""Fixed, versioned prompt splits of the shapes world (compositional generalization).

Every scene of world version 1 has one or two objects: 15 single objects, 15 "two X" scenes and
105 two-type scenes ("a red circle and a blue square"). The held-out split contains

- every two-type scene whose *pair of object types* is held out: such a pair never co-occurs in
  any training prompt, though each type appears in training with other partners, and
- a few "two X" scenes: the count "two" and the type X each occur in training, never together.

Membership is decided by a SHA-256 hash of the caption, so the split is the same on every machine
and every numpy version; ``SPLIT_VERSION`` changes if the rule ever does.
"""

from __future__ import annotations

import hashlib
from itertools import combinations

import numpy as np

from diffalign.errors import DiffalignError
from diffalign.shapes.world import COLORS, SHAPES, SceneSpec

SPLIT_VERSION = 1
MAX_OBJECTS_V1 = 2
HELDOUT_PAIR_PERCENT = 19  # about one pair type in five
HELDOUT_TWOS = 3


def _hash(text: str) -> int:
    return int(hashlib.sha256(f"shapes-v{SPLIT_VERSION}:{text}".encode()).hexdigest(), 16)


def all_specs() -> list[SceneSpec]:
    """Every scene of world version 1, in a fixed order."""
    types = [(c, s) for c in COLORS for s in SHAPES]
    singles = [SceneSpec.from_objects([t]) for t in types]
    twos = [SceneSpec.from_objects([t, t]) for t in types]
    pairs = [SceneSpec.from_objects([a, b]) for a, b in combinations(types, 2)]
    return singles + twos + pairs


def _is_heldout(spec: SceneSpec) -> bool:
    if len(spec.groups) == 2:
        return _hash(spec.caption()) % 100 < HELDOUT_PAIR_PERCENT
    if spec.groups[0].count == 2:
        twos = sorted(
            (s for s in all_specs() if len(s.groups) == 1 and s.groups[0].count == 2), key=lambda s: _hash(s.caption())
        )
        return spec in twos[:HELDOUT_TWOS]
    return False


def split_specs(split: str) -> list[SceneSpec]:
    """The specs of ``split`` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise DiffalignError(f"unknown shapes split {split!r}; use 'train' or 'heldout'")
    want = split == "heldout"
    return [s for s in all_specs() if _is_heldout(s) == want]


def split_prompts(split: str) -> list[str]:
    """The captions of ``split``, in a fixed order."""
    return [s.caption() for s in split_specs(split)]


def sample_prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` prompts drawn uniformly (with replacement, seeded) from ``split``: a fixed eval set."""
    prompts = split_prompts(split)
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.integers(0, len(prompts), size=n)]
