"""Sampling as pure functions over tensors: a DDIM step with log-probabilities, classifier-free
guidance, predicted x0, a trajectory sampler for policy-gradient methods and a differentiable
sampler (full, last-K or randomly truncated backprop, with per-step gradient checkpointing).

Nothing here wraps itself in ``torch.no_grad``: the caller decides where gradients flow. Every
sampler takes the network as a callable ``denoise(x_t, t) -> model_output`` (conditioning and
guidance already applied, see :func:`make_denoiser`), so tests can pass a lambda.

One denoising step has one code path, :func:`denoise_step`: the network call on
``sampler.scale_model_input(x_t, t)`` (optionally checkpointed, optionally on ``sg(x_t)``), then
``sampler.step``. The trajectory sampler, the differentiable sampler (hence AlignProp, DRaFT-K, ReFL,
ReNO and evaluation), DRaFT-LV's re-noised step and DDPO's log-prob recomputation all go through it.
A :class:`Sampler` owns the timestep grid and the step rule; :class:`DDIMSampler` wraps the pure
:func:`ddim_step` below. :func:`denoise_step`, :func:`sample_trajectory` and
:func:`sample_differentiable` take a :class:`Sampler` or a diffusers scheduler, which
:func:`make_sampler` wraps, so a new sampler (a flow-matching SDE step) is one :class:`Sampler`
subclass plus :func:`register_sampler`, with no change to any method: :class:`FlowMatchSampler`
(rectified flow, SD3 and FLUX: the Euler ODE and Flow-GRPO's SDE, :func:`flow_sde_step`) was added that way.

Symbols (DDIM, Song et al. 2021, arXiv 2010.02502, Eq. 12; DDPO, Black et al. 2023, arXiv 2305.13301):

    x_t      -> ``sample``               alpha_bar_t      -> ``alphas_cumprod[t]``
    x_{t-1}  -> ``prev_sample``          alpha_bar_{t-1}  -> ``alphas_cumprod[t - 1000 // T]``
    x0_hat   -> ``pred_original_sample`` sigma_t = eta * sqrt(v_t)  -> ``std``
    mu_theta -> ``mean``                 log pi(x_{t-1} | x_t, c) -> ``log_prob``
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from diffalign.errors import DiffalignError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class StepOutput:
    """Everything one sampler step knows: the new sample, its Gaussian and the log-prob of the sample."""

    prev_sample: torch.Tensor  # x_{t-1}
    log_prob: torch.Tensor  # [B]: log pi(x_{t-1} | x_t, c), see ddim_step
    mean: torch.Tensor  # mu_theta(x_t, t)
    std: torch.Tensor  # sigma_t, broadcastable to the sample
    pred_original_sample: torch.Tensor  # x0_hat (diffusers' name)
    dt: torch.Tensor | None = None  # flow steps: sigma' - sigma (Flow-GRPO's reference KL form leaves out |dt|)

    @property
    def x0_pred(self) -> torch.Tensor:
        """The predicted clean sample x0_hat (alias of ``pred_original_sample``)."""
        return self.pred_original_sample


def _gather(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index] reshaped to broadcast against ``like`` ([B] -> [B, 1, 1, 1])."""
    out = values.to(like.device)[index.to(like.device)]
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _randn(shape: torch.Size, generator: Generator, like: torch.Tensor) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    gen = list(generator) if isinstance(generator, Sequence) else generator
    return randn_tensor(shape, generator=gen, device=like.device, dtype=like.dtype)


def _draw_and_score(
    mean: torch.Tensor,
    std: torch.Tensor,
    stochastic: bool,
    prev_sample: torch.Tensor | None,
    noise: torch.Tensor | None,
    generator: Generator,
    like: torch.Tensor,
    out_dtype: torch.dtype,
    reduction: Literal["mean", "sum"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's sample (``prev_sample`` if given, else ``mean + std z`` when ``stochastic``, else ``mean``;
    rounded through ``out_dtype`` so that rescoring a half-precision rollout gives the same log-prob) and the
    Gaussian log-density of its detached value (spec §1.2 item 6: only ``mean`` carries gradient); z is
    ``noise`` or drawn from ``generator`` with the shape, device and dtype of ``like``."""
    if prev_sample is None:
        if stochastic:
            z = noise if noise is not None else _randn(like.shape, generator, like).float()
            prev_sample = mean + std * z
        else:
            prev_sample = mean
        prev_sample = prev_sample.to(out_dtype).to(mean.dtype)  # no-op in float32
    return prev_sample, gaussian_log_prob(prev_sample.detach(), mean, std, reduction)


def predict_x0_eps(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted x0 and epsilon from a model output (DDIM Eq. 12's first term; spec §1.2 item 2)."""
    beta_bar_t = 1 - alpha_bar_t
    if prediction_type == "epsilon":
        return (sample - beta_bar_t.sqrt() * model_output) / alpha_bar_t.sqrt(), model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_bar_t.sqrt() * model_output) / beta_bar_t.sqrt()
    if prediction_type == "v_prediction":
        x0 = alpha_bar_t.sqrt() * sample - beta_bar_t.sqrt() * model_output
        return x0, alpha_bar_t.sqrt() * model_output + beta_bar_t.sqrt() * sample
    raise DiffalignError(f"unsupported prediction_type {prediction_type!r}; expected epsilon, sample or v_prediction")


