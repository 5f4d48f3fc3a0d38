"""ReNO: inference-time reward-based noise optimization (Eyring et al. 2024, arXiv 2406.04312).

No weights are trained. For one prompt, the initial noise ``z`` of a frozen one-step (or few-step)
generator ``G`` is optimized so that the generated image scores higher under differentiable rewards,
while the paper's noise regularization keeps ``z`` on the typical set of a standard Gaussian
(spec §7.1-7.2):

    z* = argmin_z  L_R(G(z, c), c) + lambda * R(z)
    L_R = sum_i w_i * l_i,         l_i = -r_i(G(z, c), c)                      (reward losses)
    R(z) = 0.5 * ||z||^2 - (d - 1) * log ||z||                                (noise-norm regularizer)

ReNO writes each reward loss with a constant offset (``1 - s_HPS``, ``100 - CLIP logit``, ...);
constants do not change gradients or the arg-min, so here ``l_i`` is simply the negated reward and
reward weights are per reward (``--reward NAME,weight=W``).

Per iteration: generate from the current ``z`` (any sampler noise re-drawn from the same seed),
compute ``L_R`` and keep the image if ``L_R`` is the lowest so far (the regularizer does not enter
the selection), then, except on the last iteration, backpropagate ``L = L_R + lambda * R(z)`` to
``z``, clip the gradient norm and take an optimizer step: ``iters - 1`` steps in all.

The generator ``G``: a DDIM sampler (eta = 0) with ``timestep_spacing="trailing"`` built from the
pipeline's own scheduler config, run with :func:`diffalign.sampling.sample_differentiable`, whose
output is the clean-image prediction ``x0_hat`` of the last step, decoded by the VAE. With one step
from ``t = 999`` this is exactly the SD-Turbo / SDXL-Turbo one-step image of diffusers (their
Euler-ancestral scheduler, trailing spacing, predicts ``x0_hat`` from ``sigma_max`` and lands on
sigma 0; ``x_T`` is scaled as that scheduler scales it, see :func:`noise_scale`); with a
few steps it is the deterministic few-step sampler of the same model. Every UNet call is wrapped in
activation checkpointing (``checkpoint=True``) so that 4 steps cost about the memory of 1.

Python::

    from diffalign.pipelines import load_pipeline
    from diffalign.reno import RenoConfig, reno
    pipe = load_pipeline("stabilityai/sd-turbo", dtype="float16", device="cuda")
    result = reno(pipe, "a red circle", ["clip_score:model=ViT-B-32,pretrained=openai"], None, RenoConfig())
    result.best_image  # [3, H, W] in [0, 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffalign.errors import DiffalignError

EPILOG = """example:
  diffalign reno --model stabilityai/sd-turbo --device cuda --dtype float16 \\
      --prompt "a photo of a red cube on top of a blue sphere" \\
      --reward clip_score:model=ViT-B-32,pretrained=openai,weight=1 --reward hps:weight=5 \\
      --iters 50 --lr 5 --out outputs/reno

  diffalign reno --model assets/shapes-sd --prompts prompts.txt --reward shapes_clip --steps 4 --guidance 5 \\
      --out outputs/reno

