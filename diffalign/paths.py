"""Where diffalign finds the local files and directories it is given as paths.

Models (``--model``, ``model.pretrained``), prompt files and reward weights may be given as local
paths. They are looked up in this order (:func:`resolve_local`):

1. **as given**: absolute, ``~`` expanded, or relative to the current working directory;
2. **relative to a base directory** when the caller has one: the directory of the config file a
   value was read from (:func:`diffalign.config.resolve_config_paths`);
3. **the shipped assets**: ``assets/NAME[/...]`` (``assets/shapes-sd``, ``assets/shapes-clip``) is
   the copy that ships with diffalign: the checkout's top-level ``assets/`` or, in a
   non-editable install, ``diffalign/_assets/`` inside the installed package
   (:func:`shipped_assets_dir`).

A value found nowhere is a Hugging Face Hub id only when it does not look like a path
(:func:`looks_like_path`); otherwise the caller raises a one-line
:class:`~diffalign.errors.DiffalignError` built with :func:`missing_path_message`, which names the
working directory (and the config directory) it looked in, and the closest existing name.

Where diffalign writes (``diffalign sample/score/reno --out``, a training run's output directory) is
checked before any model loads by :func:`check_output_path`, one set of checks with each caller's wording.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Literal

from diffalign.errors import DiffalignError

ASSETS = "assets"  # the first component of a path that may name a shipped asset
_FILE_SUFFIX = re.compile(r"\.(pt|pth|bin|safetensors|ckpt|json|npz|npy|png|jpe?g|webp|txt|ya?ml)$", re.IGNORECASE)

StrPath = str | os.PathLike
PathKind = Literal["dir", "file"]

# The wording of check_output_path's errors, filled in with str.format: {what} names the output
# ("--out", "output directory"), {fix} is the advice, {out} the path checked, {existing} its nearest
# existing parent, {entry} a path inside it (paths as str, so {out!r} quotes one).
OUTPUT_MESSAGES: dict[str, str] = {
    "wrong_kind": "{what} {out} is a file, not a directory; {fix}",
    "parent_file": "cannot create {what} {out}: {existing} is a file, not a directory; {fix}",
    "not_writable": "cannot write {what} {out}: {existing} is not writable by this user; {fix}",
}


def shipped_assets_dir() -> Path | None:
    """The directory holding the shipped assets, or None when this installation has none.

    In a wheel (``pip install .``) the top-level ``assets/`` folder is installed as the package data
    ``diffalign/_assets/``; in a checkout (and an editable install) it is ``<repo>/assets``.
    """
    package = Path(__file__).resolve().parent
    installed = package / "_assets"
    if installed.is_dir():
        return installed
    root = package.parent
    checkout = root / ASSETS
    if checkout.is_dir() and (root / "pyproject.toml").is_file():  # our checkout, not a stray site-packages/assets
        return checkout
    return None


def shipped_assets() -> list[str]:
    """The shipped assets as written in configs and commands, e.g. ``["assets/shapes-clip", "assets/shapes-sd"]``."""
    root = shipped_assets_dir()
    if root is None:
        return []
    return sorted(f"{ASSETS}/{p.name}" for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _asset_parts(path: StrPath) -> tuple[str, ...] | None:
    """The parts after ``assets/`` when ``path`` is a relative ``assets/NAME[/...]`` without ``..``, else None."""
    text = os.fspath(path).strip().replace("\\", "/")
    parts = PurePosixPath(text).parts  # drops "." components: ./assets/x is assets/x
    if len(parts) < 2 or parts[0] != ASSETS or ".." in parts or text.startswith(("/", "~")):
        return None
    return parts[1:]


def shipped_asset(path: StrPath) -> Path | None:
    """The shipped copy that ``path`` (``assets/NAME[/...]``) names, if it exists; else None."""
    parts = _asset_parts(path)
    root = shipped_assets_dir()
    if parts is None or root is None:
        return None
    candidate = root.joinpath(*parts)
    return candidate if candidate.exists() else None


def resolve_local(path: StrPath, base: StrPath | None = None) -> Path | None:
    """The existing local file or directory that ``path`` names, or None if there is none.

    Looked up as given (``~`` expanded; a relative path against the working directory, and then
    returned unchanged, still relative), then relative to ``base`` when ``path`` is relative and a
    base is given (returned absolute), then as a shipped asset (``assets/NAME[/...]``, returned
    absolute). Nothing is downloaded: a hub id that is not also a local path gives None.
    """
    given = Path(os.fspath(path)).expanduser()
    if given.exists():
        return given
    if base is not None and not given.is_absolute():
        candidate = Path(os.path.abspath(Path(os.fspath(base)).expanduser() / given))
        if candidate.exists():
            return candidate
    return shipped_asset(path)


def looks_like_path(value: str, base: StrPath | None = None) -> bool:
    """True when ``value`` should be read as a local path rather than a Hub repo id.

    A path: starts with ``/``, ``.`` or ``~``; holds a backslash or a drive (``C:``); has two or more
    ``/``; ends in a file suffix (``.safetensors``, ``.pt``, ``.txt``, ...); starts with ``assets/``
    (the shipped assets); or its first component is an existing local directory (under the working
    directory, or under ``base``). Anything else (``owner/name``, ``name``) may be a hub id.
    """
    v = value.strip()
    if not v:
        return False
    if v.startswith(("/", ".", "~")) or "\\" in v or v.count("/") >= 2 or _FILE_SUFFIX.search(v):
        return True
    if len(v) > 1 and v[1] == ":":  # a Windows drive
        return True
    first = v.split("/", 1)[0]
    if "/" in v and first == ASSETS:
        return True
    if Path(first).is_dir():
        return True
    return base is not None and (Path(os.fspath(base)).expanduser() / first).is_dir()


def _closest(path: Path, roots: list[Path]) -> str | None:
    """A close existing name for ``path`` under one of ``roots``: its first missing component replaced by
    the nearest existing name there (with the rest of the path when that exists too)."""
    parts = path.parts
    for root in roots:
        for depth in range(len(parts) - 1, -1, -1):  # the deepest existing parent under this root
            parent = root.joinpath(*parts[:depth])
            if not parent.is_dir():
                continue
            try:
                names = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
            except OSError:
                break
            close = difflib.get_close_matches(parts[depth], names, n=1, cutoff=0.6)
            if close:
                fixed = (*parts[:depth], close[0])
                whole = (*fixed, *parts[depth + 1 :])  # the rest of the path, when it exists there
                return str(PurePosixPath(*(whole if root.joinpath(*whole).exists() else fixed)))
            break
    return None


def missing_path_message(
    path: StrPath, what: str = "directory", base: StrPath | None = None, hint: str | None = None
) -> str:
    """One line saying that ``path`` was found nowhere, where diffalign looked, and what to do.

    ``"no directory 'models/pipe' under /tmp (did you mean 'models/pipe2'?); relative paths are looked
    up under the working directory: cd there or give an absolute path"``. ``what`` names the kind of
    thing (``"directory"``, ``"prompt file"``); ``base`` is the config file's directory, also
    searched; ``hint`` replaces the closing advice. ``assets/NAME`` paths list the shipped assets.
    """
    text = os.fspath(path)
    given = Path(text).expanduser()
    close = None
    if given.is_absolute():
        msg = f"no {what} {text!r}"
        if len(given.parts) > 2:  # suggest a sibling, not a name at the file-system root
            close = _closest(Path(*given.parts[1:]), [Path(given.anchor)])
            close = str(Path(given.anchor) / close) if close is not None else None
    else:
        msg = f"no {what} {text!r} under {Path.cwd()}"
        roots = [Path.cwd()]
        if base is not None:
            base_dir = Path(os.path.abspath(Path(os.fspath(base)).expanduser()))
            msg += f", nor under {base_dir} (the config file's directory)"
            roots.append(base_dir)
        if _asset_parts(text) is not None:  # the shipped names are listed: no guess needed
            names = shipped_assets()
            msg += f", nor among the shipped assets ({', '.join(names)})" if names else " (no shipped assets installed)"
        else:
            close = _closest(given, roots)
    if close is not None:
        msg += f" (did you mean {close!r}?)"
    if hint is None:
        hint = (
            "check the path"
            if given.is_absolute()
            else "relative paths are looked up under the working directory: cd there or give an absolute path"
        )
    return f"{msg}; {hint}"


def nearest_existing(path: StrPath, absolute: bool = True) -> Path:
    """``path`` if it exists, else its nearest existing parent (made absolute first unless ``absolute`` is
    False; a relative path then stops at ``.``)."""
    ancestor = Path(path).absolute() if absolute else Path(path)
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def _wrong_kind(path: Path, kind: PathKind) -> bool:
    """True when ``path`` exists but is not a ``kind`` (a file where a directory belongs, or the reverse)."""
    return (path.exists() and not path.is_dir()) if kind == "dir" else path.is_dir()


def check_output_path(
    out: StrPath,
    what: str,
    fix: str = "",
    *,
    kind: PathKind = "dir",
    entries: Mapping[str, PathKind] | None = None,
    messages: Mapping[str, str] | None = None,
    absolute: bool = False,
) -> Path:
    """Refuse, before anything is written, an output ``out`` that cannot be created or written; returns it.

    Nothing is created or changed. In this order, a one-line :class:`DiffalignError` when:

    - ``out`` exists but is not a ``kind`` (``"wrong_kind"``);
    - the nearest existing path at or above the directory (``out`` itself for a directory, its parent
      for a file; made absolute first with ``absolute``) is a file (``"parent_file"``) or not
      writable by this user (``"not_writable"``);
    - a name of ``entries`` inside ``out`` exists but is not of its kind (``"entry_not_dir"``:
      a file where a directory belongs, ``"entry_not_file"``: a directory where a file belongs).

    The wording is :data:`OUTPUT_MESSAGES` updated with ``messages`` (the entry messages must be given
    when ``entries`` are), formatted with ``what``, ``fix`` and the paths.
    """
    out = Path(out)
    text = {**OUTPUT_MESSAGES, **(messages or {})}

    def fail(problem: str, existing: Path | None = None, entry: Path | None = None) -> DiffalignError:
        fields = {"what": what, "fix": fix, "out": str(out), "existing": str(existing), "entry": str(entry)}
        return DiffalignError(text[problem].format(**fields))

    if _wrong_kind(out, kind):
        raise fail("wrong_kind")
    existing = nearest_existing(out if kind == "dir" else out.parent, absolute)
    if not existing.is_dir():
        raise fail("parent_file", existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise fail("not_writable", existing)
    for name, entry_kind in (entries or {}).items():
        if _wrong_kind(out / name, entry_kind):
            raise fail(f"entry_not_{entry_kind}", entry=out / name)
    return out


__all__ = [
    "ASSETS",
    "OUTPUT_MESSAGES",
    "check_output_path",
    "looks_like_path",
    "missing_path_message",
    "nearest_existing",
    "resolve_local",
    "shipped_asset",
    "shipped_assets",
    "shipped_assets_dir",
]
