"""Human Preference Score v2 / v2.1: an open_clip ViT-H-14 fine-tuned on human preference pairs.

Wu et al., "Human Preference Score v2: A Solid Benchmark for Evaluating Human Preferences of
Text-to-Image Synthesis" (arXiv 2306.09341, 2023); reference code tgxs002/HPSv2 (``hpsv2/img_score.py``).
The score is the cosine ``image_feat . text_feat`` of the normalised features (no logit scale);
images are resized to fit the longest side and zero-padded to a square, as HPSv2's ``ResizeMaxSize``.
"""

from __future__ import annotations

import torch

from diffalign.errors import DiffalignError
from reward_models.base import Reward
from reward_models.clip_score import OpenClipImageMixin, load_open_clip
from reward_models.loading import describe_mismatch, load_state_dict, resolve_file
from reward_models.registry import register_reward

HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_REPO = "xswu/HPSv2"
CHECKPOINT_EXPECTED = (
    "an HPS checkpoint (.pt with the open_clip state dict, raw or under 'state_dict'), "
    f"or hf-hub:{HPS_REPO}/HPS_v2.1_compressed.pt"
)


def normalize_version(version: object) -> str:
    """``v2``/``2``/``2.0`` -> ``v2``; ``v2.1``/``2.1`` -> ``v2.1``."""
    text = str(version).strip().lower().lstrip("v")
    key = {"2": "v2", "2.0": "v2", "2.1": "v2.1"}.get(text)
    if key is None:
        raise DiffalignError(f"unknown HPS version {version!r}; expected v2 or v2.1")
    return key


@register_reward("hps")
class HPSScore(OpenClipImageMixin, Reward):
    """HPS v2 / v2.1 (Wu et al. 2023): cosine of open_clip image and text features. Differentiable.

    Options:
        version: ``v2`` or ``v2.1`` (default); picks the default checkpoint file.
        checkpoint: local ``.pt`` or ``hf-hub:ORG/REPO/FILE``; default ``hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt``.
        model: open_clip architecture (default ``ViT-H-14``) or ``local-dir:DIR`` holding an
            ``open_clip_config.json`` (weights in the directory are optional: the checkpoint replaces them).
    """

    differentiable = True
    range = (0.15, 0.35)
    resize_mode_override = "longest"

    def __init__(self, version: str = "v2.1", checkpoint: str | None = None, model: str = "ViT-H-14") -> None:
        super().__init__()
        self.version = normalize_version(version)
        ref = checkpoint or f"hf-hub:{HPS_REPO}/{HPS_FILES[self.version]}"
        path = resolve_file(ref, f"HPS {self.version} checkpoint", CHECKPOINT_EXPECTED)
        state_dict = load_state_dict(path, "HPS checkpoint")
        self.clip, self.transform, self.tokenizer = load_open_clip(model, None, require_weights=False)
        if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != self.clip.logit_scale.ndim:
            state_dict["logit_scale"] = state_dict["logit_scale"].reshape(self.clip.logit_scale.shape)
        own = self.clip.state_dict()
        bad_shape = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
        result = self.clip.load_state_dict({k: v for k, v in state_dict.items() if k not in bad_shape}, strict=False)
        if result.missing_keys or result.unexpected_keys or bad_shape:
            detail = describe_mismatch(result.missing_keys, result.unexpected_keys)
            if bad_shape:
                detail = "; ".join(
                    x for x in (detail, f"{len(bad_shape)} keys with other shapes (first: {bad_shape[0]})") if x
                )
            raise DiffalignError(f"HPS checkpoint {str(path)!r} does not fit open_clip model {model!r}: {detail}")
        self._init_preprocess()
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.encode_images(images) * self.encode_prompts(prompts, images.device)).sum(-1)
