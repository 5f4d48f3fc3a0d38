"""Differentiable preprocessing that mirrors a transformers image processor's configuration.

Reads ``size`` / ``crop_size`` / ``resample`` / ``image_mean`` / ``image_std`` and the ``do_*`` flags of a
loaded ``CLIPImageProcessor`` or ``BitImageProcessor`` (slow, fast or PIL backend) and applies the
same steps with :func:`reward_models.preprocess.preprocess` on tensors in ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reward_models.preprocess import center_crop_or_pad, interpolation_name, normalize, resize, shortest_edge_size


def _get(obj: object, name: str, default: object = None) -> object:
    value = getattr(obj, name, default)
    return default if value is None else value


@dataclass(frozen=True)
class ProcessorConfig:
    """The preprocessing steps of a transformers image processor."""

    resize_shortest: int | None  # shortest-edge resize target
    resize_hw: tuple[int, int] | None  # exact (h, w) resize
    crop_hw: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    rescale: bool
    rescale_factor: float

    @classmethod
    def from_processor(cls, processor: object) -> ProcessorConfig:
        ip = getattr(processor, "image_processor", processor)
        size = _get(ip, "size", {}) if _get(ip, "do_resize", True) else {}
        size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
        shortest = size.get("shortest_edge")
        hw = (int(size["height"]), int(size["width"])) if "height" in size and "width" in size else None
        crop = _get(ip, "crop_size", None) if _get(ip, "do_center_crop", False) else None
        if isinstance(crop, int):
            crop_hw: tuple[int, int] | None = (crop, crop)
        elif crop:
            crop = dict(crop)
            crop_hw = (int(crop["height"]), int(crop["width"]))
        else:
            crop_hw = None
        do_norm = bool(_get(ip, "do_normalize", True))
        mean = tuple(float(x) for x in _get(ip, "image_mean", (0.0, 0.0, 0.0))) if do_norm else (0.0, 0.0, 0.0)
        std = tuple(float(x) for x in _get(ip, "image_std", (1.0, 1.0, 1.0))) if do_norm else (1.0, 1.0, 1.0)
        resample = _get(ip, "resample", 3)
        return cls(
            resize_shortest=int(shortest) if shortest else None,
            resize_hw=hw,
            crop_hw=crop_hw,
            mean=mean,
            std=std,
            interpolation=interpolation_name(resample),
            rescale=bool(_get(ip, "do_rescale", True)),
            rescale_factor=float(_get(ip, "rescale_factor", 1 / 255)),
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> the processor's ``pixel_values``, differentiable."""
        x = images.float()
        h, w = x.shape[-2:]
        if self.resize_shortest:
            x = resize(x, shortest_edge_size(h, w, self.resize_shortest), self.interpolation)  # type: ignore[arg-type]
        elif self.resize_hw:
            x = resize(x, self.resize_hw, self.interpolation)  # type: ignore[arg-type]
        if self.crop_hw:
            x = center_crop_or_pad(x, self.crop_hw, offsets="floor")
        if not self.rescale or abs(self.rescale_factor - 1 / 255) > 1e-9:
            # the processor sees 0-255 pixels and rescales them by rescale_factor (or not at all)
            x = x * (255.0 * self.rescale_factor if self.rescale else 255.0)
        return normalize(x, self.mean, self.std)
