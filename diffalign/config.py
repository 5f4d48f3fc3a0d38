"""The run configuration: typed nested dataclasses, YAML files, dotted overrides, validation.

    cfg = DiffalignConfig.from_yaml("configs/shapes/alignprop.yaml", overrides=["train.lr=1e-3"])

Sections: ``model``, ``sample``, ``train``, ``reward``, ``prompts``, ``data`` (a dataset on disk, for methods
that train from one), ``eval``, ``checkpoint``, ``log``,
and one per registered method section (the built-ins' ``alignprop``, ``draft``, ``refl``, ``ddpo``):
method sections are not fields here but come from the method registry
(:mod:`diffalign.methods.registry`); the YAML keeps them as top-level keys, the object holds them in
``cfg.methods`` (also ``cfg.alignprop``, ... and ``cfg.method_config`` for the active one). A top-level
``plugins: [module, ...]`` lists modules imported before anything else is read, so that the methods
they register are known. A key missing from the YAML keeps its default. Overrides are
``section.key=value`` parsed by the field's type (``eval.seeds=[0,1,2]``, ``sample.negative_prompt=none``).
Every problem a user can cause (unknown key, wrong type, bad combination, missing prompt file,
unknown or non-differentiable reward, a plugin that cannot be imported) is a one-line
:class:`DiffalignError` naming the fix, raised before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from diffalign.combine import CombineOptions, check_options
from diffalign.errors import DiffalignError
from diffalign.fsdp import FSDPSettings
from diffalign.methods.registry import (
    get_method,
    load_plugins,
    method_names,
    method_sections,
    registered_methods,
    unknown_method_hint,
)
from diffalign.pipelines import LoraSettings

_SECTIONS = "method_sections"  # metadata flag of DiffalignConfig.methods: one YAML section per registered section


@dataclass
class ModelConfig:
    """The base pipeline and the LoRA trained on it."""

    pretrained: str = "assets/shapes-sd"  # hub id or diffusers pipeline directory (SD 1.x/2.x, SDXL)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # frozen weights; auto follows mixed precision
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: accelerate picks (a GPU if any, one per process)
    attention: Literal["sdpa", "xformers"] = "sdpa"
    gradient_checkpointing: bool = True  # checkpoint every UNet call with gradient (reward backprop)
    # torch.compile the denoising network in place, after its LoRA is added (diffalign/pipelines.py
    # compile_backbone): faster steps after a one-time compile per batch shape and mode (minutes on a CPU;
    # TORCHINDUCTOR_CACHE_DIR keeps the kernels for the next run); compile_backend aot_eager traces without
    # generating kernels (a quick check that a model compiles)
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class SampleConfig:
    """The sampler used for training rollouts (DDIM with eta, spec §1; SD3: the flow SDE, spec §6.1)."""

    steps: int = 20  # sampling steps T
    # DDIM noise (1.0 = DDPM-like variance; DDPO needs > 0); on SD3 (flow) pipelines Flow-GRPO's noise level a
    # (0.7 in Flow-GRPO; 0 = the deterministic Euler ODE that StableDiffusion3Pipeline samples)
    eta: float = 1.0
    guidance_scale: float = 5.0  # classifier-free guidance w (1.0 = none)
    guidance_rescale: float = 0.0  # phi of arXiv 2305.08891
    batch_size: int = 8  # prompts per sampling batch, per process
    num_batches: int = 1  # DDPO: sampling batches per step (epoch); reward backprop: must be 1
    negative_prompt: str | None = None  # none = the pipeline's default unconditional prompt

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.num_batches < 1:
            raise DiffalignError("sample.steps, sample.batch_size and sample.num_batches must be >= 1")
        if self.eta < 0:
            raise DiffalignError(f"sample.eta must be >= 0, got {self.eta}")
        if self.guidance_scale < 1.0:
            raise DiffalignError(f"sample.guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")


@dataclass
class TrainConfig:
    """Optimization: AdamW on the LoRA parameters only."""

    method: str = "alignprop"  # a registered method (diffalign train --help lists them; plugins: add more)
    steps: int = 100  # training steps; reward backprop: one optimizer update each; DDPO: one sampling epoch each
    lr: float = 1e-3
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # clip the global gradient norm (0 = no clipping)
    gradient_accumulation_steps: int = 1  # reward backprop: micro-batches per update; DDPO: minibatches per update
    # warmup: linear from 0 over warmup_steps updates, then constant; cosine: the same warmup, then a
    # half-cosine decay to 0 at the last optimizer update (train.steps x the method's updates per step)
    lr_schedule: Literal["constant", "warmup", "cosine"] = "constant"
    warmup_steps: int = 0
    # > 0: evaluate and save an EMA of the LoRA (Flow-GRPO's train.ema, diffalign/ema.py): after every
    # ema_every-th optimizer update, ema <- d * ema + (1 - d) * lora, d = min(ema_decay, (1 + n) / (10 + n))
    ema_decay: float = 0.0
    ema_every: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)  # shard the frozen base over processes (FSDP2)

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise DiffalignError(
                f"config key 'train.method' must be one of {', '.join(method_names())}, got {self.method!r}"
                f"{unknown_method_hint(self.method)}"
            )
        if self.steps < 1:
            raise DiffalignError(f"train.steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise DiffalignError(f"train.lr must be > 0, got {self.lr}")
        if self.gradient_accumulation_steps < 1:
            raise DiffalignError("train.gradient_accumulation_steps must be >= 1")
        if self.max_grad_norm < 0 or self.warmup_steps < 0:
            raise DiffalignError("train.max_grad_norm and train.warmup_steps must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise DiffalignError("train.adam_beta1 and train.adam_beta2 must be in [0, 1)")
        if not 0 <= self.ema_decay < 1 or self.ema_every < 1:
            raise DiffalignError(
                f"train.ema_decay must be in [0, 1) (0 = no EMA) and train.ema_every >= 1, got {self.ema_decay} "
                f"and {self.ema_every}"
            )


@dataclass
class RewardConfig:
    """Training rewards (specs of ``reward_models``) and how they combine."""

    rewards: list[str] = field(default_factory=lambda: ["shapes_clip"])  # NAME[:k=v,...] or pkg.module:Class
    weights: list[float] | None = None  # one per reward; none = each spec's weight= (default 1)
    # a registered combiner (diffalign.combine): weighted, zscore, pareto, ensemble_mean, wco, uwo, ctrlu
    combine: str = "weighted"
    combine_options: CombineOptions = field(default_factory=CombineOptions)  # each combiner reads its own

    def __post_init__(self) -> None:
        if not self.rewards:
            raise DiffalignError("reward.rewards is empty; name at least one reward, e.g. reward.rewards=[shapes_clip]")
        from reward_models.registry import expand_members

        self.rewards = expand_members(self.rewards)  # key=A|B: one member per alternative (ensembles)
        check_options(self.combine, self.combine_options)  # unknown name or an option it does not read: one line


@dataclass
class PromptConfig:
    """Where prompts come from: ``shapes:train``/``shapes:heldout``, a text file (one per line), or a list."""

    train: str | list[str] = "shapes:train"
    eval: str | list[str] = "shapes:heldout"


@dataclass
class DataConfig:
    """A dataset on disk for methods that train from records (``uses_dataset``; :mod:`diffalign.datasets`)."""

    train: str | None = None  # JSONL file, one record per line (prompt, image paths relative to it, labels)
    shuffle: bool = True  # a new permutation every epoch, seeded by train.seed and the epoch (false: file order)
    image_size: int = 0  # resize the shorter side to this and center-crop a square (0 = as stored)
    check_images: bool = True  # open every image's header when the dataset is read (missing files: always)

    def __post_init__(self) -> None:
        if self.image_size < 0:
            raise DiffalignError(f"data.image_size must be >= 0 (0 = as stored), got {self.image_size}")


@dataclass
class EvalConfig:
    """Held-out evaluation with fixed seeds (also at step 0 and at the end), gold and the hacking guardrail."""

    every: int = 25  # steps between evaluations (0 = only before and after training)
    num_prompts: int = 32  # eval prompts used (0 = all)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # one image per prompt and seed
    batch_size: int = 16
    eta: float | None = None  # none = sample.eta
    gold: Literal["auto", "on", "off"] = "auto"  # shapes verifier; auto = on when every eval prompt is a shapes caption
    rewards: list[str] = field(default_factory=list)  # held-out rewards scored but never trained on
    hacking_threshold: float = 0.05  # guardrail: gold (or first held-out reward) drop that flags hacking
    # guardrail: the same metric this far below its best evaluation so far flags a degrading policy (0 = any drop)
    degrade_threshold: float = 0.1
    grid_prompts: int = 8  # prompts (rows) in samples/eval_step_N.png (0 = all); every prompt is still scored

    def __post_init__(self) -> None:
        if self.every < 0 or self.num_prompts < 0 or self.grid_prompts < 0:
            raise DiffalignError("eval.every, eval.num_prompts and eval.grid_prompts must be >= 0")
        if not self.seeds or self.batch_size < 1:
            raise DiffalignError("eval.seeds must list at least one seed and eval.batch_size be >= 1")
        if not (self.degrade_threshold >= 0 and self.hacking_threshold >= 0):
            raise DiffalignError("eval.hacking_threshold and eval.degrade_threshold must be >= 0")


@dataclass
class CheckpointConfig:
    """Atomic checkpoints in OUTPUT_DIR/checkpoints/step_N (resume with --resume latest)."""

    output_dir: str = "runs/diffalign"
    every: int = 50  # steps between checkpoints (0 = only at the end)
    keep: int = 2  # most recent checkpoints kept
    # also keep the checkpoint of the best evaluation so far (gold score, else the first held-out reward),
    # when there is one at that step: a run that degrades later still holds its best LoRA
    keep_best: bool = True

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise DiffalignError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


@dataclass
class LogConfig:
    """metrics.jsonl is always written; trackers and sample grids are optional."""

    trackers: list[str] = field(default_factory=list)  # tensorboard and/or wandb (through accelerate)
    project: str = "diffalign"
    sample_every: int = 0  # save samples/step_N.png every N steps (0 = never)
    progress: bool = True  # tqdm bar with the live reward

    def __post_init__(self) -> None:
        bad = [t for t in self.trackers if t not in ("tensorboard", "wandb")]
        if bad:
            raise DiffalignError(f"log.trackers: unknown tracker {bad[0]!r}; use tensorboard or wandb")
        if self.sample_every < 0:
            raise DiffalignError("log.sample_every must be >= 0")


@dataclass
class DiffalignConfig:
    """A whole training run.

    The method sections are the registry's (:func:`diffalign.methods.registry.method_sections`), held
    in ``methods`` (section name -> config dataclass; every registered section, defaults where not
    given) and readable as attributes: ``cfg.draft.k``. ``cfg.method_config`` is the section of
    ``train.method``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    plugins: list[str] = field(default_factory=list)  # modules imported first: methods of other packages register
    methods: dict[str, Any] = field(default_factory=dict, metadata={_SECTIONS: True})

    def __post_init__(self) -> None:
        load_plugins(self.plugins, "plugins")  # already imported when loaded from YAML; a no-op then
        sections = _method_sections()
        unknown = [name for name in self.methods if name not in sections]
        if unknown:
            raise DiffalignError(
                f"unknown method section {unknown[0]!r}; registered sections are {', '.join(sections)}"
            )
        methods = {}
        for name, config_cls in sections.items():
            value = self.methods[name] if name in self.methods else config_cls()
            if not isinstance(value, config_cls):
                raise TypeError(f"methods[{name!r}] must be a {config_cls.__qualname__}, got {type(value).__name__}")
            methods[name] = value
        self.methods = methods
        validate(self)

    def __getattr__(self, name: str) -> Any:
        """A method section by name (``cfg.ddpo``); only called when normal attribute lookup fails."""
        methods = self.__dict__.get("methods")
        if methods is not None and name in methods:
            return methods[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        methods = self.__dict__.get("methods")
        if methods is not None and name in methods:
            methods[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def method_config(self) -> Any:
        """The config section of ``train.method`` (e.g. the ``DraftConfig`` of ``draft_k``)."""
        return self.methods[get_method(self.train.method).section]

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_dict(
        cls, data: dict[str, Any] | None, overrides: list[str] | None = None, plugins: list[str] | None = None
    ) -> DiffalignConfig:
        """Build from YAML-shaped data and ``overrides``.

        The plugin modules (``plugins`` of the data, or of an override ``plugins=[...]``, then the extra
        ``plugins`` given here, e.g. the command line's ``DIFFALIGN_PLUGINS``) are imported first, so
        that their methods' sections and names are known; all of them are recorded in ``cfg.plugins``.
        """
        data = dict(data or {})
        parsed = [parse_override(item) for item in overrides or []]
        listed: Any = data.get("plugins", [])
        for key, value in parsed:
            if key == "plugins":
                listed = _Raw(value)
        modules = [] if listed is None else _coerce("plugins", listed, list[str])  # "plugins:" alone: none
        modules += [m for m in plugins or [] if m not in modules]
        load_plugins(modules, "plugins")
        data["plugins"] = modules
        for key, value in parsed:
            if key != "plugins":
                _set_path(data, key, _Raw(value))
        return _build_config(data)

    @classmethod
    def from_yaml(
        cls, path: str | Path, overrides: list[str] | None = None, plugins: list[str] | None = None
    ) -> DiffalignConfig:
        """Load ``path`` and apply ``overrides`` (``section.key=value``); ``plugins`` as in :meth:`from_dict`.

        A missing path, a directory, a file that is not UTF-8 text or not valid YAML, or YAML whose
        top level is not a mapping of sections is a one-line :class:`DiffalignError`.
        """
        file = Path(path)
        examples = "see configs/shapes/*.yaml for examples"
        if file.is_dir():
            raise DiffalignError(f"config file {str(path)!r} is a directory; pass a YAML file, {examples}")
        if not file.is_file():
            raise DiffalignError(f"config file {str(path)!r} does not exist; {examples}")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DiffalignError(
                f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML, {examples}"
            ) from None
        except OSError as err:
            raise DiffalignError(f"cannot read config file {path}: {err.strerror or err}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(err, "problem", None) or type(err).__name__).split())
            fix = "fix that line" if mark is not None else "fix the file"
            raise DiffalignError(f"config file {path}{where}: invalid YAML ({problem}); {fix}, {examples}") from None
        if data is not None and not isinstance(data, dict):
            raise DiffalignError(
                f"config file {path} must hold a mapping of sections (model:, train:, ...), not a {type(data).__name__}; "
                f"{examples}"
            )
        return cls.from_dict(resolve_config_paths(data, file.parent, overrides), overrides, plugins)

    # ----------------------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """Plain data in the YAML's shape: ``plugins`` (when any), the core sections, then the active
        method's section only (other methods' sections are left out)."""
        data = dataclasses.asdict(self)
        methods, plugins = data.pop("methods"), data.pop("plugins")
        out: dict[str, Any] = {"plugins": plugins} if plugins else {}
        out.update(data)
        section = get_method(self.train.method).section
        out[section] = methods[section]
        return out

    def save_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}`` with lists as strings (for experiment trackers)."""
        out: dict[str, Any] = {}

        def walk(d: dict[str, Any], prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

        walk(self.to_dict(), "")
        return out


# ----------------------------------------------------------------------------------------- paths
_LOCAL_DIR = "local-dir:"  # open_clip's prefix for a model directory (clip_score:model=local-dir:DIR)


def _found(value: str, base: Path) -> str | None:
    """``value`` as written when it exists under the working directory, else the absolute path found
    relative to ``base`` or among the shipped assets (:func:`diffalign.paths.resolve_local`), else None."""
    from diffalign.paths import resolve_local

    if Path(value).expanduser().exists():
        return value
    found = resolve_local(value, base)
    return None if found is None else str(found)


def _resolve_spec(text: str, base: Path) -> str:
    """A reward spec with its relative local path options (``model=local-dir:DIR``, ``head=FILE.pth``)
    resolved against ``base`` or the shipped assets when they do not exist under the working directory."""
    from diffalign.paths import looks_like_path
    from reward_models import RewardSpec

    try:
        spec = RewardSpec.parse(text)
    except DiffalignError:
        return text  # reported by validation, with the spec grammar
    changed = False
    for key, raw in list(spec.raw.items()):
        prefix = _LOCAL_DIR if raw.startswith(_LOCAL_DIR) else ""
        value = raw[len(prefix) :]
        if key == "weight" or not value or Path(value).expanduser().is_absolute() or Path(value).expanduser().exists():
            continue
        if not (prefix or looks_like_path(value, base)):
            continue  # a tag or hub id (pretrained=openai, model=org/name): not a path
        found = _found(value, base)
        if found is not None:
            spec.raw[key] = spec.options[key] = prefix + found
            changed = True
    return str(spec) if changed else text


def resolve_config_paths(
    data: dict[str, Any] | None, base: str | Path, overrides: list[str] | None = None
) -> dict[str, Any] | None:
    """The YAML data of a config file with its local paths made independent of the working directory.

    ``model.pretrained``, ``prompts.train`` / ``prompts.eval`` (when a file: not ``shapes:...`` nor a
    list) and the path options of ``reward.rewards`` / ``eval.rewards`` specs are looked up in order:

    1. as written, relative to the working directory: kept as written (still relative);
    2. relative to ``base``, the config file's directory: replaced by that absolute path;
    3. ``assets/NAME[/...]``: replaced by the absolute path of the shipped copy.

    What the run saves in ``config.yaml`` is the resolved value. A relative ``model.pretrained`` that
    looks like a path (:func:`diffalign.paths.looks_like_path`) or a relative prompt file found in none
    of these places is a one-line :class:`DiffalignError` naming both directories; absolute paths, hub
    ids and reward options found nowhere are left for the loaders to report. Keys given in
    ``overrides`` (``section.key=value``: relative to the working directory) are left alone.
    """
    from diffalign.paths import looks_like_path, missing_path_message

    if not isinstance(data, dict):
        return data
    base = Path(base)
    skip = {item.partition("=")[0].strip() for item in overrides or []}
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}  # sections copied, not shared

    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str) and "model.pretrained" not in skip:
        value = model["pretrained"].strip()
        found = _found(value, base) if value else None
        if found is not None:
            model["pretrained"] = found
        elif looks_like_path(value, base) and not Path(value).expanduser().is_absolute():
            hint = "give a diffusers pipeline directory (absolute, or relative to the working directory or to the config file) or a hub id"
            raise DiffalignError(f"model.pretrained: {missing_path_message(value, 'pipeline directory', base, hint)}")

    prompts = out.get("prompts")
    if isinstance(prompts, dict):
        for key in ("train", "eval"):
            value = prompts.get(key)
            if not isinstance(value, str) or f"prompts.{key}" in skip or value.strip().startswith("shapes:"):
                continue
            text = value.strip()
            prefix = "file:" if text.startswith("file:") else ""
            path = text[len(prefix) :]
            if not path or Path(path).expanduser().is_absolute():
                continue  # load_prompts reports these
            found = _found(path, base)
            if found is None:
                hint = "give a text file (one prompt per line), shapes:train, shapes:heldout or a list"
                raise DiffalignError(f"prompts.{key}: {missing_path_message(path, 'prompt file', base, hint)}")
            prompts[key] = prefix + found if found != path else value

    data = out.get("data")
    if isinstance(data, dict) and isinstance(data.get("train"), str) and "data.train" not in skip:
        path = data["train"].strip()
        if path and not Path(path).expanduser().is_absolute():
            found = _found(path, base)
            if found is None:
                hint = "give a JSONL file (one record per line, docs/training.md)"
                raise DiffalignError(f"data.train: {missing_path_message(path, 'dataset file', base, hint)}")
            data["train"] = found

    for section, key in (("reward", "rewards"), ("eval", "rewards")):
        node = out.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), list) and f"{section}.{key}" not in skip:
            from reward_models.registry import expand_members

            node[key] = [_resolve_spec(s, base) if isinstance(s, str) else s for s in expand_members(node[key])]
    return out


