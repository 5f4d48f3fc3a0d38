"""Method-owned state: a plug-in method's own module (a linear discriminator), its Adam optimizer and a
running normalizer survive a SIGKILL inside a checkpoint save and resume bit for bit, like the LoRA;
damaged module files are one-line errors; gradients of owned modules are averaged over processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_fixtures import (
    assert_same_run,
    kill_inside_checkpoint_save,
    launch_two_processes,
    records,
    registry_cleaner,
    resume_latest,
    run_train,
    tiny_config,
    write_config,
)

from diffalign.checkpoint import MODULES_FILE, load_module_tensors, module_tensors
from diffalign.cli import main
from diffalign.errors import DiffalignError

PLUGIN = "toy_state_method"
# the plug-in registers when a run in this process imports it; each test leaves the registry as it was
clean_registry = registry_cleaner(PLUGIN)


def _config(tmp_path: Path, sd_dir: Path, out: Path, **sections: dict[str, Any]) -> Path:
    extra: dict[str, Any] = {"train": {"steps": 6}, "eval": {"every": 3}, "checkpoint": {"every": 2, "keep": 3}}
    extra |= sections
    cfg = tiny_config(sd_dir, out, "toy_state", **extra)
    cfg["plugins"] = [PLUGIN]
    return write_config(tmp_path / f"{out.name}.yaml", cfg)


def _same(a: Any, b: Any) -> bool:
    """Equal bit for bit: nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, sd_dir: Path) -> Path:
    """An uninterrupted 6-step run of the toy method (in a subprocess, like the killed one)."""
    tmp = tmp_path_factory.mktemp("method_state_ref")
    out = tmp / "ref"
    proc = run_train(_config(tmp, sd_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the method's modules:" in proc.stdout and "(disc)" in proc.stdout
    return out


def test_owned_state_is_saved(reference: Path) -> None:
    ckpt = reference / "checkpoints" / "step_6"
    modules = load_file(ckpt / MODULES_FILE)
    assert set(modules) == {"disc.weight", "disc.bias"} and modules["disc.weight"].dtype == torch.float32
    final = load_file(reference / MODULES_FILE)  # the run's end exports the same values
    assert _same(final, modules)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    adam = state["method_optimizers"]["disc"]
    assert set(adam["state"]) == {0, 1} and int(adam["state"][0]["step"]) == 6  # one Adam step per training step
    assert state["method"]["normalizer"]["count"] == 12  # 6 steps x 2 samples
    assert state["data"] is None
    metrics = records(reference / "metrics.jsonl")
    assert [m["norm_count"] for m in metrics] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert len({m["disc_w0"] for m in metrics}) == 6  # the discriminator trains every step
    early = load_file(reference / "checkpoints" / "step_2" / MODULES_FILE)
    assert not torch.equal(early["disc.weight"], modules["disc.weight"])


def test_kill_inside_checkpoint_save_then_resume_is_exact(reference: Path, tmp_path: Path, sd_dir: Path) -> None:
    run = tmp_path / "killed"
    cfg = _config(tmp_path, sd_dir, run)
    kill_inside_checkpoint_save(cfg, 4)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".tmp-step_4", "step_2"]
    resume_latest(cfg, 2)

    assert_same_run(reference, run)  # metrics, evaluations, exported LoRA
    for step in (4, 6):
        ours, theirs = run / "checkpoints" / f"step_{step}", reference / "checkpoints" / f"step_{step}"
        assert _same(load_file(ours / MODULES_FILE), load_file(theirs / MODULES_FILE))
        assert _same(load_file(ours / "lora.safetensors"), load_file(theirs / "lora.safetensors"))
        a = torch.load(ours / "state.pt", weights_only=True)
        b = torch.load(theirs / "state.pt", weights_only=True)
        assert _same(a["method_optimizers"], b["method_optimizers"])  # Adam moments and step, bit for bit
        assert _same(a["method"], b["method"]) and _same(a["optimizer"], b["optimizer"])
    assert _same(load_file(run / MODULES_FILE), load_file(reference / MODULES_FILE))


def _fails(argv: list[str], capsys: pytest.CaptureFixture, *parts: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    printed = capsys.readouterr().err
    assert "Traceback" not in printed, printed
    err = printed.strip().splitlines()[-1]
    assert err.startswith("diffalign train: error: ") and printed.count("error:") == 1, printed
    for part in parts:
        assert part in err, err
    return err


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated": (_truncate, "corrupt or truncated"),
    "missing": (lambda p: p.unlink(), "is missing"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "garbage": (lambda p: p.write_bytes(b"not safetensors" * 20), "corrupt or truncated"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_module_file_is_one_line(
    reference: Path, tmp_path: Path, sd_dir: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cfg = _config(tmp_path, sd_dir, run)
    damage, why = DAMAGE[case]
    damage(run / "checkpoints" / "step_6" / MODULES_FILE)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    _fails(
        ["train", "--config", str(cfg), "--resume", "latest"],
        capsys,
        str(run / "checkpoints" / "step_6" / MODULES_FILE),
        why,
        f"--resume {run / 'checkpoints' / 'step_4'}",
        "available: step_2, step_4",
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing removed


def test_module_file_of_another_method_is_one_line(
    reference: Path, tmp_path: Path, sd_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cfg = _config(tmp_path, sd_dir, run)
    file = run / "checkpoints" / "step_6" / MODULES_FILE
    save_file({"disc.weight": torch.zeros(1, 4), "disc.bias": torch.zeros(1)}, file)
    _fails(["train", "--config", str(cfg), "--resume", "latest"], capsys, str(file), "disc.weight", "(1, 3)")
    save_file({"critic.weight": torch.zeros(1, 3)}, file)
    _fails(["train", "--config", str(cfg), "--resume", "latest"], capsys, str(file), "'critic.weight'")
    state_file = run / "checkpoints" / "step_4" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["method_optimizers"] = {}
    torch.save(state, state_file)
    err = _fails(
        ["train", "--config", str(cfg), "--resume", str(run / "checkpoints" / "step_4")],
        capsys,
        str(state_file),
        "no state of the method's optimizer 'disc'",
    )
    assert "older checkpoint" in err


def test_module_tensors_round_trip_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mods = {"disc": torch.nn.Linear(3, 2), "norm": torch.nn.BatchNorm1d(2)}
    mods["norm"].running_mean += torch.rand(2)
    tensors = module_tensors(mods)
    assert set(tensors) == {
        "disc.weight",
        "disc.bias",
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }
    tensors["disc.weight"] += 1  # copies, never views of the live tensors
    assert not torch.equal(tensors["disc.weight"], mods["disc"].weight)
    save_file(module_tensors(mods), tmp_path / "m.safetensors")
    other = {"disc": torch.nn.Linear(3, 2), "norm": torch.nn.BatchNorm1d(2)}
    load_module_tensors(other, load_file(tmp_path / "m.safetensors"), tmp_path / "m.safetensors")
    assert all(
        torch.equal(a, b) for a, b in zip(module_tensors(mods).values(), module_tensors(other).values(), strict=True)
    )
    with pytest.raises(DiffalignError, match="does not hold the module 'norm'"):
        load_module_tensors(other, {k: v for k, v in tensors.items() if k != "norm.running_var"}, tmp_path / "x")


def test_owned_gradients_are_averaged_over_two_processes(tmp_path: Path, sd_dir: Path) -> None:
    """Two gloo processes: each sees other images, yet their discriminators stay equal step by step."""
    pytest.importorskip("accelerate")
    out, rec = tmp_path / "run", tmp_path / "rec"
    rec.mkdir()
    cfg = _config(
        tmp_path,
        sd_dir,
        out,
        train={"steps": 2},
        eval={"every": 0},
        checkpoint={"every": 0, "keep": 1},
        toy_state={"record_dir": str(rec)},
    )
    proc = launch_two_processes(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in rec.iterdir()}
    assert sorted(weights) == ["0", "1"] and len(weights["0"]) == 2
    assert weights["0"] == weights["1"]  # equal initialization and averaged gradients: equal updates
    assert weights["0"][0] != weights["0"][1]
    final = load_file(out / MODULES_FILE)
    assert final["disc.weight"].double().reshape(-1).tolist() == weights["0"][-1][0]
