"""Paths work from any working directory: local paths, config-relative paths, the shipped assets (issue 13)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from diffalign.config import DiffalignConfig, resolve_config_paths
from diffalign.errors import DiffalignError
from diffalign.paths import (
    check_output_path,
    looks_like_path,
    missing_path_message,
    resolve_local,
    shipped_asset,
    shipped_assets_dir,
)
from diffalign.pipelines import _is_hub_id, load_pipeline, pipeline_class_name
from diffalign.prompts import load_prompts

REPO = Path(__file__).resolve().parent.parent
SHIPPED_SD = REPO / "assets" / "shapes-sd"
SHIPPED_CLIP = REPO / "assets" / "shapes-clip"


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------- diffalign.paths
def test_shipped_assets_in_the_checkout():
    assert shipped_assets_dir() == REPO / "assets"
    assert shipped_asset("assets/shapes-sd") == SHIPPED_SD
    assert shipped_asset("./assets/shapes-clip/open_clip_config.json") == SHIPPED_CLIP / "open_clip_config.json"
    for not_an_asset in ("assets/nope", "assets/../README.md", "/assets/shapes-sd", "assets", "shapes-sd"):
        assert shipped_asset(not_an_asset) is None


def test_resolve_local_order(tmp_path, monkeypatch):
    """As given (relative to CWD, kept relative), then relative to base (absolute), then the shipped copy."""
    work, conf = tmp_path / "work", tmp_path / "conf"
    (work / "assets" / "shapes-sd").mkdir(parents=True)
    (conf / "pipe").mkdir(parents=True)
    (conf / "p.txt").write_text("a\n")
    monkeypatch.chdir(work)
    assert resolve_local("assets/shapes-sd") == Path("assets/shapes-sd")  # a local folder wins over the shipped one
    assert resolve_local("pipe") is None
    assert resolve_local("pipe", base=conf) == conf / "pipe"
    assert resolve_local("p.txt", base=Path("../conf")) == conf / "p.txt"  # made absolute, normalized
    assert resolve_local("assets/shapes-clip", base=conf) == SHIPPED_CLIP
    assert resolve_local(str(conf / "pipe")) == conf / "pipe"
    assert resolve_local(conf / "missing", base=conf) is None
    monkeypatch.chdir(tmp_path)
    assert resolve_local("assets/shapes-sd") == SHIPPED_SD


@pytest.mark.parametrize(
    ("value", "is_path"),
    [
        ("stabilityai/sd-turbo", False),
        ("gpt2", False),
        ("assets/shapes-sd", True),
        ("assets/anything", True),
        ("./pipe", True),
        ("../pipe", True),
        ("/models/pipe", True),
        ("~/pipe", True),
        ("models/sd/v1", True),
        ("weights.safetensors", True),
        ("C:\\models\\x", True),
        ("localdir/pipe", True),  # its first component is a local directory
    ],
)
def test_looks_like_path(value, is_path, tmp_path, monkeypatch):
    (tmp_path / "localdir").mkdir()
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(value) is is_path
    assert _is_hub_id(value) is (not is_path and "/" in value)


def test_looks_like_path_with_base(tmp_path, monkeypatch):
    (tmp_path / "conf" / "models").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("models/x")
    assert looks_like_path("models/x", base=tmp_path / "conf")


def test_missing_path_message(tmp_path, monkeypatch):
    (tmp_path / "models" / "pipe2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert missing_path_message("models/pipe3") == (
        f"no directory 'models/pipe3' under {tmp_path} (did you mean 'models/pipe2'?); relative paths are "
        "looked up under the working directory: cd there or give an absolute path"
    )
    msg = missing_path_message("assets/shapes-xl", "pipeline directory", base=tmp_path / "conf", hint="do X")
    assert msg == (
        f"no pipeline directory 'assets/shapes-xl' under {tmp_path}, nor under {tmp_path / 'conf'} (the config "
        "file's directory), nor among the shipped assets (assets/shapes-clip, assets/shapes-ensemble, assets/shapes-flow, assets/shapes-sd); do X"
    )
    assert missing_path_message(str(tmp_path / "modles" / "pipe2")) == (
        f"no directory '{tmp_path / 'modles' / 'pipe2'}' (did you mean '{tmp_path / 'models' / 'pipe2'}'?); check the path"
    )


# ---------------------------------------------------------------------------------------- pipelines
def test_missing_relative_pipeline_from_another_cwd(tmp_path, monkeypatch):
    """Owner/name-shaped relative paths that do not exist say so, naming the working directory; the Hub is not asked."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    hint = "pass an existing directory with model_index.json (absolute, or relative to the working directory) or a hub id of the form owner/name"
    with pytest.raises(DiffalignError) as err:
        load_pipeline("models/shapes-sd")
    assert one_line(err) == (
        f"no pipeline directory at models/shapes-sd: no directory 'models/shapes-sd' under {tmp_path}; {hint}"
    )
    with pytest.raises(DiffalignError) as err:
        pipeline_class_name("assets/shapes-xl")
    assert one_line(err) == (
        f"no pipeline directory at assets/shapes-xl: no directory 'assets/shapes-xl' under {tmp_path}, nor among "
        f"the shipped assets (assets/shapes-clip, assets/shapes-ensemble, assets/shapes-flow, assets/shapes-sd); {hint}"
    )
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(DiffalignError, match="file.bin is a file, not a diffusers pipeline directory"):
        pipeline_class_name("file.bin")


