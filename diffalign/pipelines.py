"""Load diffusers text-to-image pipelines, encode prompts, and attach / save / load LoRA adapters.

Supported families, detected from ``model_index.json``: Stable Diffusion 1.x/2.x
(``StableDiffusionPipeline``, also SD-Turbo) and SDXL (``StableDiffusionXLPipeline``, also
SDXL-Turbo), sampled with DDIM; Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, an MMDiT
transformer, rectified flow), sampled with its ``FlowMatchEulerDiscreteScheduler``
(:class:`diffalign.sampling.FlowMatchSampler`); FLUX.1 (``FluxPipeline``, dev with its distilled guidance
embedding or schnell without, a T5 + CLIP prompt and resolution-dependent shifting ``mu``,
:func:`flow_mu`) with the same flow sampler, its latents kept unpacked ``[B, C, H, W]`` everywhere and
packed 2x2 into tokens only inside the denoiser (:func:`diffalign.sampling.make_denoiser`). The denoising
network is :func:`backbone` (the UNet or the transformer). Base weights are frozen; only LoRA parameters train. LoRA files are written in
diffusers' format (``pytorch_lora_weights.safetensors`` with the adapter config as metadata), so a
plain ``pipe.load_lora_weights(dir)`` reproduces our outputs, alpha != rank included.

A local pipeline directory may hold ``diffalign.json`` (:data:`SETTINGS_FILE`), settings that diffusers'
``model_index.json`` has no place for; :func:`load_pipeline` reads it. Two keys:
``max_sequence_length``, the length of the T5 part of the prompt sequence (diffusers' default 256 for SD3,
512 for FLUX; an SD3 pipeline without T5 pads that many zero tokens, so the tiny shapes flow model is
trained with 0, i.e. CLIP tokens only). :func:`encode_prompts` and :func:`draw_images` use it
(:func:`sequence_length`). ``image_size``: the default image side in pixels of a FLUX pipeline (whose
config does not say it; diffusers' default 1024), what :func:`default_size` returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from diffalign.errors import DiffalignError
from diffalign.paths import looks_like_path, missing_path_message, resolve_local

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
FAMILIES |= {"FluxPipeline": "flux"}
# the step rule each family samples with (diffalign.sampling.Sampler.kind); methods declare the kinds they support
SAMPLER_KINDS = {"sd": "ddim", "sdxl": "ddim", "sd3": "flow", "flux": "flow"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
DTYPES |= {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SETTINGS_FILE = "diffalign.json"  # per-pipeline settings diffusers has no place for (module docstring)
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # diffusers' StableDiffusion3Pipeline default (T5 tokens)
FLUX_MAX_SEQUENCE_LENGTH = 512  # diffusers' FluxPipeline default


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _dtype_kwarg() -> str:
    """``dtype`` where diffusers' from_pretrained takes it, else the older ``torch_dtype``."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def _is_hub_id(model: str) -> bool:
    """``owner/name`` that does not look like a local path (:func:`diffalign.paths.looks_like_path`).

    ``assets/shapes-sd``, ``./x``, ``a/b/c`` or ``runs/x`` (when ``runs/`` is a local directory) are
    paths, so a missing one is reported as a missing directory, not as a Hub error.
    """
    return bool(_HUB_ID.match(model)) and not looks_like_path(model)