# ------------------------------------------------------------------------------------ validation
def validate(cfg: DiffalignConfig) -> None:
    """Cross-section checks; each message names the fix. Loads no model."""
    from diffalign.combine import build_combiner, check_weights, non_differentiable_message, reward_keys
    from diffalign.prompts import load_prompts
    from reward_models import RewardSpec, require_differentiable
    from reward_models.registry import reward_class

    method = cfg.train.method
    specs = [RewardSpec.parse(r) for r in cfg.reward.rewards]
    for spec in specs + [RewardSpec.parse(r) for r in cfg.eval.rewards]:
        reward_class(spec.name)  # unknown reward: one line with the closest name
    if cfg.reward.weights is not None:
        if any(spec.raw.get("weight") is not None for spec in specs):
            raise DiffalignError("give reward weights either in the specs (weight=W) or in reward.weights, not both")
        check_weights([str(sp) for sp in specs], cfg.reward.weights)
    keys = reward_keys(specs)  # distinct keys: two specs of one reward are told apart by their options
    weights = cfg.reward.weights if cfg.reward.weights is not None else [s.weight for s in specs]
    combiner = build_combiner(cfg.reward.combine, keys, weights, cfg.reward.combine_options)  # sizes, weights
    entry = get_method(method)  # the registry's entry: its reward requirement and its own checks
    if entry.needs_differentiable_reward:
        require_differentiable(specs, method)
        if not combiner.differentiable:
            why = f"train.method={method} backpropagates the reward"
            raise DiffalignError(non_differentiable_message(cfg.reward.combine, cfg.reward.combine_options, why))
    if entry.validate is not None:
        entry.validate(cfg)
    _validate_data(cfg, entry.cls)
    if cfg.train.mixed_precision == "fp16" and cfg.model.device == "cpu":
        raise DiffalignError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
    load_prompts(cfg.prompts.train, "prompts.train")
    eval_prompts = load_prompts(cfg.prompts.eval, "prompts.eval")
    if cfg.eval.gold == "on":
        from diffalign.prompts import non_shapes_prompt

        bad = non_shapes_prompt(eval_prompts)
        if bad is not None:
            raise DiffalignError(
                f"eval.gold=on needs shapes captions as eval prompts, but {bad!r} is not one; set eval.gold=auto or off"
            )


