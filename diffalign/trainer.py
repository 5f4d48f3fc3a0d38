"""The one training loop every method shares (docs/architecture.md):

    prompts -> sample -> rewards -> combine -> method loss -> optimizer step on LoRA -> log / eval / checkpoint

The trainer owns everything but the method: accelerate (device, mixed precision, processes), the
frozen pipeline with its LoRA, AdamW over the LoRA parameters only, the prompt stream (every process
draws the same global batch and keeps its slice), rewards (checked for NaN on every call), logging
(``metrics.jsonl``; TensorBoard / W&B through accelerate trackers), held-out evaluation, checkpoints
and exact resume. Only the main process writes files.

Gradients are averaged across processes by one all-reduce of the flattened LoRA gradients before
clipping (not by wrapping the UNet in DDP: reward backprop calls the UNet many times per backward,
which DDP's reducer does not allow). Gradient accumulation is explicit: one training step runs all
its micro-batches, then updates. With ``train.fsdp.enabled`` the frozen backbone is sharded over the
processes by FSDP2 (:mod:`diffalign.fsdp`) while the LoRA stays replicated, so all of the above holds as is.

Resume is exact on CPU: a resumed run writes the same ``metrics.jsonl`` and ``eval.jsonl`` as an
uninterrupted one, except for the wall-clock values, which live under the ``time`` key of each record.

A method may own trainable modules and their optimizers (``Method.configure`` / ``modules`` /
``optimizers``): the trainer builds them once after the pipeline loads (global torch RNG seeded from
``train.seed``, then restored), moves them to the device, checkpoints their values
(``method_modules.safetensors``) and optimizer states (``state.pt``) and restores them on resume; the
method averages their gradients over processes with ``ctx.sync_gradients``. A method with
``uses_dataset`` draws :class:`~diffalign.datasets.DatasetBatch` es from ``data.train`` instead of
prompt batches (:meth:`Trainer._draw`), the stream's position checkpointed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffalign.checkpoint import (
    MODULES_FILE,
    Checkpointer,
    capture_rng,
    is_write_failure,
    load_module_tensors,
    module_tensors,
    one_line,
    restore_rng,
    truncate_jsonl,
    write_fix,
)
from diffalign.combine import Combined, build_combiner, reward_keys
from diffalign.config import DiffalignConfig
from diffalign.ema import ParamEMA
from diffalign.errors import DiffalignError
from diffalign.methods import PromptBatch, StepResult, build_method
from diffalign.paths import check_output_path
from diffalign.prompts import PromptSampler, eval_prompts, load_prompts, non_shapes_prompt
from diffalign.runinfo import append_run_info

DTYPE_BY_PRECISION = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
# What a run directory holds: these must be directories, those files (when they exist).
RUN_DIRS = ("checkpoints", "samples", "lora", "logs")
RUN_FILES = ("metrics.jsonl", "eval.jsonl", "config.yaml", "eval_prompts.jsonl", MODULES_FILE)
RUN_ENTRY_MESSAGES = {  # a run entry of the wrong kind (diffalign.paths.check_output_path)
    "entry_not_dir": "{entry} is a file, but a run keeps a directory there; move it away or {fix}",
    "entry_not_file": "{entry} is a directory, but a run writes a file there; move it away or {fix}",
}


def process_seeds(seed: int, process_index: int) -> tuple[int, int]:
    """Two independent seeds (torch generator, python Random) for one process of a run."""
    a, b = np.random.SeedSequence([seed, process_index]).generate_state(2)
    return int(a), int(b)


def method_init_seed(seed: int) -> int:
    """The seed of the global torch RNG while a method builds its modules (the same on every process)."""
    return int(np.random.SeedSequence([seed, 0x6D6F64756C6573]).generate_state(1)[0])


def check_distributed_type(name: str) -> None:
    """Refuse, in one line, an accelerate launch whose distributed type diffalign does not train with
    (``accelerate launch --use_fsdp`` / DeepSpeed / Megatron-LM): LoRA trains data-parallel, and the frozen
    base is sharded by ``train.fsdp`` under a ``--multi_gpu`` launch instead."""
    if name == "FSDP":
        raise DiffalignError(
            "accelerate launch --use_fsdp is not how diffalign shards: launch with --multi_gpu and set "
            "train.fsdp.enabled=true (the frozen base is sharded with FSDP2, the LoRA stays data-parallel)"
        )
    if name in ("DEEPSPEED", "MEGATRON_LM"):
        raise DiffalignError(
            f"diffalign trains LoRA adapters with data parallelism, not {name}: launch with accelerate launch "
            "--multi_gpu (add train.fsdp.enabled=true to shard the frozen base)"
        )


def check_fsdp_launch(num_processes: int, eval_prompts: int | None = None) -> None:
    """Refuse, in one line, ``train.fsdp.enabled`` where it cannot run: FSDP2 missing from the installed torch or
    accelerate, a single process, or evaluation prompts that do not split evenly over the processes (every
    process must call the sharded backbone equally often)."""
    from diffalign.fsdp import fsdp_unavailable_reason

    reason = fsdp_unavailable_reason()
    if reason is not None:
        raise DiffalignError(f"train.fsdp.enabled=true but {reason}; set train.fsdp.enabled=false")
    if num_processes < 2:
        raise DiffalignError(
            "train.fsdp.enabled=true shards the base over processes, but this is one process: launch with "
            "accelerate launch --multi_gpu --num_processes N (N >= 2), or set train.fsdp.enabled=false"
        )
    if eval_prompts is not None and eval_prompts % num_processes:
        raise DiffalignError(
            f"train.fsdp.enabled=true needs a number of evaluation prompts divisible by the {num_processes} "
            f"processes (each process must call the sharded model equally often), got {eval_prompts}: set "
            "eval.num_prompts"
        )


def average_gradients(acc: Any, params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the processes of ``acc`` with one all-reduce of their
    concatenation (a parameter without a gradient counts as zeros and gets the average); no-op alone."""
    if acc.num_processes == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = acc.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


