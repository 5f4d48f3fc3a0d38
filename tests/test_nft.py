"""DiffusionNFT (diffalign/methods/nft.py, nft_loss.py; spec ../shared/specs/diffusionnft.md): the loss against
hand-computed values (spec §6 checks 1-7), the reward mapping, the old policy's decay and soft update, the
second LoRA adapter on the tiny SD3 pipeline, a tiny `diffalign train` run, exact resume after SIGKILL
(old adapter included) and the one-line refusals."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import assert_same_run, kill_inside_checkpoint_save, records, tiny_config, write_config

from diffalign.checkpoint import MODULES_FILE
from diffalign.cli import main
from diffalign.config import DiffalignConfig
from diffalign.errors import DiffalignError
from diffalign.methods.nft_loss import (
    adaptive_x0_error,
    draw_train_sigmas,
    flow_forward,
    implicit_policies,
    nft_loss,
    old_policy_decay,
    reward_probability,
    shift_sigma,
    soft_update_,
)
from diffalign.rollouts import group_advantages


def _tensors(seed: int = 0, b: int = 3, shape=(4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)
    v_old = torch.randn(b, *shape, generator=g)
    sigma = torch.tensor([0.9, 0.5, 0.2][:b])
    return x0, eps, v_old, sigma


# ------------------------------------------------------------------------------------------- reward -> r
def test_reward_probability_endpoints_and_modes():
    """Spec §6 check 3 (A_max = 5) and the reference's ablation modes."""
    a = torch.tensor([0.0, 2.5, -5.0, 7.0, -9.0, -2.5])
    torch.testing.assert_close(reward_probability(a, 5.0), torch.tensor([0.5, 0.75, 0.0, 1.0, 0.0, 0.25]))
    torch.testing.assert_close(
        reward_probability(a, 5.0, "positive_only"), torch.tensor([0.5, 0.75, 0.5, 1.0, 0.5, 0.5])
    )
    torch.testing.assert_close(
        reward_probability(a, 5.0, "negative_only"), torch.tensor([0.5, 0.5, 0.0, 0.5, 0.0, 0.25])
    )
    torch.testing.assert_close(reward_probability(a, 5.0, "one_only"), torch.tensor([0.5, 0.6, 0.5, 0.6, 0.5, 0.5]))
    torch.testing.assert_close(reward_probability(a, 5.0, "binary"), torch.tensor([0.5, 0.6, 0.4, 0.6, 0.4, 0.4]))
    with pytest.raises(DiffalignError, match="adv_mode"):
        reward_probability(a, 5.0, "sometimes")


def test_group_advantages_and_r_of_the_spec_example():
    """Spec §6 check 8: prompts [a, a, b, b], rewards [1, 3, 5, 7], global std sqrt(5), eps 1e-4."""
    adv = group_advantages(
        torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64), torch.tensor([0, 0, 1, 1]), "global"
    )
    want = 1 / (math.sqrt(5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-want, want, -want, want], dtype=torch.float64))
    torch.testing.assert_close(
        reward_probability(adv, 5.0), 0.5 + torch.tensor([-want, want, -want, want]) / 10, rtol=0, atol=1e-7
    )


# ---------------------------------------------------------------------------------------------- the loss
def test_implicit_policies():
    """Spec §6 check 7 and the on-policy coincidence: at v_theta = v_old, v+ = v- = v_old."""
    _, _, v_old, _ = _tensors()
    v = v_old + 0.3
    pos, neg = implicit_policies(v, v_old, 1.0)
    assert torch.equal(pos, v) and torch.equal(neg, 2 * v_old - v)
    for beta in (0.1, 1.0, 2.0):
        pos, neg = implicit_policies(v_old.clone(), v_old, beta)
        torch.testing.assert_close(pos, v_old)
        torch.testing.assert_close(neg, v_old)
        pos, neg = implicit_policies(v, v_old, beta)
        torch.testing.assert_close((pos + neg) / 2, v_old)  # the old policy is their midpoint


