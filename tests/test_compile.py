"""``model.compile``: a compiled denoising network trains like the eager one and saves a LoRA plain diffusers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import assert_lora_loads_in_diffusers, records, tiny_config, write_config

from diffalign.cli import main


def _run(tmp_path: Path, sd_dir: Path, name: str, method: str, **model: object) -> Path:
    out = tmp_path / name
    sections: dict = {
        "model": model,
        "sample": {"batch_size": 4},
    }  # the evaluation's batch too: one batch shape, fewer graphs to capture
    if method == "grpo":  # a KL to the reference: the LoRA-disabled pass switches the compiled module's adapters
        sections |= {"grpo": {"group_size": 2, "beta": 0.1, "train_batch_size": 2}, "sample": {"batch_size": 1}}
        sections["reward"] = {"rewards": ["jpeg_compressibility"]}
    cfg = tiny_config(sd_dir, out, method, **sections)
    assert main(["train", "--config", str(write_config(tmp_path / f"{name}.yaml", cfg))]) == 0
    return out


def _close(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x[k], y[k])


@pytest.mark.parametrize("method", ["alignprop", "grpo"])
def test_compiled_backbone_trains_as_eager_and_saves_a_loadable_lora(tmp_path, sd_dir, method):
    eager = _run(tmp_path, sd_dir, "eager", method)
    # aot_eager: dynamo's graph capture and AOTAutograd's forward/backward split, without generated kernels
    compiled = _run(tmp_path, sd_dir, "compiled", method, compile=True, compile_backend="aot_eager")
    _close(records(eager / "metrics.jsonl"), records(compiled / "metrics.jsonl"), ("loss", "reward"))
    _close(records(eager / "eval.jsonl"), records(compiled / "eval.jsonl"), ("reward",))
    trained = assert_lora_loads_in_diffusers(sd_dir, compiled, 3)
    assert not any("_orig_mod" in k for k in trained)  # compiled in place: the keys of the eager module
    reference = load_file(eager / "checkpoints/step_3/lora.safetensors")
    assert set(trained) == set(reference)
    assert all(torch.allclose(trained[k], reference[k], rtol=1e-3, atol=1e-6) for k in trained)


def test_bad_compile_mode_is_one_line(tmp_path, sd_dir, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(sd_dir, tmp_path / "run"))
    assert main(["train", "--config", str(cfg), "model.compile_mode=fastest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.compile_mode" in err[0], err
