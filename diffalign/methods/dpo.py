"""Offline Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908; spec §5.2) from a preference dataset on disk.

The data source is ``data.train``: a JSONL file of ``{"prompt", "winner", "loser"}`` records (image paths
relative to the file; ``diffalign prefs`` writes one), read through :mod:`diffalign.datasets` (sharded over
processes, reshuffled every epoch, its position checkpointed). Each image is VAE-encoded once
(``ctx.encode``: the latent distribution's mean) and its latent cached in memory for the rest of the run.
Per pair, one timestep ``t ~ U{0 .. N_train - 1}`` and one noise ``eps`` shared by winner and loser
(drawn from the trainer's checkpointed generator)::

    z_t^w = sqrt(a_t) z^w + sqrt(1 - a_t) eps,   z_t^l likewise                 (scheduler.add_noise)
    e^w   = mean_CHW (target - eps_theta(z_t^w, t, c))^2    target = eps, or v for v-prediction models
    e^w_ref, e^l_ref: the same UNet with the LoRA disabled (ctx.reference()), no gradient
    L     = -log sigma( -(beta / 2) * ((e^w - e^l) - (e^w_ref - e^l_ref)) )    (dpo_loss.diffusion_dpo_loss)

The UNet sees the conditional prediction only (no classifier-free guidance, as the reference trains).
One step draws ``train.gradient_accumulation_steps`` batches of ``sample.batch_size`` pairs per process,
one backward each, then one optimizer update. The training rewards score the dataset's winner and loser
images of the step for the log (``reward`` is the winners'; ``data_margin`` the mean winner - loser
combined reward); held-out evaluation samples from ``prompts.eval`` as for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from diffalign.datasets import DatasetBatch
from diffalign.errors import DiffalignError
from diffalign.methods.base import Method, PromptBatch, StepContext, StepResult
from diffalign.methods.dpo_loss import diffusion_dpo_loss
from diffalign.methods.registry import MethodEntry, register_method

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig, SampleConfig, TrainConfig


@dataclass
class DiffusionDPOConfig:
    """The ``dpo:`` section (docs/training.md maps each key to the paper and to DiffusionDPO's ``train.py``)."""

    beta: float = 5000.0  # paper beta, with T * omega(lambda_t) folded in (DiffusionDPO --beta_dpo; SD 1.5 and SDXL)
    cache_latents: bool = True  # VAE-encode each image once per run and keep its latent (CPU memory)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise DiffalignError(f"dpo.beta must be > 0 (the paper uses 5000), got {self.beta}")


class LatentCache:
    """Latents of dataset images, encoded once: ``(record index, image key) -> latent [C, h, w]`` on the CPU.

    ``encodes`` counts the images sent through the VAE (a test checks it equals the distinct images seen).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.latents: dict[tuple[int, str], torch.Tensor] = {}
        self.encodes = 0

    def get(self, ctx: StepContext, batch: DatasetBatch, key: str) -> torch.Tensor:
        """The latents [B, C, h, w] of ``batch.images[key]``, encoding (in one VAE call) only the missing ones."""
        images = batch.images[key]
        missing = [i for i, idx in enumerate(batch.indices) if not self.enabled or (idx, key) not in self.latents]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            encoded = ctx.encode(images[missing]).detach().float().cpu()
            self.encodes += len(missing)
            for row, i in enumerate(missing):
                fresh[i] = encoded[row]
                if self.enabled:
                    self.latents[(batch.indices[i], key)] = encoded[row]
        rows = [fresh[i] if i in fresh else self.latents[(idx, key)] for i, idx in enumerate(batch.indices)]
        return torch.stack(rows)


def noisy_pair(
    scheduler: Any, z_w: torch.Tensor, z_l: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One t and one noise per pair, shared by winner and loser (spec §5.2): ``(x [2B, ...], t [2B], target [2B, ...])``
    with the winners first; the target follows the scheduler's ``prediction_type`` (epsilon or v_prediction)."""
    b = z_w.shape[0]
    num_train = int(scheduler.config.num_train_timesteps)
    t = torch.randint(0, num_train, (b,), generator=generator)
    noise = torch.randn(z_w.shape, generator=generator, dtype=torch.float32)
    z = torch.cat([z_w, z_l]).float()
    t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
    x = scheduler.add_noise(z, noise2, t2)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise2
    elif kind == "v_prediction":
        target = scheduler.get_velocity(z, noise2, t2)
    else:
        raise DiffalignError(
            f"dpo: the scheduler's prediction_type {kind!r} is not supported (epsilon or v_prediction)"
        )
    return x, t2, target


class DiffusionDPO(Method):
    """Offline Diffusion-DPO on ``data.train`` pairs (module docstring)."""

    name = "dpo"
    needs_differentiable_reward = False
    uses_dataset = True
    dataset_images = ("winner", "loser")

    def __init__(self, cfg: DiffusionDPOConfig, sample: SampleConfig, train: TrainConfig) -> None:
        self.cfg, self.sample, self.train = cfg, sample, train
        self.cache = LatentCache(cfg.cache_latents)

    def batches_per_step(self) -> int:
        return self.train.gradient_accumulation_steps

    def errors(self, ctx: StepContext, prompts: list[str], x: torch.Tensor, t: torch.Tensor, target: torch.Tensor):
        """Per-sample denoising errors mean_CHW (target - prediction)^2 [2B] of the policy (with gradient)."""
        device = ctx.device
        pred = ctx.denoiser(prompts + prompts, guidance_scale=1.0)(x.to(device), t.to(device))
        return ((pred.float() - target.to(device)) ** 2).mean(dim=tuple(range(1, pred.ndim)))

    def pair_loss(self, ctx: StepContext, batch: DatasetBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The Diffusion-DPO loss of one batch of pairs (reference first, under no_grad, then the policy)."""
        z_w, z_l = self.cache.get(ctx, batch, "winner"), self.cache.get(ctx, batch, "loser")
        if z_w.shape != z_l.shape:
            raise DiffalignError(
                f"dpo: winner and loser images of a pair encode to different latent sizes ({tuple(z_w.shape[1:])} vs "
                f"{tuple(z_l.shape[1:])}); set data.image_size to resize every image"
            )
        x, t, target = noisy_pair(ctx.scheduler, z_w, z_l, ctx.generator)
        prompts, b = list(batch.local), z_w.shape[0]
        with torch.no_grad(), ctx.reference():
            ref = self.errors(ctx, prompts, x, t, target)
        err = self.errors(ctx, prompts, x, t, target)
        return diffusion_dpo_loss(err[:b], err[b:], ref[:b], ref[b:], self.cfg.beta)

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        losses, stats = [], []
        for batch in batches:
            if not isinstance(batch, DatasetBatch):
                raise RuntimeError("dpo trains from data.train records (DatasetBatch), got prompts")
            loss, st = self.pair_loss(ctx, batch)
            ctx.backward(loss / len(batches))
            losses.append(float(loss.detach()))
            stats.append(st)
        norm = ctx.optimizer_step()
        last = batches[-1]
        with torch.no_grad():
            images = torch.cat([last.images["winner"], last.images["loser"]]).to(ctx.device)
            b = len(last.local)
            signal, parts = ctx.rewards(images, list(last.local) + list(last.local))
        out = {k: sum(float(s[k]) for s in stats) / len(stats) for k in stats[0]}
        out["data_margin"] = float((signal[:b] - signal[b:]).float().mean())
        return StepResult(
            loss=sum(losses) / len(losses),
            rewards={k: v[:b].detach() for k, v in parts.items()},
            reward=signal[:b].detach(),
            grad_norm=norm,
            updates=1,
            stats=out,
            images=last.images["winner"],
        )


def validate_dpo(cfg: DiffalignConfig) -> None:
    """Diffusion-DPO: a step is train.gradient_accumulation_steps batches of sample.batch_size pairs."""
    if cfg.sample.num_batches != 1:
        raise DiffalignError(
            "sample.num_batches is for online methods; dpo draws train.gradient_accumulation_steps batches of "
            "sample.batch_size pairs per update: leave sample.num_batches at 1"
        )


register_method(MethodEntry("dpo", DiffusionDPO, DiffusionDPOConfig, "dpo", False, validate_dpo))
