"""The helper scripts under scripts/ that work on run directories."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import before_after  # noqa: E402


def test_before_after_puts_the_first_rows_of_step_0_and_the_last_step_side_by_side(tmp_path):
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("eval:\n  seeds: [0, 1, 2]\n")
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
    with pytest.raises(SystemExit, match="cannot read eval.seeds from .*config.yaml"):
        before_after.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
