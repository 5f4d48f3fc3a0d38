"""Pick rewards by name: ``get_reward("clip_score:model=ViT-B-32,pretrained=openai")``.

Spec grammar
------------
::

    SPEC    := NAME [":" OPTIONS]                      a registered reward
             | MODULE ":" CLASS [":" OPTIONS]          a plug-in: any Reward subclass importable by path
                                                       (told apart by the CLASS segment without "=")
    OPTIONS := KEY "=" VALUE ("," KEY "=" VALUE)*

- ``NAME`` is a registered name (:func:`list_rewards`), e.g. ``clip_score``, ``aesthetic``.
- ``MODULE`` is a dotted module path (``my_pkg.rewards``), ``CLASS`` a :class:`Reward` subclass in it;
  its ``__init__`` keyword arguments are the options.
- Values are parsed as ``int``, ``float``, ``bool`` (``true``/``false``), ``none``, or kept as strings;
  an option whose parameter is annotated ``str`` always receives the text as written. Values may
  contain ``:`` and ``=`` (``model=local-dir:/path``) but not ``,``.
- ``weight=W`` is not passed to the reward: it becomes :attr:`RewardSpec.weight` (for combining
  several rewards).

Examples::

    jpeg_compressibility
    clip_score:model=ViT-B-32,pretrained=openai,weight=0.5
    hps:version=v2.1,checkpoint=/ckpts/HPS_v2.1_compressed.pt
    my_pkg.rewards:OcrReward:lang=en

Errors (unknown name with the closest match, unknown or ill-typed options, plug-ins that fail to
import or are not rewards) are one-line :class:`DiffalignError`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, Union

import torch

from diffalign.errors import DiffalignError
from reward_models.base import Reward
from reward_models.loading import one_line

R = TypeVar("R", bound=type)

_REGISTRY: dict[str, type[Reward]] = {}
# Modules whose import registers the built-in rewards (heavy libraries are imported lazily inside).
_BUILTIN_MODULES = (
    "reward_models.clip_score",
    "reward_models.aesthetic",
    "reward_models.pickscore",
    "reward_models.hps",
    "reward_models.imagereward",
    "reward_models.jpeg",
    "reward_models.saturation",
    "reward_models.flawed",
    "reward_models.dino",
    "reward_models.shapes_gold",
    "reward_models.adversarial",
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


def register_reward(name: str) -> Callable[[R], R]:
    """Class decorator: register a :class:`Reward` subclass under ``name`` and set its ``name``."""
    if not _IDENT.match(name):
        raise ValueError(f"reward name {name!r} must be an identifier (letters, digits, _)")

    def deco(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"register_reward({name!r}) decorates Reward subclasses, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"reward name {name!r} is already registered to {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_rewards() -> list[str]:
    """Names of the registered rewards, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def parse_value(text: str) -> Any:
    """Parse an option value: int, float, bool (true/false), None (none/null), else the string."""
    s = text.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT.match(s):
        return int(s)
    if _FLOAT.match(s):
        return float(s)
    return s


