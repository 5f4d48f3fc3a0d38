"""Flow matching on a tiny random SD3 pipeline: loading, LoRA round-trips through plain diffusers, the
Euler ODE and Flow-GRPO SDE steps (spec §6.1) and their log-probs."""

from __future__ import annotations

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
    sampler_kind,
    save_lora,
)
from diffalign.sampling import (
    FlowMatchSampler,
    make_denoiser,
    make_sampler,
    sample_differentiable,
)

PROMPTS = ["a red circle", "two blue squares"]
STEPS, CFG, SEED = 6, 4.5, 123


def our_images(pipe, prompts=PROMPTS, seed=SEED, steps=STEPS):
    """Our flow sampler at noise level 0 (the Euler ODE): what StableDiffusion3Pipeline draws for the seed."""
    with torch.no_grad():
        cond = encode_prompts(pipe, prompts)
        x = initial_latents(pipe, len(prompts), torch.Generator().manual_seed(seed))
        sampler = make_sampler(pipe.scheduler)
        sampler.set_steps(steps)
        denoise = make_denoiser(backbone(pipe), guidance_scale=CFG, **cond.denoiser_kwargs())
        z, _ = sample_differentiable(denoise, sampler, x, eta=0.0)
        return decode(pipe, z)


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
