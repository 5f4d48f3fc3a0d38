"""Training methods: the :class:`Method` contract (``base.py``), the registry (``registry.py``) and the
built-in methods, which register themselves when their modules are imported here.

Which methods exist, their config sections and whether they need a differentiable reward is what the
registry says (:func:`registered_methods`; the table in docs/training.md is tested against it). A
method of another package registers from its own module, listed in the config's ``plugins:``.
"""

from __future__ import annotations

from diffalign.methods.base import Method, PromptBatch, StepContext, StepResult
from diffalign.methods.registry import (
    MethodEntry,
    build_method,
    get_method,
    load_plugins,
    method_names,
    method_sections,
    register_method,
    registered_methods,
)

# The built-in methods: importing a module registers its entries (reward backprop first, in table order).
from diffalign.methods import reward_backprop as _reward_backprop  # noqa: F401  # isort: skip
from diffalign.methods import ddpo as _ddpo  # noqa: F401  # isort: skip
from diffalign.methods import grpo as _grpo  # noqa: F401  # isort: skip
from diffalign.methods import prdp as _prdp  # noqa: F401  # isort: skip
from diffalign.methods import d3po as _d3po  # noqa: F401  # isort: skip
from diffalign.methods import dpo as _dpo  # noqa: F401  # isort: skip
from diffalign.methods import adv_grpo as _adv_grpo  # noqa: F401  # isort: skip
from diffalign.methods import nft as _nft  # noqa: F401  # isort: skip


def method_class(name: str) -> type[Method]:
    """The :class:`Method` class registered as ``name``."""
    return get_method(name).cls


def method_section(name: str) -> str:
    """The config section (``alignprop``, ``draft``, ...) holding the options of method ``name``."""
    return get_method(name).section


__all__ = [
    "Method",
    "MethodEntry",
    "PromptBatch",
    "StepContext",
    "StepResult",
    "build_method",
    "get_method",
    "load_plugins",
    "method_class",
    "method_names",
    "method_section",
    "method_sections",
    "register_method",
    "registered_methods",
]