def _ddim_x0_eps(
    scheduler, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted x0 and epsilon, x0 clipped or thresholded as the scheduler config says (spec §1.2 item 2)."""
    cfg = scheduler.config
    x0, eps = predict_x0_eps(cfg.prediction_type, model_output, sample, alpha_bar_t)
    if cfg.get("thresholding", False):
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return x0, eps


def ddim_step(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: Generator = None,
    noise: torch.Tensor | None = None,
    logprob_reduction: Literal["mean", "sum"] = "mean",
) -> StepOutput:
    """One DDIM step x_t -> x_{t-1} with the Gaussian log-density of x_{t-1} (DDIM Eq. 12 and 16).

    ``timestep`` is an int or a per-sample tensor ``[B]``. If ``prev_sample`` is given it is scored
    (policy-gradient training on stored trajectories), otherwise one is drawn with ``noise`` or
    ``generator``. ``scheduler`` is a diffusers ``DDIMScheduler`` after ``set_timesteps``; its
    ``final_alpha_cumprod`` is used past the first training timestep, exactly as diffusers does
    (for Stable Diffusion's ``set_alpha_to_one=False`` this equals DDPO's clamping).
    """
    if scheduler.num_inference_steps is None:
        raise DiffalignError("call scheduler.set_timesteps(num_steps) before ddim_step")
    cfg = scheduler.config
    batch = sample.shape[0]
    # 0. fp16 / bf16 inputs: compute in float32 (1 - alpha_bar rounds to 0 near t = 0 in half precision),
    #    round x_{t-1} to the input dtype before scoring it, return x_{t-1} in that dtype
    out_dtype = sample.dtype
    model_output_in = model_output
    if out_dtype in (torch.float16, torch.bfloat16):
        model_output, sample = model_output.float(), sample.float()
        prev_sample = None if prev_sample is None else prev_sample.float()
        noise = None if noise is None else noise.float()
    t = torch.as_tensor(timestep, device="cpu").long().reshape(-1).expand(batch)
    # 1. previous grid timestep t' = t - N_train / T
    prev_t = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    # 2. alpha_bar_t and alpha_bar_{t'} (final_alpha_cumprod when t' < 0)
    alphas = torch.cat([scheduler.alphas_cumprod, scheduler.final_alpha_cumprod.reshape(1)])
    a_t = _gather(alphas, t, sample)
    a_prev = _gather(alphas, torch.where(prev_t >= 0, prev_t, torch.full_like(prev_t, len(alphas) - 1)), sample)
    # 3. predicted x0 and epsilon, optional clipping as configured
    x0, eps = _ddim_x0_eps(scheduler, model_output, sample, a_t)
    # 4. sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))   (DDIM Eq. 16)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    # 5. mean mu = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps   (DDIM Eq. 12)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    # 6. draw x_{t-1} unless given; 7. Gaussian log-density of sg(x_{t-1}) (spec §1.2 item 6)
    prev_sample, log_prob = _draw_and_score(
        mean, std, eta > 0, prev_sample, noise, generator, model_output_in, out_dtype, logprob_reduction
    )
    return StepOutput(prev_sample.to(out_dtype), log_prob, mean, std, x0)


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Per-sample log N(x; mean, std^2), averaged (DDPO's convention) or summed over non-batch dims."""
    std = std.expand_as(mean) if std.shape != mean.shape else std
    elem = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, elem.ndim))
    if reduction == "mean":
        return elem.mean(dim=dims)
    if reduction == "sum":
        return elem.sum(dim=dims)
    raise DiffalignError(f"logprob_reduction must be 'mean' or 'sum', got {reduction!r}")


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: Generator = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPO's step: ``(prev_sample, log_prob)`` with log_prob averaged over non-batch dims.

    The public entry point for policy-gradient methods; see :func:`ddim_step` for the full output.
    """
    out = ddim_step(scheduler, model_output, timestep, sample, eta, prev_sample, generator)
    return out.prev_sample, out.log_prob


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance e_u + w (e_c - e_u) (Ho & Salimans 2022), with optional rescale
    phi (Lin et al. 2023, arXiv 2305.08891, Eq. 15-16)."""
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = tuple(range(1, cond.ndim))
        factor = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = rescale * guided * factor + (1 - rescale) * guided
    return guided