def test_x0_identity_and_adaptive_weighting():
    """Spec §6 check 6: x_sigma - sigma v - x0 = sigma (eps - x0 - v); the adaptive error = sigma mean d^2 / mean|d|."""
    x0, eps, v, sigma = _tensors(1)
    s = sigma.reshape(-1, 1, 1, 1)
    x_t = flow_forward(x0, eps, sigma)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(x_t - s * v - x0, s * (eps - x0 - v), rtol=0, atol=1e-6)
    d = v - (eps - x0)
    want = sigma * (d**2).mean(dim=(1, 2, 3)) / d.abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(adaptive_x0_error(x_t - s * v, x0), want, rtol=1e-5, atol=0)
    # the weight is a constant: its gradient is that of mean(diff^2) / w with w fixed
    pred = (x_t - s * v).requires_grad_(True)
    adaptive_x0_error(pred, x0).sum().backward()
    w = (pred.detach() - x0).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(pred.grad, 2 * (pred.detach() - x0) / (w * pred[0].numel()))
    # the floor: an exact prediction has zero loss, not NaN
    assert adaptive_x0_error(x0.clone(), x0).tolist() == [0.0, 0.0, 0.0]


def test_on_policy_loss_value_is_blind_to_r():
    """Spec §6 check 2: at v_theta = v_old, L_pol = (A_max / beta) mean(e^2) / mean|e| whatever r; if every
    |e| = c, L_pol = A_max c / beta."""
    x0, eps, _, sigma = _tensors(2, b=2, shape=(1, 2, 2))
    s = sigma[:2].reshape(-1, 1, 1, 1)
    c = torch.tensor([0.3, 0.7]).reshape(-1, 1, 1, 1)
    signs = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).reshape(1, 1, 2, 2)
    # choose v_old so that x0_hat_old - x0 = c * signs: sigma (u - v) = c signs
    v_old = (eps - x0) - c * signs / s
    for beta, a_max in [(1.0, 5.0), (0.1, 5.0), (1.0, 1.0)]:
        for r in (torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.25])):
            loss, st = nft_loss(v_old.clone(), v_old, x0, eps, sigma[:2], r, beta, a_max)
            assert loss.item() == pytest.approx(a_max * 0.5 / beta, rel=1e-5)  # mean of c over the batch
            assert st["old_deviate"].item() == 0.0 and "kl_div" not in st


@pytest.mark.parametrize(("beta", "a_max"), [(0.1, 1.0), (0.1, 5.0), (1.0, 1.0), (1.0, 5.0)])
def test_on_policy_gradient(beta, a_max):
    """Spec §6 check 1: at v_theta = v_old, dL/dv_theta = (2 sigma^2 A / N)(v_old - u) / w_old / B per sample,
    independent of beta and A_max (|A| <= A_max)."""
    x0, eps, v_old, sigma = _tensors(3)
    adv = torch.tensor([0.8, -0.5, 0.0]) * a_max
    r = reward_probability(adv, a_max)
    v = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, x0, eps, sigma, r, beta, a_max)
    loss.backward()
    s = sigma.reshape(-1, 1, 1, 1)
    u = eps - x0
    w_old = (s * (u - v_old)).abs().mean(dim=(1, 2, 3), keepdim=True)
    n, b = v_old[0].numel(), v_old.shape[0]
    want = 2 * s**2 * adv.reshape(-1, 1, 1, 1) / n * (v_old - u) / w_old / b
    torch.testing.assert_close(v.grad, want, rtol=1e-4, atol=1e-7)
    assert v.grad[2].abs().max() < 1e-8  # A = 0 (r = 1/2): no on-policy gradient (spec §6 check 4)


def test_velocity_form_and_its_closed_form():
    """Spec §6 check 5: r||a + beta d||^2 + (1 - r)||a - beta d||^2 = ||a||^2 + 2 beta (2r - 1)<a, d> + beta^2 ||d||^2
    (per-element means here), times A_max / beta; its minimizer d* = (2r - 1)(u - v_old) / beta."""
    x0, eps, v_old, sigma = _tensors(4)
    u = eps - x0
    d = torch.randn_like(v_old)
    beta, a_max, r = 0.5, 5.0, torch.tensor([0.9, 0.2, 0.5])
    loss, _ = nft_loss(v_old + d, v_old, x0, eps, sigma, r, beta, a_max, loss_space="velocity")
    a = v_old - u
    rr = r.reshape(-1, 1, 1, 1)
    per = ((a**2) + 2 * beta * (2 * rr - 1) * a * d + beta**2 * d**2).mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx(float((a_max * per / beta).mean()), rel=1e-5)
    d_star = ((2 * rr - 1) * (u - v_old) / beta).requires_grad_(True)
    star, _ = nft_loss(v_old + d_star, v_old, x0, eps, sigma, r, beta, a_max, loss_space="velocity")
    star.backward()
    assert d_star.grad.abs().max() < 1e-6


