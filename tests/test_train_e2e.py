"""``diffalign train`` end to end on the tiny SD pipeline: every method, outputs, LoRA export, errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from train_fixtures import assert_lora_loads_in_diffusers, tiny_config, write_config

from diffalign.cli import main

METHODS = ["alignprop", "draft_k", "draft_lv", "refl", "ddpo"]


def train(tmp_path, cfg, *extra):
    path = write_config(tmp_path / "cfg.yaml", cfg)
    return main(["train", "--config", str(path), *extra])


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_exports(tmp_path, sd_dir, method, capsys):
    out = tmp_path / "run"
    extra = {"log": {"progress": False, "sample_every": 2}}
    if method == "alignprop":
        extra["log"]["trackers"] = ["tensorboard"]
    if method == "ddpo":  # per-prompt tracking with min_count 2 so it activates on repeated prompts
        extra["ddpo"] = {"train_batch_size": 1, "per_prompt_stat_tracking": True, "stat_min_count": 2}
        extra["prompts"] = {"train": ["a red circle", "two blue squares"], "eval": "shapes:heldout"}
    assert train(tmp_path, tiny_config(sd_dir, out, method, **extra)) == 0
    printed = capsys.readouterr().out
    assert f"finished 3 steps of {method}" in printed and str(out / "lora") in printed
    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"loss", "reward", "grad_norm", "lr", "samples", "updates", "time"} <= set(m)
        assert all(k in m for k in m if k.startswith("reward/")) and any(k.startswith("reward/") for k in m)
        assert set(m["time"]) == {"step_seconds", "elapsed"}
    evals = rows(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3]
    assert {"gold/accuracy", "gold/score", "diversity", "hacking", "reward"} <= set(evals[0])
    assert evals[0]["n_images"] == 4
    for name in ("eval_step_0.png", "eval_step_3.png", "step_2.png"):
        assert (out / "samples" / name).is_file()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["method"] == method
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3"]
    if method == "alignprop":
        assert any((out / "logs").rglob("events.out.tfevents*"))
    if method == "ddpo":
        assert metrics[-1]["updates"] == 6 and metrics[-1]["per_prompt_fraction"] == 1.0
        state = torch.load(out / "checkpoints/step_3/state.pt", weights_only=True)
        assert set(state["method"]["tracker"]["stats"]) == {"a red circle", "two blue squares"}

    # the exported LoRA loads with plain diffusers and holds exactly the trained weights
    trained = assert_lora_loads_in_diffusers(sd_dir, out, 3)
    assert any(trained[k].abs().sum() > 0 for k in trained if "lora_B" in k)  # it did train


def test_ddpo_ratio_is_one_at_theta_old(tmp_path, sd_dir):
    """Sanity check of spec §2.6: recomputed log-probs equal the sampling ones before any update."""
    out = tmp_path / "run"
    cfg = tiny_config(sd_dir, out, "ddpo", train={"lr": 1e-12}, ddpo={"train_batch_size": 2})
    assert train(tmp_path, cfg) == 0
    for m in rows(out / "metrics.jsonl"):
        assert m["clipfrac"] == 0.0 and m["approx_kl"] < 1e-10 and m["updates"] >= 1


def test_hacking_guardrail_flags_a_falling_heldout_reward(tmp_path, sd_dir, capsys):
    out = tmp_path / "run"
    held = "train_fixtures:Darkness"
    cfg = tiny_config(sd_dir, out, "draft_k", eval={"gold": "off", "rewards": [held], "hacking_threshold": 0.0})
    assert train(tmp_path, cfg) == 0
    evals = rows(out / "eval.jsonl")
    assert "gold/accuracy" not in evals[0] and evals[0]["hacking"] is False
    last = evals[-1]
    assert last["guard/metric"] == f"heldout/{held}" and last["reward"] > evals[0]["reward"]
    assert last["hacking"] is True and last["guard/drop"] > 0
    assert "warning: possible reward hacking at step 2" in capsys.readouterr().out


def test_degradation_guard_names_the_best_step_and_resumes(tmp_path, sd_dir, capsys):
    """A held-out reward falling below its best evaluation so far flags ``degraded`` (any drop with threshold 0),
    and the best so far survives a resume: the resumed run writes the same records."""
    out = tmp_path / "run"
    held = "train_fixtures:Darkness"
    ev = {"gold": "off", "rewards": [held], "degrade_threshold": 0.0, "every": 1}
    cfg = tiny_config(sd_dir, out, "draft_k", eval=ev, checkpoint={"every": 1, "keep": 3})
    assert train(tmp_path, cfg) == 0
    evals = rows(out / "eval.jsonl")
    assert evals[0]["degraded"] is False and "guard/best" not in evals[0]
    values = [e[f"heldout/{held}"] for e in evals]
    for i in range(1, len(evals)):
        best = max(range(i), key=lambda j: values[j])  # the first of equal bests
        assert evals[i]["guard/best_step"] == evals[best]["step"] and evals[i]["guard/best"] == values[best]
        assert evals[i]["degraded"] is (values[best] - values[i] > 0)
    flagged = [e["step"] for e in evals if e["degraded"]]
    assert flagged, values  # brightness up, darkness down
    assert f"warning: the policy is degrading at step {flagged[0]}" in capsys.readouterr().out
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--resume", str(out / "checkpoints" / "step_1")]) == 0
    untimed = [{k: v for k, v in e.items() if k != "time"} for e in evals]
    assert [{k: v for k, v in e.items() if k != "time"} for e in rows(out / "eval.jsonl")] == untimed


def test_nan_reward_stops_with_one_line_and_no_checkpoint(tmp_path, sd_dir, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(
        sd_dir, out, "draft_k", reward={"rewards": ["train_fixtures:NanAfter:calls=3"]}, checkpoint={"every": 1}
    )
    # call 1 is the step-0 evaluation, calls 2 and 3 the training steps 1 and 2
    assert train(tmp_path, cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: diffusers' loading bars
    assert err.startswith("diffalign train: error: ")
    assert "reward 'train_fixtures:NanAfter' returned NaN or inf at step 2" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    assert [m["step"] for m in rows(out / "metrics.jsonl")] == [1]
    assert not (out / "lora").exists()


def test_resume_errors(tmp_path, sd_dir, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(sd_dir, out, "draft_k", train={"steps": 2}, eval={"every": 0})
    assert train(tmp_path, cfg) == 0
    capsys.readouterr()
    # an output directory with checkpoints is not silently overwritten
    assert train(tmp_path, cfg) == 2
    assert "already holds checkpoints (latest: step 2); pass --resume latest" in capsys.readouterr().err
    # a LoRA of another rank cannot be resumed
    cfg["model"]["lora"] = {"rank": 4, "alpha": 4.0}
    assert train(tmp_path, cfg, "--resume", "latest") == 2
    err = capsys.readouterr().err
    assert "holds a LoRA of rank 2 but model.lora.rank is 4; resume with model.lora.rank=2" in err
    assert train(tmp_path, cfg, "--resume", str(tmp_path / "nowhere")) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_cli_user_errors(tmp_path, sd_dir, capsys):
    from diffalign.train import main as train_main

    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    cfg = write_config(tmp_path / "c.yaml", tiny_config(sd_dir, tmp_path / "run"))
    assert main(["train", "--config", str(cfg), "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'?" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "reward.rewards=[aesthetik]"]) == 2
    assert "unknown reward 'aesthetik'; did you mean 'aesthetic'?" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--config", str(cfg), f"prompts.train={empty}"]) == 2
    assert "is empty" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["draft_k", "ddpo"])
def test_cosine_schedule_reaches_zero_at_the_last_update(tmp_path, sd_dir, method):
    """train.lr_schedule=cosine: linear warmup, then 0.5 (1 + cos(pi p)) with p over all optimizer updates."""
    import math

    out = tmp_path / "run"
    cfg = tiny_config(sd_dir, out, method, train={"lr_schedule": "cosine", "warmup_steps": 1, "steps": 3})
    assert train(tmp_path, cfg) == 0
    metrics = rows(out / "metrics.jsonl")
    total = metrics[-1]["updates"]
    assert total == (3 if method == "draft_k" else 6)  # ddpo: 2 updates per step in the tiny config

    def expected(k: int) -> float:  # lr after k scheduler steps
        return 1e-2 * 0.5 * (1 + math.cos(math.pi * (k - 1) / (total - 1)))

    assert [m["lr"] for m in metrics] == pytest.approx([expected(m["updates"]) for m in metrics], abs=1e-12)
    assert metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_gradient_checkpointing_changes_no_number(tmp_path, sd_dir):
    """The shipped demo turns activation checkpointing off for speed: recomputing a UNet call in the backward
    gives the very same gradients, so metrics, evaluations and the exported LoRA are bit-identical."""
    from train_fixtures import assert_same_run

    runs = {}
    for ckpt in (True, False):
        out = tmp_path / f"ckpt-{ckpt}"
        cfg = tiny_config(
            sd_dir, out, model={"gradient_checkpointing": ckpt}, alignprop={"truncation": "uniform"}, eval={"every": 3}
        )
        (tmp_path / str(ckpt)).mkdir()
        assert train(tmp_path / str(ckpt), cfg) == 0
        runs[ckpt] = out
    assert_same_run(runs[True], runs[False], "gradient_checkpointing true vs false")
    assert rows(runs[False] / "metrics.jsonl")[0]["grad_norm"] > 0


def test_keep_best_keeps_the_best_evaluations_checkpoint(tmp_path, sd_dir, capsys):
    """The best evaluation (a held-out reward peaking at step 1) keeps its checkpoint past ``checkpoint.keep``,
    and the degradation warning points at it."""
    out = tmp_path / "run"
    ev = {"gold": "off", "rewards": ["train_fixtures:PeakAt:call=2"], "every": 1}
    cfg = tiny_config(sd_dir, out, "draft_k", eval=ev, checkpoint={"every": 1, "keep": 1})
    assert train(tmp_path, cfg) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_3"]
    assert (out / "checkpoints" / "step_1" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert [e["degraded"] for e in rows(out / "eval.jsonl")] == [False, False, True, True]
    printed = capsys.readouterr().out
    assert f"is the better one ({out / 'checkpoints' / 'step_1'}/lora)" in printed
    assert f"at step 1; that step's LoRA is the better one ({out / 'checkpoints' / 'step_1'}/lora)" in printed
    off = tmp_path / "off"
    cfg = tiny_config(sd_dir, off, "draft_k", eval=ev, checkpoint={"every": 1, "keep": 1, "keep_best": False})
    assert train(tmp_path, cfg) == 0
    assert sorted(p.name for p in (off / "checkpoints").iterdir()) == ["step_3"]


def test_frozen_heap_exempts_live_objects_and_gives_them_back():
    import gc

    from diffalign.trainer import frozen_heap

    before = gc.get_freeze_count()
    kept = [[] for _ in range(100)]  # container objects, tracked by the collector
    with frozen_heap() as refreeze:
        assert gc.get_freeze_count() >= before + 100
        assert not any(obj is kept for obj in gc.get_objects())  # frozen objects are in no generation
        made = [[] for _ in range(50)]
        refreeze()
        assert not any(obj is made for obj in gc.get_objects())
    assert gc.get_freeze_count() == 0
    assert any(obj is kept for obj in gc.get_objects())
