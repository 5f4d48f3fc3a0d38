"""``reno(pipe, prompt, rewards, ...)``: ReNO on a diffusers pipeline, the glue of the package.

Builds the rewards and ``L_R`` (:mod:`diffalign.reno.rewards`), the generator ``G`` and the initial
noise ``z0`` (:mod:`diffalign.reno.generator`), and runs the loop (:mod:`diffalign.reno.core`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from diffalign.combine import CombineOptions, build_combiner
from diffalign.errors import DiffalignError
from diffalign.reno.core import RenoConfig, RenoResult, optimize_noise
from diffalign.reno.generator import ensure_lora, initial_noise, make_generator
from diffalign.reno.rewards import RewardLike, build_rewards, calibrate_combiner, make_reward_loss


def reno(
    pipe,
    prompt: str,
    rewards: Sequence[RewardLike],
    weights: Sequence[float] | None = None,
    cfg: RenoConfig | None = None,
    lora: str | Path | None = None,
    latents: torch.Tensor | None = None,
    progress: bool = False,
    combine: str = "weighted",
    combine_options: CombineOptions | None = None,
) -> RenoResult:
    """Optimize the initial noise of ``pipe`` for ``prompt`` against ``rewards`` (ReNO's loop, spec §7.2).

    Args:
        pipe: a diffusers SD / SDXL pipeline (e.g. from :func:`diffalign.pipelines.load_pipeline`);
            weights are not changed. One-step models (SD-Turbo, SDXL-Turbo) with ``num_steps=1``;
            ordinary pipelines with a few steps (and ``guidance_scale > 1`` if they need CFG).
        prompt: the text prompt.
        rewards: differentiable rewards, built (``reward_models.Reward`` or any module with
            ``differentiable`` and ``name``) or as spec strings (built on the pipeline's device).
        weights: one per reward (``L_R = -sum_i w_i r_i``); default: each spec's ``weight=`` or 1.
        cfg: :class:`RenoConfig` (defaults of the paper).
        lora: optional LoRA directory (diffusers format, e.g. written by ``diffalign train``) loaded
            onto ``pipe`` once and kept there.
        latents: initial noise ``z`` ``[1, C, h, w]`` in standard-Gaussian units; default drawn from
            ``cfg.seed`` exactly as the diffusers pipeline draws it.
        progress: show a tqdm bar with the live reward values.
        combine: the combiner of the rewards (:mod:`diffalign.combine`, as ``reward.combine`` in
            training): ``weighted`` (``L_R = -sum_i w_i r_i``), ``uwo`` / ``wco`` / ``ensemble_mean`` over an
            ensemble, ``ctrlu``, ``zscore``, ... (``pareto`` of one image keeps it: a weighted sum).
        combine_options: its :class:`~diffalign.combine.CombineOptions` (UWO's lambda defaults to 0.5
            here); z-scoring combiners calibrate on ``calibration_samples`` images of fresh noises for the
            prompt before the loop.

    Returns a :class:`RenoResult`; the best image minimizes ``L_R`` (the regularizer excluded) over
    all ``cfg.iters`` generated images, iteration 0 (the base sample) included.
    """
    cfg = cfg or RenoConfig()
    if not isinstance(prompt, str) or not prompt.strip():
        raise DiffalignError("reno: the prompt is empty; pass some text")
    from diffalign.pipelines import backbone

    device = backbone(pipe).device
    built, weights, names = build_rewards(rewards, weights, device)
    combiner = build_combiner(combine, names, weights, combine_options, context="reno")
    ensure_lora(pipe, lora)
    generate = make_generator(pipe, prompt, cfg)
    z0 = initial_noise(pipe, cfg) if latents is None else latents.detach().to(device=device, dtype=torch.float32)
    samples = combiner.options.calibration_samples
    calibrate_combiner(combiner, built, names, prompt, generate, z0, samples, cfg.seed + 1)
    reward_loss = make_reward_loss(built, weights, names, prompt, combiner)
    return optimize_noise(generate, reward_loss, z0, cfg, prompt=prompt, progress=progress)
