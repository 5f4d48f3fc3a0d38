"""FLUX on a tiny random FluxPipeline (T5 + CLIP, guidance embedding, dynamic shifting): our flow ODE through our
denoiser = diffusers' pipe(...), the LoRA round trip through plain diffusers, SDE log-probs rescored, and
`diffalign train` runs of grpo and alignprop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_flow import _randomize_lora, assert_rescored_log_probs_equal_stored, ode_images

from diffalign.errors import DiffalignError
from diffalign.pipelines import (
    LoraSettings,
    add_lora,
    default_size,
    family_of,
    flow_mu,
    load_lora,
    load_pipeline,
    sampler_kind,
    save_lora,
    sequence_length,
)
from diffalign.sampling import (
    FlowMatchSampler,
    make_sampler,
    pack_latents,
    unpack_latents,
)

PROMPTS = ["a red circle", "two blue squares"]
STEPS, GUIDANCE, SEED = 4, 3.5, 123


def our_images(pipe, prompts=PROMPTS, seed=SEED, steps=STEPS):
    """Our flow sampler at noise level 0 (the Euler ODE) with FLUX's dynamic shift for the default size."""
    return ode_images(pipe, prompts, seed, steps, GUIDANCE)


def their_images(pipe, prompts=PROMPTS, seed=SEED, steps=STEPS):
    """Plain diffusers FluxPipeline (its own mu, packing, guidance embedding and decode)."""
    gen = torch.Generator().manual_seed(seed)
    return pipe(
        prompts,
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=gen,
        output_type="pt",
        max_sequence_length=16,
    ).images


def test_flux_loads_as_a_flow_pipeline_with_dynamic_shifting(flux_dir):
    pipe = load_pipeline(str(flux_dir))
    assert family_of(pipe) == "flux" and sampler_kind(pipe) == "flow"
    assert pipe.scheduler.config.use_dynamic_shifting and isinstance(make_sampler(pipe.scheduler), FlowMatchSampler)
    assert default_size(pipe) == (16, 16) and sequence_length(pipe) == 16
    assert not any(p.requires_grad for m in (pipe.transformer, pipe.text_encoder_2) for p in m.parameters())
    # FluxPipeline's mu: calculate_shift of the 16 image tokens of a 16x16 image
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert flow_mu(pipe) == pytest.approx(calculate_shift(16))
    with pytest.raises(DiffalignError, match="use_dynamic_shifting"):
        make_sampler(pipe.scheduler).set_steps(4)  # no mu: one line, not diffusers' ValueError
    x = torch.randn(2, 4, 8, 6)
    assert torch.equal(unpack_latents(pack_latents(x), 8, 6), x)


@pytest.mark.parametrize("steps", [1, STEPS])
def test_flux_ode_sampler_matches_diffusers_flux_pipeline(flux_dir, steps):
    """Our Euler ODE (dynamic shift mu, packed tokens, guidance embedding, t / 1000) = FluxPipeline(...), same seed."""
    plain = load_pipeline(str(flux_dir))
    plain.set_progress_bar_config(disable=True)
    ours = load_pipeline(str(flux_dir))
    add_lora(ours, LoraSettings(rank=4, alpha=8))
    _randomize_lora(ours)
    ours.transformer.disable_adapters()
    diff = (our_images(ours, steps=steps) - their_images(plain, steps=steps)).abs().max().item()
    print(f"flux ODE parity ({steps} steps) max abs diff: {diff:.2e}")
    assert diff <= 1e-5
    ours.transformer.enable_adapters()
    assert (our_images(ours, steps=steps) - their_images(plain, steps=steps)).abs().max().item() > 1e-3


