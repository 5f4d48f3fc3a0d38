"""An exponential moving average (EMA) of the trained LoRA, for evaluation and the saved adapter.

Policy-gradient training of a diffusion model from a few dozen trajectories a step is noisy: the iterate
wanders around the region it has reached, and a single set of weights is one draw from that wandering.
Flow-GRPO (Liu et al. 2025, arXiv 2505.05470; its code's ``train.ema``) therefore evaluates an EMA of the
trainable parameters, updated after every ``every``-th optimizer update with a decay that ramps up:

    d_k = min(decay, (1 + k) / (10 + k)),     ema <- d_k * ema + (1 - d_k) * theta,

k counting the optimizer updates made so far, this one included (so with every = 1 the first updates follow
theta closely: d = 0.18, 0.25, 0.31, ...; Flow-GRPO ships decay 0.9, every 8).
Training always continues from theta; only evaluation, the checkpoints' exported ``lora/`` and the run's
final ``lora/`` use the average (``train.ema_decay`` > 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def ema_decay(decay: float, k: int) -> float:
    """The decay of an EMA update after the k-th optimizer update: ``min(decay, (1 + k) / (10 + k))`` (Flow-GRPO's
    warm-up)."""
    return min(decay, (1.0 + k) / (10.0 + k))


class ParamEMA:
    """The EMA of a list of parameters, updated every ``every``-th call of :meth:`update`.

    The average is kept in float32 whatever the parameters' dtype; :meth:`state_dict` holds everything a
    resumed run needs to continue it bit for bit.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, every: int = 1) -> None:
        self.params = list(params)
        self.decay, self.every = decay, every
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.calls = 0  # optimizer updates seen

    @property
    def n(self) -> int:
        """EMA updates made so far (every ``every``-th optimizer update)."""
        return self.calls // self.every

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer update; averages on every ``every``-th call."""
        self.calls += 1
        if self.calls % self.every:
            return
        d = ema_decay(self.decay, self.calls)
        for s, p in zip(self.shadow, self.params, strict=True):
            s.mul_(d).add_(p.detach().float(), alpha=1.0 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the average; afterwards exactly their own values again."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for s, p in zip(self.shadow, self.params, strict=True):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(saved, self.params, strict=True):
                    p.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=True)):
            raise ValueError("the saved EMA does not match this run's LoRA parameters")
        self.calls = int(state["calls"])
        for s, v in zip(self.shadow, shadow, strict=True):
            s.copy_(v)
