"""Flow matching on a tiny random SD3 pipeline: loading, LoRA round-trips through plain diffusers, the
Euler ODE and Flow-GRPO SDE steps (spec §6.1) and their log-probs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.pipelines import (
    LoraSettings,
    add_lora,
    backbone,
    decode,
    encode_prompts,
    initial_latents,
    load_lora,
    load_pipeline,
    lora_parameters,
    pipeline_sampler,
    sampler_kind,
    save_lora,
)
from diffalign.sampling import (
    FlowMatchSampler,
    denoise_step,
    flow_euler_step,
    flow_noise_scale,
    flow_sde_step,
    make_denoiser,
    make_sampler,
    sample_differentiable,
    sample_trajectory,
)

PROMPTS = ["a red circle", "two blue squares"]
STEPS, CFG, SEED = 6, 4.5, 123


def ode_images(pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> torch.Tensor:
    """Our flow sampler at noise level 0 (the Euler ODE) on the pipeline's grid (FLUX: its dynamic shift),
    through our denoiser and decode: what the diffusers pipeline draws for the seed (SD3 and FLUX tests)."""
    with torch.no_grad():
        cond = encode_prompts(pipe, prompts)
        x = initial_latents(pipe, len(prompts), torch.Generator().manual_seed(seed))
        denoise = make_denoiser(backbone(pipe), guidance_scale=guidance, **cond.denoiser_kwargs())
        z, _ = sample_differentiable(denoise, pipeline_sampler(pipe, steps), x, eta=0.0)
        return decode(pipe, z)


def our_images(pipe, prompts=PROMPTS, seed=SEED, steps=STEPS):
    """:func:`ode_images` with this file's guidance: what StableDiffusion3Pipeline draws for the seed."""
    return ode_images(pipe, prompts, seed, steps, CFG)


def their_images(pipe, prompts=PROMPTS, seed=SEED, steps=STEPS):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=CFG, generator=gen, output_type="pt").images


