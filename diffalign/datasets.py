"""Datasets on disk for methods that train from records instead of sampled prompts (offline
Diffusion-DPO, reward-weighted regression on scored images, ...).

The format is a JSONL file, one record (a JSON object) per line; blank lines are skipped::

    {"prompt": "a red circle", "chosen": "img/0001_a.png", "rejected": "img/0001_b.png", "label": 1}
    {"prompt": "two blue squares", "image": "img/0002.png", "score": 0.73}

- ``prompt``: a string (always required);
- the method's image keys (:attr:`diffalign.methods.Method.dataset_images`, e.g. ``image`` or
  ``chosen`` and ``rejected``): a path to an image file, relative to the JSONL file's directory (or
  absolute), anything PIL reads (PNG, JPEG, WebP, ...), loaded as RGB;
- the method's label keys (:attr:`~diffalign.methods.Method.dataset_labels`, e.g. ``label`` or
  ``score``): a finite number;
- any other key is kept in :attr:`Record.data` for the method.

:class:`JsonlDataset` reads and checks the file (every problem is a one-line :class:`DiffalignError`
naming the file and the line), :class:`DatasetStream` is the training run's resumable stream over it:
epoch ``e`` visits every record once, in a permutation seeded by ``(seed, e)`` (or in file order
without shuffling); each step every process draws the same global batch of
``batch_size x num_processes`` record indices and keeps its own slice (process ``p`` rows
``p*b .. p*b+b-1``, the layout of ``ctx.gather``); a batch may straddle two epochs. Its state is
(epoch, position) plus the record count and the file's SHA-256, so a resumed run continues at the
exact next record and refuses a changed file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffalign.errors import DiffalignError
from diffalign.methods.base import PromptBatch

FORMAT_HINT = "one JSON object per line with a 'prompt' (docs/training.md, 'A dataset on disk')"


@dataclass(frozen=True)
class Record:
    """One record of a dataset: its prompt, image paths (absolute), numeric labels, and where it came from."""

    prompt: str
    images: dict[str, Path]  # image key -> path of the image file
    labels: dict[str, float]  # label key -> value
    line: int  # 1-based line of the JSONL file
    data: dict[str, Any] = field(default_factory=dict)  # the whole JSON object, other keys included


@dataclass
class DatasetBatch(PromptBatch):
    """A :class:`PromptBatch` drawn from a dataset: this process's records with their images and labels.

    ``local`` are the prompts of ``records`` and ``everyone`` those of the whole global batch (process
    order). ``images[key]`` is ``[B, 3, H, W]`` float32 in ``[0, 1]`` on the CPU and ``labels[key]`` is
    ``[B]`` float32 (exact values in ``records[i].labels``); ``indices`` are the records' positions in
    the dataset (0-based, file order).
    """

    records: list[Record] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)


class JsonlDataset:
    """The records of a JSONL file, checked when read.

    ``image_keys`` and ``label_keys`` are the keys every record must hold besides ``prompt``;
    ``check_images`` also opens every image's header (missing files are always reported). ``key``
    names the config key in error messages. A missing file, a line that is not a JSON object, a
    missing key, a value of the wrong type, a missing or unreadable image and an empty dataset are
    one-line :class:`DiffalignError` s naming the file (and the line).
    """

    def __init__(
        self,
        path: str | Path,
        image_keys: tuple[str, ...] | list[str] = (),
        label_keys: tuple[str, ...] | list[str] = (),
        key: str = "data.train",
        check_images: bool = True,
    ) -> None:
        self.path, self.key = Path(path), key
        self.image_keys, self.label_keys = tuple(image_keys), tuple(label_keys)
        raw = self._read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DiffalignError(
                f"{key}: dataset {self.path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSONL, "
                f"{FORMAT_HINT}"
            ) from None
        self.records: list[Record] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                self.records.append(self._record(line, number))
        if not self.records:
            raise DiffalignError(f"{key}: dataset {self.path} holds no records; write {FORMAT_HINT}")
        if check_images:
            for record in self.records:
                for name, image in record.images.items():
                    self._check_image(record, name, image)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    # ------------------------------------------------------------------------------- reading
    def _read_bytes(self) -> bytes:
        if self.path.is_dir():
            raise DiffalignError(f"{self.key}: dataset {self.path} is a directory; give a JSONL file, {FORMAT_HINT}")
        if not self.path.is_file():
            raise DiffalignError(
                f"{self.key}: dataset file {self.path} does not exist; give a JSONL file with {FORMAT_HINT}"
            )
        try:
            return self.path.read_bytes()
        except OSError as err:
            raise DiffalignError(f"{self.key}: cannot read dataset {self.path} ({err.strerror or err})") from None

    def _where(self, line: int) -> str:
        return f"{self.key}: {self.path} line {line}"

    def _record(self, line: str, number: int) -> Record:
        where = self._where(number)
        try:
            data = json.loads(line)
        except ValueError as err:
            msg = getattr(err, "msg", None) or str(err).split(":")[0]
            raise DiffalignError(f"{where} is not JSON ({msg}); write {FORMAT_HINT}") from None
        if not isinstance(data, dict):
            raise DiffalignError(f"{where} is a JSON {type(data).__name__}, not an object; write {FORMAT_HINT}")
        for name in ("prompt", *self.image_keys, *self.label_keys):
            if name not in data:
                needed = ", ".join(repr(k) for k in ("prompt", *self.image_keys, *self.label_keys))
                raise DiffalignError(f"{where} has no key {name!r}; every record needs {needed}")
        if not isinstance(data["prompt"], str):
            raise DiffalignError(f"{where}: 'prompt' must be a string, got {json.dumps(data['prompt'])}")
        images = {}
        for name in self.image_keys:
            value = data[name]
            if not isinstance(value, str) or not value.strip():
                raise DiffalignError(
                    f"{where}: {name!r} must be the path of an image file (relative to {self.path.parent}), "
                    f"got {json.dumps(value)}"
                )
            image = Path(value).expanduser()
            image = image if image.is_absolute() else self.path.parent / image
            if not image.is_file():
                what = "is a directory" if image.is_dir() else "does not exist"
                raise DiffalignError(
                    f"{where}: image {name!r} {image} {what} (paths are relative to the JSONL file's directory)"
                )
            images[name] = image
        labels = {}
        for name in self.label_keys:
            value = data[name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok:
                raise DiffalignError(f"{where}: {name!r} must be a finite number, got {json.dumps(value)}")
            labels[name] = float(value)
        return Record(data["prompt"], images, labels, number, data)

    def _check_image(self, record: Record, name: str, image: Path) -> None:
        from PIL import Image

        try:
            with Image.open(image) as im:
                im.size  # noqa: B018  (the header is read on open; this touches it)
        except (OSError, ValueError) as err:
            raise self._unreadable(record, name, image, err) from None

    def _unreadable(self, record: Record, name: str, image: Path, err: BaseException) -> DiffalignError:
        text = " ".join(str(err).split())[:160]
        return DiffalignError(
            f"{self._where(record.line)}: cannot read image {name!r} {image} ({type(err).__name__}: {text}); "
            "replace the file or drop the record"
        )

    # ------------------------------------------------------------------------------- images
    def load_images(self, records: list[Record], name: str, size: int = 0) -> torch.Tensor:
        """The images under key ``name`` of ``records`` as ``[B, 3, H, W]`` float32 in ``[0, 1]``.

        ``size > 0`` resizes each image's shorter side to ``size`` (bilinear, antialiased) and crops the
        centre ``size x size``; ``size = 0`` keeps them as stored, and then every image of the batch
        must have one size.
        """
        from reward_models.loading import load_image

        out = []
        for record in records:
            image = record.images[name]
            try:
                x = load_image(image)
            except DiffalignError as err:
                raise self._unreadable(record, name, image, err.__cause__ or err) from None
            if size > 0:
                x = resize_center_crop(x, size)
            elif out and x.shape != out[0].shape:
                first = records[0]
                raise DiffalignError(
                    f"{self._where(record.line)}: image {name!r} is {x.shape[2]}x{x.shape[1]} but line "
                    f"{first.line}'s is {out[0].shape[2]}x{out[0].shape[1]} in the same batch; set data.image_size "
                    "to resize every image"
                )
            out.append(x)
        return torch.stack(out)


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """``[3, H, W]`` -> ``[3, size, size]``: shorter side to ``size`` (bilinear, antialiased), centre crop."""
    _, h, w = image.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        image = torch.nn.functional.interpolate(
            image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[:, top : top + size, left : left + size].contiguous()


def check_batch_size(dataset: JsonlDataset, batch_size: int, num_processes: int = 1) -> None:
    """Refuse a global batch (``sample.batch_size`` x processes) larger than the dataset (one line)."""
    total = batch_size * num_processes
    if total > len(dataset):
        procs = f" x {num_processes} processes" if num_processes > 1 else ""
        raise DiffalignError(
            f"data.train: dataset {dataset.path} holds {len(dataset)} records, fewer than one batch of {total} "
            f"(sample.batch_size={batch_size}{procs}); lower sample.batch_size or add records"
        )


class DatasetStream:
    """Endless epochs over a :class:`JsonlDataset`; the resumable source of a run's dataset batches.

    Epoch ``e`` is a permutation of the records seeded by ``(seed, e)`` (``shuffle=False``: file order).
    The state is (epoch, position), so a resumed run draws exactly the records the uninterrupted run
    would have drawn.
    """

    def __init__(self, dataset: JsonlDataset, seed: int = 0, shuffle: bool = True, image_size: int = 0) -> None:
        self.dataset, self.seed, self.shuffle, self.image_size = dataset, seed, shuffle, image_size
        self.epoch, self.position = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        """The record indices of epoch ``epoch``, in the order they are drawn."""
        n = len(self.dataset)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next_indices(self, n: int) -> list[int]:
        """The next ``n`` record indices of the stream (the whole global batch)."""
        out: list[int] = []
        total = len(self.dataset)
        order = self.order(self.epoch)
        while len(out) < n:
            if self.position >= total:
                self.epoch, self.position = self.epoch + 1, 0
                order = self.order(self.epoch)
            take = min(n - len(out), total - self.position)
            out += [int(i) for i in order[self.position : self.position + take]]
            self.position += take
        return out

    def next_batch(self, batch_size: int, num_processes: int = 1, process_index: int = 0) -> DatasetBatch:
        """The next global batch of ``batch_size x num_processes`` records; this process's slice loaded."""
        everyone = self.next_indices(batch_size * num_processes)
        mine = everyone[process_index * batch_size : (process_index + 1) * batch_size]
        ds = self.dataset
        records = [ds[i] for i in mine]
        images = {name: ds.load_images(records, name, self.image_size) for name in ds.image_keys}
        labels = {name: torch.tensor([r.labels[name] for r in records], dtype=torch.float32) for name in ds.label_keys}
        return DatasetBatch(
            local=[r.prompt for r in records],
            everyone=[ds[i].prompt for i in everyone],
            records=records,
            indices=mine,
            images=images,
            labels=labels,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_records": len(self.dataset),
            "sha256": self.dataset.sha256,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the checkpoint's position; a dataset file that changed since is refused (one line)."""
        if int(state["num_records"]) != len(self.dataset) or state["sha256"] != self.dataset.sha256:
            raise DiffalignError(
                f"data.train: dataset {self.dataset.path} changed since the checkpoint was written (it had "
                f"{state['num_records']} records, now {len(self.dataset)}; SHA-256 {str(state['sha256'])[:12]}... vs "
                f"{self.dataset.sha256[:12]}...); resume with the same file, or start a new run in another --output-dir"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