def make_denoiser(
    unet: torch.nn.Module,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    added_cond: dict[str, torch.Tensor] | None = None,
    added_uncond: dict[str, torch.Tensor] | None = None,
    guidance_rescale: float = 0.0,
) -> Denoiser:
    """``denoise(x, t)`` for a diffusers UNet, SD3 or FLUX transformer: one batched forward on [uncond; cond] when guiding.

    ``added_cond`` carries SDXL's ``text_embeds`` and ``time_ids`` (per batch row), or SD3's
    ``pooled_projections``. An SD3 transformer (``SD3Transformer2DModel``, the network is recognized by
    its ``pooled_projection_dim``) is called as ``StableDiffusion3Pipeline`` calls it, with the flow
    timestep ``t = 1000 sigma``; guidance is the same ``e_u + w (e_c - e_u)`` on the velocity (SD3 applies
    no guidance rescale, so ``guidance_rescale`` should stay 0 there).

    A FLUX transformer (:func:`is_flux_transformer`) is called as ``FluxPipeline`` calls it
    (:func:`_make_flux_denoiser`): ``x`` stays ``[B, C, H, W]`` and is packed into 2x2 tokens for the call;
    ``guidance_scale`` is FLUX-dev's distilled guidance embedding, not CFG.
    """
    guide = uncond is not None and guidance_scale != 1.0
    if is_flux_transformer(unet):
        return _make_flux_denoiser(unet, cond, uncond, guidance_scale, added_cond, added_uncond)
    if getattr(getattr(unet, "config", None), "pooled_projection_dim", None) is not None:
        return _make_transformer_denoiser(unet, cond, uncond, guidance_scale, added_cond, added_uncond, guide)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if not guide:
            return unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added_cond).sample
        kwargs = None
        if added_cond is not None:
            kwargs = {k: torch.cat([added_uncond[k], added_cond[k]]) for k in added_cond}
        out = unet(
            torch.cat([x, x]),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([uncond, cond]),
            added_cond_kwargs=kwargs,
        ).sample
        e_u, e_c = out.chunk(2)
        return cfg_combine(e_u, e_c, guidance_scale, guidance_rescale)

    return denoise


