"""The method registry: every training method is one :class:`MethodEntry`, registered by its own module.

    register_method(MethodEntry("draft_k", DraftK, DraftConfig, "draft", needs_differentiable_reward=True,
                                validate=validate_draft_k))

An entry names the method (``train.method``), its :class:`~diffalign.methods.base.Method` class, the
config dataclass of its options and the config section holding them (a top-level YAML key; several
methods may share one section when they share its dataclass, as ``draft_k`` and ``draft_lv`` share
``draft``), whether it backpropagates through the reward, and an optional ``validate(cfg)`` for its
own cross-section checks. The config's method sections, the names ``train.method`` accepts, the
``diffalign train`` help and the differentiable-reward check all read this registry; nothing else in
the package lists method names.

Built-in methods register when :mod:`diffalign.methods` is imported. Methods of other packages register
the same way from any importable module named in the config's ``plugins: [module, ...]`` (or, for the
command line, in ``DIFFALIGN_PLUGINS=module,other``); :func:`load_plugins` imports them.

This module imports nothing from :mod:`diffalign.config` (the config imports it), so methods and the
config never import each other.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig
    from diffalign.methods.base import Method

PLUGINS_ENV = "DIFFALIGN_PLUGINS"  # comma-separated plugin modules the command line imports


@dataclass(frozen=True)
class MethodEntry:
    """One training method: what the config, the CLI and the trainer need to know about it.

    ``cls(section_config, sample_config, train_config)`` builds the method; ``config_cls()`` must build
    the section's defaults (a dataclass with a default for every field, checked in its
    ``__post_init__``). ``needs_differentiable_reward=None`` takes the class's
    ``needs_differentiable_reward``. ``validate(cfg)`` gets the whole :class:`DiffalignConfig` once the
    sections are built and raises a one-line :class:`DiffalignError` naming the fix for a bad
    combination (``cfg.method_config`` is this method's section). ``samplers`` names the step rules the
    method supports (:func:`check_method_sampler`); a method that needs DDIM (its noise schedule, its
    epsilon-prediction loss, stored DDIM chains) keeps the default ``("ddim",)``.
    """

    name: str
    cls: type[Method]
    config_cls: type
    section: str
    needs_differentiable_reward: bool | None = None
    validate: Callable[[DiffalignConfig], None] | None = None
    # the step rules (diffalign.sampling.Sampler.kind) the method works with: "ddim" (SD, SDXL) and / or
    # "flow" (SD3's rectified flow); a pipeline of another kind is refused before it loads
    samplers: tuple[str, ...] = ("ddim",)

    def __post_init__(self) -> None:
        if self.needs_differentiable_reward is None:
            object.__setattr__(
                self, "needs_differentiable_reward", bool(getattr(self.cls, "needs_differentiable_reward", False))
            )

    @property
    def builtin(self) -> bool:
        """Whether the method ships with diffalign (its class lives in the ``diffalign`` package)."""
        return self.cls.__module__.split(".")[0] == "diffalign"


_METHODS: dict[str, MethodEntry] = {}


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value.isidentifier() or not value.islower():
        raise DiffalignError(f"method {what} must be a lowercase identifier such as 'my_method', got {value!r}")


def register_method(entry: MethodEntry) -> MethodEntry:
    """Add ``entry`` to the registry (at import of the module that defines the method); returns it.

    Registering the same entry twice (a module imported again) does nothing. A name already taken by
    another entry, a section already holding another config dataclass, a config class that is not a
    dataclass with defaults, or a name or section that is not a lowercase identifier is a
    :class:`DiffalignError` naming both modules. (A section that collides with a core config section,
    ``train`` say, is reported by the config when it is built.)
    """
    _check_name("name", entry.name)
    _check_name("section", entry.section)
    old = _METHODS.get(entry.name)
    if old is not None:
        if old == entry:
            return old
        raise DiffalignError(
            f"method {entry.name!r} is registered twice: by {old.cls.__module__}.{old.cls.__qualname__} and by "
            f"{entry.cls.__module__}.{entry.cls.__qualname__}; give the new method another name"
        )
    for other in _METHODS.values():
        if other.section == entry.section and other.config_cls is not entry.config_cls:
            raise DiffalignError(
                f"method {entry.name!r}: config section {entry.section!r} already holds "
                f"{other.config_cls.__module__}.{other.config_cls.__qualname__} (method {other.name!r}); "
                f"methods share a section only with the same config dataclass, so choose another section"
            )
    if not (isinstance(entry.config_cls, type) and dataclasses.is_dataclass(entry.config_cls)):
        raise DiffalignError(f"method {entry.name!r}: config_cls must be a dataclass, got {entry.config_cls!r}")
    try:
        entry.config_cls()
    except TypeError as err:
        raise DiffalignError(
            f"method {entry.name!r}: every field of {entry.config_cls.__qualname__} needs a default ({err})"
        ) from None
    _METHODS[entry.name] = entry
    return entry


def unregister_method(name: str) -> None:
    """Remove a method (for tests of plugins); an unknown name does nothing."""
    _METHODS.pop(name, None)


def registered_methods() -> list[MethodEntry]:
    """Every registered entry, in registration order (the built-ins first)."""
    return list(_METHODS.values())


def method_names() -> list[str]:
    """The names ``train.method`` accepts, in registration order."""
    return list(_METHODS)


def method_sections() -> dict[str, type]:
    """Config section -> its config dataclass, for every registered method (a shared section once)."""
    out: dict[str, type] = {}
    for entry in _METHODS.values():
        out.setdefault(entry.section, entry.config_cls)
    return out


def unknown_method_hint(name: object) -> str:
    """``"; did you mean 'x'?"`` for the closest registered name, else how to add a method of one's own."""
    close = difflib.get_close_matches(str(name), list(_METHODS), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return "; a method of another package registers when its module is listed in plugins: [module]"


def get_method(name: str) -> MethodEntry:
    """The entry of ``name``; an unknown name is a one-line error listing the registered ones."""
    entry = _METHODS.get(name)
    if entry is None:
        raise DiffalignError(f"unknown method {name!r}; use one of {', '.join(_METHODS)}{unknown_method_hint(name)}")
    return entry


def check_method_sampler(name: str, kind: str, model: str = "the pipeline") -> None:
    """Refuse, in one line, a pipeline whose step rule ``kind`` ("ddim", "flow") method ``name`` does not support."""
    entry = get_method(name)
    if kind not in entry.samplers:
        able = [e.name for e in _METHODS.values() if kind in e.samplers]
        raise DiffalignError(
            f"method {name!r} supports {' and '.join(entry.samplers)} pipelines, but {model} samples with {kind}; "
            f"methods for {kind} pipelines: {', '.join(able) or 'none'}"
        )


def build_method(cfg: DiffalignConfig) -> Method:
    """The method named by ``cfg.train.method``, built with its section of the config."""
    entry = get_method(cfg.train.method)
    return entry.cls(cfg.method_config, cfg.sample, cfg.train)


# ------------------------------------------------------------------------------------------- plugins
def plugins_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """The modules named in ``DIFFALIGN_PLUGINS`` (comma-separated; blanks ignored)."""
    text = (os.environ if environ is None else environ).get(PLUGINS_ENV, "")
    return [name.strip() for name in text.split(",") if name.strip()]


def load_plugins(modules: Iterable[str], where: str = "plugins") -> None:
    """Import each module (once) so that its ``register_method`` calls run.

    A module that cannot be imported is a one-line :class:`DiffalignError` naming it (``where`` says
    where it was listed); an exception raised by the module's own code is a bug in the plugin and keeps
    its traceback.
    """
    for name in modules:
        if not isinstance(name, str) or not name.strip() or name.strip().startswith("."):
            raise DiffalignError(
                f"{where}: {name!r} is not a module name; list importable modules, e.g. [my_pkg.methods]"
            )
        name = name.strip()
        try:
            importlib.import_module(name)
        except ImportError as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise DiffalignError(
                f"{where}: cannot import plugin module {name!r} ({reason}); check its name, that it is installed "
                "or on PYTHONPATH, and that its own imports work"
            ) from None


__all__ = [
    "PLUGINS_ENV",
    "MethodEntry",
    "build_method",
    "check_method_sampler",
    "get_method",
    "load_plugins",
    "method_names",
    "method_sections",
    "plugins_from_env",
    "register_method",
    "registered_methods",
    "unknown_method_hint",
    "unregister_method",
]
