"""Resolve weights given as a local path or a Hugging Face Hub reference, with one-line errors.

Conventions used by every reward loader:

- A **directory or file that exists** is used as is.
- A value that **looks like a path** (absolute, ``./``, ``../``, ``~``, two or more ``/``, a
  backslash, or a file suffix such as ``.pt``) but does not exist is an error naming the path and the
  expected layout; the Hub is never asked.
- Anything else of the form ``name`` or ``org/name`` is a **Hub repo id** (transformers loaders).
- A single file on the Hub is written ``hf-hub:ORG/REPO/FILENAME`` (the prefix open_clip uses for
  repos), e.g. ``hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt``.

Download failures (no network, ``HF_HUB_OFFLINE=1``, a missing repo or file) become
:class:`DiffalignError` naming the reference and what was expected.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    import torch
from safetensors import SafetensorError

HF_FILE_PREFIX = "hf-hub:"
_FILE_SUFFIX = re.compile(r"\.(pt|pth|bin|safetensors|ckpt|json|npz|npy|png|jpe?g|webp|txt)$", re.IGNORECASE)


def one_line(text: object, limit: int = 200) -> str:
    """Collapse whitespace (newlines included) and shorten, for embedding an exception in a message."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def looks_like_path(value: str) -> bool:
    """True when ``value`` should be read as a local path rather than a Hub repo id."""
    v = value.strip()
    return (
        v.startswith(("/", "./", "../", "~", "."))
        or "\\" in v
        or v.count("/") >= 2
        or bool(_FILE_SUFFIX.search(v))
        or (len(v) > 1 and v[1] == ":")  # a Windows drive
    )


def local_or_hub(value: str, what: str, expected: str) -> str:
    """Return ``value`` as an existing local path or a Hub repo id; error for a missing local path.

    ``what`` names the thing loaded (``"PickScore model"``), ``expected`` the local layout.
    """
    path = Path(value).expanduser()
    if path.exists():
        return str(path)
    if looks_like_path(value):
        raise DiffalignError(f"{what} path {value!r} does not exist; expected {expected}")
    return value


def hub_failure(ref: str, what: str, expected: str, err: BaseException) -> DiffalignError:
    """The one-line error for a failed load of ``ref``."""
    offline = " (the Hub is unreachable or HF_HUB_OFFLINE is set: download it elsewhere and pass a local path)"
    from_hub = not Path(ref).expanduser().exists()
    return DiffalignError(
        f"cannot load {what} from {ref!r}{offline if from_hub else ''}: {one_line(err)}; expected {expected}"
    )


@contextlib.contextmanager
def load_errors(ref: str, what: str, expected: str) -> Iterator[None]:
    """Turn the loading libraries' errors (OSError, Hub errors, ValueError, RuntimeError) into DiffalignError."""
    try:
        yield
    except DiffalignError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:  # a corrupt file too
        raise hub_failure(ref, what, expected, err) from err


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
    path = Path(value).expanduser()
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise DiffalignError(f"{what} file {value!r} {state}; expected {expected}")
    return path


def hub_download(repo_id: str, filename: str, what: str, expected: str) -> Path:
    """Download one file of a Hub repo (or find it in the cache)."""
    from huggingface_hub import hf_hub_download

    with load_errors(f"{repo_id}/{filename}", what, expected):
        return Path(hf_hub_download(repo_id, filename))


def load_state_dict(path: Path, what: str) -> dict:
    """Load a ``.safetensors`` or a torch pickle (``weights_only``) state dict; unwrap ``state_dict``/``model``."""
    import torch

    expected = "a .safetensors file or a torch state dict (.pt/.pth) of tensors"
    with load_errors(str(path), what, expected):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as err:  # pickle errors have many types
                if isinstance(err, (OSError, DiffalignError)):
                    raise
                raise DiffalignError(f"cannot read {what} {str(path)!r}: {one_line(err)}; expected {expected}") from err
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