@dataclass
class RewardSpec:
    """A parsed reward spec: ``name`` (registered or ``module:Class``), ``options``, ``weight``.

    ``raw`` keeps each option's text as written (for ``str``-typed options such as ``version=2.1``).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    raw: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> RewardSpec:
        """Parse ``NAME[:k=v,...]`` or ``module:Class[:k=v,...]`` (see the module docstring)."""
        if not isinstance(text, str) or not text.strip():
            raise DiffalignError("empty reward spec; expected NAME[:key=value,...], e.g. clip_score:model=ViT-B-32")
        spec = text.strip()
        head, _, rest = spec.partition(":")
        head = head.strip()
        first, _, after = rest.partition(":")
        is_class = bool(_IDENT.match(first.strip())) and "=" not in first
        if is_class and ("." in head or head not in list_rewards()):
            # plug-in: module.path:ClassName[:options]
            if not _MODULE.match(head) or not _IDENT.match(first.strip()):
                raise DiffalignError(f"reward spec {spec!r}: a plug-in is written pkg.module:ClassName[:key=value,...]")
            name, rest = f"{head}:{first.strip()}", after
        else:
            if not _IDENT.match(head):
                raise DiffalignError(
                    f"reward spec {spec!r}: {head!r} is not a reward name; expected NAME[:key=value,...] "
                    "or pkg.module:ClassName[:key=value,...]"
                )
            name = head
        options: dict[str, Any] = {}
        raw: dict[str, str] = {}
        weight = 1.0
        for item in rest.split(",") if rest.strip() else []:
            if not item.strip():
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not _IDENT.match(key):
                raise DiffalignError(f"reward spec {spec!r}: option {item.strip()!r} is not key=value")
            if key in options or (key == "weight" and "weight" in raw):
                raise DiffalignError(f"reward spec {spec!r}: option {key!r} is given twice")
            raw[key] = value.strip()
            if key == "weight":
                parsed = parse_value(value)
                if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
                    raise DiffalignError(f"reward spec {spec!r}: weight must be a number, got {value.strip()!r}")
                weight = float(parsed)
            else:
                options[key] = parse_value(value)
        return cls(name=name, options=options, weight=weight, raw=raw)

    def __str__(self) -> str:
        items = [f"{k}={self.raw.get(k, v)}" for k, v in self.options.items()]
        if self.weight != 1.0:
            items.append(f"weight={self.weight:g}")
        return self.name + (":" + ",".join(items) if items else "")


def expand_members(specs: Iterable[str]) -> list[str]:
    """Specs with one spec per ensemble member: an option written ``key=A|B|C`` (e.g. several checkpoints,
    ``shapes_clip:model=local-dir:m1|local-dir:m2``) becomes one spec per alternative, in order, the other
    options shared. Specs without ``|`` pass unchanged. Two options with alternatives, or an empty
    alternative, are a one-line :class:`DiffalignError`."""
    out: list[str] = []
    for text in specs:
        if not isinstance(text, str) or "|" not in text:
            out.append(text)
            continue
        spec = RewardSpec.parse(text)
        keys = [k for k, v in spec.raw.items() if "|" in v]
        if len(keys) != 1:
            raise DiffalignError(
                f"reward spec {text!r}: list alternatives (ensemble members) in one option only, "
                f"e.g. model=local-dir:A|local-dir:B; got them in {keys or 'the reward name'}"
            )
        alternatives = [a.strip() for a in spec.raw[keys[0]].split("|")]
        if any(not a for a in alternatives):
            raise DiffalignError(f"reward spec {text!r}: option {keys[0]} has an empty alternative between '|'")
        key = keys[0]
        for alt in alternatives:
            member = replace(spec, options={**spec.options, key: parse_value(alt)}, raw={**spec.raw, key: alt})
            out.append(str(member))
    return out


def _unknown_name(name: str) -> DiffalignError:
    names = list_rewards()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return DiffalignError(
        f"unknown reward '{name}'{hint or ';'} known rewards: {', '.join(names)} (or a plug-in written "
        "pkg.module:ClassName)"
    )


def reward_class(name: str) -> type[Reward]:
    """The class behind a registered name or a ``module:Class`` plug-in reference (nothing is loaded)."""
    if ":" not in name:
        _load_builtins()
        if name not in _REGISTRY:
            raise _unknown_name(name)
        return _REGISTRY[name]
    module_name, _, cls_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is a configuration error
        raise DiffalignError(f"cannot import reward plug-in module '{module_name}': {one_line(err)}") from err
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise DiffalignError(f"reward plug-in '{name}': module '{module_name}' has no attribute '{cls_name}'")
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise DiffalignError(
            f"reward plug-in '{name}' is a {type(cls).__name__}, not a subclass of reward_models.Reward"
        )
    return cls


def _accepts(cls: type[Reward]) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return {k: p for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _type_hints(cls: type[Reward]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations in a plug-in: skip coercion
        return {}


def _coerce(spec_name: str, key: str, value: Any, raw: str | None, hint: Any) -> Any:
    """Fit a parsed value to the parameter's annotation: numbers and bools are checked, ``str`` keeps the text."""
    if hint is None or hint is Any:
        return value
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if value == choice or (raw is not None and raw == str(choice)):
                return choice
        raise DiffalignError(
            f"reward '{spec_name}': option {key} must be one of {', '.join(map(str, choices))}, got {raw or value!r}"
        )
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int):
        if int in allowed:
            return value
        if float in allowed:
            return float(value)
        if bool in allowed and value in (0, 1):
            return bool(value)
    elif isinstance(value, float):
        if float in allowed:
            return value
    if str in allowed:
        return raw if raw is not None else str(value)
    names = "/".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    shown = raw if raw is not None else repr(value)
    raise DiffalignError(f"reward '{spec_name}': option {key} expects {names}, got {shown!r}")