def test_cli_sample_missing_model_from_another_cwd(tmp_path, monkeypatch, capsys):
    from diffalign.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", "assets/shapes-xl", "--prompt", "a red circle", "--out", "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"no directory 'assets/shapes-xl' under {tmp_path}" in err
    assert "\n" not in err and "Hugging Face" not in err


def test_hub_id_failure_names_both(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiffalignError) as err:
        pipeline_class_name("someone/not-here")
    text = one_line(err)
    assert text.startswith(
        "could not load pipeline 'someone/not-here' from the Hugging Face Hub (the Hub is switched off"
    )
    assert "HF_HUB_OFFLINE=1" in text
    assert f"there is no local directory 'someone/not-here' under {tmp_path}" in text


def test_shipped_pipeline_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pipeline_class_name("assets/shapes-sd") == "StableDiffusionPipeline"
    pipe = load_pipeline("assets/shapes-sd")
    assert Path(pipe.config._name_or_path) == SHIPPED_SD


# ------------------------------------------------------------------------------------------ prompts
def test_load_prompts_paths(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "p.txt").write_text("a red circle\n\ntwo blue squares\n")
    monkeypatch.chdir(tmp_path)
    assert load_prompts("p.txt", base=tmp_path / "conf") == ["a red circle", "two blue squares"]
    assert load_prompts("file:conf/p.txt") == ["a red circle", "two blue squares"]
    with pytest.raises(DiffalignError) as err:
        load_prompts("p.txt", "prompts.train")
    assert one_line(err).startswith(f"prompts.train: prompt file 'p.txt' does not exist under {tmp_path};")
    with pytest.raises(DiffalignError, match="prompt file .*conf' is a directory"):
        load_prompts("conf")