outputs, per prompt in OUT/<index>_<slug>/: best.png (lowest reward loss), final.png, initial.png,
strip.png (every --strip-every iterations), rewards.jsonl (one line per iteration); and
OUT/summary.jsonl (initial and best reward per reward, per prompt). Only differentiable rewards
can be optimized; see reward_models/README.md for the rewards and their options."""


# ------------------------------------------------------------------------------------------- regularizer
def noise_regularizer(z: torch.Tensor) -> torch.Tensor:
    """ReNO's noise regularization term per sample (the chi-distribution norm prior; spec §7.2), in float32.

    ``R(z) = 0.5 * ||z||^2 - (d - 1) * log ||z||`` with ``d`` the number of elements of one sample
    and ``||.||`` the L2 norm over all of them: the negative log-density of the norm of a
    d-dimensional standard Gaussian (a chi distribution) up to a constant. Its minimum is at
    ``||z|| = sqrt(d - 1)``, its gradient ``z * (1 - (d - 1) / ||z||^2)``. Computed in fp32 so that
    ``||z||^2`` does not overflow in fp16. ``z``: ``[B, ...]``; returns ``[B]``.
    """
    flat = z.float().reshape(z.shape[0], -1)
    d = flat.shape[1]
    norm = torch.linalg.vector_norm(flat, dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class RenoConfig:
    """Settings of one ReNO run (defaults: ReNO ``arguments.py`` and README; spec §7.4)."""

    iters: int = 50  # iterations = images generated; iters - 1 optimizer steps
    lr: float = 5.0  # learning rate on z (ReNO: 5; 10 for HyperSDXL)
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd: momentum + Nesterov; adam: eps = adam_eps
    momentum: float = 0.9  # SGD momentum (Nesterov when nesterov=True)
    nesterov: bool = True
    adam_eps: float = 1e-2  # Adam epsilon (ReNO's alternative optimizer)
    grad_clip: float | None = 0.1  # max L2 norm of the gradient of z per step; None: no clipping
    reg_weight: float = 0.01  # lambda of the noise-norm regularizer; 0 disables it (images degrade)
    num_steps: int = 1  # sampling steps of the few-step generator (trailing DDIM); Turbo models: 1
    guidance_scale: float = 0.0  # classifier-free guidance when > 1 (Turbo models run without: 0)
    eta: float = 0.0  # DDIM eta; > 0 adds sampler noise, re-drawn from `seed` every iteration
    seed: int = 0  # seed of the initial noise z0 (and of sampler noise when eta > 0)
    size: int | None = None  # image side in pixels (square); None: the pipeline's default
    strip_every: int = 5  # keep the image of every strip_every-th iteration (and the last) for strip.png
    checkpoint: bool = True  # activation checkpointing per UNet call and for the VAE decode

    def __post_init__(self) -> None:
        if int(self.iters) < 1:
            raise DiffalignError(f"reno: iters must be >= 1 (iters - 1 optimizer steps), got {self.iters}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DiffalignError(f"reno: lr must be a positive number, got {self.lr} (ReNO uses 5)")
        if self.optimizer not in ("sgd", "adam"):
            raise DiffalignError(f"reno: optimizer must be sgd or adam, got {self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise DiffalignError(f"reno: momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise DiffalignError("reno: Nesterov SGD needs momentum > 0; set momentum=0.9 or nesterov=False")
        if self.adam_eps <= 0:
            raise DiffalignError(f"reno: adam_eps must be > 0, got {self.adam_eps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise DiffalignError(f"reno: grad_clip must be > 0 (or None for no clipping), got {self.grad_clip}")
        if not (math.isfinite(self.reg_weight) and self.reg_weight >= 0):
            raise DiffalignError(f"reno: reg_weight must be >= 0, got {self.reg_weight} (ReNO uses 0.01)")
        if not 1 <= int(self.num_steps) <= 1000:
            raise DiffalignError(
                f"reno: num_steps must be between 1 and 1000, got {self.num_steps} (one-step models: 1; few-step: 2-4)"
            )
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise DiffalignError(
                f"reno: guidance_scale must be >= 0, got {self.guidance_scale} (0 for Turbo models, > 1 for CFG)"
            )
        if not 0.0 <= self.eta <= 1.0:
            raise DiffalignError(f"reno: eta must be in [0, 1], got {self.eta} (0: deterministic DDIM)")
        if self.size is not None and int(self.size) < 8:
            raise DiffalignError(f"reno: size must be at least 8 pixels, got {self.size}")
        if int(self.strip_every) < 1:
            raise DiffalignError(f"reno: strip_every must be >= 1, got {self.strip_every}")
        self.iters, self.num_steps, self.strip_every = int(self.iters), int(self.num_steps), int(self.strip_every)


# ------------------------------------------------------------------------------------------------ result
@dataclass
class RenoRecord:
    """One iteration: reward values (raw, not weighted), losses, gradient norm (before clipping), time."""

    iter: int
    rewards: dict[str, float]
    loss_reward: float  # L_R = -sum_i w_i r_i (what selects the best image)
    reg: float  # R(z), unweighted
    loss: float  # L_R + lambda R(z)
    grad_norm: float | None  # ||dL/dz|| before clipping; None on the last iteration (no step)
    z_norm: float  # ||z|| of the noise that generated this iteration's image
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RenoResult:
    """Output of :func:`reno`: images ``[3, H, W]`` in [0, 1] (CPU, float32), latents and the history."""

    prompt: str
    best_image: torch.Tensor
    best_iter: int
    best_rewards: dict[str, float]
    best_loss: float  # L_R of the best image
    initial_image: torch.Tensor
    final_image: torch.Tensor
    best_latents: torch.Tensor  # the z that generated best_image ([1, C, h, w], float32)
    final_latents: torch.Tensor  # z after iters - 1 steps
    records: list[RenoRecord]
    strip: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (iteration, image)

    @property
    def initial_rewards(self) -> dict[str, float]:
        return self.records[0].rewards

    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken: one per iteration but the last."""
        return sum(r.grad_norm is not None for r in self.records)


