"""FSDP2 sharding of the frozen base (``train.fsdp``, diffalign/fsdp.py).

Two gloo processes on CPU (``accelerate launch --multi_gpu --num_processes 2``) train Flow-GRPO on the tiny
SD3 pipeline with the transformer sharded: each process holds half of every frozen weight, the LoRA saved
equals the one of the same run without FSDP (DDP-style), it loads in plain diffusers and changes its images,
and a resumed run ends exactly where the uninterrupted one did. The rest (settings, wrapping policy, ignored
LoRA, refusals) is checked in one process.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import assert_same_run, launch_two_processes, records, tiny_config, write_config

from diffalign.errors import DiffalignError
from diffalign.fsdp import FSDPSettings, default_blocks, fsdp_unavailable_reason, make_plugin
from diffalign.pipelines import LoraSettings, add_lora, backbone, load_pipeline, lora_parameters
from diffalign.trainer import check_distributed_type, check_fsdp_launch

LORA = "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------------------------ one process
def test_fsdp_settings_refuse_fsdp1_and_bad_block_lists():
    with pytest.raises(DiffalignError, match="FSDP1 is not supported"):
        FSDPSettings(version=1)
    with pytest.raises(DiffalignError, match="non-empty list"):
        FSDPSettings(blocks=[])


def test_fsdp2_is_available_with_the_installed_torch_and_accelerate():
    assert fsdp_unavailable_reason() is None


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_wrapping_policy_shards_blocks_and_ignores_exactly_the_lora(family, sd3_dir, sd_dir):
    pipe = load_pipeline(str(sd3_dir if family == "sd3" else sd_dir))
    add_lora(pipe, LoraSettings(rank=2, alpha=2.0))
    model = backbone(pipe)
    blocks = default_blocks(model)
    if family == "sd3":
        assert blocks == ["JointTransformerBlock"]
    else:
        assert blocks == [
            "CrossAttnDownBlock2D",
            "CrossAttnUpBlock2D",
            "DownBlock2D",
            "UNetMidBlock2DCrossAttn",
            "UpBlock2D",
        ]
    plugin = make_plugin(FSDPSettings(enabled=True), model)
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == blocks
    assert plugin.reshard_after_forward is True
    ignored = {id(p) for m in plugin.ignored_modules for p in m.parameters()}
    assert ignored == {id(p) for p in lora_parameters(pipe)}  # the LoRA stays replicated, nothing else
    assert all(not p.requires_grad for n, p in model.named_parameters() if id(p) not in ignored)
    with pytest.raises(DiffalignError, match="does not contain"):
        make_plugin(FSDPSettings(enabled=True, blocks=["NoSuchBlock"]), model)


def test_fsdp_launch_refusals_are_one_line():
    for call, match in [
        (lambda: check_fsdp_launch(1), "this is one process"),
        (lambda: check_fsdp_launch(2, 3), "divisible by the 2 processes"),
        (lambda: check_distributed_type("FSDP"), "--use_fsdp is not how diffalign shards"),
        (lambda: check_distributed_type("DEEPSPEED"), "not DEEPSPEED"),
    ]:
        with pytest.raises(DiffalignError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
    check_fsdp_launch(2, 4)
    check_distributed_type("MULTI_CPU")


def test_fsdp_in_one_process_is_refused_before_the_model_loads(tmp_path, sd3_dir, capsys):
    from diffalign.cli import main

    cfg = _config(sd3_dir, tmp_path / "run", fsdp=True)
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this is one process" in err[0]


# ---------------------------------------------------------------------------------- two processes
def _config(sd3_dir, out, fsdp: bool) -> dict:
    return tiny_config(
        sd3_dir,
        out,
        "grpo",
        model={"lora": {"rank": 2, "alpha": 2.0, "init": "gaussian"}},
        sample={"steps": 3, "eta": 0.7, "guidance_scale": 4.5, "batch_size": 2},
        train={"steps": 2, "fsdp": {"enabled": fsdp}},
        grpo={"group_size": 2, "train_batch_size": 2, "beta": 0.05, "timestep_fraction": 0.7},
        eval={"every": 0, "num_prompts": 2, "seeds": [0], "eta": 0.0},
        checkpoint={"every": 1, "keep": 2},
    )


def _launch(cfg_path, *extra):
    proc = launch_two_processes(cfg_path, *extra, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_fsdp_two_processes_shard_the_base_match_ddp_and_resume_exactly(tmp_path, sd3_dir):
    pytest.importorskip("accelerate")
    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    _launch(write_config(tmp_path / "ddp.yaml", _config(sd3_dir, ddp, fsdp=False)))
    fsdp_cfg = write_config(tmp_path / "fsdp.yaml", _config(sd3_dir, fsdp, fsdp=True))
    proc = _launch(fsdp_cfg)
    assert proc.stdout.count("finished 2 steps of grpo") == 1 and "FSDP2 sharded the frozen transformer" in proc.stdout

    # each process holds half of every frozen weight; the LoRA is replicated
    info = json.loads((fsdp / "run_info.jsonl").read_text().splitlines()[0])["fsdp"]
    print("fsdp shards:", info)
    assert sorted(r["rank"] for r in info) == [0, 1]
    full = info[0]["sharded_numel"]
    # two joint blocks, norm_out (accelerate carves the final norm into its own unit) and the root (the rest)
    assert info[0]["units"] == 4
    assert all(r["sharded_numel"] == full and 0.45 * full <= r["local_numel"] <= 0.55 * full for r in info)
    assert sum(r["local_numel"] for r in info) >= full  # a dimension of odd size is padded
    assert info[0]["replicated_numel"] == sum(t.numel() for t in load_file(ddp / "lora" / LORA).values())

    # the same LoRA as the DDP-style run of the same seeds
    a, b = load_file(ddp / "lora" / LORA), load_file(fsdp / "lora" / LORA)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"fsdp vs ddp LoRA max abs diff: {diff:.2e}")
    assert diff <= 1e-5
    for x, y in zip(records(ddp / "metrics.jsonl"), records(fsdp / "metrics.jsonl"), strict=True):
        assert x["step"] == y["step"] and x["reward"] == pytest.approx(y["reward"], abs=1e-5)

    # resume from checkpoint 1 (two new processes, sharded again) ends exactly where the uninterrupted run did
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "lora")
    cfg = _config(sd3_dir, resumed, fsdp=True)
    proc = _launch(write_config(tmp_path / "resumed.yaml", cfg), "--resume", str(resumed / "checkpoints" / "step_1"))
    assert "resuming from" in proc.stdout
    assert_same_run(fsdp, resumed)

    # the saved LoRA loads in plain diffusers and changes its images
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(sd3_dir), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        gen = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, generator=gen, output_type="pt").images

    before = draw()
    pipe.load_lora_weights(str(fsdp / "lora"))
    after = draw()
    print(f"LoRA changes the image by {float((after - before).abs().max()):.3e}")
    assert not torch.equal(before, after)


def test_fsdp_alignprop_on_the_unet_matches_ddp(tmp_path, sd_dir):
    """Reward backprop through every sampling step on the tiny SD UNet sharded per down / mid / up block: many
    checkpointed calls of the sharded UNet per backward, LoRA on the text encoder too (not sharded)."""
    pytest.importorskip("accelerate")
    runs = {}
    for name, fsdp in [("ddp", False), ("fsdp", True)]:
        out = tmp_path / name
        cfg = tiny_config(
            sd_dir,
            out,
            "alignprop",
            model={"lora": {"rank": 2, "alpha": 2.0, "text_encoder": True}, "gradient_checkpointing": True},
            alignprop={"truncation": "fixed", "k": 2},
            train={"steps": 2, "fsdp": {"enabled": fsdp}},
            eval={"every": 0, "num_prompts": 2, "seeds": [0]},
            checkpoint={"every": 0},
        )
        proc = _launch(write_config(tmp_path / f"{name}.yaml", cfg))
        assert proc.stdout.count("finished 2 steps of alignprop") == 1
        runs[name] = out
    info = json.loads((runs["fsdp"] / "run_info.jsonl").read_text().splitlines()[0])["fsdp"]
    print("fsdp shards (unet):", info)
    assert all(0.45 * r["sharded_numel"] <= r["local_numel"] <= 0.55 * r["sharded_numel"] for r in info)
    assert info[0]["units"] == 7  # two down, one mid, two up blocks, conv_norm_out (the final norm) and the root
    a, b = load_file(runs["ddp"] / "lora" / LORA), load_file(runs["fsdp"] / "lora" / LORA)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"fsdp vs ddp alignprop LoRA max abs diff: {diff:.2e}")
    assert diff <= 1e-5 and any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)