# ------------------------------------------------------------------------------------------- config
def write_config(directory: Path, data: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_config_paths_resolve_relative_to_the_config_file(tmp_path, monkeypatch):
    sub, other = tmp_path / "sub", tmp_path / "other"
    (sub / "pipe").mkdir(parents=True)
    (sub / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (sub / "train.txt").write_text("a red circle\ntwo blue squares\n")
    (sub / "eval.txt").write_text("one green triangle\n")
    (sub / "clip").mkdir()
    other.mkdir()
    data = {
        "model": {"pretrained": "pipe"},
        "prompts": {"train": "train.txt", "eval": "file:eval.txt"},
        "reward": {"rewards": ["shapes_clip:model=local-dir:clip,scale=2", "clip_score:scale=3"]},
        "eval": {"rewards": ["shapes_clip:model=local-dir:assets/shapes-clip", "clip_score:pretrained=openai"]},
    }
    config = write_config(sub, data)
    monkeypatch.chdir(other)
    cfg = DiffalignConfig.from_yaml(Path("..") / "sub" / "run.yaml")
    assert cfg.model.pretrained == str(sub / "pipe")
    assert cfg.prompts.train == str(sub / "train.txt") and cfg.prompts.eval == f"file:{sub / 'eval.txt'}"
    assert cfg.reward.rewards == [f"shapes_clip:model=local-dir:{sub / 'clip'},scale=2", "clip_score:scale=3"]
    assert cfg.eval.rewards == [f"shapes_clip:model=local-dir:{SHIPPED_CLIP}", "clip_score:pretrained=openai"]

    # the run's config.yaml records the resolved paths and loads again from anywhere
    saved = cfg.save_yaml(tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(saved.read_text())["prompts"]["train"] == str(sub / "train.txt")
    monkeypatch.chdir(tmp_path)
    assert DiffalignConfig.from_yaml(saved) == cfg

    # found relative to the working directory: kept as written (still relative)
    monkeypatch.chdir(sub)
    cfg = DiffalignConfig.from_yaml(config)
    assert cfg.model.pretrained == "pipe" and cfg.prompts.train == "train.txt" and cfg.prompts.eval == "file:eval.txt"
    assert cfg.reward.rewards[0] == "shapes_clip:model=local-dir:clip,scale=2"


def test_config_shipped_assets_and_hub_ids(tmp_path, monkeypatch):
    config = write_config(tmp_path / "sub", {"model": {"pretrained": "assets/shapes-sd"}})
    monkeypatch.chdir(tmp_path)
    assert DiffalignConfig.from_yaml(config).model.pretrained == str(SHIPPED_SD)
    config = write_config(tmp_path / "sub", {"model": {"pretrained": "stabilityai/sd-turbo"}})
    assert DiffalignConfig.from_yaml(config).model.pretrained == "stabilityai/sd-turbo"  # a hub id: untouched
    missing = str(tmp_path / "no-such-model")
    config = write_config(tmp_path / "sub", {"model": {"pretrained": missing}})
    assert DiffalignConfig.from_yaml(config).model.pretrained == missing  # absolute: left to load_pipeline
    # the shipped configs load from another working directory, pointing at the shipped pipeline
    cfg = DiffalignConfig.from_yaml(REPO / "configs" / "shapes" / "alignprop.yaml")
    assert cfg.model.pretrained == str(SHIPPED_SD)


def test_config_missing_paths_name_both_directories(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    monkeypatch.chdir(tmp_path)
    config = write_config(sub, {"model": {"pretrained": "./pipe"}})
    with pytest.raises(DiffalignError) as err:
        DiffalignConfig.from_yaml(config)
    assert one_line(err).startswith(
        f"model.pretrained: no pipeline directory './pipe' under {tmp_path}, nor under {sub} (the config file's directory); "
    )
    config = write_config(sub, {"prompts": {"train": "missing.txt"}})
    with pytest.raises(DiffalignError) as err:
        DiffalignConfig.from_yaml(config)
    assert one_line(err) == (
        f"prompts.train: no prompt file 'missing.txt' under {tmp_path}, nor under {sub} (the config file's "
        "directory); give a text file (one prompt per line), shapes:train, shapes:heldout or a list"
    )
    # an override replaces the value before it is looked up; overrides are relative to the working directory
    assert DiffalignConfig.from_yaml(config, ["prompts.train=shapes:train"]).prompts.train == "shapes:train"
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert DiffalignConfig.from_yaml(config, ["prompts.train=p.txt"]).prompts.train == "p.txt"


def test_resolve_config_paths_leaves_other_values(tmp_path):
    data = {"model": {"pretrained": 5}, "prompts": {"train": ["a"], "eval": "shapes:heldout"}, "reward": "x"}
    assert resolve_config_paths(data, tmp_path) == data
    assert resolve_config_paths(None, tmp_path) is None


# ------------------------------------------------------------------------------------- reward paths
def test_reward_local_paths_from_another_cwd(tmp_path, monkeypatch):
    from reward_models.loading import local_or_hub, resolve_file

    monkeypatch.chdir(tmp_path)
    assert local_or_hub("assets/shapes-clip", "model", "LAYOUT") == str(SHIPPED_CLIP)
    f = resolve_file("assets/shapes-clip/open_clip_config.json", "config", "LAYOUT")
    assert f == SHIPPED_CLIP / "open_clip_config.json"
    with pytest.raises(DiffalignError) as err:
        local_or_hub("./pickscore", "PickScore model", "LAYOUT")
    assert f"does not exist; expected LAYOUT (a relative path is looked up under the working directory {tmp_path}" in (
        one_line(err)
    )


# ---------------------------------------------------------------------------------------- packaging
def test_pyproject_lists_every_package():
    """The package list in pyproject.toml is written by hand (one entry is mapped): it must not miss one."""
    import setuptools

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(setuptools.find_packages(str(REPO), include=["diffalign", "diffalign.*", "reward_models*"]))
    assert set(setup["packages"]) == found | {"diffalign._assets"}
    assert setup["package-dir"] == {"diffalign._assets": "assets"}


_CHECK_INSTALLED = """
import json, sys
from pathlib import Path
import diffalign, reward_models
target = Path(sys.argv[1]).resolve()
from diffalign.config import DiffalignConfig
from diffalign.paths import resolve_local, shipped_assets_dir
from diffalign.pipelines import load_pipeline
from reward_models.loading import local_or_hub
cfg = DiffalignConfig.from_yaml("cfg/run.yaml")
pipe = load_pipeline("assets/shapes-sd")
print(json.dumps({
    "files": [diffalign.__file__, reward_models.__file__],
    "path": sys.path,
    "assets": str(shipped_assets_dir()),
    "sd": str(resolve_local("assets/shapes-sd")),
    "clip": local_or_hub("assets/shapes-clip", "model", "LAYOUT"),
    "pretrained": cfg.model.pretrained,
    "rewards": cfg.reward.rewards,
    "loaded": pipe.config._name_or_path,
    "unet": type(pipe.unet).__name__,
}))
"""


def test_non_editable_install_finds_the_shipped_assets(tmp_path):
    """Build the wheel for real, install it into a folder and run it from another directory, without the checkout."""
    src, target, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("diffalign", "reward_models", "assets"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for file in [REPO / "pyproject.toml", REPO / "README.md", *REPO.glob("LICENSE*")]:
        shutil.copy2(file, src / file.name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the PEP 517 build pip runs (setuptools' backend, no isolation: the venv's setuptools), then the
    # wheel unpacked as `pip install --target` would; a few seconds faster than going through pip
    build = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")], env=env, cwd=src, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "dist" / done.stdout.strip().splitlines()[-1]) as wheel:
        wheel.extractall(target)
    assert (target / "diffalign" / "_assets" / "shapes-sd" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (target / "diffalign" / "_assets" / "shapes-clip" / "open_clip_model.safetensors").is_file()

    write_config(
        work / "cfg",
        {
            "model": {"pretrained": "assets/shapes-sd"},
            "reward": {"rewards": ["shapes_clip:model=local-dir:assets/shapes-clip"]},
        },
    )
    env["PYTHONPATH"] = str(target)
    done = subprocess.run(
        [sys.executable, "-c", _CHECK_INSTALLED, str(target)], env=env, cwd=work, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    shipped = target.resolve() / "diffalign" / "_assets"
    assert all(Path(f).resolve().is_relative_to(target.resolve()) for f in out["files"]), out["files"]
    assert str(REPO) not in out["path"] and "" not in out["path"][1:]  # the checkout is not importable there
    assert out["assets"] == str(shipped)
    assert out["sd"] == str(shipped / "shapes-sd") == out["loaded"] == out["pretrained"]
    assert out["clip"] == str(shipped / "shapes-clip")
    assert out["rewards"] == [f"shapes_clip:model=local-dir:{shipped / 'shapes-clip'}"]
    assert out["unet"] == "UNet2DConditionModel"


def test_check_output_path_wording_and_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One set of checks behind every output option: the caller's noun, advice and wording; nothing created."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "logs").write_text("x")
    (tmp_path / "run" / "metrics.jsonl").mkdir()

    def error(out: str, **kw) -> str:
        with pytest.raises(DiffalignError) as err:
            check_output_path(out, "--out", "choose another --out", **kw)
        return str(err.value)

    assert error("file") == "--out file is a file, not a directory; choose another --out"
    assert error("file/a/b") == "cannot create --out file/a/b: file is a file, not a directory; choose another --out"
    messages = {"entry_not_dir": "{entry} in the way", "entry_not_file": "{entry!r} is a folder"}
    entries = {"logs": "dir", "metrics.jsonl": "file"}
    assert error("run", entries=entries, messages=messages) == "run/logs in the way"  # in the order given
    entries = {"metrics.jsonl": "file", "logs": "dir"}
    assert error("run", entries=entries, messages=messages) == "'run/metrics.jsonl' is a folder"
    is_dir = {"wrong_kind": "{what} {out!r} is a directory"}  # a file output: a directory is in the way
    assert error("run", kind="file", messages=is_dir) == "--out 'run' is a directory"
    shown = error("file/x.csv", kind="file", absolute=True, messages={"parent_file": "{existing}"})
    assert shown == str(tmp_path / "file")  # the nearest existing parent, made absolute
    assert check_output_path("new/deep", "--out") == Path("new/deep") and not Path("new").exists()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert error("new/deep") == "cannot write --out new/deep: . is not writable by this user; choose another --out"
