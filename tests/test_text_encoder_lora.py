"""Every method trains a text-encoder LoRA too (``model.lora.text_encoder``). The policy-gradient methods
backpropagate once per trained denoising step: each backward gets its own prompt encoding
(``backward_denoisers``), where a shared one failed with "Trying to backward through the graph a second time"."""

from __future__ import annotations

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


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_policy_methods_train_a_text_encoder_lora(tmp_path, sd_dir, method):
    out = tmp_path / "run"
    cfg = tiny_config(
        sd_dir,
        out,
        method,
        model={"pretrained": str(sd_dir), "device": "cpu", "lora": {"rank": 2, "alpha": 2.0, "text_encoder": True}},
        train={"method": method, "steps": 1, "lr": 1e-2, "seed": 0},
        eval={"every": 0, "num_prompts": 1, "seeds": [0]},
        **SECTIONS[method],
    )
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    text = {k: v for k, v in lora.items() if k.startswith("text_encoder.") and "lora_B" in k}
    assert text, sorted(lora)[:5]
    assert any(bool(v.abs().sum() > 0) for v in text.values())  # B starts at 0: the text encoder was updated
    assert all(bool(torch.isfinite(v).all()) for v in lora.values())


def test_adv_grpo_trains_a_text_encoder_lora(tmp_path, sd_dir):
    from test_adv_grpo import adv_config

    out = tmp_path / "run"
    cfg = adv_config(
        tmp_path,
        sd_dir,
        out,
        model={"pretrained": str(sd_dir), "device": "cpu", "lora": {"rank": 2, "alpha": 2.0, "text_encoder": True}},
        train={"method": "adv_grpo", "steps": 2, "lr": 1e-2, "seed": 0},
        eval={"every": 0, "num_prompts": 1, "seeds": [0]},
    )
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    moved = {k.split(".")[0] for k, v in lora.items() if "lora_B" in k and bool(v.abs().sum() > 0)}
    assert moved == {"unet", "text_encoder"}, moved
