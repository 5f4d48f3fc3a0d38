"""Shared on-policy rollouts: groups of samples per prompt, advantages, step subsampling, paired noise.

Pure functions over tensors (no trainer, no model, no devices chosen here), plus the one rollout
collector :func:`collect` over a :class:`~diffalign.methods.base.StepContext`, that DDPO, GRPO, PRDP,
D3PO and Adv-GRPO stand on (DESIGN.md, "Shared on-policy rollouts"; spec ../shared/specs/algorithms.md
§2, §4, §5.1, §6):

- :func:`grouped_prompts` lays out G samples per prompt so that a group never straddles processes and
  gives every sample the global id of its group;
- :func:`local_share` takes this process's rows back out of a gathered tensor;
- :func:`group_advantages` turns the gathered rewards into group-relative advantages (GRPO);
- :func:`timestep_subsample` draws the trained steps of each trajectory (DDPO / Flow-GRPO
  ``timestep_fraction``), with one permutation shared by the two trajectories of a pair (D3PO, PRDP);
- :class:`Trajectories` is what a rollout collects, with ``select`` for minibatches;
- :func:`collect` samples one batch of trajectories under theta_old through the context (optionally
  from shared initial noise for pairs), scores them and gathers the rewards and group ids
  (:class:`Collected`); :func:`groups_on_one_process` and :func:`zero_std_fraction` check and
  describe the gathered groups.

Layout over processes. accelerate's ``gather`` concatenates per-process tensors in process order, so
with P processes holding n samples each, rows ``p*n .. p*n+n-1`` of a gathered tensor belong to
process p. Everything here assumes that layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal

import torch

from diffalign.sampling import Sampler, make_sampler, sample_trajectory

if TYPE_CHECKING:
    from diffalign.methods.base import StepContext

Index = torch.Tensor | Sequence[int] | slice


# ------------------------------------------------------------------------------------- advantages
def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std: Literal["group", "global"] = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, arXiv 2402.03300, Sec. 4.1.2, "outcome
    supervision"; Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, its group-relative advantage; spec §6.1
    "Advantages (GRPO)")::

        A_i = (r_i - mean_{j in g(i)} r_j) / (s + eps)

    ``s`` is the population standard deviation (``unbiased=False``, numpy's default ``ddof=0``, as
    flow_grpo's ``stat_tracking.py`` computes it) of the rewards of the group g(i) (``std="group"``)
    or of all N rewards (``std="global"``; DanceGRPO, and Flow-GRPO with ``global_std=True``, which
    is what every shipped Flow-GRPO config uses). ``eps = 1e-4`` is Flow-GRPO's constant.

    Every sample of a group whose rewards are all equal (zero variance, in particular a group of one)
    gets exactly 0 (never NaN, even with ``eps=0``); equal rewards inside a group get equal
    advantages. ``group_ids`` are arbitrary integers (not necessarily contiguous). Computed in
    float64, returned in the dtype of ``rewards``. No advantage clipping here (clamp to
    ``±adv_clip_max`` afterwards, as spec §2.2 / §6.1 do).
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(rewards.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.numel() == 0:
        return rewards.clone()
    r = rewards.detach().double()
    _, inverse = torch.unique(group_ids.to(r.device), return_inverse=True)
    num_groups = int(inverse.max()) + 1
    count = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, inverse, r) / count
    centered = r - mean[inverse]
    if std == "group":
        var = torch.zeros_like(count).index_add_(0, inverse, centered**2) / count
        scale = var.sqrt()[inverse]
    else:
        scale = r.std(unbiased=False).expand_as(r)
    # a constant group: exactly 0, not round-off of (r - mean) nor 0 / 0
    lo = torch.full_like(count, float("inf")).scatter_reduce_(0, inverse, r, reduce="amin")
    hi = torch.full_like(count, float("-inf")).scatter_reduce_(0, inverse, r, reduce="amax")
    constant = (lo == hi)[inverse]
    adv = torch.where(constant, torch.zeros_like(r), centered / (scale + eps))
    return adv.to(rewards.dtype)


# --------------------------------------------------------------------------------- process layout
def local_share(gathered: torch.Tensor, process_index: int, num_processes: int, batches: int = 1) -> torch.Tensor:
    """This process's rows of a tensor gathered over ``num_processes`` processes.

    accelerate's ``gather`` concatenates the per-process tensors (n rows each) along dim 0 in process
    order, so process p owns rows ``[p*n, (p+1)*n)``. ``batches > 1``: ``gathered`` is the
    concatenation of that many such gathers of equal size (one per sampling batch of a step, as
    :meth:`Collected.cat` builds it); the result is this process's rows of each, concatenated in batch
    order, i.e. the row order of the process's own concatenated samples. Raises ValueError when the
    row count does not divide by ``batches * num_processes`` or the index is out of range.
    """
    if num_processes < 1 or batches < 1:
        raise ValueError(f"num_processes and batches must be >= 1, got {num_processes} and {batches}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
    if gathered.ndim == 0 or gathered.shape[0] % (num_processes * batches):
        size = tuple(gathered.shape)
        raise ValueError(
            f"a gathered tensor of shape {size} does not split into {batches} batch(es) of {num_processes} equal shares"
        )
    n = gathered.shape[0] // (num_processes * batches)
    if batches == 1:
        return gathered[process_index * n : (process_index + 1) * n]
    per_batch = n * num_processes
    return torch.cat(
        [gathered[b * per_batch + process_index * n : b * per_batch + (process_index + 1) * n] for b in range(batches)]
    )


def groups_on_one_process(gathered_group_ids: torch.Tensor, num_processes: int, batches: int = 1) -> bool:
    """Whether every group of a gathered id tensor lies within one process's rows (and one batch).

    ``gathered_group_ids`` is laid out as :func:`local_share` describes (``batches`` gathers of
    ``num_processes`` equal shares). True when no id occurs in two different (batch, process) shares:
    GRPO's groups must never straddle processes (:func:`grouped_prompts`), so that every process can
    sample a whole group with its own noise and the group's statistics need only the gathered rewards.
    """
    ids = gathered_group_ids.detach().cpu().long().reshape(-1)
    if ids.numel() % (num_processes * batches):
        raise ValueError(f"{ids.numel()} ids do not split into {batches} x {num_processes} equal shares")
    shares = ids.reshape(batches * num_processes, -1)
    owner: dict[int, int] = {}
    for share, row in enumerate(shares.tolist()):
        for gid in row:
            if owner.setdefault(gid, share) != share:
                return False
    return True


def zero_std_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """The fraction of groups whose rewards are all equal (zero variance: every advantage is exactly 0,
    so the group gives no policy gradient; spec §6.1 "Advantages", Flow-GRPO drops such samples)."""
    if rewards.numel() == 0:
        return 0.0
    r = rewards.detach().double().cpu().reshape(-1)
    _, inverse = torch.unique(group_ids.detach().cpu().reshape(-1), return_inverse=True)
    num_groups = int(inverse.max()) + 1
    lo = torch.full((num_groups,), float("inf"), dtype=r.dtype).scatter_reduce_(0, inverse, r, reduce="amin")
    hi = torch.full((num_groups,), float("-inf"), dtype=r.dtype).scatter_reduce_(0, inverse, r, reduce="amax")
    return float((lo == hi).double().mean())


def grouped_prompts(
    prompts: list[str], group_size: int, num_processes: int, process_index: int
) -> tuple[list[str], list[int]]:
    """This process's samples for one step of G samples per prompt, and the global group id of each.

    ``prompts`` is the global list of M prompts of the step (the same list on every process, M
    divisible by P = ``num_processes``). Process p takes the contiguous block of m = M / P prompts
    ``prompts[p*m : (p+1)*m]`` and repeats each one G = ``group_size`` times in a row, so a group
    never straddles processes::

        process 0: [q_0]*G + [q_1]*G + ... + [q_{m-1}]*G      ids [0]*G + [1]*G + ... + [m-1]*G
        process 1: [q_m]*G + ...                               ids [m]*G + ...

    The id of a sample is the position of its prompt in the global list. Gathering the ids of all
    processes (concatenation in process order) gives ``[0]*G + [1]*G + ... + [M-1]*G``: one id per
    group, unique over processes, the layout that :func:`group_advantages` and :func:`local_share`
    expect. Ids name slots, not strings: a prompt listed twice forms two groups.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
    if len(prompts) % num_processes:
        raise ValueError(f"{len(prompts)} prompts do not split into {num_processes} equal shares")
    m = len(prompts) // num_processes
    start = process_index * m
    local = [p for p in prompts[start : start + m] for _ in range(group_size)]
    ids = [start + j for j in range(m) for _ in range(group_size)]
    return local, ids