def _randomize_lora(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(pipe):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------ loading, LoRA
def test_sd3_loads_with_its_flow_scheduler(sd3_dir):
    pipe = load_pipeline(str(sd3_dir))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sampler_kind(pipe) == "flow" and isinstance(make_sampler(pipe.scheduler), FlowMatchSampler)
    assert pipe.text_encoder_3 is None
    assert not any(p.requires_grad for p in pipe.transformer.parameters())


def test_ode_sampler_matches_diffusers_sd3_pipeline(sd3_dir):
    """Our Euler ODE through make_denoiser's transformer call and SD3-style CFG = pipe(...), same seed."""
    plain = load_pipeline(str(sd3_dir))
    ours = load_pipeline(str(sd3_dir))
    add_lora(ours, LoraSettings(rank=4, alpha=8))
    _randomize_lora(ours)
    ours.transformer.disable_adapters()
    diff = (our_images(ours) - their_images(plain)).abs().max().item()
    print(f"sd3 ODE parity max abs diff: {diff:.2e}")
    assert diff <= 1e-5
    ours.transformer.enable_adapters()
    assert (our_images(ours) - their_images(plain)).abs().max().item() > 1e-3  # LoRA really changes outputs


@pytest.mark.parametrize("text_encoder", [False, True], ids=["transformer", "transformer+text-encoders"])
def test_sd3_lora_round_trips_through_plain_diffusers(sd3_dir, tmp_path, text_encoder):
    from diffusers import DiffusionPipeline

    pipe = load_pipeline(str(sd3_dir))
    add_lora(pipe, LoraSettings(rank=4, alpha=8, text_encoder=text_encoder))  # alpha != rank
    names = {n for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A.default")}
    assert any("add_q_proj" in n for n in names) and any("to_add_out" in n for n in names)  # SD3 default targets
    _randomize_lora(pipe, seed=1)
    ours = our_images(pipe)
    save_lora(pipe, tmp_path / "lora")
    again = load_pipeline(str(sd3_dir))
    load_lora(again, tmp_path / "lora", expect_rank=4)
    assert (our_images(again) - ours).abs().max().item() <= 1e-5
    fresh = DiffusionPipeline.from_pretrained(str(sd3_dir), text_encoder_3=None, tokenizer_3=None)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    diff = (their_images(fresh) - ours).abs().max().item()
    print(f"sd3 LoRA round-trip max abs diff: {diff:.2e}")
    assert diff <= 1e-5


def test_sd3_lora_of_another_base_is_refused(sd3_dir, sd_dir, tmp_path):
    sd = load_pipeline(str(sd_dir))
    add_lora(sd, LoraSettings(rank=4))
    save_lora(sd, tmp_path / "sd_lora")
    with pytest.raises(DiffalignError, match="does not fit this base model"):
        load_lora(load_pipeline(str(sd3_dir)), tmp_path / "sd_lora")


# --------------------------------------------------------------------------------------- the step math
def _grid(steps=10, shift=3.0) -> FlowMatchSampler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sampler = make_sampler(FlowMatchEulerDiscreteScheduler(shift=shift))
    sampler.set_steps(steps)
    return sampler


def test_sde_step_at_noise_level_zero_is_the_euler_step_exactly():
    """Spec §6.1 check 1, on every step of SD3's grid (the first at sigma = 1 included), and = diffusers' step."""
    sampler = _grid(10)
    gen = torch.Generator().manual_seed(0)
    for t in sampler.timesteps:
        x, v = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
        out = sampler.step(v, t, x, eta=0.0)
        sigma, sigma_next = sampler.sigmas(t, x)
        assert torch.equal(out.prev_sample, flow_euler_step(v, x, sigma, sigma_next))
        assert torch.equal(out.prev_sample, x + v * (sigma_next - sigma))
        assert torch.equal(
            flow_sde_step(v, x, sigma, sigma_next, sampler.scheduler.sigmas[1], noise_level=0.0).prev_sample,
            out.prev_sample,
        )
        sched = sampler.scheduler
        sched._step_index = None
        assert torch.equal(out.prev_sample, sched.step(v, t, x).prev_sample)  # diffusers' Euler step
        assert torch.equal(out.x0_pred, x - sigma * v)
        assert torch.equal(sampler.predict_x0(v, t, x), out.x0_pred)


def test_sde_step_log_prob_equals_an_independent_normal():
    """log pi from an independent torch.distributions.Normal built from the spec's mean and std (float64)."""
    sampler = _grid(10)
    a = 0.7
    sigmas = sampler.scheduler.sigmas.double()
    gen = torch.Generator().manual_seed(1)
    for k, t in enumerate(sampler.timesteps):
        x, v = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        out = sampler.step(v, t, x, eta=a, generator=gen)
        s, s_next = sigmas[k], sigmas[k + 1]
        dt = s_next - s
        s_safe = sigmas[1] if k == 0 else s  # sigma = 1 -> the grid's second value (spec §6.1 pitfall i)
        assert (k == 0) == bool(s == 1)
        g = a * math.sqrt(s / (1 - s_safe))
        mu = x.double() * (1 + g**2 / (2 * s) * dt) + v.double() * (1 + g**2 * (1 - s) / (2 * s)) * dt
        std = g * math.sqrt(-dt)
        ref = torch.distributions.Normal(mu, std).log_prob(out.prev_sample.double()).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob.double(), ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(out.mean.double(), mu, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.std.double().expand_as(mu), torch.full_like(mu, std), rtol=1e-6, atol=0)
        assert out.log_prob.dtype == torch.float32 and torch.isfinite(out.log_prob).all()
    # closed form: x' = mu gives -log std - log sqrt(2 pi) per element
    x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    t = sampler.timesteps[3]
    out = sampler.step(v, t, x, eta=a)
    again = sampler.step(v, t, x, eta=a, prev_sample=out.mean)
    expect = -torch.log(out.std).reshape(-1) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(again.log_prob, expect, rtol=0, atol=1e-5)


def test_noise_scale_substitutes_the_grid_value_at_sigma_one():
    g = flow_noise_scale(torch.tensor([1.0, 0.5]), 0.7, 0.9)
    torch.testing.assert_close(g, torch.tensor([0.7 * math.sqrt(1 / 0.1), 0.7]))
    assert torch.isfinite(flow_noise_scale(torch.tensor(1.0), 0.7, _grid(10).scheduler.sigmas[1]))
    with pytest.raises(DiffalignError, match="sigma_one must be < 1"):
        flow_sde_step(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor(1.0), torch.tensor(0.5), 1.0)


def test_half_precision_inputs_score_in_float32_and_rescore_identically():
    """bf16 rollout, bf16 rescoring of the stored sample: identical fp32 log-probs (ratio exactly 1)."""
    sampler = _grid(6)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen).bfloat16()
    v = torch.randn(2, 4, 8, 8, generator=gen).bfloat16()
    t = sampler.timesteps[2]
    out = sampler.step(v, t, x, eta=0.7, generator=gen)
    assert out.prev_sample.dtype == torch.bfloat16 and out.log_prob.dtype == torch.float32
    again = sampler.step(v, t, x, eta=0.7, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)
    # per-sample timesteps (stored transitions at different steps) match stepping one by one
    ts = sampler.timesteps[[1, 4]]
    both = sampler.step(v.float(), ts, x.float(), eta=0.7, prev_sample=x.float())
    for i in range(2):
        one = sampler.step(v[i : i + 1].float(), ts[i], x[i : i + 1].float(), eta=0.7, prev_sample=x[i : i + 1].float())
        torch.testing.assert_close(both.log_prob[i : i + 1], one.log_prob, rtol=0, atol=0)


def test_off_grid_timestep_and_unset_grid_are_one_line_errors():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sampler = _grid(4)
    with pytest.raises(DiffalignError, match="not on the flow sampler's grid"):
        sampler.step(torch.zeros(1, 4, 2, 2), 123.4, torch.zeros(1, 4, 2, 2))
    fresh = FlowMatchSampler(FlowMatchEulerDiscreteScheduler())
    fresh.scheduler.timesteps = None
    with pytest.raises(DiffalignError, match="set_steps"):
        fresh.step(torch.zeros(1, 4, 2, 2), 1000.0, torch.zeros(1, 4, 2, 2))


def assert_rescored_log_probs_equal_stored(pipe, steps: int, guidance: float, ks: list[int]) -> None:
    """An SDE rollout (a = 0.7) with a random LoRA on the pipeline's grid; every step rescored equals the stored
    log-prob, and so do per-sample timesteps ``ks`` (one per prompt), as GRPO's rescoring draws them."""
    add_lora(pipe, LoraSettings(rank=4, alpha=8))
    _randomize_lora(pipe, seed=3)
    sampler = pipeline_sampler(pipe, steps)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        cond = encode_prompts(pipe, PROMPTS)
        denoise = make_denoiser(backbone(pipe), guidance_scale=guidance, **cond.denoiser_kwargs())
        traj = sample_trajectory(denoise, sampler, initial_latents(pipe, 2, gen), eta=0.7, generator=gen)
        assert traj.log_probs.shape == (2, steps) and torch.isfinite(traj.log_probs).all()
        for k, t in enumerate(traj.timesteps):
            out = denoise_step(denoise, sampler, traj.latents[:, k], t, 0.7, prev_sample=traj.latents[:, k + 1])
            torch.testing.assert_close(out.log_prob, traj.log_probs[:, k], rtol=0, atol=1e-5)
        k, rows = torch.tensor(ks), torch.arange(2)
        out = denoise_step(
            denoise, sampler, traj.latents[rows, k], traj.timesteps[k], 0.7, prev_sample=traj.latents[rows, k + 1]
        )
        torch.testing.assert_close(out.log_prob, traj.log_probs[rows, k], rtol=0, atol=1e-5)


def test_recomputed_log_probs_equal_the_stored_ones_on_the_tiny_sd3(sd3_dir):
    """Spec §6.1 check 2: a 6-step SDE rollout with CFG and LoRA; every step rescored = the stored log-prob."""
    assert_rescored_log_probs_equal_stored(load_pipeline(str(sd3_dir)), STEPS, CFG, [1, 4])


def test_sde_preserves_the_ode_marginals_and_the_gap_shrinks_with_steps():
    """Spec §6.1 check 5 on the exact velocity of a 1-D Gaussian (benchmarks/flow_marginals.py prints the table)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from flow_marginals import gaps

    coarse, fine = gaps(10, 0.7, n=50_000), gaps(100, 0.7, n=50_000)
    print(f"T=10: {coarse}\nT=100: {fine}")
    assert coarse["mean_gap"] < 0.01 and fine["mean_gap"] < 0.01
    assert fine["var_gap"] < coarse["var_gap"] / 3
    assert fine["sde_var_err"] < coarse["sde_var_err"] / 3 and fine["sde_var_err"] < 0.02


# ------------------------------------------------------------------------------------- training: GRPO
def _flow_config(sd3_dir, out, method="grpo", **sections):
    from train_fixtures import tiny_config

    cfg = tiny_config(
        sd3_dir,
        out,
        method,
        sample={"steps": 4, "eta": 0.7, "guidance_scale": 4.5, "batch_size": 2},
        eval={"every": 2, "num_prompts": 1, "seeds": [0], "eta": 0.0},
        checkpoint={"every": 0},
    )
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.mark.parametrize("kl", ["mean", "flow_grpo"])
def test_cli_trains_flow_grpo_with_kl_to_the_reference(tmp_path, sd3_dir, kl, capsys):
    """Flow-GRPO through `diffalign train` on the tiny SD3: SDE rollouts (a = 0.7), group advantages, the
    clipped ratio, the KL to the LoRA-disabled transformer; evaluation on the ODE; the LoRA loads in diffusers."""
    import json

    from train_fixtures import write_config

    from diffalign.cli import main

    out = tmp_path / "run"
    cfg = _flow_config(
        sd3_dir,
        out,
        grpo={"group_size": 2, "train_batch_size": 2, "beta": 0.05, "kl": kl, "timestep_fraction": 0.75},
        model={"lora": {"rank": 2, "alpha": 2.0, "init": "gaussian"}},
    )
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    assert "finished 3 steps of grpo" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["samples"] == 4 for m in metrics)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kl"]) for m in metrics)
    assert metrics[0]["kl"] > 0  # gaussian LoRA init: the policy differs from the reference from the start
    assert metrics[-1]["updates"] == 3 * 2
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals and all(math.isfinite(e["reward_mean"]) for e in evals if "reward_mean" in e)
    pipe = load_pipeline(str(sd3_dir))
    load_lora(pipe, out / "lora", expect_rank=2)  # a transformer LoRA in diffusers' format


def test_cli_trains_adv_grpo_on_sd3(tmp_path, sd3_dir, capsys):
    """Adv-GRPO on the tiny SD3 (issue 20): the discriminator is trained on the flow sampler's SDE rollouts and
    scores them; the GRPO update and the reference renders are the same as on a UNet pipeline."""
    import json

    from test_adv_grpo import adv_config
    from train_fixtures import write_config

    from diffalign.cli import main

    out = tmp_path / "run"
    flow = _flow_config(sd3_dir, out, "adv_grpo")
    cfg = adv_config(tmp_path, sd3_dir, out, sample=flow["sample"], eval=flow["eval"] | {"every": 3})
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    assert "finished 3 steps of adv_grpo" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["samples"] == 4 for m in metrics)
    assert all(math.isfinite(m["disc_loss"]) and 0.0 <= m["disc_acc"] <= 1.0 for m in metrics)
    assert metrics[0]["reward"] == 0.0 and metrics[-1]["reward/adversarial"] != 0.0  # the head has learned
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and "adv/acc" in evals[-1]
    load_lora(load_pipeline(str(sd3_dir)), out / "lora", expect_rank=2)


def test_flow_grpo_kl_forms():
    """flow_grpo (the reference code's form) = the exact per-element KL times |dt| (spec §6.1 pitfall o)."""
    from diffalign.methods.grpo import step_kl

    sampler = _grid(5)
    t = sampler.timesteps[2]
    x, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = sampler.step(v, t, x, eta=0.7, prev_sample=x)
    ref = sampler.step(v + 0.1, t, x, eta=0.7, prev_sample=x)
    exact = step_kl("mean", out, ref)
    g = flow_noise_scale(*sampler.sigmas(t, x)[:1], 0.7, sampler.scheduler.sigmas[1]).reshape(-1)
    torch.testing.assert_close(exact, ((out.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * out.std.reshape(-1) ** 2))
    torch.testing.assert_close(
        step_kl("flow_grpo", out, ref), ((out.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * g**2)
    )
    ddim_like = type(out)(out.prev_sample, out.log_prob, out.mean, out.std, out.pred_original_sample)
    with pytest.raises(DiffalignError, match="flow pipelines"):
        step_kl("flow_grpo", ddim_like, ref)


@pytest.mark.parametrize("method", ["ddpo", "d3po", "draft_lv"])
def test_ddim_only_methods_refuse_a_flow_pipeline_in_one_line(tmp_path, sd3_dir, method, capsys):
    from train_fixtures import write_config

    from diffalign.cli import main

    cfg = _flow_config(sd3_dir, tmp_path / "run", method)
    code = main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"method {method!r} supports ddim pipelines" in err and "grpo" in err
    assert "\n" not in err
    assert not (tmp_path / "run" / "lora").exists()


@pytest.mark.parametrize("steps", [1, 3])
def test_reno_iteration_0_is_the_diffusers_sd3_image(sd3_dir, steps):
    """ReNO's generator on a flow pipeline (issue 20): the flow ODE from z; iteration 0 = pipe(...) for the seed."""
    from diffalign.reno import RenoConfig, reno

    pipe = load_pipeline(str(sd3_dir))
    pipe.set_progress_bar_config(disable=True)
    cfg = RenoConfig(iters=1, seed=3, num_steps=steps, guidance_scale=CFG)
    result = reno(pipe, PROMPTS[0], ["train_fixtures:Brightness"], None, cfg)
    gen = torch.Generator().manual_seed(3)
    theirs = pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=CFG, generator=gen, output_type="pt")
    assert (result.initial_image - theirs.images[0]).abs().max() < 1e-5
    assert result.steps_taken == 0


def test_reno_raises_the_reward_on_sd3(sd3_dir):
    from diffalign.reno import RenoConfig, reno

    pipe = load_pipeline(str(sd3_dir))
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    result = reno(pipe, PROMPTS[0], ["train_fixtures:Brightness"], None, RenoConfig(iters=6, num_steps=2, lr=5.0))
    values = [r.rewards["brightness"] for r in result.records]
    assert result.best_rewards["brightness"] > values[0] + 1e-4 and result.best_iter > 0
    assert all(math.isfinite(r.grad_norm) for r in result.records[:-1])
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters())  # only z moves


# --------------------------------------------------------------------------- training: reward backprop
def test_differentiable_flow_sampling_reaches_only_lora_and_checkpointing_changes_nothing(sd3_dir):
    pipe = load_pipeline(str(sd3_dir))
    params = add_lora(pipe, LoraSettings(rank=2, alpha=2.0, init="gaussian"))
    sampler = make_sampler(pipe.scheduler)
    sampler.set_steps(3)
    cond = encode_prompts(pipe, PROMPTS[:1])
    denoise = make_denoiser(backbone(pipe), guidance_scale=CFG, **cond.denoiser_kwargs())
    x_T = initial_latents(pipe, 1, torch.Generator().manual_seed(0))
    noises = [torch.randn_like(x_T) for _ in range(3)]
    grads = []
    for ckpt in (False, True):
        for p in params:
            p.grad = None
        z, _ = sample_differentiable(denoise, sampler, x_T, grad_from=1, eta=0.7, noises=noises, checkpoint=ckpt)
        decode(pipe, z, differentiable=True).mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in pipe.transformer.parameters() if not p.requires_grad)


@pytest.mark.parametrize("method", ["alignprop", "draft_k", "refl"])
def test_cli_trains_reward_backprop_on_sd3(tmp_path, sd3_dir, method, capsys):
    import json

    from train_fixtures import write_config

    from diffalign.cli import main

    out = tmp_path / "run"
    cfg = _flow_config(sd3_dir, out, method, sample={"steps": 3, "eta": 0.0, "guidance_scale": 4.5, "batch_size": 2})
    cfg[{"draft_k": "draft"}.get(method, method)] = {"k": 2} if method != "refl" else {}
    if method == "alignprop":
        cfg["alignprop"] = {"truncation": "uniform"}
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    assert f"finished 3 steps of {method}" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)


def test_reno_cli_on_sd3(sd3_dir, tmp_path, capsys):
    import json

    from diffalign.cli import main

    out = tmp_path / "reno"
    args = ["reno", "--prompt", PROMPTS[0], "--model", str(sd3_dir), "--reward", "train_fixtures:Brightness"]
    assert main([*args, "--iters", "3", "--steps", "2", "--out", str(out)]) == 0
    row = json.loads((out / "summary.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == PROMPTS[0] and "brightness" in json.dumps(row)
    assert "best at iteration" in capsys.readouterr().out