def test_flux_schnell_shape_matches_diffusers_too(tmp_path):
    """FLUX-schnell's shape: no guidance embedding, no dynamic shifting (static shift 1), still FluxPipeline's grid
    sigmas = linspace(1, 1/N, N), which SD3's set_timesteps(N) would not give."""
    from tiny import save_flux

    directory = save_flux(tmp_path, schnell=True)
    pipe = load_pipeline(str(directory))
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.transformer.config.guidance_embeds and not pipe.scheduler.config.use_dynamic_shifting
    diff = (our_images(pipe) - their_images(pipe)).abs().max().item()
    print(f"flux-schnell ODE parity max abs diff: {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("text_encoder", [False, True], ids=["transformer", "transformer+clip"])
def test_flux_lora_round_trips_through_plain_diffusers(flux_dir, tmp_path, text_encoder):
    from diffusers import FluxPipeline

    pipe = load_pipeline(str(flux_dir))
    # alpha != rank; gaussian init: not a no-op; text_encoder: FLUX's CLIP (not T5), as diffusers' FLUX loader
    add_lora(pipe, LoraSettings(rank=4, alpha=8, init="gaussian", text_encoder=text_encoder))
    assert not any("lora" in n for n, _ in pipe.text_encoder_2.named_parameters())
    names = {n for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A.default")}
    assert any("single_transformer_blocks" in n for n in names) and any("to_add_out" in n for n in names)
    _randomize_lora(pipe, seed=1)
    ours = our_images(pipe)
    save_lora(pipe, tmp_path / "lora")
    again = load_pipeline(str(flux_dir))
    load_lora(again, tmp_path / "lora", expect_rank=4)
    assert (our_images(again) - ours).abs().max().item() <= 1e-5
    fresh = FluxPipeline.from_pretrained(str(flux_dir))
    fresh.set_progress_bar_config(disable=True)
    before = their_images(fresh)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    diff = (their_images(fresh) - ours).abs().max().item()
    print(f"flux LoRA round-trip max abs diff: {diff:.2e}")
    assert diff <= 1e-5
    assert (before - ours).abs().max().item() > 1e-3


def test_recomputed_log_probs_equal_the_stored_ones_on_the_tiny_flux(flux_dir):
    """A 4-step SDE rollout on FLUX's shifted grid; every step rescored (also per-sample steps) = the stored log-prob."""
    assert_rescored_log_probs_equal_stored(load_pipeline(str(flux_dir)), STEPS, GUIDANCE, [1, 3])


def _flux_config(flux_dir, out, method, **sections):
    from train_fixtures import tiny_config

    cfg = tiny_config(
        flux_dir,
        out,
        method,
        sample={"steps": 3, "eta": 0.7, "guidance_scale": GUIDANCE, "batch_size": 2},
        eval={"every": 2, "num_prompts": 1, "seeds": [0], "eta": 0.0},
        checkpoint={"every": 0},
    )
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def test_cli_trains_flow_grpo_on_flux(tmp_path, flux_dir, capsys):
    """Flow-GRPO through `diffalign train` on the tiny FLUX: SDE rollouts on the dynamically shifted grid, the KL to
    the LoRA-disabled transformer, ODE evaluation; the saved LoRA loads into a plain FluxPipeline."""
    from diffusers import FluxPipeline
    from train_fixtures import write_config

    from diffalign.cli import main

    out = tmp_path / "run"
    cfg = _flux_config(
        flux_dir,
        out,
        "grpo",
        grpo={"group_size": 2, "train_batch_size": 2, "beta": 0.05, "kl": "flow_grpo", "timestep_fraction": 0.75},
        model={"lora": {"rank": 2, "alpha": 2.0, "init": "gaussian"}},
    )
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    assert "finished 3 steps of grpo" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["samples"] == 4 for m in metrics)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kl"]) for m in metrics)
    assert metrics[0]["kl"] > 0
    load_lora(load_pipeline(str(flux_dir)), out / "lora", expect_rank=2)
    fresh = FluxPipeline.from_pretrained(str(flux_dir))
    fresh.load_lora_weights(str(out / "lora"))


@pytest.mark.parametrize("method", ["alignprop", "draft_k", "refl"])
def test_cli_trains_reward_backprop_on_flux(tmp_path, flux_dir, method, capsys):
    """Gradients through FLUX's packed transformer calls on the ODE (checkpointed), as on SD3."""
    from train_fixtures import write_config

    from diffalign.cli import main

    out = tmp_path / "run"
    cfg = _flux_config(flux_dir, out, method)
    cfg["sample"]["eta"] = 0.0
    cfg[{"draft_k": "draft"}.get(method, method)] = {"k": 2} if method != "refl" else {}
    if method == "alignprop":
        cfg["alignprop"] = {"truncation": "uniform"}
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    assert f"finished 3 steps of {method}" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)