def _validate_data(cfg: DiffalignConfig, method_cls: type) -> None:
    """``data.train`` is given exactly for a method that trains from a dataset, and is a file.

    The records themselves are read and checked by the trainer (:class:`diffalign.datasets.JsonlDataset`),
    still before any model loads.
    """
    from diffalign.paths import missing_path_message

    method, train = cfg.train.method, cfg.data.train
    if getattr(method_cls, "uses_dataset", False):
        if train is None or not train.strip():
            raise DiffalignError(
                f"method {method!r} trains from a dataset on disk: set data.train to a JSONL file (one record per "
                "line, docs/training.md)"
            )
        path = Path(train).expanduser()
        if path.is_dir():
            raise DiffalignError(f"data.train: dataset {train!r} is a directory; give a JSONL file")
        if not path.is_file():
            raise DiffalignError(
                f"data.train: {missing_path_message(train, 'dataset file', None, 'give a JSONL file')}"
            )
    elif train is not None:
        raise DiffalignError(
            f"data.train is set but method {method!r} samples its own images from prompts.train; drop data.train, "
            "or choose a method that trains from a dataset"
        )


def section_from_pairs(cls: type, pairs: list[str], prefix: str) -> Any:
    """A config dataclass from ``key=value`` strings parsed by field type, as overrides are (for command
    lines outside ``diffalign train``: ``diffalign reno --combine-option uwo_lambda=0.3``). An unknown key
    or a bad value is a one-line :class:`DiffalignError` naming ``prefix.key``."""
    data = {}
    for item in pairs:
        key, value = parse_override(item)
        data[key] = _Raw(value)
    return _build(cls, data, prefix.rstrip(".") + ".")


