"""Smoke test of benchmarks/bench_trl.py (diffalign vs TRL 0.11.4): the harness runs, not how fast.

The diffalign side always runs (one update per method, tiny pipeline, 2 sampling steps); the TRL side needs
TRL's own venv (``make venv-trl``) and skips without it. No figure is asserted: benchmarks are scripts
with a results page (docs/benchmarks.md), never timed tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_trl  # noqa: E402

SMALL = ["--model", "tiny", "--updates", "1", "--steps", "2", "--batch", "2", "--num-batches", "1"]
SMALL += ["--train-batch", "2", "--threads", "1"]


def test_brightness_plugin_scores_mean_and_is_differentiable():
    import torch

    from reward_models.registry import RewardSpec, get_reward

    reward = get_reward(RewardSpec.parse(bench_trl.REWARD_PLUGIN))
    images = torch.full((2, 3, 4, 4), 0.25, requires_grad=True)
    score = reward(images, ["a red circle", "a blue square"])
    assert torch.allclose(score, torch.tensor([0.25, 0.25]))
    score.sum().backward()
    assert torch.allclose(images.grad, torch.full_like(images, 1 / 48))


def test_diffalign_side_runs_and_reports(tmp_path):
    out = tmp_path / "bench"
    args = [*SMALL, "--sides", "diffalign", "--out", str(out), "--repeats", "1", "--memory-steps", "2", "3"]
    report = bench_trl.main(args)
    saved = json.loads((out / "bench_trl.json").read_text())
    assert saved["methods"].keys() == {"alignprop", "ddpo"}
    for method in ("alignprop", "ddpo"):
        r = saved["methods"][method]["diffalign"]
        assert len(r["all_seconds"]) == 1 and r["timed"] == 1 and r["seconds"] > 0
        assert r["peak_rss_mb"] > 50
        assert "trl" not in saved["methods"][method] and "time_ratio" not in saved["methods"][method]
        metrics = (out / f"diffalign-{method}" / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 1
    cfg = (out / "diffalign-alignprop.yaml").read_text()
    assert "truncation: none" in cfg and bench_trl.REWARD_PLUGIN in cfg
    s = saved["sampler"]
    assert s["ours_seconds"] > 0 and s["pipeline_seconds"] > 0 and s["ratio"] > 0
    assert s["max_abs_pixel_diff"] < 1e-3  # the same images
    m = saved["sampling_memory"]
    assert m["pair"] == [3, 2] and set(m["by_steps"]) == {"2", "3"} and m["ratio"] > 0
    assert saved["unet_params"] > 0 and saved["versions"]["diffalign_venv"]["torch"]
    md = (out / "bench_trl.md").read_text()
    assert "| setting | TRL 0.11.4 | diffalign |" in md and "no-grad sampling" in md
    assert report["methods"]["ddpo"]["diffalign"]["seconds"] == saved["methods"]["ddpo"]["diffalign"]["seconds"]


def test_trl_side_runs_when_its_venv_exists(tmp_path):
    trl_python = bench_trl.default_trl_python()
    if not trl_python.is_file():
        pytest.skip(f"no TRL venv at {trl_python} (make venv-trl, or set DIFFALIGN_TRL_PYTHON)")
    out = tmp_path / "bench"
    bench_trl.main([*SMALL, "--sides", "both", "--out", str(out), "--no-extras", "--trl-python", str(trl_python)])
    saved = json.loads((out / "bench_trl.json").read_text())
    assert saved["versions"]["trl_venv"]["trl"] == "0.11.4"
    for method in ("alignprop", "ddpo"):
        r = saved["methods"][method]
        assert r["trl"]["seconds"] > 0 and r["trl"]["peak_rss_mb"] > 50
        assert r["time_ratio"] > 0 and r["rss_ratio"] > 0
    assert saved["methods"]["alignprop"]["trl"]["trl_settings"]["truncated_backprop_rand"] is False
