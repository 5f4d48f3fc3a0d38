"""Atomic checkpoints and exact resume.

``OUT/checkpoints/step_N/`` holds everything a resumed run needs to continue bit for bit:

    lora.safetensors   the trainable LoRA tensors by parameter name (exact fp32 values)
    lora/              the same adapter in diffusers format (usable directly: pipe.load_lora_weights)
    state.pt           step, optimizer, LR scheduler, grad scaler, prompt-stream position, method state
                       (e.g. DDPO's stat tracker), evaluator state, and the line counts of metrics.jsonl
                       and eval.jsonl at this step (resume truncates both files to them); also the
                       states of the optimizers a method owns (``method_optimizers``) and the dataset
                       stream's position (``data``) of a method that trains from a dataset
    method_modules.safetensors
                       only when the method owns trainable modules (``Method.modules()``): every
                       module's state dict as ``<module>.<key>`` (exact values, the modules' dtypes)
    rng_<rank>.pt      per process: python, numpy, torch CPU (and CUDA) RNG states and the states of
                       every generator the trainer owns
    meta.json          step, number of processes, LoRA rank; written last

A checkpoint is written into ``checkpoints/.tmp-step_N``, every file fsynced, then renamed to
``step_N`` in one ``os.replace``: a run killed at any moment leaves either a complete checkpoint or
a temporary directory that resume ignores and removes. All files load with ``weights_only=True``.

Bad files are user errors, not tracebacks: a save that fails to write (disk full, no permission, a
read-only file system) removes its temporary directory, leaves every earlier checkpoint as it was
and raises :class:`DiffalignError`; a checkpoint whose files are corrupt, truncated or missing is
reported by file, with the older checkpoints to resume from, and is never removed by the error path.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffalign.errors import DiffalignError

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Test hook: "kill:N" SIGKILLs this process half-way through writing checkpoint N; "sleep:S" sleeps S seconds
# there; "enospc:N" fails the write of checkpoint N half-way through state.pt with OSError(ENOSPC), as a full disk.
HOOK_ENV = "DIFFALIGN_CHECKPOINT_HOOK"
STATE_KEYS = (
    "step",
    "updates",
    "optimizer",
    "lr_scheduler",
    "scaler",
    "sampler",
    "method",
    "evaluator",
    "metrics_lines",
    "eval_lines",
)
RNG_KEYS = ("python", "numpy", "torch", "cuda", "owned")
MODULES_FILE = "method_modules.safetensors"  # the state dicts of the modules a method owns


# -------------------------------------------------------------------------------------------- RNG
def capture_rng(owned: dict[str, torch.Generator | random.Random]) -> dict[str, Any]:
    """Global RNG states (python, numpy, torch CPU, CUDA) and those of ``owned`` generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "owned": {},
    }
    for name, gen in owned.items():
        state["owned"][name] = gen.getstate() if isinstance(gen, random.Random) else gen.get_state()
    return state