# ---------------------------------------------------------------------------------- type coercion
class _Raw(str):
    """An override's value as typed on the command line (parsed by the field's type)."""


def parse_override(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise DiffalignError(f"override {item!r} must be written section.key=value, e.g. train.lr=1e-3")
    return key.strip(), value.strip()


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    known = leaf_keys(DiffalignConfig)
    if key not in known:
        under = [k for k in known if k.startswith(key + ".")]
        if under:
            raise DiffalignError(f"config key '{key}' is a section; set one of its keys, e.g. {under[0]}=VALUE")
        raise _unknown_key(key)
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _method_sections() -> dict[str, type]:
    """The registry's method sections; one named like a core section (``train``, ...) is an error."""
    sections = method_sections()
    core = {f.name for f in dataclasses.fields(DiffalignConfig)}
    for entry in registered_methods():
        if entry.section in core:
            raise DiffalignError(
                f"method {entry.name!r} ({entry.cls.__module__}) registers config section {entry.section!r}, a core "
                "section of the config; register it with another section name"
            )
    return sections


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config dataclass (for :class:`DiffalignConfig`, with the
    registered method sections)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get(_SECTIONS):
            for section, config_cls in _method_sections().items():
                out += leaf_keys(config_cls, f"{prefix}{section}.")
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += leaf_keys(hint, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _unknown_key(key: str) -> DiffalignError:
    known = leaf_keys(DiffalignConfig)
    sections = sorted({k.split(".")[0] for k in known})
    close = difflib.get_close_matches(key, known + sections, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; sections are {', '.join(sections)}"
    return DiffalignError(f"unknown config key '{key}'{hint}")


def _build_config(data: dict[str, Any]) -> DiffalignConfig:
    """The whole config from YAML-shaped data: core sections as fields, method sections into ``methods``."""
    sections = _method_sections()
    hints = typing.get_type_hints(DiffalignConfig)
    core = [f.name for f in dataclasses.fields(DiffalignConfig) if not f.metadata.get(_SECTIONS)]
    for key in data:
        if key not in core and key not in sections:
            raise _unknown_key(key)
    kwargs = {name: _coerce(name, data[name], hints[name]) for name in core if name in data}
    methods = {name: _coerce(name, data[name], config_cls) for name, config_cls in sections.items() if name in data}
    return DiffalignConfig(**kwargs, methods=methods)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise DiffalignError(f"config key '{prefix.rstrip('.')}' is a section: give a mapping of its keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}")
    kwargs = {name: _coerce(prefix + name, data[name], hints[name]) for name in names if name in data}
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - all fields are keyword arguments
        raise DiffalignError(f"config section '{prefix.rstrip('.')}': {err}") from None


_INT = re.compile(r"^[+-]?\d+$")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    raw = isinstance(value, _Raw)
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong() -> DiffalignError:
        shown = str(value) if raw else repr(value)
        return DiffalignError(f"config key '{key}' expects {_describe(hint)}, got {shown}")

    if dataclasses.is_dataclass(hint):
        if raw:
            raise DiffalignError(f"config key '{key}' is a section; set one of its keys, e.g. {key}.<name>=VALUE")
        return _build(hint, value, key + ".")
    if hint is Any:
        return str(value) if raw else value
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in args), value)
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.6)
        hint_txt = f"; did you mean '{close[0]}'?" if close else ""
        raise DiffalignError(f"config key '{key}' must be one of {', '.join(map(str, args))}, got {value!r}{hint_txt}")
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (raw and value.lower() in ("none", "null", "~"))):
            return None
        # a list-typed arm first for lists ("[...]" on the command line), scalar arms first otherwise
        is_list = isinstance(value, list) or (raw and value.strip().startswith("["))
        arms = [a for a in args if a is not type(None)]
        for arm in sorted(arms, key=lambda a: (typing.get_origin(a) is list) != is_list):
            try:
                return _coerce(key, value, arm)
            except DiffalignError:
                continue
        raise wrong()
    if origin is list:
        if raw:
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise wrong() from None
                if not isinstance(value, list):
                    raise wrong()
            else:
                return [] if not text else [_coerce(f"{key}[0]", _Raw(text), args[0])]
        if not isinstance(value, list):
            raise wrong()
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if raw:
            low = value.lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            raise wrong()
        if isinstance(value, bool):
            return value
        raise wrong()
    if hint is int:
        if raw and _INT.match(value.strip()):
            return int(value)
        if not raw and isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if hint is float:
        if isinstance(value, bool):
            raise wrong()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # overrides, and YAML's "1e-3" (a string in YAML 1.1)
            try:
                return float(value)
            except ValueError:
                raise wrong() from None
        raise wrong()
    if hint is str:
        if isinstance(value, str):
            return str(value)
        raise wrong()
    raise wrong()  # pragma: no cover - a field type this loader does not know
