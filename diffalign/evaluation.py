"""Held-out evaluation with fixed seeds: proxy rewards, held-out rewards, gold, diversity, a hacking guardrail.

Every evaluation generates one image per (eval prompt, seed) from the same initial noise and sampler
noise each time (a CPU generator per image seeded by seed and prompt index), so records of different
steps compare the same draws (spec §10: "keep a fixed eval prompt set and fixed seeds"). A record in
``eval.jsonl`` holds:

- ``reward`` and ``reward/<name>``: the training rewards (proxy) on the eval images;
- ``heldout/<name>``: the rewards of ``eval.rewards``, never trained on;
- ``gold/accuracy``, ``gold/score``, ``gold/count_acc``, ... : the shapes verifier
  (:func:`diffalign.shapes.verifier.gold_accuracy`), when the eval prompts are shapes captions;
- ``diversity``: mean over prompts of the mean pairwise RMS pixel distance between the images of
  one prompt across seeds (0 = identical images for every seed: mode collapse). Cheap and model-free;
  it measures pixel-space spread, not perceptual (LPIPS) distance;
- ``hacking``: true when the proxy ``reward`` rose since the first evaluation while the guard metric
  (``gold/score``, else the first held-out reward) fell by more than ``eval.hacking_threshold``;
- ``degraded``: true when the guard metric is more than ``eval.degrade_threshold`` below its best evaluation
  so far (``guard/best``, ``guard/best_step``, ``guard/below_best``), whatever the proxy did: a policy that
  collapses (training reward and held-out metric falling together, as a too-high learning rate can make a
  long policy-gradient run do) is not hacking, and the first guard would stay silent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from diffalign.errors import DiffalignError
from diffalign.sampling import sample_differentiable

if TYPE_CHECKING:
    from diffalign.config import EvalConfig, SampleConfig


def pairwise_rms(images: torch.Tensor) -> float:
    """Mean over pairs i < j of the RMS difference between images ``[n, 3, H, W]`` (0 for n < 2)."""
    n = images.shape[0]
    if n < 2:
        return 0.0
    flat = images.reshape(n, -1).double()
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(d.sum() / (n * (n - 1)))


def guard(first: dict[str, Any], record: dict[str, Any], metric: str | None, threshold: float) -> dict[str, Any]:
    """The guardrail fields of ``record`` against ``first`` (see module docstring)."""
    if metric is None or metric not in record or metric not in first:
        return {"hacking": False, "guard/metric": None}
    rise = record["reward"] - first["reward"]
    drop = first[metric] - record[metric]
    return {
        "hacking": bool(rise > 0 and drop > threshold),
        "guard/metric": metric,
        "guard/reward_rise": rise,
        "guard/drop": drop,
    }


def degradation(
    best: dict[str, Any] | None, record: dict[str, Any], metric: str | None, threshold: float
) -> dict[str, Any]:
    """The degradation fields of ``record`` against ``best`` = ``{"step", "value"}``, the best guard metric
    of the evaluations before it (see module docstring); none before the second evaluation."""
    if metric is None or metric not in record or best is None:
        return {"degraded": False}
    below = best["value"] - record[metric]
    return {
        "degraded": bool(below > threshold),
        "guard/best": best["value"],
        "guard/best_step": best["step"],
        "guard/below_best": below,
    }


def generator_seed(seed: int, prompt_index: int) -> int:
    """The seed of the CPU generator of the eval image of prompt ``prompt_index`` and seed ``seed``: its
    initial latents and, with eta > 0, its DDIM noise are drawn from it."""
    return seed * 1_000_003 + prompt_index


def generate_images(
    ctx: Any, prompts: list[str], items: list[tuple[int, int]], eta: float, batch_size: int
) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` (CPU, float32) for (prompt index, seed) pairs, each from its own generator.

    The training sampler's chain without any graph (:func:`diffalign.sampling.sample_differentiable`
    with ``grad_from = T``, i.e. :func:`diffalign.sampling.denoise_step` at every step), from
    :func:`generator_seed`. ``ctx`` gives ``denoiser``, ``sampler``, ``initial_latents`` and ``decode``:
    the trainer's :class:`~diffalign.trainer.Rollout`, or a :class:`PipelineSampler` outside training
    (``diffalign sample --run``, ``diffalign gallery``), which therefore redraw the evaluation images.
    """
    out = []
    sampler = ctx.sampler
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        gens = [torch.Generator().manual_seed(generator_seed(seed, i)) for i, seed in chunk]
        x = ctx.initial_latents(len(chunk), generator=gens)
        z, _ = sample_differentiable(
            ctx.denoiser([prompts[i] for i, _ in chunk]),
            sampler,
            x,
            grad_from=sampler.num_steps,
            eta=eta,
            generator=gens,
            checkpoint=False,
        )
        out.append(ctx.decode(z).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


class PipelineSampler:
    """The trainer's sampling (:class:`~diffalign.trainer.Rollout`'s ``denoiser``, ``initial_latents``,
    ``decode``, ``sampler``) for a pipeline outside training, with a run's ``sample`` settings."""

    def __init__(self, pipe: Any, sample: SampleConfig) -> None:
        from diffalign.pipelines import pipeline_sampler

        self.pipe, self.sample = pipe, sample
        self.sampler = pipeline_sampler(pipe, sample.steps)

    def denoiser(self, prompts: list[str]) -> Any:
        from diffalign.pipelines import backbone, encode_prompts
        from diffalign.sampling import make_denoiser

        guide = self.sample.guidance_scale != 1.0
        cond = encode_prompts(self.pipe, prompts, self.sample.negative_prompt, guidance=guide)
        return make_denoiser(
            backbone(self.pipe),
            guidance_scale=self.sample.guidance_scale,
            guidance_rescale=self.sample.guidance_rescale,
            **cond.denoiser_kwargs(),
        )

    def initial_latents(self, n: int, generator: Any) -> torch.Tensor:
        from diffalign.pipelines import initial_latents

        return initial_latents(self.pipe, n, generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from diffalign.pipelines import decode

        return decode(self.pipe, latents)


class Evaluator:
    """Runs evaluations through the trainer's rollout; remembers the first record for the guardrail."""

    def __init__(
        self,
        cfg: EvalConfig,
        sample: SampleConfig,
        prompts: list[str],
        heldout: dict[str, Any],
        gold: bool,
    ) -> None:
        self.cfg, self.sample, self.prompts = cfg, sample, prompts
        self.heldout, self.gold = heldout, gold
        self.first: dict[str, Any] | None = None
        self.best: dict[str, Any] | None = None  # {"step", "value"}: the best guard metric so far
        self.metric = "gold/score" if gold else (f"heldout/{next(iter(heldout))}" if heldout else None)

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first, self.best = state.get("first"), state.get("best")

    def _generate(self, ctx: Any, items: list[tuple[int, int]]) -> torch.Tensor:
        """Images for (prompt index, seed) pairs (:func:`generate_images`)."""
        eta = self.sample.eta if self.cfg.eta is None else self.cfg.eta
        return generate_images(ctx, self.prompts, items, eta, self.cfg.batch_size)

    @torch.no_grad()
    def evaluate(
        self, ctx: Any, step: int, extra: Callable[[Any, torch.Tensor, list[str]], dict[str, float]] | None = None
    ) -> tuple[dict[str, Any] | None, torch.Tensor]:
        """One evaluation; returns (record on the main process else None, this process's images).

        ``extra(ctx, images, prompts)`` (the method's :meth:`~diffalign.methods.base.Method.eval_stats`) adds
        its numbers to the record, averaged over the processes that had images."""
        from accelerate.utils import gather_object

        start = time.perf_counter()
        seeds = list(self.cfg.seeds)
        mine = list(range(ctx.process_index, len(self.prompts), ctx.num_processes))
        items = [(i, s) for i in mine for s in seeds]
        images = self._generate(ctx, items) if items else torch.zeros(0)
        rows: list[dict[str, float]] = []
        per_prompt: list[float] = []
        if items:
            prompts = [self.prompts[i] for i, _ in items]
            combined, parts = ctx.score(images, prompts)
            cols = {"reward": combined} | {f"reward/{k}": v for k, v in parts.items()}
            for name, reward in self.heldout.items():
                cols[f"heldout/{name}"] = reward(images.to(ctx.device), prompts).float()
            if self.gold:
                from diffalign.shapes.verifier import verify_batch

                verdicts = verify_batch(images, prompts)
                cols["gold/accuracy"] = torch.tensor([float(v.correct) for v in verdicts])
                cols["gold/score"] = torch.tensor([float(v.score) for v in verdicts])
                cols["gold/count_acc"] = torch.tensor([float(v.count_ok) for v in verdicts])
                cols["gold/color_acc"] = torch.tensor([float(v.color_ok) for v in verdicts])
                cols["gold/shape_acc"] = torch.tensor([float(v.shape_ok) for v in verdicts])
            cols = {k: v.detach().float().cpu().tolist() for k, v in cols.items()}
            rows = [{k: cols[k][n] for k in cols} for n in range(len(items))]
            per_prompt = [pairwise_rms(images[j : j + len(seeds)]) for j in range(0, len(items), len(seeds))]
            added = [extra(ctx, images, prompts)] if extra is not None else []
        else:
            added = []
        rows = gather_object(rows)
        per_prompt = gather_object(per_prompt)
        added = [a for a in gather_object(added) if a]
        if not ctx.is_main_process:
            return None, images
        record: dict[str, Any] = {"step": step, "n_images": len(rows)}
        for key in rows[0]:
            record[key] = sum(r[key] for r in rows) / len(rows)
        record["diversity"] = sum(per_prompt) / len(per_prompt)
        for key in added[0] if added else {}:
            record[key] = sum(a[key] for a in added) / len(added)
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise DiffalignError(f"evaluation at step {step}: {bad[0]} is NaN or infinite; check that reward")
        if self.first is None:
            self.first = dict(record)
        record |= guard(self.first, record, self.metric, self.cfg.hacking_threshold)
        record |= degradation(self.best, record, self.metric, self.cfg.degrade_threshold)
        if self.metric in record and (self.best is None or record[self.metric] > self.best["value"]):
            self.best = {"step": step, "value": record[self.metric]}
        record["time"] = {"seconds": time.perf_counter() - start}
        return record, images