def _hub_reason(exc: BaseException) -> str:
    """Why the Hub did not give ``model_index.json``, from the exception chain of a failed load."""
    names: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(names) < 10:
        names.append(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    if "OfflineModeIsEnabled" in names or offline.strip().lower() in ("1", "true", "yes", "on"):
        return f"the Hub is switched off, HF_HUB_OFFLINE={offline or '1'}, and it is not in the local cache"
    if any(n in names for n in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError")):
        return "the Hub has no such repo, or it is private or gated (log in with `hf auth login`)"
    if any(n in names for n in ("EntryNotFoundError", "RemoteEntryNotFoundError")):
        return "the Hub repo has no model_index.json, so it is no diffusers pipeline"
    if any("Connect" in n or "Timeout" in n or n == "LocalEntryNotFoundError" for n in names):
        return "the Hub could not be reached (no network?) and it is not in the local cache"
    first = str(exc).splitlines()[0][:150] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def pipeline_index(model: str) -> dict[str, Any]:
    """The ``model_index.json`` of a local directory or hub id, as a dict.

    ``model`` is looked up with :func:`diffalign.paths.resolve_local` (as given, then the shipped
    assets); a missing path, or a hub id that fails, is a one-line :class:`DiffalignError` naming the
    working directory.
    """
    local = resolve_local(model)
    if local is not None:
        if not local.is_dir():
            raise DiffalignError(
                f"{model} is a file, not a diffusers pipeline directory: pass the directory that holds "
                "model_index.json, or a hub id such as stabilityai/sd-turbo"
            )
        index = local / "model_index.json"
        if not index.is_file():
            raise DiffalignError(
                f"{model} is not a diffusers pipeline directory: expected model_index.json there "
                "(save one with pipe.save_pretrained(dir), or pass a hub id such as stabilityai/sd-turbo)"
            )
        return dict(json.loads(index.read_text()))
    if not _is_hub_id(model):
        raise DiffalignError(
            f"no pipeline directory at {model}: "
            + missing_path_message(
                model,
                hint="pass an existing directory with model_index.json (absolute, or relative to the working "
                "directory) or a hub id of the form owner/name",
            )
        )
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(model)
    except Exception as exc:  # hub errors have many types (OSError, HfHubHTTPError, offline mode)
        raise DiffalignError(
            f"could not load pipeline {model!r} from the Hugging Face Hub ({_hub_reason(exc)}), and there is no "
            f"local directory {model!r} under {Path.cwd()}; check the id and your network, or pass a local "
            "pipeline directory (absolute, or relative to the working directory)"
        ) from None
    return dict(config)


def pipeline_class_name(model: str) -> str:
    """The ``_class_name`` in ``model_index.json`` of a local directory or hub id (:func:`pipeline_index`)."""
    return pipeline_index(model).get("_class_name", "")


def load_pipeline(
    model: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attention: Literal["sdpa", "xformers"] = "sdpa",
    scheduler: Literal["ddim", "keep"] = "ddim",
):
    """Load an SD 1.x/2.x, SDXL, SD3 or FLUX pipeline from a hub id or local directory, frozen, on ``device``.

    ``scheduler="ddim"`` swaps in a DDIMScheduler built from the pipeline's own scheduler config
    (what the samplers in :mod:`diffalign.sampling` expect) for the UNet families; an SD3 or FLUX pipeline
    keeps its ``FlowMatchEulerDiscreteScheduler`` (the flow sampler's grid; FLUX's dynamic shifting is
    resolved per image size, :func:`flow_mu`); ``"keep"`` leaves any scheduler as shipped.
    Attention runs through torch SDPA (diffusers' default); ``attention="xformers"`` switches to
    xformers kernels when that optional package (extra ``gpu``) is installed.
    """
    from diffusers import (
        DDIMScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    index = pipeline_index(model)  # checks the path / hub id first (one-line errors)
    name = index.get("_class_name", "")
    local = resolve_local(model)  # as given, else the shipped copy of assets/NAME
    source = str(local) if local is not None else model
    family = FAMILIES.get(name)
    if family is None:
        raise DiffalignError(
            f"{model} holds a {name or 'unknown'} pipeline; diffalign supports {', '.join(FAMILIES)} "
            "(SD 1.x/2.x, SD-Turbo, SDXL, SDXL-Turbo, SD3 / SD3.5, FLUX.1)"
        )
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DiffalignError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    cls = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}
    cls = (cls | {"flux": FluxPipeline})[family]
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    # components saved as absent ([null, null], e.g. SD3 without its T5 encoder) are passed as None
    kwargs |= {k: None for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] is None}
    # diffusers renamed from_pretrained's torch_dtype to dtype (torch_dtype warns, and goes in 1.0)
    kwargs[_dtype_kwarg()] = dtype
    settings = read_settings(local) if local is not None else {}  # checked before the weights load
    try:
        pipe = cls.from_pretrained(source, **kwargs)
    except DiffalignError:
        raise
    except Exception as exc:
        raise DiffalignError(
            f"could not load pipeline {model!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if scheduler == "ddim" and SAMPLER_KINDS[family] == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if family == "sd3" and pipe.scheduler.config.get("use_dynamic_shifting", False):
        raise DiffalignError(
            f"{model}: its SD3 scheduler uses resolution-dependent shifting (use_dynamic_shifting), which diffalign's "
            "flow sampler supports for FLUX only; use an SD3 / SD3.5 pipeline with a fixed shift"
        )
    if family == "sd3":
        set_sequence_length(pipe, settings.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
    if family == "flux":
        n = settings.get("max_sequence_length", FLUX_MAX_SEQUENCE_LENGTH)
        if n < 1:
            raise DiffalignError(
                f"{model}: max_sequence_length must be >= 1 for FLUX (its T5 gives the prompt sequence)"
            )
        set_sequence_length(pipe, n)
        if "image_size" in settings:
            if settings["image_size"] % (2 * pipe.vae_scale_factor):
                raise DiffalignError(
                    f"{model}: image_size must be a multiple of {2 * pipe.vae_scale_factor} (FLUX packs 2x2 latents), "
                    f"got {settings['image_size']}"
                )
            pipe.default_sample_size = settings["image_size"] // pipe.vae_scale_factor
    pipe.to(device)
    modules = (backbone(pipe), pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    for module in modules + (getattr(pipe, "text_encoder_3", None),):
        if module is not None:
            module.requires_grad_(False).eval()
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise DiffalignError(
                "attention=xformers needs xformers: pip install 'diffalign[gpu]', or use attention=sdpa"
            ) from None
        pipe.enable_xformers_memory_efficient_attention()
    elif attention != "sdpa":
        raise DiffalignError(f"unknown attention backend {attention!r}; use sdpa or xformers")
    return pipe


def read_settings(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked :data:`SETTINGS_FILE` of a pipeline directory (``{}`` when it has none).

    Known keys: ``max_sequence_length`` (int in [0, 512]) and ``image_size`` (FLUX's default image side in
    pixels, int in [1, 4096]). A file that is not a JSON object, an unknown key or a bad value is a one-line
    :class:`DiffalignError`.
    """
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffalignError(f"{path} is not readable JSON ({type(exc).__name__}); fix or delete it") from None
    if not isinstance(settings, dict):
        raise DiffalignError(f'{path} must hold a JSON object such as {{"max_sequence_length": 0}}')
    unknown = sorted(set(settings) - {"max_sequence_length", "image_size"})
    if unknown:
        raise DiffalignError(f"{path}: unknown setting {unknown[0]!r}; known: max_sequence_length, image_size")
    n = settings.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 512:
        raise DiffalignError(f"{path}: max_sequence_length must be an integer in [0, 512], got {n!r}")
    size = settings.get("image_size", 1024)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
        raise DiffalignError(f"{path}: image_size must be an integer in [1, 4096], got {size!r}")
    return settings


def set_sequence_length(pipe, n: int) -> None:
    """Make :func:`encode_prompts` and :func:`draw_images` give the T5 part ``n`` tokens (SD3: 0 is CLIP tokens only)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 512:
        raise DiffalignError(f"max_sequence_length must be an integer in [0, 512], got {n!r}")
    pipe.diffalign_max_sequence_length = n


def sequence_length(pipe) -> int:
    """The T5 sequence length SD3 / FLUX prompts are encoded with: the pipeline's ``diffalign.json`` setting
    (:func:`set_sequence_length`), else diffusers' default (256 for SD3, 512 for FLUX)."""
    default = FLUX_MAX_SEQUENCE_LENGTH if family_of(pipe) == "flux" else DEFAULT_MAX_SEQUENCE_LENGTH
    return int(getattr(pipe, "diffalign_max_sequence_length", default))


def family_of(pipe) -> str:
    """'sd', 'sdxl', 'sd3' or 'flux' (a FLUX transformer is recognized by its ``guidance_embeds`` config)."""
    from diffalign.sampling import is_flux_transformer

    net = getattr(pipe, "transformer", None)
    if net is not None:
        return "flux" if is_flux_transformer(net) else "sd3"
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def backbone_name(pipe) -> str:
    """The pipeline attribute of its denoising network: ``"unet"`` (SD, SDXL) or ``"transformer"`` (SD3, FLUX)."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def backbone(pipe) -> torch.nn.Module:
    """The denoising network that carries the LoRA: the UNet, or SD3's MMDiT / FLUX's transformer."""
    return getattr(pipe, backbone_name(pipe))


def sampler_kind(pipe) -> str:
    """The step rule this pipeline samples with: ``"ddim"`` (UNet families) or ``"flow"`` (SD3, FLUX)."""
    return SAMPLER_KINDS[family_of(pipe)]


def pipeline_sampler_kind(model: str) -> str:
    """:func:`sampler_kind` of a pipeline directory or hub id from its ``model_index.json`` alone (no weights
    load), so a method that does not support it is refused before the model loads; ``"ddim"`` for a class
    diffalign does not know (:func:`load_pipeline` reports that one)."""
    return SAMPLER_KINDS.get(FAMILIES.get(pipeline_class_name(model), "sd"), "ddim")


def flow_mu(pipe, size: tuple[int, int] | None = None) -> float | None:
    """FLUX's resolution-dependent shift ``mu`` for images of ``size`` (default :func:`default_size`), as
    ``FluxPipeline`` computes it: :func:`diffalign.sampling.flow_shift_mu` of the image sequence length
    ``(H / 2f) (W / 2f)`` (packed 2x2 latent tokens, f the VAE factor). Given to the flow sampler it also selects
    FluxPipeline's grid ``sigmas = linspace(1, 1/N, N)`` (which a scheduler without dynamic shifting, as
    FLUX-schnell's, shifts statically). ``None`` for the other families (SD3 sets its grid from the step count)."""
    from diffalign.sampling import flow_shift_mu

    if family_of(pipe) != "flux":
        return None
    h, w = size if size else default_size(pipe)
    step = 2 * pipe.vae_scale_factor
    return flow_shift_mu(pipe.scheduler.config, (h // step) * (w // step))


def pipeline_sampler(pipe, steps: int, size: tuple[int, int] | None = None, device=None):
    """The :class:`diffalign.sampling.Sampler` over ``pipe.scheduler`` with its grid set to ``steps`` steps for
    images of ``size`` (default :func:`default_size`): FLUX's dynamic shift ``mu`` (:func:`flow_mu`) is given to
    the flow sampler, so the grid is ``FluxPipeline``'s for that size."""
    from diffalign.sampling import make_sampler

    sampler = make_sampler(pipe.scheduler, mu=flow_mu(pipe, size))
    sampler.set_steps(steps, device=device)
    return sampler


# --------------------------------------------------------------------------------------------- prompts
@dataclass
class Conditioning:
    """Text conditioning of a batch: what :func:`diffalign.sampling.make_denoiser` takes.

    ``added_cond``: SDXL's ``text_embeds`` and ``time_ids``, or SD3's / FLUX's ``pooled_projections``.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None
    added_cond: dict[str, torch.Tensor] | None = None
    added_uncond: dict[str, torch.Tensor] | None = None

    def denoiser_kwargs(self) -> dict:
        return {
            "cond": self.cond,
            "uncond": self.uncond,
            "added_cond": self.added_cond,
            "added_uncond": self.added_uncond,
        }


def default_size(pipe) -> tuple[int, int]:
    """(height, width) in pixels that the pipeline draws by default: the backbone's ``sample_size`` times the
    VAE factor; FLUX (no ``sample_size``): ``default_sample_size`` times it (1024, or ``diffalign.json``'s
    ``image_size``)."""
    if family_of(pipe) == "flux":
        size = pipe.default_sample_size * pipe.vae_scale_factor
    else:
        size = backbone(pipe).config.sample_size * pipe.vae_scale_factor
    return size, size


def encode_prompts(pipe, prompts: list[str], negative_prompt: str | None = None, guidance: bool = True) -> Conditioning:
    """Encode prompts exactly as the diffusers pipeline does (so sampling matches ``pipe(...)``).

    SD3: the joint sequence of both CLIPs' penultimate states (concatenated, zero-padded to the T5 width)
    and T5's states (:func:`sequence_length` tokens, zeros when the pipeline has no ``text_encoder_3``), plus the pooled CLIP projections
    as ``added_cond["pooled_projections"]``; the unconditional half encodes the negative prompt ("" by default).

    FLUX: T5's states (:func:`sequence_length` tokens) and CLIP's pooled output as ``pooled_projections``;
    no unconditional half (FLUX-dev's guidance is an embedding of the scale, not CFG; ``negative_prompt``
    and ``guidance`` are ignored), as ``FluxPipeline`` with its default ``true_cfg_scale=1``.
    """
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise DiffalignError("prompts must be a non-empty list of strings")
    device = backbone(pipe).device
    neg = None if negative_prompt is None else [negative_prompt] * len(prompts)
    family = family_of(pipe)
    if family == "sd":
        cond, uncond = pipe.encode_prompt(prompts, device, 1, guidance, negative_prompt=neg)
        return Conditioning(cond, uncond if guidance else None)
    if family == "flux":
        cond, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=sequence_length(pipe),
        )
        return Conditioning(cond, None, {"pooled_projections": pooled}, None)
    if family == "sd3":
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guidance,
            negative_prompt=neg,
            max_sequence_length=sequence_length(pipe),
        )
        added_u = {"pooled_projections": neg_pooled} if guidance else None
        return Conditioning(cond, uncond if guidance else None, {"pooled_projections": pooled}, added_u)
    cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance, negative_prompt=neg
    )
    h, w = default_size(pipe)
    time_ids = pipe._get_add_time_ids(
        (h, w), (0, 0), (h, w), dtype=cond.dtype, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
    ).to(device)
    time_ids = time_ids.repeat(len(prompts), 1)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    added_u = {"text_embeds": neg_pooled, "time_ids": time_ids} if guidance else None
    return Conditioning(cond, uncond if guidance else None, added, added_u)


def draw_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    guidance: float,
    eta: float,
    negative_prompt: str | None = None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] (CPU) from the pipeline's own sampler, image i drawn with its own CPU
    generator seeded ``seeds[i]`` (so the batch size changes no image beyond kernel rounding)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    # the flow pipelines' own sampler is the deterministic Euler ODE; it takes no eta
    extra = {"eta": eta} if sampler_kind(pipe) == "ddim" else {"max_sequence_length": sequence_length(pipe)}
    if size is None and family_of(pipe) == "flux":
        size = default_size(pipe)
    return pipe(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        height=size[0] if size else None,
        width=size[1] if size else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="pt",
        **extra,
    ).images.cpu()


def latent_shape(pipe, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
    """The shape ``[B, C, H / f, W / f]`` of the latents our samplers work on for images of ``height x width``
    (default :func:`default_size`; f the VAE factor). FLUX: unpacked, ``C = in_channels / 4`` (the denoiser
    packs them 2x2 into tokens, :func:`diffalign.sampling.make_denoiser`), sizes multiples of ``2 f``."""
    h, w = (height, width) if height else default_size(pipe)
    channels = backbone(pipe).config.in_channels
    if family_of(pipe) == "flux":
        step = 2 * pipe.vae_scale_factor
        if h % step or w % step:
            raise DiffalignError(f"FLUX image sizes must be multiples of {step} (2x2 latent packing), got {h}x{w}")
        channels //= 4
    return batch, channels, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor


def initial_latents(
    pipe, batch: int, generator=None, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """x_T drawn as the diffusers pipeline draws it (same generator -> same latents), shaped :func:`latent_shape`.

    FLUX: unpacked, the values ``FluxPipeline.prepare_latents`` draws before packing them 2x2 into tokens.
    """
    from diffusers.utils.torch_utils import randn_tensor

    net = backbone(pipe)
    shape = latent_shape(pipe, batch, height, width)
    latents = randn_tensor(shape, generator=generator, device=net.device, dtype=net.dtype)
    sigma = getattr(pipe.scheduler, "init_noise_sigma", None)  # flow-matching schedulers start at N(0, I)
    return latents if sigma is None else latents * sigma


# ------------------------------------------------------------------------------------------------ LoRA
@dataclass
class LoraSettings:
    """LoRA on the denoising network's attention projections (peft). ``alpha / rank`` scales the update.

    ``target_modules: null`` (the default) takes the family's default (:func:`default_targets`): the
    UNet's attention projections, or for SD3 and FLUX also the joint attention's context-stream projections.
    """

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # null: default_targets(family)
    text_encoder: bool = False  # also adapt the text encoder(s) (q/k/v/out projections)
    init: str = "default"  # peft init: "default" (B = 0, so training starts at the base model) or "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise DiffalignError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise DiffalignError(f"lora.dropout must be in [0, 1), got {self.dropout}")


TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# SD3's joint attention: the image stream (to_q/k/v/out) and the text stream (add_*_proj, to_add_out), as Flow-GRPO
SD3_TARGETS = UNET_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# FLUX: the same names; the double-stream blocks have all eight, the single-stream blocks to_q/k/v
FLUX_TARGETS = list(SD3_TARGETS)


def default_targets(family: str) -> list[str]:
    """The LoRA target modules of ``model.lora.target_modules: null`` for a family ('sd', 'sdxl', 'sd3', 'flux')."""
    return list({"sd3": SD3_TARGETS, "flux": FLUX_TARGETS}.get(family, UNET_TARGETS))


def _peft_config(settings: LoraSettings, targets: list[str]):
    from peft import LoraConfig

    init = True if settings.init == "default" else settings.init
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        init_lora_weights=init,
    )


def _text_encoders(pipe) -> list[tuple[str, torch.nn.Module]]:
    """The CLIP text encoders that may carry LoRA (FLUX: its CLIP only, not T5, as diffusers' FLUX LoRA loader)."""
    out = [("text_encoder", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None and family_of(pipe) != "flux":
        out.append(("text_encoder_2", pipe.text_encoder_2))
    return out


def attach_text_encoder_lora(text_encoder: torch.nn.Module, config: Any, adapter_name: str = "default") -> None:
    """Inject a peft LoRA into a transformers text encoder with peft itself.

    Not through transformers' ``PreTrainedModel.add_adapter`` / ``load_adapter``: that integration
    checks the installed peft against a minimum version of its own (transformers 5.24 refuses
    peft < 0.22, newer than any release at the time), so text-encoder LoRA would break on a
    transformers upgrade. peft's ``inject_adapter_in_model`` works on any ``nn.Module`` and sets
    ``peft_config`` on it, which is all that saving (``get_peft_model_state_dict``) needs.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name=adapter_name)


def add_lora(pipe, settings: LoraSettings) -> list[torch.nn.Parameter]:
    """Inject trainable LoRA adapters (name "default") into the backbone (UNet, SD3 or FLUX transformer, through
    diffusers' ``add_adapter``) and optionally the CLIP text encoders; return their parameters (fp32)."""
    targets = list(settings.target_modules) if settings.target_modules else default_targets(family_of(pipe))
    try:
        backbone(pipe).add_adapter(_peft_config(settings, targets))
        if settings.text_encoder:
            for _, te in _text_encoders(pipe):
                attach_text_encoder_lora(te, _peft_config(settings, TEXT_TARGETS))
    except ValueError as exc:
        raise DiffalignError(f"cannot add LoRA with target modules {targets}: {exc}") from None
    params = lora_parameters(pipe)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def compile_backbone(pipe, mode: str = "default", backend: str = "inductor") -> None:
    """``torch.compile`` the denoising network in place (``nn.Module.compile``: the module, its parameters and
    its ``state_dict`` keys stay as they are, so LoRA saving, peft's adapter switches and the EMA's in-place
    weight swaps work unchanged; a switch such as the reference pass's disabled LoRA compiles once more).
    Call it after :func:`add_lora` and any sharding. The compiled graphs read the parameters as inputs, so an
    optimizer step is seen by the next call."""
    import torch._dynamo

    # each batch shape (training, CFG-doubled, evaluation), grad mode and adapter state is a graph of its own,
    # specialized to its sizes (dynamic=False: a run has a handful of shapes, and fixed sizes compile faster kernels)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    backbone(pipe).compile(mode=None if mode == "default" else mode, backend=backend, dynamic=False)


def lora_adapter_of(name: str) -> str | None:
    """The peft adapter a parameter belongs to, from its name (``...to_q.lora_A.default.weight`` -> ``default``;
    ``None`` for a parameter of no LoRA layer)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def lora_parameters(pipe, adapter: str = "default") -> list[torch.nn.Parameter]:
    """The parameters of LoRA adapter ``adapter`` (the trained one, ``default``) in the backbone and text encoders."""
    mods = [backbone(pipe)] + [te for _, te in _text_encoders(pipe)]
    return [p for m in mods for n, p in m.named_parameters() if lora_adapter_of(n) == adapter]


def _lora_models(pipe, adapter: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, model) of the backbone and text encoders that carry peft adapter ``adapter``."""
    mods = [(backbone_name(pipe), backbone(pipe))] + _text_encoders(pipe)
    return [(n, m) for n, m in mods if adapter in (getattr(m, "peft_config", None) or {})]


def _tuner_layers(models: list[torch.nn.Module]) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]


def add_adapter_copy(pipe, name: str, source: str = "default") -> dict[str, torch.nn.Parameter]:
    """A second LoRA adapter ``name`` next to ``source`` on every model that carries ``source`` (the backbone,
    and the text encoders when they have LoRA), with ``source``'s peft config and a copy of its values.

    The new adapter is frozen (``requires_grad`` False) and in float32, like the trained one; the active
    adapter of every layer and every parameter's ``requires_grad`` stay as they were (peft's injection
    would make the new adapter active). Select it with :func:`active_adapter`. Returns its parameters
    by qualified name (``transformer.<...>.lora_A.<name>.weight``). DiffusionNFT's old policy (spec §2.4).
    """
    import copy
    import warnings

    from peft import inject_adapter_in_model

    models = _lora_models(pipe, source)
    if not models:
        raise DiffalignError(f"the pipeline has no LoRA adapter {source!r} to copy; call add_lora first")
    if any(name in m.peft_config for _, m in models):
        raise DiffalignError(f"the pipeline already has a LoRA adapter named {name!r}")
    out: dict[str, torch.nn.Parameter] = {}
    for model_name, model in models:
        layers = _tuner_layers([model])
        active = [list(layer.active_adapters) for layer in layers]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the point
            warnings.simplefilter("ignore")
            inject_adapter_in_model(copy.deepcopy(model.peft_config[source]), model, adapter_name=name)
        for layer, names in zip(layers, active, strict=True):
            layer.set_adapter(names)
        for p, flag in flags:
            p.requires_grad_(flag)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, p in params.items():
                if lora_adapter_of(key) != name:
                    continue
                parts = key.split(".")
                i = next(j for j, part in enumerate(parts[:-1]) if part.startswith("lora_")) + 1
                src = params[".".join([*parts[:i], source, *parts[i + 1 :]])]
                p.data = src.detach().clone().float()
                p.requires_grad_(False)
                out[f"{model_name}.{key}"] = p
    return out


@contextlib.contextmanager
def active_adapter(pipe, name: str) -> Iterator[None]:
    """Inside: every LoRA layer of the backbone and text encoders computes with adapter ``name`` (frozen)
    instead of its active one; on exit, also after an exception, every layer's active adapters and every
    adapter parameter's ``requires_grad`` are as before. Weights are neither copied nor changed."""
    models = [m for _, m in _lora_models(pipe, name)]
    if not models:
        raise DiffalignError(f"the pipeline has no LoRA adapter named {name!r}")
    layers = _tuner_layers(models)
    active = [list(layer.active_adapters) for layer in layers]
    flags = [(p, p.requires_grad) for model in models for n, p in model.named_parameters() if lora_adapter_of(n)]
    try:
        for layer in layers:
            layer.set_adapter(name)
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for layer, names in zip(layers, active, strict=True):
            layer.set_adapter(names)
        for p, flag in flags:
            p.requires_grad_(flag)


def lora_state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA weights per component in peft's key format (``...lora_A.weight``), what ``save_lora_weights`` takes.

    Deliberately not passed through ``diffusers.utils.convert_state_dict_to_diffusers``: that renames
    only the attention projections to the old ``lora.down`` style, and a file that mixes both styles
    (LoRA on convolutions or feed-forwards as well) loads in diffusers with the attention layers
    silently dropped. Pure peft keys load completely (tests/test_pipelines.py checks both).
    """
    from peft.utils import get_peft_model_state_dict

    out = {}
    for name, module in [(backbone_name(pipe), backbone(pipe))] + _text_encoders(pipe):
        if getattr(module, "peft_config", None):
            out[name] = get_peft_model_state_dict(module)
    return out


def _sorted_metadata(config: Any) -> dict[str, Any]:
    """A peft config as a dict with every set (``target_modules`` ...) as a sorted list.

    peft keeps ``target_modules`` as a set, whose iteration order changes from process to process;
    written as is, two identical LoRAs would differ in their file bytes (and hashes).
    """
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}


def canonical_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place (tensor bytes untouched).

    safetensors writes its ``__metadata__`` map in hash order, which changes from process to
    process, so two identical LoRAs would differ in their bytes (and hashes). The header is
    ``8-byte little-endian length + JSON`` padded with spaces to a multiple of 8; tensor offsets
    are relative to the data after it, so re-serializing the JSON leaves every tensor valid.
    """
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    os.replace(tmp, path)


def save_lora(pipe, out_dir: str | os.PathLike) -> Path:
    """Save the LoRA adapters in diffusers' format, atomically (temp dir then rename)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    states = lora_state_dicts(pipe)
    if backbone_name(pipe) not in states:
        raise DiffalignError("this pipeline has no LoRA adapter to save; call add_lora first")
    kwargs = {f"{k}_lora_layers": v for k, v in states.items()}
    modules = {backbone_name(pipe): backbone(pipe)} | dict(_text_encoders(pipe))
    kwargs |= {f"{k}_lora_adapter_metadata": _sorted_metadata(modules[k].peft_config["default"]) for k in states}
    type(pipe).save_lora_weights(tmp, **kwargs)
    canonical_safetensors_header(tmp / LORA_WEIGHT_NAME)
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # safetensors writes through a private temp file (mode 0600); use the umask
        f.chmod(0o666 & ~umask)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _lora_file(path: str | os.PathLike) -> Path:
    """The weights file of a LoRA directory (or the file itself), checked to be a readable safetensors file.

    Raises a one-line :class:`DiffalignError` for a missing file and for one that is not safetensors
    or is corrupt or truncated (safetensors checks the header and that the data covers it), so every
    caller (``sample --lora``, ``reno --lora``, evaluation) reports a damaged LoRA the same way.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    f = p / LORA_WEIGHT_NAME if p.is_dir() else p
    if not f.is_file():
        raise DiffalignError(
            f"no LoRA weights at {path}: expected {LORA_WEIGHT_NAME} (written by diffalign or diffusers)"
        )
    try:
        with safe_open(str(f), "pt") as fh:
            fh.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise DiffalignError(
            f"LoRA file {f} is not a readable safetensors file ({detail}): it is corrupt, truncated or in another "
            "format; save it again (diffalign train writes OUT/lora) or pass another LoRA directory"
        ) from None
    return f


def _is_down(key: str) -> bool:
    """Is this a LoRA down (A) matrix, in any of the key styles diffusers and peft write?"""
    return key.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight", "lora_linear_layer.down.weight"))


def lora_rank(path: str | os.PathLike) -> int:
    """Rank of a saved LoRA (from its first down/A matrix); one-line errors for a missing or damaged file."""
    from safetensors import safe_open

    with safe_open(str(_lora_file(path)), "pt") as f:
        for key in f.keys():
            if _is_down(key):
                return int(f.get_slice(key).get_shape()[0])
    raise DiffalignError(
        f"{path} holds no LoRA matrices (no lora_A / lora_down keys); pass a LoRA saved by diffalign train "
        "(OUT/lora) or by diffusers' save_lora_weights"
    )


def load_lora(pipe, path: str | os.PathLike, adapter_name: str = "default", expect_rank: int | None = None) -> None:
    """Load a saved LoRA with diffusers' ``load_lora_weights`` and check that every layer landed.

    Raises a one-line error when the LoRA does not fit this base model (another architecture or
    size), when none of its keys match (silently ignored by diffusers otherwise), when
    ``expect_rank`` is given and differs, or when the file is missing, corrupt or truncated.
    """
    from safetensors import SafetensorError, safe_open

    file = _lora_file(path)
    rank = lora_rank(path)
    if expect_rank is not None and rank != expect_rank:
        raise DiffalignError(
            f"LoRA at {path} has rank {rank} but the config asks for rank {expect_rank}; set lora.rank={rank}"
        )
    net_name = backbone_name(pipe)
    with safe_open(str(file), "pt") as f:
        n_unet = sum(1 for k in f.keys() if k.startswith(f"{net_name}.") and _is_down(k))
    try:
        _load_lora_file(pipe, file, adapter_name)
    except (SafetensorError, OSError) as exc:  # the header read fine but the data did not
        detail = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise DiffalignError(
            f"cannot read LoRA file {file} ({detail}): it is corrupt or truncated; save it again or pass another LoRA"
        ) from None
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        first = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(exc).__name__)[:300]
        raise DiffalignError(
            f"LoRA at {path} does not fit this base model (trained on another base or size?): {first}"
        ) from None
    injected = sum(1 for n, _ in backbone(pipe).named_modules() if n.endswith(f"lora_A.{adapter_name}"))
    if n_unet == 0 or injected < n_unet:
        what = "UNet" if net_name == "unet" else "transformer"
        raise DiffalignError(
            f"LoRA at {path} does not fit this base model: {n_unet} {what} LoRA layers in the file, "
            f"{injected} matched; it was trained on another base model"
        )


def _load_lora_file(pipe, file: Path, adapter_name: str) -> None:
    """The backbone part through diffusers' ``load_lora_into_unet`` / ``load_lora_into_transformer``,
    text-encoder parts with peft directly.

    diffusers loads text-encoder LoRA through transformers' PEFT integration, which refuses peft
    versions its release did not expect (see :func:`attach_text_encoder_lora`); doing that part with
    peft keeps our loader independent of it. The file is what ``pipe.load_lora_weights`` reads too.
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(file))
    with safe_open(str(file), "pt") as f:
        raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    metadata = json.loads(raw) if raw else None
    net_name = backbone_name(pipe)
    net_state = {k: v for k, v in state.items() if k.startswith(f"{net_name}.")}
    if net_name == "unet":
        type(pipe).load_lora_into_unet(
            net_state, network_alphas=None, unet=pipe.unet, adapter_name=adapter_name, metadata=metadata, _pipeline=pipe
        )
    else:
        alphas = {"network_alphas": None} if family_of(pipe) == "flux" else {}  # FLUX's loader requires the argument
        type(pipe).load_lora_into_transformer(
            net_state,
            transformer=pipe.transformer,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=pipe,
            **alphas,
        )
    fields = set(LoraConfig.__dataclass_fields__) - {"peft_type", "task_type", "base_model_name_or_path", "revision"}
    for name, te in _text_encoders(pipe):
        prefix = f"{name}."
        te_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not te_state:
            continue
        if not hasattr(te, "text_model"):  # transformers 5 flattened CLIPTextModel; older files keep the prefix
            te_state = {k.removeprefix("text_model."): v for k, v in te_state.items()}
        meta = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)}
        if meta:
            config = LoraConfig(**{k: v for k, v in meta.items() if k in fields})
        else:  # a file without metadata: rank from the matrices, alpha = rank, the usual projections
            rank = next(v.shape[0] for k, v in te_state.items() if _is_down(k))
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGETS)
        attach_text_encoder_lora(te, config, adapter_name)
        result = set_peft_model_state_dict(te, te_state, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"{name}: {len(unexpected)} LoRA tensors match no layer (first: {unexpected[0]})")
        te.to(device=te.device, dtype=te.dtype)


def encode(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> latents as the samplers see them, without gradient: the mean of the
    VAE's latent distribution, ``(z - shift_factor) * scaling_factor`` (the inverse of :func:`decode`)."""
    from diffalign.sampling import encode_images

    with torch.no_grad():
        return encode_images(pipe.vae, images)


def decode(pipe, latents: torch.Tensor, differentiable: bool = False, checkpoint: bool = False) -> torch.Tensor:
    """Latents -> images [B, 3, H, W] in [0, 1] with the pipeline's VAE (with a graph if ``differentiable``)."""
    from diffalign.sampling import decode_latents

    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        return decode_latents(pipe.vae, latents, checkpoint=checkpoint)
