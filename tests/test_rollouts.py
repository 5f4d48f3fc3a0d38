"""Shared on-policy rollout helpers on hand-made tensors (diffalign/rollouts.py; spec §2.2, §5.1, §6.1)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.rollouts import (
    Trajectories,
    group_advantages,
    grouped_prompts,
    local_share,
    timestep_subsample,
)

# ----------------------------------------------------------------------------------- advantages
# Two groups of three: group 0 = [1, 2, 3], group 1 = [4, 6, 8].
#   group 0: mean 2, deviations [-1, 0, 1], population var 2/3, std sqrt(2/3)
#   group 1: mean 6, deviations [-2, 0, 2], population var 8/3, std sqrt(8/3)
#   with group std both become [-1, 0, 1] / sqrt(2/3) = [-sqrt(3/2), 0, sqrt(3/2)] (eps = 0)
#   all six: mean 24/6 = 4, deviations [-3, -2, -1, 0, 2, 4], squares sum 34, var 34/6 = 17/3
#   with global std: group 0 -> [-1, 0, 1] / sqrt(17/3), group 1 -> [-2, 0, 2] / sqrt(17/3)
REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
IDS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_group_std_hand_values():
    a = math.sqrt(3 / 2)
    adv = group_advantages(REWARDS, IDS, std="group", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-a, 0.0, a, -a, 0.0, a]))
    # default eps = 1e-4 (Flow-GRPO) sits in the denominator
    s0, s1 = math.sqrt(2 / 3), math.sqrt(8 / 3)
    adv = group_advantages(REWARDS, IDS)
    expected = torch.tensor([-1 / (s0 + 1e-4), 0.0, 1 / (s0 + 1e-4), -2 / (s1 + 1e-4), 0.0, 2 / (s1 + 1e-4)])
    torch.testing.assert_close(adv, expected)


def test_global_std_hand_values_and_differs_from_group():
    s = math.sqrt(17 / 3)
    adv = group_advantages(REWARDS, IDS, std="global", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 0.0, 1 / s, -2 / s, 0.0, 2 / s]))
    group = group_advantages(REWARDS, IDS, std="group", eps=0.0)
    # group std makes both groups unit-scale; global std keeps group 1's spread twice group 0's
    torch.testing.assert_close(group[:3], group[3:])
    torch.testing.assert_close(adv[3:], 2 * adv[:3])
    assert not torch.allclose(adv, group)


def test_spec_sanity_check_global_std_constant_group():
    # spec §6.1 sanity check (4): [1, 2, 3] and [10, 10, 10], global std.
    # all six: mean 6, deviations [-5, -4, -3, 4, 4, 4], squares 98, var 98/6 -> std sqrt(49/3)
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    adv = group_advantages(r, IDS, std="global", eps=0.0)
    s = math.sqrt(49 / 3)
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_zero_variance_and_singleton_groups_give_exact_zero(std, eps):
    # 0.1 is not exact in binary: the mean of three copies may differ from 0.1 by round-off, the
    # advantage must still be exactly 0 (and never 0 / 0 = NaN with eps = 0)
    r = torch.tensor([0.1, 0.1, 0.1, 7.0, 1.0, 2.0])
    ids = torch.tensor([0, 0, 0, 1, 2, 2])  # group 1 has one sample
    adv = group_advantages(r, ids, std=std, eps=eps)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:4], torch.zeros(4))
    assert adv[4] < 0 < adv[5]
    everything_equal = group_advantages(torch.full((4,), 3.3), torch.tensor([0, 0, 1, 1]), std=std, eps=eps)
    assert torch.equal(everything_equal, torch.zeros(4))


def test_ties_get_equal_advantages():
    # [1, 1, 3]: mean 5/3, deviations [-2/3, -2/3, 4/3], var (4+4+16)/27 = 8/9, std 2 sqrt(2) / 3
    # -> [-1/sqrt(2), -1/sqrt(2), sqrt(2)]
    adv = group_advantages(torch.tensor([1.0, 1.0, 3.0]), torch.tensor([5, 5, 5]), eps=0.0)
    h = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([-h, -h, 2 * h]))
    assert adv[0] == adv[1]


def test_ids_are_labels_not_positions():
    # interleaved, non-contiguous ids give the same advantages, permuted accordingly
    perm = torch.tensor([3, 0, 4, 1, 5, 2])
    ids = torch.tensor([10, 10, 10, -4, -4, -4])[perm]
    adv = group_advantages(REWARDS[perm], ids)
    torch.testing.assert_close(adv, group_advantages(REWARDS, IDS)[perm])


def test_group_advantages_dtype_and_errors():
    assert group_advantages(REWARDS.double(), IDS).dtype == torch.float64
    assert group_advantages(REWARDS.half(), IDS).dtype == torch.float16
    with pytest.raises(ValueError):
        group_advantages(REWARDS, IDS[:5])
    with pytest.raises(ValueError):
        group_advantages(REWARDS, IDS.float())
    with pytest.raises(ValueError):
        group_advantages(REWARDS, IDS, std="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        group_advantages(REWARDS.reshape(2, 3), IDS.reshape(2, 3))


# ------------------------------------------------------------------------------- process layout
def test_local_share_matches_manual_slices():
    g = torch.arange(12).reshape(6, 2)
    assert torch.equal(local_share(g, 0, 2), g[0:3])
    assert torch.equal(local_share(g, 1, 2), g[3:6])
    for p in range(3):
        assert torch.equal(local_share(g, p, 3), g[2 * p : 2 * p + 2])
    assert torch.equal(local_share(g, 0, 1), g)
    with pytest.raises(ValueError):
        local_share(g, 0, 4)  # 6 rows over 4 processes
    with pytest.raises(ValueError):
        local_share(g, 2, 2)
    with pytest.raises(ValueError):
        local_share(torch.tensor(1.0), 0, 1)


def test_grouped_prompts_layout_two_processes():
    prompts = ["a", "b", "c", "d"]
    p0, ids0 = grouped_prompts(prompts, group_size=3, num_processes=2, process_index=0)
    p1, ids1 = grouped_prompts(prompts, group_size=3, num_processes=2, process_index=1)
    assert p0 == ["a"] * 3 + ["b"] * 3 and ids0 == [0] * 3 + [1] * 3
    assert p1 == ["c"] * 3 + ["d"] * 3 and ids1 == [2] * 3 + [3] * 3
    # each group lives on one process, ids are equal within a group and unique across groups
    for prompt in prompts:
        assert (prompt in p0) != (prompt in p1)
    everyone, ids = p0 + p1, ids0 + ids1
    assert {i: {everyone[k] for k in range(12) if ids[k] == i} for i in set(ids)} == {
        0: {"a"},
        1: {"b"},
        2: {"c"},
        3: {"d"},
    }
    assert sorted(set(ids)) == [0, 1, 2, 3] and [ids.count(i) for i in range(4)] == [3, 3, 3, 3]


def test_gathered_group_advantages_equal_single_process():
    prompts = ["a", "b", "c", "d"]
    g = torch.Generator().manual_seed(3)
    single_prompts, single_ids = grouped_prompts(prompts, 3, num_processes=1, process_index=0)
    rewards = torch.rand(12, generator=g)
    expected = group_advantages(rewards, torch.tensor(single_ids))
    # two processes, each scoring its own samples; accelerate's gather concatenates in process order
    shares = []
    for p in range(2):
        local_prompts, local_ids = grouped_prompts(prompts, 3, num_processes=2, process_index=p)
        rows = [k for k in range(12) if single_prompts[k] in local_prompts]
        shares.append((rewards[rows], torch.tensor(local_ids)))
    gathered_r = torch.cat([r for r, _ in shares])
    gathered_ids = torch.cat([i for _, i in shares])
    adv = group_advantages(gathered_r, gathered_ids)
    torch.testing.assert_close(adv, expected)
    # and each process gets back exactly the advantages of its own samples
    for p in range(2):
        local = local_share(adv, p, 2)
        torch.testing.assert_close(local, expected[6 * p : 6 * p + 6])
    # by hand for group "a": z-scores of its three rewards with population std
    ra = rewards[:3].double()
    za = (ra - ra.mean()) / (ra.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv[:3], za.float())


def test_grouped_prompts_errors():
    with pytest.raises(ValueError):
        grouped_prompts(["a", "b", "c"], 2, num_processes=2, process_index=0)
    with pytest.raises(ValueError):
        grouped_prompts(["a", "b"], 0, num_processes=2, process_index=0)
    with pytest.raises(ValueError):
        grouped_prompts(["a", "b"], 2, num_processes=2, process_index=2)


# ---------------------------------------------------------------------------------- subsampling
def test_timestep_subsample_shapes_and_distinct_steps():
    idx = timestep_subsample(5, 10, 0.5, torch.Generator().manual_seed(0))
    assert idx.shape == (5, 5) and idx.dtype == torch.long
    for row in idx.tolist():
        assert len(set(row)) == 5 and all(0 <= k < 10 for k in row)
    full = timestep_subsample(4, 10, 1.0, torch.Generator().manual_seed(0))
    assert all(sorted(row) == list(range(10)) for row in full.tolist())
    assert len({tuple(row) for row in full.tolist()}) > 1  # rows are permuted independently
    # K = max(1, int(T * fraction)): Flow-GRPO's 0.99 of 10 -> 9, and never 0
    assert timestep_subsample(2, 10, 0.99, torch.Generator().manual_seed(0)).shape == (2, 9)
    assert timestep_subsample(2, 10, 0.01, torch.Generator().manual_seed(0)).shape == (2, 1)


def test_timestep_subsample_deterministic():
    a = timestep_subsample(6, 20, 0.25, torch.Generator().manual_seed(7))
    b = timestep_subsample(6, 20, 0.25, torch.Generator().manual_seed(7))
    c = timestep_subsample(6, 20, 0.25, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_timestep_subsample_pairs_share_permutation():
    pair_with = torch.tensor([0, 0, 2, 2, 4, 4])
    paired = timestep_subsample(6, 12, 0.5, torch.Generator().manual_seed(1), pair_with=pair_with)
    for k in range(3):
        assert torch.equal(paired[2 * k], paired[2 * k + 1])
    assert not torch.equal(paired[0], paired[2])
    # owners keep the permutation they draw without pairing
    unpaired = timestep_subsample(6, 12, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(paired[0::2], unpaired[0::2])
    with pytest.raises(ValueError):  # a chain 2 -> 1 -> 0: 1 is not its own owner
        timestep_subsample(3, 4, 1.0, torch.Generator(), pair_with=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError):
        timestep_subsample(3, 4, 1.0, torch.Generator(), pair_with=torch.tensor([0, 0]))
    with pytest.raises(ValueError):
        timestep_subsample(3, 4, 1.0, torch.Generator(), pair_with=torch.tensor([0, 0, 3]))


def test_timestep_subsample_in_order_and_errors():
    ordered = timestep_subsample(3, 10, 0.99, torch.Generator().manual_seed(0), shuffle=False)
    assert torch.equal(ordered, torch.arange(9).expand(3, 9))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            timestep_subsample(2, 10, bad, torch.Generator())
    with pytest.raises(ValueError):
        timestep_subsample(2, 0, 1.0, torch.Generator())


# --------------------------------------------------------------------------------- trajectories
def _traj(n: int = 4, steps: int = 3, per_sample_t: bool = False) -> Trajectories:
    latents = torch.arange(n * (steps + 1) * 2 * 2 * 2, dtype=torch.float32).reshape(n, steps + 1, 2, 2, 2)
    timesteps = torch.tensor([900, 500, 100])
    return Trajectories(
        latents=latents,
        log_probs=torch.arange(n * steps, dtype=torch.float32).reshape(n, steps),
        timesteps=timesteps.expand(n, steps).clone() if per_sample_t else timesteps,
        prompts=[f"p{i}" for i in range(n)],
        prompt_keys=[f"k{i}" for i in range(n)],
        group_ids=torch.tensor([0, 0, 1, 1])[:n],
        rewards={"a": torch.arange(n, dtype=torch.float32), "b": -torch.arange(n, dtype=torch.float32)},
        reward=torch.arange(n, dtype=torch.float32) * 10,
    )


def test_trajectories_select():
    t = _traj()
    assert len(t) == 4 and t.num_steps == 3
    s = t.select([2, 0])
    assert torch.equal(s.latents, t.latents[[2, 0]]) and torch.equal(s.log_probs, t.log_probs[[2, 0]])
    assert torch.equal(s.timesteps, t.timesteps)
    assert s.prompts == ["p2", "p0"] and s.prompt_keys == ["k2", "k0"]
    assert s.group_ids.tolist() == [1, 0] and s.rewards["b"].tolist() == [-2.0, 0.0]
    assert s.reward.tolist() == [20.0, 0.0] and s.advantages is None
    mask = t.select(torch.tensor([False, True, False, True]))
    assert mask.prompts == ["p1", "p3"]
    assert t.select(slice(1, 3)).prompts == ["p1", "p2"]
    per_sample = _traj(per_sample_t=True).select(torch.tensor([3]))
    assert per_sample.timesteps.shape == (1, 3)


def test_trajectories_cat_and_validation():
    t = _traj()
    both = Trajectories.cat([t.select([0, 1]), t.select([2, 3])])
    assert torch.equal(both.latents, t.latents) and both.prompts == t.prompts
    assert torch.equal(both.rewards["a"], t.rewards["a"]) and torch.equal(both.timesteps, t.timesteps)
    with pytest.raises(ValueError):
        Trajectories(t.latents, t.log_probs[:, :2], t.timesteps, t.prompts, t.prompt_keys, t.group_ids)
    with pytest.raises(ValueError):
        Trajectories(t.latents, t.log_probs, t.timesteps, t.prompts[:3], t.prompt_keys, t.group_ids)
    with pytest.raises(ValueError):
        Trajectories(t.latents, t.log_probs, t.timesteps, t.prompts, t.prompt_keys, t.group_ids, reward=torch.ones(3))