# ----------------------------------------------------------------------------------------------- rewards
RewardLike = Any  # a reward_models.Reward, or any module/callable with `differentiable` and `name`


def _require_differentiable(rewards: Sequence[RewardLike]) -> None:
    """One-line error before any work if a reward cannot pass gradients to the pixels."""
    from reward_models import Reward, RewardSpec, require_differentiable

    registered = [r for r in rewards if isinstance(r, (str, RewardSpec, Reward))]
    require_differentiable(registered, "reno")
    for r in rewards:
        if not isinstance(r, (str, RewardSpec, Reward)) and not getattr(r, "differentiable", False):
            name = getattr(r, "name", type(r).__name__)
            raise DiffalignError(
                f"method 'reno' backpropagates through the reward, but reward '{name}' is not marked "
                "differentiable (set differentiable = True on it if gradients reach the pixels)"
            )


def build_rewards(
    rewards: Sequence[RewardLike], weights: Sequence[float] | None, device: torch.device | str
) -> tuple[list[RewardLike], list[float], list[str]]:
    """Rewards (built from spec strings on ``device``), their weights and unique names.

    Weights default to each spec's ``weight=`` (1.0 when absent). Raises :class:`DiffalignError` for
    no rewards, a non-differentiable reward, a bad spec or a weight count that does not match.
    """
    from reward_models import get_reward

    if not rewards:
        raise DiffalignError(
            "reno needs at least one reward, e.g. --reward clip_score:model=ViT-B-32,pretrained=openai"
        )
    rewards = list(rewards)
    _require_differentiable(rewards)
    built = [get_reward(r, device=device) if isinstance(r, str) else r for r in rewards]
    if weights is None:
        weights = [float(getattr(getattr(r, "spec", None), "weight", 1.0)) for r in built]
    weights = [float(w) for w in weights]
    if len(weights) != len(built):
        raise DiffalignError(f"reno: got {len(weights)} weights for {len(built)} rewards; give one weight per reward")
    if not all(math.isfinite(w) for w in weights):
        raise DiffalignError(f"reno: reward weights must be finite numbers, got {weights}")
    names = [str(getattr(r, "name", type(r).__name__)) for r in built]
    if len(set(names)) < len(names):  # the same reward twice: name them by spec, then by position
        names = [str(getattr(r, "spec", n)) for r, n in zip(built, names, strict=True)]
        names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
    return built, weights, names


