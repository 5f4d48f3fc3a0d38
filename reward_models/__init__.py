"""The reward zoo: ``get_reward("NAME[:key=value,...]")`` -> a :class:`Reward`.

Every reward maps images ``[B, 3, H, W]`` in ``[0, 1]`` and one prompt per image to a ``float32``
tensor ``[B]`` and says whether it is differentiable. See ``reward_models/README.md`` for the table
of rewards and :mod:`reward_models.registry` for the spec grammar.
"""

from reward_models.base import Reward, check_inputs
from reward_models.registry import (
    RewardSpec,
    differentiable_rewards,
    get_reward,
    is_differentiable,
    list_rewards,
    register_reward,
    require_differentiable,
)

__all__ = [
    "Reward",
    "RewardSpec",
    "check_inputs",
    "differentiable_rewards",
    "get_reward",
    "is_differentiable",
    "list_rewards",
    "register_reward",
    "require_differentiable",
]
