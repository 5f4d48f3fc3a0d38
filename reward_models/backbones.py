"""Frozen vision backbones as token features: what a trainable head on frozen features (Adv-GRPO's
discriminator, spec §6.2) stands on.

``load_backbone("dinov2", "facebook/dinov2-base")`` gives a :class:`FrozenBackbone` whose
``tokens(images)`` maps images ``[B, 3, H, W]`` in ``[0, 1]`` to ``[B, 1 + N, D]``: token 0 is the
image's global embedding (DINOv2's layer-normed CLS token; open_clip's pooled, projected embedding),
tokens 1..N the patch tokens in the same space (open_clip's patch tokens after ``ln_post`` and the
projection). Loading goes through the reward zoo's loaders (local path or Hub id, one-line errors,
shipped assets), preprocessing is the zoo's differentiable resize / crop / normalize. Every weight is
frozen (``requires_grad=False``, eval mode); ``tokens`` runs under ``no_grad``.

Kinds (a registry, :func:`register_backbone`):

- ``dinov2``: a transformers ``Dinov2Model`` directory or Hub id (default ``facebook/dinov2-base``,
  the ViT-B/14 Adv-GRPO's DINO discriminator uses);
- ``open_clip``: an open_clip model's vision tower (``local-dir:DIR``, ``hf-hub:ORG/REPO``, or
  ``ARCH@TAG`` such as ``ViT-B-32@openai``);
- ``shapes_clip``: the shipped shapes CLIP's vision tower (``assets/shapes-clip``), for the shapes world.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffalign.errors import DiffalignError


class FrozenBackbone(torch.nn.Module):
    """A frozen image encoder giving token features; subclasses implement :meth:`_tokens`."""

    kind: str = "backbone"
    dim: int = 0  # D, the width of every token

    def freeze(self) -> FrozenBackbone:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """A frozen backbone stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> float32 tokens ``[B, 1 + N, D]`` (global first), no graph."""
        device = next(self.parameters()).device
        return self._tokens(images.to(device)).float()

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


_BACKBONES: dict[str, Callable[[str | None], FrozenBackbone]] = {}


def register_backbone(kind: str) -> Callable[[Callable[[str | None], FrozenBackbone]], Callable]:
    """Register a loader ``fn(model: str | None) -> FrozenBackbone`` under ``kind``."""

    def deco(fn: Callable[[str | None], FrozenBackbone]) -> Callable[[str | None], FrozenBackbone]:
        _BACKBONES[kind] = fn
        return fn

    return deco


def backbone_kinds() -> list[str]:
    """The registered kinds (``dinov2``, ``open_clip``, ``shapes_clip``)."""
    return list(_BACKBONES)


def load_backbone(kind: str, model: str | None = None, device: torch.device | str | None = None) -> FrozenBackbone:
    """The frozen backbone ``kind`` loaded from ``model`` (None: the kind's default), on ``device``."""
    if kind not in _BACKBONES:
        raise DiffalignError(f"unknown backbone {kind!r}; use one of {', '.join(_BACKBONES)}")
    backbone = _BACKBONES[kind](model).freeze()
    return backbone.to(device) if device is not None else backbone


# ---------------------------------------------------------------------------------------- DINOv2
class Dinov2Backbone(FrozenBackbone):
    """DINOv2 (Oquab et al. 2024): ``last_hidden_state`` (layer-normed CLS + patch tokens)."""

    kind = "dinov2"

    def __init__(self, model: str) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, Dinov2Model

        from reward_models.dino import MODEL_EXPECTED
        from reward_models.hf_processing import ProcessorConfig
        from reward_models.loading import load_errors, local_or_hub

        ref = local_or_hub(model, "DINOv2 model", MODEL_EXPECTED)
        with load_errors(model, "DINOv2 model", MODEL_EXPECTED):
            self.dino = Dinov2Model.from_pretrained(ref)
            processor = AutoImageProcessor.from_pretrained(ref)
        self.pixels = ProcessorConfig.from_processor(processor)
        self.dim = int(self.dino.config.hidden_size)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.dino.parameters()).dtype
        return self.dino(pixel_values=self.pixels(images).to(dtype)).last_hidden_state


@register_backbone("dinov2")
def _dinov2(model: str | None) -> FrozenBackbone:
    return Dinov2Backbone(model or "facebook/dinov2-base")


# ------------------------------------------------------------------------------------- open_clip
class _Preprocess:
    """open_clip's image preprocessing from ``clip.visual.preprocess_cfg`` (the zoo's differentiable one)."""

    def __init__(self, clip: torch.nn.Module) -> None:
        from reward_models.clip_score import OpenClipImageMixin

        holder = type("_Holder", (OpenClipImageMixin,), {})()
        holder.clip = clip
        holder._init_preprocess()
        holder.clip = None  # keep no reference to the text tower
        self.pixel_values = holder.pixel_values


class OpenClipBackbone(FrozenBackbone):
    """An open_clip vision tower: the pooled embedding, then the patch tokens through ``ln_post`` and ``proj``."""

    kind = "open_clip"

    def __init__(self, model: str, pretrained: str | None = None) -> None:
        super().__init__()
        from reward_models.clip_score import load_open_clip

        clip, _, _ = load_open_clip(model, pretrained)
        self.visual = clip.visual  # the text tower is dropped with ``clip``
        self._pre = _Preprocess(clip)
        self.visual.output_tokens = True
        self.dim = int(self.visual.proj.shape[1]) if self.visual.proj is not None else int(self.visual.width)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        pooled, tokens = self.visual(self._pre.pixel_values(images).to(dtype))
        if self.visual.proj is not None and tokens.shape[-1] != pooled.shape[-1]:
            tokens = tokens @ self.visual.proj
        return torch.cat([pooled[:, None], tokens], dim=1)


@register_backbone("open_clip")
def _open_clip(model: str | None) -> FrozenBackbone:
    if not model:
        raise DiffalignError(
            "backbone open_clip needs a model: local-dir:DIR, hf-hub:ORG/REPO or ARCH@TAG (e.g. ViT-B-32@openai)"
        )
    arch, _, tag = model.partition("@")
    return OpenClipBackbone(arch, tag or None)


@register_backbone("shapes_clip")
def _shapes_clip(model: str | None) -> FrozenBackbone:
    from reward_models.clip_score import LOCAL_DIR, SHAPES_CLIP_DIR

    if model is None and not (SHAPES_CLIP_DIR / "open_clip_config.json").is_file():
        raise DiffalignError(
            f"the shapes CLIP asset is missing at {SHAPES_CLIP_DIR}; build it with `python scripts/train_shapes_clip.py`"
        )
    return OpenClipBackbone(model or LOCAL_DIR + str(SHAPES_CLIP_DIR))


__all__ = ["FrozenBackbone", "backbone_kinds", "load_backbone", "register_backbone"]
