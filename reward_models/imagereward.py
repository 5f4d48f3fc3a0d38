"""ImageReward: a BLIP text encoder cross-attending to image features, with an MLP score head.

Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation"
(NeurIPS 2023); reference code THUDM/ImageReward (``ImageReward/ImageReward.py``, BLIP from
salesforce/BLIP). Scoring, as ``ImageReward.score``:

1. image: resize 224 (bicubic, shortest edge), center crop 224, CLIP normalisation;
   ``image_embeds = ViT-L/16(image)`` (all tokens, after the final LayerNorm);
2. text: BERT tokens (``bert-base-uncased``, padded to 35); ``h = text_encoder(tokens,
   encoder_hidden_states=image_embeds)``; take the ``[CLS]`` state ``h[:, 0]``;
3. ``r = MLP(h[:, 0])`` (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations) and
   ``(r - 0.16717362830052426) / 1.0333394966054072``.

This module runs the original checkpoint (``ImageReward.pt`` + ``med_config.json``) on transformers'
``BlipVisionModel`` and ``BlipTextModel`` (both adapted from BLIP's code) after renaming the keys, so
the reward is differentiable and needs no ``image-reward`` package (whose pins are old).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from diffalign.errors import DiffalignError
from reward_models.aesthetic import build_head
from reward_models.base import Reward
from reward_models.loading import (
    describe_mismatch,
    hub_download,
    load_errors,
    load_state_dict,
    local_or_hub,
    looks_like_path,
)
from reward_models.preprocess import CLIP_MEAN, CLIP_STD, preprocess
from reward_models.registry import register_reward

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
CHECKPOINT_FILE = "ImageReward.pt"
CONFIG_FILE = "med_config.json"
MODEL_EXPECTED = (
    f"a directory with {CHECKPOINT_FILE} and {CONFIG_FILE} (the files of the Hub repo THUDM/ImageReward), "
    f"a path to {CHECKPOINT_FILE} with {CONFIG_FILE} beside it, or a Hub id like THUDM/ImageReward"
)
TOKENIZER_EXPECTED = "a BERT tokenizer directory (vocab.txt + tokenizer_config.json) or a Hub id like bert-base-uncased"

# BLIP's timm-style ViT key -> transformers BlipVisionModel key (as transformers'
# convert_blip_original_pytorch_to_hf.py renames them).
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embedding.\1"),
    (r"^norm\.(weight|bias)$", r"post_layernorm.\1"),
    (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layers.\1.layer_norm1.\2"),
    (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layers.\1.layer_norm2.\2"),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"encoder.layers.\1.mlp.\2.\3"),
]


def convert_vision_key(key: str) -> str:
    """Rename one BLIP ``visual_encoder`` key (without the prefix) to transformers' BlipVisionModel."""
    for pattern, repl in _VISION_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    raise DiffalignError(f"ImageReward checkpoint has an unknown vision key 'visual_encoder.{key}'")


