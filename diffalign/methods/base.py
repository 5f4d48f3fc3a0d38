"""What a training method sees of the trainer, and what it hands back.

A method never touches devices, processes, files or checkpoints. The trainer gives it a
:class:`StepContext` (sampling helpers bound to the pipeline, the rewards, ``backward`` and
``optimizer_step``) and the prompts of one training step; the method samples what it needs, computes
its loss with pure tensor functions and returns a :class:`StepResult`. Anything the method must carry
across steps (advantage statistics, ...) lives in ``state_dict()`` so that checkpoints resume it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from diffalign.combine import Combined
    from diffalign.config import SampleConfig, TrainConfig
    from diffalign.sampling import Denoiser, Sampler


@dataclass
class PromptBatch:
    """One sampling batch: this process's prompts and the whole batch over all processes.

    ``everyone`` is the concatenation of every process's ``local`` list in process order, i.e. the
    order in which ``ctx.gather`` concatenates per-process tensors: process p's ``local`` is the
    contiguous slice ``everyone[p*b : (p+1)*b]`` (b = ``sample.batch_size``). The same prompt may occur
    more than once. Methods that sample several images per prompt (GRPO: G per prompt) repeat each of
    their ``local`` prompts G times on this process and name a group by the prompt's position in
    ``everyone`` (:func:`diffalign.rollouts.grouped_prompts`), so a group never straddles processes.
    """

    local: list[str]
    everyone: list[str]


@dataclass
class StepResult:
    """What one training step reports (values of this process; the trainer aggregates them)."""

    loss: float
    rewards: dict[str, torch.Tensor]  # reward name -> [n] detached values of this process's samples
    reward: torch.Tensor  # [n] combined reward signal of the same samples (reward.combine)
    grad_norm: float  # mean pre-clipping gradient norm over the optimizer updates of the step
    updates: int  # optimizer updates performed in the step
    stats: dict[str, float] = field(default_factory=dict)  # method diagnostics (averaged over processes)
    images: torch.Tensor | None = None  # some images of the step (for sample grids), [B, 3, H, W] in [0, 1]
    # the prompt of each of ``images`` (their grid's captions); ``images`` are the last ``len(images)`` samples
    # of ``reward``
    prompts: list[str] | None = None


class StepContext(Protocol):
    """The trainer's side of a step (see :class:`diffalign.trainer.Rollout`)."""

    sample: SampleConfig
    scheduler: Any  # DDIMScheduler (SD3: FlowMatchEulerDiscreteScheduler), set_timesteps(sample.steps) done
    sampler: Sampler  # the step rule over that scheduler (diffalign.sampling.make_sampler): DDIM, or flow for SD3
    generator: torch.Generator  # CPU generator for sampler noise (owned and checkpointed by the trainer)
    rng: random.Random  # for truncation draws and permutations (owned and checkpointed by the trainer)
    checkpointing: bool  # wrap every UNet call with gradient in activation checkpointing
    trains_text_encoder: bool  # a LoRA on the text encoder(s) trains too (model.lora.text_encoder)
    # the diffusers pipeline, for a method that attaches LoRA adapters of its own in ``configure``
    # (DiffusionNFT's old policy: diffalign.pipelines.add_adapter_copy / active_adapter); sample through the helpers
    pipe: Any

    def denoiser(self, prompts: list[str], guidance_scale: float | None = None) -> Denoiser:
        """The UNet as ``denoise(x, t)`` for ``prompts``: with the sampling guidance, or ``guidance_scale``."""
        ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE encode: images [B, 3, H, W] in [0, 1] -> latents (the distribution's mean; no gradient)."""
        ...

    def initial_latents(self, n: int) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor: ...
    def rewards(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The combined reward signal [B] and each reward's values (NaN-checked)."""
        ...

    def reward_values(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each reward's values ``{key: Tensor[B]}`` of this batch (NaN-checked), not combined: for callers
        that gather them over processes and combine the whole batch (:func:`diffalign.rollouts.collect`)."""
        ...

    def reward_terms(self, images: torch.Tensor, prompts: list[str]) -> tuple[Combined, dict[str, torch.Tensor]]:
        """Each reward's values combined over this batch by ``reward.combine`` (signal, per-sample weights,
        selection mask, stats; :class:`diffalign.combine.Combined`), and the values themselves."""
        ...

    def combine(self, values: dict[str, torch.Tensor], groups: torch.Tensor | None = None) -> Combined:
        """``reward.combine`` over given per-reward values (e.g. gathered over processes); ``groups`` lets
        a selecting combiner select within each group of one prompt's samples."""
        ...

    @property
    def reward_models(self) -> dict[str, Any]:
        """The run's training rewards by key; a method binds a reward whose scorer it owns here, in
        ``configure`` (Adv-GRPO's discriminator: ``reward_models.adversarial``)."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...
    def optimizer_step(self) -> float: ...
    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def prompt_keys(self, prompts: list[str]) -> list[str]: ...
    def sync_gradients(self, params: Iterable[torch.nn.Parameter]) -> None: ...
    def reference(self) -> AbstractContextManager[None]:
        """The reference policy: a context manager inside which the denoisers built and called are the
        base model's (the same UNet and text encoders with the LoRA disabled, no second copy); the LoRA
        is enabled again on exit, also after an exception. GRPO's KL term (spec §6.1)."""
        ...

    @property
    def process_index(self) -> int: ...
    @property
    def num_processes(self) -> int: ...
    @property
    def device(self) -> torch.device: ...


class Method:
    """Base class: a name, whether the reward must be differentiable, state for checkpoints.

    A method becomes usable as ``train.method`` by a :class:`~diffalign.methods.registry.MethodEntry`
    registered from its module; the trainer builds it as ``cls(section_config, sample, train)``.
    ``needs_differentiable_reward`` is the default of the entry's flag, which the config checks
    against the training rewards before any model loads.

    **State the method owns** (docs/training.md, "Methods with their own modules and optimizers"):

    - trainable modules (a discriminator, a value head): built in :meth:`configure`, returned by
      :meth:`modules`; the trainer moves them to its device, saves their state dicts in every checkpoint
      (``method_modules.safetensors``, exact values) and loads them back on resume;
    - their optimizers (and any other ``torch.optim.Optimizer`` over them): returned by
      :meth:`optimizers`; their states go into every checkpoint's ``state.pt`` and are restored on
      resume, so a resumed run continues bit for bit;
    - plain Python / tensor state (running statistics, counters, an LR scheduler's ``state_dict()``):
      :meth:`state_dict` / :meth:`load_state_dict` (called after the modules and optimizers are restored).

    Randomness: a method draws only from ``ctx.generator`` (torch) and ``ctx.rng`` (python), which the
    trainer checkpoints per process; the global RNGs are not the method's. With several processes, a
    method that steps its own optimizer averages the gradients first with
    ``ctx.sync_gradients(params)`` (as ``ctx.optimizer_step`` does for the LoRA) and steps on every
    process, so the modules stay equal everywhere. The trainer does not wrap owned modules in DDP and
    does not scale their losses: call ``loss.backward()`` on a module's own loss (``ctx.backward`` is for
    the LoRA's loss and applies the fp16 gradient scaler).

    **A dataset on disk** instead of the prompt stream: a method with ``uses_dataset = True`` requires
    the config's ``data.train`` (a JSONL file, :mod:`diffalign.datasets`); every record must hold a
    ``prompt``, an image path under each key of ``dataset_images`` and a number under each key of
    ``dataset_labels``. Its :meth:`step` then receives :class:`diffalign.datasets.DatasetBatch` objects
    (a :class:`PromptBatch` with the local ``records``, their ``images`` as ``[B, 3, H, W]`` tensors in
    ``[0, 1]`` on the CPU and their ``labels`` as ``[B]`` tensors), each process a disjoint slice of the
    global batch, reshuffled every epoch from ``train.seed``, the position checkpointed.
    """

    name: str = "method"
    needs_differentiable_reward: bool = False
    uses_dataset: bool = False  # train from records of data.train instead of prompts.train
    dataset_images: tuple[str, ...] = ()  # record keys holding image paths (e.g. ("chosen", "rejected"))
    dataset_labels: tuple[str, ...] = ()  # record keys holding numbers (e.g. ("score",))

    def __init__(self, cfg: Any, sample: SampleConfig, train: TrainConfig) -> None:
        self.cfg, self.sample, self.train = cfg, sample, train

    def batches_per_step(self) -> int:
        """How many :class:`PromptBatch` of ``sample.batch_size`` prompts one step consumes."""
        return 1

    def updates_per_step(self) -> int:
        """Optimizer updates one step makes (the horizon of ``train.lr_schedule=cosine`` is steps x this)."""
        return 1

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        raise NotImplementedError

    def check_dataset(self, dataset: Any) -> None:
        """Check the records of ``data.train`` beyond the platform's checks (a method with ``uses_dataset``;
        ``dataset`` is a :class:`diffalign.datasets.JsonlDataset`), before any model loads. Raise one-line
        :class:`~diffalign.errors.DiffalignError` s naming the file and line. The default checks nothing."""
        return None

    def configure(self, ctx: StepContext) -> None:
        """Build the modules and optimizers the method owns; called once, after the pipeline loads and
        before a checkpoint is restored (a resumed run then overwrites their values and states).

        ``ctx`` is the trainer's :class:`StepContext` (``ctx.device``, ``ctx.process_index``, ...). Module
        initialization here may draw from the global torch RNG: the trainer seeds it from ``train.seed``
        (the same on every process, so every process builds equal modules) and restores it afterwards.
        Do not draw from ``ctx.generator`` or ``ctx.rng`` here. The default builds nothing.
        """
        return None

    def modules(self) -> dict[str, torch.nn.Module]:
        """The trainable modules the method owns, by name (an identifier: the checkpoint keys are
        ``<name>.<state-dict key>``); the same objects on every call. Default: none."""
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers the method owns (over parameters of :meth:`modules`), by name; their states are
        checkpointed and restored. Default: none."""
        return {}

    def eval_stats(self, ctx: StepContext, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Numbers the method adds to each evaluation record, from this process's evaluation images
        ``[n, 3, H, W]`` (CPU, in [0, 1]) and their prompts (Adv-GRPO: its discriminator's accuracy on
        held-out references vs these images). Averaged over processes; no collective calls here. Default: none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Plain state carried across steps (tensors, numbers, lists, dicts: ``torch.load(weights_only=True)``
        must read it back); saved in every checkpoint's ``state.pt``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume (after :meth:`modules` and :meth:`optimizers` are restored)."""
        return None


def check_minibatches(method: str, what: str, per_step: int, train_batch_size: int, accumulation: int) -> None:
    """One-line errors unless a step's ``per_step`` samples (``what``: the config product that gives it) split
    into whole minibatches of ``train_batch_size`` and the minibatches into whole updates of
    ``accumulation`` (``train.gradient_accumulation_steps``): the policy methods' shared validation."""
    from diffalign.errors import DiffalignError

    if per_step % train_batch_size:
        raise DiffalignError(
            f"{method}: samples per step per process ({what} = {per_step}) must be divisible by "
            f"{method}.train_batch_size ({train_batch_size})"
        )
    minibatches = per_step // train_batch_size
    if minibatches % accumulation:
        raise DiffalignError(
            f"{method}: {minibatches} minibatches per inner epoch is not divisible by "
            f"train.gradient_accumulation_steps ({accumulation}); an update would be lost"
        )


def backward_denoisers(
    ctx: StepContext, prompts: list[str], n: int, guidance_scale: float | None = None
) -> Iterator[Denoiser]:
    """``n`` denoisers of ``prompts`` for ``n`` separate backward passes (one per trained step).

    While the text encoder is frozen they are one denoiser, its prompt encoding computed once. When a
    text-encoder LoRA trains (``model.lora.text_encoder``), each pass gets its own encoding: a graph through
    the text encoder serves one backward only, and sharing it would fail at the second.
    """
    kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    shared = None if getattr(ctx, "trains_text_encoder", False) else ctx.denoiser(prompts, **kwargs)
    for _ in range(n):
        yield shared if shared is not None else ctx.denoiser(prompts, **kwargs)
