"""A toy method that trains from a dataset on disk (``plugins: [toy_dataset_method]``, ``data.train``).

Every record holds a ``prompt``, an ``image`` and a ``score``. Step: sample the records' prompts with
gradient through the last sampler step and pull the decoded images toward the records' images,
weighted by their scores: ``loss = mean_i(score_i * mse(x_i, image_i))`` (the reward is only logged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.datasets import DatasetBatch
from diffalign.methods import Method, MethodEntry, PromptBatch, StepContext, StepResult, register_method
from diffalign.sampling import sample_differentiable


@dataclass
class ToyDataConfig:
    """The ``toy_data:`` section."""

    scale: float = 1.0


class ToyData(Method):
    """Regress sampled images toward a dataset's images."""

    name = "toy_data"
    uses_dataset = True
    dataset_images = ("image",)
    dataset_labels = ("score",)

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        batch = batches[0]
        assert isinstance(batch, DatasetBatch)
        prompts = batch.local
        latents, last = ctx.initial_latents(len(prompts)), self.sample.steps - 1
        x0, _ = sample_differentiable(
            ctx.denoiser(prompts), ctx.scheduler, latents, grad_from=last, eta=self.sample.eta, generator=ctx.generator
        )
        images = ctx.decode(x0, differentiable=True)
        target = batch.images["image"].to(images.device, images.dtype)
        if target.shape[-2:] != images.shape[-2:]:
            target = torch.nn.functional.interpolate(target, size=images.shape[-2:], mode="bilinear")
        score = batch.labels["score"].to(images.device, images.dtype)
        loss = self.cfg.scale * (score * ((images - target) ** 2).mean(dim=(1, 2, 3))).mean()
        with torch.no_grad():
            r, parts = ctx.rewards(images.detach(), prompts)
        ctx.backward(loss)
        norm = ctx.optimizer_step()
        stats = {
            "index_sum": float(sum(batch.indices)),
            "score_mean": float(score.mean()),
            "target_mean": float(target.double().mean()),
        }
        return StepResult(float(loss.detach()), parts, r, norm, 1, stats, images.detach())


register_method(MethodEntry("toy_data", ToyData, ToyDataConfig, "toy_data"))
