"""Loading, parity with plain diffusers, LoRA round-trips and the loader's error messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from diffalign.errors import DiffalignError
from diffalign.pipelines import (
    LoraSettings,
    add_lora,
    decode,
    encode_prompts,
    initial_latents,
    load_lora,
    load_pipeline,
    lora_parameters,
    save_lora,
)
from diffalign.sampling import make_denoiser, sample_differentiable

PROMPTS = ["a red circle", "two blue squares"]
STEPS, CFG, SEED = 6, 5.0, 123


def our_images(pipe, prompts=PROMPTS, seed=SEED):
    """Our sampler with eta = 0: the images diffusers' pipeline produces for the same seed."""
    with torch.no_grad():
        cond = encode_prompts(pipe, prompts)
        x = initial_latents(pipe, len(prompts), torch.Generator().manual_seed(seed))
        pipe.scheduler.set_timesteps(STEPS)
        z, _ = sample_differentiable(
            make_denoiser(pipe.unet, guidance_scale=CFG, **cond.denoiser_kwargs()), pipe.scheduler, x, eta=0.0
        )
        return decode(pipe, z)


def their_images(pipe, prompts=PROMPTS, seed=SEED):
    out = pipe(
        prompts,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images


def _randomize_lora(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(pipe):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_sampler_matches_diffusers_pipeline_with_lora_disabled(family, request):
    path = request.getfixturevalue(f"{family}_dir")
    plain = load_pipeline(str(path))
    ours = load_pipeline(str(path))
    add_lora(ours, LoraSettings(rank=4, alpha=8))
    _randomize_lora(ours)
    ours.unet.disable_adapters()
    diff = (our_images(ours) - their_images(plain)).abs().max().item()
    print(f"{family} parity max abs diff: {diff:.2e}")
    assert diff <= 1e-5
    ours.unet.enable_adapters()
    assert (our_images(ours) - their_images(plain)).abs().max().item() > 1e-3  # LoRA really changes outputs


# The shipped AlignProp config's LoRA targets: attention, the transformer blocks' projections and
# feed-forwards, and the resnets' convolutions (Conv2d LoRA layers).
ALIGNPROP_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes" / "alignprop.yaml"
WIDE_TARGETS = yaml.safe_load(ALIGNPROP_CONFIG.read_text())["model"]["lora"]["target_modules"]


@pytest.mark.parametrize(
    ("family", "targets"),
    [("sd", None), ("sdxl", None), ("sd", WIDE_TARGETS)],
    ids=["sd", "sdxl", "sd-convs-and-ff"],
)
def test_lora_save_then_plain_diffusers_load_gives_identical_images(family, targets, request, tmp_path):
    from diffusers import DiffusionPipeline

    path = request.getfixturevalue(f"{family}_dir")
    pipe = load_pipeline(str(path))
    settings = LoraSettings(rank=4, alpha=8, text_encoder=True)  # alpha != rank: metadata must round-trip
    if targets:
        settings.target_modules = targets
    add_lora(pipe, settings)
    _randomize_lora(pipe, seed=1)
    ours = our_images(pipe)
    save_lora(pipe, tmp_path / "lora")
    weights = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others as the umask allows, not 0600
    # through our loader (UNet by diffusers, text encoders by peft), with the rank check: any transformers
    again = load_pipeline(str(path))
    load_lora(again, tmp_path / "lora", expect_rank=4)
    assert (our_images(again) - ours).abs().max().item() <= 1e-5
    # through plain diffusers (text-encoder LoRA through transformers' load_adapter, which transformers 5.24
    # does not gate on the peft version; its add_adapter, which add_lora no longer uses, is gated)
    fresh = DiffusionPipeline.from_pretrained(str(path))
    fresh.load_lora_weights(str(tmp_path / "lora"))
    diff = (their_images(fresh) - ours).abs().max().item()
    print(f"{family} LoRA round-trip max abs diff: {diff:.2e}")
    assert diff <= 1e-5


def test_lora_files_are_byte_identical_across_processes(sd_dir, tmp_path):
    """The adapter metadata lists target modules sorted, not in a set's per-process order."""
    import hashlib
    import subprocess
    import sys

    code = (
        "import sys, torch; from diffalign.pipelines import *; torch.manual_seed(0); p = load_pipeline(sys.argv[1]); "
        "add_lora(p, LoraSettings(rank=2, target_modules=['to_q', 'to_k', 'to_v', 'to_out.0', 'proj_in', 'conv1'], "
        "text_encoder=True)); save_lora(p, sys.argv[2])"
    )
    digests = set()
    for i, seed in enumerate(("1", "2", "3")):
        out = tmp_path / f"lora{i}"
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", code, str(sd_dir), str(out)], check=True, env=env)
        digests.add(hashlib.sha256((out / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_gradients_reach_only_lora_parameters(sd_dir):
    pipe = load_pipeline(str(sd_dir))
    params = add_lora(pipe, LoraSettings(rank=2))
    cond = encode_prompts(pipe, PROMPTS)
    pipe.scheduler.set_timesteps(4)
    x = initial_latents(pipe, 2, torch.Generator().manual_seed(0))
    z, _ = sample_differentiable(
        make_denoiser(pipe.unet, guidance_scale=CFG, **cond.denoiser_kwargs()), pipe.scheduler, x, grad_from=2
    )
    decode(pipe, z, differentiable=True).mean().backward()
    lora_ids = {id(p) for p in params}
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        for name, p in module.named_parameters():
            if id(p) in lora_ids:
                continue
            assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_wrong_base_and_wrong_rank_give_clear_errors(sd_dir, sdxl_dir, tmp_path):
    pipe = load_pipeline(str(sd_dir))
    add_lora(pipe, LoraSettings(rank=4))
    save_lora(pipe, tmp_path / "lora")
    with pytest.raises(DiffalignError, match="rank 4 but the config asks for rank 8"):
        load_lora(load_pipeline(str(sd_dir)), tmp_path / "lora", expect_rank=8)
    with pytest.raises(DiffalignError, match="does not fit this base model"):
        load_lora(load_pipeline(str(sdxl_dir)), tmp_path / "lora")
    with pytest.raises(DiffalignError, match="no LoRA weights at"):
        load_lora(pipe, tmp_path / "missing")


def test_loader_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffalignError, match="no pipeline directory at ./nope"):
        load_pipeline("./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffalignError, match="not a diffusers pipeline directory: expected model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(DiffalignError, match="could not load pipeline 'someone/not-here' from the Hugging Face Hub"):
        load_pipeline("someone/not-here")
    (tmp_path / "pixart").mkdir()  # a pipeline class diffalign does not support
    (tmp_path / "pixart" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(DiffalignError, match="holds a PixArtAlphaPipeline pipeline; diffalign supports"):
        load_pipeline(str(tmp_path / "pixart"))


def test_bad_options(sd_dir):
    with pytest.raises(DiffalignError, match="unknown dtype 'float8'"):
        load_pipeline(str(sd_dir), dtype="float8")
    with pytest.raises(DiffalignError, match="attention=xformers needs xformers"):
        load_pipeline(str(sd_dir), attention="xformers")
    with pytest.raises(DiffalignError, match="unknown attention backend"):
        load_pipeline(str(sd_dir), attention="flash")
    with pytest.raises(DiffalignError, match="lora.rank must be >= 1"):
        LoraSettings(rank=0)
    pipe = load_pipeline(str(sd_dir))
    with pytest.raises(DiffalignError, match="cannot add LoRA with target modules"):
        add_lora(pipe, LoraSettings(target_modules=["no_such_layer"]))
    with pytest.raises(DiffalignError, match="prompts must be a non-empty list"):
        encode_prompts(pipe, [])
