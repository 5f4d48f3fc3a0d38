"""Training methods by name: each entry names its class and the config section holding its options.

alignprop  AlignProp, randomized truncated reward backprop      section ``alignprop``
draft_k    DRaFT-K, reward backprop through the last K steps     section ``draft``
draft_lv   DRaFT-LV, low-variance re-noised last step            section ``draft``
refl       ReFL, reward on a late step's predicted x0            section ``refl``
ddpo       DDPO_IS, PPO-clipped policy gradient                  section ``ddpo``
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffalign.errors import DiffalignError
from diffalign.methods.base import Method, PromptBatch, StepContext, StepResult
from diffalign.methods.ddpo import DDPO
from diffalign.methods.reward_backprop import AlignProp, DraftK, DraftLV, ReFL

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig

METHODS: dict[str, tuple[type[Method], str]] = {
    "alignprop": (AlignProp, "alignprop"),
    "draft_k": (DraftK, "draft"),
    "draft_lv": (DraftLV, "draft"),
    "refl": (ReFL, "refl"),
    "ddpo": (DDPO, "ddpo"),
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise DiffalignError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name][0]


def method_section(name: str) -> str:
    """The config section (``alignprop``, ``draft``, ``refl``, ``ddpo``) of a method."""
    method_class(name)
    return METHODS[name][1]


def build_method(cfg: DiffalignConfig) -> Method:
    """The method named by ``cfg.train.method`` with its section of the config."""
    name = cfg.train.method
    cls = method_class(name)
    return cls(getattr(cfg, method_section(name)), cfg.sample, cfg.train)


__all__ = ["METHODS", "Method", "PromptBatch", "StepContext", "StepResult", "build_method", "method_section"]
