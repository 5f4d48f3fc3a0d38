"""LAION aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Schuhmann et al., "LAION-5B: An open large-scale dataset for training next generation image-text
models" (NeurIPS 2022 Datasets and Benchmarks), and the "improved aesthetic predictor"
(christophschuhmann/improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE.pth``), used as the
aesthetic reward by DDPO (Black et al. 2023) and AlignProp (Prabhudesai et al. 2023).
"""

from __future__ import annotations

import re

import torch

from diffalign.errors import DiffalignError
from reward_models.base import Reward
from reward_models.clip_score import HF_HUB, LOCAL_DIR, OpenClipImageMixin, load_open_clip
from reward_models.loading import describe_mismatch, load_state_dict, resolve_file
from reward_models.registry import register_reward

DEFAULT_HEAD = "hf-hub:trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
HEAD_EXPECTED = (
    "the improved-aesthetic-predictor MLP state dict (.pth or .safetensors; keys layers.0.weight ... layers.7.bias), "
    "or hf-hub:ORG/REPO/FILE"
)
# Dropout rates of the original layout; inactive at inference, kept so the module mirrors the .pth.
_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


def build_head(state_dict: dict[str, torch.Tensor], what: str = "aesthetic head") -> torch.nn.Sequential:
    """Rebuild the MLP ``layers`` (Linear / Dropout, no activations) from its state dict.

    The original layout is ``Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout
    Linear(64,16) Linear(16,1)`` with keys ``layers.{0,2,4,6,7}.{weight,bias}``; widths are read from
    the weights, so other input sizes (a different CLIP) work too.
    """
    sd = {re.sub(r"^(mlp\.|model\.)", "", k): v for k, v in state_dict.items()}
    linear = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^layers\.(\d+)\.weight$", k))})
    if not linear:
        raise DiffalignError(f"{what} has no layers.N.weight keys; expected {HEAD_EXPECTED}")
    modules: list[torch.nn.Module] = []
    for i in range(linear[-1] + 1):
        if i in linear:
            w = sd[f"layers.{i}.weight"]
            modules.append(torch.nn.Linear(w.shape[1], w.shape[0], bias=f"layers.{i}.bias" in sd))
        else:
            modules.append(torch.nn.Dropout(_DROPOUT.get(i, 0.0)))
    head = torch.nn.Sequential(*modules)
    result = head.load_state_dict({k[len("layers.") :]: v.float() for k, v in sd.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DiffalignError(
            f"{what} does not match the MLP layout: {describe_mismatch(result.missing_keys, result.unexpected_keys)}"
        )
    if head[linear[-1]].out_features != 1:
        raise DiffalignError(f"{what} ends in {head[linear[-1]].out_features} outputs; expected a single score")
    return head


@register_reward("aesthetic")
class AestheticScore(OpenClipImageMixin, Reward):
    """LAION improved aesthetic predictor (Schuhmann et al. 2022): ``MLP(normalize(CLIP_image(x)))``.

    The prompt is ignored. Scores are roughly 1-10 (most generated images 4-7). Differentiable.

    Options:
        clip_model: open_clip architecture (default ``ViT-L-14``) or ``local-dir:DIR`` / ``hf-hub:ORG/REPO``.
        clip_pretrained: tag or file for an architecture name (default ``openai``, as the original).
        head: the MLP weights, a local ``.pth`` / ``.safetensors`` or ``hf-hub:ORG/REPO/FILE``
            (default: TRL's copy of ``sac+logos+ava1-l14-linearMSE.pth``).
    """

    differentiable = True
    range = (1.0, 10.0)

    def __init__(
        self,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str | None = "openai",
        head: str = DEFAULT_HEAD,
    ) -> None:
        super().__init__()
        path = resolve_file(head, "aesthetic head", HEAD_EXPECTED)
        self.head = build_head(load_state_dict(path, "aesthetic head"), f"aesthetic head {str(path)!r}")
        if clip_model.startswith((LOCAL_DIR, HF_HUB)) and clip_pretrained == "openai":
            clip_pretrained = None
        self.clip, self.transform, self.tokenizer = load_open_clip(clip_model, clip_pretrained)
        self._init_preprocess()
        in_dim = self.head[0].in_features
        embed_dim = int(getattr(self.clip.visual, "output_dim", in_dim))
        if embed_dim != in_dim:
            raise DiffalignError(
                f"aesthetic head {head!r} takes {in_dim}-d embeddings but CLIP {clip_model!r} gives {embed_dim}-d; "
                "use the CLIP the head was trained on (ViT-L-14 for the LAION predictor)"
            )
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        emb = self.encode_images(images)
        head_dtype = self.head[0].weight.dtype
        return self.head(emb.to(head_dtype)).squeeze(-1).float()
