"""FSDP2 for the frozen base: shard the UNet or SD3 transformer across processes while the LoRA trains.

``train.fsdp.enabled: true`` under ``accelerate launch --multi_gpu --num_processes N`` (docs/training.md,
"Several processes and GPUs"). The sharding is accelerate's FSDP2 recipe: a
:class:`accelerate.FullyShardedDataParallelPlugin` (``fsdp_version=2``, transformer-based wrapping) applied
by ``accelerate.utils.fsdp_utils.fsdp2_prepare_model``, which calls torch's ``fully_shard`` on every block
(SD3: ``transformer.transformer_blocks``; UNet: ``down_blocks``, ``mid_block``, ``up_blocks``) and then on
the backbone itself (its embeddings and output layers). Every frozen weight becomes a ``DTensor`` of which
each process holds ``1/N``; a block's weights are all-gathered just before it computes and freed after
(``reshard_after_forward``), again in the backward pass.

The LoRA is *not* sharded: its layers are FSDP's ``ignored_params``, so they stay ordinary replicated
tensors. The trainer's data-parallel machinery then applies unchanged: the optimizer holds the same
parameter objects, LoRA gradients are averaged with one all-reduce (FSDP has no gradient of its own to
reduce: the base is frozen), ``peft``'s adapter switches (``reference()``, ``active_adapter``) and
``get_peft_model_state_dict`` see plain tensors (the saved LoRA is the full one on every process, written
by the main one), checkpoints and exact resume are those of a DDP-style run.

Why not accelerate's own ``Accelerator(fsdp_plugin=...)`` / ``accelerate launch --use_fsdp``: accelerate
1.15 turns the plugin on only for GPU-like distributed types (on ``MULTI_CPU``, gloo, it is dropped), and
its ``prepare`` then wants the model and one optimizer together and rebuilds the optimizer's parameters
from the model (text-encoder LoRA lives outside the backbone). Sharding the backbone with the same
accelerate function while the Accelerator stays data-parallel keeps one code path for CPU and GPU, the one
the CPU tests run.

Every process must call the sharded backbone the same number of times (each call all-gathers): the
trainer shares the python RNG that draws control flow (AlignProp's truncation, ReFL's step) between the
processes and requires the evaluation prompts to split evenly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffalign.errors import DiffalignError

# The blocks sharded one by one, by backbone class (their class names, as accelerate's wrap policy takes).
SD3_BLOCKS = ("JointTransformerBlock",)
UNET_BLOCK_ATTRS = ("down_blocks", "mid_block", "up_blocks")


@dataclass
class FSDPSettings:
    """``train.fsdp``: shard the frozen base (UNet or SD3 transformer) with FSDP2; the LoRA stays replicated."""

    enabled: bool = False
    version: int = 2  # FSDP2 (torch's fully_shard) only
    blocks: list[str] | None = None  # block class names sharded one by one; null: the family's blocks
    reshard_after_forward: bool = True  # free a block's gathered weights after each call (False: keep them)
    cpu_offload: bool = False  # keep the shards in CPU memory (GPU runs; untested)

    def __post_init__(self) -> None:
        if self.version != 2:
            raise DiffalignError(
                f"train.fsdp.version must be 2 (FSDP2, torch's fully_shard), got {self.version}; FSDP1 is not supported"
            )
        if self.blocks is not None and (not self.blocks or not all(isinstance(b, str) and b for b in self.blocks)):
            raise DiffalignError(
                f"train.fsdp.blocks must be a non-empty list of class names or null, got {self.blocks}"
            )


def fsdp_unavailable_reason() -> str | None:
    """Why FSDP2 cannot run with the installed torch and accelerate (one line), or None when it can."""
    import accelerate

    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2): {exc}"
    try:
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model  # noqa: F401
    except ImportError as exc:
        return f"accelerate {accelerate.__version__} has no FSDP2 support: {exc}"
    import inspect

    if "fsdp_version" not in inspect.signature(FullyShardedDataParallelPlugin).parameters:
        return f"accelerate {accelerate.__version__}'s FullyShardedDataParallelPlugin has no fsdp_version (FSDP2)"
    return None


def default_blocks(model: torch.nn.Module) -> list[str]:
    """The class names of the blocks sharded one by one: SD3's joint transformer blocks, FLUX's double- and
    single-stream blocks, or the UNet's down, mid and up blocks (their classes as this UNet has them)."""
    if hasattr(model, "transformer_blocks"):
        blocks = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", None) or [])
        return sorted({type(b).__name__ for b in blocks})
    names: set[str] = set()
    for attr in UNET_BLOCK_ATTRS:
        part = getattr(model, attr, None)
        if part is None:
            continue
        for block in part if isinstance(part, torch.nn.ModuleList) else [part]:
            names.add(type(block).__name__)
    if not names:
        raise DiffalignError(
            f"cannot find the blocks of a {type(model).__name__} to shard; set train.fsdp.blocks to their class names"
        )
    return sorted(names)


