"""Config loading, dotted overrides and every configuration error as one line (before any model loads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffalign.config import DiffalignConfig
from diffalign.errors import DiffalignError

BASE = {"reward": {"rewards": ["train_fixtures:Brightness"]}}


def load(tmp_path, data=None, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE if data is None else data))
    return DiffalignConfig.from_yaml(path, list(overrides))


def test_yaml_and_typed_overrides(tmp_path):
    cfg = load(
        tmp_path,
        {"train": {"lr": "3e-3", "steps": 7}, "reward": BASE["reward"], "model": {"lora": {"rank": 16}}},
        [
            "train.lr=1e-3",
            "eval.seeds=[0, 5]",
            "sample.negative_prompt=none",
            "model.lora.alpha=8",
            "log.progress=false",
        ],
    )
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 7 and cfg.model.lora.rank == 16
    assert cfg.model.lora.alpha == 8.0 and cfg.eval.seeds == [0, 5] and cfg.sample.negative_prompt is None
    assert cfg.log.progress is False
    cfg = load(tmp_path, overrides=["prompts.train=[a red circle, two blue squares]", "prompts.eval=shapes:train"])
    assert cfg.prompts.train == ["a red circle", "two blue squares"] and cfg.prompts.eval == "shapes:train"


def test_resolved_config_round_trips(tmp_path):
    cfg = load(tmp_path, overrides=["train.method=draft_lv", "draft.n_lv=3"])
    path = cfg.save_yaml(tmp_path / "out" / "config.yaml")
    data = yaml.safe_load(path.read_text())
    assert "draft" in data and "ddpo" not in data and "alignprop" not in data  # only the active method's section
    assert DiffalignConfig.from_yaml(path) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        (["sample.stepz=3"], "did you mean 'sample.steps'?"),
        (["train.lr=fast"], "config key 'train.lr' expects a number, got fast"),
        (["train.steps=1.5"], "config key 'train.steps' expects an integer, got 1.5"),
        (["model.gradient_checkpointing=maybe"], "expects true or false, got maybe"),
        (
            ["train.method=alignprp"],
            "must be one of alignprop, draft_k, draft_lv, refl, ddpo, grpo, prdp, d3po, d3po_human, dpo, adv_grpo, nft, got 'alignprp'; did you mean 'alignprop'?",
        ),
        (["train=3"], "config key 'train' is a section"),
        (["train.lr"], "must be written section.key=value"),
        (["train.method=ddpo", "sample.eta=0"], "ddpo needs sample.eta > 0"),
        (["train.method=ddpo", "ddpo.train_batch_size=3"], "must be divisible by ddpo.train_batch_size (3)"),
        (["train.method=ddpo", "ddpo.train_batch_size=4", "train.gradient_accumulation_steps=3"], "not divisible by"),
        (["train.method=ddpo", "ddpo.cfg=false"], "set ddpo.cfg=true or sample.guidance_scale=1"),
        (["sample.num_batches=2"], "sample.num_batches is for online policy methods"),
        (["train.method=draft_k", "draft.k=50"], "draft.k=50 exceeds sample.steps=20"),
        (["reward.weights=[1, 2]"], "got 2 reward weights for 1 rewards"),
        (["reward.rewards=[clip_scor]"], "unknown reward 'clip_scor'; did you mean 'clip_score'?"),
        (["eval.rewards=[nope_reward]"], "unknown reward 'nope_reward'"),
        (["reward.rewards=[jpeg_compressibility]"], "method 'alignprop' backpropagates through the reward"),
        (["train.method=refl", "reward.rewards=[shapes_gold]"], "reward 'shapes_gold' is not differentiable"),
        (["prompts.eval=[not a shapes caption]", "eval.gold=on"], "eval.gold=on needs shapes captions"),
        (["model.lora.rank=0"], "lora.rank must be >= 1"),
        (["log.trackers=[mlflow]"], "unknown tracker 'mlflow'"),
    ],
)
def test_config_errors_are_one_line(tmp_path, overrides, message):
    with pytest.raises(DiffalignError) as err:
        load(tmp_path, overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_non_differentiable_reward_refused_before_model_loads(tmp_path):
    data = {"model": {"pretrained": str(tmp_path / "no-such-model")}, "reward": {"rewards": ["jpeg_compressibility"]}}
    with pytest.raises(DiffalignError, match="not differentiable; use a policy-gradient method such as 'ddpo'"):
        load(tmp_path, data, ["train.method=draft_k"])
    assert load(tmp_path, data, ["train.method=ddpo"]).train.method == "ddpo"  # fine for DDPO


def test_file_errors(tmp_path):
    with pytest.raises(DiffalignError, match="config file .* does not exist"):
        DiffalignConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(DiffalignError, match="invalid YAML"):
        DiffalignConfig.from_yaml(bad)
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DiffalignError, match="prompts.train: prompt file .* is empty; write one prompt per line"):
        load(tmp_path, overrides=[f"prompts.train={empty}"])
    with pytest.raises(DiffalignError, match="prompt file .* does not exist"):
        load(tmp_path, overrides=[f"prompts.eval=file:{tmp_path / 'nope.txt'}"])
    with pytest.raises(DiffalignError, match="unknown shapes split"):
        load(tmp_path, overrides=["prompts.train=shapes:test"])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(DiffalignError, match="must hold a mapping"):
        DiffalignConfig.from_yaml(tmp_path / "list.yaml")


def dataset_override(path, tmp_path) -> list[str]:
    """A shipped config of a dataset method names a file that ``diffalign prefs`` writes: stand one in; an
    Adv-GRPO recipe names a folder of reference images: stand in one image."""
    loaded = yaml.safe_load(Path(path).read_text())
    reference = (loaded.get("adv_grpo") or {}).get("reference", "shapes")
    if reference != "shapes":
        from PIL import Image

        (tmp_path / "refs").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "refs" / "0.png")
        return [f"adv_grpo.reference={tmp_path / 'refs'}"]
    data = loaded.get("data")
    if not data:
        return []
    stand_in = tmp_path / "stand_in.jsonl"
    stand_in.write_text('{"prompt": "a red circle"}\n')
    return [f"data.train={stand_in}"]


def test_shipped_configs_load(tmp_path):
    files = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))
    assert len(files) >= 8
    methods = set()
    for f in files:
        cfg = DiffalignConfig.from_yaml(f, dataset_override(f, tmp_path))
        methods.add(cfg.train.method)
        if "shapes" in f.parts:
            rewards = ["adversarial"] if cfg.train.method == "adv_grpo" else ["shapes_clip"]  # its own discriminator
            if f.stem.endswith("_hackable"):  # the hackable proxy of scripts/hacking_study.py (+ its discriminator)
                rewards = ["shapes_clip", "saturation"] + rewards[:1] * (cfg.train.method == "adv_grpo")
            if f.stem == "grpo_ensemble":  # issue 17's members with planted flaws (scripts/overoptimization.py)
                rewards = [r for r in cfg.reward.rewards if r.startswith("shapes_clip_flawed:model=local-dir:")]
                assert len(rewards) == 4 and cfg.reward.combine == "wco"
            base = "assets/shapes-flow" if f.stem.startswith("flow_") else "assets/shapes-sd"  # the flow-matching model
            assert cfg.model.pretrained == base and cfg.reward.rewards == rewards
            assert cfg.eval.gold == "auto" and cfg.prompts.eval == "shapes:heldout"
    assert methods == {
        "alignprop",
        "draft_k",
        "draft_lv",
        "refl",
        "ddpo",
        "grpo",
        "prdp",
        "d3po",
        "dpo",
        "adv_grpo",
        "nft",
    }


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parent.parent.glob("configs/*/*.yaml")), ids=str)
def test_every_shipped_config_loads_and_validates(path, tmp_path):
    """The GPU recipes never ran on a GPU here, but each one parses and passes validation on CPU."""
    cfg = DiffalignConfig.from_yaml(str(path), dataset_override(path, tmp_path))
    assert cfg.train.method in path.read_text()
