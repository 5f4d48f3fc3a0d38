"""Resolve weights given as a local path or a Hugging Face Hub reference, with one-line errors.

Conventions used by every reward loader:

- A **directory or file that exists** is used as is (relative paths against the working
  directory); ``assets/NAME[/...]`` found nowhere else is the shipped copy (:mod:`diffalign.paths`).
- A value that **looks like a path** (absolute, ``./``, ``../``, ``~``, two or more ``/``, a
  backslash, a file suffix such as ``.pt``, ``assets/...``, or a first component that is a local
  directory) but does not exist is an error naming the path, the expected layout and the working
  directory; the Hub is never asked.
- Anything else of the form ``name`` or ``org/name`` is a **Hub repo id** (transformers loaders).
- A single file on the Hub is written ``hf-hub:ORG/REPO/FILENAME`` (the prefix open_clip uses for
  repos), e.g. ``hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt``.

Download failures (no network, ``HF_HUB_OFFLINE=1``, a missing repo or file) become
:class:`DiffalignError` naming the reference and what was expected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    import torch
from safetensors import SafetensorError

HF_FILE_PREFIX = "hf-hub:"


def one_line(text: object, limit: int = 200) -> str:
    """Collapse whitespace (newlines included) and shorten, for embedding an exception in a message."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def looks_like_path(value: str) -> bool:
    """True when ``value`` should be read as a local path rather than a Hub repo id.

    The rule of :func:`diffalign.paths.looks_like_path`: absolute, ``./``, ``../``, ``~``, a backslash or
    a drive, two or more ``/``, a file suffix, ``assets/...``, or a first component that is a local directory.
    """
    from diffalign.paths import looks_like_path as _looks_like_path

    return _looks_like_path(value)


def _where(value: str) -> str:
    """`` (relative paths are looked up under CWD)`` for a relative ``value``, else nothing."""
    if Path(value).expanduser().is_absolute():
        return ""
    return f" (a relative path is looked up under the working directory {Path.cwd()} and among the shipped assets)"


def local_or_hub(value: str, what: str, expected: str) -> str:
    """Return ``value`` as an existing local path or a Hub repo id; error for a missing local path.

    ``what`` names the thing loaded (``"PickScore model"``), ``expected`` the local layout. A local
    path is looked up as given, then among the shipped assets (:func:`diffalign.paths.resolve_local`).
    """
    from diffalign.paths import resolve_local

    path = resolve_local(value)
    if path is not None:
        return str(path)
    if looks_like_path(value):
        raise DiffalignError(f"{what} path {value!r} does not exist; expected {expected}{_where(value)}")
    return value


def _is_local(ref: str) -> bool:
    """Does ``ref`` name something on this machine? ``PATH``, ``local-dir:DIR`` or ``ARCH (pretrained=FILE)``."""
    name, _, pretrained = ref.partition(" (pretrained=")
    candidates = [name.removeprefix("local-dir:"), pretrained.removesuffix(")")]
    return any(c and Path(c).expanduser().exists() for c in candidates)


def hub_failure(ref: str, what: str, expected: str, err: BaseException) -> DiffalignError:
    """The one-line error for a failed load of ``ref`` (the Hub hint only for what is not a local path)."""
    offline = " (the Hub is unreachable or HF_HUB_OFFLINE is set: download it elsewhere and pass a local path)"
    from_hub = not _is_local(ref)
    detail = one_line(err)
    if isinstance(err, (TypeError, AttributeError, KeyError)) or not detail:  # bare messages: name the type
        detail = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    return DiffalignError(
        f"cannot load {what} from {ref!r}{offline if from_hub else ''}: {detail}; expected {expected}"
    )


@contextlib.contextmanager
def load_errors(ref: str, what: str, expected: str) -> Iterator[None]:
    """Turn the loading libraries' errors (OSError, Hub errors, ValueError, RuntimeError) into DiffalignError.

    TypeError and AttributeError too: a config file of the wrong shape (``{"model_cfg": [1]}``) makes
    the libraries index into the wrong type.
    """
    try:
        yield
    except DiffalignError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        raise hub_failure(ref, what, expected, err) from err  # a corrupt or truncated file too


def resolve_file(value: str, what: str, expected: str) -> Path:
    """A local file, or ``hf-hub:ORG/REPO/FILENAME`` downloaded into the Hub cache; return its path."""
    if value.startswith(HF_FILE_PREFIX):
        ref = value[len(HF_FILE_PREFIX) :]
        parts = ref.split("/")
        if len(parts) < 3 or not all(parts):
            raise DiffalignError(f"{what} reference {value!r} is not hf-hub:ORG/REPO/FILENAME; expected {expected}")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        from huggingface_hub import hf_hub_download

        with load_errors(value, what, expected):
            return Path(hf_hub_download(repo_id, filename))
    from diffalign.paths import resolve_local

    path = resolve_local(value) or Path(value).expanduser()
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        where = _where(value) if state == "does not exist" else ""
        raise DiffalignError(f"{what} file {value!r} {state}; expected {expected}{where}")
    return path


def hub_download(repo_id: str, filename: str, what: str, expected: str) -> Path:
    """Download one file of a Hub repo (or find it in the cache)."""
    from huggingface_hub import hf_hub_download

    with load_errors(f"{repo_id}/{filename}", what, expected):
        return Path(hf_hub_download(repo_id, filename))


def load_state_dict(path: Path, what: str) -> dict:
    """Load a ``.safetensors`` or a torch pickle (``weights_only``) state dict; unwrap ``state_dict``/``model``.

    An empty, truncated or corrupt file (or one in another format) is a one-line :class:`DiffalignError`
    naming the file; a file that cannot be opened too.
    """
    import torch

    expected = "a .safetensors file or a torch state dict (.pt/.pth) of tensors"
    damaged = f"{what} file {str(path)!r} is corrupt, truncated or not a state dict"
    fix = f"download it again or pass another file; expected {expected}"
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DiffalignError(f"cannot read {what} file {str(path)!r}: {one_line(err)}; expected {expected}") from err
    if size == 0:
        raise DiffalignError(f"{what} file {str(path)!r} is empty (0 bytes); {fix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except DiffalignError:
        raise
    except IsADirectoryError as err:
        raise DiffalignError(f"{what} file {str(path)!r} is a directory; expected {expected}") from err
    except PermissionError as err:
        raise DiffalignError(f"cannot read {what} file {str(path)!r}: {one_line(err)}; make it readable") from err
    except Exception as err:  # safetensors, zip, pickle and weights_only errors have many types
        first = one_line(err, 120).split(". ")[0] or type(err).__name__  # torch's messages run for paragraphs
        raise DiffalignError(f"{damaged} ({first}); {fix}") from err
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise DiffalignError(f"{what} {str(path)!r} holds no state dict; expected {expected}")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def describe_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """A short description of a state-dict mismatch: counts and the first keys."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    return "; ".join(parts)


def load_image(path: Path) -> torch.Tensor:
    """Read an image file as a ``[3, H, W]`` float tensor in ``[0, 1]``; DiffalignError if unreadable."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise DiffalignError(f"cannot read image {str(path)!r}: {one_line(err)}") from err
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