def test_cli_trains_nft_on_flux(tmp_path, flux_dir, capsys, monkeypatch):
    """DiffusionNFT on the tiny FLUX-dev: ODE rollouts by the old adapter, the forward-process loss on unpacked
    latents; the training velocities use FLUX's embedded guidance (the sampling one, not CFG's 1); the LoRA
    loads into a plain FluxPipeline."""
    from diffusers import FluxPipeline
    from train_fixtures import write_config

    from diffalign.cli import main
    from diffalign.methods.nft import NFT

    seen = []
    configure = NFT.configure
    monkeypatch.setattr(NFT, "configure", lambda self, ctx: (configure(self, ctx), seen.append(self.train_guidance)))
    out = tmp_path / "run"
    cfg = _flux_config(
        flux_dir,
        out,
        "nft",
        nft={"group_size": 2, "train_batch_size": 2, "kl_coef": 0.01},
        model={"lora": {"rank": 2, "alpha": 2.0, "init": "gaussian"}},
    )
    cfg["sample"] |= {"eta": 0.0, "batch_size": 1}  # one minibatch of 2 a step: step 1 is exactly on-policy
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    assert "finished 3 steps of nft" in capsys.readouterr().out
    assert seen == [GUIDANCE]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["samples"] == 2 for m in metrics)
    assert all(math.isfinite(m[k]) for m in metrics for k in ("loss", "policy_loss", "kl_div", "old_deviate"))
    assert metrics[0]["positive_loss"] == metrics[0]["negative_loss"]  # theta = theta_old: blind to r
    assert metrics[-1]["old_deviate"] > 0 and metrics[-1]["grad_norm"] > 0
    load_lora(load_pipeline(str(flux_dir)), out / "lora", expect_rank=2)
    FluxPipeline.from_pretrained(str(flux_dir)).load_lora_weights(str(out / "lora"))


def test_reno_iteration_0_is_the_diffusers_flux_image(flux_dir):
    """ReNO's generator on FLUX: the flow ODE from z on FluxPipeline's grid for the size; iteration 0 = pipe(...)."""
    from diffalign.reno import RenoConfig, reno

    pipe = load_pipeline(str(flux_dir))
    pipe.set_progress_bar_config(disable=True)
    cfg = RenoConfig(iters=1, seed=3, num_steps=2, guidance_scale=GUIDANCE)
    result = reno(pipe, PROMPTS[0], ["train_fixtures:Brightness"], None, cfg)
    theirs = their_images(pipe, PROMPTS[:1], seed=3, steps=2)
    assert (result.initial_image - theirs[0]).abs().max() < 1e-5


def test_reno_with_sde_noise_on_flux_draws_unpacked_noise(flux_dir):
    """eta > 0: the generator's fixed per-step noises have the unpacked latents' shape (C = in_channels / 4)."""
    from diffalign.reno import RenoConfig, reno

    pipe = load_pipeline(str(flux_dir))
    cfg = RenoConfig(iters=3, seed=1, num_steps=2, eta=0.5, guidance_scale=GUIDANCE)
    first, again = (reno(pipe, PROMPTS[0], ["train_fixtures:Brightness"], None, cfg) for _ in range(2))
    assert first.best_image.shape == (3, 16, 16) and torch.isfinite(first.best_image).all()
    assert torch.equal(first.best_image, again.best_image)  # the noises are fixed by the seed


def test_cli_trains_adv_grpo_on_flux(tmp_path, flux_dir, capsys):
    """Adv-GRPO on the tiny FLUX: the discriminator on the flow SDE rollouts, the GRPO update as on SD3."""
    from test_adv_grpo import adv_config
    from train_fixtures import write_config

    from diffalign.cli import main

    out = tmp_path / "run"
    flow = _flux_config(flux_dir, out, "adv_grpo")
    cfg = adv_config(tmp_path, flux_dir, out, sample=flow["sample"], eval=flow["eval"] | {"every": 3})
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    assert "finished 3 steps of adv_grpo" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["disc_loss"]) for m in metrics)
    load_lora(load_pipeline(str(flux_dir)), out / "lora", expect_rank=2)


def test_cli_sample_on_flux(flux_dir, tmp_path):
    """`diffalign sample` on FLUX: FluxPipeline's own sampler at the pipeline's default size, one PNG per image."""
    from diffalign.cli import main

    out = tmp_path / "samples"
    args = ["sample", "--model", str(flux_dir), "--prompt", PROMPTS[0], "--n", "2", "--steps", "2"]
    assert main([*args, "--guidance", "3.5", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 2
