"""The ``saturation`` reward: hand-made images with known values, gradients, batch shape, bad options."""

from __future__ import annotations

import pytest
import torch

from diffalign.errors import DiffalignError
from reward_models import get_reward, is_differentiable, list_rewards
from reward_models.saturation import hue_degrees, parse_color


def _solid(rgb: tuple[float, float, float], size: int = 8) -> torch.Tensor:
    """One ``[1, 3, size, size]`` image of a single colour."""
    return torch.tensor(rgb, dtype=torch.float32).reshape(1, 3, 1, 1).expand(1, 3, size, size).clone()


def _half_red(size: int = 8) -> torch.Tensor:
    """Left half pure red, right half white."""
    img = torch.ones(1, 3, size, size)
    img[:, 1:, :, : size // 2] = 0.0
    return img


def test_registered_differentiable_and_known_values() -> None:
    assert "saturation" in list_rewards() and is_differentiable("saturation")
    reward = get_reward("saturation")
    images = torch.cat([_solid((1, 1, 1)), _solid((1, 0, 0)), _half_red(), _solid((0, 0, 0)), _solid((0.5, 0.5, 0.5))])
    out = reward(images, [""] * 5)
    assert out.shape == (5,) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.5, 0.0, 0.0]), atol=1e-5, rtol=0)
    # HSV saturation of a palette colour: (max - min) / max
    red = reward(_solid((215 / 255, 40 / 255, 40 / 255)), ["a red circle"])
    torch.testing.assert_close(red, torch.tensor([175 / 215]), atol=1e-5, rtol=0)


def test_fraction_mode_counts_strongly_coloured_pixels() -> None:
    reward = get_reward("saturation:mode=fraction,threshold=0.5")
    pale = _solid((1.0, 0.8, 0.8))  # saturation 0.2: below the threshold
    out = reward(torch.cat([_half_red(), pale, _solid((1, 0, 0))]), ["", "", ""])
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, 1.0]), atol=1e-4, rtol=0)


def test_color_option_rewards_one_hue_only() -> None:
    images = torch.cat([_solid((1, 0, 0)), _solid((0, 0, 1)), _solid((0, 1, 0)), _half_red()])
    red = get_reward("saturation:color=red")(images, [""] * 4)
    torch.testing.assert_close(red, torch.tensor([1.0, 0.0, 0.0, 0.5]), atol=1e-5, rtol=0)
    blue = get_reward("saturation:color=240")(images, [""] * 4)  # a hue in degrees
    torch.testing.assert_close(blue, torch.tensor([0.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    # 30 degrees off the target hue: cos(30)^8
    orange = _solid((1.0, 0.5, 0.0))
    assert abs(hue_degrees((1.0, 0.5, 0.0)) - 30.0) < 1e-6
    out = get_reward("saturation:color=red")(orange, [""])
    torch.testing.assert_close(out, torch.tensor([(3**0.5 / 2) ** 8]), atol=1e-5, rtol=0)
    assert parse_color("yellow") == pytest.approx(hue_degrees((235, 195, 20)))


def test_gradient_is_finite_and_per_image() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    x[1] = 1.0  # white: saturation 0
    x[2] = 0.0  # black: max 0
    x[3, :, :8] = 0.5  # grey rows
    for spec in ("saturation", "saturation:mode=fraction", "saturation:color=purple"):
        xi = x.clone().requires_grad_(True)
        out = get_reward(spec)(xi, [""] * 4)
        assert out.shape == (4,) and out.requires_grad
        out.sum().backward()
        assert xi.grad is not None and torch.isfinite(xi.grad).all(), spec
        assert xi.grad[0].abs().sum() > 0, spec
        xj = x.clone().requires_grad_(True)
        get_reward(spec)(xj, [""] * 4)[0].backward()
        assert xj.grad[1:].abs().max() == 0, spec


def test_raising_it_means_more_colour() -> None:
    """A gradient step on a near-grey image raises the score (the hack the reward invites)."""
    x = torch.full((1, 3, 8, 8), 0.9).add_(0.01 * torch.rand(1, 3, 8, 8)).requires_grad_(True)
    reward = get_reward("saturation")
    before = reward(x, [""])
    before.sum().backward()
    after = reward((x + 0.05 * x.grad.sign()).clamp(0, 1).detach(), [""])
    assert after > before


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("saturation:color=teal", ["unknown color 'teal'", "red"]),
        ("saturation:color=nan", ["finite"]),
        ("saturation:mode=max", ["mode must be one of mean, fraction"]),
        ("saturation:threshold=1.5", ["threshold must be in (0, 1)"]),
        ("saturation:sharpness=0", ["sharpness must be a positive number"]),
        ("saturation:threshold=high", ["threshold expects float"]),
        ("saturation:hue=10", ["has no option 'hue'", "accepted options: mode, threshold, color, sharpness"]),
    ],
)
def test_bad_options_are_one_line(spec: str, parts: list[str]) -> None:
    with pytest.raises(DiffalignError) as err:
        get_reward(spec)
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, msg


def test_bad_images_are_one_line() -> None:
    with pytest.raises(DiffalignError) as err:
        get_reward("saturation")(_solid((1, 0, 0)) * 255, ["x"])
    assert "\n" not in str(err.value) and "divide by 255" in str(err.value)
