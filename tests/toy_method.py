"""A toy training method defined outside diffalign/: list it in a config as ``plugins: [toy_method]``.

Gradient through the last sampler step only; loss ``-scale * mean(r)``; one update per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.methods import Method, MethodEntry, PromptBatch, StepContext, StepResult, register_method
from diffalign.sampling import sample_differentiable


@dataclass
class ToyConfig:
    """The ``toy:`` section."""

    scale: float = 1.0  # loss = -scale * mean reward


class Toy(Method):
    """Samples one batch with gradient through the last step and pushes the LoRA up the reward."""

    name = "toy"

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        prompts = batches[0].local
        latents, last = ctx.initial_latents(len(prompts)), self.sample.steps - 1
        x0, _ = sample_differentiable(
            ctx.denoiser(prompts), ctx.scheduler, latents, grad_from=last, eta=self.sample.eta, generator=ctx.generator
        )
        r, parts = ctx.rewards(ctx.decode(x0, differentiable=True), prompts)
        loss = -self.cfg.scale * r.mean()
        ctx.backward(loss)
        rewards = {k: v.detach() for k, v in parts.items()}
        norm = ctx.optimizer_step()
        return StepResult(float(loss.detach()), rewards, r.detach(), norm, 1, {"toy_scale": self.cfg.scale})


register_method(MethodEntry("toy", Toy, ToyConfig, "toy", needs_differentiable_reward=True))
