"""A toy method that owns state (``plugins: [toy_state_method]``): a linear "discriminator" with its own
Adam optimizer, trained every step on the sampled images' mean color, and a running reward normalizer.

Step: sample with gradient through the last sampler step; the LoRA's loss is
``-scale * mean(r + bonus * disc(mean_color(x)))`` with the discriminator frozen; then the
discriminator regresses the normalized rewards (gathered over processes) from the detached mean colors,
jittered with noise from ``ctx.generator``, one Adam step with gradients averaged over processes.
``record_dir`` (when set) makes every process append its discriminator's weights after each step to
``record_dir/<process_index>.jsonl`` (to check that the processes stay equal).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffalign.methods import Method, MethodEntry, PromptBatch, StepContext, StepResult, register_method
from diffalign.sampling import sample_differentiable


@dataclass
class ToyStateConfig:
    """The ``toy_state:`` section."""

    scale: float = 1.0  # weight of the LoRA's loss
    bonus: float = 0.5  # weight of the discriminator's score in the LoRA's loss
    disc_lr: float = 0.05  # Adam learning rate of the discriminator
    jitter: float = 0.01  # std of the noise added to the discriminator's inputs (from ctx.generator)
    record_dir: str = ""  # append each process's discriminator weights here after every step ("" = off)


class RunningNormalizer:
    """Running mean and variance of every reward seen (Welford); plain Python floats, checkpointed."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        for v in values:
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / (self.std + 1e-6)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class ToyState(Method):
    """Owns a ``disc`` module with its Adam optimizer, and a normalizer in ``state_dict()``."""

    name = "toy_state"
    needs_differentiable_reward = True

    def __init__(self, cfg: ToyStateConfig, sample: Any, train: Any) -> None:
        super().__init__(cfg, sample, train)
        self.normalizer = RunningNormalizer()

    def configure(self, ctx: StepContext) -> None:
        self.disc = torch.nn.Linear(3, 1)  # initialized from the global RNG the trainer seeds
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=self.cfg.disc_lr)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"disc": self.disc}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"disc": self.opt}

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        prompts = batches[0].local
        latents, last = ctx.initial_latents(len(prompts)), self.sample.steps - 1
        x0, _ = sample_differentiable(
            ctx.denoiser(prompts), ctx.scheduler, latents, grad_from=last, eta=self.sample.eta, generator=ctx.generator
        )
        images = ctx.decode(x0, differentiable=True)
        r, parts = ctx.rewards(images, prompts)
        colors = images.float().mean(dim=(2, 3))  # [B, 3]

        # the LoRA's update: reward plus the (frozen) discriminator's score
        self.disc.requires_grad_(False)
        loss = -self.cfg.scale * (r + self.cfg.bonus * self.disc(colors).squeeze(1)).mean()
        self.disc.requires_grad_(True)
        ctx.backward(loss)
        norm = ctx.optimizer_step()

        # the discriminator's update: regress the normalized rewards of all processes from the mean colors
        self.normalizer.update(ctx.gather(r.detach().double()).tolist())
        target = self.normalizer(r.detach().double()).float()
        noise = torch.randn(colors.shape, generator=ctx.generator).to(colors.device) * self.cfg.jitter
        pred = self.disc(colors.detach() + noise).squeeze(1)
        disc_loss = ((pred - target) ** 2).mean()
        self.opt.zero_grad(set_to_none=True)
        disc_loss.backward()
        ctx.sync_gradients(self.disc.parameters())
        self.opt.step()
        if self.cfg.record_dir:
            with open(Path(self.cfg.record_dir) / f"{ctx.process_index}.jsonl", "a") as fh:
                weights = [p.detach().double().reshape(-1).tolist() for p in self.disc.parameters()]
                fh.write(json.dumps(weights) + "\n")

        stats = {
            "disc_loss": float(disc_loss.detach()),
            "disc_w0": float(self.disc.weight.detach()[0, 0]),
            "norm_mean": self.normalizer.mean,
            "norm_count": float(self.normalizer.count),
        }
        rewards = {k: v.detach() for k, v in parts.items()}
        return StepResult(float(loss.detach()), rewards, r.detach(), norm, 1, stats, images.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"normalizer": self.normalizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state["normalizer"])


register_method(MethodEntry("toy_state", ToyState, ToyStateConfig, "toy_state"))