def _make_transformer_denoiser(
    transformer: torch.nn.Module,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    added_cond: dict[str, torch.Tensor] | None,
    added_uncond: dict[str, torch.Tensor] | None,
    guide: bool,
) -> Denoiser:
    """``denoise(x, t)`` of an SD3 MMDiT: ``transformer(hidden_states, timestep, encoder_hidden_states,
    pooled_projections)``, with CFG on one batched [uncond; cond] forward as ``StableDiffusion3Pipeline``."""
    if not added_cond or "pooled_projections" not in added_cond:
        raise DiffalignError("an SD3 transformer needs pooled_projections (encode prompts with encode_prompts)")
    if guide and (not added_uncond or "pooled_projections" not in added_uncond):
        raise DiffalignError("guidance with an SD3 transformer needs the unconditional pooled_projections")
    pooled = added_cond["pooled_projections"]

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if not guide:
            return transformer(
                hidden_states=x, timestep=t, encoder_hidden_states=cond, pooled_projections=pooled, return_dict=False
            )[0]
        out = transformer(
            hidden_states=torch.cat([x, x]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([uncond, cond]),
            pooled_projections=torch.cat([added_uncond["pooled_projections"], pooled]),
            return_dict=False,
        )[0]
        v_u, v_c = out.chunk(2)
        return cfg_combine(v_u, v_c, guidance_scale)

    return denoise


def is_flux_transformer(net: torch.nn.Module) -> bool:
    """Is ``net`` a FLUX transformer (``FluxTransformer2DModel``: its config has ``guidance_embeds``)?"""
    return getattr(getattr(net, "config", None), "guidance_embeds", None) is not None


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing ``[B, C, H, W] -> [B, (H/2)(W/2), 4C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``[B, (H/2)(W/2), 4C] -> [B, C, H, W]`` for latent size ``H x W``."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def flux_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """FLUX's positions of the packed image tokens ``[(H/2)(W/2), 3]``: (0, row, column) for latent size H x W
    (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _make_flux_denoiser(
    transformer: torch.nn.Module,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    added_cond: dict[str, torch.Tensor] | None,
    added_uncond: dict[str, torch.Tensor] | None,
) -> Denoiser:
    """``denoise(x, t)`` of a FLUX transformer, as ``FluxPipeline.__call__`` calls it: ``x`` [B, C, H, W] packed
    into tokens (:func:`pack_latents`), ``timestep = t / 1000``, ``guidance`` = the scale for every row when the
    model has a guidance embedding (FLUX-dev; FLUX-schnell has none), CLIP's ``pooled_projections``, T5's
    ``encoder_hidden_states`` with zero ``txt_ids``, the image tokens' ``img_ids``; the velocity unpacked.
    FLUX has no CFG here (``uncond`` must be None: FluxPipeline's true CFG is not supported)."""
    if not added_cond or "pooled_projections" not in added_cond:
        raise DiffalignError("a FLUX transformer needs pooled_projections (encode prompts with encode_prompts)")
    if uncond is not None:
        raise DiffalignError("FLUX samples with its guidance embedding, not CFG: encode prompts without an uncond half")
    del added_uncond
    pooled = added_cond["pooled_projections"]
    text_ids = torch.zeros(cond.shape[1], 3, device=cond.device, dtype=cond.dtype)
    embeds = bool(transformer.config.guidance_embeds)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).to(x.dtype)
        guidance = torch.full([1], guidance_scale, device=x.device, dtype=torch.float32).expand(b) if embeds else None
        out = transformer(
            hidden_states=pack_latents(x),
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=cond,
            txt_ids=text_ids,
            img_ids=flux_image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    return denoise


# ------------------------------------------------------------------------------------- the sampler
class Sampler(ABC):
    """A reverse-diffusion sampler: a timestep grid and a step rule ``x_t -> x_{t-1}`` with its log-density.

    ``t`` is always a value of :attr:`timesteps` (what the network sees), a Python number, a 0-d
    tensor or a per-sample tensor ``[B]`` (DDPO rescoring stored transitions at different steps).
    Implementations wrap a diffusers scheduler (:attr:`scheduler`, None for a standalone sampler);
    :func:`make_sampler` builds one per call, so they should hold settings, not sampling state.
    """

    scheduler: Any = None
    kind: str = "custom"  # the step-rule family: "ddim", "flow" (what MethodEntry.samplers names)

    @property
    @abstractmethod
    def timesteps(self) -> torch.Tensor:
        """The sampling grid t_T > ... > t_1 in sampling order (after :meth:`set_steps`)."""

    @abstractmethod
    def set_steps(self, num_steps: int, device: str | torch.device | None = None) -> None:
        """Set the grid to ``num_steps`` sampling steps."""

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial noise: x_T = init_noise_sigma * z, z ~ N(0, I)."""
        return 1.0

    def scale_model_input(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """What the network sees of ``x_t`` at ``t`` (the identity unless the parameterization says otherwise)."""
        return x_t

    @abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        t: int | torch.Tensor,
        x_t: torch.Tensor,
        eta: float = 1.0,
        *,
        generator: Generator = None,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step from the network output at ``(x_t, t)``.

        Draws ``x_{t-1} = mean + std * z`` with ``z = noise`` (or drawn from ``generator``), or scores
        the given ``prev_sample`` (policy gradients on stored trajectories); ``log_prob`` is the
        Gaussian log-density of ``sg(x_{t-1})``, so gradients reach it only through ``mean``.
        """

    @abstractmethod
    def predict_x0(self, model_output: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The clean-sample prediction x0_hat of the network output at ``(x_t, t)``."""


class SchedulerSampler(Sampler):
    """A :class:`Sampler` over a diffusers scheduler: the grid is the scheduler's (``set_timesteps``);
    ``logprob_reduction`` (mean or sum over latent elements) is what :meth:`step` returns."""

    def __init__(self, scheduler, logprob_reduction: Literal["mean", "sum"] = "mean") -> None:
        self.scheduler = scheduler
        self.logprob_reduction = logprob_reduction

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def set_steps(self, num_steps: int, device: str | torch.device | None = None) -> None:
        self.scheduler.set_timesteps(num_steps, device=device)


class DDIMSampler(SchedulerSampler):
    """DDIM with eta (Song et al. 2021, arXiv 2010.02502, Eq. 12 and 16) over a diffusers ``DDIMScheduler``.

    :meth:`step` is :func:`ddim_step` (DDPO's Gaussian log-density, ``logprob_reduction`` mean or
    sum); the grid, ``init_noise_sigma`` and ``scale_model_input`` are the scheduler's.
    """

    kind = "ddim"

    @property
    def init_noise_sigma(self) -> float:
        return self.scheduler.init_noise_sigma

    def scale_model_input(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        return self.scheduler.scale_model_input(x_t, t)

    def step(self, model_output, t, x_t, eta=1.0, *, generator=None, noise=None, prev_sample=None) -> StepOutput:
        return ddim_step(
            self.scheduler,
            model_output,
            t,
            x_t,
            eta=eta,
            prev_sample=prev_sample,
            generator=generator,
            noise=noise,
            logprob_reduction=self.logprob_reduction,
        )

    def predict_x0(self, model_output, t, x_t) -> torch.Tensor:
        """x0_hat of DDIM Eq. 12 (by ``prediction_type``, clipped as configured), in float32 for half inputs."""
        if x_t.dtype in (torch.float16, torch.bfloat16):
            model_output, x_t = model_output.float(), x_t.float()
        t = torch.as_tensor(t, device="cpu").long().reshape(-1).expand(x_t.shape[0])
        a_t = _gather(self.scheduler.alphas_cumprod, t, x_t)
        return _ddim_x0_eps(self.scheduler, model_output, x_t, a_t)[0]


# ------------------------------------------------------------------------- flow matching (rectified flow)
def flow_euler_step(
    model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """The deterministic Euler step of the probability-flow ODE dx/dsigma = v (rectified flow,
    ``x_sigma = (1 - sigma) x0 + sigma eps``, velocity ``v ~ eps - x0``): ``x' = x + (sigma' - sigma) v``,
    computed in float32 and returned in the model output's dtype, as ``FlowMatchEulerDiscreteScheduler.step``."""
    dt = sigma_next - sigma
    return (sample.float() + dt * model_output).to(model_output.dtype)


def flow_noise_scale(sigma: torch.Tensor, noise_level: float, sigma_one: float | torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's SDE noise scale ``g = a sqrt(sigma / (1 - sigma~))`` (Liu et al. 2025, arXiv 2505.05470,
    Eq. 9-10 with ``sigma_t = a sqrt(t / (1 - t))``; spec §6.1), ``sigma~ = sigma`` except at ``sigma = 1``,
    where ``sigma~ = sigma_one`` (the grid's second value, as the reference code takes ``sigmas[1]``) so
    the first step does not divide by zero."""
    safe = torch.where(sigma == 1, torch.as_tensor(sigma_one, dtype=sigma.dtype, device=sigma.device), sigma)
    return noise_level * torch.sqrt(sigma / (1 - safe))


def flow_sde_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_one: float | torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: Generator = None,
    noise: torch.Tensor | None = None,
    logprob_reduction: Literal["mean", "sum"] = "mean",
) -> StepOutput:
    """One step of Flow-GRPO's marginal-preserving SDE with its Gaussian log-density (arXiv 2505.05470,
    Eq. 12; spec §6.1). ``sigma``, ``sigma_next``: the grid values of this step and the next, broadcastable
    to the sample ([B, 1, 1, 1] for per-sample steps); ``sigma_one`` < 1 replaces sigma = 1 in the noise
    scale (:func:`flow_noise_scale`; the grid's second value, ``scheduler.sigmas[1]``)::

        1. dt  = sigma' - sigma (< 0);  g = flow_noise_scale(sigma, a, sigma_one)
        2. mu  = x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt
        3. std = g sqrt(-dt);  x' = mu + std z  (unless ``prev_sample`` is given: then it is scored)
        4. log pi(x' | x) = log N(sg(x'); mu, std^2), mean (Flow-GRPO, DDPO) or sum over non-batch dims
        5. x0_hat = x - sigma v

    ``noise_level`` a = 0 is the Euler ODE step (:func:`flow_euler_step`, bit for bit; its log-prob is
    undefined). Everything is computed in float32 (fp16 / bf16 inputs are upcast; the drawn x' is rounded
    to the input dtype before it is scored, so rescoring the stored sample gives the same log-prob).
    """
    if not float(sigma_one) < 1:
        raise DiffalignError(f"flow_sde_step: sigma_one must be < 1 (the grid's second sigma), got {float(sigma_one)}")
    out_dtype = sample.dtype
    model_output_in = model_output
    # 0. float32 for the mean, the log-prob and hence the ratio (half-precision drift pins rho at 1)
    model_output, sample = model_output.float(), sample.float()
    prev_sample = None if prev_sample is None else prev_sample.float()
    noise = None if noise is None else noise.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sample.device)
    # 1. step size and noise scale
    dt = sigma_next - sigma
    g = flow_noise_scale(sigma, noise_level, sigma_one)
    # 2. mean of the SDE step
    mean = sample * (1 + g**2 / (2 * sigma) * dt) + model_output * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
    # 3. std and the sample
    std = g * torch.sqrt(-dt)
    # 4. the sample unless given, and the log-density of sg(x'); gradient only through mean
    prev_sample, log_prob = _draw_and_score(
        mean, std, noise_level > 0, prev_sample, noise, generator, model_output_in, out_dtype, logprob_reduction
    )
    # 5. predicted x0
    x0 = sample - sigma * model_output
    return StepOutput(prev_sample.to(out_dtype), log_prob, mean, std, x0, dt=dt)


def flow_shift_mu(config: Any, image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift ``mu`` (diffusers' ``calculate_shift``): linear in the number of
    image tokens, ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len`` of the
    scheduler ``config`` (defaults 0.5 at 256 and 1.15 at 4096, as FluxPipeline)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    b = base_shift - m * base_len
    return image_seq_len * m + b


class FlowMatchSampler(SchedulerSampler):
    """Rectified-flow sampling over a diffusers ``FlowMatchEulerDiscreteScheduler`` (SD3 / SD3.5, FLUX).

    The grid is the scheduler's (``timesteps = 1000 sigma``, sigma from 1 to the last value before 0,
    shifted as configured); ``eta`` of :meth:`step` is Flow-GRPO's noise level a: :func:`flow_sde_step`
    (a > 0, a Gaussian policy per step with log-prob, spec §6.1) or the Euler ODE step (a = 0, what
    ``StableDiffusion3Pipeline`` and ``FluxPipeline`` sample). The network sees ``x_t`` unscaled; x_T ~ N(0, I).

    ``mu`` (FLUX; :func:`flow_shift_mu`, :func:`diffalign.pipelines.flow_mu`) selects FluxPipeline's grid:
    :meth:`set_steps` sets ``sigmas = linspace(1, 1/N, N)``, shifted by ``mu`` when the scheduler uses dynamic
    shifting (FLUX-dev), else by its static ``shift`` (FLUX-schnell). Without ``mu`` the grid is
    ``set_timesteps(N)`` (SD3); a scheduler with ``use_dynamic_shifting`` then refuses, in one line.
    """

    kind = "flow"

    def __init__(self, scheduler, logprob_reduction: Literal["mean", "sum"] = "mean", mu: float | None = None) -> None:
        super().__init__(scheduler, logprob_reduction)
        self.mu = mu

    @property
    def shift(self) -> float:
        """The static shift s of the grid, ``sigma -> s sigma / (1 + (s - 1) sigma)``: the scheduler's ``shift``, or
        with dynamic shifting the one :attr:`mu` amounts to (``exp(mu)``; ``mu`` for ``time_shift_type`` linear)."""
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", False) or self.mu is None:
            return float(cfg.get("shift", 1.0))
        return math.exp(self.mu) if cfg.get("time_shift_type", "exponential") == "exponential" else float(self.mu)

    def set_steps(self, num_steps: int, device: str | torch.device | None = None) -> None:
        """``num_steps`` steps: FluxPipeline's grid when :attr:`mu` is set, else the scheduler's ``set_timesteps``."""
        dynamic = self.scheduler.config.get("use_dynamic_shifting", False)
        if self.mu is None and not dynamic:
            self.scheduler.set_timesteps(num_steps, device=device)
            return
        if self.mu is None:
            raise DiffalignError(
                "this flow scheduler shifts by image size (use_dynamic_shifting): give the sampler the shift mu "
                "(diffalign.pipelines.pipeline_sampler(pipe, steps), or make_sampler(scheduler, mu=...))"
            )
        import numpy as np

        sigmas = (
            None if self.scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        )
        if sigmas is None:
            self.scheduler.set_timesteps(num_steps, device=device, mu=self.mu)
        else:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=self.mu)

    def sigmas(self, t: int | float | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, sigma') of the grid step at timestep(s) ``t``, shaped [B, 1, ...] like ``like``, float32."""
        grid = self.scheduler.timesteps
        if grid is None or self.scheduler.sigmas is None or len(grid) == 0:
            raise DiffalignError("call set_steps(num_steps) (scheduler.set_timesteps) before a flow step")
        grid = grid.detach().float().cpu()
        t = torch.as_tensor(t).detach().float().cpu().reshape(-1)  # one timestep, or one per sample
        gap, idx = (grid[None, :] - t[:, None]).abs().min(dim=1)
        if bool((gap > 1e-2).any()):
            raise DiffalignError(f"timestep {t[gap.argmax()].item():g} is not on the flow sampler's grid")
        sig = self.scheduler.sigmas.detach().float().cpu()
        shape = (-1, *([1] * (like.ndim - 1)))
        sigma, sigma_next = sig[idx].reshape(shape), sig[idx + 1].reshape(shape)
        if t.numel() == 1 and like.shape[0] != 1:
            sigma, sigma_next = sigma.expand(like.shape[0], *shape[1:]), sigma_next.expand(like.shape[0], *shape[1:])
        return sigma.to(like.device), sigma_next.to(like.device)

    def step(self, model_output, t, x_t, eta=0.7, *, generator=None, noise=None, prev_sample=None) -> StepOutput:
        sigma, sigma_next = self.sigmas(t, x_t)
        return flow_sde_step(
            model_output,
            x_t,
            sigma,
            sigma_next,
            sigma_one=float(self.scheduler.sigmas[1]),
            noise_level=eta,
            prev_sample=prev_sample,
            generator=generator,
            noise=noise,
            logprob_reduction=self.logprob_reduction,
        )

    def predict_x0(self, model_output, t, x_t) -> torch.Tensor:
        """x0_hat = x_t - sigma v (spec §1.4, rectified flow), in float32."""
        sigma, _ = self.sigmas(t, x_t)
        return x_t.float() - sigma * model_output.float()


_SAMPLERS: dict[str, Callable[[Any], Sampler]] = {
    "DDIMScheduler": DDIMSampler,
    "FlowMatchEulerDiscreteScheduler": FlowMatchSampler,
}


def register_sampler(scheduler_class: str, factory: Callable[[Any], Sampler]) -> None:
    """Make :func:`make_sampler` wrap schedulers of class ``scheduler_class`` (or a subclass) with ``factory``."""
    _SAMPLERS[scheduler_class] = factory


def make_sampler(scheduler, mu: float | None = None) -> Sampler:
    """The :class:`Sampler` for a diffusers scheduler (a :class:`Sampler` is returned as it is).

    ``mu``: the dynamic shift of a flow scheduler with ``use_dynamic_shifting`` (FLUX, :class:`FlowMatchSampler`),
    given to the sampler. Raises a one-line :class:`DiffalignError` naming the supported schedulers for any other.
    """
    if isinstance(scheduler, Sampler):
        if mu is not None:
            scheduler.mu = mu
        return scheduler
    for cls in type(scheduler).__mro__:
        if cls.__name__ in _SAMPLERS:
            sampler = _SAMPLERS[cls.__name__](scheduler)
            if mu is not None:
                if not hasattr(sampler, "mu"):
                    raise DiffalignError(f"the {type(sampler).__name__} takes no dynamic shift mu")
                sampler.mu = mu
            return sampler
    raise DiffalignError(
        f"diffalign has no sampler for {type(scheduler).__name__}; supported schedulers: "
        f"{', '.join(sorted(_SAMPLERS))} (load the pipeline with scheduler='ddim', or an SD3 pipeline as shipped)"
    )


def denoise_step(
    denoise: Denoiser,
    sampler: Sampler | Any,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    eta: float = 1.0,
    *,
    generator: Generator = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    checkpoint: bool = False,
    detach_input: bool = False,
) -> StepOutput:
    """One denoising step: ``sampler.step(denoise(scale_model_input(x_t, t), t), t, x_t, ...)``.

    ``denoise`` carries conditioning and classifier-free guidance (:func:`make_denoiser`), ``sampler``
    the step rule (:class:`Sampler`, or a scheduler wrapped by :func:`make_sampler`). ``checkpoint``
    wraps the network call in non-reentrant activation checkpointing when gradients are enabled;
    ``detach_input`` feeds the network ``sg(x_t)`` (DRTune, see :func:`sample_differentiable`) while
    the step itself stays differentiable in ``x_t``. ``generator`` / ``noise`` / ``prev_sample`` are
    passed to :meth:`Sampler.step`.
    """
    sampler = make_sampler(sampler)
    inp = sampler.scale_model_input(x_t.detach() if detach_input else x_t, t)
    if checkpoint and torch.is_grad_enabled():
        out = _checkpoint(denoise, inp, t, use_reentrant=False)
    else:
        out = denoise(inp, t)
    return sampler.step(out, t, x_t, eta, generator=generator, noise=noise, prev_sample=prev_sample)


@dataclass
class Trajectory:
    """A sampled chain for policy-gradient methods (spec §1.5)."""

    latents: torch.Tensor  # [B, T+1, C, H, W]: x_T ... x_0
    log_probs: torch.Tensor  # [B, T]
    timesteps: torch.Tensor  # [T]

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def sample_trajectory(
    denoise: Denoiser,
    scheduler: Sampler | Any,
    latents: torch.Tensor,
    eta: float = 1.0,
    generator: Generator = None,
    sde_steps: int | None = None,
) -> Trajectory:
    """Run the whole chain from ``latents`` = x_T over the sampler's timesteps (DDIM Eq. 12 with eta),
    recording every latent and per-step log-prob (DDPO, arXiv 2305.13301, Sec. 4.2). ``scheduler`` is a
    :class:`Sampler` or a diffusers scheduler (:func:`make_sampler`). Call under ``no_grad`` for rollouts.

    ``sde_steps`` = W: only the first W steps are stochastic (``eta``); the later ones are the
    deterministic sampler (eta 0: DDIM / the flow ODE, as evaluation samples), so the reward of a
    trajectory varies only with the actions of the W steps a policy gradient trains on (Flow-GRPO-Fast's
    stochastic window, spec §6.2 "Sampling", with the window at step 0). Their log-probs are stored as 0
    (a deterministic step has no density; nothing trains on them). None: every step stochastic."""
    sampler = make_sampler(scheduler)
    xs, logps = [latents], []
    x = latents
    for k, t in enumerate(sampler.timesteps):
        stochastic = sde_steps is None or k < sde_steps
        out = denoise_step(denoise, sampler, x, t, eta if stochastic else 0.0, generator=generator)
        x = out.prev_sample
        xs.append(x)
        logps.append(out.log_prob if stochastic else torch.zeros_like(out.log_prob))
    return Trajectory(torch.stack(xs, dim=1), torch.stack(logps, dim=1), sampler.timesteps.clone())


TruncationMode = Literal["none", "fixed", "uniform", "gaussian"]


def draw_truncation(
    mode: TruncationMode,
    num_steps: int,
    k: int = 1,
    mean: float = 42.0,
    std: float = 5.0,
    rng: random.Random | None = None,
) -> int:
    """Index k* of the first sampling step that carries gradient (steps k* .. T-1 do).

    - ``none``: k* = 0, gradients through the whole chain (DRaFT, arXiv 2309.17400).
    - ``fixed``: k* = T - k, the last ``k`` steps (DRaFT-K; AlignProp "K=1" when k = 1).
    - ``uniform``: k* ~ U{1, ..., T-1} (AlignProp, arXiv 2310.03739, randomized truncation).
    - ``gaussian``: k* = int(N(mean, std)) rejected until 1 <= k* < T (AlignProp repository default
      for T = 50; ``mean`` and ``std`` are in steps).
    """
    rng = rng or random
    if mode == "none":
        return 0
    if mode == "fixed":
        if not 1 <= k <= num_steps:
            raise DiffalignError(f"truncation k={k} must be between 1 and the number of steps ({num_steps})")
        return num_steps - k
    if mode not in ("uniform", "gaussian"):
        raise DiffalignError(f"unknown truncation mode {mode!r}; use none, fixed, uniform or gaussian")
    if num_steps < 2:
        raise DiffalignError(f"{mode} truncation needs at least 2 sampling steps, got {num_steps}")
    while True:
        ks = rng.randrange(0, num_steps) if mode == "uniform" else int(rng.gauss(mean, std))
        if 1 <= ks < num_steps:
            return ks


def sample_differentiable(
    denoise: Denoiser,
    scheduler: Sampler | Any,
    latents: torch.Tensor,
    grad_from: int = 0,
    eta: float = 0.0,
    generator: Generator = None,
    noises: Sequence[torch.Tensor] | None = None,
    checkpoint: bool = True,
    stop_at: int | None = None,
    detach_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample with gradients through steps ``grad_from .. T-1`` (AlignProp / DRaFT-K / full DRaFT).

    ``scheduler`` is a :class:`Sampler` or a diffusers scheduler (:func:`make_sampler`); every step is
    :func:`denoise_step`. Steps before ``grad_from`` run without a graph (equivalent to AlignProp's
    detaching of the network output there, and cheaper). With ``checkpoint`` every network call with gradient is
    wrapped in non-reentrant activation checkpointing, so memory stays that of one UNet call plus
    one latent per step, whatever the number of steps. ``noises[k]`` fixes the step noise
    (reparameterized sampling, for finite-difference tests). ``stop_at`` returns early after that
    many steps, together with the predicted x0 of the last step taken (ReFL's one-step lookahead).

    ``detach_input`` stops the gradient at the network's input latent (DRTune, Wu et al. 2024, arXiv
    2405.00760, Sec. 3.2): step k still gets gradient through its own prediction
    ``eps_theta(sg(x_k), t_k)``, and the gradient of a later latent reaches earlier ones only along the
    sampler's linear path ``x_{k+1} = a_k x_k + b_k eps_k (+ sigma_k z_k)``, never through the
    network's input Jacobian, whose products over many steps make full-chain gradients heavy-tailed.

    Returns ``(x, pred_x0)``: the final latent (or the latent after ``stop_at`` steps) and the last
    step's predicted x0.
    """
    sampler = make_sampler(scheduler)
    x = latents
    x0 = None
    timesteps = sampler.timesteps if stop_at is None else sampler.timesteps[:stop_at]
    for k, t in enumerate(timesteps):
        noise = noises[k] if noises is not None else None
        if eta > 0 and noise is None:
            noise = _randn(x.shape, generator, x)
        # steps before grad_from build no graph; checkpointing applies only where one is built
        with torch.set_grad_enabled(k >= grad_from and torch.is_grad_enabled()):
            step = denoise_step(
                denoise, sampler, x, t, eta, noise=noise, checkpoint=checkpoint, detach_input=detach_input
            )
            x, x0 = step.prev_sample, step.pred_original_sample
    return x, x0


def encode_images(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """VAE encode of images in [0, 1] to scaled latents (the mean of the latent distribution, deterministic):
    ``z = (mean(E(2x - 1)) - shift_factor) * scaling_factor``, the inverse of :func:`decode_latents`."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    dist = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist
    return ((dist.mean - shift) * scale).float()


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """VAE decode to images in [0, 1] (differentiable unless called under no_grad)."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents / scale + shift

    def _decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(vae.dtype)).sample

    img = _checkpoint(_decode, z, use_reentrant=False) if checkpoint and torch.is_grad_enabled() else _decode(z)
    return (img.float() / 2 + 0.5).clamp(0, 1)
