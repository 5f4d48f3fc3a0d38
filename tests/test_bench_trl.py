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
SMALL += ["--train-batch", "2", "--threads", "1", "--page-cache", "keep"]


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


def test_compiled_side_runs_the_same_config_with_compile(tmp_path, monkeypatch):
    """``--compile``: a third run, the same config with ``model.compile: true``, its ratios in the report.
    The child processes are faked here (tests/test_compile.py trains with a compiled UNet)."""
    runs = []

    def fake_child(cmd, log, threads, cwd=None):
        if "--_prepare" in cmd:
            cache = Path(cmd[cmd.index("--cache") + 1])
            cache.mkdir(parents=True)
            (cache / "bench_pipe.json").write_text(json.dumps({"unet_params": 1000, "image_size": 8}))
            return 0, 0.0, 0.0
        if cmd[1] == "-c":  # the import floor of a side's venv
            return 0, 0.1, 60.0 if " trl;" in cmd[2] else 70.0
        if "trl_side.py" in " ".join(cmd):
            seconds, settings = [3.0, 3.0, 3.0], {}
            log.write_text(json.dumps({"seconds": seconds, "peak_rss_mb": 90.0, "settings": settings, "versions": {}}))
            return 0, 1.0, 100.0
        run = Path(cmd[cmd.index("--output-dir") + 1])
        runs.append(run.name)
        seconds = [9.0, 2.0, 1.0] if "compiled" in run.name else [3.0, 2.0, 2.0]
        (run / "metrics.jsonl").write_text("".join(json.dumps({"time": {"step_seconds": x}}) + "\n" for x in seconds))
        return 0, 1.0, 80.0 if "compiled" in run.name else 120.0

    monkeypatch.setattr(bench_trl, "run_child", fake_child)
    trl_python = tmp_path / "python"
    trl_python.write_text("")
    out = tmp_path / "bench"
    args = ["--out", str(out), "--methods", "ddpo", "--no-extras", "--compile", "--trl-python", str(trl_python)]
    args += ["--compile-mode", "max-autotune-no-cudagraphs"]
    report = bench_trl.main(args)
    assert runs == ["diffalign-ddpo", "diffalign-compiled-ddpo"]
    r = report["methods"]["ddpo"]
    assert r["time_ratio"] == pytest.approx(2.0 / 3.0) and r["compiled_time_ratio"] == pytest.approx(1.5 / 3.0)
    assert r["compiled_rss_ratio"] == pytest.approx(0.8) and r["diffalign-compiled"]["all_seconds"][0] == 9.0
    cfg = (out / "diffalign-compiled-ddpo.yaml").read_text()
    assert "compile: true" in cfg and "compile_backend: inductor" in cfg
    assert "compile_mode: max-autotune-no-cudagraphs" in cfg
    assert "compile:" not in (out / "diffalign-ddpo.yaml").read_text()
    md = (out / "bench_trl.md").read_text()
    assert "| ddpo, `model.compile: true` | s / epoch (first, compiling: 9 s) | 3.00 | 1.50 | 0.50 | <= 0.7 |" in md
    # the import floors: TRL's peak 100 above its floor 60, ours 120 above 70; the target 0.8 x 100
    assert report["import_floor_mb"] == {"trl": 60.0, "diffalign": 70.0}
    assert "| ddpo: peak above the floor | 40 | 50 |" in md and "| ddpo: 0.8 x TRL's peak, the target | 80 | |" in md


def test_page_cache_is_dropped_before_every_child_when_asked(tmp_path, monkeypatch):
    """``--page-cache drop``: run_child drops the cache before each child (faked here: it needs root);
    ``keep`` never does; ``drop`` where it cannot be done is a one-line error."""
    drops = []
    monkeypatch.setattr(bench_trl, "drop_page_cache", lambda: drops.append(1) or True)
    monkeypatch.setitem(bench_trl.PAGE_CACHE, "drop", True)
    for _ in range(2):
        rc, _, rss = bench_trl.run_child([sys.executable, "-c", "pass"], tmp_path / "child.log", 1)
        assert rc == 0 and rss > 1
    assert len(drops) == 2
    monkeypatch.setitem(bench_trl.PAGE_CACHE, "drop", False)
    bench_trl.run_child([sys.executable, "-c", "pass"], tmp_path / "child.log", 1)
    assert len(drops) == 2
    monkeypatch.setattr(bench_trl, "drop_page_cache", lambda: False)
    with pytest.raises(SystemExit, match="--page-cache drop needs root"):
        bench_trl.main([*SMALL[:-2], "--page-cache", "drop", "--sides", "diffalign", "--out", str(tmp_path / "b")])
