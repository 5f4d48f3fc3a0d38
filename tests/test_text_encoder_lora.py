"""Every method trains a text-encoder LoRA too (``model.lora.text_encoder``). The policy-gradient methods
backpropagate once per trained denoising step: each backward gets its own prompt encoding
(``backward_denoisers``), where a shared one failed with "Trying to backward through the graph a second time"."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny_config, write_config

from diffalign.cli import main

SECTIONS = {
    "ddpo": {"ddpo": {"train_batch_size": 2, "timestep_fraction": 1.0, "per_prompt_stat_tracking": False}},
    "grpo": {"grpo": {"group_size": 2, "train_batch_size": 2, "timestep_fraction": 1.0}},
    "d3po": {"d3po": {"train_batch_size": 1, "timestep_fraction": 1.0}},
    "prdp": {"prdp": {"group_size": 2, "beta": 0.01, "clip_range": 0.5, "train_batch_size": 2}},
    "alignprop": {},
    "draft_k": {},
    "draft_lv": {},
    "refl": {},
}


def _moved(tmp_path, sd_dir, method: str, steps: int, make: Callable[..., dict]) -> set[str]:
    """Train ``steps`` steps of ``method`` (config ``make(out, **sections)``) with a text-encoder LoRA; the
    models whose LoRA B moved off 0."""
    out = tmp_path / "run"
    cfg = make(
        out,
        model={"pretrained": str(sd_dir), "device": "cpu", "lora": {"rank": 2, "alpha": 2.0, "text_encoder": True}},
        train={"method": method, "steps": steps, "lr": 1e-2, "seed": 0},
        eval={"every": 0, "num_prompts": 1, "seeds": [0]},
    )
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in lora.values())
    assert any(k.startswith("text_encoder.") and "lora_B" in k for k in lora), sorted(lora)[:5]
    return {k.split(".")[0] for k, v in lora.items() if "lora_B" in k and bool(v.abs().sum() > 0)}


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_methods_train_a_text_encoder_lora(tmp_path, sd_dir, method):
    def make(out, **kw):
        return tiny_config(sd_dir, out, method, **SECTIONS[method], **kw)

    assert "text_encoder" in _moved(tmp_path, sd_dir, method, 1, make)  # B starts at 0: it was updated


def test_adv_grpo_trains_a_text_encoder_lora(tmp_path, sd_dir):
    from test_adv_grpo import adv_config

    def make(out, **kw):
        return adv_config(tmp_path, sd_dir, out, **kw)

    # step 1's rewards come from an untrained discriminator (no spread in a group): step 2 updates
    assert _moved(tmp_path, sd_dir, "adv_grpo", 2, make) == {"unet", "text_encoder"}