# ----------------------------------------------------------------------------------- subsampling
def timestep_subsample(
    num_trajectories: int,
    num_steps: int,
    fraction: float,
    generator: torch.Generator,
    pair_with: torch.Tensor | None = None,
    *,
    shuffle: bool = True,
) -> torch.Tensor:
    """Indices [N, K] of the sampling steps each trajectory trains on, K = max(1, int(T * fraction)).

    DDPO (spec §2.2, ``timestep_fraction``; ddpo-pytorch permutes the step axis of every trajectory
    independently and trains the first ``int(T * fraction)`` entries): row i holds the first K entries
    of a uniformly random permutation of ``0..T-1`` drawn for trajectory i, so the entries of a row
    are distinct. ``shuffle=False`` gives every row ``0..K-1`` instead (Flow-GRPO, spec §6.1: steps
    trained in order, so with fraction 0.99 of T = 10 the last step is never trained).

    ``pair_with[i] = j`` makes trajectory i use trajectory j's permutation (both members of a D3PO or
    PRDP pair train the same timestep, spec §5.1); an owner points at itself
    (``pair_with[j] = j``), so pairs (2k, 2k+1) are ``pair_with = [0, 0, 2, 2, ...]``. Chains are
    rejected (ValueError): every target must be its own owner.

    Deterministic given the state of ``generator``, which advances by N*T uniform draws with
    ``shuffle=True`` (paired or not) and not at all with ``shuffle=False``. Returned on the
    generator's device, dtype long.
    """
    if num_trajectories < 0 or num_steps < 1:
        raise ValueError(f"need num_trajectories >= 0 and num_steps >= 1, got {num_trajectories}, {num_steps}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, int(num_steps * fraction))
    device = generator.device
    if shuffle:  # argsort of i.i.d. uniforms: a uniformly random permutation per row
        perms = torch.argsort(torch.rand(num_trajectories, num_steps, generator=generator, device=device), dim=1)
    else:
        perms = torch.arange(num_steps, device=device).expand(num_trajectories, num_steps)
    if pair_with is not None:
        pair_with = torch.as_tensor(pair_with, device=device)
        if pair_with.shape != (num_trajectories,) or pair_with.dtype.is_floating_point or pair_with.dtype == torch.bool:
            raise ValueError(f"pair_with must be an integer tensor of shape [{num_trajectories}]")
        if num_trajectories and (pair_with.min() < 0 or pair_with.max() >= num_trajectories):
            raise ValueError("pair_with entries must index trajectories 0..N-1")
        if not torch.equal(pair_with[pair_with], pair_with):
            raise ValueError("pair_with must point at owners (pair_with[pair_with[i]] == pair_with[i])")
        perms = perms[pair_with.long()]
    return perms[:, :k].contiguous()


# ---------------------------------------------------------------------------------- trajectories
@dataclass
class Trajectories:
    """What an on-policy rollout collects for N samples of T steps (spec §1.5).

    latents      [N, T+1, ...]  x_T ... x_0; ``latents[:, k]`` is the state before step k, ``[:, k+1]`` after
    log_probs    [N, T]         log pi_old(x_{k+1} | x_k, c) at sampling time (no grad, mean-reduced, spec §1.2)
    timesteps    [T] or [N, T]  the diffusion timestep of each step (shared, or per sample)
    prompts      N strings      the prompt of each sample
    prompt_keys  N strings      the key prompts are grouped / tracked by (DDPO: decoded tokenizer output)
    group_ids    [N] long       global group id of each sample (see :func:`grouped_prompts`)
    rewards      name -> [N]    each reward's values
    reward       [N]            the combined reward signal (``reward.combine``)
    advantages   [N] or None    filled in by the method once computed over the gathered batch
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    prompts: list[str]
    prompt_keys: list[str]
    group_ids: torch.Tensor
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)
    reward: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        steps = self.log_probs.shape[1] if self.log_probs.ndim == 2 else -1
        if self.log_probs.shape != (n, steps) or self.latents.ndim < 2 or self.latents.shape[1] != steps + 1:
            raise ValueError(
                f"need latents [N, T+1, ...] and log_probs [N, T], got {tuple(self.latents.shape)} and "
                f"{tuple(self.log_probs.shape)}"
            )
        if self.timesteps.shape not in ((steps,), (n, steps)):
            raise ValueError(
                f"timesteps must be [T] or [N, T] with N={n}, T={steps}, got {tuple(self.timesteps.shape)}"
            )
        if len(self.prompts) != n or len(self.prompt_keys) != n or self.group_ids.shape != (n,):
            raise ValueError(f"prompts, prompt_keys and group_ids must have N={n} entries")
        for name, value in [*self.rewards.items(), ("reward", self.reward), ("advantages", self.advantages)]:
            if value is not None and value.shape[:1] != (n,):
                raise ValueError(f"{name} must have N={n} rows, got shape {tuple(value.shape)}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def select(self, index: Index) -> Trajectories:
        """The sub-batch of the given samples (a list / long tensor of indices, a bool mask or a slice)."""
        if isinstance(index, slice):
            rows = torch.arange(len(self))[index]
        else:
            rows = torch.as_tensor(index)
            if rows.dtype == torch.bool:
                if rows.shape != (len(self),):
                    raise ValueError(f"a mask must have shape [{len(self)}], got {tuple(rows.shape)}")
                rows = rows.nonzero().flatten()
            rows = rows.long().cpu().reshape(-1)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows.to(t.device)]

        ids = rows.tolist()
        return Trajectories(
            latents=take(self.latents),
            log_probs=take(self.log_probs),
            timesteps=self.timesteps if self.timesteps.ndim == 1 else take(self.timesteps),
            prompts=[self.prompts[i] for i in ids],
            prompt_keys=[self.prompt_keys[i] for i in ids],
            group_ids=take(self.group_ids),
            rewards={k: take(v) for k, v in self.rewards.items()},
            reward=take(self.reward),
            advantages=take(self.advantages),
        )

    @classmethod
    def cat(cls, parts: Sequence[Trajectories]) -> Trajectories:
        """Concatenate rollouts (e.g. several sampling batches of one step) along the sample axis.

        Shared [T] timesteps must be equal in every part; per-sample ones are concatenated. Optional
        tensors (``reward``, ``advantages``) must be present in all parts or in none.
        """
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        out: dict = {}
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if f.name in ("prompts", "prompt_keys"):
                out[f.name] = [s for v in values for s in v]
            elif f.name == "rewards":
                names = set(first.rewards)
                if any(set(v) != names for v in values):
                    raise ValueError("every part must carry the same rewards")
                out[f.name] = {k: torch.cat([v[k] for v in values]) for k in first.rewards}
            elif f.name == "timesteps" and first.timesteps.ndim == 1:
                if any(v.ndim != 1 or not torch.equal(v, first.timesteps) for v in values):
                    raise ValueError("parts with shared [T] timesteps must have the same timesteps")
                out[f.name] = first.timesteps
            elif all(v is None for v in values):
                out[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"{f.name} is set in some parts only")
            else:
                out[f.name] = torch.cat(values)
        return cls(**out)


# ---------------------------------------------------------------------------------- collection
@dataclass
class Collected:
    """One rollout of a step (or several, concatenated): this process's trajectories and the gathered values.

    trajectories        this process's N samples (:class:`Trajectories` with ``rewards`` and ``reward`` set)
    gathered_reward     [P*N] combined reward signal of all processes' samples (CPU), process order per batch
    gathered_group_ids  [P*N] the group id of each of them (CPU), same layout
    images              [N, 3, H, W] this process's decoded images in [0, 1]
    batches             how many sampling batches were concatenated (the layout of the gathered
                        tensors, see :func:`local_share`)
    gathered_rewards    name -> [P*N] each reward's values, same layout
    gathered_weights    [P*N] the combiner's per-sample weights (selection mask x weight), or None when
                        every sample counts fully (:meth:`diffalign.combine.Combined.sample_weights`)
    stats               the combiner's statistics (means over the concatenated batches)
    """

    trajectories: Trajectories
    gathered_reward: torch.Tensor
    gathered_group_ids: torch.Tensor
    images: torch.Tensor
    batches: int = 1
    gathered_rewards: dict[str, torch.Tensor] = field(default_factory=dict)
    gathered_weights: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_processes(self) -> int:
        """P: the gathered rows per local row."""
        return self.gathered_reward.shape[0] // max(len(self.trajectories), 1)

    def local(self, gathered: torch.Tensor, process_index: int) -> torch.Tensor:
        """This process's rows of a tensor laid out like :attr:`gathered_reward` (e.g. advantages)."""
        return local_share(gathered, process_index, self.num_processes, self.batches)

    def local_weights(self, process_index: int) -> torch.Tensor | None:
        """This process's rows of :attr:`gathered_weights` (the combiner's mask x weight), or None without them."""
        w = self.gathered_weights
        return None if w is None else self.local(w, process_index)

    def weighted_advantages(self, advantages: torch.Tensor) -> torch.Tensor:
        """Gathered advantages [P*N] times the combiner's per-sample weights: a sample outside the
        selected set (Parrot's P) gets advantage exactly 0, so it adds nothing to the policy gradient
        (spec §8.6); Ctrl-U's exp(-U) scales a sample's advantage. Unchanged without weights."""
        if self.gathered_weights is None:
            return advantages
        return advantages * self.gathered_weights.to(advantages.device, advantages.dtype)

    @classmethod
    def cat(cls, parts: Sequence[Collected]) -> Collected:
        """Concatenate the sampling batches of one step (equal sizes): trajectories and images along the
        sample axis, the gathered tensors batch after batch (each in process order)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({len(p.trajectories) for p in parts}) != 1 or len({p.gathered_reward.shape for p in parts}) != 1:
            raise ValueError("sampling batches of one step must have equal sizes")
        weights = None
        if any(p.gathered_weights is not None for p in parts):
            weights = torch.cat(
                [
                    p.gathered_weights if p.gathered_weights is not None else torch.ones_like(p.gathered_reward)
                    for p in parts
                ]
            )
        keys = sorted({k for p in parts for k in p.stats})
        return cls(
            trajectories=Trajectories.cat([p.trajectories for p in parts]),
            gathered_reward=torch.cat([p.gathered_reward for p in parts]),
            gathered_group_ids=torch.cat([p.gathered_group_ids for p in parts]),
            images=torch.cat([p.images for p in parts]),
            batches=sum(p.batches for p in parts),
            gathered_rewards={k: torch.cat([p.gathered_rewards[k] for p in parts]) for k in parts[0].gathered_rewards},
            gathered_weights=weights,
            stats={k: sum(p.stats.get(k, 0.0) for p in parts) / len(parts) for k in keys},
        )


def collect(
    ctx: StepContext,
    prompts: list[str],
    group_ids: Sequence[int] | torch.Tensor,
    eta: float,
    *,
    sampler: Sampler | None = None,
    select_in_groups: bool = False,
    sde_steps: int | None = None,
    share_noise: int = 1,
) -> Collected:
    """Sample one batch of trajectories under theta_old and score them (spec §1.5, §2.3; no gradient).

    For this process's ``prompts`` (one per sample: a prompt repeated G times forms a group, see
    :func:`grouped_prompts`), in this order: ``ctx.denoiser(prompts)``, the initial latents
    ``ctx.initial_latents`` (with ``share_noise=k``: N/k draws, each used by k consecutive samples, which
    then differ only by their per-step noise: k = 2 for the pairs of D3PO, spec §5.1; k = G as DanceGRPO
    starts a prompt's group from one x_T), the chain :func:`~diffalign.sampling.sample_trajectory` with ``eta`` and ``ctx.generator``
    (latents x_T..x_0 and log pi_old per step, DDIM Eq. 12 / spec §1.2; stochastic only in the first
    ``sde_steps`` steps when given), ``ctx.decode`` of x_0,
    ``ctx.reward_values`` (each reward's values, NaN-checked), ``ctx.gather`` of each reward's values and
    of the group ids (every process must call this collectively, with the same N), then ``ctx.combine``
    of the gathered values (``reward.combine`` over the whole sampling batch of all processes; with
    ``select_in_groups`` a selecting combiner selects within each group, as GRPO's groups of one
    prompt). The combined signal (:meth:`~diffalign.combine.Combined.policy_signal`) is the samples'
    ``reward``; the combiner's per-sample weights and statistics are kept on the :class:`Collected`.

    ``sampler`` defaults to ``ctx.sampler`` (the step rule that also rescores, spec §2.5). Prompt keys
    are ``ctx.prompt_keys(prompts)``. Returns a :class:`Collected` of this one batch.
    """
    n = len(prompts)
    ids = torch.as_tensor(group_ids, dtype=torch.long).reshape(-1).cpu()
    if ids.shape != (n,):
        raise ValueError(f"need one group id per prompt: {n} prompts, {ids.numel()} ids")
    if share_noise < 1 or n % share_noise:
        raise ValueError(f"share_noise={share_noise} must be >= 1 and divide the number of samples, {n}")
    sampler = make_sampler(sampler) if sampler is not None else ctx.sampler
    with torch.no_grad():
        denoise = ctx.denoiser(prompts)
        x_T = ctx.initial_latents(n // share_noise).repeat_interleave(share_noise, dim=0)
        traj = sample_trajectory(denoise, sampler, x_T, eta=eta, generator=ctx.generator, sde_steps=sde_steps)
        images = ctx.decode(traj.final)
        parts = ctx.reward_values(images, prompts)
        gathered_rewards = {k: ctx.gather(v.detach()).cpu() for k, v in parts.items()}
        device = next(iter(parts.values())).device
        gathered_ids = ctx.gather(ids.to(device)).cpu()
        terms = ctx.combine(gathered_rewards, gathered_ids if select_in_groups else None)
        gathered_reward = terms.policy_signal().detach()
        selected = terms.weight is not None or terms.mask is not None
        gathered_weights = terms.sample_weights() if selected else None
    trajectories = Trajectories(
        latents=traj.latents,
        log_probs=traj.log_probs,
        timesteps=traj.timesteps,
        prompts=list(prompts),
        prompt_keys=list(ctx.prompt_keys(prompts)),
        group_ids=ids,
        rewards=dict(parts),
        reward=local_share(gathered_reward, ctx.process_index, gathered_reward.shape[0] // max(n, 1)).to(device),
    )
    return Collected(
        trajectories,
        gathered_reward,
        gathered_ids,
        images,
        gathered_rewards=gathered_rewards,
        gathered_weights=gathered_weights,
        stats=dict(terms.stats),
    )