def get_reward(
    spec: str | RewardSpec,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Reward:
    """Build a reward from a spec string or :class:`RewardSpec`; move it to ``device`` / ``dtype``.

    The returned reward is frozen and in eval mode; ``reward.spec`` holds the parsed spec (its
    ``weight`` is for combining). Raises :class:`DiffalignError` for unknown names or options, missing
    required options, missing weights and failed downloads.
    """
    parsed = RewardSpec.parse(spec) if isinstance(spec, str) else spec
    if not isinstance(parsed, RewardSpec):
        raise DiffalignError(f"expected a reward spec string or RewardSpec, got {type(spec).__name__}")
    cls = reward_class(parsed.name)
    accepted = _accepts(cls)
    unknown = sorted(set(parsed.options) - set(accepted))
    if unknown:
        opts = ", ".join(accepted) if accepted else "none"
        close = difflib.get_close_matches(unknown[0], list(accepted), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DiffalignError(
            f"reward '{parsed.name}' has no option '{unknown[0]}'{hint}; accepted options: {opts} (and weight)"
        )
    missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in parsed.options]
    if missing:
        raise DiffalignError(
            f"reward '{parsed.name}' needs option {missing[0]}=...; e.g. {parsed.name}:{missing[0]}=VALUE"
        )
    hints = _type_hints(cls)
    kwargs = {k: _coerce(parsed.name, k, v, parsed.raw.get(k), hints.get(k, Any)) for k, v in parsed.options.items()}
    reward = cls(**kwargs)
    if not isinstance(reward, Reward):
        raise DiffalignError(f"reward '{parsed.name}' built a {type(reward).__name__}, not a Reward")
    reward.freeze()
    if device is not None or dtype is not None:
        reward.to(device=device, dtype=dtype)
    reward.spec = parsed
    return reward


def is_differentiable(spec: str | RewardSpec | Reward) -> bool:
    """Whether a reward (built, or only named in a spec: nothing is loaded) is differentiable."""
    if isinstance(spec, Reward):
        return bool(spec.differentiable)
    parsed = RewardSpec.parse(spec) if isinstance(spec, str) else spec
    return bool(reward_class(parsed.name).differentiable)


def differentiable_rewards() -> list[str]:
    """Registered names of the differentiable rewards."""
    return [n for n in list_rewards() if _REGISTRY[n].differentiable]


def require_differentiable(rewards: Iterable[str | RewardSpec | Reward], method: str) -> None:
    """Fail at configuration time if ``method`` backpropagates through a non-differentiable reward.

    ``rewards`` may be built rewards or specs (then nothing is loaded).
    """
    for item in rewards:
        if not is_differentiable(item):
            if isinstance(item, Reward):
                name = item.name
            else:
                name = (RewardSpec.parse(item) if isinstance(item, str) else item).name
            raise DiffalignError(
                f"method '{method}' backpropagates through the reward, but reward '{name}' is not differentiable; "
                "use a policy-gradient method such as 'ddpo' or pick a differentiable reward "
                f"({', '.join(differentiable_rewards())})"
            )