def test_kl_term_to_the_reference():
    x0, eps, v_old, sigma = _tensors(5)
    v = v_old + 0.1
    r = torch.full((3,), 0.5)
    base, _ = nft_loss(v, v_old, x0, eps, sigma, r)
    with_kl, st = nft_loss(v, v_old, x0, eps, sigma, r, v_ref=v_old - 0.2, kl_coef=0.01)
    assert st["kl_div"].item() == pytest.approx(0.09, rel=1e-5)
    assert (with_kl - base).item() == pytest.approx(0.01 * 0.09, abs=1e-6)  # a difference of float32 losses
    with pytest.raises(DiffalignError, match="nft_beta"):
        nft_loss(v, v_old, x0, eps, sigma, r, beta=0.0)


# ------------------------------------------------------------------------------------------ old policy
def test_old_policy_decay_schedules():
    """Spec §6 check 9."""
    assert [old_policy_decay(s, 0) for s in (0, 1, 1000)] == [0.0, 0.0, 0.0]
    assert old_policy_decay(1, 1) == pytest.approx(0.001) and old_policy_decay(300, 1) == pytest.approx(0.3)
    assert old_policy_decay(500, 1) == 0.5 and old_policy_decay(10_000, 1) == 0.5
    assert old_policy_decay(74, 2) == 0.0 and old_policy_decay(100, 2) == pytest.approx(0.1875)
    assert old_policy_decay(209, 2) == 0.999 and old_policy_decay(5000, 2) == 0.999
    with pytest.raises(DiffalignError, match="decay_type"):
        old_policy_decay(1, 3)


def test_soft_update_math():
    g = torch.Generator().manual_seed(0)
    old = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    new = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    want = [0.3 * o + 0.7 * n for o, n in zip(old, new, strict=True)]
    soft_update_(old, new, 0.3)
    for o, w in zip(old, want, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-7)
    soft_update_(old, new, 0.0)  # eta = 0: an exact copy (on-policy)
    assert all(torch.equal(o, n) for o, n in zip(old, new, strict=True))
    before = [o.clone() for o in old]
    soft_update_(old, [n + 1 for n in new], 1.0)  # eta = 1: frozen
    assert all(torch.equal(o, b) for o, b in zip(old, before, strict=True))
    with pytest.raises(DiffalignError, match=r"\[0, 1\]"):
        soft_update_(old, new, 1.5)


def test_train_sigmas_use_the_scheduler_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    # the grid is shift(linspace(1, shift(1e-3), T)): sigma_min is shifted twice (spec §3, §7; installed diffusers)
    grid = shift_sigma(torch.linspace(1, float(shift_sigma(torch.tensor(1e-3), 3.0)), 10), 3.0)
    torch.testing.assert_close(grid, sched.sigmas[:10], atol=1e-6, rtol=0)
    s = draw_train_sigmas(2000, "uniform", 3.0, torch.Generator().manual_seed(0))
    assert 0.001 <= s.min() and s.max() <= 1 and s.mean() > 0.6  # shifted towards noise (unshifted mean: 0.5)


