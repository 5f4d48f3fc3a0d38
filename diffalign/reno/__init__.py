"""ReNO: inference-time reward-based noise optimization (Eyring et al. 2024, arXiv 2406.04312).

No weights are trained. For one prompt, the initial noise ``z`` of a frozen one-step (or few-step)
generator ``G`` is optimized so that the generated image scores higher under differentiable rewards,
while the paper's noise regularization keeps ``z`` on the typical set of a standard Gaussian
(spec §7.1-7.2):

    z* = argmin_z  L_R(G(z, c), c) + lambda * R(z)
    L_R = sum_i w_i * l_i,         l_i = -r_i(G(z, c), c)                      (reward losses)
    R(z) = 0.5 * ||z||^2 - (d - 1) * log ||z||                                (noise-norm regularizer)

Modules (split like training: a loop over callables, the model-specific parts, the CLI):

- :mod:`diffalign.reno.core`: :func:`noise_regularizer`, :class:`RenoConfig`, the records
  (:class:`RenoRecord`, :class:`Best`, :class:`RenoResult`) and :func:`optimize_noise`, the loop
  over a generator callable ``G(z) -> images`` and a reward-loss callable; no pipeline, no reward zoo.
- :mod:`diffalign.reno.generator`: ``G`` from a diffusers pipeline, few-step trailing DDIM
  (:func:`make_generator`, :func:`reno_scheduler`, :func:`noise_scale`, :func:`initial_noise`,
  :func:`conditioning`, :func:`ensure_lora`).
- :mod:`diffalign.reno.rewards`: rewards from the zoo, weights, names, ``L_R`` (:func:`build_rewards`,
  :func:`make_reward_loss`).
- :mod:`diffalign.reno.api`: :func:`reno`, the three above put together for one prompt.
- :mod:`diffalign.reno.cli`: ``diffalign reno`` (:func:`register`, :func:`run`) and its output files.

Python::

    from diffalign.pipelines import load_pipeline
    from diffalign.reno import RenoConfig, reno
    pipe = load_pipeline("stabilityai/sd-turbo", dtype="float16", device="cuda")
    result = reno(pipe, "a red circle", ["clip_score:model=ViT-B-32,pretrained=openai"], None, RenoConfig())
    result.best_image  # [3, H, W] in [0, 1]
"""

from diffalign.reno.api import reno
from diffalign.reno.cli import (
    EPILOG,
    check_out_dir,
    register,
    result_dir_name,
    run,
    save_result,
    strip_image,
    summary_row,
)
from diffalign.reno.core import (
    Best,
    RenoConfig,
    RenoRecord,
    RenoResult,
    make_optimizer,
    noise_regularizer,
    optimize_noise,
)
from diffalign.reno.generator import (
    conditioning,
    ensure_lora,
    initial_noise,
    make_generator,
    noise_scale,
    reno_scheduler,
)
from diffalign.reno.rewards import RewardLike, build_rewards, check_differentiable, make_reward_loss

__all__ = [
    "EPILOG",
    "Best",
    "RenoConfig",
    "RenoRecord",
    "RenoResult",
    "RewardLike",
    "build_rewards",
    "check_differentiable",
    "check_out_dir",
    "conditioning",
    "ensure_lora",
    "initial_noise",
    "make_generator",
    "make_optimizer",
    "make_reward_loss",
    "noise_regularizer",
    "noise_scale",
    "optimize_noise",
    "register",
    "reno",
    "reno_scheduler",
    "result_dir_name",
    "run",
    "save_result",
    "strip_image",
    "summary_row",
]
