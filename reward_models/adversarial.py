"""``adversarial``: the score of a discriminator that a training method trains while it trains the policy.

Adv-GRPO (Mao et al. 2025, arXiv 2511.20256; spec §6.2) rewards the policy with a discriminator that
learns, during RL, to tell reference images from the policy's samples. The discriminator is the
method's own trainable state (``diffalign/methods/adv_grpo.py``: checkpointed and resumed with the
run), so this reward holds no weights: the method binds its scorer to it when the run starts
(:meth:`Adversarial.bind`). Listing it in ``reward.rewards`` lets the discriminator's score go
through the same combination layer (``reward.combine``, weights), logging and hacking guardrail as
any reward; alone it is ``reward.rewards=[adversarial]``. Outside a run of ``train.method=adv_grpo``
(``diffalign score``, another method, ``eval.rewards``) it is unbound and says so in one line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffalign.errors import DiffalignError
from reward_models.base import Reward
from reward_models.registry import register_reward

Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]


@register_reward("adversarial")
class Adversarial(Reward):
    """The bound discriminator's bounded score of each image (not differentiable: policy-gradient methods only).

    No options; the range is the discriminator's (``adv_grpo.reward``: ``clip`` gives
    ``[-reward_clip, reward_clip]``, ``sigmoid`` ``(0, 1)``), set on :meth:`bind`.
    """

    differentiable = False
    standalone = False
    range = (-float("inf"), float("inf"))

    def __init__(self) -> None:
        super().__init__()
        self._scorer: list[Scorer] = []  # a list: the discriminator is the method's module, not this reward's

    def bind(self, scorer: Scorer, value_range: tuple[float, float]) -> None:
        """Score with ``scorer(images, prompts) -> [B]`` from now on (called by the method that owns it)."""
        self._scorer[:] = [scorer]
        self.range = value_range

    @property
    def bound(self) -> bool:
        return bool(self._scorer)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if not self._scorer:
            raise DiffalignError(
                "reward 'adversarial' is the discriminator that train.method=adv_grpo trains during its run; "
                "use it only in reward.rewards of an adv_grpo run (not in eval.rewards, diffalign score or another method)"
            )
        return self._scorer[0](images, prompts)


__all__ = ["Adversarial"]
