"""CLIP score on open_clip models, and ``shapes_clip`` (the same score with the shipped shapes CLIP).

CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (ICML 2021).
CLIPScore: Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning" (EMNLP 2021),
which reports ``w * max(cos, 0)`` with ``w = 2.5`` (option ``clipscore_w=2.5``; torchmetrics uses ``w = 100``).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffalign.errors import DiffalignError
from diffalign.paths import resolve_local, shipped_asset
from reward_models.base import Reward
from reward_models.loading import load_errors
from reward_models.preprocess import CLIP_MEAN, CLIP_STD, interpolation_name, preprocess
from reward_models.registry import register_reward

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
OPEN_CLIP_EXPECTED = (
    "a directory with open_clip_config.json and open_clip_model.safetensors (model=local-dir:DIR), "
    "an open_clip architecture name with pretrained=TAG_OR_FILE (model=ViT-B-32,pretrained=openai), "
    "or model=hf-hub:ORG/REPO"
)
# the shipped asset: the checkout's assets/shapes-clip, or diffalign/_assets/shapes-clip of an installed wheel
SHAPES_CLIP_DIR = (
    shipped_asset("assets/shapes-clip") or Path(__file__).resolve().parent.parent / "assets" / "shapes-clip"
)


def _check_local_dir(path: Path, require_weights: bool) -> None:
    if not path.is_dir():
        raise DiffalignError(f"open_clip model directory {str(path)!r} does not exist; expected {OPEN_CLIP_EXPECTED}")
    if not (path / "open_clip_config.json").is_file():
        raise DiffalignError(
            f"open_clip model directory {str(path)!r} has no open_clip_config.json; expected {OPEN_CLIP_EXPECTED}"
        )
    if require_weights and not any(any(path.glob(pat)) for pat in ("*.safetensors", "*.bin", "*.pth")):
        raise DiffalignError(
            f"open_clip model directory {str(path)!r} has open_clip_config.json but no weights "
            f"(open_clip_model.safetensors); expected {OPEN_CLIP_EXPECTED}"
        )


def load_open_clip(
    model: str, pretrained: str | None, *, require_weights: bool = True
) -> tuple[torch.nn.Module, Any, Any]:
    """Load an open_clip model; return ``(model, inference transform, tokenizer)``.

    ``model`` is an architecture name (``ViT-L-14``; weights from ``pretrained``, a tag or a file),
    ``local-dir:DIR`` (``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``, plus
    ``open_clip_model.safetensors``) or ``hf-hub:ORG/REPO``. With ``require_weights=False`` an
    architecture without weights is allowed (the caller loads a checkpoint itself, as HPS does).
    """
    import open_clip

    ref = model
    if model.startswith(LOCAL_DIR):
        raw = model[len(LOCAL_DIR) :]
        path = resolve_local(raw) or Path(raw).expanduser()  # the shipped assets/ from any directory
        _check_local_dir(path, require_weights)
        model = LOCAL_DIR + str(path)
        if pretrained:
            raise DiffalignError(
                f"open_clip model {ref!r} loads its weights from the directory; drop pretrained={pretrained}"
            )
    elif model.startswith(HF_HUB):
        if pretrained:
            raise DiffalignError(
                f"open_clip model {ref!r} loads its weights from the Hub repo; drop pretrained={pretrained}"
            )
    else:
        arch = model.replace("/", "-")
        known = open_clip.list_models()
        if arch not in known:
            close = difflib.get_close_matches(arch, known, n=3, cutoff=0.5)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise DiffalignError(f"unknown open_clip architecture {model!r}{hint}; expected {OPEN_CLIP_EXPECTED}")
        model = arch
        if pretrained:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if pretrained not in tags and not Path(pretrained).expanduser().is_file():
                shown = ", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "") if tags else "none"
                raise DiffalignError(
                    f"pretrained {pretrained!r} for {arch} is neither a known tag ({shown}) "
                    f"nor an existing checkpoint file; expected {OPEN_CLIP_EXPECTED}"
                )
            if pretrained not in tags:
                pretrained = str(Path(pretrained).expanduser())
        elif require_weights:
            raise DiffalignError(
                f"open_clip architecture {arch} needs pretrained=TAG_OR_FILE; expected {OPEN_CLIP_EXPECTED}"
            )
    previous = logging.root.manager.disable
    if not require_weights:  # open_clip warns "initialized randomly"; the caller loads a checkpoint next
        logging.disable(logging.WARNING)
    try:
        with load_errors(
            ref if not pretrained else f"{ref} (pretrained={pretrained})", "open_clip model", OPEN_CLIP_EXPECTED
        ):
            clip, _, transform = open_clip.create_model_and_transforms(model, pretrained=pretrained or None)
            tokenizer = open_clip.get_tokenizer(model)
    finally:
        logging.disable(previous)
    return clip, transform, tokenizer


class OpenClipImageMixin:
    """Differentiable open_clip image preprocessing from ``clip.visual.preprocess_cfg``."""

    clip: torch.nn.Module
    resize_mode_override: str | None = None

    def _init_preprocess(self) -> None:
        cfg = dict(getattr(self.clip.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(self.clip.visual, "image_size", 224))
        self.pp_size = size if isinstance(size, int) else tuple(size)
        self.pp_mean = tuple(cfg.get("mean", CLIP_MEAN))
        self.pp_std = tuple(cfg.get("std", CLIP_STD))
        self.pp_interpolation = interpolation_name(cfg.get("interpolation", "bicubic"))
        self.pp_resize_mode = self.resize_mode_override or cfg.get("resize_mode", "shortest")
        self.pp_fill = float(cfg.get("fill_color", 0)) / 255.0

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> normalised model input, differentiable."""
        return preprocess(
            images.float(),
            self.pp_size,
            self.pp_size,
            self.pp_mean,
            self.pp_std,
            self.pp_interpolation,
            self.pp_resize_mode,  # type: ignore[arg-type]
            self.pp_fill,
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` (float32)."""
        dtype = next(self.clip.parameters()).dtype
        feats = self.clip.encode_image(self.pixel_values(images).to(dtype))
        return F.normalize(feats.float(), dim=-1)

    def encode_prompts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]`` (float32)."""
        tokens = self.tokenizer(prompts).to(device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)


@register_reward("clip_score")
class ClipScore(OpenClipImageMixin, Reward):
    """CLIP score: ``scale * cos(image_emb, text_emb)`` on an open_clip model (Radford et al. 2021).

    With ``clipscore_w`` set, returns CLIPScore (Hessel et al. 2021): ``clipscore_w * max(cos, 0)``
    (the paper uses ``w = 2.5``). Differentiable: preprocessing runs in torch.

    Options:
        model: open_clip architecture (``ViT-L-14``), ``local-dir:DIR`` or ``hf-hub:ORG/REPO``.
        pretrained: tag (``openai``) or checkpoint file, only with an architecture name.
        scale: multiplies the cosine (default 1.0: the score is the cosine similarity).
        clipscore_w: if set, CLIPScore's ``w * max(cos, 0)`` instead of ``scale * cos``.
        negatives: a prompt source (text file with one caption per line, ``shapes:train``, ...): the
            score becomes the contrastive log-probability of the prompt among itself and these captions,
            ``log softmax_j(tau * cos(image, caption_j))`` at the prompt (CLIP's zero-shot
            classification, Radford et al. Sec. 3.1.2), in (-inf, 0]. Unlike the raw cosine, which any
            "caption-like" change raises, its gradient points away from the confusable captions, so it
            rewards what tells the prompt apart (counts, colors, attribute binding).
        temperature: ``tau`` for ``negatives`` (default: the model's learned logit scale).
    """

    differentiable = True
    range = (-1.0, 1.0)

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        scale: float = 1.0,
        clipscore_w: float | None = None,
        negatives: str | None = None,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        if model.startswith((LOCAL_DIR, HF_HUB)) and pretrained == "openai":
            pretrained = None  # the default tag only applies to architecture names
        self.clip, self.transform, self.tokenizer = load_open_clip(model, pretrained)
        self._init_preprocess()
        self.scale = float(scale)
        self.clipscore_w = None if clipscore_w is None else float(clipscore_w)
        self.range = (0.0, self.clipscore_w) if self.clipscore_w is not None else (-abs(self.scale), abs(self.scale))
        self.negatives: list[str] = []
        if negatives is not None:
            if clipscore_w is not None:
                raise DiffalignError("clip_score: give either negatives= (contrastive score) or clipscore_w=, not both")
            from diffalign.prompts import load_prompts

            self.negatives = list(dict.fromkeys(load_prompts(negatives, key="clip_score negatives")))
            scale_param = getattr(self.clip, "logit_scale", None)
            default_tau = float(scale_param.detach().exp()) if scale_param is not None else 100.0
            self.temperature = default_tau if temperature is None else float(temperature)
            if self.temperature <= 0:
                raise DiffalignError(f"clip_score: temperature must be > 0, got {temperature}")
            self.range = (-float("inf"), 0.0)
        elif temperature is not None:
            raise DiffalignError("clip_score: temperature= only applies with negatives=")
        self._negative_cache: dict[str, torch.Tensor] = {}
        self.freeze()

    def negative_embeddings(self, device: torch.device) -> torch.Tensor:
        """Text embeddings ``[N, D]`` of the contrast captions, computed once per device."""
        key = str(device)
        if key not in self._negative_cache:
            with torch.no_grad():
                self._negative_cache[key] = self.encode_prompts(self.negatives, device)
        return self._negative_cache[key]

    def contrastive(self, image_emb: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``log softmax`` of the prompt among {prompt} + negatives other than the prompt itself."""
        text = self.encode_prompts(prompts, image_emb.device)
        neg = self.negative_embeddings(image_emb.device)
        pos = (image_emb * text).sum(-1, keepdim=True)
        others = image_emb @ neg.T
        same = torch.tensor([[n == p for n in self.negatives] for p in prompts], device=image_emb.device)
        others = others.masked_fill(same, -float("inf"))
        logits = self.temperature * torch.cat([pos, others], dim=1)
        return torch.log_softmax(logits, dim=1)[:, 0]

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.negatives:
            return self.contrastive(self.encode_images(images), prompts)
        cos = (self.encode_images(images) * self.encode_prompts(prompts, images.device)).sum(-1)
        if self.clipscore_w is not None:
            return self.clipscore_w * cos.clamp(min=0.0)
        return self.scale * cos


@register_reward("shapes_clip")
class ShapesClipScore(ClipScore):
    """CLIP score with the small CLIP trained on the shapes world (``assets/shapes-clip``).

    Same score and options as :class:`ClipScore`; ``model`` defaults to
    ``local-dir:<repo>/assets/shapes-clip``, the shipped asset built by
    ``python scripts/train_shapes_clip.py``. Use it as a cheap differentiable proxy reward whose
    over-optimisation can be measured against the exact ``shapes_gold`` verifier.
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        scale: float = 1.0,
        clipscore_w: float | None = None,
        negatives: str | None = None,
        temperature: float | None = None,
    ) -> None:
        asset = model is None
        if asset:
            if not (SHAPES_CLIP_DIR / "open_clip_config.json").is_file():
                raise DiffalignError(
                    f"the shapes CLIP asset is missing at {SHAPES_CLIP_DIR}; build it with "
                    "`python scripts/train_shapes_clip.py`, or pass model=local-dir:DIR"
                )
            model = LOCAL_DIR + str(SHAPES_CLIP_DIR)
        try:
            super().__init__(
                model=model,
                pretrained=pretrained,
                scale=scale,
                clipscore_w=clipscore_w,
                negatives=negatives,
                temperature=temperature,
            )
        except DiffalignError as err:
            if asset:
                raise DiffalignError(f"{err}; rebuild the asset with `python scripts/train_shapes_clip.py`") from err
            raise


__all__ = ["ClipScore", "OpenClipImageMixin", "ShapesClipScore", "load_open_clip"]
