"""D3PO: per-step DPO on pairs of denoising trajectories (Yang et al. 2023, arXiv 2311.13231; spec §5.1).

``d3po`` (online, preferences from the training rewards): per sampling batch, each of this process's
prompts is sampled twice from one shared initial latent x_T with independent per-step noise
(:func:`diffalign.rollouts.collect` with ``share_noise=2``; ``sample.eta > 0``), the pair is scored and the
preference ``h = (+1, -1)``, ``(-1, +1)`` or ``(0, 0)`` (tie) is read from the combined reward signal
(``preference: reward``) or, with several rewards, from Pareto dominance (``preference: dominance``).

``d3po_human`` (offline, preferences from people): trains on the pairs of a labelled JSONL in
``data.train``, ``{"prompt", "image_a", "image_b", "trajectory", "choice"}`` with ``choice`` one of
``a``, ``b``, ``tie`` (``diffalign prefs --pairs`` samples the pairs and saves their trajectories,
``diffalign label`` records the choices), as the reference's human-feedback script trains on saved samples.

Both then train, for every pair and every trained step k (the same random subset of steps for both
members: :func:`diffalign.rollouts.timestep_subsample` with ``pair_with``)::

    L_k = -mean_pairs log sigma( beta * (h^a log rho^a_k + h^b log rho^b_k) ),
    rho_k = clamp(exp(logp_theta(x_{k+1} | x_k, c) - logp_ref(x_{k+1} | x_k, c)), 1 - eps, 1 + eps)

(:func:`diffalign.methods.dpo_loss.d3po_loss`), the reference being the same UNet with the LoRA disabled
(``ctx.reference()``), both recomputed with the sampling guidance on the stored transitions; one backward
per trained step, an optimizer update every ``train.gradient_accumulation_steps`` minibatches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from diffalign.datasets import DatasetBatch
from diffalign.errors import DiffalignError
from diffalign.methods.base import Method, PromptBatch, StepContext, StepResult, backward_denoisers
from diffalign.methods.dpo_loss import d3po_loss, preference_from_rewards
from diffalign.methods.registry import MethodEntry, register_method
from diffalign.rollouts import Collected, collect, timestep_subsample
from diffalign.sampling import Sampler, denoise_step

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig, SampleConfig, TrainConfig

CHOICES = {"a": 1, "b": -1, "tie": 0}  # a labelled pair's choice -> preference of member a


@dataclass
class D3POConfig:
    """The ``d3po:`` section; names as yk7333/d3po's ``config/base.py`` has them (docs/training.md)."""

    beta: float = 0.1  # DPO temperature (train.beta)
    eps: float = 0.1  # the ratio clamp [1 - eps, 1 + eps] (train.eps)
    preference: Literal["reward", "dominance"] = "reward"  # d3po: combined reward signal, or Pareto dominance
    timestep_fraction: float = 1.0  # fraction of the T steps trained per pair (train.timestep_fraction)
    shuffle_timesteps: bool = True  # a random subset of steps per pair (d3po); false: steps 0..K-1 (as grpo's)
    inner_epochs: int = 1  # passes over each step's pairs (train.num_inner_epochs)
    train_batch_size: int = 1  # pairs per minibatch, per process (train.batch_size)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise DiffalignError(f"d3po.beta must be > 0, got {self.beta}")
        if not 0 < self.eps < 1:
            raise DiffalignError(f"d3po.eps must be in (0, 1) (the clamp is [1 - eps, 1 + eps]), got {self.eps}")
        if self.preference not in ("reward", "dominance"):
            raise DiffalignError(f"d3po.preference must be 'reward' or 'dominance', got {self.preference!r}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise DiffalignError(f"d3po.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.inner_epochs < 1 or self.train_batch_size < 1:
            raise DiffalignError("d3po.inner_epochs and d3po.train_batch_size must be >= 1")


@dataclass
class Pairs:
    """Pairs of trajectories: ``latents`` [2P, T+1, ...] with members a, b at rows 2k, 2k+1; ``timesteps`` [T];
    ``prompts`` 2P strings; ``preference`` [P] in {+1, -1, 0} (+1: a preferred)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    prompts: list[str]
    preference: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.latents.shape[0] // 2


class D3PO(Method):
    """Online D3PO: shared-noise pairs from the current model, preferences from the training rewards."""

    name = "d3po"
    needs_differentiable_reward = False

    def __init__(self, cfg: D3POConfig, sample: SampleConfig, train: TrainConfig) -> None:
        self.cfg, self.sample, self.train = cfg, sample, train

    def batches_per_step(self) -> int:
        return self.sample.num_batches

    def pairs_per_step(self) -> int:
        return self.sample.num_batches * self.sample.batch_size

    def updates_per_step(self) -> int:
        minibatches = self.pairs_per_step() // self.cfg.train_batch_size
        return self.cfg.inner_epochs * (minibatches // self.train.gradient_accumulation_steps)

    # 1. pairs from one shared x_T each, scored
    def collect(self, ctx: StepContext, batches: list[PromptBatch], sampler: Sampler) -> tuple[Collected, Pairs]:
        """Sample every batch's local prompts twice from a shared initial latent; label each pair."""
        parts = []
        for b, batch in enumerate(batches):
            n, total = len(batch.local), len(batch.everyone)
            start = b * total + ctx.process_index * n
            prompts = [p for p in batch.local for _ in range(2)]
            ids = [start + i for i in range(n) for _ in range(2)]
            parts.append(collect(ctx, prompts, ids, self.sample.eta, share_noise=2, sampler=sampler))
        rollout = Collected.cat(parts)
        traj = rollout.trajectories
        if self.cfg.preference == "dominance":
            values = torch.stack([traj.rewards[k].float() for k in sorted(traj.rewards)], dim=1)
            pref = preference_from_rewards(None, None, values[0::2], values[1::2])
        else:
            pref = preference_from_rewards(traj.reward[0::2].float(), traj.reward[1::2].float())
        return rollout, Pairs(traj.latents, traj.timesteps, traj.prompts, pref.cpu())

    # 2. per-step DPO against the reference
    def train_pairs(self, ctx: StepContext, pairs: Pairs, sampler: Sampler) -> dict[str, Any]:
        """``inner_epochs`` passes over minibatches of ``train_batch_size`` pairs (module docstring). The pair
        order (``torch.randperm``) and the steps trained (one permutation per pair) come from ``ctx.generator``."""
        cfg, eta = self.cfg, self.sample.eta
        p, tb, accum = pairs.num_pairs, cfg.train_batch_size, self.train.gradient_accumulation_steps
        num_steps = pairs.latents.shape[1] - 1
        owners = torch.arange(2 * p) // 2 * 2
        losses: list[float] = []
        stats: list[dict[str, torch.Tensor]] = []
        norms: list[float] = []
        for _ in range(cfg.inner_epochs):
            order = torch.randperm(p, generator=ctx.generator)
            steps = timestep_subsample(
                2 * p, num_steps, cfg.timestep_fraction, ctx.generator, pair_with=owners, shuffle=cfg.shuffle_timesteps
            ).cpu()
            for m in range(p // tb):
                idx = order[m * tb : (m + 1) * tb]
                rows = torch.stack([2 * idx, 2 * idx + 1], dim=1).reshape(-1)  # a0 b0 a1 b1 ...
                prompts = [pairs.prompts[i] for i in rows.tolist()]
                pref = pairs.preference[idx].to(pairs.latents.device)
                k = steps.shape[1]
                transitions = []
                for j in range(k):
                    ks = steps[rows, j]
                    transitions.append((pairs.latents[rows, ks], pairs.latents[rows, ks + 1], pairs.timesteps[ks]))
                with torch.no_grad(), ctx.reference():
                    ref_denoise = ctx.denoiser(prompts)
                    refs = [
                        denoise_step(ref_denoise, sampler, x, t, eta, prev_sample=xp).log_prob
                        for x, xp, t in transitions
                    ]
                nets = backward_denoisers(ctx, prompts, len(transitions))
                for (x, xp, t), ref, denoise in zip(transitions, refs, nets, strict=True):
                    logp = denoise_step(denoise, sampler, x, t, eta, prev_sample=xp).log_prob
                    loss, st = d3po_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], pref, cfg.beta, cfg.eps)
                    ctx.backward(loss / (k * accum))
                    losses.append(float(loss.detach()))
                    stats.append(st)
                if (m + 1) % accum == 0:
                    norms.append(ctx.optimizer_step())
        out = {key: sum(float(s[key]) for s in stats) / max(len(stats), 1) for key in (stats[0] if stats else {})}
        out["tie_fraction"] = float((pairs.preference == 0).float().mean())
        return {"loss": sum(losses) / max(len(losses), 1), "norms": norms, "stats": out}

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        sampler = ctx.sampler
        rollout, pairs = self.collect(ctx, batches, sampler)
        res = self.train_pairs(ctx, pairs, sampler)
        traj = rollout.trajectories
        gap = (traj.reward[0::2] - traj.reward[1::2]).abs().float().mean()
        return StepResult(
            loss=res["loss"],
            rewards=traj.rewards,
            reward=traj.reward,
            grad_norm=sum(res["norms"]) / max(len(res["norms"]), 1),
            updates=len(res["norms"]),
            stats={**res["stats"], "pair_reward_gap": float(gap), **rollout.stats},
            images=rollout.images[-2 * len(batches[-1].local) :],
        )


