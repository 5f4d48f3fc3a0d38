"""The reward combination layer (diffalign/combine.py; spec §8 Parrot, §9 Ctrl-U and ensembles): the math on
hand-made reward matrices, calibration and its state, zero gradient / zero advantage outside the Pareto set,
configuration errors as one line, and tiny ``diffalign train`` runs with combined rewards."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_ddpo_rollouts import FakeCtx
from train_fixtures import assert_same_run, tiny_config, write_config

from diffalign.cli import main
from diffalign.combine import (
    Combined,
    CombineOptions,
    ZScoreNormalizer,
    build_combiner,
    combiner_names,
    dominated_by,
    ensemble_mean,
    member_uncertainty,
    member_variance,
    pareto_mask,
    uncertainty_weight,
    uncertainty_weighted,
    worst_case,
)
from diffalign.config import DiffalignConfig, TrainConfig
from diffalign.errors import DiffalignError
from diffalign.methods import PromptBatch
from diffalign.methods.ddpo import DDPO, DDPOConfig
from diffalign.methods.grpo import GRPO, GRPOConfig

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ Pareto (spec §8.6)
def test_pareto_spec_example():
    r = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    assert pareto_mask(r).tolist() == [True, True, True, False]


def test_pareto_ties_duplicates_single_and_k1():
    # identical vectors do not dominate each other: both kept; (1, 1) dominates (1, 0) (equal in one, better in one)
    r = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    assert pareto_mask(r).tolist() == [True, True, False, True]
    assert pareto_mask(torch.tensor([[0.3, -2.0]])).tolist() == [True]  # a single sample is its own P
    k1 = torch.tensor([[1.0], [3.0], [3.0], [2.0]])  # K = 1: the argmax samples, ties kept
    assert pareto_mask(k1).tolist() == [False, True, True, False]
    assert pareto_mask(torch.full((5, 3), 0.7)).all()  # all equal: nobody dominated
    # within groups: each group has its own front
    r = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [-1.0, 5.0]])
    assert pareto_mask(r, torch.tensor([0, 0, 1, 1])).tolist() == [True, False, True, True]
    assert pareto_mask(r).tolist() == [True, False, False, True]


def test_pareto_combiner_signal_weights_and_stats():
    values = {"a": torch.tensor([1.0, 2.0, 0.0, 0.5]), "b": torch.tensor([1.0, 0.0, 2.0, 0.5])}
    out = build_combiner("pareto", ["a", "b"], [1.0, 2.0])(values)
    assert out.mask.tolist() == [True, True, True, False]
    assert out.signal.tolist() == [3.0, 2.0, 4.0, 1.5]  # raw form: sum_k w_k r_k
    assert out.stats == {"pareto/selected_fraction": 0.75}
    # a negative weight asks for a smaller reward: dominance is on w_k r_k
    flipped = build_combiner("pareto", ["a", "b"], [1.0, -1.0])(values)
    assert flipped.mask.tolist() == [False, True, False, False]
    z = build_combiner("pareto", ["a", "b"], options=CombineOptions(pareto_signal="zscore"))(values)
    torch.testing.assert_close(z.signal.sum(), torch.tensor(0.0), atol=1e-6, rtol=0)  # batch z-scores sum to 0
    assert z.mask.tolist() == out.mask.tolist()  # z-scoring is monotone per reward: the same front


def test_dominated_by_counts_by_hand():
    # (0, 0) is beaten by all three others; (0.5, 0.5) by (1, 1) only; ties do not count
    r = torch.tensor([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0], [1.0, 1.0], [2.0, -1.0]])
    assert dominated_by(r).tolist() == [0, 2, 3, 0, 0]
    assert dominated_by(r, torch.tensor([0, 0, 0, 1, 1])).tolist() == [0, 1, 2, 0, 0]  # only within a group
    assert (dominated_by(r) == 0).tolist() == pareto_mask(r).tolist()


def test_pareto_dominance_signal_keeps_every_sample():
    values = {"a": torch.tensor([1.0, 2.0, 0.0, 0.5, 0.2]), "b": torch.tensor([1.0, 0.0, 2.0, 0.5, 0.1])}
    opts = CombineOptions(pareto_signal="dominance")
    out = build_combiner("pareto", ["a", "b"], [1.0, 2.0], opts)(values)
    assert out.mask is None and out.weight is None  # nobody masked: the dominated samples push away
    assert out.signal.tolist() == [0.0, 0.0, 0.0, -1.0, -2.0]  # minus the number of samples dominating each
    assert out.stats == {"pareto/selected_fraction": 0.6}
    assert not build_combiner("pareto", ["a", "b"], options=opts).differentiable
    assert build_combiner("pareto", ["a", "b"]).differentiable
    with pytest.raises(DiffalignError, match="pareto_signal=dominance gives a reward without gradient, but ReNO"):
        build_combiner("pareto", ["a", "b"], options=opts, context="reno")


# --------------------------------------------------------------------------------- ensembles (spec §9.2)
@pytest.mark.parametrize("ddof, var, uwo", [(0, 2 / 3, 2 - 0.5 * 2 / 3), (1, 1.0, 1.5)])
def test_wco_uwo_by_hand(ddof, var, uwo):
    m = torch.tensor([[1.0], [2.0], [3.0]])  # three members, one sample
    assert ensemble_mean(m).item() == 2.0 and worst_case(m).item() == 1.0
    assert member_variance(m, ddof).item() == pytest.approx(var)
    assert uncertainty_weighted(m, 0.5, ddof).item() == pytest.approx(uwo)
    assert uwo == pytest.approx({0: 1.6667, 1: 1.5}[ddof], abs=1e-4)
    values = {"r1": torch.tensor([1.0]), "r2": torch.tensor([2.0]), "r3": torch.tensor([3.0])}
    opts = CombineOptions(uwo_lambda=0.5, variance_ddof=ddof)
    assert build_combiner("uwo", list(values), options=opts)(values).signal.item() == pytest.approx(uwo)
    assert build_combiner("wco", list(values))(values).signal.item() == 1.0
    assert build_combiner("ensemble_mean", list(values))(values).signal.item() == 2.0


def test_equal_members_and_default_lambda():
    values = {"a": torch.tensor([0.2, -1.0]), "b": torch.tensor([0.2, -1.0])}
    for name in ("ensemble_mean", "wco", "uwo"):
        assert torch.equal(build_combiner(name, list(values))(values).signal, values["a"])
    uwo_train = build_combiner("uwo", ["a", "b"])
    uwo_reno = build_combiner("uwo", ["a", "b"], context="reno")
    assert uwo_train.lam == 0.1 and uwo_reno.lam == 0.5  # spec §9.2: RL fine-tuning vs best-of-n / reranking
    disagree = {"a": torch.tensor([0.0]), "b": torch.tensor([2.0])}
    assert uwo_train(disagree).signal.item() == pytest.approx(1.0 - 0.1 * 1.0)
    assert uwo_reno(disagree).signal.item() == pytest.approx(1.0 - 0.5 * 1.0)


def test_ensemble_members_must_agree():
    with pytest.raises(DiffalignError, match="at least 2 reward specs") as err:
        build_combiner("wco", ["a"])
    assert "\n" not in str(err.value)
    with pytest.raises(DiffalignError, match="weighs ensemble members equally"):
        build_combiner("uwo", ["a", "b"], [1.0, 2.0])
    combiner = build_combiner("ensemble_mean", ["a", "b"])
    with pytest.raises(DiffalignError, match="one value per sample of the same batch") as err:
        combiner({"a": torch.zeros(3), "b": torch.zeros(4)})
    assert "\n" not in str(err.value)
    with pytest.raises(DiffalignError, match="combiner expects"):
        combiner({"a": torch.zeros(3)})


# ----------------------------------------------------------------------------------- Ctrl-U (spec §9.1)
def test_ctrlu_weight_and_consistency_term():
    x = torch.tensor([0.5, 0.5, 1.0], requires_grad=True)
    values = {"c1": x * 1.0, "c2": x * torch.tensor([1.0, 3.0, 1.0])}  # sample 1 disagrees by 1.0
    opts = CombineOptions(consistency=0.1)
    out = build_combiner("ctrlu", ["c1", "c2"], options=opts)(values)
    torch.testing.assert_close(out.weight, torch.tensor([1.0, torch.exp(torch.tensor(-1.0)).item(), 1.0]))
    assert out.weight.requires_grad is False and out.penalty.requires_grad
    assert out.stats["ctrlu/weight"] < 1.0
    loss = out.mean_loss(-out.signal)
    (grad,) = torch.autograd.grad(loss, [x])
    want = -(out.weight * torch.tensor([1.0, 2.0, 1.0])) / 3 + 0.1 * torch.tensor([0.0, 2.0, 0.0]) / 3
    torch.testing.assert_close(grad, want)
    assert member_uncertainty(torch.ones(2, 4)).abs().sum() == 0  # identical evaluations: U = 0, weight 1
    assert uncertainty_weight(torch.tensor([1e6])).item() == pytest.approx(torch.exp(torch.tensor(-20.0)).item())


# ---------------------------------------------------------------------------- calibration (spec §9.2)
def test_calibration_mean_zero_std_one_and_state_round_trip():
    g = torch.Generator().manual_seed(0)
    cal = {"pick": 21 + 0.7 * torch.randn(64, generator=g), "hps": 0.3 + 0.02 * torch.randn(64, generator=g)}
    combiner = build_combiner("zscore", ["pick", "hps"])
    assert combiner.needs_calibration
    with pytest.raises(RuntimeError, match="before it was calibrated"):
        combiner(cal)
    combiner.calibrate(cal)
    z = combiner.normalizer([cal["pick"], cal["hps"]])
    for v in z:
        assert abs(float(v.double().mean())) < 1e-5 and abs(float(v.double().std(unbiased=False)) - 1) < 1e-5
    torch.testing.assert_close(combiner(cal).signal, z[0] + z[1])
    # state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict: exactly the same statistics
    buf = io.BytesIO()
    torch.save(combiner.state_dict(), buf)
    buf.seek(0)
    other = build_combiner("zscore", ["pick", "hps"])
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert not other.needs_calibration and other.normalizer.count == 64
    assert torch.equal(other.normalizer.mean, combiner.normalizer.mean)
    assert torch.equal(other.normalizer.std, combiner.normalizer.std)
    fresh = {"pick": torch.tensor([20.0, 22.5]), "hps": torch.tensor([0.31, 0.25])}
    assert torch.equal(other(fresh).signal, combiner(fresh).signal)
    with pytest.raises(ValueError, match="not"):
        build_combiner("zscore", ["hps", "pick"]).load_state_dict(combiner.state_dict())
    # ensembles of different scales: z-scored before the min (spec §9.2)
    wco = build_combiner("wco", ["pick", "hps"], options=CombineOptions(normalize="zscore"))
    wco.calibrate(cal)
    assert torch.equal(wco(fresh).signal, torch.minimum(*combiner.normalizer([fresh["pick"], fresh["hps"]])))
    norm = ZScoreNormalizer(["a"])
    with pytest.raises(DiffalignError, match="at least 2 samples"):
        norm.fit({"a": torch.tensor([1.0])})


# --------------------------------------------------------------------- zero gradient / zero advantage outside P
def test_samples_outside_p_contribute_zero_gradient():
    """Reward backprop: the per-sample loss weighted by the mask; a dominated image gets an exactly zero gradient."""
    images = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.no_grad():  # sample 3 is dominated by sample 0 in both rewards
        images[3] = images[0] * 0.5
        images[3, 1] = images[0, 1] * 0.5
    red, green = images[:, 0].mean(dim=(1, 2)), images[:, 1].mean(dim=(1, 2))
    out = build_combiner("pareto", ["red", "green"])({"red": red, "green": green})
    assert not out.mask[3]
    loss = out.mean_loss(-out.signal)
    (grad,) = torch.autograd.grad(loss, [images])
    for i in range(4):
        assert (grad[i].abs().sum() == 0) == (not bool(out.mask[i]))
    # without a mask or weights the loss is the plain mean, bit for bit
    plain = Combined(red + green)
    assert torch.equal(plain.mean_loss(-plain.signal), (-(red + green)).mean())


def _two_rewards(images, prompts):
    """Known reward vectors whatever the images: prompt "pA_B" -> (A, B)."""
    a = torch.tensor([float(p[1:].split("_")[0]) for p in prompts])
    b = torch.tensor([float(p[1:].split("_")[1]) for p in prompts])
    return a, b


class TwoRewardCtx(FakeCtx):
    def rewards(self, images, prompts):
        a, b = _two_rewards(images, prompts)
        return a + b, {"a": a, "b": b}


def test_ddpo_samples_outside_p_get_zero_advantage():
    ctx = TwoRewardCtx(steps=3, batch_size=4)
    ctx.combiner = build_combiner("pareto", ["a", "b"])
    prompts = ["p1_1", "p2_0", "p0_2", "p0.5_0.5"]
    method = DDPO(DDPOConfig(train_batch_size=2, per_prompt_stat_tracking=False), ctx.sample, TrainConfig())
    batches = [PromptBatch(prompts, prompts)]
    rollout = method.collect(ctx, batches, ctx.sampler)
    assert (
        rollout.gathered_weights.tolist() == [1.0, 1.0, 1.0, 0.0] and rollout.stats["pareto/selected_fraction"] == 0.75
    )
    adv, _ = method.local_advantages(ctx, rollout, batches)
    assert adv[3].item() == 0.0 and (adv[:3] != 0).any()
    result = DDPO(method.cfg, ctx.sample, TrainConfig()).step(TwoRewardCtx(steps=3, batch_size=4), batches)
    assert "pareto/selected_fraction" not in result.stats  # the default weighted sum selects nothing
    ctx2 = TwoRewardCtx(steps=3, batch_size=4)
    ctx2.combiner = build_combiner("pareto", ["a", "b"])
    result = DDPO(method.cfg, ctx2.sample, TrainConfig()).step(ctx2, batches)
    assert result.stats["pareto/selected_fraction"] == 0.75


def test_grpo_raw_advantages_are_parrots_equation_4():
    """``grpo.adv_std: none`` with ``reward.combine: pareto``: a selected sample's advantage is its raw
    weighted reward sum_k w_k r_k (REINFORCE on P, Parrot Eq. 4), a dominated one's exactly 0."""
    ctx = TwoRewardCtx(steps=3, batch_size=2)
    ctx.combiner = build_combiner("pareto", ["a", "b"], options=CombineOptions(pareto_groups=False))
    method = GRPO(GRPOConfig(group_size=2, train_batch_size=2, adv_std="none"), ctx.sample, TrainConfig())
    batches = [PromptBatch(["p2_0.5", "p0.5_0.25"], ["p2_0.5", "p0.5_0.25"])]
    adv, _ = method.local_advantages(ctx, method.collect(ctx, batches, ctx.sampler))
    assert adv.tolist() == [2.5, 2.5, 0.0, 0.0]


