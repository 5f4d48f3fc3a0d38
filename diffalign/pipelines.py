"""Load diffusers text-to-image pipelines, encode prompts, and attach / save / load LoRA adapters.

Supported families, detected from ``model_index.json``: Stable Diffusion 1.x/2.x
(``StableDiffusionPipeline``, also SD-Turbo) and SDXL (``StableDiffusionXLPipeline``, also
SDXL-Turbo). Base weights are frozen; only LoRA parameters train. LoRA files are written in
diffusers' format (``pytorch_lora_weights.safetensors`` with the adapter config as metadata), so a
plain ``pipe.load_lora_weights(dir)`` reproduces our outputs, alpha != rank included.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from diffalign.errors import DiffalignError

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
DTYPES |= {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _dtype_kwarg() -> str:
    """``dtype`` where diffusers' from_pretrained takes it, else the older ``torch_dtype``."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def _is_hub_id(model: str) -> bool:
    """owner/name, not starting like a path (./, /, ~)."""
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "~"))


def pipeline_class_name(model: str) -> str:
    """The ``_class_name`` in ``model_index.json`` of a local directory or hub id."""
    local = Path(model).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise DiffalignError(
                f"{model} is not a diffusers pipeline directory: expected model_index.json there "
                "(save one with pipe.save_pretrained(dir), or pass a hub id such as stabilityai/sd-turbo)"
            )
        return json.loads(index.read_text()).get("_class_name", "")
    if not _is_hub_id(model):
        raise DiffalignError(
            f"no pipeline directory at {model}: pass an existing local directory with model_index.json "
            "or a hub id of the form owner/name"
        )
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(model)
    except Exception as exc:  # hub errors have many types (OSError, HfHubHTTPError, offline mode)
        raise DiffalignError(
            f"could not load pipeline {model!r} from the Hugging Face Hub ({type(exc).__name__}); "
            "check the id and your network, or pass a local directory"
        ) from None
    return config.get("_class_name", "")


def load_pipeline(
    model: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attention: Literal["sdpa", "xformers"] = "sdpa",
    scheduler: Literal["ddim", "keep"] = "ddim",
):
    """Load an SD 1.x/2.x or SDXL pipeline from a hub id or local directory, frozen, on ``device``.

    ``scheduler="ddim"`` swaps in a DDIMScheduler built from the pipeline's own scheduler config
    (what the samplers in :mod:`diffalign.sampling` expect); ``"keep"`` leaves it as shipped.
    Attention runs through torch SDPA (diffusers' default); ``attention="xformers"`` switches to
    xformers kernels when that optional package (extra ``gpu``) is installed.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    name = pipeline_class_name(model)
    family = FAMILIES.get(name)
    if family is None:
        raise DiffalignError(
            f"{model} holds a {name or 'unknown'} pipeline; diffalign supports {', '.join(FAMILIES)} "
            "(SD 1.x/2.x, SD-Turbo, SDXL, SDXL-Turbo)"
        )
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DiffalignError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    cls = StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    # diffusers renamed from_pretrained's torch_dtype to dtype (torch_dtype warns, and goes in 1.0)
    kwargs[_dtype_kwarg()] = dtype
    try:
        pipe = cls.from_pretrained(
            str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model, **kwargs
        )
    except DiffalignError:
        raise
    except Exception as exc:
        raise DiffalignError(
            f"could not load pipeline {model!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
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


def family_of(pipe) -> str:
    """'sd' or 'sdxl'."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


# --------------------------------------------------------------------------------------------- prompts
@dataclass
class Conditioning:
    """Text conditioning of a batch: what :func:`diffalign.sampling.make_denoiser` takes."""

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
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return size, size


def encode_prompts(pipe, prompts: list[str], negative_prompt: str | None = None, guidance: bool = True) -> Conditioning:
    """Encode prompts exactly as the diffusers pipeline does (so sampling matches ``pipe(...)``)."""
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise DiffalignError("prompts must be a non-empty list of strings")
    device = pipe.unet.device
    neg = None if negative_prompt is None else [negative_prompt] * len(prompts)
    if family_of(pipe) == "sd":
        cond, uncond = pipe.encode_prompt(prompts, device, 1, guidance, negative_prompt=neg)
        return Conditioning(cond, uncond if guidance else None)
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