def split_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split an ImageReward state dict into (vision, text, mlp) parts with transformers key names.

    ``blip.visual_encoder.*`` -> BlipVisionModel keys, ``blip.text_encoder.*`` -> BlipTextModel keys
    (BLIP's med.py and transformers use the same names; the ``position_ids`` buffer is dropped),
    ``mlp.*`` -> the head. Other keys (``blip.vision_proj``, ``blip.text_proj``, ...) are not used.
    """
    vision, text, mlp = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            vision[convert_vision_key(key[len("blip.visual_encoder.") :])] = value
        elif key.startswith("blip.text_encoder."):
            name = key[len("blip.text_encoder.") :]
            if not name.endswith("position_ids"):
                text[name] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp.") :]] = value
    if not vision or not text or not mlp:
        found = ", ".join(sorted({k.split(".")[0] for k in state_dict})[:5])
        raise DiffalignError(
            "ImageReward checkpoint lacks blip.visual_encoder.*, blip.text_encoder.* or mlp.* keys "
            f"(top-level keys: {found}); expected {MODEL_EXPECTED}"
        )
    return vision, text, mlp


def vision_config_from_weights(vision: dict[str, torch.Tensor]) -> dict:
    """BlipVisionConfig fields read from the weight shapes (BLIP's ViT: LayerNorm eps 1e-6, 64-d heads)."""
    width = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    grid = math.isqrt(int(vision["embeddings.position_embedding"].shape[1]) - 1)
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return {
        "hidden_size": width,
        "intermediate_size": int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": depth,
        "num_attention_heads": max(1, width // 64),  # ViT-B: 12, ViT-L: 16
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
    }


def text_config_from_med(med: dict, encoder_width: int) -> dict:
    """BlipTextConfig fields from BLIP's ``med_config.json`` (BERT config + cross-attention)."""
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "pad_token_id",
    )
    missing = [k for k in keys if k not in med]
    if missing:
        raise DiffalignError(f"{CONFIG_FILE} lacks {', '.join(missing)}; expected BLIP's med_config.json")
    cfg = {k: med[k] for k in keys}
    # ImageReward overrides encoder_width with the ViT's width; is_decoder=True builds the
    # cross-attention layers (the forward pass still uses the bidirectional encoder mask).
    cfg.update(
        encoder_hidden_size=encoder_width, is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    cfg.update(bos_token_id=None, sep_token_id=None)  # decoder-only ids, unused by the encoder
    return cfg


def _checkpoint_files(model: str) -> tuple[Path, Path]:
    path = Path(model).expanduser()
    if path.is_dir():
        ckpt, cfg = path / CHECKPOINT_FILE, path / CONFIG_FILE
    elif path.is_file():
        ckpt, cfg = path, path.parent / CONFIG_FILE
    elif looks_like_path(model):
        raise DiffalignError(f"ImageReward model path {model!r} does not exist; expected {MODEL_EXPECTED}")
    else:
        what = "ImageReward model"
        return (
            hub_download(model, CHECKPOINT_FILE, what, MODEL_EXPECTED),
            hub_download(model, CONFIG_FILE, what, MODEL_EXPECTED),
        )
    for f in (ckpt, cfg):
        if not f.is_file():
            raise DiffalignError(f"ImageReward model {model!r} has no {f.name}; expected {MODEL_EXPECTED}")
    return ckpt, cfg


@register_reward("imagereward")
class ImageRewardScore(Reward):
    """ImageReward (Xu et al. 2023) on transformers' BLIP modules. Differentiable.

    Options:
        model: directory with ``ImageReward.pt`` + ``med_config.json``, the ``.pt`` path, or a Hub id
            (default ``THUDM/ImageReward``).
        tokenizer: BERT tokenizer directory or Hub id (default ``bert-base-uncased``, as the original).
        max_length: text tokens, padded and truncated (default 35, as the original).
    """

    differentiable = True
    range = (-2.5, 2.5)

    def __init__(
        self, model: str = "THUDM/ImageReward", tokenizer: str = "bert-base-uncased", max_length: int = 35
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        ckpt, cfg_path = _checkpoint_files(model)
        vision_sd, text_sd, mlp_sd = split_checkpoint(load_state_dict(ckpt, "ImageReward checkpoint"))
        try:
            med = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as err:
            raise DiffalignError(f"cannot read {str(cfg_path)!r}: {err}; expected BLIP's med_config.json") from err
        vision_cfg = vision_config_from_weights(vision_sd)
        self.vision = BlipVisionModel(BlipVisionConfig(**vision_cfg))
        self.text = BlipTextModel(
            BlipTextConfig(**text_config_from_med(med, vision_cfg["hidden_size"])), add_pooling_layer=False
        )
        for part, module, sd in (("vision", self.vision, vision_sd), ("text", self.text, text_sd)):
            result = module.load_state_dict(sd, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise DiffalignError(
                    f"ImageReward checkpoint {str(ckpt)!r} ({part} encoder) does not match {CONFIG_FILE}: "
                    f"{describe_mismatch(result.missing_keys, result.unexpected_keys)}"
                )
        self.mlp = build_head(mlp_sd, f"ImageReward head in {str(ckpt)!r}")
        tok_ref = local_or_hub(tokenizer, "ImageReward tokenizer", TOKENIZER_EXPECTED)
        with load_errors(tokenizer, "ImageReward tokenizer", TOKENIZER_EXPECTED):
            self.tokenizer = AutoTokenizer.from_pretrained(tok_ref)
        self.max_length = int(max_length)
        if self.max_length > self.text.config.max_position_embeddings:
            raise DiffalignError(
                f"imagereward: max_length {self.max_length} exceeds the text encoder's "
                f"{self.text.config.max_position_embeddings} positions"
            )
        self.image_size = int(vision_cfg["image_size"])
        self.freeze()

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Resize (bicubic, shortest edge), center crop, CLIP-normalise: ImageReward's ``_transform``."""
        return preprocess(images.float(), self.image_size, self.image_size, CLIP_MEAN, CLIP_STD, "bicubic")

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=self.pixel_values(images).to(self.dtype)).last_hidden_state
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(images.device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=images.device)
        hidden = self.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        rewards = self.mlp(hidden[:, 0, :].to(self.mlp[0].weight.dtype)).squeeze(-1).float()
        return (rewards - SCORE_MEAN) / SCORE_STD
