"""ReNO: the regularizer's math, the core loop on a toy generator, Turbo-shaped generators, rewards rising, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rewards_fixtures import make_open_clip_dir
from torch.optim.optimizer import register_optimizer_step_post_hook

from diffalign.errors import DiffalignError
from diffalign.pipelines import LoraSettings, add_lora, load_pipeline, lora_parameters, save_lora
from diffalign.reno import Best, RenoConfig, noise_regularizer, optimize_noise, reno
from reward_models import Reward, get_reward

PROMPT = "a red circle"


class Redness(Reward):
    """Mean red minus mean green/blue: differentiable and easy to move."""

    name = "redness"
    differentiable = True
    range = (-1.0, 1.0)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


class NotDifferentiable(torch.nn.Module):
    name = "opaque"
    differentiable = False

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean((1, 2, 3)).detach()


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ fixtures
def _turbo_dir(tmp: Path, family: str) -> Path:
    """A tiny SD / SDXL pipeline shipped like SD-Turbo: Euler-ancestral scheduler, trailing spacing."""
    from diffusers import EulerAncestralDiscreteScheduler
    from tiny import build_sd, build_sdxl

    pipe = (build_sd if family == "sd" else build_sdxl)(tmp)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.save_pretrained(tmp / "pipe")
    return tmp / "pipe"


@pytest.fixture(scope="module")
def turbo_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _turbo_dir(tmp_path_factory.mktemp("turbo_sd"), "sd")


@pytest.fixture(scope="module")
def turbo_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _turbo_dir(tmp_path_factory.mktemp("turbo_sdxl"), "sdxl")


@pytest.fixture(scope="module")
def turbo(turbo_sd_dir: Path):
    pipe = load_pipeline(str(turbo_sd_dir), scheduler="keep")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(sd_dir: Path):
    """The tiny SD pipeline as shipped with DDIM (a 'many-step' model run with a few trailing steps)."""
    return load_pipeline(str(sd_dir))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_open_clip_dir(tmp_path_factory.mktemp("reno_clip") / "clip")


# --------------------------------------------------------------------------------------- regularizer
def test_regularizer_hand_computed_values() -> None:
    d = 4 * 8 * 8
    ones = torch.ones(1, 4, 8, 8)
    expected = 0.5 * d - (d - 1) * 0.5 * math.log(d)  # ||1|| = sqrt(d)
    twos = 2 * ones  # ||z|| = 2 sqrt(d)
    expected2 = 0.5 * 4 * d - (d - 1) * math.log(2 * math.sqrt(d))
    out = noise_regularizer(torch.cat([ones, twos]))
    assert out.shape == (2,) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([expected, expected2]), rtol=1e-6, atol=1e-3)


def test_regularizer_gradient_and_minimum() -> None:
    d = 3 * 5 * 7
    z = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    (grad,) = torch.autograd.grad(noise_regularizer(z).sum(), [z])
    sq = z.detach().reshape(2, -1).pow(2).sum(1).reshape(2, 1, 1, 1)
    torch.testing.assert_close(grad, (z * (1 - (d - 1) / sq)).detach(), rtol=1e-4, atol=1e-5)
    # on the shell ||z||^2 = d - 1 the gradient vanishes, and R is minimal there along the ray
    shell = (z.detach() / sq.sqrt() * math.sqrt(d - 1)).requires_grad_(True)
    (g,) = torch.autograd.grad(noise_regularizer(shell).sum(), [shell])
    assert g.abs().max() < 1e-4
    r = [noise_regularizer(shell.detach() * s)[0].item() for s in (0.9, 1.0, 1.1)]
    assert r[1] < r[0] and r[1] < r[2]


def test_regularizer_fp16_and_sd_turbo_scale() -> None:
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))  # SD-Turbo at 512 px: d = 16384
    assert abs(z.norm().item() - 128) < 3
    # ||2z||^2 ~ 65536 overflows fp16; the regularizer runs in fp32
    assert torch.isfinite(noise_regularizer((2 * z).half())).all()
    z2 = (2 * z).requires_grad_(True)
    (g,) = torch.autograd.grad(noise_regularizer(z2).sum(), [z2])
    torch.testing.assert_close(g, 0.75 * z2.detach(), rtol=0.02, atol=0.02)  # pulls 2z back: 1 - (d-1)/(4d)
    z1 = z.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(noise_regularizer(z1).sum(), [z1])
    assert g1.norm() < 0.05 * g.norm()


# ------------------------------------------------------------------------ core loop, toy generator
TOY_D = 4 * 6 * 8  # elements of the toy noise z [1, 4, 6, 8]


def toy_generator(z: torch.Tensor) -> torch.Tensor:
    """``G(z) = sigmoid(z)`` reshaped to a [1, 3, 8, 8] image: no diffusion model."""
    return torch.sigmoid(z).reshape(1, 3, 8, 8)


def toy_noise(scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return scale * torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(seed))


def redness_loss(weight: float = 1.0):
    """``L_R = -weight * redness`` and the raw reward, as :func:`diffalign.reno.make_reward_loss` returns them."""

    def reward_loss(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        r = images[:, 0].mean() - images[:, 1:].mean()
        return -weight * r, {"redness": float(r.detach())}

    return reward_loss


def flat_loss(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    return torch.zeros(()), {"flat": 0.0}


@pytest.mark.parametrize("grad_clip", [0.1, None])
@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_core_regularizer_pulls_the_norm_to_the_shell_on_a_flat_reward(scale: float, grad_clip) -> None:
    z0 = toy_noise(scale)
    before = z0.clone()
    target = math.sqrt(TOY_D - 1)
    result = optimize_noise(toy_generator, flat_loss, z0, RenoConfig(iters=40, grad_clip=grad_clip))
    assert torch.equal(z0, before)  # z0 is not modified
    start, end = result.records[0].z_norm, result.final_latents.norm().item()
    assert start == pytest.approx(z0.norm().item(), rel=1e-6)
    assert abs(end - target) < 0.05 * abs(start - target), (start, end, target)
    assert (result.records[1].z_norm - start) * (target - start) > 0  # the first step already moves toward it
    cos = torch.nn.functional.cosine_similarity(result.final_latents.flatten(), z0.flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)  # the gradient of R(z) is parallel to z: only the norm moves
    for r in result.records:
        assert r.loss == pytest.approx(0.01 * r.reg, rel=1e-6) and r.loss_reward == 0.0


def test_core_best_is_the_lowest_reward_loss_not_the_regularized_loss() -> None:
    scripted = [0.3, -0.2, -0.2, 0.1, 0.0, 0.25, 0.05, 0.1]  # L_R per iteration; a tie at iterations 1 and 2
    images: list[torch.Tensor] = []

    def generate(z: torch.Tensor) -> torch.Tensor:
        images.append(toy_generator(z).detach().clone())
        return toy_generator(z)

    def reward_loss(imgs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        value = scripted[len(images) - 1]
        return 0.0 * imgs.sum() + value, {"scripted": -value}

    cfg = RenoConfig(iters=len(scripted), reg_weight=0.01, grad_clip=None)
    result = optimize_noise(generate, reward_loss, toy_noise(3.0), cfg, prompt="toy")
    losses = [r.loss for r in result.records]
    assert [r.loss_reward for r in result.records] == pytest.approx(scripted)
    assert isinstance(result.best, Best) and result.prompt == "toy"
    assert result.best.iteration == 1 == result.best_iter  # the first of the tied lowest L_R
    assert losses.index(min(losses)) != 1  # L = L_R + lambda R(z) is lowest elsewhere: R(z) falls all along
    assert result.best_loss == result.best.loss == pytest.approx(-0.2)
    assert result.best_rewards == result.records[1].rewards == {"scripted": 0.2}
    assert torch.equal(result.best_image, images[1][0])  # the image of that iteration ...
    assert torch.equal(toy_generator(result.best_latents)[0], result.best_image)  # ... and the noise that made it
    assert result.best_latents.device.type == "cpu" and result.best_latents.dtype == torch.float32
    assert torch.equal(result.initial_image, images[0][0]) and torch.equal(result.final_image, images[-1][0])
    assert [it for it, _ in result.strip] == [0, 5, 7]  # every strip_every-th iteration and the last
    for r in result.records:
        assert r.loss == pytest.approx(r.loss_reward + cfg.reg_weight * r.reg, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_core_takes_iters_minus_one_optimizer_steps(optimizer: str) -> None:
    steps: list[int] = []
    calls: list[int] = []

    def generate(z: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return toy_generator(z)

    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        cfg = RenoConfig(iters=5, optimizer=optimizer)
        result = optimize_noise(generate, redness_loss(), toy_noise(), cfg)
        assert len(calls) == 5 and len(steps) == 4 and result.steps_taken == 4
        assert [r.grad_norm is None for r in result.records] == [False] * 4 + [True]
        assert result.best_rewards["redness"] > result.initial_rewards["redness"]  # the toy reward rises
        steps.clear()
        calls.clear()

        def no_grad_loss(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            return images.detach().mean(), {"mean": float(images.detach().mean())}  # never backpropagated

        one = optimize_noise(generate, no_grad_loss, toy_noise(), RenoConfig(iters=1, optimizer=optimizer))
        assert len(calls) == 1 and steps == [] and one.steps_taken == 0 and one.best_iter == 0
        assert torch.equal(one.final_latents, toy_noise()) and torch.equal(one.best_image, one.initial_image)
    finally:
        handle.remove()


@pytest.mark.parametrize("grad_clip", [0.1, None])
def test_core_clips_the_gradient_norm(grad_clip) -> None:
    cfg = RenoConfig(iters=2, lr=5.0, grad_clip=grad_clip, reg_weight=0.01)
    z0 = toy_noise()
    z = z0.clone().requires_grad_(True)
    loss_reward, _ = redness_loss(1000.0)(toy_generator(z))
    (grad,) = torch.autograd.grad(loss_reward + cfg.reg_weight * noise_regularizer(z).sum(), [z])
    assert grad.norm() > 1.0  # a steep loss: clipping at 0.1 changes the step
    result = optimize_noise(toy_generator, redness_loss(1000.0), z0, cfg)
    assert result.records[0].grad_norm == pytest.approx(grad.norm().item(), rel=1e-5)  # recorded before clipping
    # Nesterov SGD's first step with an empty buffer: -lr * (1 + momentum) * (clipped) gradient
    applied = grad * (grad_clip / grad.norm()) if grad_clip is not None else grad
    torch.testing.assert_close(result.final_latents - z0, -cfg.lr * (1 + cfg.momentum) * applied, rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, part",
    [
        ({"iters": 0}, "iters must be >= 1"),
        ({"lr": 0.0}, "lr must be a positive"),
        ({"optimizer": "lbfgs"}, "sgd or adam"),
        ({"grad_clip": 0.0}, "grad_clip must be > 0"),
        ({"reg_weight": -1.0}, "reg_weight must be >= 0"),
        ({"num_steps": 0}, "num_steps must be between"),
        ({"guidance_scale": -2.0}, "guidance_scale must be >= 0"),
        ({"eta": 1.5}, "eta must be in [0, 1]"),
        ({"strip_every": 0}, "strip_every must be >= 1"),
        ({"momentum": 0.0}, "Nesterov SGD needs momentum > 0"),
    ],
)
def test_config_validation(kwargs: dict, part: str) -> None:
    with pytest.raises(DiffalignError) as err:
        RenoConfig(**kwargs)
    one_line(err, part)


# -------------------------------------------------------------------------------------------- loop
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_one_step_is_the_diffusers_turbo_image(family: str, request: pytest.FixtureRequest) -> None:
    pipe = load_pipeline(str(request.getfixturevalue(f"turbo_{family}_dir")), scheduler="keep")
    pipe.set_progress_bar_config(disable=True)
    result = reno(pipe, PROMPT, [Redness()], None, RenoConfig(iters=1, seed=3))
    gen = torch.Generator().manual_seed(3)
    theirs = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=gen, output_type="pt").images[0]
    assert (result.initial_image - theirs).abs().max() < 1e-5
    assert result.steps_taken == 0 and len(result.records) == 1


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_shaped_pipelines_run(family: str, steps: int, request: pytest.FixtureRequest) -> None:
    pipe = load_pipeline(str(request.getfixturevalue(f"turbo_{family}_dir")), scheduler="keep")
    result = reno(
        pipe, PROMPT, [Redness()], None, RenoConfig(iters=4, num_steps=steps, size=32 if steps == 4 else None)
    )
    side = 32 if steps == 4 else 16
    assert result.best_image.shape == (3, side, side) and torch.isfinite(result.best_image).all()
    assert [r.iter for r in result.records] == [0, 1, 2, 3]
    assert result.best_rewards["redness"] >= result.initial_rewards["redness"]
    assert all(math.isfinite(r.grad_norm) for r in result.records[:-1]) and result.records[-1].grad_norm is None


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_exactly_iters_minus_one_optimizer_steps(turbo, optimizer: str) -> None:
    steps: list[int] = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        result = reno(turbo, PROMPT, [Redness()], None, RenoConfig(iters=5, optimizer=optimizer))
        assert len(steps) == 4 and result.steps_taken == 4
        steps.clear()
        reno(turbo, PROMPT, [Redness()], None, RenoConfig(iters=1, optimizer=optimizer))
        assert steps == []
    finally:
        handle.remove()


def test_gradient_clip_bounds_the_first_step(turbo) -> None:
    from diffalign.reno import initial_noise

    cfg = RenoConfig(iters=2, lr=5.0, grad_clip=0.1)
    result = reno(turbo, PROMPT, [Redness()], [1000.0], cfg)
    assert result.records[0].grad_norm > 0.1  # a steep loss: the recorded norm is before clipping
    # Nesterov SGD's first step with an empty buffer: lr * (1 + momentum) * clipped gradient
    step = result.final_latents - initial_noise(turbo, cfg)
    assert step.norm().item() == pytest.approx(cfg.lr * (1 + cfg.momentum) * 0.1, rel=1e-3)


def test_regularizer_alone_pulls_the_norm_to_the_shell(turbo) -> None:
    from diffalign.reno import initial_noise

    cfg = RenoConfig(iters=25, reg_weight=0.01)
    z0 = initial_noise(turbo, cfg)
    target = math.sqrt(z0.numel() - 1)
    result = reno(turbo, PROMPT, [Redness()], [0.0], cfg, latents=2 * z0)
    start = result.records[0].z_norm
    assert start == pytest.approx(2 * z0.norm().item(), rel=1e-5)
    end = result.final_latents.norm().item()
    assert abs(end - target) < 0.25 * abs(start - target), (start, end, target)
    assert result.records[1].z_norm < start  # moves toward the shell from the first step


def test_reward_rises_and_best_is_consistent(sd) -> None:
    cfg = RenoConfig(iters=8, num_steps=2)
    result = reno(sd, PROMPT, [Redness()], None, cfg)
    values = [r.rewards["redness"] for r in result.records]
    assert result.best_rewards["redness"] > values[0] + 1e-3 and result.best_iter > 0
    assert result.best_rewards == result.records[result.best_iter].rewards
    assert result.best_loss == pytest.approx(-max(values)) and result.best_loss == min(
        r.loss_reward for r in result.records
    )
    for r in result.records:  # L = L_R + lambda R(z)
        assert r.loss == pytest.approx(r.loss_reward + cfg.reg_weight * r.reg, rel=1e-5, abs=1e-5)
    again = reno(sd, PROMPT, [Redness()], None, RenoConfig(iters=1, num_steps=2), latents=result.best_latents)
    assert (again.initial_image - result.best_image).abs().max() < 1e-5  # best_latents regenerate best_image
    assert [it for it, _ in result.strip] == [0, 5, 7]


def test_guidance_and_sampler_noise_are_deterministic(sd) -> None:
    cfg = RenoConfig(iters=2, num_steps=2, guidance_scale=3.0, eta=0.5, seed=7)
    a = reno(sd, PROMPT, [Redness()], None, cfg)
    b = reno(sd, PROMPT, [Redness()], None, cfg)
    assert torch.equal(a.best_image, b.best_image) and torch.equal(a.final_latents, b.final_latents)
    plain = reno(sd, PROMPT, [Redness()], None, RenoConfig(iters=1, num_steps=2, seed=7))
    assert (plain.initial_image - a.initial_image).abs().max() > 1e-4  # CFG and DDIM noise change the image


def test_clip_score_from_the_registry_rises(sd, clip_dir: Path) -> None:
    reward = get_reward(f"clip_score:model=local-dir:{clip_dir},scale=100")
    result = reno(sd, PROMPT, [reward, Redness()], [1.0, 0.0], RenoConfig(iters=6, num_steps=2))
    assert set(result.best_rewards) == {"clip_score", "redness"}
    assert result.best_rewards["clip_score"] > result.initial_rewards["clip_score"]


def test_spec_strings_weights_and_duplicate_names(sd, clip_dir: Path) -> None:
    specs = [f"clip_score:model=local-dir:{clip_dir},weight=2", f"clip_score:model=local-dir:{clip_dir},scale=10"]
    result = reno(sd, PROMPT, specs, None, RenoConfig(iters=1))
    names = list(result.initial_rewards)
    assert len(names) == 2 and names[0] != names[1]
    c1, c10 = result.initial_rewards.values()
    assert c10 == pytest.approx(10 * c1, rel=1e-4)
    assert result.best_loss == pytest.approx(-(2 * c1 + c10), rel=1e-4)


def test_non_differentiable_rewards_are_refused(sd) -> None:
    with pytest.raises(DiffalignError) as err:
        reno(sd, PROMPT, ["jpeg_compressibility"], None, RenoConfig(iters=2))
    one_line(err, "jpeg_compressibility", "not differentiable")
    with pytest.raises(DiffalignError) as err:
        reno(sd, PROMPT, [get_reward("jpeg_compressibility")], None, RenoConfig(iters=2))
    one_line(err, "not differentiable")
    with pytest.raises(DiffalignError) as err:
        reno(sd, PROMPT, [NotDifferentiable()], None, RenoConfig(iters=2))
    one_line(err, "opaque", "not marked differentiable")
    with pytest.raises(DiffalignError) as err:
        reno(sd, PROMPT, [Redness()], [1.0, 2.0], RenoConfig(iters=2))
    one_line(err, "2 weights for 1 rewards")
    with pytest.raises(DiffalignError) as err:
        reno(sd, PROMPT, [], None, RenoConfig(iters=2))
    one_line(err, "at least one reward")


def test_lora_on_top(sd_dir: Path, tmp_path: Path) -> None:
    trained = load_pipeline(str(sd_dir))
    add_lora(trained, LoraSettings(rank=2))
    with torch.no_grad():
        for p in lora_parameters(trained):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    save_lora(trained, tmp_path / "lora")
    base = reno(load_pipeline(str(sd_dir)), PROMPT, [Redness()], None, RenoConfig(iters=1))
    pipe = load_pipeline(str(sd_dir))
    with_lora = reno(pipe, PROMPT, [Redness()], None, RenoConfig(iters=1), lora=tmp_path / "lora")
    assert (with_lora.initial_image - base.initial_image).abs().max() > 1e-3
    again = reno(pipe, PROMPT, [Redness()], None, RenoConfig(iters=1), lora=tmp_path / "lora")  # loaded once
    assert torch.equal(again.initial_image, with_lora.initial_image)


# --------------------------------------------------------------------------------------------- CLI
def _cli(argv: list[str]) -> int:
    from diffalign.cli import main

    return main(["reno", *argv])


def test_cli_end_to_end_and_deterministic(turbo_sd_dir: Path, clip_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n")
    reward = f"shapes_clip:model=local-dir:{clip_dir},scale=100"
    common = ["--model", str(turbo_sd_dir), "--reward", reward, "--iters", "6", "--strip-every", "2"]
    assert _cli(["--prompts", str(prompts), *common, "--out", str(tmp_path / "a")]) == 0
    dirs = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_dir())
    assert dirs == ["000_a-red-circle", "001_two-blue-squares"]
    for name in dirs:
        files = {p.name for p in (tmp_path / "a" / name).iterdir()}
        assert files == {"best.png", "final.png", "initial.png", "strip.png", "rewards.jsonl"}
        lines = [json.loads(x) for x in (tmp_path / "a" / name / "rewards.jsonl").read_text().splitlines()]
        assert [x["iter"] for x in lines] == list(range(6)) and set(lines[0]["rewards"]) == {"shapes_clip"}
    summary = [json.loads(x) for x in (tmp_path / "a" / "summary.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in summary] == ["a red circle", "two blue squares"]
    assert all(s["best"]["shapes_clip"] >= s["initial"]["shapes_clip"] for s in summary)
    from PIL import Image

    assert Image.open(tmp_path / "a" / dirs[0] / "strip.png").width > 4 * 16  # iterations 0, 2, 4, 5
    # same seed, same files
    assert _cli(["--prompt", "a red circle", *common, "--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / dirs[0] / "best.png").read_bytes()
    assert a == (tmp_path / "b" / dirs[0] / "best.png").read_bytes()


def test_cli_errors_are_one_line(turbo_sd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    base = ["--model", str(turbo_sd_dir), "--reward", "clip_score", "--out", str(tmp_path / "o")]
    cases = [
        (["--prompts", str(empty), *base], "has no prompts"),
        (
            ["--prompt", "x", "--model", str(tmp_path / "nope"), "--reward", "clip_score", "--out", "o"],
            "no pipeline directory",
        ),
        (
            ["--prompt", "x", "--model", str(turbo_sd_dir), "--reward", "clip_scor", "--out", "o"],
            "unknown reward 'clip_scor'",
        ),
        (
            ["--prompt", "x", "--model", str(turbo_sd_dir), "--reward", "jpeg_compressibility", "--out", "o"],
            "not differentiable",
        ),
        (["--prompt", "x", *base, "--iters", "0"], "iters must be >= 1"),
    ]
    for argv, part in cases:
        capsys.readouterr()
        assert _cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffalign reno: error:") and "\n" not in err and part in err, err


def test_shapes_eval_script_runs(sd_dir: Path, clip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "reno_shapes_eval.py"
    spec = importlib.util.spec_from_file_location("reno_shapes_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--model", str(sd_dir), "--reward", f"shapes_clip:model=local-dir:{clip_dir}", "--n", "2", "--iters", "2"]
    assert module.main([*argv, "--steps", "2", "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "gold accuracy" in printed and "proxy shapes_clip" in printed
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["proxy_after"] >= summary["proxy_before"] and 0 <= summary["gold_after"]["accuracy"] <= 1
    assert len((tmp_path / "eval" / "results.jsonl").read_text().splitlines()) == 2


def test_shapes_eval_script_ensemble(
    sd_dir: Path, clip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Several --reward members with --combine uwo: z-scored per prompt, the first member reported."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "reno_shapes_eval.py"
    spec = importlib.util.spec_from_file_location("reno_shapes_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    members = [f"shapes_clip:model=local-dir:{clip_dir}", f"shapes_clip:model=local-dir:{clip_dir},scale=2.0"]
    argv = ["--model", str(sd_dir), "--reward", members[0], "--reward", members[1], "--combine", "uwo"]
    assert module.main([*argv, "--n", "1", "--iters", "2", "--steps", "2", "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "optimized: uwo of 2 reward(s)" in printed
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["combine"] == "uwo" and summary["reward_name"] == members[0]
    assert summary["reward"] == members