def initial_latents(
    pipe, batch: int, generator=None, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """x_T drawn as the diffusers pipeline draws it (same generator -> same latents)."""
    from diffusers.utils.torch_utils import randn_tensor

    h, w = (height, width) if height else default_size(pipe)
    shape = (batch, pipe.unet.config.in_channels, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=generator, device=pipe.unet.device, dtype=pipe.unet.dtype)
    return latents * pipe.scheduler.init_noise_sigma


# ------------------------------------------------------------------------------------------------ LoRA
@dataclass
class LoraSettings:
    """LoRA on the UNet attention projections (peft). ``alpha / rank`` scales the update."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: bool = False  # also adapt the text encoder(s) (q/k/v/out projections)
    init: str = "default"  # peft init: "default" (B = 0, so training starts at the base model) or "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise DiffalignError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise DiffalignError(f"lora.dropout must be in [0, 1), got {self.dropout}")


TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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
    out = [("text_encoder", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.append(("text_encoder_2", pipe.text_encoder_2))
    return out


def add_lora(pipe, settings: LoraSettings) -> list[torch.nn.Parameter]:
    """Inject trainable LoRA adapters (name "default") and return their parameters (fp32)."""
    try:
        pipe.unet.add_adapter(_peft_config(settings, list(settings.target_modules)))
        if settings.text_encoder:
            for _, te in _text_encoders(pipe):
                te.add_adapter(_peft_config(settings, TEXT_TARGETS))
    except ValueError as exc:
        raise DiffalignError(f"cannot add LoRA with target modules {settings.target_modules}: {exc}") from None
    params = lora_parameters(pipe)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_parameters(pipe) -> list[torch.nn.Parameter]:
    mods = [pipe.unet] + [te for _, te in _text_encoders(pipe)]
    return [p for m in mods for n, p in m.named_parameters() if "lora_" in n]


def lora_state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA weights per component in peft's key format (``...lora_A.weight``), what ``save_lora_weights`` takes.

    Deliberately not passed through ``diffusers.utils.convert_state_dict_to_diffusers``: that renames
    only the attention projections to the old ``lora.down`` style, and a file that mixes both styles
    (LoRA on convolutions or feed-forwards as well) loads in diffusers with the attention layers
    silently dropped. Pure peft keys load completely (tests/test_pipelines.py checks both).
    """
    from peft.utils import get_peft_model_state_dict

    out = {}
    for name, module in [("unet", pipe.unet)] + _text_encoders(pipe):
        if getattr(module, "peft_config", None):
            out[name] = get_peft_model_state_dict(module)
    return out


def save_lora(pipe, out_dir: str | os.PathLike) -> Path:
    """Save the LoRA adapters in diffusers' format, atomically (temp dir then rename)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    states = lora_state_dicts(pipe)
    if "unet" not in states:
        raise DiffalignError("this pipeline has no LoRA adapter to save; call add_lora first")
    kwargs = {f"{k}_lora_layers": v for k, v in states.items()}
    modules = {"unet": pipe.unet} | dict(_text_encoders(pipe))
    kwargs |= {f"{k}_lora_adapter_metadata": modules[k].peft_config["default"].to_dict() for k in states}
    type(pipe).save_lora_weights(tmp, **kwargs)
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
    p = Path(path).expanduser()
    f = p / LORA_WEIGHT_NAME if p.is_dir() else p
    if not f.is_file():
        raise DiffalignError(
            f"no LoRA weights at {path}: expected {LORA_WEIGHT_NAME} (written by diffalign or diffusers)"
        )
    return f


def _is_down(key: str) -> bool:
    """Is this a LoRA down (A) matrix, in any of the key styles diffusers and peft write?"""
    return key.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight", "lora_linear_layer.down.weight"))


def lora_rank(path: str | os.PathLike) -> int:
    """Rank of a saved LoRA (from its first down/A matrix)."""
    from safetensors import safe_open

    with safe_open(str(_lora_file(path)), "pt") as f:
        for key in f.keys():
            if _is_down(key):
                return int(f.get_slice(key).get_shape()[0])
    raise DiffalignError(f"{path} holds no LoRA matrices")


def load_lora(pipe, path: str | os.PathLike, adapter_name: str = "default", expect_rank: int | None = None) -> None:
    """Load a saved LoRA with diffusers' ``load_lora_weights`` and check that every layer landed.

    Raises a one-line error when the LoRA does not fit this base model (another architecture or
    size), when none of its keys match (silently ignored by diffusers otherwise), or when
    ``expect_rank`` is given and differs.
    """
    from safetensors import safe_open

    file = _lora_file(path)
    rank = lora_rank(path)
    if expect_rank is not None and rank != expect_rank:
        raise DiffalignError(
            f"LoRA at {path} has rank {rank} but the config asks for rank {expect_rank}; set lora.rank={rank}"
        )
    with safe_open(str(file), "pt") as f:
        n_unet = sum(1 for k in f.keys() if k.startswith("unet.") and _is_down(k))
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        first = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(exc).__name__)[:300]
        raise DiffalignError(
            f"LoRA at {path} does not fit this base model (trained on another base or size?): {first}"
        ) from None
    injected = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(f"lora_A.{adapter_name}"))
    if n_unet == 0 or injected < n_unet:
        raise DiffalignError(
            f"LoRA at {path} does not fit this base model: {n_unet} UNet LoRA layers in the file, "
            f"{injected} matched; it was trained on another base model"
        )


def decode(pipe, latents: torch.Tensor, differentiable: bool = False, checkpoint: bool = False) -> torch.Tensor:
    """Latents -> images [B, 3, H, W] in [0, 1] with the pipeline's VAE (with a graph if ``differentiable``)."""
    from diffalign.sampling import decode_latents

    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        return decode_latents(pipe.vae, latents, checkpoint=checkpoint)
