"""``diffalign sample`` on the shipped shapes pipeline: outputs, seeds, batch size, sample -> score, options, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import build_parser, image_seed, main
from diffalign.gallery.grids import ROW_LABEL_WIDTH
from reward_models import get_reward
from reward_models.loading import load_image

SD = Path(__file__).resolve().parents[1] / "assets" / "shapes-sd"
PROMPTS = ["two red circles", "a blue square and a green triangle"]
# 2 prompts x 2 images, 2 DDIM steps with eta=1 (so the step noise is drawn too), on 32 px images
COMMON = ["--model", str(SD), "--n", "2", "--steps", "2", "--eta", "1", "--size", "32", "--guidance", "3"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def run_ok(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def run_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]  # above it, at most the loader's progress bars
    assert line.startswith("diffalign sample: error: ") or line.startswith("diffalign score: error: ")
    return line


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def batch3(tmp_path_factory: pytest.TempPathFactory, prompts_file: Path) -> Path:
    """One sample run with batches of 3 (a batch spans both prompts); shared by several tests."""
    out = tmp_path_factory.mktemp("runs") / "batch3"
    assert main(["sample", "--prompts", str(prompts_file), *COMMON, "--batch-size", "3", "--out", str(out)]) == 0
    return out


def test_sample_outputs_and_prompts_jsonl(batch3: Path) -> None:
    names = sorted(p.name for p in batch3.iterdir())
    assert names == [
        "00000_two-red-circles.png",
        "00001_two-red-circles.png",
        "00002_a-blue-square-and-a-green-triangle.png",
        "00003_a-blue-square-and-a-green-triangle.png",
        "grid",
        "prompts.jsonl",
        "sample.json",
    ]
    rows = [json.loads(line) for line in (batch3 / "prompts.jsonl").read_text().splitlines()]
    assert rows == [
        {"file": "00000_two-red-circles.png", "prompt": PROMPTS[0], "seed": 0},
        {"file": "00001_two-red-circles.png", "prompt": PROMPTS[0], "seed": 1},
        {"file": "00002_a-blue-square-and-a-green-triangle.png", "prompt": PROMPTS[1], "seed": 2},
        {"file": "00003_a-blue-square-and-a-green-triangle.png", "prompt": PROMPTS[1], "seed": 3},
    ]
    assert [image_seed(0, i, j, 2) for i in range(2) for j in range(2)] == [0, 1, 2, 3]
    assert image_seed(10, 2, 1, 4) == 10 + 2 * 4 + 1
    assert all(pixels(batch3 / r["file"]).shape == (32, 32, 3) for r in rows)
    grid = np.asarray(Image.open(batch3 / "grid" / "grid.png").convert("RGB")).astype(np.int16)
    layout = json.loads((batch3 / "grid" / "grid.json").read_text())  # 2 x 2 tiles of 32 px, upscaled twice
    assert layout["row_labels"] == PROMPTS and len(layout["rows"]) == 2 and "2 DDIM steps" in layout["title"]
    for k, r in enumerate(rows):  # each tile, right of the prompt column, is its image
        y, x = layout["rows"][k // 2][0] + 2, ROW_LABEL_WIDTH + 4 + (k % 2) * 66
        tile = pixels(batch3 / r["file"]).repeat(2, axis=0).repeat(2, axis=1)
        assert (grid[y : y + 64, x : x + 64] == tile).all()
    settings = json.loads((batch3 / "sample.json").read_text())
    assert settings["guidance"] == 3.0 and settings["eta"] == 1.0 and settings["batch_size"] == 3


def test_sample_then_score_round_trip(batch3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores = tmp_path / "scores.csv"
    out = run_ok(
        ["score", "--reward", "shapes_gold", "--reward", "jpeg_compressibility", "--images", str(batch3)]
        + ["--prompts", str(batch3 / "prompts.jsonl"), "--out", str(scores)],
        capsys,
    )
    assert str(scores) in out
    with scores.open() as fh:
        rows = list(csv.DictReader(fh))
    index = [json.loads(line) for line in (batch3 / "prompts.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"]) for r in rows] == [(r["file"], r["prompt"]) for r in index]  # not the grid
    assert list(rows[0]) == ["file", "prompt", "shapes_gold", "jpeg_compressibility"]
    images = torch.stack([load_image(batch3 / r["file"]) for r in index])
    expected = get_reward("shapes_gold")(images, [r["prompt"] for r in index])
    np.testing.assert_allclose([float(r["shapes_gold"]) for r in rows], expected.numpy(), rtol=1e-6)


def test_images_do_not_depend_on_batch_size_and_one_image_can_be_redrawn(
    batch3: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = tmp_path / "batch1"
    run_ok(["sample", "--prompts", str(prompts_file), *COMMON, "--batch-size", "1", "--out", str(one)], capsys)
    redraw = tmp_path / "redraw"  # image 3 (prompt 1, image 1) has seed 3 in prompts.jsonl
    run_ok(["sample", "--prompt", PROMPTS[1], *COMMON, "--n", "1", "--seed", "3", "--out", str(redraw)], capsys)
    other = tmp_path / "other"
    run_ok(["sample", "--prompts", str(prompts_file), *COMMON, "--seed", "100", "--out", str(other)], capsys)
    files = sorted(p.name for p in batch3.glob("*.png"))
    for name in files:
        diff = np.abs(pixels(batch3 / name) - pixels(one / name))
        # same seeds, same noise: equal up to float rounding of batched CPU kernels
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, name
        assert np.abs(pixels(batch3 / name) - pixels(other / name)).mean() > 5  # another seed: another image
    redrawn = pixels(redraw / "00000_a-blue-square-and-a-green-triangle.png")
    assert np.abs(redrawn - pixels(batch3 / files[3])).max() <= 1
    assert json.loads((redraw / "prompts.jsonl").read_text())["seed"] == 3


def test_size_negative_prompt_and_no_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sample", "--prompt", PROMPTS[0], *COMMON, "--n", "1", "--no-grid"]
    run_ok([*base, "--size", "48x32", "--out", str(tmp_path / "a")], capsys)
    assert pixels(tmp_path / "a" / "00000_two-red-circles.png").shape == (48, 32, 3)
    assert not (tmp_path / "a" / "grid").exists()
    run_ok([*base, "--negative-prompt", "a red circle", "--out", str(tmp_path / "b")], capsys)
    run_ok([*base, "--out", str(tmp_path / "c")], capsys)
    plain, negative = (
        pixels(tmp_path / "c" / "00000_two-red-circles.png"),
        pixels(tmp_path / "b" / "00000_two-red-circles.png"),
    )
    assert np.abs(plain - negative).mean() > 0.5


def test_help_shows_defaults_example_and_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for part in ("(default: 4)", "(default: 20)", "(default: 5.0)", "(default: 0.0)", "--guidance G, --cfg G"):
        assert part in text
    for part in ("--eta", "--size HxW", "--negative-prompt", "--batch-size", "prompts.jsonl", "grid/grid.png"):
        assert part in text
    assert "diffalign sample --model assets/shapes-sd" in text and "seed --seed + k" in text
    args = build_parser().parse_args(["sample", "--prompt", "x", "--model", "M", "--out", "o", "--cfg", "2.5"])
    assert args.guidance == 2.5 and args.batch_size == 4 and args.eta == 0.0 and args.size is None


def test_prompt_and_prompts_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--prompt", "x", "--prompts", "p.txt"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", *args, "--model", "M", "--out", "o"])
        assert exit_info.value.code == 2
        assert "--prompt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--size", "36"], "36 is not a multiple of 8"),
        (["--size", "32x33"], "33 is not a multiple of 8"),
        (["--size", "big"], "--size 'big' is not a size"),
        (["--size", "0"], "is not a size"),
        (["--n", "0"], "--n must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--eta", "1.5"], "--eta must be between 0"),
        (["--device", "gpu7"], "unknown device 'gpu7'"),
    ],
)
def test_sample_option_errors(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    err = run_error(["sample", "--prompt", "x", *COMMON, *extra, "--out", str(out)], capsys)
    assert message in err
    assert not out.exists()


def test_sample_input_and_output_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sample", "--model", str(SD), "--steps", "1", "--n", "1"]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un cercle rouge \xe9t\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in run_error([*base, "--prompts", str(latin1), "--out", str(tmp_path / "o")], capsys)
    assert "is a directory" in run_error([*base, "--prompts", str(tmp_path), "--out", str(tmp_path / "o")], capsys)

    a_file = tmp_path / "existing.txt"
    a_file.write_text("keep me")
    err = run_error([*base, "--prompt", "x", "--out", str(a_file)], capsys)
    assert "is an existing file" in err
    err = run_error([*base, "--prompt", "x", "--out", str(a_file / "sub")], capsys)  # fails for root too
    assert "is a file, not a directory" in err
    assert a_file.read_text() == "keep me"

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "00000_x.png").write_bytes(b"an earlier image")
    (earlier / "notes.txt").write_text("notes")
    err = run_error([*base, "--prompt", "x", "--out", str(earlier)], capsys)
    assert "already holds 1 earlier output file(s) (first: 00000_x.png)" in err
    assert (earlier / "00000_x.png").read_bytes() == b"an earlier image" and not (earlier / "prompts.jsonl").exists()
