"""What a training method sees of the trainer, and what it hands back.

A method never touches devices, processes, files or checkpoints. The trainer gives it a
:class:`StepContext` (sampling helpers bound to the pipeline, the rewards, ``backward`` and
``optimizer_step``) and the prompts of one training step; the method samples what it needs, computes
its loss with pure tensor functions and returns a :class:`StepResult`. Anything the method must carry
across steps (advantage statistics, ...) lives in ``state_dict()`` so that checkpoints resume it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from diffalign.config import SampleConfig
    from diffalign.sampling import Denoiser


@dataclass
class PromptBatch:
    """One sampling batch: this process's prompts and the whole batch over all processes.

    ``everyone`` is the concatenation of every process's ``local`` list in process order, i.e. the
    order in which ``ctx.gather`` concatenates per-process tensors.
    """

    local: list[str]
    everyone: list[str]


@dataclass
class StepResult:
    """What one training step reports (values of this process; the trainer aggregates them)."""

    loss: float
    rewards: dict[str, torch.Tensor]  # reward name -> [n] detached values of this process's samples
    reward: torch.Tensor  # [n] combined (weighted) reward of the same samples
    grad_norm: float  # mean pre-clipping gradient norm over the optimizer updates of the step
    updates: int  # optimizer updates performed in the step
    stats: dict[str, float] = field(default_factory=dict)  # method diagnostics (averaged over processes)
    images: torch.Tensor | None = None  # some images of the step (for sample grids), [B, 3, H, W] in [0, 1]


class StepContext(Protocol):
    """The trainer's side of a step (see :class:`diffalign.trainer.Rollout`)."""

    sample: SampleConfig
    scheduler: Any  # DDIMScheduler with set_timesteps(sample.steps) done
    generator: torch.Generator  # CPU generator for sampler noise (owned and checkpointed by the trainer)
    rng: random.Random  # for truncation draws and permutations (owned and checkpointed by the trainer)
    checkpointing: bool  # wrap every UNet call with gradient in activation checkpointing

    def denoiser(self, prompts: list[str]) -> Denoiser: ...
    def initial_latents(self, n: int) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor: ...
    def rewards(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def optimizer_step(self) -> float: ...
    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def prompt_keys(self, prompts: list[str]) -> list[str]: ...

    @property
    def process_index(self) -> int: ...


class Method:
    """Base class: a name, whether the reward must be differentiable, state for checkpoints."""

    name: str = "method"
    needs_differentiable_reward: bool = False

    def batches_per_step(self) -> int:
        """How many :class:`PromptBatch` of ``sample.batch_size`` prompts one step consumes."""
        return 1

    def updates_per_step(self) -> int:
        """Optimizer updates one step makes (the horizon of ``train.lr_schedule=cosine`` is steps x this)."""
        return 1

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
