"""The shapes world: determinism, captions, fixed splits, compositional hold-out, bad specs."""

from __future__ import annotations

import hashlib
from itertools import combinations

import numpy as np
import pytest

from diffalign.errors import DiffalignError
from diffalign.shapes import SceneSpec, parse_caption, render, sample_prompts, split_prompts, split_specs
from diffalign.shapes.data import render_batch
from diffalign.shapes.splits import all_specs


def test_render_is_deterministic_and_seed_dependent():
    spec = parse_caption("a red circle and a blue square")
    a, pa = render(spec, np.random.default_rng(3))
    b, pb = render(spec, np.random.default_rng(3))
    c, _ = render(spec, np.random.default_rng(4))
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, c)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert sorted((p.color, p.shape) for p in pa) == [("blue", "square"), ("red", "circle")]
    assert render_batch([spec, spec], seed=1).shape == (2, 3, 64, 64)


def test_objects_do_not_overlap():
    for i in range(200):
        spec = SceneSpec.from_objects([("red", "circle")] * 3)
        _, placed = render(spec, np.random.default_rng(i))
        for p, q in combinations(placed, 2):
            assert (
                p.x0 + p.size + 3 <= q.x0
                or q.x0 + q.size + 3 <= p.x0
                or p.y0 + p.size + 3 <= q.y0
                or q.y0 + q.size + 3 <= p.y0
            )


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle",
        "two red circles",
        "a blue square and a yellow triangle",
        "a red circle, a green square and a blue triangle",
    ],
)
def test_caption_round_trip(caption):
    assert parse_caption(caption).caption() == caption


def test_parse_is_order_insensitive():
    assert parse_caption("a yellow triangle and a blue square") == parse_caption("a blue square and a yellow triangle")


def test_splits_are_fixed_and_disjoint():
    train, held = split_prompts("train"), split_prompts("heldout")
    assert len(train) == 105 and len(held) == 30 and not set(train) & set(held)
    assert len(all_specs()) == 135
    # pinned: split version 1 must never change silently (bump SPLIT_VERSION instead)
    assert hashlib.sha256("\n".join(held).encode()).hexdigest()[:16] == "da5420b572f4ed2e"
    assert hashlib.sha256("\n".join(train).encode()).hexdigest()[:16] == "c34834c3510eb220"
    assert held[:3] == ["two green circles", "two purple squares", "two purple triangles"]


def test_heldout_pairs_never_cooccur_in_training():
    def pairs(spec):
        types = sorted({(g.color, g.shape) for g in spec.groups})
        return set(combinations(types, 2))

    train_pairs = set().union(*(pairs(s) for s in split_specs("train")))
    train_types = {(g.color, g.shape, g.count) for s in split_specs("train") for g in s.groups}
    for spec in split_specs("heldout"):
        if len(spec.groups) == 2:
            assert not pairs(spec) & train_pairs
            assert all((g.color, g.shape, 1) in train_types for g in spec.groups)  # each part seen alone


def test_sample_prompts_seeded():
    assert sample_prompts("heldout", 8, seed=1) == sample_prompts("heldout", 8, seed=1)
    assert set(sample_prompts("heldout", 50, seed=2)) <= set(split_prompts("heldout"))


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("a pink circle", "cannot parse shapes caption"),
        ("two red hexagons", "cannot parse shapes caption"),
        ("", "it is empty"),
        ("two red circles and two blue squares", "at most 3 objects"),
    ],
)
def test_bad_specs(caption, message):
    with pytest.raises(DiffalignError, match=message):
        parse_caption(caption)


def test_bad_split():
    with pytest.raises(DiffalignError, match="unknown shapes split 'test'"):
        split_prompts("test")


def test_clip_training_negatives_add_objects_only_in_stage_two() -> None:
    """Stage 1's count negatives only remove objects from two-object scenes (the blind spot
    scripts/probe_proxy.py measures); stage 2's also add one, never beyond MAX_OBJECTS."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from train_shapes_clip import hard_negative

    from diffalign.shapes.splits import all_specs
    from diffalign.shapes.world import MAX_OBJECTS

    rng = random.Random(0)
    two = [s for s in all_specs() if s.num_objects == 2]
    stage1 = [hard_negative(s, rng) for s in two]
    stage2 = [hard_negative(s, rng, add_objects=True) for s in two]
    assert all(n != s for n, s in zip(stage1 + stage2, two + two, strict=True))
    assert max(n.num_objects for n in stage1) == 2
    assert max(n.num_objects for n in stage2) == MAX_OBJECTS
    added = sum(n.num_objects > s.num_objects for n, s in zip(stage2, two, strict=True)) / len(two)
    assert 0.15 < added < 0.4  # count changes are half of all changes, half of those add