def restore_rng(state: dict[str, Any], owned: dict[str, torch.Generator | random.Random]) -> None:
    """Set the global RNGs and the ``owned`` generators back to a :func:`capture_rng` state."""
    random.setstate(_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in owned.items():
        if name not in state["owned"]:
            raise DiffalignError(f"checkpoint has no state for generator {name!r}; it was written by another version")
        saved = state["owned"][name]
        if isinstance(gen, random.Random):
            gen.setstate(_tuple(saved))
        else:
            gen.set_state(saved)


def _tuple(x: Any) -> Any:
    """random.setstate wants tuples; torch.load may give lists back."""
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------- write failures
def one_line(err: BaseException, limit: int = 160, first_sentence: bool = False) -> str:
    """An exception as ``Type: message`` on one line, shortened (for embedding in an error message).

    ``first_sentence`` keeps the message up to its first ``". "`` (torch's load errors run for paragraphs).
    """
    text = " ".join(str(err).split())
    if first_sentence:
        text = text.split(". ")[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_write_failure(err: BaseException) -> bool:
    """Did writing a file fail for a reason outside the program (disk full, permissions, read-only)?

    ``OSError`` always; safetensors reports its I/O errors as ``SafetensorError("... I/O error ...")``.
    """
    if isinstance(err, OSError):
        return True
    return type(err).__name__ == "SafetensorError" and ("I/O error" in str(err) or "os error" in str(err))


def write_fix(err: BaseException, where: Path) -> str:
    """What to do about a failed write under ``where``: free space, fix permissions, ..."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "os error 28" in text:
        return f"free disk space on the file system of {where}"
    if code in (errno.EACCES, errno.EPERM):
        return f"make {where} writable"
    if code == errno.EROFS:
        return f"make the file system of {where} writable (it is read-only)"
    if code in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return f"move away what is in the way under {where}"
    return f"make sure {where} can be written"


# ------------------------------------------------------------------------------------------- files
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _hook_spec() -> tuple[str, str]:
    action, _, arg = os.environ.get(HOOK_ENV, "").partition(":")
    return action, arg


def _hook(step: int) -> None:
    action, arg = _hook_spec()
    if action == "kill" and arg and int(arg) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sleep" and arg:
        time.sleep(float(arg))


def _write_bytes(path: Path, data: bytes, step: int) -> None:
    """Write ``data`` to ``path`` with plain file I/O, so that a full disk is an ``OSError``.

    (``torch.save`` straight to a file reports a full disk as a ``RuntimeError`` from its zip writer.)
    The ``enospc:N`` test hook writes half of ``state.pt`` of checkpoint N and then fails.
    """
    action, arg = _hook_spec()
    with open(path, "wb") as fh:
        if action == "enospc" and arg and int(arg) == step and path.name == "state.pt":
            fh.write(data[: len(data) // 2])
            fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        fh.write(data)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@dataclass
class Loaded:
    """A checkpoint read back for this process."""

    path: Path
    step: int
    state: dict[str, Any]
    lora: dict[str, torch.Tensor]
    rng: dict[str, Any]
    modules: dict[str, torch.Tensor] | None = None  # method_modules.safetensors, when it was asked for


# ----------------------------------------------------------------------------------- method modules
def module_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every owned module's state dict (parameters and buffers) as one flat ``<module>.<key>`` mapping.

    The values are detached CPU copies (never views of the live tensors, and never sharing memory,
    which safetensors refuses), in the modules' own dtypes: saved and loaded back they are equal bit
    for bit.
    """
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            out[f"{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return out


def load_module_tensors(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Copy ``tensors`` (from :func:`module_tensors`) into ``modules``, exactly; ``file`` names their source.

    A missing or extra key, a shape or a dtype that differs (another method, other options of it) is a
    one-line :class:`DiffalignError` naming ``file``; nothing is changed then.
    """
    fix = "resume with the config of the run that wrote it, or start a new run in another --output-dir"
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        if name not in grouped or not rest:
            raise DiffalignError(
                f"checkpoint file {file} holds {key!r}, which is no module of this method "
                f"(it owns: {', '.join(modules) or 'none'}); {fix}"
            )
        grouped[name][rest] = value
    for name, module in modules.items():
        mine, theirs = module.state_dict(), grouped[name]
        if set(mine) != set(theirs):
            missing = sorted(set(mine) - set(theirs)) or sorted(set(theirs) - set(mine))
            raise DiffalignError(
                f"checkpoint file {file} does not hold the module {name!r} of this method (keys differ: "
                f"{name}.{missing[0]}); {fix}"
            )
        for key, value in mine.items():
            if value.shape != theirs[key].shape or value.dtype != theirs[key].dtype:
                raise DiffalignError(
                    f"checkpoint file {file} holds {name}.{key} as {theirs[key].dtype} {tuple(theirs[key].shape)}, "
                    f"this method has {value.dtype} {tuple(value.shape)}; {fix}"
                )
    with torch.no_grad():
        for name, module in modules.items():
            module.load_state_dict(grouped[name], strict=True)


def _steps_in(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step_N`` with meta.json) directly under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


class Checkpointer:
    """Writes, lists, prunes and reads ``OUT/checkpoints/step_N``; coordinates processes via ``accelerator``."""

    def __init__(self, output_dir: str | Path, keep: int, accelerator: Any) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.acc = accelerator
        self.protect: set[int] = set()  # steps never pruned (the best evaluation's checkpoint)

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (with meta.json), oldest first."""
        return _steps_in(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def resolve(self, resume: str) -> Path | None:
        """``latest`` -> the newest complete checkpoint (None if there is none); else a checkpoint path."""
        if resume == "latest":
            return self.latest()
        path = Path(resume).expanduser()
        if not (path / "meta.json").is_file():
            raise DiffalignError(
                f"no checkpoint at {resume}: expected a directory like OUT/checkpoints/step_N with meta.json "
                "(or --resume latest)"
            )
        return path

    def clean_partial(self) -> None:
        """Remove leftovers of interrupted saves (main process)."""
        if self.acc.is_main_process and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)
        self.acc.wait_for_everyone()

    def remove_after(self, step: int) -> list[Path]:
        """Delete checkpoints newer than ``step`` (resuming from an older one starts a new branch)."""
        removed = []
        if self.acc.is_main_process:
            for s, p in self.checkpoints():
                if s > step:
                    self._discard(p)
                    removed.append(p)
        self.acc.wait_for_everyone()
        return removed

    def _discard(self, path: Path) -> None:
        trash = path.with_name(f".trash-{path.name}")
        os.replace(path, trash)  # a half-deleted checkpoint never looks complete
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------ processes
    def any_failed(self, failed: bool) -> bool:
        """A barrier that also tells every process whether any process failed (one all-reduce)."""
        if self.acc.num_processes == 1:
            return failed
        flag = torch.tensor([1.0 if failed else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def raise_if_any(self, error: DiffalignError | None, elsewhere: str) -> None:
        """Raise ``error`` on the processes that have one and ``elsewhere`` on the others, if any process has one."""
        if self.any_failed(error is not None):
            raise error if error is not None else DiffalignError(elsewhere)

    # ------------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        state: dict[str, Any],
        lora: dict[str, torch.Tensor],
        rng: dict[str, Any],
        write_extra: Callable[[Path], None] | None = None,
        modules: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically; every process calls this (each saves its own RNG).

        ``modules`` (:func:`module_tensors` of the modules a method owns) go to ``method_modules.safetensors``.

        A failed write (disk full, permissions, read-only file system) removes the temporary
        directory, leaves the earlier checkpoints untouched and raises :class:`DiffalignError` on
        every process.
        """
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        acc = self.acc
        main = acc.is_main_process
        error: BaseException | None = None
        if main:
            error = self._attempt(lambda: self._make_tmp(tmp))
        self._check_saved(step, tmp, error)
        error = self._attempt(lambda: self._write_rng(step, tmp, rng))
        self._check_saved(step, tmp, error)
        if main:
            error = self._attempt(lambda: self._write_main(step, tmp, final, state, lora, write_extra, modules))
        self._check_saved(step, tmp, error)
        if main:
            error = self._attempt(lambda: self._prune(final))
        if self.any_failed(error is not None):
            where = f" ({one_line(error)})" if error is not None else ""
            raise DiffalignError(
                f"checkpoint {final} was written, but older checkpoints could not be removed{where}; "
                f"{write_fix(error, self.root) if error is not None else 'see the main process'} "
                "and continue with --resume latest"
            )
        return final

    @staticmethod
    def _attempt(write: Callable[[], None]) -> BaseException | None:
        """Run ``write``; return the write failure it raised (other exceptions propagate)."""
        try:
            write()
        except Exception as err:
            if not is_write_failure(err):
                raise
            return err
        return None

    def _check_saved(self, step: int, tmp: Path, error: BaseException | None) -> None:
        """Barrier after a stage of :meth:`save`; if any process failed, clean up and raise on all."""
        if not self.any_failed(error is not None):
            return
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = self.latest()
        if previous is not None:
            intact = f"the previous checkpoint {previous} is intact"
            then = "continue with --resume latest"
        else:
            intact = "there is no earlier checkpoint"
            then = "run again (--resume latest then starts from step 0)"
        cause = f" ({one_line(error)})" if error is not None else " (on another process)"
        fix = write_fix(error, self.root) if error is not None else f"make {self.root} writable with free space"
        raise DiffalignError(
            f"could not write checkpoint step_{step} to {self.root}{cause}; the checkpoint was not written and "
            f"{intact}: {fix}, then {then}"
        )

    def _make_tmp(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def _write_rng(self, step: int, tmp: Path, rng: dict[str, Any]) -> None:
        path = tmp / f"rng_{self.acc.process_index}.pt"
        _write_bytes(path, _torch_bytes(rng), step)
        _fsync_file(path)

    def _write_main(
        self,
        step: int,
        tmp: Path,
        final: Path,
        state: dict[str, Any],
        lora: dict[str, torch.Tensor],
        write_extra: Callable[[Path], None] | None,
        modules: dict[str, torch.Tensor] | None = None,
    ) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in lora.items()}
        _write_bytes(tmp / "lora.safetensors", save(tensors), step)
        if modules is not None:
            _write_bytes(tmp / MODULES_FILE, save(modules), step)
        _write_bytes(tmp / "state.pt", _torch_bytes(state), step)
        _hook(step)
        if write_extra is not None:
            write_extra(tmp)
        meta = {"format": FORMAT, "step": step, "num_processes": self.acc.num_processes, "lora_rank": _rank_of(lora)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _fsync_tree(tmp)
        if final.exists():
            self._discard(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)

    def _prune(self, final: Path) -> None:
        """Keep the newest ``keep`` checkpoints and those of the steps in ``protect``."""
        found = self.checkpoints()
        kept = {s for s, _ in found[-self.keep :]} | self.protect
        for s, old in found:
            if s not in kept:
                self._discard(old)

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, modules: bool = False) -> Loaded:
        """Read checkpoint ``path`` for this process; one-line errors name a damaged file and the way out.

        ``modules``: also read ``method_modules.safetensors`` (the method owns modules), into
        :attr:`Loaded.modules`. Every process reads; if any fails, all raise (no process is left
        waiting at a barrier). Nothing is removed.
        """
        loaded, error = None, None
        try:
            loaded = self._read(path, modules)
        except DiffalignError as err:
            error = err
        self.raise_if_any(error, f"another process could not read checkpoint {path} (see its error)")
        assert loaded is not None
        return loaded

    def _read(self, path: Path, modules: bool = False) -> Loaded:
        meta = self._read_file(path, "meta.json", _read_json)
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("step", "num_processes")):
            raise self._damaged(path, "meta.json", "not a checkpoint's meta.json (no step or num_processes)")
        if meta.get("format") != FORMAT:
            raise DiffalignError(f"checkpoint {path} has format {meta.get('format')}, this diffalign reads {FORMAT}")
        if meta["num_processes"] != self.acc.num_processes:
            raise DiffalignError(
                f"checkpoint {path} was written by {meta['num_processes']} processes, this run has "
                f"{self.acc.num_processes}; resume with the same number of processes for an exact continuation"
            )
        state = self._read_file(path, "state.pt", _read_torch)
        missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["all"]
        if missing:
            raise self._damaged(path, "state.pt", f"not a diffalign training state (missing: {', '.join(missing)})")
        rng_name = f"rng_{self.acc.process_index}.pt"
        rng = self._read_file(path, rng_name, _read_torch)
        if not _looks_like_rng(rng):
            raise self._damaged(path, rng_name, "not a diffalign RNG state")
        lora = self._read_file(path, "lora.safetensors", _read_safetensors)
        owned = self._read_file(path, MODULES_FILE, _read_safetensors) if modules else None
        return Loaded(path, int(meta["step"]), state, lora, rng, owned)

    def _read_file(self, path: Path, name: str, read: Callable[[Path], Any]) -> Any:
        """``read(path / name)``, with any failure (missing, empty, corrupt, truncated) as one line."""
        file = path / name
        if not file.is_file():
            raise self._damaged(path, name, "a directory" if file.is_dir() else "missing")
        if file.stat().st_size == 0:
            raise self._damaged(path, name, "empty (0 bytes)")
        try:
            return read(file)
        except Exception as err:  # torch.load and safetensors raise many types for a damaged file
            raise self._damaged(
                path, name, f"corrupt or truncated ({one_line(err, 120, first_sentence=True)})"
            ) from None

    def _damaged(self, path: Path, name: str, why: str) -> DiffalignError:
        """The error for a damaged file of checkpoint ``path``, naming the older checkpoints to resume from."""
        m = _STEP_DIR.match(path.name)
        step = int(m.group(1)) if m else None
        older = [p for s, p in _steps_in(path.parent) if step is not None and s < step]
        if older:
            names = ", ".join(p.name for p in older)
            fix = (
                f"resume from an older checkpoint with --resume {older[-1]} (available: {names}; the later ones "
                f"are then removed), or delete the damaged {path} and run --resume latest again"
            )
        else:
            fix = (
                f"there is no older checkpoint: delete {path} and run --resume latest again to start from step 0, "
                "or start a new run in another --output-dir"
            )
        return DiffalignError(f"checkpoint file {path / name} is {why}; {fix}")


def _looks_like_rng(rng: Any) -> bool:
    """Has ``rng`` the structure :func:`capture_rng` writes (so that :func:`restore_rng` cannot fail half-way)?"""
    return (
        isinstance(rng, dict)
        and all(k in rng for k in RNG_KEYS)
        and isinstance(rng["torch"], torch.Tensor)
        and isinstance(rng["numpy"], (tuple, list))
        and len(rng["numpy"]) == 5
        and isinstance(rng["numpy"][1], torch.Tensor)
        and isinstance(rng["owned"], dict)
    )


def _rank_of(lora: dict[str, torch.Tensor]) -> int:
    for name, t in lora.items():
        if "lora_A" in name:
            return int(t.shape[0])
    return 0


def _jsonl_prefix(path: Path, n: int) -> list[str]:
    """The first ``n`` lines of a JSONL file, each checked to be a JSON object; a missing file counts as empty."""
    if path.is_dir():
        raise DiffalignError(f"{path} is a directory, not a JSONL file; move it away or start a new run")
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except UnicodeDecodeError:
        raise DiffalignError(
            f"{path} is not UTF-8 text (damaged?); restore it, or start a new run in another --output-dir"
        ) from None
    except OSError as err:
        raise DiffalignError(f"cannot read {path} ({one_line(err)}); fix it and resume again") from None
    lines = text.splitlines(keepends=True)
    if len(lines) < n:
        raise DiffalignError(
            f"{path} has {len(lines)} lines but the checkpoint expects at least {n}; was it edited? "
            "Restore it or start a new run"
        )
    for i, line in enumerate(lines[:n], start=1):
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok or not line.endswith("\n"):
            raise DiffalignError(
                f"{path} line {i} is not a complete JSON record (damaged or edited?); restore the file, or "
                "start a new run in another --output-dir"
            )
    return lines[:n]


def truncate_jsonl(files: dict[Path, int]) -> None:
    """Keep the first ``n`` lines of each JSONL file (atomically), after checking all of them.

    Every file is checked (present lines, UTF-8, one JSON object per line) before any is changed,
    so an error leaves all of them as they were.
    """
    kept = {path: _jsonl_prefix(path, n) for path, n in files.items()}
    for path, lines in kept.items():
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text("".join(lines), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise DiffalignError(
                f"cannot rewrite {path} for resuming ({one_line(err)}); {write_fix(err, path.parent)} and resume again"
            ) from None


def truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` lines of a JSONL file (atomically); a missing file counts as empty."""
    truncate_jsonl({path: n})
