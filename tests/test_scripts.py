"""The helper scripts under scripts/ that work on run directories."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import before_after  # noqa: E402
import gold_by_kind  # noqa: E402
import summarize_runs  # noqa: E402


def test_before_after_puts_the_first_rows_of_step_0_and_the_last_step_side_by_side(tmp_path):
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("eval:\n  seeds: [0, 1, 2]\ntrain:\n  method: draft_k\n")
    for step, color in [(0, "red"), (25, "blue"), (100, "green")]:  # 3 columns, 8 rows of 10 px tiles
        Image.new("RGB", (30, 80), color).save(samples / f"eval_step_{step}.png")
    out = tmp_path / "fig" / "ba.png"
    assert before_after.main([str(tmp_path / "run"), "--rows", "2", "--out", str(out)]) == 0
    fig = Image.open(out).convert("RGB")
    assert fig.size == (30 + before_after.GAP + 30, before_after.CAPTION + 20)
    assert fig.getpixel((5, before_after.CAPTION + 10)) == (255, 0, 0)  # step 0 on the left
    assert fig.getpixel((30 + before_after.GAP + 5, before_after.CAPTION + 10)) == (0, 128, 0)  # step 100


def test_before_after_without_evaluation_grids_is_one_line(tmp_path):
    (tmp_path / "samples").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "samples" / "eval_step_0.png")
    with pytest.raises(SystemExit, match="no eval_step_0.png and later evaluation grid"):
        before_after.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    Image.new("RGB", (4, 4)).save(tmp_path / "samples" / "eval_step_5.png")
    with pytest.raises(SystemExit, match="cannot read eval.seeds and train.method from .*config.yaml"):
        before_after.main([str(tmp_path), "--out", str(tmp_path / "x.png")])


def test_before_after_labels_the_run_by_its_method(tmp_path, monkeypatch):
    """The right half's caption names the run's train.method, not a fixed "AlignProp"."""
    captions = []
    monkeypatch.setattr(before_after.ImageDraw.ImageDraw, "text", lambda self, xy, text, **kw: captions.append(text))
    samples = tmp_path / "samples"
    samples.mkdir()
    (tmp_path / "config.yaml").write_text("eval:\n  seeds: [0]\ntrain:\n  method: ddpo\n")
    for step in (0, 10):
        Image.new("RGB", (10, 10)).save(samples / f"eval_step_{step}.png")
    before_after.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert captions == ["base (step 0)", "ddpo LoRA (step 10)"]


def _fake_run(path, evals, method="ddpo"):
    import json

    path.mkdir()
    (path / "config.yaml").write_text(f"train:\n  method: {method}\n")
    (path / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    metrics = [{"step": e["step"], "time": {"elapsed": 60.0 * e["step"]}} for e in evals]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_summarize_runs_with_and_without_gold(tmp_path, capsys):
    gold = {"gold/count_acc": 0.5, "gold/color_acc": 0.5, "gold/shape_acc": 0.5, "diversity": 0.1}
    _fake_run(
        tmp_path / "shapes",
        [
            {"step": 0, "reward": 0.7, "gold/accuracy": 0.28, **gold},
            {"step": 2, "reward": 0.8, "gold/accuracy": 0.4, **gold},
        ],
    )
    _fake_run(tmp_path / "sd15", [{"step": 0, "reward": 5.0}, {"step": 1, "reward": 6.0}, {"step": 2, "reward": 5.5}])
    summarize_runs.main([str(tmp_path / "shapes"), str(tmp_path / "sd15"), "--curve"])
    out = capsys.readouterr().out
    assert "| shapes | ddpo | 2 | 2.0 | 0.280 | 0.400 (2) | 0.400 | 0.700 -> 0.800 |" in out
    assert "| sd15 | ddpo | 2 | 2.0 | n/a | n/a (best reward at step 1) | n/a | 5.000 -> 5.500 |" in out
    assert "| sd15 | 1 | 1.0 | n/a | n/a / n/a / n/a | 6.000 | n/a |" in out


def test_gold_by_kind_counts_each_scene_kind_by_hand():
    from types import SimpleNamespace as V

    assert [
        gold_by_kind.scene_kind(p) for p in ["a red circle", "two blue squares", "a red circle and a blue square"]
    ] == [
        "single",
        "two",
        "pair",
    ]
    ok, bad = (
        V(correct=True, count_ok=True, color_ok=True, shape_ok=True),
        V(correct=False, count_ok=True, color_ok=False, shape_ok=False),
    )
    s = gold_by_kind.summarize(["a red circle", "a red circle", "a red circle and a blue square"], [ok, bad, bad])
    assert s["all"] == {"n": 3, "accuracy": 1 / 3, "count": 1.0, "color": 1 / 3, "shape": 1 / 3}
    assert s["single"]["accuracy"] == 0.5 and s["pair"] == {
        "n": 1,
        "accuracy": 0.0,
        "count": 1.0,
        "color": 0.0,
        "shape": 0.0,
    }
    assert "two" not in s


def test_gold_by_kind_measures_base_and_a_lora_on_a_tiny_pipeline(sd_dir, tmp_path, capsys):
    import json

    import torch
    from train_fixtures import tiny_config, write_config

    from diffalign.pipelines import LoraSettings, add_lora, load_pipeline, save_lora
    from diffalign.shapes import split_prompts

    pipe = load_pipeline(str(sd_dir))
    with torch.no_grad():
        for p in add_lora(pipe, LoraSettings(rank=2, alpha=2.0)):
            p.normal_(std=0.5)
    save_lora(pipe, tmp_path / "run" / "lora")
    write_config(tmp_path / "run" / "config.yaml", tiny_config(sd_dir, tmp_path / "run"))  # a run directory
    out = tmp_path / "gold.json"
    args = ["--model", str(sd_dir), "--lora", str(tmp_path / "run"), "--every", "40", "--seeds", "2", "--steps", "2"]
    assert gold_by_kind.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert list(rows) == ["base", str(tmp_path / "run")]
    for split in ("train", "heldout"):
        n = 2 * len(split_prompts(split)[::40])
        assert rows["base"][split]["all"]["n"] == n == rows[str(tmp_path / "run")][split]["all"]["n"]
    assert "| base | heldout |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--lora .*missing: no such file"):
        gold_by_kind.main([*args, "--no-base", "--lora", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--batch-size must be >= 1"):
        gold_by_kind.main([*args, "--batch-size", "0"])
