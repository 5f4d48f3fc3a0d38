"""Bad input gets one line naming the problem and the fix, never a traceback, and nothing is deleted (issue 13).

Every case goes through the command line (``diffalign.cli.main``): exit status 2 and one line
``diffalign CMD: error: ...`` on stderr. Covered: damaged checkpoints on ``train --resume`` (every file
of a checkpoint, corrupt, truncated, empty or missing), damaged metrics.jsonl / eval.jsonl on resume,
a full disk while a checkpoint is written (test hook ``DIFFALIGN_CHECKPOINT_HOOK=enospc:N``), output
paths that are files or lie under a file (train, reno), YAML configs that cannot be read, LoRA files
that are not safetensors (sample, reno), prompt files that are not UTF-8 (reno), and damaged reward
weight files (score).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from rewards_fixtures import make_open_clip_dir
from safetensors.torch import load_file, save_file
from train_fixtures import assert_same_run, tiny_config, write_config

from diffalign.checkpoint import HOOK_ENV
from diffalign.cli import main

STEPS, EVERY = 6, 2


# ------------------------------------------------------------------------------------------- helpers
def fails(argv: list[str], capsys: pytest.CaptureFixture, *parts: str) -> str:
    """Run the CLI, expect exit status 2 and one ``diffalign CMD: error:`` line containing ``parts``."""
    capsys.readouterr()
    assert main(argv) == 2
    printed = capsys.readouterr().err
    assert "Traceback" not in printed, printed
    err = printed.strip().splitlines()[-1]  # after the model loaders' progress bars, if any
    assert err.startswith(f"diffalign {argv[0]}: error: "), printed
    assert printed.count("error:") == 1, printed
    for part in parts:
        assert part in err, err
    return err


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to check that an error path changed nothing)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def train_config(tmp: Path, sd_dir: Path, out: Path) -> Path:
    """A 6-step AlignProp run on the tiny pipeline with checkpoints at steps 2, 4 and 6 (all kept)."""
    extra = {"train": {"steps": STEPS}, "eval": {"every": 3}, "checkpoint": {"every": EVERY, "keep": 3}}
    return write_config(tmp / f"{out.name}.yaml", tiny_config(sd_dir, out, "alignprop", **extra))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, sd_dir: Path) -> tuple[Path, Path]:
    """(config, output directory) of a complete, uninterrupted run: the reference and a source of checkpoints."""
    tmp = tmp_path_factory.mktemp("bad_inputs_run")
    out = tmp / "ref"
    cfg = train_config(tmp, sd_dir, out)
    assert main(["train", "--config", str(cfg)]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]
    return cfg, out


def copy_run(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    cfg, ref = finished
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    return cfg, run


# ------------------------------------------------------------------------------- damaged checkpoints
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "state.pt truncated": ("state.pt", _truncate, "corrupt or truncated"),
    "state.pt garbage": ("state.pt", lambda p: p.write_bytes(b"not a torch file " * 50), "corrupt or truncated"),
    "state.pt missing": ("state.pt", lambda p: p.unlink(), "is missing"),
    "lora.safetensors truncated": ("lora.safetensors", _truncate, "corrupt or truncated"),
    "rng_0.pt empty": ("rng_0.pt", lambda p: p.write_bytes(b""), "is empty"),
    "rng_0.pt wrong content": ("rng_0.pt", lambda p: torch.save({"a": torch.zeros(2)}, p), "not a diffalign RNG"),
    "meta.json invalid": ("meta.json", lambda p: p.write_text('{"step": 6, "num_'), "corrupt or truncated"),
    "meta.json not UTF-8": ("meta.json", lambda p: p.write_bytes(b"\xff\xfe{}"), "corrupt or truncated"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_from_a_damaged_checkpoint(
    finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    cfg, run = copy_run(finished, tmp_path)
    name, damage, why = DAMAGE[case]
    damage(run / "checkpoints" / "step_6" / name)
    before = tree(run)
    err = fails(
        ["train", "--config", str(cfg), "--output-dir", str(run), "--resume", "latest"],
        capsys,
        str(run / "checkpoints" / "step_6" / name),
        why,
        f"--resume {run / 'checkpoints' / 'step_4'}",
        "available: step_2, step_4",
        f"delete the damaged {run / 'checkpoints' / 'step_6'}",
    )
    assert tree(run) == before, err  # nothing removed, nothing truncated, the damaged file left for inspection


def test_the_suggested_older_checkpoint_resumes_exactly(
    finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg, run = copy_run(finished, tmp_path)
    _truncate(run / "checkpoints" / "step_6" / "state.pt")
    argv = ["train", "--config", str(cfg), "--output-dir", str(run)]
    fails([*argv, "--resume", "latest"], capsys, "--resume")
    assert main([*argv, "--resume", str(run / "checkpoints" / "step_4")]) == 0
    assert_same_run(finished[1], run)


def test_damaged_checkpoint_without_an_older_one(
    finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg, run = copy_run(finished, tmp_path)
    for step in (4, 6):
        shutil.rmtree(run / "checkpoints" / f"step_{step}")
    _truncate(run / "checkpoints" / "step_2" / "lora.safetensors")
    fails(
        ["train", "--config", str(cfg), "--output-dir", str(run), "--resume", "latest"],
        capsys,
        "lora.safetensors is corrupt or truncated",
        "there is no older checkpoint",
    )
    assert (run / "checkpoints" / "step_2" / "meta.json").is_file()


def _cut_line_2(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"
    path.write_text("".join(lines))


JSONL_DAMAGE = {
    "metrics.jsonl line cut": ("metrics.jsonl", _cut_line_2, "metrics.jsonl line 2 is not a complete JSON record"),
    "metrics.jsonl short": ("metrics.jsonl", lambda p: p.write_text('{"step": 1}\n'), "has 1 lines but the checkpoint"),
    "eval.jsonl not UTF-8": ("eval.jsonl", lambda p: p.write_bytes(b"\xff\xfe\x00garbage\n"), "is not UTF-8 text"),
    "eval.jsonl a directory": ("eval.jsonl", lambda p: (p.unlink(), p.mkdir()), "is a directory"),
}


@pytest.mark.parametrize("case", list(JSONL_DAMAGE))
def test_resume_with_damaged_jsonl(
    finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    cfg, run = copy_run(finished, tmp_path)
    with (run / "metrics.jsonl").open("a") as fh:  # a line beyond the checkpoint: a resume would cut it
        fh.write('{"step": 7}\n')
    name, damage, part = JSONL_DAMAGE[case]
    damage(run / name)
    before = tree(run)
    fails(["train", "--config", str(cfg), "--output-dir", str(run), "--resume", "latest"], capsys, part, name)
    assert tree(run) == before  # neither file was cut: both are checked before either changes


# ---------------------------------------------------------------------------------------- disk full
def test_disk_full_while_writing_a_checkpoint(
    finished: tuple[Path, Path],
    sd_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "full"
    cfg = train_config(tmp_path, sd_dir, run)
    monkeypatch.setenv(HOOK_ENV, "enospc:4")
    fails(
        ["train", "--config", str(cfg)],
        capsys,
        "could not write checkpoint step_4",
        "No space left on device",
        "the checkpoint was not written",
        f"the previous checkpoint {run / 'checkpoints' / 'step_2'} is intact",
        "free disk space",
        "--resume latest",
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]  # half-written temp dir removed
    saved = tree(run / "checkpoints" / "step_2")
    assert load_file(run / "checkpoints" / "step_2" / "lora.safetensors")  # still readable
    monkeypatch.delenv(HOOK_ENV)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--resume", "latest"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_same_run(finished[1], run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]
    assert tree(run / "checkpoints" / "step_2") == saved


def test_disk_full_on_the_first_checkpoint(
    sd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "full"
    extra = {"train": {"steps": 2}, "eval": {"every": 0}, "checkpoint": {"every": 2}}
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(sd_dir, run, **extra))
    monkeypatch.setenv(HOOK_ENV, "enospc:2")
    fails(
        ["train", "--config", str(cfg)],
        capsys,
        "could not write checkpoint step_2",
        "there is no earlier checkpoint",
        "free disk space",
    )
    assert list((run / "checkpoints").iterdir()) == []


# ------------------------------------------------------------------------------------- output paths
def test_train_output_dir_that_is_a_file_or_under_one(sd_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(sd_dir, tmp_path / "unused"))
    user_file = tmp_path / "notes.txt"
    user_file.write_text("my notes\n")
    argv = ["train", "--config", str(cfg), "--output-dir"]
    fails([*argv, str(user_file)], capsys, f"output directory {user_file} is a file", "--output-dir")
    fails([*argv, str(user_file / "run")], capsys, f"{user_file} is a file, not a directory", "--output-dir")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("")
    fails([*argv, str(run)], capsys, f"{run / 'checkpoints'} is a file")
    assert user_file.read_text() == "my notes\n"  # not overwritten


def test_config_files_that_cannot_be_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = {
        "missing.yaml": (None, "does not exist"),
        "binary.yaml": (b"model:\n  pretrained: \xff\xfe\n", "is not UTF-8 text"),
        "broken.yaml": (b"model: [1, 2\ntrain: {\n", "invalid YAML"),
        "list.yaml": (b"- model\n- train\n", "must hold a mapping of sections"),
    }
    for name, (content, part) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        fails(["train", "--config", str(tmp_path / name)], capsys, part, "configs/shapes/*.yaml")
    fails(["train", "--config", str(tmp_path)], capsys, "is a directory")


# ------------------------------------------------------------------------------------------ LoRA files
@pytest.fixture()
def bad_loras(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """LoRA directories that cannot be loaded, with the words their error must contain."""
    out = {}
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "pytorch_lora_weights.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors" * 10)
    out["not safetensors"] = (garbage, "is not a readable safetensors file")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 8)}, str(truncated / "pytorch_lora_weights.safetensors"))
    _truncate(truncated / "pytorch_lora_weights.safetensors")
    out["truncated"] = (truncated, "corrupt, truncated")
    empty = tmp_path / "empty"
    empty.mkdir()
    out["no weights file"] = (empty, "no LoRA weights")
    no_lora = tmp_path / "no_lora"
    no_lora.mkdir()
    save_file({"weight": torch.zeros(2)}, str(no_lora / "pytorch_lora_weights.safetensors"))
    out["no LoRA matrices"] = (no_lora, "holds no LoRA matrices")
    return out


def test_sample_with_a_damaged_lora(sd_dir: Path, tmp_path: Path, bad_loras, capsys) -> None:
    for lora, part in bad_loras.values():
        argv = ["sample", "--model", str(sd_dir), "--prompt", "a red circle", "--n", "1", "--steps", "1"]
        fails([*argv, "--lora", str(lora), "--out", str(tmp_path / "s")], capsys, part, str(lora))


def test_reno_bad_inputs(sd_dir: Path, tmp_path: Path, bad_loras, capsys: pytest.CaptureFixture) -> None:
    base = ["reno", "--model", str(sd_dir), "--reward", "train_fixtures:Brightness", "--iters", "1"]
    user_file = tmp_path / "results.txt"
    user_file.write_text("keep me\n")
    fails([*base, "--prompt", "a red circle", "--out", str(user_file)], capsys, "is an existing file", "--out")
    fails([*base, "--prompt", "a red circle", "--out", str(user_file / "o")], capsys, "is a file, not a directory")
    assert user_file.read_text() == "keep me\n"
    out = tmp_path / "out"
    out.mkdir()
    (out / "000_a-red-circle").write_text("")
    fails([*base, "--prompt", "a red circle", "--out", str(out)], capsys, "000_a-red-circle is a file")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe two blue squares \x80\n")
    fails([*base, "--prompts", str(prompts), "--out", str(tmp_path / "o")], capsys, "not UTF-8")
    lora, part = bad_loras["not safetensors"]
    fails([*base, "--prompt", "a red circle", "--lora", str(lora), "--out", str(tmp_path / "o")], capsys, part)
    assert not (tmp_path / "o").exists()  # every check ran before anything was written


# ---------------------------------------------------------------------------------- reward weight files
def test_score_with_damaged_reward_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "00000_a-red-circle.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    clip = make_open_clip_dir(tmp_path / "clip")
    head = tmp_path / "head.safetensors"
    save_file({"layers.0.weight": torch.zeros(1, 32), "layers.0.bias": torch.zeros(1)}, str(head))
    _truncate(head)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    config_list = make_open_clip_dir(tmp_path / "clip_cfg_list", with_weights=False)
    (config_list / "open_clip_config.json").write_text('{"model_cfg": [1], "preprocess_cfg": {}}')
    shutil.copy(clip / "open_clip_model.safetensors", config_list)
    garbage_cfg = tmp_path / "clip_garbage"
    shutil.copytree(clip, garbage_cfg)
    (garbage_cfg / "open_clip_config.json").write_text("{not json")
    truncated = tmp_path / "clip_truncated"
    shutil.copytree(clip, truncated)
    _truncate(truncated / "open_clip_model.safetensors")
    cases = [
        (f"aesthetic:clip_model=local-dir:{clip},head={head}", ["head.safetensors", "corrupt, truncated"]),
        (f"aesthetic:clip_model=local-dir:{clip},head={empty}", ["empty.pth", "is empty"]),
        (f"clip_score:model=local-dir:{garbage_cfg}", ["clip_garbage", "Could not load valid config"]),
        (f"clip_score:model=local-dir:{config_list}", ["clip_cfg_list", "TypeError"]),
        (f"clip_score:model=local-dir:{truncated}", ["clip_truncated", "file not fully covered"]),
    ]
    for spec, parts in cases:
        argv = ["score", "--reward", spec, "--images", str(images), "--prompts", str(prompts)]
        err = fails([*argv, "--out", str(tmp_path / "scores.csv")], capsys, *parts)
        assert "Hub is unreachable" not in err, err  # a local file: no download advice