# ------------------------------------------------------------------------------ human-labelled pairs
def load_trajectory(path: Path) -> dict[str, torch.Tensor]:
    """A pair's saved trajectory (``diffalign prefs --pairs``): ``latents`` [2, T+1, C, h, w], ``timesteps`` [T]."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "latents" not in data or "timesteps" not in data:
        raise ValueError("not a diffalign pair trajectory (needs 'latents' and 'timesteps')")
    lat, ts = data["latents"], data["timesteps"]
    if lat.ndim < 3 or lat.shape[0] != 2 or ts.shape != (lat.shape[1] - 1,):
        raise ValueError(f"latents {tuple(lat.shape)} and timesteps {tuple(ts.shape)} are not a pair of T-step chains")
    return data


def parse_choice(value: Any) -> int | None:
    """``a`` / ``b`` / ``tie`` (any case) -> +1 / -1 / 0; anything else None."""
    return CHOICES.get(value.strip().lower()) if isinstance(value, str) else None


class D3POHuman(D3PO):
    """Offline D3PO on human-labelled pairs of ``data.train`` (module docstring); the stream is checkpointed."""

    name = "d3po_human"
    uses_dataset = True
    dataset_images = ("image_a", "image_b")

    def batches_per_step(self) -> int:
        return 1

    def pairs_per_step(self) -> int:
        return self.sample.batch_size

    def check_dataset(self, dataset: Any) -> None:
        """Every record needs ``choice`` in a / b / tie and a ``trajectory`` file of ``sample.steps`` steps
        (path relative to the JSONL file); the paths are kept for :meth:`collect`."""
        self.paths: list[Path] = []
        for record in dataset.records:
            where = f"data.train: {dataset.path} line {record.line}"
            choice = record.data.get("choice")
            if parse_choice(choice) is None:
                raise DiffalignError(
                    f"{where}: 'choice' must be one of {', '.join(CHOICES)}, got {json.dumps(choice)} "
                    "(diffalign label writes these)"
                )
            name = record.data.get("trajectory")
            if not isinstance(name, str) or not name.strip():
                raise DiffalignError(
                    f"{where}: no 'trajectory' (the pair's saved latents, written by diffalign prefs --pairs); "
                    "d3po_human trains on the stored chains"
                )
            path = Path(name).expanduser()
            path = path if path.is_absolute() else dataset.path.parent / path
            if not path.is_file():
                raise DiffalignError(
                    f"{where}: trajectory {path} does not exist (paths are relative to the JSONL file)"
                )
            try:
                data = load_trajectory(path)
            except Exception as err:  # noqa: BLE001  (a damaged file of any kind: one line naming it)
                raise DiffalignError(f"{where}: cannot read trajectory {path} ({type(err).__name__}: {err})") from None
            steps = data["timesteps"].shape[0]
            if steps != self.sample.steps:
                raise DiffalignError(
                    f"{where}: trajectory {path} has {steps} steps but sample.steps is {self.sample.steps}; train with "
                    f"sample.steps={steps} (the sampler that rescored the steps must match the one that drew them)"
                )
            self.paths.append(path)

    def collect(self, ctx: StepContext, batches: list[PromptBatch], sampler: Sampler) -> tuple[Any, Pairs]:
        """The batch's labelled pairs: their stored chains (checked by :meth:`check_dataset`) and choices."""
        batch = batches[0]
        if not isinstance(batch, DatasetBatch):
            raise RuntimeError("d3po_human trains from data.train records (DatasetBatch), got prompts")
        latents, prompts, prefs, timesteps = [], [], [], None
        for index, record in zip(batch.indices, batch.records, strict=True):
            data = load_trajectory(self.paths[index])
            latents.append(data["latents"].float())
            timesteps = data["timesteps"] if timesteps is None else timesteps
            prompts += [record.prompt, record.prompt]
            prefs.append(parse_choice(record.data["choice"]))
        lat = torch.cat(latents).to(ctx.device)
        return batch, Pairs(lat, timesteps.to(lat.device), prompts, torch.tensor(prefs, dtype=torch.long))

    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        sampler = ctx.sampler
        batch, pairs = self.collect(ctx, batches, sampler)
        res = self.train_pairs(ctx, pairs, sampler)
        with torch.no_grad():
            images = torch.cat([batch.images["image_a"], batch.images["image_b"]]).to(ctx.device)
            n = len(batch.local)
            signal, parts = ctx.rewards(images, list(batch.local) * 2)
        # the reward's own preference vs the people's: agreement over the decided pairs
        agree = preference_from_rewards(signal[:n].float(), signal[n:].float()).cpu() == pairs.preference
        decided = pairs.preference != 0
        stats = {**res["stats"], "reward_agreement": float(agree[decided].float().mean()) if decided.any() else 0.0}
        return StepResult(
            loss=res["loss"],
            rewards={k: v.detach() for k, v in parts.items()},
            reward=signal.detach(),
            grad_norm=sum(res["norms"]) / max(len(res["norms"]), 1),
            updates=len(res["norms"]),
            stats=stats,
            images=images,
        )


