"""ReNO's generator ``G(z, c)``: a few-step sampler built from a diffusers pipeline (spec §7.3).

UNet pipelines (SD, SDXL, SD-Turbo, SDXL-Turbo):
A DDIM sampler (eta = 0) with ``timestep_spacing="trailing"`` built from the pipeline's own scheduler
config, run with :func:`diffalign.sampling.sample_differentiable`, whose output is the clean-image
prediction ``x0_hat`` of the last step, decoded by the VAE. With one step from ``t = 999`` this is
exactly the SD-Turbo / SDXL-Turbo one-step image of diffusers (their Euler-ancestral scheduler,
trailing spacing, predicts ``x0_hat`` from ``sigma_max`` and lands on sigma 0; ``x_T`` is scaled as
that scheduler scales it, see :func:`noise_scale`); with a few steps it is the deterministic
few-step sampler of the same model. Every UNet call is wrapped in activation checkpointing
(``checkpoint=True``) so that 4 steps cost about the memory of 1. The pipeline's scheduler and
weights are never changed (a ``lora`` is loaded once, see :func:`ensure_lora`).

Flow-matching pipelines (SD3 / SD3.5, e.g. the few-step SD3.5-Large-Turbo): the platform's flow sampler
(:class:`diffalign.sampling.FlowMatchSampler`) on a copy of the pipeline's own scheduler, Euler ODE steps
from ``sigma = 1`` (``x_1 = z``: flow schedulers start from N(0, I)) to ``sigma = 0``, so the last
step's predicted ``x0 = x - sigma v`` is the image ``pipe(prompt, num_inference_steps=N)`` returns;
``eta > 0`` takes Flow-GRPO's SDE step with that noise level instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from diffalign.errors import DiffalignError
from diffalign.reno.core import RenoConfig


def reno_scheduler(pipe, num_steps: int, size: tuple[int, int] | None = None):
    """The generator's step rule, set to ``num_steps``; the pipeline's own scheduler is left untouched.

    UNet pipelines: a DDIM scheduler with trailing timesteps from the pipeline's scheduler config
    (trailing spacing starts at ``t = 999``, pure noise, as SD-Turbo and SDXL-Turbo sample). Flow
    pipelines: the flow sampler on a copy of the shipped flow-matching scheduler (its shift included; FLUX's
    dynamic shift for images of ``size``, default the pipeline's).
    """
    from diffalign.pipelines import backbone, flow_mu, sampler_kind

    if sampler_kind(pipe) == "flow":
        from diffalign.sampling import make_sampler

        sampler = make_sampler(type(pipe.scheduler).from_config(pipe.scheduler.config), mu=flow_mu(pipe, size))
        sampler.set_steps(num_steps)
        return sampler
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    sched.set_timesteps(num_steps, device=backbone(pipe).device)
    return sched


def conditioning(pipe, prompt: str, guidance: bool, size: tuple[int, int]):
    """The prompt's text conditioning (with the unconditional half when ``guidance``), as diffusers builds it.

    SDXL: pooled embeddings, and size micro-conditioning (``time_ids``) matched to ``size`` when it is
    not the pipeline's default.
    """
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
    from diffalign.pipelines import backbone, default_size, initial_latents

    h, w = (cfg.size, cfg.size) if cfg.size else default_size(pipe)
    gen = torch.Generator(backbone(pipe).device).manual_seed(cfg.seed)
    z = initial_latents(pipe, 1, gen, h, w).float()
    sigma = float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))  # flow-matching schedulers have none
    return z / sigma if sigma != 1.0 else z


def noise_scale(pipe, num_steps: int) -> float:
    """Factor ``s`` with ``x_T = s * z`` so that the first UNet input equals the shipped pipeline's.

    The shipped scheduler draws ``latents = init_noise_sigma * z`` and feeds the UNet
    ``scale_model_input(latents, t0)``; DDIM feeds ``x_T`` itself. For DDIM-shipped models ``s = 1``;
    for Euler(-ancestral) with trailing spacing (SD-Turbo, SDXL-Turbo) diffusers starts from
    ``sigma_max * z``, i.e. ``s = sigma_max / sqrt(sigma_max^2 + 1) = sqrt(1 - alpha_bar_999)`` (0.9977),
    so that iteration 0 of ReNO is exactly the image ``pipe(prompt, num_inference_steps=1)`` returns.
    Flow-matching pipelines start from ``z`` itself: ``s = 1``.
    """
    from diffalign.pipelines import sampler_kind

    if sampler_kind(pipe) == "flow":
        return 1.0
    shipped = type(pipe.scheduler).from_config(pipe.scheduler.config)
    shipped.set_timesteps(num_steps)
    probe = torch.ones(1) * float(shipped.init_noise_sigma)
    return float(shipped.scale_model_input(probe, shipped.timesteps[0])[0])


def make_generator(pipe, prompt: str, cfg: RenoConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """``G(z) -> images [1, 3, H, W]`` in [0, 1], differentiable in ``z`` (spec §7.3).

    :func:`reno_scheduler`'s ``cfg.num_steps`` steps (eta ``cfg.eta``; its noise fixed by ``cfg.seed``,
    i.e. re-seeded every call) from ``x_T = s * z`` (``s`` from :func:`noise_scale`), output = the last
    step's predicted x0, decoded by the VAE.
    """
    from diffalign.pipelines import backbone, decode, default_size, latent_shape
    from diffalign.sampling import make_denoiser, sample_differentiable

    size = (cfg.size, cfg.size) if cfg.size else default_size(pipe)
    if size[0] % pipe.vae_scale_factor:
        raise DiffalignError(f"reno: size {size[0]} must be a multiple of the VAE factor {pipe.vae_scale_factor}")
    sched = reno_scheduler(pipe, cfg.num_steps, size)
    with torch.no_grad():
        cond = conditioning(pipe, prompt, cfg.guidance_scale > 1.0, size)
    net = backbone(pipe)
    denoise = make_denoiser(net, guidance_scale=cfg.guidance_scale, **cond.denoiser_kwargs())
    dtype = net.dtype
    scale = noise_scale(pipe, cfg.num_steps)
    noises = None
    if cfg.eta > 0:
        shape = latent_shape(pipe, 1, *size)  # FLUX: unpacked latents, as z
        gen = torch.Generator(net.device).manual_seed(cfg.seed + 1)
        noises = [torch.randn(shape, generator=gen, device=net.device, dtype=dtype) for _ in range(cfg.num_steps)]

    def generate(z: torch.Tensor) -> torch.Tensor:
        x_t = (z * scale if scale != 1.0 else z).to(dtype)
        _, x0 = sample_differentiable(denoise, sched, x_t, eta=cfg.eta, noises=noises, checkpoint=cfg.checkpoint)
        return decode(pipe, x0, differentiable=True, checkpoint=cfg.checkpoint)

    return generate


def ensure_lora(pipe, lora: str | Path | None) -> None:
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