# ------------------------------------------------------------------------- the second adapter on SD3
def test_old_adapter_starts_equal_and_leaves_base_and_trained_outputs_alone(sd3_dir, tmp_path):
    from diffalign.methods.nft import AdapterParameters
    from diffalign.pipelines import (
        LoraSettings,
        active_adapter,
        add_adapter_copy,
        add_lora,
        backbone,
        encode_prompts,
        load_pipeline,
        lora_parameters,
        save_lora,
    )
    from diffalign.sampling import make_denoiser
    from diffalign.trainer import Rollout

    pipe = load_pipeline(str(sd3_dir))
    cond = encode_prompts(pipe, ["a red circle"], guidance=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0])

    def v() -> torch.Tensor:
        with torch.no_grad():
            return make_denoiser(backbone(pipe), **cond.denoiser_kwargs())(x, t)

    base = v()
    params = add_lora(pipe, LoraSettings(rank=2, alpha=2.0, init="gaussian"))
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    trained = v()
    assert (trained - base).abs().max() > 1e-3
    old = add_adapter_copy(pipe, "old")
    assert len(old) == len(params) and all(".old." in k for k in old)
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in old.values())
    assert all(p.requires_grad for p in params)
    assert [id(p) for p in lora_parameters(pipe)] == [id(p) for p in params]  # the trained adapter only
    assert torch.equal(v(), trained)  # adding it changes nothing: default stays active
    with active_adapter(pipe, "old"):
        assert torch.equal(v(), trained)  # starts equal to the trained LoRA
        assert not any(p.requires_grad for p in params)
    assert all(p.requires_grad for p in params) and not any(p.requires_grad for p in old.values())
    with Rollout.adapters_disabled(pipe):
        assert torch.equal(v(), base)  # the base model is untouched
    with torch.no_grad():
        for p in old.values():
            p.add_(0.3)
    assert torch.equal(v(), trained)
    with active_adapter(pipe, "old"):
        assert (v() - trained).abs().max() > 1e-3
    with Rollout.adapters_disabled(pipe), active_adapter(pipe, "old"):
        assert torch.equal(v(), base)
    # the exported LoRA holds the trained adapter only; the module shares (does not copy) the old tensors
    save_lora(pipe, tmp_path / "lora")
    keys = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors").keys()
    assert keys and not any(".old." in k for k in keys)
    module = AdapterParameters(old)
    assert all(a is b for a, b in zip(module.parameters(), old.values(), strict=True))
    with pytest.raises(DiffalignError, match="already has a LoRA adapter"):
        add_adapter_copy(pipe, "old")


# ------------------------------------------------------------------------------------------ end to end
def _config(sd3_dir: Path, out: Path, **sections) -> dict:
    cfg = tiny_config(
        sd3_dir,
        out,
        "nft",
        sample={"steps": 4, "eta": 0.0, "guidance_scale": 1.0, "batch_size": 1},
        train={"steps": 4},
        eval={"every": 2, "num_prompts": 1, "seeds": [0], "eta": 0.0},
        checkpoint={"every": 2, "keep": 3},
        model={"lora": {"rank": 2, "alpha": 2.0, "init": "gaussian"}},
        nft={"group_size": 2, "train_batch_size": 2, "kl_coef": 0.01},
    )
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, sd3_dir: Path) -> Path:
    """An uninterrupted 4-step `diffalign train` of nft on the tiny SD3 (in this process)."""
    tmp = tmp_path_factory.mktemp("nft_ref")
    out = tmp / "ref"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--config", str(write_config(tmp / "cfg.yaml", _config(sd3_dir, out)))]) == 0
    assert "finished 4 steps of nft" in printed.getvalue() and "(old)" in printed.getvalue()
    return out


def test_cli_trains_nft_on_sd3(reference_run: Path, sd3_dir: Path):
    from diffalign.pipelines import load_lora, load_pipeline

    metrics = records(reference_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["samples"] == 2 for m in metrics)
    assert [m["updates"] for m in metrics] == [1, 2, 3, 4]  # one update per step (2 samples, minibatch 2)
    assert [m["old_decay"] for m in metrics] == pytest.approx([0.001, 0.002, 0.003, 0.004])
    assert all(math.isfinite(m[k]) for m in metrics for k in ("loss", "policy_loss", "kl_div", "old_deviate"))
    first = metrics[0]
    assert first["old_deviate"] == 0.0 and first["kl_div"] == 0.0  # theta = theta_old = base (B = 0) at first
    assert first["positive_loss"] == first["negative_loss"]  # on-policy: the loss is blind to r (spec §5.4)
    assert metrics[-1]["old_deviate"] > 0 and metrics[-1]["kl_div"] > 0 and metrics[-1]["grad_norm"] > 0
    old = load_file(reference_run / MODULES_FILE)
    assert old and all(k.startswith("old.transformer__") and "__old__" in k for k in old)
    pipe = load_pipeline(str(sd3_dir))
    load_lora(pipe, reference_run / "lora", expect_rank=2)  # theta in diffusers' format, without the old adapter
    state = torch.load(reference_run / "checkpoints" / "step_4" / "state.pt", weights_only=True)
    assert state["method"] == {"updates": 4, "last_decay": pytest.approx(0.004)}