def test_grpo_selects_within_groups():
    ctx = TwoRewardCtx(steps=3, batch_size=2)
    ctx.combiner = build_combiner("pareto", ["a", "b"])
    # each prompt's group of 2 samples has equal reward vectors (they depend on the prompt only): all kept
    method = GRPO(GRPOConfig(group_size=2, train_batch_size=2), ctx.sample, TrainConfig(method="grpo"))
    batches = [PromptBatch(["p1_1", "p0.5_0.5"], ["p1_1", "p0.5_0.5"])]
    rollout = method.collect(ctx, batches, ctx.sampler)
    assert rollout.gathered_weights.tolist() == [1.0] * 4  # across groups (0.5, 0.5) would be dominated
    ctx.combiner = build_combiner("pareto", ["a", "b"], options=CombineOptions(pareto_groups=False))
    rollout = method.collect(ctx, batches, ctx.sampler)
    assert rollout.gathered_weights.tolist() == [1.0, 1.0, 0.0, 0.0]
    adv, _ = method.local_advantages(ctx, rollout)
    assert adv[2:].abs().sum() == 0
    # the dominance signal keeps the dominated group: it gets the negative advantages
    opts = CombineOptions(pareto_groups=False, pareto_signal="dominance")
    ctx.combiner = build_combiner("pareto", ["a", "b"], options=opts)
    rollout = method.collect(ctx, batches, ctx.sampler)
    assert rollout.gathered_weights is None and rollout.gathered_reward.tolist() == [0.0, 0.0, -2.0, -2.0]


