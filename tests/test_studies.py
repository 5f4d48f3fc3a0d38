"""scripts/overoptimization.py and scripts/pareto_study.py: their commands are valid configs, the
hypervolume and front match hand-computed values, and the verdicts and figures come from fake runs."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import overoptimization  # noqa: E402
import pareto_study  # noqa: E402
from test_hacking_study import _in_checkout, _write  # noqa: E402, F401  (the fixture is autouse)


def _configs(lines: list[str]):
    from diffalign.config import DiffalignConfig

    for line in lines:
        words = shlex.split(line)[2:]
        config = words[words.index("--config") + 1]
        yield DiffalignConfig.from_yaml(ROOT / config, [w for w in words if "=" in w and not w.startswith("-")])


def test_overoptimization_commands_are_valid_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert overoptimization.main(["--dry-run", "--out", str(tmp_path), "--seeds", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    single, wco, uwo = _configs(lines)
    assert single.reward.rewards == [overoptimization.MEMBER_1] and single.reward.combine == "weighted"
    assert len(wco.reward.rewards) == 4 and wco.reward.rewards[0] == overoptimization.MEMBER_1
    assert (wco.reward.combine, uwo.reward.combine) == ("wco", "uwo") and uwo.reward.combine_options.uwo_lambda == 1.0
    assert wco.reward.combine_options.normalize == "zscore"
    for cfg in (single, wco, uwo):  # member 1 scored on held-out images in every variant, 40 steps
        assert cfg.eval.rewards == [overoptimization.MEMBER_1] and cfg.train.steps == 40


def _run(out: Path, name: str, gold: list[float], hacking: bool = False) -> None:
    records = [
        {"step": 10 * i, "gold/accuracy": g, "heldout/shapes_clip_flawed": 1.0 + 0.1 * i, "hacking": hacking and i > 0}
        for i, g in enumerate(gold)
    ]
    _write(out / name / "eval.jsonl", records)


def test_overoptimization_verdict_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    for seed, drop in ((0, 0.2), (1, 0.1)):
        _run(out, f"single-s{seed}", [0.3, 0.4, 0.4 - drop], hacking=True)
        _run(out, f"wco-s{seed}", [0.3, 0.35, 0.35 - drop / 4])
        _run(out, f"uwo-s{seed}", [0.3, 0.4, 0.4 - drop])
    png = tmp_path / "o.png"
    assert overoptimization.main(["--plot-only", "--out", str(out), "--seeds", "0", "1", "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert png.stat().st_size > 1000
    assert (
        "single proxy: gold drop peak -> end mean 0.150 (range 0.100..0.200, 2 seeds), guardrail flagged 2/2" in printed
    )
    assert "wco: gold drop mean 0.038 (range 0.025..0.050), at most half the single proxy's (0.075)" in printed
    assert "uwo: gold drop mean 0.150 (range 0.100..0.200), MORE than half" in printed


def test_front_and_hypervolume_by_hand() -> None:
    pts = [(1.0, 1.0), (3.0, 1.0), (2.0, 2.0), (1.0, 3.0), (2.0, 2.0), (0.5, 0.5)]
    assert pareto_study.front(pts) == [(3.0, 1.0), (2.0, 2.0), (1.0, 3.0)]
    # from (0, 0): 3x1 + 2x(2-1) + 1x(3-2) = 6
    assert pareto_study.hypervolume(pts, (0.0, 0.0)) == pytest.approx(6.0)
    assert pareto_study.hypervolume(pts, (1.0, 1.0)) == pytest.approx(1.0)  # only (2, 2) lies above it: 1 x 1
    assert pareto_study.hypervolume([(0.5, 5.0)], (1.0, 0.0)) == 0.0  # nothing dominates the reference
    assert pareto_study.hypervolume([], (0.0, 0.0)) == 0.0


def test_pareto_study_commands_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pareto_study.main(["--dry-run", "--out", str(tmp_path), "--seeds", "0"]) == 0
    weighted, pareto = _configs(capsys.readouterr().out.strip().splitlines())
    assert weighted.reward.rewards == pareto.reward.rewards == ["shapes_clip", "saturation"]
    assert weighted.reward.weights == pareto.reward.weights == [1.0, 6.0]
    assert (weighted.reward.combine, pareto.reward.combine) == ("weighted", "pareto")
    assert weighted.train.steps == pareto.train.steps == 20
    assert (
        pareto_study.main(["--dry-run", "--out", str(tmp_path), "--seeds", "0", "--second", "jpeg_compressibility"])
        == 0
    )
    other, _ = _configs(capsys.readouterr().out.strip().splitlines())
    assert other.reward.rewards == ["shapes_clip", "jpeg_compressibility"]
    assert pareto_study.main(["--dry-run", "--out", str(tmp_path), "--seeds", "0", "--variants", "dominance"]) == 0
    (dominance,) = _configs(capsys.readouterr().out.strip().splitlines())
    assert dominance.reward.combine == "pareto" and dominance.reward.combine_options.pareto_signal == "dominance"
    assert pareto_study.main(["--dry-run", "--out", str(tmp_path), "--seeds", "0", "--variants", "pareto_batch"]) == 0
    (batch,) = _configs(capsys.readouterr().out.strip().splitlines())
    assert batch.reward.combine == "pareto" and batch.reward.combine_options.pareto_groups is False
    assert batch.grpo.adv_std == "none"

    out = tmp_path / "study"
    for name in ("weighted-s0", "pareto-s0"):
        _write(out / name / "eval.jsonl", [{"step": 0, "gold/accuracy": 0.3}, {"step": 20, "gold/accuracy": 0.3}])
    rows = []
    for label, pts in (("base", [(0.0, 0.0), (1.0, 1.0)]), ("weighted-s0", [(2.0, 1.0)]), ("pareto-s0", [(2.0, 2.0)])):
        for x, y in pts:
            rows.append({"label": label, "scores": {"shapes_clip": x, "saturation": y, "gold/accuracy": 1.0}})
    _write(out / "gallery" / "scores.jsonl", rows)
    png = tmp_path / "p.png"
    assert pareto_study.main(["--plot-only", "--out", str(out), "--seeds", "0", "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert (
        "| base | 1.0000 |" in printed and "| weighted-s0 | 2.0000 |" in printed and "| pareto-s0 | 4.0000 |" in printed
    )
    assert "pareto: hypervolume mean 4.0000" in printed and png.stat().st_size > 1000