def test_kill_inside_checkpoint_save_then_resume_is_exact(reference_run: Path, tmp_path: Path, sd3_dir: Path):
    """SIGKILL inside the save of step 4, resume from step 2: the same metrics, evaluations, LoRA and old adapter."""
    run = tmp_path / "killed"
    cfg = write_config(tmp_path / "cfg.yaml", _config(sd3_dir, run))
    kill_inside_checkpoint_save(cfg, 4)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--config", str(cfg), "--resume", "latest"]) == 0
    assert "resuming from" in printed.getvalue() and "step_2" in printed.getvalue()
    assert_same_run(reference_run, run)
    for where in (Path(MODULES_FILE), Path("checkpoints") / "step_4" / MODULES_FILE):
        a, b = load_file(reference_run / where), load_file(run / where)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = torch.load(run / "checkpoints" / "step_4" / "state.pt", weights_only=True)["method"]
    assert a == torch.load(reference_run / "checkpoints" / "step_4" / "state.pt", weights_only=True)["method"]


# ------------------------------------------------------------------------------------------ refusals
def test_ddim_pipeline_is_refused_in_one_line(tmp_path: Path, sd_dir: Path, capsys):
    cfg = _config(sd_dir, tmp_path / "run")
    code = main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "method 'nft' supports flow pipelines" in err and "\n" not in err
    assert not (tmp_path / "run" / "lora").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.eta=0.7"], "nft samples with the deterministic ODE"),
        (["nft.group_size=1"], "nft.group_size must be >= 2"),
        (["nft.nft_beta=0"], "nft.nft_beta must be > 0"),
        (["nft.decay_type=5"], "nft.decay_type must be 0, 1 or 2"),
        (["nft.train_batch_size=3"], "must be divisible by nft.train_batch_size"),
        (["nft.loss_space=eps"], "nft.loss_space"),
        (["nft.train_t_dist=beta"], "nft.train_t_dist"),
    ],
)
def test_validation_errors(tmp_path: Path, sd3_dir: Path, overrides, message):
    cfg = write_config(tmp_path / "c.yaml", _config(sd3_dir, tmp_path / "run"))
    with pytest.raises(DiffalignError) as err:
        DiffalignConfig.from_yaml(cfg, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("sections", "check"),
    [  # train_t_dist=logit_normal with the velocity loss; a Pareto-selected two-reward run (combined signal)
        (
            {"nft": {"group_size": 2, "train_batch_size": 2, "train_t_dist": "logit_normal", "loss_space": "velocity"}},
            "updates",
        ),
        (
            {"reward": {"rewards": ["train_fixtures:Brightness", "train_fixtures:Greenness"], "combine": "pareto"}},
            "pareto/selected_fraction",
        ),
    ],
    ids=["off_grid_sigmas", "combined_reward"],
)
def test_one_step_variants_run(tmp_path: Path, sd3_dir: Path, sections: dict, check: str):
    """One step on the tiny SD3 for each variant; the metrics hold a finite loss and the variant's key."""
    out = tmp_path / "run"
    cfg = _config(sd3_dir, out, train={"steps": 1}, eval={"every": 0}, checkpoint={"every": 0}, **sections)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    (m,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(m["loss"]) and 0 < m[check] <= 1


def test_weighted_loss_zero_weight_sample_adds_nothing():
    """weight = the combiner's per-sample weights: a weight-0 sample (outside Parrot's P) gives zero
    gradient to its own v_theta, and the loss is the mean of w_i times the unweighted per-sample terms."""
    x0, eps, _, sigma = _tensors(3, b=3, shape=(1, 2, 2))
    v_old = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    v = (v_old + 0.1).requires_grad_(True)
    r = torch.tensor([0.9, 0.2, 0.6])
    w = torch.tensor([1.0, 0.0, 0.5])
    loss, _ = nft_loss(v, v_old, x0, eps, sigma[:3], r, 1.0, 5.0, weight=w)
    loss.backward()
    assert v.grad[1].abs().sum() == 0 and v.grad[0].abs().sum() > 0 and v.grad[2].abs().sum() > 0
    parts = [
        nft_loss(
            v.detach()[i : i + 1],
            v_old[i : i + 1],
            x0[i : i + 1],
            eps[i : i + 1],
            sigma[i : i + 1],
            r[i : i + 1],
            1.0,
            5.0,
        )[0]
        for i in range(3)
    ]  # noqa: E501
    torch.testing.assert_close(loss.detach(), sum(wi * p for wi, p in zip(w, parts, strict=True)) / 3)
