"""``diffalign score``: score_images end to end on a few PNGs, prompt files, errors, the argparse hook."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rewards_fixtures import make_open_clip_dir, shapes_batch

from diffalign.errors import DiffalignError
from diffalign.scoring import register, score_images
from reward_models import get_reward


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_open_clip_dir(tmp_path_factory.mktemp("scoring") / "open_clip")


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[str], torch.Tensor]:
    """Three shapes renders saved as PNG (names out of order on purpose) and their captions."""
    images, prompts = shapes_batch()
    images, prompts = images[:3], prompts[:3]
    d = tmp_path / "images"
    d.mkdir()
    for name, img in zip(["b.png", "c.png", "a.png"], images, strict=True):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(d / name)
    (d / "notes.txt").write_text("not an image")
    # sorted by name: a.png (3rd render), b.png (1st), c.png (2nd)
    order = [2, 0, 1]
    return d, [prompts[i] for i in order], images[order]


def specs(open_clip_dir: Path) -> list[str]:
    return ["jpeg_compressibility", "shapes_gold:mode=correct", f"clip_score:model=local-dir:{open_clip_dir}"]


def test_score_images_jsonl(folder: tuple[Path, list[str], torch.Tensor], open_clip_dir: Path, tmp_path: Path) -> None:
    images_dir, prompts, images = folder
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = score_images(specs(open_clip_dir), images_dir, tmp_path / "prompts.txt", tmp_path / "out" / "s.jsonl", 2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert [r["prompt"] for r in rows] == prompts
    assert set(rows[0]) == {"file", "prompt", "jpeg_compressibility", "shapes_gold", "clip_score"}
    assert all(r["shapes_gold"] == 1.0 for r in rows)
    expected = get_reward(specs(open_clip_dir)[2])(images, prompts)
    np.testing.assert_allclose([r["clip_score"] for r in rows], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert all(r["jpeg_compressibility"] < 0 for r in rows)


def test_score_images_csv_single_prompt_and_sizes(
    folder: tuple[Path, list[str], torch.Tensor], tmp_path: Path, open_clip_dir: Path
) -> None:
    images_dir, _, _ = folder
    Image.new("RGB", (48, 40), (240, 240, 236)).save(images_dir / "d.png")  # another size: its own batch
    (tmp_path / "one.txt").write_text("a red circle\n")
    out = score_images(
        ["shapes_gold", "shapes_gold:mode=correct", "jpeg_incompressibility"],
        images_dir,
        tmp_path / "one.txt",
        tmp_path / "s.csv",
        batch_size=16,
    )
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["file", "prompt", "shapes_gold", "shapes_gold:mode=correct", "jpeg_incompressibility"]
    assert [r["file"] for r in rows] == ["a.png", "b.png", "c.png", "d.png"]
    assert {r["prompt"] for r in rows} == {"a red circle"}
    assert float(rows[1]["shapes_gold:mode=correct"]) == 1.0  # b.png is the red circle
    assert float(rows[3]["shapes_gold"]) == 0.0  # blank image
    assert all(float(r["jpeg_incompressibility"]) > 0 for r in rows)


def test_score_images_jsonl_prompts(folder: tuple[Path, list[str], torch.Tensor], tmp_path: Path) -> None:
    images_dir, prompts, _ = folder
    lines = [
        json.dumps({"file": f, "prompt": p})
        for f, p in zip(["c.png", "a.png", "b.png"], [prompts[2], prompts[0], prompts[1]], strict=True)
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    out = score_images(["shapes_gold"], images_dir, tmp_path / "p.jsonl", tmp_path / "s.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all(r["shapes_gold"] == 1.0 for r in rows)
    (tmp_path / "p.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(DiffalignError, match="no prompt for 1 of 3 images"):
        score_images(["shapes_gold"], images_dir, tmp_path / "p.jsonl", tmp_path / "s.jsonl")
    (tmp_path / "p.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(DiffalignError, match="expected"):
        score_images(["shapes_gold"], images_dir, tmp_path / "p.jsonl", tmp_path / "s.jsonl")


def test_score_images_errors(folder: tuple[Path, list[str], torch.Tensor], tmp_path: Path) -> None:
    images_dir, prompts, _ = folder
    out = tmp_path / "s.jsonl"
    cases: dict[str, tuple[Path, str, str]] = {}
    (tmp_path / "empty.txt").write_text("\n\n")
    cases["empty"] = (images_dir, "empty.txt", "is empty")
    (tmp_path / "two.txt").write_text("a red circle\ntwo blue squares\n")
    cases["count"] = (images_dir, "two.txt", "2 prompts for 3 images")
    (tmp_path / "none").mkdir()
    (tmp_path / "ok.txt").write_text("a red circle\n")
    cases["no images"] = (tmp_path / "none", "ok.txt", "no images")
    cases["no dir"] = (tmp_path / "missing", "ok.txt", "does not exist")
    cases["no prompts file"] = (images_dir, "missing.txt", "prompts file")
    for _, (directory, prompt_file, part) in cases.items():
        with pytest.raises(DiffalignError) as err:
            score_images(["shapes_gold"], directory, tmp_path / prompt_file, out)
        assert part in str(err.value) and "\n" not in str(err.value)
    (images_dir / "zz.png").write_bytes(b"not a png")
    (tmp_path / "four.txt").write_text("a red circle\n" * 4)
    with pytest.raises(DiffalignError, match="cannot read image .*zz.png"):
        score_images(["shapes_gold"], images_dir, tmp_path / "four.txt", out)
    with pytest.raises(DiffalignError, match="unknown reward"):
        score_images(["shapes_goldd"], images_dir, tmp_path / "ok.txt", out)
    with pytest.raises(DiffalignError, match="no rewards"):
        score_images([], images_dir, tmp_path / "ok.txt", out)
    with pytest.raises(DiffalignError, match="unknown device"):
        score_images(["shapes_gold"], images_dir, tmp_path / "ok.txt", out, device="gpu7")


def test_register_score_subcommand(folder: tuple[Path, list[str], torch.Tensor], tmp_path: Path) -> None:
    images_dir, prompts, _ = folder
    parser = argparse.ArgumentParser(prog="diffalign")
    sub = parser.add_subparsers(dest="command", required=True)
    score_parser = register(sub)
    assert "diffalign score --reward" in score_parser.format_help()
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    args = parser.parse_args(
        ["score", "--reward", "jpeg_compressibility", "--reward", "shapes_gold:mode=correct"]
        + ["--images", str(images_dir), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o.csv")]
        + ["--batch-size", "2"]
    )
    assert args.reward == ["jpeg_compressibility", "shapes_gold:mode=correct"] and args.device == "cpu"
    assert args.func(args) == 0
    with (tmp_path / "o.csv").open() as fh:
        assert [float(r["shapes_gold"]) for r in csv.DictReader(fh)] == [1.0, 1.0, 1.0]


def _png_tensor(path: Path) -> torch.Tensor:
    """An image read independently of reward_models.loading: PIL -> [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_weighted_sum_column(folder: tuple[Path, list[str], torch.Tensor], tmp_path: Path) -> None:
    images_dir, prompts, _ = folder
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    spec_list = ["shapes_gold:weight=2", "jpeg_compressibility:weight=-0.5", "shapes_gold:mode=correct"]
    out = score_images(spec_list, images_dir, tmp_path / "p.txt", tmp_path / "w.csv", batch_size=2)
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    columns = ["shapes_gold:weight=2", "jpeg_compressibility", "shapes_gold:mode=correct", "weighted_sum"]
    assert list(rows[0]) == ["file", "prompt", *columns]
    images = torch.stack([_png_tensor(images_dir / name) for name in ("a.png", "b.png", "c.png")])
    gold = get_reward("shapes_gold")(images, prompts)
    jpeg = get_reward("jpeg_compressibility")(images, prompts)
    correct = get_reward("shapes_gold:mode=correct")(images, prompts)
    expected = 2.0 * gold - 0.5 * jpeg + 1.0 * correct  # no weight= on the third: weight 1
    np.testing.assert_allclose([float(r["weighted_sum"]) for r in rows], expected.numpy(), rtol=1e-5)
    assert float(rows[0]["weighted_sum"]) > 3.0  # gold 1, correct 1 and a negative jpeg score times -0.5
    # weight=1 written out still asks for the column; no weight= anywhere: no column
    out = score_images(["jpeg_compressibility:weight=1"], images_dir, tmp_path / "p.txt", tmp_path / "w.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["weighted_sum"] == r["jpeg_compressibility"] for r in rows)
    out = score_images(["jpeg_compressibility"], images_dir, tmp_path / "p.txt", tmp_path / "n.jsonl")
    assert "weighted_sum" not in json.loads(out.read_text().splitlines()[0])
    for bad in ("nan", "1e999"):  # refused by RewardSpec.parse or by the finiteness check
        with pytest.raises(DiffalignError, match="weight must be a number|finite"):
            score_images([f"shapes_gold:weight={bad}"], images_dir, tmp_path / "p.txt", tmp_path / "x.jsonl")


def test_jsonl_prompts_with_extra_keys(folder: tuple[Path, list[str], torch.Tensor], tmp_path: Path) -> None:
    images_dir, prompts, _ = folder
    lines = [
        json.dumps({"file": name, "prompt": p, "seed": seed, "note": None})
        for seed, (name, p) in enumerate(zip(["a.png", "b.png", "c.png"], prompts, strict=True))
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    out = score_images(["shapes_gold"], images_dir, tmp_path / "p.jsonl", tmp_path / "s.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and set(rows[0]) == {"file", "prompt", "shapes_gold"}


def _corrupt_png(source: Path) -> bytes:
    """``source`` with its first IDAT chunk's length set to 0: PIL raises SyntaxError ("broken PNG file")."""
    data = bytearray(source.read_bytes())
    at = data.index(b"IDAT") - 4
    data[at : at + 4] = b"\0\0\0\0"
    return bytes(data)


def test_score_cli_bad_inputs(
    folder: tuple[Path, list[str], torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffalign.cli import main

    images_dir, prompts, _ = folder
    good = tmp_path / "p.txt"
    good.write_text("\n".join(prompts) + "\n")
    a_file = tmp_path / "existing.txt"
    a_file.write_text("keep me")

    def error(prompts_file: Path, out: Path, images: Path = images_dir) -> str:
        args = ["score", "--reward", "shapes_gold", "--images", str(images), "--prompts", str(prompts_file)]
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        line = err.splitlines()[-1]  # above it, at most the scoring progress bar
        assert "Traceback" not in err and line.startswith("diffalign score: error: ")
        return line

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un cercle rouge \xe9t\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in error(latin1, tmp_path / "s.csv")
    assert "is a directory; give a .txt or .jsonl file" in error(images_dir, tmp_path / "s.csv")
    not_object = tmp_path / "list.jsonl"
    not_object.write_text(json.dumps({"file": "a.png", "prompt": prompts[0]}) + "\n" + '["b.png", "x"]\n')
    assert "list.jsonl:2: expected an object" in error(not_object, tmp_path / "s.csv")
    assert "got list" in error(not_object, tmp_path / "s.csv")
    assert "is a directory; give a file path" in error(good, tmp_path)  # --out an existing directory
    assert "is a file, not a directory" in error(good, a_file / "scores.csv")  # fails for root too
    assert a_file.read_text() == "keep me"
    assert not (tmp_path / "s.csv").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (broken / name).write_bytes((images_dir / name).read_bytes())
    (broken / "b.png").write_bytes(_corrupt_png(images_dir / "b.png"))
    err = error(good, tmp_path / "s.csv", broken)
    assert "cannot read image" in err and "b.png" in err and "fix or remove the file" in err
    (broken / "b.png").write_bytes((images_dir / "b.png").read_bytes()[:200])  # truncated
    err = error(good, tmp_path / "s.csv", broken)
    assert "cannot read image" in err and "b.png" in err and "truncated" in err
    assert sorted(p.name for p in broken.iterdir()) == ["a.png", "b.png", "c.png"]
    assert not (tmp_path / "s.csv").exists()