# ------------------------------------------------------------------------------------- configuration
BASE = {"reward": {"rewards": ["train_fixtures:Brightness", "train_fixtures:Greenness"]}}


def load(tmp_path, data=None, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE if data is None else data))
    return DiffalignConfig.from_yaml(path, list(overrides))


def test_config_names_a_combiner_with_options(tmp_path):
    cfg = load(tmp_path, overrides=["reward.combine=pareto", "reward.combine_options.pareto_signal=zscore"])
    assert cfg.reward.combine == "pareto" and cfg.reward.combine_options.pareto_signal == "zscore"
    path = cfg.save_yaml(tmp_path / "out" / "config.yaml")
    assert DiffalignConfig.from_yaml(path) == cfg
    members = {"reward": {"rewards": ["train_fixtures:Scaled:scale=1", "train_fixtures:Scaled:scale=2"]}}
    cfg = load(tmp_path, members, ["reward.combine=uwo", "reward.combine_options.variance_ddof=1"])
    assert cfg.reward.combine_options.variance_ddof == 1 and cfg.reward.combine_options.uwo_lambda is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reward.combine=paretto"], "config key 'reward.combine' must be one of weighted, zscore, pareto"),
        (["reward.combine=paretto"], "did you mean 'pareto'?"),
        (["reward.combine_options.lambda=0.5"], "unknown config key 'reward.combine_options.lambda'"),
        (["reward.combine_options.variance_ddof=2"], "must be one of 0, 1, got"),
        (["reward.combine_options.uwo_lambda=0.3"], "uwo_lambda does not apply to reward.combine=weighted"),
        (["reward.combine=wco", "reward.rewards=[train_fixtures:Brightness]"], "at least 2 reward specs"),
        (["reward.combine=uwo", "reward.weights=[1, 2]"], "weighs ensemble members equally"),
        (["reward.combine_options.uwo_lambda=-1", "reward.combine=uwo"], "uwo_lambda must be >= 0"),
        (
            ["reward.combine=pareto", "reward.combine_options.pareto_signal=dominance", "train.method=alignprop"],
            "without gradient, but train.method=alignprop backpropagates the reward",
        ),
        (
            ["reward.rewards=[train_fixtures:Brightness, train_fixtures:Brightness]"],
            "lists 'train_fixtures:Brightness' twice",
        ),
    ],
)
def test_combine_errors_are_one_line(tmp_path, overrides, message):
    with pytest.raises(DiffalignError) as err:
        load(tmp_path, overrides=overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_combine_is_one_line(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", BASE | {"reward": {**BASE["reward"], "combine": "worst"}})
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "reward.combine" in err and len(err.splitlines()) == 1


def test_docs_list_every_combiner():
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Combining rewards") :]
    for name in combiner_names():
        assert f"`{name}`" in section, name


# ------------------------------------------------------------------------------- tiny CLI training runs
def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_backprop_run_with_pareto_selection(tmp_path, sd_dir):
    out = tmp_path / "run"
    reward = {"rewards": ["train_fixtures:Brightness", "train_fixtures:Greenness"], "combine": "pareto"}
    cfg = tiny_config(sd_dir, out, "draft_k", reward=reward, sample={"batch_size": 4}, train={"steps": 2})
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    metrics = rows(out / "metrics.jsonl")
    assert all(0 < m["pareto/selected_fraction"] <= 1 for m in metrics)
    assert {"reward/train_fixtures:Brightness", "reward/train_fixtures:Greenness"} <= set(metrics[0])


@pytest.mark.parametrize("method", ["ddpo", "grpo"])
def test_policy_gradient_run_with_an_ensemble(tmp_path, sd_dir, method):
    out = tmp_path / "run"
    members = ["train_fixtures:Scaled:scale=1", "train_fixtures:Scaled:scale=3,shift=1"]
    options = {"normalize": "zscore", "calibration_samples": 8}
    sections = {"reward": {"rewards": members, "combine": "uwo", "combine_options": options}}
    sections["train"] = {"steps": 2}
    if method == "grpo":
        sections["grpo"] = {"group_size": 2, "train_batch_size": 2}
    cfg = tiny_config(sd_dir, out, method, **sections)
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    metrics = rows(out / "metrics.jsonl")
    assert all("ensemble/variance" in m for m in metrics)
    state = torch.load(out / "checkpoints/step_2/state.pt", weights_only=True)
    assert state["combiner"]["name"] == "uwo" and state["combiner"]["normalizer"]["count"] == 8


def test_calibrated_run_resumes_bit_for_bit(tmp_path, sd_dir, capsys):
    """A zscore run resumed from its step-2 checkpoint (statistics restored, no new calibration) writes the
    same metrics, evaluations and LoRA as the uninterrupted run."""
    out = tmp_path / "run"
    reward = {"rewards": ["train_fixtures:Brightness", "train_fixtures:Greenness"], "combine": "zscore"}
    reward["combine_options"] = {"calibration_samples": 4}
    cfg = tiny_config(sd_dir, out, "alignprop", reward=reward, train={"steps": 4})
    path = write_config(tmp_path / "c.yaml", cfg)
    assert main(["train", "--config", str(path)]) == 0
    assert "reward.combine=zscore (z-scored on 4 calibration samples" in capsys.readouterr().out
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("metrics.jsonl", "eval.jsonl", "lora"):
        (shutil.copytree if (out / name).is_dir() else shutil.copy)(out / name, ref / name)
    assert main(["train", "--config", str(path), "--resume", str(out / "checkpoints" / "step_2")]) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "calibration samples" not in printed
    assert_same_run(ref, out)
    assert any(m["reward"] != 0 for m in rows(out / "metrics.jsonl"))


# ------------------------------------------------------------------------------------------------ ReNO
def test_reno_reward_loss_through_the_combiner():
    from train_fixtures import Greenness, Scaled

    from diffalign.reno.rewards import calibrate_combiner, make_reward_loss

    rewards = [Scaled(scale=1.0), Scaled(scale=3.0, shift=1.0), Greenness()]
    names = ["a", "b", "g"]
    image = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    uwo = build_combiner("uwo", names, context="reno")
    loss, raw = make_reward_loss(rewards, [1.0] * 3, names, "p", uwo)(image)
    m = torch.tensor([raw[n] for n in names], dtype=torch.float32).reshape(3, 1)
    assert loss.item() == pytest.approx(-uncertainty_weighted(m, 0.5).item(), rel=1e-5)  # lambda 0.5 in ReNO
    assert torch.autograd.grad(loss, [image])[0].abs().sum() > 0
    # z-scored members: calibrated on images of fresh noises of the (toy) generator, then used
    zs = build_combiner("wco", names, options=CombineOptions(normalize="zscore", calibration_samples=6), context="reno")
    z0 = torch.zeros(1, 48)
    calibrate_combiner(zs, rewards, names, "p", lambda z: torch.sigmoid(z).reshape(1, 3, 4, 4), z0, 6, seed=1)
    assert zs.normalizer.count == 6 and not zs.needs_calibration
    loss, _ = make_reward_loss(rewards, [1.0] * 3, names, "p", zs)(image)
    assert torch.isfinite(loss)


def test_reno_cli_bad_combine_option_is_one_line(tmp_path, capsys):
    args = ["reno", "--model", "missing-model-dir", "--prompt", "a red circle", "--out", str(tmp_path / "o")]
    args += ["--reward", "train_fixtures:Brightness", "--combine", "uwo", "--combine-option", "lam=0.5"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown config key 'combine_options.lam'" in err and len(err.splitlines()) == 1


TWO = ["train_fixtures:Brightness", "train_fixtures:Greenness"]
COMBINED_RUNS = {  # method -> (extra sections, reward section, the statistic its metrics must log)
    "alignprop": ({}, {"rewards": TWO, "combine": "ctrlu", "combine_options": {"consistency": 0.1}}, "ctrlu/weight"),
    "draft_lv": ({}, {"rewards": TWO, "combine": "pareto"}, "pareto/selected_fraction"),
    "refl": ({}, {"rewards": TWO, "combine": "wco"}, "ensemble/std"),
    "prdp": ({"prdp": {"group_size": 2}}, {"rewards": TWO, "combine": "pareto"}, "pareto/selected_fraction"),
    "d3po": ({"d3po": {"train_batch_size": 1}}, {"rewards": TWO, "combine": "uwo"}, "ensemble/variance"),
    "adv_grpo": (
        {"adv_grpo": {"group_size": 2, "train_batch_size": 2, "backbone": "shapes_clip", "hidden": 8}},
        {"rewards": ["adversarial", "train_fixtures:Brightness"], "combine": "pareto"},
        "pareto/selected_fraction",
    ),
}


@pytest.mark.parametrize("method", sorted(COMBINED_RUNS))
def test_every_method_trains_on_a_combined_reward(tmp_path, sd_dir, method):
    """Each method (beyond the DDPO / GRPO / DRaFT-K runs above) through `diffalign train` with a
    non-trivial combiner: the run finishes and logs that combiner's statistic every step."""
    extra, reward, stat = COMBINED_RUNS[method]
    out = tmp_path / "run"
    sections = extra | {"reward": reward, "train": {"steps": 2}, "eval": {"every": 0, "num_prompts": 1, "seeds": [0]}}
    cfg = tiny_config(sd_dir, out, method, **sections)
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    metrics = rows(out / "metrics.jsonl")
    assert len(metrics) == 2 and all(stat in m for m in metrics), metrics[0].keys()
