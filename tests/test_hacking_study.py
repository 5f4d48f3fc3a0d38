"""scripts/hacking_study.py: the commands it would run, and the figure and table from fake run directories."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import hacking_study  # noqa: E402


@pytest.fixture(autouse=True)
def _in_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config paths in the printed commands are relative to the checkout, as when run from its root."""
    monkeypatch.chdir(ROOT)


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_dry_run_prints_the_default_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    (out / "proxy-adv-s1" / "checkpoints" / "step_10").mkdir(parents=True)  # an interrupted run: resumed
    assert hacking_study.main(["--dry-run", "--out", str(out), "--seeds", "0", "1", "--steps", "30"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    py = shlex.quote(sys.executable)
    env = "OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE "
    grpo, adv = "configs/shapes/grpo_hackable.yaml", "configs/shapes/adv_grpo_hackable.yaml"
    assert lines[0] == (
        f"{env}{py} -m diffalign train --config {grpo} --output-dir {out}/proxy-only-s0 "
        "'reward.weights=[1,6]' train.seed=0 train.steps=30"
    )
    assert lines[1].endswith(f"--output-dir {out}/proxy-only-s1 'reward.weights=[1,6]' train.seed=1 train.steps=30")
    assert lines[2] == (
        f"{env}{py} -m diffalign train --config {adv} --output-dir {out}/proxy-adv-s0 "
        "'reward.weights=[1,6,1]' train.seed=0 train.steps=30"
    )
    assert lines[3].endswith(
        f"--output-dir {out}/proxy-adv-s1 --resume latest 'reward.weights=[1,6,1]' train.seed=1 train.steps=30"
    )


def test_dry_run_commands_are_valid_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every printed command's config and overrides pass diffalign's validation (the real keys)."""
    from diffalign.config import DiffalignConfig

    hacking_study.main(["--dry-run", "--out", str(tmp_path), "--seeds", "3", "--weight", "4", "--adv-weight", "0.5"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, method, rewards, weights in (
        (lines[0], "grpo", ["shapes_clip", "saturation"], [1.0, 4.0]),
        (lines[1], "adv_grpo", ["shapes_clip", "saturation", "adversarial"], [1.0, 4.0, 0.5]),
    ):
        words = shlex.split(line)[2:]  # drop the environment
        config = words[words.index("--config") + 1]
        cfg = DiffalignConfig.from_yaml(ROOT / config, [w for w in words if "=" in w and not w.startswith("-")])
        assert (cfg.train.method, cfg.reward.rewards, cfg.reward.weights) == (method, rewards, weights)
        assert (cfg.train.seed, cfg.train.steps) == (3, 60)


def test_variants_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--dry-run",
        "--out",
        str(tmp_path),
        "--seeds",
        "0",
        "--threads",
        "2",
        "--variant",
        "single=reward.rewards=[shapes_clip]",
        "--variant",
        "wco=--config configs/shapes/grpo.yaml 'reward.rewards=[shapes_clip, saturation]' reward.combine=wco",
        "--extra",
        "eval.every=5",
    ]
    assert hacking_study.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE ")
    assert lines[0].endswith(
        f"--config configs/shapes/grpo.yaml --output-dir {tmp_path}/single-s0 'reward.rewards=[shapes_clip]' "
        "eval.every=5 train.seed=0 train.steps=60"
    )
    assert lines[1].endswith(
        f"--output-dir {tmp_path}/wco-s0 'reward.rewards=[shapes_clip, saturation]' reward.combine=wco "
        "eval.every=5 train.seed=0 train.steps=60"
    )


@pytest.mark.parametrize(
    ("argv", "part"),
    [
        (["--variant", "no equals sign"], "write NAME="),
        (["--variant", "a=train.lr"], "is not a section.key=value override"),
        (["--variant", "a=--config configs/shapes/nope.yaml"], "config configs/shapes/nope.yaml does not exist"),
        (["--variant", "a=train.lr=1", "--variant", "a=train.lr=2"], "variant names must differ"),
        (["--proxy-term", "reward/saturation"], "write KEY=WEIGHT"),
        (["--steps", "0"], "must be >= 1"),
    ],
)
def test_bad_arguments_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], part: str
) -> None:
    assert hacking_study.main(["--dry-run", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("hacking_study: ") and part in err


def test_run_all_sets_the_threads_logs_and_reports_failures(tmp_path: Path) -> None:
    show = "import os; print('threads', os.environ['OMP_NUM_THREADS'], os.environ['OMP_WAIT_POLICY'])"
    jobs = [("ok-s0", [sys.executable, "-c", show]), ("bad-s0", [sys.executable, "-c", "raise SystemExit(3)"])]
    failed = hacking_study.run_all(jobs, tmp_path, threads=2, parallel=2, poll=0.1)
    assert failed == ["bad-s0"]
    log = (tmp_path / "logs" / "ok-s0.log").read_text()
    assert log.startswith("$ ") and "threads 2 PASSIVE" in log


def test_a_complete_run_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    done = tmp_path / "proxy-only-s0"
    (done / "lora").mkdir(parents=True)
    _write(done / "eval.jsonl", [{"step": 0, "gold/accuracy": 0.3}, {"step": 40, "gold/accuracy": 0.3}])
    assert hacking_study.main(["--dry-run", "--out", str(tmp_path), "--seeds", "0", "--steps", "40"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"hacking_study: proxy-only-s0 is complete ({done}); skipped"
    assert len(lines) == 2 and "proxy-adv-s0" in lines[1]


def _fake_run(run: Path, gold: list[float], hacking_at: int | None, clip: float, sat: float) -> None:
    steps = [0, 10, 20, 30]
    evals = [
        {"step": s, "reward": 1.0, "gold/accuracy": g, "hacking": s == hacking_at}
        for s, g in zip(steps, gold, strict=True)
    ]
    metrics = [
        {"step": s, "reward": 0.0, "reward/shapes_clip": clip + 0.001 * s, "reward/saturation": sat + 0.002 * s}
        for s in range(1, 31)
    ]
    _write(run / "eval.jsonl", evals)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 31, "rew')


def test_plot_only_writes_the_figure_and_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    _fake_run(out / "proxy-only-s0", [0.28, 0.36, 0.30, 0.20], hacking_at=30, clip=0.8, sat=0.12)
    _fake_run(out / "proxy-only-s1", [0.30, 0.33, 0.35, 0.31], hacking_at=None, clip=0.7, sat=0.10)
    _fake_run(out / "proxy-adv-s0", [0.28, 0.30, 0.34, 0.34], hacking_at=None, clip=0.8, sat=0.12)
    png = tmp_path / "fig" / "hacking.png"
    argv = ["--plot-only", "--out", str(out), "--seeds", "0", "1", "--png", str(png), "--steps", "30"]
    assert hacking_study.main(argv) == 0
    text = capsys.readouterr().out
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{out / 'proxy-adv-s1'} has no gold evaluation; left out" in text
    assert "| proxy-only | 0 | 0.280 | 0.360 (10) | 0.200 (30) | 0.160 | -0.080 | yes |" in text
    assert "| proxy-only | 1 | 0.300 | 0.350 (20) | 0.310 (30) | 0.040 | +0.010 | no |" in text
    assert "| proxy-only | mean | 0.290 | 0.355 | 0.255 | 0.100 | -0.035 | 1/2 |" in text
    assert "| proxy-adv | 0 | 0.280 | 0.340 (20) | 0.340 (30) | 0.000 | +0.060 | no |" in text
    assert "| proxy-adv | mean |" not in text  # one seed: no mean row


def test_proxy_curve_and_band() -> None:
    terms = hacking_study.parse_terms(["reward/shapes_clip=1", "reward/saturation=6"])
    assert terms == [("reward/shapes_clip", 1.0), ("reward/saturation", 6.0)]
    assert hacking_study.parse_terms(["reward/shapes_clip:model=local-dir:A=0.5"]) == [
        ("reward/shapes_clip:model=local-dir:A", 0.5)
    ]
    steps, mean, lo, hi = hacking_study.band([[(0, 1.0), (1, 3.0)], [(0, 2.0)]])
    assert (steps, mean, lo, hi) == ([0, 1], [1.5, 3.0], [1.0, 3.0], [2.0, 3.0])


def test_plot_only_without_runs_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hacking_study.main(["--plot-only", "--out", str(tmp_path), "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no run under" in err and "\n" not in err.strip() and not (tmp_path / "x.png").exists()
