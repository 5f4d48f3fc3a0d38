"""The shipped shapes assets load through the public paths, run, and give useful gradients."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffalign.errors import DiffalignError

ROOT = Path(__file__).resolve().parent.parent
SD = ROOT / "assets" / "shapes-sd"
CLIP = ROOT / "assets" / "shapes-clip"


def test_pipeline_loads_with_plain_diffusers_and_samples():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(SD))  # nothing else needed
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        ["a red circle", "two blue squares"],
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    assert out.images.shape == (2, 3, 64, 64)
    assert torch.isfinite(out.images).all()
    assert len(pipe.tokenizer("a yellow triangle").input_ids) == 5  # bos, yellow, triangle... real CLIP BPE
    info = json.loads((SD / "shapes_info.json").read_text())
    assert info["world_version"] == 1


def test_assets_fit_the_budget():
    """<= 40 MB stored: a symlink (the flow pipeline's VAE weights -> the SD pipeline's) is stored once."""
    files = [f for f in (ROOT / "assets").rglob("*") if f.is_file()]
    total = sum(f.lstat().st_size for f in files if not f.is_symlink())
    assert total <= 40 * 2**20
    for link in (f for f in files if f.is_symlink()):  # relative, inside assets/, so a clone keeps them working
        assert not Path(link.readlink()).is_absolute() and link.resolve().is_relative_to((ROOT / "assets").resolve())


def test_shapes_flow_pipeline_loads_and_samples():
    """assets/shapes-flow: the SD3-style flow model, its VAE weights a link to assets/shapes-sd's; plain diffusers
    and diffalign load it (CLIP prompts only, max_sequence_length 0) and sample finite 64 px images."""
    from diffusers import StableDiffusion3Pipeline

    from diffalign.pipelines import draw_images, family_of, load_pipeline

    flow = ROOT / "assets" / "shapes-flow"
    assert (flow / "vae" / "diffusion_pytorch_model.safetensors").is_symlink()
    plain = StableDiffusion3Pipeline.from_pretrained(
        str(flow), text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    assert plain.vae.config.shift_factor is not None
    pipe = load_pipeline(str(flow))
    assert family_of(pipe) == "sd3"
    images = draw_images(pipe, ["a red circle", "two blue squares"], [0, 1], steps=4, guidance=5.0, eta=0.0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert json.loads((flow / "shapes_info.json").read_text())["world_version"] == 1


def test_ensemble_members_load_differ_and_fit_their_budget():
    """assets/shapes-ensemble: 4 small CLIPs (<= 10 MB together), each loadable by the shapes_clip path
    (one spec with alternatives), each preferring the right caption, and not all the same model."""
    from diffalign.shapes import parse_caption
    from diffalign.shapes.data import render_batch
    from reward_models import get_reward
    from reward_models.registry import expand_members

    ens = ROOT / "assets" / "shapes-ensemble"
    members = sorted(p for p in ens.iterdir() if p.is_dir())
    assert [p.name for p in members] == ["m1", "m2", "m3", "m4"]
    assert sum(f.stat().st_size for f in ens.rglob("*") if f.is_file()) <= 10 * 2**20
    specs = expand_members(["shapes_clip:model=" + "|".join(f"local-dir:{p}" for p in members)])
    captions = ["two red circles", "a blue square", "a green triangle and a yellow circle"]
    images = render_batch([parse_caption(c) for c in captions], seed=0)
    scores = []
    for spec in specs:
        reward = get_reward(spec)
        right = reward(images, captions)
        assert (right > reward(images, captions[1:] + captions[:1])).all(), spec
        scores.append(right)
    assert len({tuple(round(float(v), 4) for v in s) for s in scores}) == len(members)


def test_proxy_clip_prefers_the_right_caption_and_has_gradients():
    from diffalign.shapes import parse_caption
    from diffalign.shapes.data import render_batch
    from reward_models import get_reward

    reward = get_reward(f"shapes_clip:model=local-dir:{CLIP}")
    images = render_batch([parse_caption("two red circles"), parse_caption("a blue square")], seed=0).requires_grad_(
        True
    )
    right = reward(images, ["two red circles", "a blue square"])
    wrong = reward(images, ["a blue square", "two red circles"])
    assert (right > wrong).all()
    right.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_unreadable_assets_give_clear_errors(tmp_path):
    from diffalign.pipelines import load_pipeline
    from reward_models import get_reward

    broken = tmp_path / "shapes-sd"
    shutil.copytree(SD, broken)
    (broken / "model_index.json").unlink()
    with pytest.raises(DiffalignError, match="not a diffusers pipeline directory"):
        load_pipeline(str(broken))
    with pytest.raises(DiffalignError, match="does not exist; expected a directory with open_clip_config.json"):
        get_reward(f"shapes_clip:model=local-dir:{tmp_path / 'missing'}")
    corrupt = tmp_path / "shapes-clip"
    shutil.copytree(CLIP, corrupt)
    (corrupt / "open_clip_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DiffalignError, match="shapes-clip"):
        get_reward(f"shapes_clip:model=local-dir:{corrupt}")
