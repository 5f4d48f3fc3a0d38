"""DINOv2 similarity to reference images: a prompt-free "look like these" reward.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (TMLR 2024). The score
is the cosine between the image's CLS embedding (``pooler_output``: the layer-normed CLS token) and
the embeddings of a fixed set of reference images, reduced over the references by mean or max, as
DINO-based subject-fidelity metrics do (DreamBooth's DINO score, Ruiz et al. CVPR 2023).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from diffalign.errors import DiffalignError
from reward_models.base import Reward
from reward_models.hf_processing import ProcessorConfig
from reward_models.loading import load_errors, load_image, local_or_hub, one_line
from reward_models.registry import register_reward

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MODEL_EXPECTED = (
    "a transformers Dinov2Model directory (config.json + model.safetensors + preprocessor_config.json) "
    "or a Hub id like facebook/dinov2-small"
)
REFERENCES_EXPECTED = (
    f"a directory of images ({', '.join(IMAGE_SUFFIXES)}), one image file, or a .pt tensor [N, D] of embeddings"
)


@register_reward("dino_similarity")
class DinoSimilarity(Reward):
    """Cosine similarity of DINOv2 CLS embeddings to reference images (Oquab et al. 2024). Differentiable.

    The prompt is ignored. Options:
        references: directory of reference images, one image file, or a ``.pt`` tensor ``[N, D]``
            of precomputed CLS embeddings (required).
        model: Dinov2Model directory or Hub id (default ``facebook/dinov2-small``).
        processor: image processor directory or Hub id (default: the model's).
        reduce: ``mean`` (default) or ``max`` over the references.
    """

    differentiable = True
    range = (-1.0, 1.0)

    def __init__(
        self,
        references: str,
        model: str = "facebook/dinov2-small",
        processor: str | None = None,
        reduce: Literal["mean", "max"] = "mean",
    ) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, Dinov2Model

        if reduce not in ("mean", "max"):
            raise DiffalignError(f"dino_similarity: reduce must be mean or max, got {reduce!r}")
        self.reduce = reduce
        model_ref = local_or_hub(model, "DINOv2 model", MODEL_EXPECTED)
        proc_ref = local_or_hub(processor or model, "DINOv2 image processor", MODEL_EXPECTED)
        with load_errors(model, "DINOv2 model", MODEL_EXPECTED):
            self.dino = Dinov2Model.from_pretrained(model_ref)
        with load_errors(processor or model, "DINOv2 image processor", MODEL_EXPECTED):
            self.processor = AutoImageProcessor.from_pretrained(proc_ref)
        self.pixels = ProcessorConfig.from_processor(self.processor)
        self.freeze()
        self.register_buffer("references", self._reference_embeddings(references), persistent=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLS embeddings ``[B, D]`` of images in ``[0, 1]``."""
        out = self.dino(pixel_values=self.pixels(images).to(self.dtype))
        return F.normalize(out.pooler_output.float(), dim=-1)

    def _reference_embeddings(self, references: str) -> torch.Tensor:
        path = Path(references).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DiffalignError(
                    f"reference directory {references!r} holds no images; expected {REFERENCES_EXPECTED}"
                )
        elif path.is_file() and path.suffix.lower() in (".pt", ".pth"):
            try:
                emb = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as err:  # pickle and format errors have many types
                raise DiffalignError(f"cannot read reference embeddings {references!r}: {one_line(err)}") from err
            dim = self.dino.config.hidden_size
            if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] == 0:
                raise DiffalignError(f"reference embeddings {references!r} must be a tensor [N, {dim}]")
            return F.normalize(emb.float(), dim=-1)
        elif path.is_file():
            files = [path]
        else:
            raise DiffalignError(f"references {references!r} do not exist; expected {REFERENCES_EXPECTED}")
        with torch.no_grad():
            # one image at a time: reference images may differ in size
            return torch.cat([self.embed(load_image(f)[None]) for f in files])

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        sims = self.embed(images) @ self.references.to(images.device, torch.float32).T  # [B, N]
        return sims.mean(-1) if self.reduce == "mean" else sims.amax(-1)
