"""The diffalign command: sample end to end, one-line errors, entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffalign.cli import main


def test_sample_writes_images_and_grid(sd_dir, tmp_path):
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--model",
                str(sd_dir),
                "--prompt",
                "a red circle",
                "--n",
                "3",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(list(out.glob("0000*_a-red-circle.png"))) == 3
    assert (out / "grid.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "./no/such/dir", "--prompt", "x"], "no pipeline directory at ./no/such/dir"),
        (["--model", "M", "--prompt", " "], "--prompt is empty"),
        (["--model", "M", "--prompts", "missing.txt"], "prompt file missing.txt does not exist"),
        (["--model", "M"], "give --prompt TEXT or --prompts FILE"),
    ],
)
def test_sample_errors_are_one_line(args, message, tmp_path, capsys):
    assert main(["sample", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_empty_prompt_file(tmp_path, capsys):
    empty = tmp_path / "p.txt"
    empty.write_text("\n  \n")
    assert main(["sample", "--model", "M", "--prompts", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "has no prompts: write one prompt per line" in capsys.readouterr().err


def test_module_entry_point_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "diffalign", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("sample", "score", "reno"):
        assert command in out
