"""The method registry: a plug-in method trained end to end, registry errors, docs and CLI derived from it."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_fixtures import registry_cleaner, tiny_config, write_config

from diffalign.cli import main
from diffalign.config import DiffalignConfig
from diffalign.errors import DiffalignError
from diffalign.methods import MethodEntry, register_method, registered_methods
from diffalign.methods.registry import get_method, method_sections, plugins_from_env

REPO = Path(__file__).resolve().parent.parent
BASE = {"reward": {"rewards": ["train_fixtures:Brightness"]}}


# each test leaves the registry as it found it (plug-ins registered here would leak into other tests)
clean_registry = registry_cleaner("toy_method")


@pytest.fixture
def toy():
    """The toy plug-in imported (so registered) for one test."""
    return importlib.import_module("toy_method")


def load(tmp_path, data=None, overrides=(), plugins=None):
    path = write_config(tmp_path / "c.yaml", BASE if data is None else data)
    return DiffalignConfig.from_yaml(path, list(overrides), plugins=plugins)


def one_line_error(tmp_path, data=None, overrides=()) -> str:
    with pytest.raises(DiffalignError) as err:
        load(tmp_path, data, overrides)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_plugin_method_trains_end_to_end(tmp_path, sd_dir, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(sd_dir, out, "toy", toy={"scale": 2.5}, train={"steps": 2}, eval={"every": 0})
    cfg["plugins"] = ["toy_method"]  # last in the file: plug-ins are imported before anything else is read
    path = write_config(tmp_path / "cfg.yaml", cfg)
    assert "toy_method" not in sys.modules
    assert main(["train", "--config", str(path)]) == 0
    assert "finished 2 steps of toy" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["toy_scale"] == 2.5 and m["updates"] == m["step"] and m["grad_norm"] > 0 for m in metrics)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["plugins"] == ["toy_method"] and saved["toy"] == {"scale": 2.5} and saved["train"]["method"] == "toy"
    assert not {"alignprop", "draft", "refl", "ddpo"} & set(saved)  # only the active method's section
    loaded = DiffalignConfig.from_yaml(out / "config.yaml")
    assert loaded.method_config == loaded.toy == loaded.methods["toy"] and loaded.toy.scale == 2.5
    assert (out / "lora").is_dir()


def test_plugin_override_and_environment(tmp_path, monkeypatch, capsys):
    cfg = load(tmp_path, overrides=["plugins=[toy_method]", "train.method=toy", "toy.scale=3"])
    assert cfg.plugins == ["toy_method"] and cfg.method_config.scale == 3.0
    assert "plugins" not in load(tmp_path).to_dict()  # no plug-ins: config.yaml as before
    monkeypatch.setenv("DIFFALIGN_PLUGINS", " toy_method , ")
    assert plugins_from_env() == ["toy_method"]
    cfg = load(tmp_path, overrides=["train.method=toy"], plugins=plugins_from_env())  # what `diffalign train` does
    assert cfg.plugins == ["toy_method"] and cfg.to_dict()["plugins"] == ["toy_method"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert re.search(r"^  toy +toy: +needs a differentiable reward$", capsys.readouterr().out, re.M)


def test_plugin_import_failure_is_one_line(tmp_path, monkeypatch, capsys):
    message = one_line_error(tmp_path, {**BASE, "plugins": ["no_such_plugin_module"]})
    assert (
        message.startswith("plugins: cannot import plugin module 'no_such_plugin_module'") and "PYTHONPATH" in message
    )
    path = write_config(tmp_path / "c.yaml", BASE)
    monkeypatch.setenv("DIFFALIGN_PLUGINS", "toy_method,other_missing_plugin")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "diffalign train: error: DIFFALIGN_PLUGINS: cannot import plugin module 'other_missing_plugin'"
    )
    assert "\n" not in err
    assert "not a module name" in one_line_error(tmp_path, {**BASE, "plugins": [".relative"]})


def test_unknown_method_lists_registered_names(tmp_path, toy):
    assert one_line_error(tmp_path, overrides=["train.method=tooy"]) == (
        "config key 'train.method' must be one of alignprop, draft_k, draft_lv, refl, ddpo, grpo, prdp, d3po, "
        "d3po_human, dpo, adv_grpo, nft, toy, got 'tooy'; "
        "did you mean 'toy'?"
    )
    assert "plugins: [module]" in one_line_error(tmp_path, overrides=["train.method=zzz_method"])
    # unknown sections: the registered ones (a plug-in's included) are the known ones
    assert "did you mean 'toy'?" in one_line_error(tmp_path, {**BASE, "tooy": {"scale": 1}})
    assert re.search(r"sections are .*ddpo, dpo, draft, .*toy, train", one_line_error(tmp_path, {**BASE, "zzzz": {}}))
    assert "did you mean 'toy.scale'?" in one_line_error(tmp_path, overrides=["toy.scal=2"])


def test_duplicate_and_conflicting_registrations(toy):
    entry = get_method("toy")
    assert register_method(entry) is entry  # the same entry again (a module imported twice): nothing happens
    with pytest.raises(DiffalignError, match=r"method 'ddpo' is registered twice: by diffalign\.methods\.ddpo\.DDPO "):
        register_method(MethodEntry("ddpo", toy.Toy, toy.ToyConfig, "toy"))

    @dataclasses.dataclass
    class Other:
        k: int = 1

    with pytest.raises(DiffalignError, match="config section 'draft' already holds .*DraftConfig"):
        register_method(MethodEntry("toy_k", toy.Toy, Other, "draft"))
    with pytest.raises(DiffalignError, match="lowercase identifier"):
        register_method(MethodEntry("My-Method", toy.Toy, Other, "mine"))

    @dataclasses.dataclass
    class NoDefault:
        k: int

    with pytest.raises(DiffalignError, match="needs a default"):
        register_method(MethodEntry("nodefault", toy.Toy, NoDefault, "nodefault"))
    assert "toy_k" not in [e.name for e in registered_methods()]


@dataclasses.dataclass
class _Plain:
    scale: float = 1.0


def test_core_section_name_is_refused(tmp_path, toy):
    register_method(MethodEntry("bad_section", toy.Toy, _Plain, "train"))
    assert "registers config section 'train', a core section" in one_line_error(tmp_path)


def test_draft_methods_share_one_section(tmp_path):
    assert get_method("draft_k").section == get_method("draft_lv").section == "draft"
    assert list(method_sections()).count("draft") == 1
    cfg = load(tmp_path, overrides=["train.method=draft_lv", "draft.n_lv=3", "draft.k=2"])
    assert cfg.method_config is cfg.draft is cfg.methods["draft"] and cfg.draft.n_lv == 3 and cfg.draft.k == 2
    cfg.train.method = "draft_k"
    assert cfg.method_config is cfg.draft  # the other draft method reads the same section
    assert (
        set(cfg.methods)
        == set(method_sections())
        == {"alignprop", "draft", "refl", "ddpo", "grpo", "prdp", "d3po", "dpo", "adv_grpo", "nft"}
    )
    assert cfg.to_dict()["draft"]["n_lv"] == 3 and "alignprop" not in cfg.to_dict()


def test_differentiable_reward_check_follows_the_entry(tmp_path, toy):
    data = {"reward": {"rewards": ["jpeg_compressibility"]}}
    message = one_line_error(tmp_path, data, ["plugins=[toy_method]", "train.method=toy"])
    assert "method 'toy' backpropagates through the reward" in message and "not differentiable" in message
    # the same class registered as not needing a differentiable reward: accepted (the entry decides)
    register_method(MethodEntry("toy_any", toy.Toy, toy.ToyConfig, "toy", needs_differentiable_reward=False))
    assert load(tmp_path, data, ["train.method=toy_any"]).method_config == toy.ToyConfig()
    assert get_method("toy").needs_differentiable_reward and not get_method("ddpo").needs_differentiable_reward


def test_method_validation_lives_in_the_entries(tmp_path):
    validators = {e.name: e.validate for e in registered_methods()}
    assert all(validators[name] is not None for name in ("alignprop", "draft_k", "draft_lv", "refl", "ddpo"))
    assert "ddpo needs sample.eta > 0" in one_line_error(tmp_path, overrides=["train.method=ddpo", "sample.eta=0"])
    message = one_line_error(tmp_path, overrides=["train.method=refl", "sample.num_batches=2"])
    assert message.startswith("sample.num_batches is for online policy methods (ddpo, grpo, ...); refl takes")


def test_docs_method_table_lists_the_registered_builtins():
    """docs/training.md's method table: exactly the built-in methods, with their sections and reward needs."""
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    builtins = [e for e in registered_methods() if e.builtin]
    assert [r["method"] for r in rows] == [f"`{e.name}`" for e in builtins]
    for row, entry in zip(rows, builtins, strict=True):
        assert row["config section"] == f"`{entry.section}`"
        assert row["needs a differentiable reward"] == ("yes" if entry.needs_differentiable_reward else "no")


def test_methods_never_import_the_config():
    """No import cycle: importing the methods (and their registry) loads no diffalign.config."""
    code = "import sys, diffalign.methods; assert 'diffalign.config' not in sys.modules, 'config imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)