class Rollout:
    """The :class:`diffalign.methods.StepContext` of this trainer: sampling, rewards, backward, updates."""

    def __init__(self, trainer: Trainer) -> None:
        from diffalign.pipelines import pipeline_sampler

        t = trainer
        self.trainer, self.acc, self.pipe, self.cfg = t, t.acc, t.pipe, t.cfg
        self.sample = t.cfg.sample
        self.scheduler = t.pipe.scheduler
        # an unsupported scheduler fails here, in one line; FLUX's dynamic shift is set for the default size
        self.sampler = pipeline_sampler(t.pipe, self.sample.steps)
        self.generator, self.rng = t.generator, t.rng
        self.checkpointing = t.cfg.model.gradient_checkpointing
        self.trains_text_encoder = t.cfg.model.lora.text_encoder
        self.step = 0

    # ---------------------------------------------------------------------- processes
    @property
    def process_index(self) -> int:
        return self.acc.process_index

    @property
    def num_processes(self) -> int:
        return self.acc.num_processes

    @property
    def is_main_process(self) -> bool:
        return self.acc.is_main_process

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(tensor.to(self.device).contiguous())

    # ------------------------------------------------------------------------ sampling
    def denoiser(self, prompts: list[str], guidance_scale: float | None = None):
        """``denoise(x, t)`` of the UNet (or SD3 transformer) for ``prompts``, with the sampling guidance (``sample.guidance_scale``)
        or ``guidance_scale`` when given (1.0: the conditional prediction alone, as offline Diffusion-DPO trains)."""
        from diffalign.pipelines import backbone, encode_prompts
        from diffalign.sampling import make_denoiser

        scale = self.sample.guidance_scale if guidance_scale is None else float(guidance_scale)
        guide = scale != 1.0
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.model.lora.text_encoder):
            cond = encode_prompts(self.pipe, prompts, self.sample.negative_prompt, guidance=guide)
        return make_denoiser(
            backbone(self.pipe),
            guidance_scale=scale,
            guidance_rescale=self.sample.guidance_rescale,
            **cond.denoiser_kwargs(),
        )

    def initial_latents(self, n: int, generator: Any = None) -> torch.Tensor:
        from diffalign.pipelines import initial_latents

        return initial_latents(self.pipe, n, self.generator if generator is None else generator)

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        from diffalign.pipelines import decode

        return decode(self.pipe, latents, differentiable=differentiable, checkpoint=self.checkpointing)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> latents with the pipeline's VAE (the latent distribution's mean,
        scaled as the sampler's latents; no gradient)."""
        from diffalign.pipelines import encode

        return encode(self.pipe, images.to(self.device))

    def prompt_keys(self, prompts: list[str]) -> list[str]:
        """Prompts as the tokenizer sees them (DDPO's stat-tracker keys, spec §2.2)."""
        tok = self.pipe.tokenizer
        ids = tok(prompts, truncation=True, max_length=tok.model_max_length).input_ids
        return tok.batch_decode(ids, skip_special_tokens=True)

    # ----------------------------------------------------------------------- reference
    @staticmethod
    @contextlib.contextmanager
    def adapters_disabled(pipe: Any) -> Iterator[None]:
        """The pipeline's base model: every peft LoRA layer of the UNet (or SD3 transformer) and the text
        encoders disabled.

        peft's ``BaseTunerLayer.enable_adapters(False)`` on each LoRA layer (what diffusers'
        ``unet.disable_adapters()`` does for the UNet; text encoders carry layers injected with peft's
        ``inject_adapter_in_model``), so the layers compute ``base_layer(x)`` only. On exit, also after
        an exception, every layer gets back its previous state (a layer that was disabled before stays
        disabled, so contexts nest) and every adapter parameter its previous ``requires_grad`` (peft
        toggles that flag too). No weights are copied or changed.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        from diffalign.pipelines import backbone

        models = [backbone(pipe), getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]
        layers = [m for model in models if model is not None for m in model.modules() if isinstance(m, BaseTunerLayer)]
        was_disabled = [bool(layer.disable_adapters) for layer in layers]
        grads = [
            (p, p.requires_grad)
            for layer in layers
            for name in layer.adapter_layer_names
            for p in getattr(layer, name).parameters()
        ]
        try:
            for layer in layers:
                layer.enable_adapters(False)
            yield
        finally:
            for layer, disabled in zip(layers, was_disabled, strict=True):
                layer.enable_adapters(not disabled)
            for p, flag in grads:
                p.requires_grad_(flag)

    def reference(self) -> contextlib.AbstractContextManager[None]:
        """The reference policy pi_ref = the same UNet (and text encoders) with the LoRA disabled, as a
        context manager (spec §0 theta_ref; Flow-GRPO's ``disable_adapter()``): denoisers built and called
        inside it are the base model's; the adapters are enabled again on exit, also after an exception.
        No second copy of the UNet is kept."""
        return self.adapters_disabled(self.pipe)

    # ------------------------------------------------------------------------- rewards
    @property
    def reward_models(self) -> dict[str, Any]:
        """The run's training rewards by key (``reward.rewards``): a method that owns a reward's scorer
        (Adv-GRPO's discriminator, ``reward_models.adversarial``) binds it here in ``configure``."""
        return self.trainer.rewards

    def reward_values(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Every training reward's values ``{key: Tensor[B]}``, stopping every process with one line if any
        reward is NaN or infinite anywhere."""
        parts = {k: r(images, prompts) for k, r in self.trainer.rewards.items()}
        flags = torch.tensor([float(not torch.isfinite(v.detach()).all()) for v in parts.values()], device=self.device)
        if self.num_processes > 1:
            flags = self.acc.reduce(flags, reduction="sum")
        if bool((flags > 0).any()):
            name = list(parts)[int(torch.nonzero(flags > 0)[0])]
            raise DiffalignError(
                f"reward '{name}' returned NaN or inf at step {self.step}; training stopped before that update "
                f"(no checkpoint of step {self.step} was written; the last checkpoint is intact)"
            )
        return parts

    def combine(self, values: dict[str, torch.Tensor], groups: torch.Tensor | None = None) -> Combined:
        """The run's combiner (``reward.combine``) over per-reward values of a batch (local or gathered;
        ``groups``: the group id of each sample, for selection within groups)."""
        return self.trainer.combiner(values, groups)

    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Combined reward signal and per-reward values (no cross-process check: for evaluation)."""
        parts = {k: r(images, prompts) for k, r in self.trainer.rewards.items()}
        return self.combine(parts).signal, parts

    def reward_terms(self, images: torch.Tensor, prompts: list[str]) -> tuple[Combined, dict[str, torch.Tensor]]:
        """:meth:`reward_values` (NaN-checked) combined over this batch: the :class:`Combined` (signal,
        weights, mask, stats) and the per-reward values."""
        parts = self.reward_values(images, prompts)
        return self.combine(parts), parts

    def rewards(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`reward_terms`' combined signal and the per-reward values."""
        terms, parts = self.reward_terms(images, prompts)
        return terms.signal, parts

    # ------------------------------------------------------------------------ updates
    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def _sync_grads(self) -> None:
        average_gradients(self.acc, self.trainer.params)

    def sync_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over processes (one all-reduce; a no-op with one process).

        For the modules a method owns, before it steps their optimizer (every process must call it with
        the same parameters); the LoRA's gradients are averaged by :meth:`optimizer_step`.
        """
        average_gradients(self.acc, list(params))

    def optimizer_step(self) -> float:
        """All-reduce gradients, clip, AdamW step, LR schedule step; returns the pre-clip gradient norm."""
        t = self.trainer
        self._sync_grads()
        max_norm = self.cfg.train.max_grad_norm
        if max_norm > 0:
            norm = self.acc.clip_grad_norm_(t.params, max_norm)
        else:
            self.acc.unscale_gradients()
            norm = torch.nn.utils.clip_grad_norm_(t.params, float("inf"))
        norm = float(norm)
        if not math.isfinite(norm) and self.acc.scaler is None:
            raise DiffalignError(
                f"the gradient norm is {norm} at step {self.step}; training stopped before that update (lower "
                "train.lr, keep train.max_grad_norm > 0, or check the rewards); the last checkpoint is intact"
            )
        t.optimizer.step()
        t.lr_scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        if t.ema is not None:
            t.ema.update()
        return norm


def gallery_command(cfg: DiffalignConfig, out: Path) -> str:
    """The ``diffalign gallery`` command comparing the base model with the run ``out`` on its evaluation
    prompts and seeds, scored by its training and held-out rewards (gold added by the gallery for shapes;
    a reward that scores only inside its run, Adv-GRPO's ``adversarial``, left out)."""
    import shlex

    from reward_models import RewardSpec
    from reward_models.registry import reward_class

    rewards = list(dict.fromkeys([*cfg.reward.rewards, *cfg.eval.rewards]))
    rewards = [s for s in rewards if reward_class(RewardSpec.parse(s).name).standalone]  # not a run's discriminator
    parts = ["diffalign", "gallery", "--run", str(out)]
    for spec in rewards:
        parts += ["--reward", spec]
    parts += ["--out", str(out / "gallery")]
    return " ".join(shlex.quote(p) for p in parts)


def freeze_heap() -> None:
    """Collect, then exempt every object alive now from Python's cyclic garbage collector (``gc.freeze``)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def frozen_heap() -> Iterator[Callable[[], None]]:
    """The training loop's heap, frozen (:func:`freeze_heap`) on entry and given back to the collector on exit.

    A training process holds 0.5-0.9 million long-lived Python objects (the imported libraries, the
    pipeline's modules and, with ``model.compile``, the compiled graphs). Every full collection walks all of
    them: 0.3-0.5 s on a CPU, once every one or two updates of a tiny model (docs/benchmarks.md). Frozen,
    they are skipped; reference counting still frees them as usual, so only cyclic garbage made before a
    freeze waits, until the loop ends (``gc.unfreeze``; a process that trains twice, as the tests do, keeps
    nothing). The context yields the freeze, to call again once the first step has built the optimizer
    state and the compiled graphs.
    """
    freeze_heap()
    try:
        yield freeze_heap
    finally:
        gc.unfreeze()


class Trainer:
    """Build everything from a :class:`DiffalignConfig`, then :meth:`run`."""

    def __init__(self, cfg: DiffalignConfig, resume: str | None = None) -> None:
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.checkpoint.output_dir)
        self.ckpt: Checkpointer | None = None

    def check_output_dir(self) -> None:
        """Refuse, before any model loads, an output directory that cannot be created or written.

        A file at ``checkpoint.output_dir``, a file among its parents, a directory this user may not
        write, or a run entry of the wrong kind (``checkpoints`` as a file, ``metrics.jsonl`` as a
        directory, ...). Nothing is created or changed here.
        """
        check_output_path(
            self.out,
            "output directory",
            "choose another --output-dir (or checkpoint.output_dir)",
            entries={**dict.fromkeys(RUN_DIRS, "dir"), **dict.fromkeys(RUN_FILES, "file")},
            messages=RUN_ENTRY_MESSAGES,
        )

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turn a failed write of ``what`` (disk full, permissions, read-only) into a one-line error."""
        try:
            yield
        except Exception as err:
            if not is_write_failure(err):
                raise
            latest = self.ckpt.latest() if self.ckpt is not None else None
            then = (
                f"continue with --resume latest (the last checkpoint, {latest}, is intact)"
                if latest is not None
                else "run again (no checkpoint was written yet)"
            )
            raise DiffalignError(
                f"cannot write {what} ({one_line(err)}); {write_fix(err, self.out)}, then {then}"
            ) from None

    # ------------------------------------------------------------------------- set-up
    def _accelerator(self):
        from accelerate import Accelerator

        cfg = self.cfg
        if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
            raise DiffalignError("model.device=cuda but no CUDA GPU is visible; use model.device=cpu or auto")
        for tracker in cfg.log.trackers:
            module = "tensorboard" if tracker == "tensorboard" else "wandb"
            try:
                __import__(module)
            except ImportError:
                raise DiffalignError(
                    f"log.trackers lists {tracker} but {module} is not installed: pip install 'diffalign[logging]' "
                    "or drop it from log.trackers"
                ) from None
        return Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            cpu=cfg.model.device == "cpu",
            log_with=list(cfg.log.trackers) or None,
            project_dir=str(self.out / "logs"),
        )

    def _setup(self) -> None:
        from diffusers.optimization import (
            get_constant_schedule,
            get_constant_schedule_with_warmup,
            get_cosine_schedule_with_warmup,
        )

        from diffalign.evaluation import Evaluator
        from diffalign.methods.registry import check_method_sampler
        from diffalign.pipelines import add_lora, backbone, compile_backbone, load_pipeline, pipeline_sampler_kind
        from reward_models import RewardSpec, get_reward

        cfg = self.cfg
        self.acc = acc = self._accelerator()
        check_distributed_type(acc.distributed_type.value)
        fsdp = cfg.train.fsdp
        if fsdp.enabled:
            check_fsdp_launch(acc.num_processes)
        self.method = build_method(cfg)  # before any seeding: a method's constructor cannot shift the LoRA init
        self.data = self._dataset()  # a dataset method's records, read and checked before any model loads
        seed = cfg.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # the same LoRA initialization on every process
        dtype = DTYPE_BY_PRECISION[cfg.train.mixed_precision] if cfg.model.dtype == "auto" else cfg.model.dtype
        check_method_sampler(cfg.train.method, pipeline_sampler_kind(cfg.model.pretrained), cfg.model.pretrained)
        self.pipe = load_pipeline(cfg.model.pretrained, dtype=dtype, device=acc.device, attention=cfg.model.attention)
        self.pipe.set_progress_bar_config(disable=True)
        self.params = add_lora(self.pipe, cfg.model.lora)
        self.fsdp_report: dict[str, Any] | None = None
        if fsdp.enabled:  # shard the frozen base; the LoRA stays replicated (diffalign/fsdp.py)
            from diffalign.fsdp import shard_backbone

            self.fsdp_report = shard_backbone(acc, backbone(self.pipe), fsdp)
        if cfg.model.compile:
            compile_backbone(self.pipe, cfg.model.compile_mode, cfg.model.compile_backend)
        t = cfg.train
        optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
        )
        self.optimizer = acc.prepare(optimizer)
        self.ema = ParamEMA(self.params, t.ema_decay, t.ema_every) if t.ema_decay > 0 else None
        base = self.optimizer.optimizer
        if t.lr_schedule == "cosine":
            horizon = t.steps * self.method.updates_per_step()
            self.lr_scheduler = get_cosine_schedule_with_warmup(base, t.warmup_steps, horizon)
        elif t.lr_schedule == "warmup":
            self.lr_scheduler = get_constant_schedule_with_warmup(base, t.warmup_steps)
        else:
            self.lr_scheduler = get_constant_schedule(base)
        specs = [RewardSpec.parse(s) for s in cfg.reward.rewards]
        self.rewards = dict(zip(reward_keys(specs), (get_reward(s, device=acc.device) for s in specs), strict=True))
        self.reward_weights = cfg.reward.weights if cfg.reward.weights is not None else [s.weight for s in specs]
        self.combiner = build_combiner(
            cfg.reward.combine, list(self.rewards), self.reward_weights, cfg.reward.combine_options
        )
        held = [RewardSpec.parse(s) for s in cfg.eval.rewards]
        heldout = dict(
            zip(reward_keys(held, "eval.rewards"), (get_reward(s, device=acc.device) for s in held), strict=True)
        )
        s_gen, s_rng = process_seeds(seed, acc.process_index)
        if fsdp.enabled:  # control flow drawn alike on every process: each calls the sharded backbone as often
            s_rng = process_seeds(seed, 0)[1]
        self.generator = torch.Generator().manual_seed(s_gen)
        self.rng = random.Random(s_rng)
        self.sampler = PromptSampler(load_prompts(cfg.prompts.train, "prompts.train"), seed)
        ev_prompts = eval_prompts(load_prompts(cfg.prompts.eval, "prompts.eval"), cfg.eval.num_prompts)
        if fsdp.enabled:
            check_fsdp_launch(acc.num_processes, len(ev_prompts))
        gold = cfg.eval.gold == "on" or (cfg.eval.gold == "auto" and non_shapes_prompt(ev_prompts) is None)
        self.evaluator = Evaluator(cfg.eval, cfg.sample, ev_prompts, heldout, gold)
        self.ctx = Rollout(self)
        self._configure_method()
        self.ckpt = Checkpointer(self.out, cfg.checkpoint.keep, acc)
        self.updates, self.metrics_lines, self.eval_lines = 0, 0, 0
        if cfg.log.trackers:
            acc.init_trackers(cfg.log.project, config=cfg.flat())

    def _dataset(self) -> Any:
        """The :class:`~diffalign.datasets.DatasetStream` over ``data.train`` of a method with
        ``uses_dataset`` (its records checked, the global batch no larger than the dataset); else None."""
        if not self.method.uses_dataset:
            return None
        from diffalign.datasets import DatasetStream, JsonlDataset, check_batch_size

        d = self.cfg.data
        dataset = JsonlDataset(
            d.train, self.method.dataset_images, self.method.dataset_labels, check_images=d.check_images
        )
        check_batch_size(dataset, self.cfg.sample.batch_size, self.acc.num_processes)
        self.method.check_dataset(dataset)  # the method's own checks of every record (one line naming file and line)
        return DatasetStream(dataset, self.cfg.train.seed, d.shuffle, d.image_size)

    def _configure_method(self) -> None:
        """Let the method build the modules and optimizers it owns (once, before any resume); move the
        modules to the device. The global torch RNG is seeded for it (equal modules on every process) and
        restored afterwards, so a method with nothing to build changes nothing."""
        method = self.method
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(method_init_seed(self.cfg.train.seed))
            method.configure(self.ctx)
        modules, optimizers = dict(method.modules()), dict(method.optimizers())
        for name, module in modules.items():
            if not (isinstance(name, str) and name.isidentifier()):
                raise ValueError(f"method {method.name!r}: module names must be identifiers, got {name!r}")
            if not isinstance(module, torch.nn.Module):
                raise TypeError(
                    f"method {method.name!r}: modules()[{name!r}] is a {type(module).__name__}, not a Module"
                )
            module.to(self.acc.device)  # in place: the optimizers keep their parameters
        owned = {id(p) for m in modules.values() for p in m.parameters()}
        for name, opt in optimizers.items():
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"method {method.name!r}: optimizers()[{name!r}] is a {type(opt).__name__}")
            if any(id(p) not in owned for group in opt.param_groups for p in group["params"]):
                raise ValueError(
                    f"method {method.name!r}: optimizer {name!r} updates parameters outside modules(), whose values "
                    "no checkpoint would hold; return their modules from modules()"
                )
        self.method_modules: dict[str, torch.nn.Module] = modules
        self.method_optimizers: dict[str, torch.optim.Optimizer] = optimizers

    def named_lora(self) -> dict[str, torch.nn.Parameter]:
        """The trained LoRA (adapter ``default``) by qualified name; another adapter a method adds (DiffusionNFT's
        old policy) is the method's state, checkpointed through its ``modules()``."""
        from diffalign.pipelines import _text_encoders, backbone, backbone_name, lora_adapter_of

        mods = [(backbone_name(self.pipe), backbone(self.pipe))] + _text_encoders(self.pipe)
        return {f"{m}.{n}": p for m, mod in mods for n, p in mod.named_parameters() if lora_adapter_of(n) == "default"}

    def _owned(self) -> dict[str, Any]:
        return {"generator": self.generator, "rng": self.rng}

    # ------------------------------------------------------------------ checkpoints
    def _state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "updates": self.updates,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
            "sampler": self.sampler.state_dict(),
            "method": self.method.state_dict(),
            "evaluator": self.evaluator.state_dict(),
            "metrics_lines": self.metrics_lines,
            "eval_lines": self.eval_lines,
            "method_optimizers": {name: opt.state_dict() for name, opt in self.method_optimizers.items()},
            "data": self.data.state_dict() if self.data is not None else None,
            "combiner": self.combiner.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def _save(self, step: int) -> None:
        best = self.evaluator.best
        self.ckpt.protect = {best["step"]} if self.cfg.checkpoint.keep_best and best is not None else set()
        self.ckpt.save(
            step,
            self._state(step),
            {k: p.detach() for k, p in self.named_lora().items()},
            capture_rng(self._owned()),
            write_extra=lambda d: self._save_lora(d / "lora"),
            modules=module_tensors(self.method_modules) if self.method_modules else None,
        )

    def averaged(self) -> contextlib.AbstractContextManager[None]:
        """Within the block the LoRA holds its EMA (``train.ema_decay`` > 0), else its own weights."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _save_lora(self, path: Path) -> None:
        """The adapter for diffusers (``load_lora_weights``): the EMA when the run keeps one."""
        from diffalign.pipelines import save_lora

        with self.averaged():
            save_lora(self.pipe, path)

    def _load_lora(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        mine = self.named_lora()
        rank = self.cfg.model.lora.rank
        for name, t in tensors.items():
            if name in mine and t.shape != mine[name].shape:
                theirs = t.shape[0] if "lora_A" in name else t.shape[-1]
                raise DiffalignError(
                    f"checkpoint {path} holds a LoRA of rank {theirs} but model.lora.rank is {rank}; resume with "
                    f"model.lora.rank={theirs}, or start a new run in another --output-dir"
                )
        if set(tensors) != set(mine):
            raise DiffalignError(
                f"checkpoint {path} holds LoRA layers that do not match this config's (model.lora.target_modules or "
                "model.lora.text_encoder differ); resume with the settings of the run that wrote it"
            )
        with torch.no_grad():
            for name, p in mine.items():
                p.copy_(tensors[name].to(p.device, p.dtype))

    def _start(self) -> int:
        """Resume or start fresh; returns the last completed step."""
        acc, main = self.acc, self.acc.is_main_process
        self.ckpt.clean_partial()
        path = self.ckpt.resolve(self.resume) if self.resume else None
        if self.resume is None and self.ckpt.checkpoints():
            latest = self.ckpt.checkpoints()[-1][0]
            raise DiffalignError(
                f"{self.out} already holds checkpoints (latest: step {latest}); pass --resume latest to continue "
                "that run, or choose another --output-dir"
            )
        if path is None:
            if self.resume and main:
                print(f"diffalign train: no checkpoint in {self.ckpt.root}; starting from step 0")
            if main:
                with self._writing(f"the output directory {self.out}"):
                    self.out.mkdir(parents=True, exist_ok=True)
                    for name in ("metrics.jsonl", "eval.jsonl"):
                        (self.out / name).write_text("")
            acc.wait_for_everyone()
            return 0
        loaded = self.ckpt.load(path, modules=bool(self.method_modules))  # one line naming a damaged file
        self._load_lora(path, loaded.lora)
        if self.method_modules:
            load_module_tensors(self.method_modules, loaded.modules or {}, path / MODULES_FILE)
        st = loaded.state
        try:
            self.optimizer.load_state_dict(st["optimizer"])
            self.lr_scheduler.load_state_dict(st["lr_scheduler"])
            if self.acc.scaler is not None and st["scaler"] is not None:
                self.acc.scaler.load_state_dict(st["scaler"])
            self.sampler.load_state_dict(st["sampler"])
            self._load_method_state(path, st)
            self._load_combiner_state(path, st)
            if self.ema is not None:
                if st.get("ema") is None:
                    raise ValueError("it holds no EMA of the LoRA (written with train.ema_decay=0)")
                self.ema.load_state_dict(st["ema"])
            self.method.load_state_dict(st["method"])
            self.evaluator.load_state_dict(st["evaluator"])
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as err:
            raise DiffalignError(
                f"checkpoint file {path / 'state.pt'} does not fit this run ({one_line(err)}); resume with the "
                "config of the run that wrote it, or from an older checkpoint with --resume OUT/checkpoints/step_N"
            ) from None
        self.updates, self.metrics_lines, self.eval_lines = st["updates"], st["metrics_lines"], st["eval_lines"]
        error = None
        if main:
            try:  # both files checked before either is cut: an error leaves them as they were
                truncate_jsonl(
                    {self.out / "metrics.jsonl": self.metrics_lines, self.out / "eval.jsonl": self.eval_lines}
                )
            except DiffalignError as err:
                error = err
        self.ckpt.raise_if_any(error, f"the main process could not resume from {path} (see its error)")
        if main:
            print(f"diffalign train: resuming from {path} (step {loaded.step})")
        self.ckpt.remove_after(loaded.step)
        restore_rng(loaded.rng, self._owned())  # last: nothing after this may draw random numbers before step 1
        return loaded.step

    def _load_method_state(self, path: Path, st: dict[str, Any]) -> None:
        """Restore the optimizers the method owns and the dataset position from ``state.pt`` (exactly)."""
        fix = (
            "resume with the config of the run that wrote it, or from an older checkpoint with "
            "--resume OUT/checkpoints/step_N"
        )
        saved = st.get("method_optimizers") or {}
        for name, opt in self.method_optimizers.items():
            if name not in saved:
                raise DiffalignError(
                    f"checkpoint file {path / 'state.pt'} holds no state of the method's optimizer {name!r} (written "
                    f"for another method or by an older diffalign); {fix}"
                )
            opt.load_state_dict(saved[name])
        if self.data is not None:
            if not isinstance(st.get("data"), dict):
                raise DiffalignError(
                    f"checkpoint file {path / 'state.pt'} holds no dataset position (written for a method without "
                    f"data.train); {fix}"
                )
            self.data.load_state_dict(st["data"])

    def _load_combiner_state(self, path: Path, st: dict[str, Any]) -> None:
        """Restore the combiner's calibration statistics (exactly); a checkpoint without any is fine for a
        stateless combiner only."""
        saved = st.get("combiner")
        if saved is None:
            if self.combiner.normalizer is not None:
                raise DiffalignError(
                    f"checkpoint file {path / 'state.pt'} holds no calibration of reward.combine="
                    f"{self.combiner.name} (written with another combiner); resume with the config of the run "
                    "that wrote it"
                )
            return
        self.combiner.load_state_dict(saved)

    def _calibrate(self) -> None:
        """Fit a stateful combiner's frozen statistics on samples of the initial policy (before step 1).

        ``reward.combine_options.calibration_samples`` images over all processes (whole batches of
        ``sample.batch_size`` prompts per process), sampled like training rollouts (``sample.eta``, the
        sampling guidance) from prompts of ``prompts.train``, scored by every training reward and
        gathered, so every process fits the same statistics. Its prompt stream and noise generator are
        its own (seeded from ``train.seed``): the training run draws exactly what it would without it.
        """
        combiner, cfg, ctx = self.combiner, self.cfg, self.ctx
        if not combiner.needs_calibration:
            return
        from diffalign.sampling import sample_trajectory

        b, n_proc, i = cfg.sample.batch_size, self.acc.num_processes, self.acc.process_index
        batches = math.ceil(cfg.reward.combine_options.calibration_samples / (b * n_proc))
        s_gen, s_prompts = np.random.SeedSequence([cfg.train.seed, i, 0x63616C6962]).generate_state(2)
        generator = torch.Generator().manual_seed(int(s_gen))
        prompts = PromptSampler(load_prompts(cfg.prompts.train, "prompts.train"), int(s_prompts))
        values: dict[str, list[torch.Tensor]] = {k: [] for k in self.rewards}
        with torch.no_grad(), self.acc.autocast():
            for _ in range(batches):
                local = prompts.next(b)
                x_T = ctx.initial_latents(b, generator=generator)
                traj = sample_trajectory(ctx.denoiser(local), ctx.sampler, x_T, eta=cfg.sample.eta, generator=generator)
                parts = ctx.reward_values(ctx.decode(traj.final), local)
                for k, v in parts.items():
                    values[k].append(ctx.gather(v.detach().float()).cpu())
        combiner.calibrate({k: torch.cat(v) for k, v in values.items()})
        if self.acc.is_main_process:
            print(f"diffalign train: reward.combine={combiner.describe()}")

    # ---------------------------------------------------------------------- logging
    def _append(self, name: str, record: dict[str, Any]) -> None:
        with self._writing(str(self.out / name)), open(self.out / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if name == "metrics.jsonl":
            self.metrics_lines += 1
        else:
            self.eval_lines += 1

    def _mean(self, value: float) -> float:
        t = torch.tensor([float(value)], device=self.acc.device, dtype=torch.float64)
        return float(self.acc.reduce(t, reduction="mean")) if self.acc.num_processes > 1 else float(value)

    def _record(self, step: int, result: StepResult, seconds: float, elapsed: float) -> dict[str, Any]:
        self.updates += result.updates
        combined = self.ctx.gather(result.reward.detach().float()).double()
        record: dict[str, Any] = {
            "step": step,
            "loss": self._mean(result.loss),
            "reward": float(combined.mean()),
            "reward_std": float(combined.std(unbiased=False)),
            "samples": int(combined.numel()),
        }
        for key, values in result.rewards.items():
            record[f"reward/{key}"] = float(self.ctx.gather(values.detach().float()).double().mean())
        record |= {"grad_norm": result.grad_norm, "lr": self.lr_scheduler.get_last_lr()[0], "updates": self.updates}
        record |= {k: self._mean(v) for k, v in result.stats.items()}
        record["time"] = {"step_seconds": seconds, "elapsed": elapsed}
        return record

    def _log(self, record: dict[str, Any], prefix: str = "") -> None:
        if self.cfg.log.trackers:
            scalars = {prefix + k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.acc.log(scalars, step=record["step"])

    def _log_image(self, tag: str, path: Path, step: int) -> None:
        """Send the grid at ``path`` to every tracker (TensorBoard: ``add_images``; W&B: ``wandb.Image``)."""
        if not self.cfg.log.trackers:
            return
        from PIL import Image

        with Image.open(path) as im:
            picture = im.convert("RGB")
        for name in self.cfg.log.trackers:
            tracker = self.acc.get_tracker(name)
            if name == "tensorboard":
                tracker.log_images({tag: np.asarray(picture)[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({tag: [picture]}, step=step)

    def _evaluate(self, step: int) -> None:
        from diffalign.gallery import save_grid

        self.ctx.step = step
        with self.acc.autocast(), self.averaged():
            record, images = self.evaluator.evaluate(self.ctx, step, self.method.eval_stats)
        if record is None:
            return
        self._append("eval.jsonl", record)
        self._log(record, "eval/")
        if record["hacking"]:
            print(
                f"diffalign train: warning: possible reward hacking at step {step}: the training reward rose "
                f"{record['guard/reward_rise']:+.4g} since step {self.evaluator.first['step']} while "
                f"{record['guard/metric']} fell {record['guard/drop']:.4g} (> eval.hacking_threshold="
                f"{self.cfg.eval.hacking_threshold}); select checkpoints by gold, not by the training reward"
            )
        if record.get("degraded"):
            print(
                f"diffalign train: warning: the policy is degrading at step {step}: {record['guard/metric']} is "
                f"{record['guard/below_best']:.4g} below its best ({record['guard/best']:.4g} at step "
                f"{record['guard/best_step']}; eval.degrade_threshold={self.cfg.eval.degrade_threshold}); the LoRA of "
                f"step {record['guard/best_step']} is the better one{self._kept(record['guard/best_step'])}: lower "
                "train.lr or train fewer steps"
            )
        if images.numel():
            seeds = list(self.cfg.eval.seeds)
            everyone, n = self.evaluator.prompts, self.acc.num_processes
            mine = everyone[self.acc.process_index :: n]  # the main process's share, whose images it holds
            prompts = mine[: self.cfg.eval.grid_prompts or len(mine)]
            grid = self.out / "samples" / f"eval_step_{step}.png"
            title = f"{self.cfg.train.method} step {step}: evaluation, {len(prompts)} of {len(everyone)} prompts"
            if n > 1:
                title += f" (prompts 0, {n}, {2 * n}, ...: the main process's)"
            with self._writing(str(grid)):
                save_grid(
                    images[: len(seeds) * len(prompts)],
                    grid,
                    ncol=len(seeds),
                    title=title,
                    row_labels=prompts,
                    col_labels=[f"seed {s}" for s in seeds],
                    layout_json=True,
                )
            self._log_image("eval/grid", grid, step)

    def _kept(self, step: int) -> str:
        """Where the checkpoint of ``step`` is, when one is on disk (``checkpoint.keep_best`` keeps the best)."""
        path = self.ckpt.root / f"step_{step}"
        return f" ({path}/lora)" if (path / "meta.json").is_file() else ""

    def _sample_grid(self, step: int, result: StepResult) -> None:
        """``samples/step_N.png``: up to 16 of the step's images, each captioned with its prompt and combined reward."""
        from diffalign.gallery import save_grid

        images = result.images.float().cpu()[:16]
        n = images.shape[0]
        prompts = list(result.prompts or [])[:n]
        values = result.reward.detach().float().cpu()[-result.images.shape[0] :][:n].tolist()  # the images' own
        captions = [
            (f"{prompts[i]} " if i < len(prompts) else "") + (f"r={values[i]:.3g}" if i < len(values) else "")
            for i in range(n)
        ]
        grid = self.out / "samples" / f"step_{step}.png"
        with self._writing(str(grid)):
            save_grid(
                images, grid, ncol=8, title=f"{self.cfg.train.method} step {step}: training samples", captions=captions
            )
        self._log_image("train/samples", grid, step)

    def _draw(self) -> PromptBatch:
        """The next batch of the step: this process's slice of the global batch (a
        :class:`~diffalign.datasets.DatasetBatch` of records for a method that trains from ``data.train``)."""
        b, n, i = self.cfg.sample.batch_size, self.acc.num_processes, self.acc.process_index
        if self.data is not None:
            return self.data.next_batch(b, n, i)
        everyone = self.sampler.next(b * n)
        return PromptBatch(local=everyone[i * b : (i + 1) * b], everyone=everyone)

    # -------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Path]:
        """Train ``train.steps`` steps (or the rest of them after a resume); returns the output paths."""
        from tqdm import tqdm

        from diffalign.gallery.rundir import EVAL_PROMPTS, write_eval_prompts

        self.check_output_dir()
        self._setup()
        cfg, acc = self.cfg, self.acc
        main = acc.is_main_process
        start = self._start()
        extra: dict[str, Any] = {}
        if self.fsdp_report is not None:  # every process's share of the sharded base, recorded by the main one
            from accelerate.utils import gather_object

            from diffalign.pipelines import backbone_name

            extra["fsdp"] = gather_object([self.fsdp_report | {"rank": acc.process_index}])
            if main:
                r = extra["fsdp"]
                print(
                    f"diffalign train: FSDP2 sharded the frozen {backbone_name(self.pipe)} into "
                    f"{r[0]['units']} units over {len(r)} processes: {r[0]['sharded_numel']} parameters, "
                    f"held per process {[x['local_numel'] for x in r]}; LoRA replicated ({r[0]['replicated_numel']})"
                )
        if main:
            with self._writing(str(self.out / "config.yaml")):
                cfg.save_yaml(self.out / "config.yaml")
                write_eval_prompts(self.out / EVAL_PROMPTS, self.evaluator.prompts, list(cfg.eval.seeds))
                append_run_info(
                    self.out, num_processes=acc.num_processes, device=acc.device, resumed_from_step=start, **extra
                )
        if start == 0:
            self._calibrate()
            self._evaluate(0)
        total = cfg.train.steps
        bar = tqdm(
            total=total,
            initial=start,
            desc=cfg.train.method,
            disable=not (main and cfg.log.progress),
            dynamic_ncols=True,
        )
        t_run = time.perf_counter()
        with frozen_heap() as refreeze:
            for step in range(start + 1, total + 1):
                self.ctx.step = step
                batches = [self._draw() for _ in range(self.method.batches_per_step())]
                t0 = time.perf_counter()
                with acc.autocast():
                    result = self.method.step(self.ctx, batches)
                record = self._record(step, result, time.perf_counter() - t0, time.perf_counter() - t_run)
                if step == start + 1:  # the first step built the optimizer state and, with model.compile, the graphs
                    refreeze()
                if main:
                    self._append("metrics.jsonl", record)
                    self._log(record)
                    bar.set_postfix(reward=f"{record['reward']:.4f}", loss=f"{record['loss']:.4g}")
                    every = cfg.log.sample_every
                    if every and step % every == 0 and result.images is not None:
                        self._sample_grid(step, result)
                bar.update(1)
                if (cfg.eval.every and step % cfg.eval.every == 0) or step == total:
                    self._evaluate(step)
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == total:
                    self._save(step)
        bar.close()
        paths = {
            "lora": self.out / "lora",
            "metrics": self.out / "metrics.jsonl",
            "eval": self.out / "eval.jsonl",
            "before": self.out / "samples" / "eval_step_0.png",
            "after": self.out / "samples" / f"eval_step_{total}.png",
        }
        if self.method_modules:
            paths["method_modules"] = self.out / MODULES_FILE
        if main:
            with self._writing(f"the final LoRA {paths['lora']}"):
                self._save_lora(paths["lora"])
            if self.method_modules:
                with self._writing(str(paths["method_modules"])):
                    self._export_modules(paths["method_modules"])
            self._summary(paths)
        acc.wait_for_everyone()
        # Always, trackers or not: it finishes the trackers and destroys the process group, whose gloo or NCCL
        # threads would otherwise be torn down by the interpreter's exit (a 2-process CPU test once lost a
        # rank to "terminate called without an active exception", SIGABRT, after its pipeline had loaded).
        acc.end_training()
        return paths

    def _export_modules(self, path: Path) -> None:
        """Write the final values of the method's modules (as in checkpoints) to ``path``, atomically."""
        from safetensors.torch import save

        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(save(module_tensors(self.method_modules)))
        os.replace(tmp, path)

    def _summary(self, paths: dict[str, Path]) -> None:
        rows = [json.loads(x) for x in paths["eval"].read_text().splitlines() if x.strip()]
        first, last = (rows[0], rows[-1]) if rows else (None, None)
        lines = [f"diffalign train: finished {self.cfg.train.steps} steps of {self.cfg.train.method}"]
        lines.append(f"  LoRA (diffusers format): {paths['lora']}   load: pipe.load_lora_weights('{paths['lora']}')")
        lines.append(f"  metrics: {paths['metrics']}")
        if "method_modules" in paths:
            lines.append(f"  the method's modules: {paths['method_modules']}  ({', '.join(self.method_modules)})")
        if first and last:
            key = "gold/accuracy" if "gold/accuracy" in last else "reward"
            lines.append(
                f"  eval: {paths['eval']}  ({key} {first[key]:.4g} at step {first['step']} -> "
                f"{last[key]:.4g} at step {last['step']}; hacking flagged: "
                f"{any(r.get('hacking') for r in rows)})"
            )
            if last.get("degraded"):
                lines.append(
                    f"  degraded: the final {last['guard/metric']} is {last['guard/below_best']:.4g} below its best, at "
                    f"step {last['guard/best_step']}; that step's LoRA is the better one"
                    f"{self._kept(last['guard/best_step'])}"
                )
        lines.append(f"  before / after: {paths['before']}  {paths['after']}")
        lines.append(f"  see it: {gallery_command(self.cfg, self.out)}")
        print("\n".join(lines))