# ---------------------------------------------------------------------------------------- registry
def validate_d3po(cfg: DiffalignConfig) -> None:
    """D3PO: eta > 0 (log-probs), whole minibatches of pairs and whole updates per inner epoch."""
    s, d, accum = cfg.sample, cfg.method_config, cfg.train.gradient_accumulation_steps
    method = cfg.train.method
    if s.eta <= 0:
        raise DiffalignError(
            f"{method} needs sample.eta > 0 (each step must be a Gaussian policy; log-probs are undefined for eta = 0); "
            "set sample.eta=1.0 (evaluate at eta 0 with eval.eta)"
        )
    if method == "d3po_human" and s.num_batches != 1:
        raise DiffalignError(
            "sample.num_batches is for online methods; d3po_human trains sample.batch_size labelled pairs per step: "
            "leave sample.num_batches at 1"
        )
    pairs = s.batch_size * (s.num_batches if method == "d3po" else 1)
    what = "sample.batch_size x sample.num_batches" if method == "d3po" else "sample.batch_size"
    if pairs % d.train_batch_size:
        raise DiffalignError(
            f"{method}: pairs per step per process ({what} = {pairs}) must be divisible by d3po.train_batch_size "
            f"({d.train_batch_size})"
        )
    if (pairs // d.train_batch_size) % accum:
        raise DiffalignError(
            f"{method}: {pairs // d.train_batch_size} minibatches per inner epoch is not divisible by "
            f"train.gradient_accumulation_steps ({accum}); an update would be lost"
        )


register_method(MethodEntry("d3po", D3PO, D3POConfig, "d3po", False, validate_d3po))
register_method(MethodEntry("d3po_human", D3POHuman, D3POConfig, "d3po", False, validate_d3po))
