"""The EMA of the LoRA (``train.ema_decay``, diffalign/ema.py): its update by hand, the swap for evaluation,
its state, and a run that evaluates and saves the average and resumes it bit for bit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import records, tiny_config, write_config

from diffalign.cli import main
from diffalign.ema import ParamEMA, ema_decay


def test_decay_ramps_up_to_its_ceiling():
    assert ema_decay(0.9, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(0.9, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9, 70) == pytest.approx(71 / 80)  # still ramping
    assert ema_decay(0.9, 100) == 0.9  # 101 / 110 > 0.9: the ceiling
    assert ema_decay(0.5, 100) == 0.5


def test_update_by_hand_and_every_k():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = ParamEMA([p], decay=0.9, every=2)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 4.0]))
    ema.update()  # call 1 of every 2: nothing
    assert torch.equal(ema.shadow[0], torch.tensor([1.0, 2.0])) and ema.n == 0
    ema.update()  # update 2: d = 3 / 12 = 0.25: 0.25 * [1, 2] + 0.75 * [3, 4]
    assert torch.allclose(ema.shadow[0], torch.tensor([2.5, 3.5])) and ema.n == 1
    with torch.no_grad():
        p.copy_(torch.tensor([0.0, 0.0]))
    ema.update()
    ema.update()  # update 4: d = 5 / 14
    assert torch.allclose(ema.shadow[0], torch.tensor([2.5, 3.5]) * 5 / 14)


def test_applied_swaps_in_the_average_and_restores_exactly():
    p = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))
    ema = ParamEMA([p], decay=0.5)
    with torch.no_grad():
        p.add_(1.0)
    ema.update()
    own = p.detach().clone()
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), own)
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("evaluation failed")
    assert torch.equal(p.detach(), own) and p.requires_grad


def test_state_round_trip_and_mismatch():
    a = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    ema = ParamEMA(a, decay=0.9)
    ema.update()
    other = ParamEMA([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.n == 1 and all(torch.equal(x, y) for x, y in zip(other.shadow, ema.shadow, strict=True))
    with pytest.raises(ValueError, match="does not match"):
        ParamEMA(a[:1], decay=0.9).load_state_dict(ema.state_dict())


def _cfg(tmp_path: Path, sd_dir: Path, out: Path, decay: float) -> str:
    cfg = tiny_config(
        sd_dir,
        out,
        "alignprop",
        train={"steps": 4, "lr": 5e-2, "ema_decay": decay},
        eval={"every": 2, "num_prompts": 2, "seeds": [0]},
        checkpoint={"every": 1, "keep": 4},
    )
    return str(write_config(tmp_path / f"{out.name}.yaml", cfg))


def test_run_evaluates_and_saves_the_average_and_resumes_exactly(tmp_path, sd_dir):
    plain, averaged = tmp_path / "plain", tmp_path / "ema"
    assert main(["train", "--config", _cfg(tmp_path, sd_dir, plain, 0.0)]) == 0
    cfg = _cfg(tmp_path, sd_dir, averaged, 0.5)
    assert main(["train", "--config", cfg]) == 0
    # training itself is untouched by the EMA: the same losses and rewards step by step
    assert records(plain / "metrics.jsonl") == records(averaged / "metrics.jsonl")
    ev_plain, ev_ema = records(plain / "eval.jsonl"), records(averaged / "eval.jsonl")
    assert ev_plain[0] == ev_ema[0]  # step 0: the average is the initial LoRA
    assert ev_plain[-1]["reward"] != ev_ema[-1]["reward"]  # later evaluations score the average
    # the final adapter is the average, by hand from the live LoRA of each checkpoint (decays 2/11, 3/12, 4/13, 5/14);
    # the diffusers file names the tensors its own way, so each is matched by value
    live = [load_file(averaged / "checkpoints" / f"step_{s}" / "lora.safetensors") for s in range(1, 5)]
    by_hand = {k: torch.zeros_like(v) for k, v in live[0].items() if "lora_B" in k}  # B starts at 0
    for n, w in enumerate(live):
        d = min(0.5, (2 + n) / (11 + n))
        by_hand = {k: d * v + (1 - d) * w[k] for k, v in by_hand.items()}
    final = load_file(averaged / "lora" / "pytorch_lora_weights.safetensors")
    for k, v in by_hand.items():
        assert any(f.shape == v.shape and torch.allclose(f, v, atol=1e-7) for f in final.values()), k
        assert not any(f.shape == v.shape and torch.equal(f, live[-1][k]) for f in final.values()), k
    # resumed from step 2: the same evaluations, metrics and adapter, bit for bit
    first_eval, first_final = ev_ema, final
    assert main(["train", "--config", cfg, "--resume", str(averaged / "checkpoints" / "step_2")]) == 0
    assert records(averaged / "eval.jsonl") == first_eval
    again = load_file(averaged / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(again[k], first_final[k]) for k in first_final)


def test_bad_ema_settings_and_resume_without_ema(tmp_path, sd_dir, capsys):
    out = tmp_path / "bad"
    assert main(["train", "--config", _cfg(tmp_path, sd_dir, out, 0.0), "train.ema_decay=1.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.ema_decay must be in [0, 1)" in err[0]
    assert math.isfinite(ema_decay(0.0, 3))
    assert main(["train", "--config", _cfg(tmp_path, sd_dir, out, 0.0), "train.steps=1"]) == 0
    code = main(["train", "--config", _cfg(tmp_path, sd_dir, out, 0.5), "--resume", "latest"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "holds no EMA of the LoRA" in err[-1], err
