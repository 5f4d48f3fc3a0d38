"""PickScore: a CLIP-H fine-tuned on Pick-a-Pic human preferences.

Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation"
(NeurIPS 2023); reference usage in yuvalkirstain/PickScore (``README``: ``logit_scale.exp() * text_embs @ image_embs.T``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reward_models.base import Reward
from reward_models.hf_processing import ProcessorConfig
from reward_models.loading import load_errors, local_or_hub
from reward_models.registry import register_reward

MODEL_EXPECTED = (
    "a transformers CLIPModel directory (config.json + model.safetensors) or a Hub id like yuvalkirstain/PickScore_v1"
)
PROCESSOR_EXPECTED = (
    "a CLIPProcessor directory (preprocessor_config.json + tokenizer files: vocab.json, merges.txt) "
    "or a Hub id like laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
)


def _features(out: object) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


@register_reward("pickscore")
class PickScore(Reward):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image_emb, text_emb)``. Differentiable.

    Options:
        model: CLIPModel directory or Hub id (default ``yuvalkirstain/PickScore_v1``).
        processor: CLIPProcessor directory or Hub id (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``);
            its image settings drive the differentiable preprocessing, its tokenizer the text.
    """

    differentiable = True
    range = (15.0, 25.0)

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        model_ref = local_or_hub(model, "PickScore model", MODEL_EXPECTED)
        proc_ref = local_or_hub(processor, "PickScore processor", PROCESSOR_EXPECTED)
        with load_errors(model, "PickScore model", MODEL_EXPECTED):
            self.clip = CLIPModel.from_pretrained(model_ref)
        with load_errors(processor, "PickScore processor", PROCESSOR_EXPECTED):
            self.processor = CLIPProcessor.from_pretrained(proc_ref)
        self.pixels = ProcessorConfig.from_processor(self.processor)
        self.max_length = min(77, int(self.clip.config.text_config.max_position_embeddings))
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixel_values = self.pixels(images).to(self.dtype)
        text = self.processor.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(images.device)
        img = F.normalize(_features(self.clip.get_image_features(pixel_values=pixel_values)).float(), dim=-1)
        txt = F.normalize(
            _features(
                self.clip.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
            ).float(),
            dim=-1,
        )
        return self.clip.logit_scale.exp().float() * (img * txt).sum(-1)
