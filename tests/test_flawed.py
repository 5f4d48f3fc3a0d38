"""The flawed shapes proxy (reward_models/flawed.py) and ensemble specs with alternatives (expand_members)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rewards_fixtures import make_open_clip_dir

from diffalign.config import DiffalignConfig
from diffalign.errors import DiffalignError
from reward_models import get_reward
from reward_models.registry import expand_members


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_open_clip_dir(tmp_path_factory.mktemp("flawed_clip") / "clip")


def test_flawed_proxy_is_clip_plus_weighted_hue_saturation(clip_dir: Path) -> None:
    clip = get_reward(f"shapes_clip:model=local-dir:{clip_dir}")
    sat = get_reward("saturation:color=red")
    flawed = get_reward(f"shapes_clip_flawed:model=local-dir:{clip_dir},flaw_color=red,flaw_weight=12")
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    images[1, 0] = 1.0  # a red-heavy image: the flaw pays for it
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    expected = clip(images, prompts) + 12.0 * sat(images, prompts)
    torch.testing.assert_close(flawed(images, prompts), expected, rtol=1e-5, atol=1e-5)
    x = images.clone().requires_grad_(True)
    flawed(x, prompts).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in flawed.parameters())  # the CLIP stays frozen


def test_flawed_proxy_any_hue_and_bad_weight(clip_dir: Path) -> None:
    any_hue = get_reward(f"shapes_clip_flawed:model=local-dir:{clip_dir},flaw_color=any,flaw_weight=0")
    clip = get_reward(f"shapes_clip:model=local-dir:{clip_dir}")
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(any_hue(images, ["a", "b"]), clip(images, ["a", "b"]))
    with pytest.raises(DiffalignError, match="flaw_weight must be a number >= 0"):
        get_reward(f"shapes_clip_flawed:model=local-dir:{clip_dir},flaw_weight=-1")
    with pytest.raises(DiffalignError, match="unknown color"):
        get_reward(f"shapes_clip_flawed:model=local-dir:{clip_dir},flaw_color=pink")


def test_expand_members_one_spec_per_alternative() -> None:
    out = expand_members(["shapes_gold", "shapes_clip:model=local-dir:a|local-dir:b|local-dir:c,scale=2"])
    assert out == [
        "shapes_gold",
        "shapes_clip:model=local-dir:a,scale=2",
        "shapes_clip:model=local-dir:b,scale=2",
        "shapes_clip:model=local-dir:c,scale=2",
    ]
    assert expand_members(["train_fixtures:Scaled:scale=1|3"]) == [
        "train_fixtures:Scaled:scale=1",
        "train_fixtures:Scaled:scale=3",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("shapes_clip:model=a|b,scale=1|2", "in one option only"),
        ("shapes_clip:model=a||b", "empty alternative"),
    ],
)
def test_expand_members_errors_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(DiffalignError, match=message) as err:
        expand_members([spec])
    assert "\n" not in str(err.value)


def test_config_expands_members_before_combining() -> None:
    cfg = DiffalignConfig.from_dict(
        {
            "reward": {
                "rewards": ["train_fixtures:Scaled:scale=1|3"],
                "combine": "wco",
                "combine_options": {"normalize": "zscore"},
            }
        }
    )
    assert cfg.reward.rewards == ["train_fixtures:Scaled:scale=1", "train_fixtures:Scaled:scale=3"]
