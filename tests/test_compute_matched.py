"""scripts/compute_matched.py on hand-written runs: minutes from rates, the table's numbers, the PNG."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("compute_matched", ROOT / "scripts" / "compute_matched.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compute_matched"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fake_run(path: Path, golds: dict[int, float], seconds_per_step: float) -> Path:
    path.mkdir(parents=True)
    evals = [{"step": s, "gold/accuracy": g, "diversity": 0.2} for s, g in golds.items()]
    (path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    steps = range(1, max(golds) + 1)
    metrics = [{"step": s, "time": {"step_seconds": seconds_per_step, "elapsed": s * seconds_per_step}} for s in steps]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return path


def test_minutes_from_rates_table_and_png(tmp_path, capsys):
    cm = load_script()
    a = fake_run(tmp_path / "a0", {0: 0.28, 10: 0.38, 20: 0.44}, 30.0)
    b = fake_run(tmp_path / "a1", {0: 0.28, 10: 0.34, 20: 0.40}, 30.0)
    c = fake_run(tmp_path / "d0", {0: 0.28, 5: 0.30, 10: 0.33}, 99.0)
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"rates": {"grpo": {"step_seconds": 6.0}, "ddpo": {"step_seconds": 12.0}}}))
    png = tmp_path / "cm.png"
    cm.main(["--rates", str(rates), "--method", f"G=grpo:{a},{b}", "--method", f"D=ddpo:{c}", "--budget", "1",
             "--budget", "2", "--png", str(png)])  # fmt: skip
    out = capsys.readouterr().out
    # grpo: 6 s/step -> step 10 at 1 min, step 20 at 2 min; ddpo: 12 s/step -> step 5 at 1 min, step 10 at 2
    assert "| G | 1 (step 10) | 2 | 0.360 (0.340..0.380) | 0.080 (0.060..0.100) |" in out
    assert "| G | 2 (step 20) | 2 | 0.420 (0.400..0.440) | 0.140 (0.120..0.160) |" in out
    assert "| D | 1 (step 5) | 1 | 0.300 (0.300..0.300) |" in out and "| D | 2 (step 10) | 1 | 0.330" in out
    assert png.stat().st_size > 5000


def test_offset_moves_every_trained_evaluation_but_the_base(tmp_path, capsys):
    cm = load_script()
    a = fake_run(tmp_path / "dpo0", {0: 0.28, 10: 0.38}, 30.0)
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"rates": {"dpo": {"step_seconds": 6.0}}}))
    third = cm.load_curve(a, 2.0)  # step 10 at 1/3 minute: the plot's grid (6 decimals) rounds it down
    assert third.at(round(1 / 3, 6))["step"] == 10
    curve = cm.load_curve(a, 6.0, offset=2.5)
    assert [m for m, _ in curve.points] == [0.0, 3.5]  # step 10 x 6 s = 1 min, + 2.5 min of preference data
    args = ["--rates", str(rates), "--method", f"DPO=dpo:{a}", "--png", str(tmp_path / "p.png")]
    cm.main([*args, "--offset", "DPO=2.5", "--budget", "3", "--budget", "4"])
    out = capsys.readouterr().out
    assert "| DPO | 3 (step 0) |" in out and "| DPO | 4 (step 10) | 1 | 0.380" in out
    with pytest.raises(SystemExit, match="names no --method label"):
        cm.main([*args, "--offset", "GRPO=1"])
    with pytest.raises(SystemExit, match="is not LABEL=MINUTES"):
        cm.main([*args, "--offset", "DPO=-1"])


def test_elapsed_without_rates_and_bad_inputs(tmp_path):
    cm = load_script()
    run = fake_run(tmp_path / "r", {0: 0.28, 10: 0.4}, 30.0)
    curve = cm.load_curve(run, None)
    assert [m for m, _ in curve.points] == [0.0, 5.0]  # step 10 x 30 s elapsed
    with pytest.raises(SystemExit, match="is not LABEL=CONFIG:RUN"):
        cm.parse_method("grpo-runs")
    with pytest.raises(SystemExit, match="does not exist"):
        cm.load_curve(tmp_path / "missing", None)


def test_bench_method_steps_times_a_runs_own_config_yaml(sd_dir, tmp_path, monkeypatch, capsys):
    """``--config RUN/config.yaml``: the rates of exactly what a run ran, keyed by the path as given."""
    from train_fixtures import subprocess_env, tiny_config, write_config

    spec = importlib.util.spec_from_file_location("bench_method_steps", ROOT / "benchmarks" / "bench_method_steps.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.run_dir_name("runs/prdp-s0/config.yaml") == "prdp-s0" and bench.run_dir_name("grpo") == "grpo"
    assert bench.config_path("grpo") == ROOT / "configs" / "shapes" / "grpo.yaml"
    (tmp_path / "run-a").mkdir()
    cfg = write_config(tmp_path / "run-a" / "config.yaml", tiny_config(sd_dir, tmp_path / "ignored"))
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    bench.main(["--config", str(cfg), "--steps", "2", "--threads", "1", "--out", str(tmp_path / "bench")])
    rates = json.loads((tmp_path / "bench" / "rates.json").read_text())["rates"]
    assert list(rates) == [str(cfg)] and rates[str(cfg)]["step_seconds"] > 0 and rates[str(cfg)]["steps_timed"] == 1
    assert (tmp_path / "bench" / "run-a" / "metrics.jsonl").is_file() and not (tmp_path / "ignored").exists()
    with pytest.raises(SystemExit, match="no config .*nothing.yaml; give a YAML path"):
        bench.main(["--config", str(tmp_path / "nothing.yaml"), "--out", str(tmp_path / "bench")])
    with pytest.raises(SystemExit, match="share the run directory 'run-a'"):
        bench.main(["--config", str(cfg), "--config", str(cfg), "--out", str(tmp_path / "bench")])


def load_study():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(
        "compute_matched_study", ROOT / "scripts" / "compute_matched_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["compute_matched_study"] = module
    spec.loader.exec_module(module)
    return module


def test_study_commands_are_valid_configs_and_resume(tmp_path, capsys):
    """Every run the one-command study would start loads as a config; checkpoints -> --resume; done -> skipped."""
    from diffalign.config import DiffalignConfig

    study = load_study()
    out = tmp_path / "cm"
    (out / "shapes-prefs").mkdir(parents=True)
    (out / "shapes-prefs" / "prefs.jsonl").write_text("")
    (out / "grpo-s1" / "checkpoints" / "step_10").mkdir(parents=True)
    done = fake_run(out / "ddpo-s0", {0: 0.28, 60: 0.3}, 1.0)
    (done / "lora").mkdir()
    assert study.main(["--dry-run", "--out", str(out), "--seeds", "0", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    trains = [line.split(" ", 2)[2].split() for line in lines if " train " in line]
    assert len(trains) == 10 * 2 - 1  # ten methods x two seeds, minus the finished DDPO run
    assert not any("ddpo-s0" in " ".join(words) for words in trains)
    assert not any(" prefs " in line for line in lines)  # the preference set exists
    for words in trains:
        i = words.index("--config")
        overrides = [w.strip("'") for w in words if "=" in w and not w.startswith("-")]
        cfg = DiffalignConfig.from_yaml(words[i + 1], overrides)
        assert cfg.train.seed in (0, 1)
        assert ("--resume" in words) == words[words.index("--output-dir") + 1].endswith("grpo-s1")
    assert sum("bench_method_steps.py" in line for line in lines) == 10
    assert study.main(["--dry-run", "--out", str(tmp_path / "new"), "--only", "Diffusion-DPO"]) == 0
    assert " prefs " in capsys.readouterr().out.splitlines()[0]
    assert study.main(["--dry-run", "--out", str(tmp_path / "new"), "--only", "draft_lv", "--seeds", "0"]) == 0
    words = [line.split() for line in capsys.readouterr().out.splitlines() if " train " in line]
    assert len(words) == 1 and words[0][words[0].index("--config") + 1].endswith("draft_lv.yaml")
    cfg = DiffalignConfig.from_yaml(words[0][words[0].index("--config") + 1], ["train.steps=200"])
    assert cfg.train.method == "draft_lv"


def test_study_plot_only_and_bad_names(tmp_path, capsys):
    study = load_study()
    out = tmp_path / "cm"
    for key, rate in (("grpo", 12.0), ("alignprop", 6.0)):
        run = fake_run(out / f"{key}-s0", {0: 0.28, 10: 0.4}, 99.0)
        (run / "config.yaml").write_text("train: {}\n")
        bench = out / "bench" / f"{key}.json"
        bench.parent.mkdir(parents=True, exist_ok=True)
        bench.write_text(json.dumps({"rates": {str((run / "config.yaml").resolve()): {"step_seconds": rate}}}))
    png = tmp_path / "p.png"
    args = ["--plot-only", "--out", str(out), "--seeds", "0", "--png", str(png), "--budget", "1", "--budget", "2"]
    assert study.main([*args, "--only", "GRPO", "--only", "alignprop"]) == 0
    text = capsys.readouterr().out
    assert "| GRPO | 2 (step 10) | 1 | 0.400" in text and "| GRPO | 1 (step 0) |" in text  # 10 x 12 s = 2 min
    assert "| AlignProp (proxy reward) | 1 (step 10) | 1 | 0.400" in text  # 10 x 6 s = 1 min
    assert png.stat().st_size > 5000
    assert study.main([*args, "--only", "nope"]) == 2
    assert "is not a method of the study" in capsys.readouterr().err
    assert study.main(["--plot-only", "--out", str(tmp_path / "empty"), "--only", "ddpo"]) == 2
    assert "no finished run" in capsys.readouterr().err