# --------------------------------------------------------------------------------------------- generator
def reno_scheduler(pipe, num_steps: int):
    """A DDIM scheduler with trailing timesteps from the pipeline's scheduler config, set to ``num_steps``.

    Trailing spacing starts at ``t = 999`` (pure noise), as SD-Turbo and SDXL-Turbo sample; the
    pipeline's own scheduler is left untouched.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    sched.set_timesteps(num_steps, device=pipe.unet.device)
    return sched


def _conditioning(pipe, prompt: str, guidance: bool, size: tuple[int, int]):
    from diffalign.pipelines import default_size, encode_prompts, family_of

    cond = encode_prompts(pipe, [prompt], guidance=guidance)
    if family_of(pipe) == "sdxl" and size != default_size(pipe):
        # SDXL micro-conditioning: original and target size = the generated size (as diffusers does)
        time_ids = pipe._get_add_time_ids(
            size,
            (0, 0),
            size,
            dtype=cond.cond.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(cond.cond.device)
        cond.added_cond["time_ids"] = time_ids
        if cond.added_uncond is not None:
            cond.added_uncond["time_ids"] = time_ids
    return cond


def initial_noise(pipe, cfg: RenoConfig) -> torch.Tensor:
    """z0 ~ N(0, I) drawn as the diffusers pipeline draws its latents for ``cfg.seed`` (float32, [1, C, h, w])."""
    from diffalign.pipelines import default_size, initial_latents

    h, w = (cfg.size, cfg.size) if cfg.size else default_size(pipe)
    gen = torch.Generator(pipe.unet.device).manual_seed(cfg.seed)
    z = initial_latents(pipe, 1, gen, h, w).float()
    sigma = float(pipe.scheduler.init_noise_sigma)
    return z / sigma if sigma != 1.0 else z


def noise_scale(pipe, num_steps: int) -> float:
    """Factor ``s`` with ``x_T = s * z`` so that the first UNet input equals the shipped pipeline's.

    The shipped scheduler draws ``latents = init_noise_sigma * z`` and feeds the UNet
    ``scale_model_input(latents, t0)``; DDIM feeds ``x_T`` itself. For DDIM-shipped models ``s = 1``;
    for Euler(-ancestral) with trailing spacing (SD-Turbo, SDXL-Turbo) diffusers starts from
    ``sigma_max * z``, i.e. ``s = sigma_max / sqrt(sigma_max^2 + 1) = sqrt(1 - alpha_bar_999)`` (0.9977),
    so that iteration 0 of ReNO is exactly the image ``pipe(prompt, num_inference_steps=1)`` returns.
    """
    shipped = type(pipe.scheduler).from_config(pipe.scheduler.config)
    shipped.set_timesteps(num_steps)
    probe = torch.ones(1) * float(shipped.init_noise_sigma)
    return float(shipped.scale_model_input(probe, shipped.timesteps[0])[0])


def make_generator(pipe, prompt: str, cfg: RenoConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """``G(z) -> images [1, 3, H, W]`` in [0, 1], differentiable in ``z`` (spec §7.3).

    Trailing DDIM with ``cfg.num_steps`` steps (eta ``cfg.eta``; its noise fixed by ``cfg.seed``, i.e.
    re-seeded every call) from ``x_T = s * z`` (``s`` from :func:`noise_scale`), output = the last
    step's predicted x0, decoded by the VAE.
    """
    from diffalign.pipelines import decode, default_size
    from diffalign.sampling import make_denoiser, sample_differentiable

    size = (cfg.size, cfg.size) if cfg.size else default_size(pipe)
    if size[0] % pipe.vae_scale_factor:
        raise DiffalignError(f"reno: size {size[0]} must be a multiple of the VAE factor {pipe.vae_scale_factor}")
    sched = reno_scheduler(pipe, cfg.num_steps)
    with torch.no_grad():
        cond = _conditioning(pipe, prompt, cfg.guidance_scale > 1.0, size)
    denoise = make_denoiser(pipe.unet, guidance_scale=cfg.guidance_scale, **cond.denoiser_kwargs())
    dtype = pipe.unet.dtype
    scale = noise_scale(pipe, cfg.num_steps)
    noises = None
    if cfg.eta > 0:
        shape = (1, pipe.unet.config.in_channels, size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
        gen = torch.Generator(pipe.unet.device).manual_seed(cfg.seed + 1)
        noises = [torch.randn(shape, generator=gen, device=pipe.unet.device, dtype=dtype) for _ in range(cfg.num_steps)]

    def generate(z: torch.Tensor) -> torch.Tensor:
        x_t = (z * scale if scale != 1.0 else z).to(dtype)
        _, x0 = sample_differentiable(denoise, sched, x_t, eta=cfg.eta, noises=noises, checkpoint=cfg.checkpoint)
        return decode(pipe, x0, differentiable=True, checkpoint=cfg.checkpoint)

    return generate


def _ensure_lora(pipe, lora: str | Path | None) -> None:
    """Load a LoRA once per pipeline (a second call with the same path is a no-op)."""
    if lora is None:
        return
    from diffalign.pipelines import load_lora

    key = str(Path(lora).expanduser().resolve())
    if getattr(pipe, "_reno_lora", None) == key:
        return
    if getattr(pipe, "_reno_lora", None) is not None:
        raise DiffalignError(
            f"this pipeline already carries the LoRA {pipe._reno_lora}; load a fresh pipeline for {lora}"
        )
    load_lora(pipe, lora)
    pipe._reno_lora = key


# -------------------------------------------------------------------------------------------------- loop
def reno(
    pipe,
    prompt: str,
    rewards: Sequence[RewardLike],
    weights: Sequence[float] | None = None,
    cfg: RenoConfig | None = None,
    lora: str | Path | None = None,
    latents: torch.Tensor | None = None,
    progress: bool = False,
) -> RenoResult:
    """Optimize the initial noise of ``pipe`` for ``prompt`` against ``rewards`` (ReNO's loop, spec §7.2).

    Args:
        pipe: a diffusers SD / SDXL pipeline (e.g. from :func:`diffalign.pipelines.load_pipeline`);
            weights are not changed. One-step models (SD-Turbo, SDXL-Turbo) with ``num_steps=1``;
            ordinary pipelines with a few steps (and ``guidance_scale > 1`` if they need CFG).
        prompt: the text prompt.
        rewards: differentiable rewards, built (``reward_models.Reward`` or any module with
            ``differentiable`` and ``name``) or as spec strings (built on the pipeline's device).
        weights: one per reward (``L_R = -sum_i w_i r_i``); default: each spec's ``weight=`` or 1.
        cfg: :class:`RenoConfig` (defaults of the paper).
        lora: optional LoRA directory (diffusers format, e.g. written by ``diffalign train``) loaded
            onto ``pipe`` once and kept there.
        latents: initial noise ``z`` ``[1, C, h, w]`` in standard-Gaussian units; default drawn from
            ``cfg.seed`` exactly as the diffusers pipeline draws it.
        progress: show a tqdm bar with the live reward values.

    Returns a :class:`RenoResult`; the best image minimizes ``L_R`` (the regularizer excluded) over
    all ``cfg.iters`` generated images, iteration 0 (the base sample) included.
    """
    cfg = cfg or RenoConfig()
    if not isinstance(prompt, str) or not prompt.strip():
        raise DiffalignError("reno: the prompt is empty; pass some text")
    device = pipe.unet.device
    built, weights, names = build_rewards(rewards, weights, device)
    _ensure_lora(pipe, lora)
    generate = make_generator(pipe, prompt, cfg)
    z0 = initial_noise(pipe, cfg) if latents is None else latents.detach().to(device=device, dtype=torch.float32)
    z = z0.clone().requires_grad_(True)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD([z], lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        opt = torch.optim.Adam([z], lr=cfg.lr, eps=cfg.adam_eps)

    records: list[RenoRecord] = []
    strip: list[tuple[int, torch.Tensor]] = []
    best: tuple[float, int, torch.Tensor, torch.Tensor, dict[str, float]] | None = None
    initial = final = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iters, desc=f"reno {prompt[:30]!r}", unit="it", leave=False)
    try:
        for it in range(cfg.iters):
            t0 = time.perf_counter()
            last = it == cfg.iters - 1
            z_norm = float(z.detach().float().norm())
            # 1. image from the current noise (gradients reach z only: weights are frozen or not asked for)
            image = generate(z)
            # 2. reward losses l_i = -r_i and L_R = sum_i w_i l_i
            values = [r(image, [prompt]).reshape(-1)[0] for r in built]
            loss_reward = sum(
                (-w * v for w, v in zip(weights, values, strict=True)), torch.zeros((), device=image.device)
            )
            # 3. regularizer R(z) in fp32 (spec §7.2) and L = L_R + lambda R(z)
            reg = noise_regularizer(z).sum()
            loss = loss_reward + cfg.reg_weight * reg
            # 4. keep the image if L_R is the lowest so far (regularizer excluded, as ReNO selects)
            scores = {n: float(v.detach()) for n, v in zip(names, values, strict=True)}
            lr_value = float(loss_reward.detach())
            img = image[0].detach().float().cpu()
            if best is None or lr_value < best[0]:
                best = (lr_value, it, img, z.detach().clone(), scores)
            if it == 0:
                initial = img
            if it % cfg.strip_every == 0 or last:
                strip.append((it, img))
            final = img
            # 5. except on the last iteration: backprop to z, clip its gradient norm, optimizer step
            grad_norm = None
            if not last:
                (grad,) = torch.autograd.grad(loss, [z])
                z.grad = grad
                if cfg.grad_clip is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_([z], cfg.grad_clip))
                else:
                    grad_norm = float(grad.norm())
                opt.step()
                opt.zero_grad(set_to_none=True)
            records.append(
                RenoRecord(
                    iter=it,
                    rewards=scores,
                    loss_reward=lr_value,
                    reg=float(reg.detach()),
                    loss=float(loss.detach()),
                    grad_norm=grad_norm,
                    z_norm=z_norm,
                    seconds=time.perf_counter() - t0,
                )
            )
            if bar is not None:
                bar.set_postfix({n: f"{v:.4g}" for n, v in scores.items()} | {"best": f"{-best[0]:.4g}"})
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    assert best is not None and initial is not None and final is not None
    return RenoResult(
        prompt=prompt,
        best_image=best[2],
        best_iter=best[1],
        best_rewards=best[4],
        best_loss=best[0],
        initial_image=initial,
        final_image=final,
        best_latents=best[3].cpu(),
        final_latents=z.detach().cpu(),
        records=records,
        strip=strip,
    )


# ------------------------------------------------------------------------------------------------ output
def strip_image(strip: Sequence[tuple[int, torch.Tensor]], min_side: int = 96):
    """The strip images side by side (upscaled to ``min_side`` px), each labelled with its iteration."""
    from PIL import Image, ImageDraw

    from diffalign.gallery import to_pil

    tiles = [(it, to_pil(img)) for it, img in strip]
    w, h = tiles[0][1].size
    scale = max(1, math.ceil(min_side / min(w, h)))
    w, h = w * scale, h * scale
    band, pad = 14, 2
    canvas = Image.new("RGB", (len(tiles) * (w + pad) + pad, h + band + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (it, tile) in enumerate(tiles):
        x = pad + k * (w + pad)
        canvas.paste(tile.resize((w, h), Image.Resampling.NEAREST), (x, pad + band))
        draw.text((x + 2, pad), f"it {it}", fill=(0, 0, 0))
    return canvas


@contextlib.contextmanager
def _writing(where: Path) -> Iterator[None]:
    """Turn a failed write under ``where`` (disk full, permissions, a file in the way) into a one-line error."""
    from diffalign.checkpoint import is_write_failure, one_line, write_fix

    try:
        yield
    except Exception as err:
        if not is_write_failure(err):
            raise
        raise DiffalignError(
            f"cannot write ReNO results to {where} ({one_line(err)}); {write_fix(err, where)} or choose another --out"
        ) from None


def check_out_dir(out: Path, dirs: Sequence[str] = ()) -> None:
    """Refuse, before any model loads, an ``--out`` that cannot hold the results.

    ``out`` must be a directory or creatable (no file at it or among its parents) and writable; the
    per-prompt folders ``dirs`` inside it and ``summary.jsonl`` must not be of the wrong kind.
    Nothing is created or changed here.
    """
    fix = "choose another --out"
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--out {out} is an existing file, not a directory; {fix}")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DiffalignError(f"cannot create --out {out}: {existing} is a file, not a directory; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DiffalignError(f"cannot write --out {out}: {existing} is not writable by this user; {fix}")
    for name in dirs:
        if (out / name).exists() and not (out / name).is_dir():
            raise DiffalignError(f"{out / name} is a file, but ReNO writes its results into a folder there; {fix}")
    if (out / "summary.jsonl").is_dir():
        raise DiffalignError(f"{out / 'summary.jsonl'} is a directory, but ReNO writes a file there; {fix}")


def result_dir_name(index: int, prompt: str) -> str:
    """The folder of prompt number ``index`` inside ``--out``: ``000_a-red-circle``."""
    from diffalign.gallery import slug

    return f"{index:03d}_{slug(prompt)}"


def save_result(result: RenoResult, out_dir: Path) -> Path:
    """Write best.png, final.png, initial.png, strip.png and rewards.jsonl into ``out_dir``.

    A failed write (disk full, not writable, a file where a folder belongs) is a :class:`DiffalignError`.
    """
    from diffalign.gallery import to_pil

    with _writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        to_pil(result.best_image).save(out_dir / "best.png")
        to_pil(result.final_image).save(out_dir / "final.png")
        to_pil(result.initial_image).save(out_dir / "initial.png")
        strip_image(result.strip).save(out_dir / "strip.png")
        with (out_dir / "rewards.jsonl").open("w", encoding="utf-8") as fh:
            for rec in result.records:
                fh.write(json.dumps(rec.to_json()) + "\n")
    return out_dir


def summary_row(index: int, result: RenoResult, out_dir: Path) -> dict[str, Any]:
    return {
        "index": index,
        "prompt": result.prompt,
        "dir": out_dir.name,
        "best_iter": result.best_iter,
        "initial": result.initial_rewards,
        "best": result.best_rewards,
        "initial_loss": result.records[0].loss_reward,
        "best_loss": result.best_loss,
        "seconds_per_iter": sum(r.seconds for r in result.records) / len(result.records),
    }


def run(args: argparse.Namespace) -> int:
    """Entry point of ``diffalign reno`` (``args`` from the parser :func:`register` builds)."""
    from diffalign.cli import read_prompts
    from diffalign.pipelines import load_pipeline, lora_rank
    from reward_models import RewardSpec

    prompts = read_prompts(args.prompt, args.prompts)
    out = Path(args.out)
    check_out_dir(out, [result_dir_name(i, p) for i, p in enumerate(prompts)])
    cfg = RenoConfig(
        iters=args.iters,
        lr=args.lr,
        optimizer=args.optimizer,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        reg_weight=args.reg_weight,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        size=args.size,
        strip_every=args.strip_every,
        checkpoint=not args.no_checkpoint,
    )
    specs = [RewardSpec.parse(s) for s in args.reward]
    _require_differentiable(specs)  # before loading anything
    if args.lora:
        lora_rank(args.lora)  # a missing or damaged LoRA file fails here, before the model loads
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError) as err:
        raise DiffalignError(f"unknown device {args.device!r}: {err}") from None
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device, scheduler="keep")  # see noise_scale
    rewards, weights, names = build_rewards(list(args.reward), None, device)
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(prompts):
        result = reno(pipe, prompt, rewards, weights, cfg, lora=args.lora, progress=True)
        out_dir = save_result(result, out / result_dir_name(i, prompt))
        rows.append(summary_row(i, result, out_dir))
        gains = ", ".join(f"{n} {result.initial_rewards[n]:.4g} -> {result.best_rewards[n]:.4g}" for n in names)
        print(f"[{i + 1}/{len(prompts)}] {prompt!r}: best at iteration {result.best_iter}: {gains}")
    with _writing(out), (out / "summary.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {len(prompts)} result folder(s) and summary.jsonl to {out}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reno`` subcommand to an ``argparse`` subparsers object; ``func`` is :func:`run`."""
    d = RenoConfig()
    p = subparsers.add_parser(
        "reno",
        help="optimize the initial noise of a one-/few-step model for rewards (ReNO, no training)",
        description="ReNO (Eyring et al. 2024): per prompt, optimize the initial noise of a frozen one-step or "
        "few-step generator with differentiable rewards and a noise-norm regularizer; keep the best image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line")
    p.add_argument("--model", required=True, metavar="ID_OR_PATH", help="hub id or local diffusers pipeline directory")
    p.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[:key=value,...,weight=W]",
        help="a differentiable reward spec; repeat for several (weights via weight=W, default 1)",
    )
    p.add_argument(
        "--iters", type=int, default=d.iters, help=f"iterations (iters - 1 optimizer steps; default {d.iters})"
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate on the noise (default {d.lr:g})")
    p.add_argument(
        "--optimizer", choices=("sgd", "adam"), default=d.optimizer, help="sgd (Nesterov, momentum 0.9) or adam"
    )
    p.add_argument(
        "--grad-clip", type=float, default=d.grad_clip, help="max gradient norm of z; 0 disables (default 0.1)"
    )
    p.add_argument(
        "--reg-weight", type=float, default=d.reg_weight, help="lambda of the noise regularizer (default 0.01)"
    )
    p.add_argument(
        "--steps", type=int, default=d.num_steps, help="sampling steps, trailing DDIM (default 1: Turbo models)"
    )
    p.add_argument("--guidance", type=float, default=d.guidance_scale, help="CFG scale; <= 1 disables (default 0)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initial noise (default 0)")
    p.add_argument("--strip-every", type=int, default=d.strip_every, help="strip.png shows every N-th iteration")
    p.add_argument(
        "--no-checkpoint", action="store_true", help="disable activation checkpointing (faster, more memory)"
    )
    p.add_argument("--lora", metavar="DIR", help="LoRA directory (diffusers format) applied to the model")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16 or bfloat16 (default float32)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=run)
    return p
