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
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path, PurePosixPath

ASSETS = "assets"  # the first component of a path that may name a shipped asset
_FILE_SUFFIX = re.compile(r"\.(pt|pth|bin|safetensors|ckpt|json|npz|npy|png|jpe?g|webp|txt|ya?ml)$", re.IGNORECASE)

StrPath = str | os.PathLike


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


__all__ = [
    "ASSETS",
    "looks_like_path",
    "missing_path_message",
    "resolve_local",
    "shipped_asset",
    "shipped_assets",
    "shipped_assets_dir",
]