def lora_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every peft adapter container of ``model`` (``lora_A``, ``lora_B``, ...; all adapters): FSDP's ignored
    modules, so the LoRA stays an ordinary replicated tensor."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        getattr(layer, name)
        for layer in model.modules()
        if isinstance(layer, BaseTunerLayer)
        for name in layer.adapter_layer_names
    ]


def make_plugin(settings: FSDPSettings, model: torch.nn.Module) -> Any:
    """The accelerate FSDP2 plugin of ``settings`` for ``model``: transformer-based wrapping of its blocks,
    its LoRA ignored, full state dicts, no mixed-precision cast (the frozen weights are loaded in the run's
    dtype already)."""
    from accelerate import FullyShardedDataParallelPlugin

    blocks = list(settings.blocks) if settings.blocks else default_blocks(model)
    present = {type(m).__name__ for m in model.modules()}
    missing = [b for b in blocks if b not in present]
    if missing:
        raise DiffalignError(
            f"train.fsdp.blocks names {', '.join(missing)}, which {type(model).__name__} does not contain; "
            f"use null (default: {', '.join(default_blocks(model))})"
        )
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=blocks,
        reshard_after_forward=settings.reshard_after_forward,
        cpu_offload=settings.cpu_offload,
        ignored_modules=lora_modules(model),
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
        activation_checkpointing=False,  # diffalign checkpoints each backbone call itself (model.gradient_checkpointing)
    )


@dataclass
class _PluginView:
    """What ``fsdp2_prepare_model`` reads of an Accelerator, for a data-parallel one (whose state has no plugin)."""

    state: Any
    mixed_precision: str
    is_main_process: bool
    device: torch.device
    torch_device_mesh: Any = None


def shard_backbone(acc: Any, model: torch.nn.Module, settings: FSDPSettings) -> dict[str, Any]:
    """Shard the frozen ``model`` (in place) over ``acc``'s processes with accelerate's FSDP2 recipe; returns
    :func:`shard_report`. Its LoRA must be attached already (it is left replicated)."""
    from types import SimpleNamespace

    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = make_plugin(settings, model)
    view = _PluginView(SimpleNamespace(fsdp_plugin=plugin), acc.mixed_precision, acc.is_main_process, acc.device)
    before = [p for m in lora_modules(model) for p in m.parameters()]
    sharded = fsdp2_prepare_model(view, model)
    if sharded is not model:
        raise RuntimeError("accelerate's fsdp2_prepare_model returned another module; diffalign shards in place")
    after = {id(p) for m in lora_modules(model) for p in m.parameters()}
    if any(id(p) not in after or is_dtensor(p) for p in before):
        raise RuntimeError("FSDP replaced or sharded a LoRA parameter; the LoRA must stay replicated")
    return shard_report(model)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torch ``DTensor`` (an FSDP2 shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2 (:func:`shard_backbone`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def shard_report(model: torch.nn.Module) -> dict[str, Any]:
    """Sizes of this process's share: FSDP units, the sharded (frozen) parameters' full and local element
    counts, and the replicated parameters (the LoRA)."""
    from torch.distributed.fsdp import FSDPModule

    full = local = replicated = 0
    for p in model.parameters():
        if is_dtensor(p):
            full += p.numel()
            local += p.to_local().numel()
        else:
            replicated += p.numel()
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    return {"units": units, "sharded_numel": full, "local_numel": local, "replicated_numel": replicated}
