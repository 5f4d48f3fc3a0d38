"""The diffalign command: sample end to end, one-line errors, entry points."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffalign.cli import main, read_prompts
from diffalign.errors import DiffalignError


def test_sample_writes_images_prompts_and_grid(sd_dir, tmp_path):
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
    assert len(list(out.glob("*.png"))) == 3  # the grid is kept apart, in a subfolder
    assert (out / "grid" / "grid.png").is_file()
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1, 2] and {r["prompt"] for r in rows} == {"a red circle"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "./no/such/dir", "--prompt", "x"], "no pipeline directory at ./no/such/dir"),
        (["--model", "M", "--prompt", " "], "--prompt is empty"),
        (["--model", "M", "--prompts", "missing.txt"], "prompt file missing.txt does not exist"),
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


def test_read_prompts_errors(tmp_path):
    with pytest.raises(DiffalignError, match="give --prompt TEXT or --prompts FILE"):
        read_prompts(None, None)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe a red circle\n")
    with pytest.raises(DiffalignError, match=r"bad.txt is not UTF-8 text \(invalid start byte at byte 0\)"):
        read_prompts(None, str(tmp_path / "bad.txt"))
    with pytest.raises(DiffalignError, match="is a directory"):
        read_prompts(None, str(tmp_path))
    (tmp_path / "ok.txt").write_text("  a red circle \n\n two blue squares\n", encoding="utf-8")
    assert read_prompts(None, str(tmp_path / "ok.txt")) == ["a red circle", "two blue squares"]


def test_module_entry_point_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "diffalign", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("sample", "score", "reno"):
        assert command in out
    assert "--prompts outputs/samples/prompts.jsonl" in out


def test_overrides_may_follow_options(capsys):
    """``train --config C a=1 --output-dir D b=2``: both overrides kept, in order; other strays still fail."""
    from diffalign.cli import build_parser, parse

    parser = build_parser()
    argv = ["train", "--config", "c.yaml", "train.lr=1e-3", "--output-dir", "out", "train.seed=2", "eval.every=5"]
    args = parse(parser, argv)
    assert args.overrides == ["train.lr=1e-3", "train.seed=2", "eval.every=5"] and args.output_dir == "out"
    assert parse(parser, ["train", "--config", "c.yaml", "--output-dir", "out"]).overrides == []
    for stray in (["--output-dir", "out", "--bogus"], ["a.b=1", "--output-dir", "out", "notanoverride"]):
        with pytest.raises(SystemExit) as exc:
            parse(parser, ["train", "--config", "c.yaml", *stray])
        assert exc.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without overrides takes no KEY=VALUE
        parse(parser, ["sample", "--model", "m", "--prompt", "p", "a=b"])
