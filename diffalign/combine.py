"""Reward combination: several per-reward values in, one training signal (plus weights, a mask, stats) out.

The one combination layer every method and ReNO use (DESIGN.md, "Combiners"; spec
../shared/specs/algorithms.md §8-§9). A *combiner* takes the per-reward values of a batch
(``{name: Tensor[B]}``, possibly carrying gradients to the images) and returns a :class:`Combined`:

    signal   [B]          the scalar reward per sample the method trains on (gradients kept)
    weight   [B] | None   a per-sample multiplier of the sample's loss term / advantage (Ctrl-U's exp(-U))
    mask     [B] | None   the selected samples (Parrot's non-dominated set P); the others contribute nothing
    penalty  [B] | None   a per-sample term a backprop loss adds (Ctrl-U's +U consistency term)
    stats    {str: float} what to log (``pareto/selected_fraction``, ``ensemble/std``, ...)

What a method does with it is shared here too: reward-backprop methods minimize
:meth:`Combined.mean_loss` of their per-sample loss (``(1/|P|) sum_{i in P} w_i l_i``, Parrot Eq. 4's
normalization), policy-gradient methods multiply their advantages by :meth:`Combined.sample_weights`
(``mask * weight``: a sample outside P gets advantage exactly 0).

Combiners are registered by name like the rewards (``@register_combiner("wco", options=(...))``); the
config's ``reward.combine`` names one, ``reward.combine_options`` (:class:`CombineOptions`) holds the
options, and each combiner declares which options it reads (others set away from their defaults are a
one-line error). Stateful combiners (members z-scored with statistics calibrated on the initial
policy's samples, then frozen) expose ``state_dict`` / ``load_state_dict``; the trainer checkpoints
them with the method's state.

The math is in pure functions over tensors, each naming its paper equation:

- :func:`weighted_sum`            r = sum_i w_i r_i (linear scalarization; DRaFT / PRDP multi-reward)
- :func:`pareto_mask`             Parrot's batch-wise non-dominated set (arXiv 2401.05675, Algorithm 1 NDSet)
- :func:`batch_zscore`            per-reward batch z-score (Parrot's labelled z-score option, spec §8.2)
- :class:`ZScoreNormalizer`       per-member z-score with frozen calibration statistics (spec §9.2)
- :func:`ensemble_mean`, :func:`worst_case`, :func:`uncertainty_weighted`
                                  Coste et al. (arXiv 2310.02743) Sec. 3: mean, WCO (min), UWO (mean - lambda Var)
- :func:`member_uncertainty`, :func:`uncertainty_weight`
                                  Ctrl-U (arXiv 2410.11236) Sec. 3.2: U = |c1 - c2|, weight exp(-U)
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeVar

import torch

from diffalign.errors import DiffalignError

U_CLAMP = 20.0  # exp(-U) underflows for large U; Ctrl-U's reference does not clamp, spec §9.1 does (at 20)


# ------------------------------------------------------------------------------------------ options
@dataclass
class CombineOptions:
    """The ``reward.combine_options`` section: options of the combiners (each reads only its own)."""

    normalize: Literal["none", "zscore"] = "none"  # z-score each reward on a calibration set first (frozen)
    calibration_samples: int = 32  # images of the initial policy (all processes) the z-score statistics use
    eps: float = 1e-6  # floor of a calibration / batch standard deviation
    uwo_lambda: float | None = None  # UWO's lambda on the variance; none: 0.1 in training, 0.5 in ReNO (spec §9.2)
    variance_ddof: Literal[0, 1] = 0  # UWO's variance: 0 = population (BoN code), 1 = unbiased (PPO code)
    # the reward of the selected samples: raw (Parrot), batch z-scores, or "dominance": every sample's
    # reward is minus the number of samples (of its group) that dominate it, nobody masked (policy methods)
    pareto_signal: Literal["raw", "zscore", "dominance"] = "raw"
    pareto_groups: bool = True  # select within each group of one prompt's samples (GRPO) rather than the batch
    u_scale: float = 1.0  # ctrlu: U = u_scale * (max - min of the members)
    consistency: float = 0.0  # ctrlu: coefficient of the +U term (0 = off)

    def __post_init__(self) -> None:
        if self.calibration_samples < 2:
            raise DiffalignError(
                f"reward.combine_options.calibration_samples must be >= 2, got {self.calibration_samples}"
            )
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise DiffalignError(f"reward.combine_options.eps must be > 0, got {self.eps}")
        if self.uwo_lambda is not None and not (math.isfinite(self.uwo_lambda) and self.uwo_lambda >= 0):
            raise DiffalignError(f"reward.combine_options.uwo_lambda must be >= 0, got {self.uwo_lambda}")
        if not (math.isfinite(self.u_scale) and self.u_scale > 0):
            raise DiffalignError(f"reward.combine_options.u_scale must be > 0, got {self.u_scale}")
        if not (math.isfinite(self.consistency) and self.consistency >= 0):
            raise DiffalignError(f"reward.combine_options.consistency must be >= 0, got {self.consistency}")


UWO_LAMBDA = {"train": 0.1, "reno": 0.5}  # spec §9.2: 0.1 for RL fine-tuning, 0.5 for best-of-n / reranking


# ----------------------------------------------------------------------------------------- the result
@dataclass
class Combined:
    """What a combiner returns for a batch of B samples (module docstring)."""

    signal: torch.Tensor
    weight: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def sample_weights(self) -> torch.Tensor:
        """``mask_i * weight_i`` per sample (detached; ones when neither is set): what multiplies a
        sample's loss term or advantage."""
        w = torch.ones_like(self.signal.detach()) if self.weight is None else self.weight.detach().to(self.signal.dtype)
        if self.mask is not None:
            w = w * self.mask.to(w.device, w.dtype)
        return w

    def selected(self) -> int:
        """|P|: the number of selected samples (all of them without a mask)."""
        return int(self.mask.sum()) if self.mask is not None else int(self.signal.shape[0])

    def mean_loss(self, per_sample: torch.Tensor) -> torch.Tensor:
        """The batch loss of reward-backprop methods from per-sample losses ``l`` [B]:

            (1/|P|) sum_{i in P} w_i l_i  +  (1/|P|) sum_{i in P} penalty_i

        (Parrot Eq. 4 averages over P; Ctrl-U's ``mean(l * exp(-U)) + mean(U)``). Samples outside P get
        weight exactly 0, so they contribute zero gradient; an empty P gives a zero loss that still
        has a graph. Without weight, mask and penalty this is ``l.mean()``, bit for bit.
        """
        if self.weight is None and self.mask is None and self.penalty is None:
            return per_sample.mean()
        w = self.sample_weights().to(per_sample.dtype)
        n = max(self.selected(), 1)
        loss = (w * per_sample).sum() / n
        if self.penalty is not None:
            keep = torch.ones_like(w) if self.mask is None else self.mask.to(w.device, w.dtype)
            loss = loss + (keep * self.penalty).sum() / n
        return loss

    def policy_signal(self) -> torch.Tensor:
        """The reward a policy-gradient method normalizes into advantages: ``signal - penalty`` (the
        +U term cannot be backpropagated there, so it lowers the reward of inconsistent samples)."""
        return self.signal if self.penalty is None else self.signal - self.penalty


# ------------------------------------------------------------------------------------ pure functions
def check_weights(names: Sequence[str], weights: Mapping[str, float] | Sequence[float]) -> list[float]:
    """Weights in the order of ``names``; one per reward, finite numbers."""
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        extra = [k for k in weights if k not in names]
        if missing or extra:
            raise DiffalignError(
                f"reward weights name {sorted(weights)} but the rewards are {list(names)}; give one weight per reward"
            )
        out = [float(weights[n]) for n in names]
    else:
        out = [float(w) for w in weights]
        if len(out) != len(names):
            raise DiffalignError(f"got {len(out)} reward weights for {len(names)} rewards; give one weight per reward")
    if not all(math.isfinite(w) for w in out):
        raise DiffalignError(f"reward weights must be finite numbers, got {out}")
    return out


def reward_keys(specs: Sequence[Any], where: str = "reward.rewards") -> list[str]:
    """The names rewards are logged and combined under: the reward name, or the full spec when two specs
    share a name (ensemble members ``shapes_clip:model=local-dir:A`` and ``...:B``). The same spec
    listed twice is a one-line error (its two members would always agree)."""
    texts = [str(s) for s in specs]
    dup = next((t for t in texts if texts.count(t) > 1), None)
    if dup is not None:
        raise DiffalignError(
            f"{where} lists {dup!r} twice; ensemble members must differ in an option (e.g. their checkpoint)"
        )
    names = [s.name for s in specs]
    return [str(s) if names.count(s.name) > 1 else s.name for s in specs]


def check_values(values: Mapping[str, torch.Tensor], names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """The per-reward tensors in the order of ``names`` (default: the mapping's); each ``[B]``, all equal.

    A reward missing or extra, or members that disagree in shape, is a one-line :class:`DiffalignError`."""
    if not values:
        raise DiffalignError("no rewards to combine")
    names = list(values) if names is None else list(names)
    if set(values) != set(names):
        raise DiffalignError(f"rewards to combine are {sorted(values)} but the combiner expects {sorted(names)}")
    out = [values[n] for n in names]
    shapes = {tuple(v.shape) for v in out}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        got = ", ".join(f"{n}: {tuple(v.shape)}" for n, v in zip(names, out, strict=True))
        raise DiffalignError(f"rewards to combine must each be one value per sample of the same batch, got {got}")
    return out


def weighted_sum(values: Mapping[str, torch.Tensor], weights: Mapping[str, float] | Sequence[float]) -> torch.Tensor:
    """``sum_i w_i * values[name_i]`` for per-reward tensors ``[B]`` (same shape); keeps gradients.

    The linear scalarization DRaFT and PRDP use for several rewards (e.g. PickScore x10 + HPSv2 x2 +
    aesthetic x0.05), weights checked against the reward count as trl's ``GRPOConfig.reward_weights``.
    """
    vals = check_values(values)
    ws = check_weights(list(values), weights)
    total = ws[0] * vals[0]
    for w, v in zip(ws[1:], vals[1:], strict=True):
        total = total + w * v
    return total


def dominated_by(rewards: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """How many samples dominate each sample: ``[N]`` integer counts (0 = in Parrot's non-dominated set).

    ``rewards`` is ``[N, K]`` (sample i's reward vector in row i; larger is better). Sample a
    dominates sample b iff ``r_k(b) <= r_k(a)`` for every k and ``<`` for at least one k (Lee et al.
    2024, arXiv 2401.05675, Algorithm 1 ``NDSet``; spec §8.2), checked pairwise in O(N^2). Identical
    vectors do not dominate each other. With ``groups`` ([N] integers) only samples of the same group
    count (the N images of one prompt, as Parrot samples them). Computed on detached values.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, K], got shape {tuple(rewards.shape)}")
    r = rewards.detach()
    geq = (r.unsqueeze(1) >= r.unsqueeze(0)).all(dim=2)  # geq[a, b]: r(a) >= r(b) in every reward
    gt = (r.unsqueeze(1) > r.unsqueeze(0)).any(dim=2)  # gt[a, b]: r(a) > r(b) in at least one
    dom = geq & gt  # dom[a, b]: a dominates b
    if groups is not None:
        g = groups.detach().reshape(-1).to(r.device)
        if g.shape != (r.shape[0],):
            raise ValueError(f"groups must be [N] with N={r.shape[0]}, got shape {tuple(groups.shape)}")
        dom = dom & (g.unsqueeze(1) == g.unsqueeze(0))
    return dom.sum(dim=0)


def pareto_mask(rewards: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Parrot's batch-wise non-dominated set P (arXiv 2401.05675, Algorithm 1 ``NDSet``; spec §8.2):
    the ``[N]`` bool mask of the samples no other sample dominates (:func:`dominated_by` is 0). Ties
    and duplicates stay in P; with K = 1, P is the set of argmax samples; a single sample is its own P;
    with ``groups``, selection runs within each group only."""
    return dominated_by(rewards, groups) == 0


def batch_zscore(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(x - mean(x)) / (std(x) + eps)`` over the batch (population std); keeps gradients. Parrot's
    labelled z-score option for the selected samples' reward (spec §8.2, a diffalign deviation)."""
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def ensemble_mean(members: torch.Tensor) -> torch.Tensor:
    """``R_mean = (1/k) sum_i R_i(x)`` over the member axis 0 of ``[k, B]`` (Coste et al. Sec. 3, "Mean")."""
    return members.mean(dim=0)


def worst_case(members: torch.Tensor) -> torch.Tensor:
    """WCO: ``R_WCO = min_i R_i(x)`` over the member axis 0 of ``[k, B]`` (Coste et al. Sec. 3, Eq. WCO);
    the gradient goes to the smallest member of each sample."""
    return members.min(dim=0).values


def member_variance(members: torch.Tensor, ddof: int = 0) -> torch.Tensor:
    """``Var_i[R_i(x)]`` over the member axis 0 of ``[k, B]`` with ``ddof`` 0 (``np.var``) or 1 (``torch.var``)."""
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof}")
    return members.var(dim=0, unbiased=bool(ddof))


def uncertainty_weighted(members: torch.Tensor, lam: float, ddof: int = 0) -> torch.Tensor:
    """UWO: ``R_UWO = R_mean - lambda * Var_i[R_i(x)]`` (Coste et al. Sec. 3, Eq. UWO): the *variance*,
    not the std; ``ddof`` 0 as their best-of-n code, 1 as their PPO code (spec §9.2)."""
    return ensemble_mean(members) - lam * member_variance(members, ddof)


def member_uncertainty(members: torch.Tensor, u_scale: float = 1.0) -> torch.Tensor:
    """Ctrl-U's per-sample uncertainty from the disagreement of near-identical evaluations
    (Zhang et al. 2024, arXiv 2410.11236, Sec. 3.2; depth/HED form ``U = |c1 - c2|``), generalized to
    k members as ``U = u_scale * (max_i R_i - min_i R_i)`` (equal to ``u_scale * |R_1 - R_2|`` for
    two). Keeps gradients (Ctrl-U detaches nothing)."""
    return u_scale * (members.max(dim=0).values - members.min(dim=0).values)


def uncertainty_weight(u: torch.Tensor, clamp: float = U_CLAMP) -> torch.Tensor:
    """Ctrl-U's weight of a sample's reward term, ``exp(-U)`` with U clamped at ``clamp`` (spec §9.1)."""
    return torch.exp(-u.clamp(max=clamp))


class ZScoreNormalizer:
    """Per-member z-score ``(r_i - mu_i) / sigma_i`` with statistics fitted once on a calibration set
    (samples of the initial policy on the training prompts) and frozen for the run (spec §9.2, a
    diffalign design decision: members of different scales must be normalized before min / variance).

    ``sigma`` is the population std (so the calibration set maps to mean 0 / std 1 exactly), floored at
    ``eps``. Statistics are float64 tensors; ``state_dict`` / ``load_state_dict`` round-trip exactly.
    """

    def __init__(self, names: Sequence[str], eps: float = 1e-6) -> None:
        self.names, self.eps = list(names), float(eps)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.count = 0

    @property
    def calibrated(self) -> bool:
        return self.mean is not None

    def fit(self, values: Mapping[str, torch.Tensor]) -> None:
        """Fit the statistics on ``{name: Tensor[N]}`` (N >= 2), replacing any earlier ones."""
        vals = check_values(values, self.names)
        stacked = torch.stack([v.detach().double().cpu() for v in vals])
        if stacked.shape[1] < 2:
            raise DiffalignError(f"calibration needs at least 2 samples per reward, got {stacked.shape[1]}")
        if not bool(torch.isfinite(stacked).all()):
            raise DiffalignError("a reward returned NaN or inf on the calibration samples; check that reward")
        self.mean = stacked.mean(dim=1)
        self.std = stacked.std(dim=1, unbiased=False).clamp(min=self.eps)
        self.count = int(stacked.shape[1])

    def __call__(self, vals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("the z-score normalizer is used before it was calibrated")
        return [
            (v - m.to(v.device, v.dtype)) / s.to(v.device, v.dtype)
            for v, m, s in zip(vals, self.mean, self.std, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "mean": self.mean, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(f"normalizer state is for rewards {list(state['names'])}, not {self.names}")
        self.mean, self.std, self.count = state["mean"], state["std"], int(state["count"])


# ---------------------------------------------------------------------------------------- combiners
class Combiner:
    """Base class: ``combiner(values, groups=None) -> Combined`` over the rewards ``names``.

    ``weights`` are one per reward (the linear combiners use them; ensemble combiners require them all
    equal to 1). With ``options.normalize == "zscore"`` (always for ``zscore``) every reward is
    z-scored with a :class:`ZScoreNormalizer` first: :attr:`needs_calibration` is True until
    :meth:`calibrate` has seen the calibration set, and the statistics are the combiner's state.
    ``context`` is ``"train"`` or ``"reno"`` (it picks defaults such as UWO's lambda).
    """

    name: ClassVar[str] = "combiner"
    options_read: ClassVar[tuple[str, ...]] = ()  # fields of CombineOptions this combiner reads
    ensemble: ClassVar[bool] = False  # members of one ensemble: >= 2 of them, equal weights
    always_normalize: ClassVar[bool] = False

    def __init__(
        self,
        names: Sequence[str],
        weights: Sequence[float] | None = None,
        options: CombineOptions | None = None,
        context: Literal["train", "reno"] = "train",
    ) -> None:
        self.names = list(names)
        if not self.names:
            raise DiffalignError("no rewards to combine")
        if len(set(self.names)) != len(self.names):
            raise DiffalignError(f"rewards to combine must have distinct names, got {self.names}")
        self.weights = check_weights(self.names, [1.0] * len(self.names) if weights is None else weights)
        self.options = options or CombineOptions()
        self.context = context
        if self.ensemble:
            if len(self.names) < 2:
                raise DiffalignError(
                    f"reward.combine={self.name} combines the members of an ensemble: list at least 2 reward specs "
                    f"in reward.rewards, got {len(self.names)}"
                )
            if any(w != 1.0 for w in self.weights):
                raise DiffalignError(
                    f"reward.combine={self.name} weighs ensemble members equally; drop the reward weights "
                    f"(got {self.weights})"
                )
        normalize = self.always_normalize or self.options.normalize == "zscore"
        self.normalizer = ZScoreNormalizer(self.names, self.options.eps) if normalize else None

    @property
    def needs_calibration(self) -> bool:
        """Whether :meth:`calibrate` must run before the first call."""
        return self.normalizer is not None and not self.normalizer.calibrated

    def calibrate(self, values: Mapping[str, torch.Tensor]) -> None:
        """Fit (and freeze) the normalizer's statistics on the calibration set ``{name: Tensor[N]}``."""
        if self.normalizer is not None:
            self.normalizer.fit(values)

    def __call__(self, values: Mapping[str, torch.Tensor], groups: torch.Tensor | None = None) -> Combined:
        vals = check_values(values, self.names)
        if self.normalizer is not None:
            if not self.normalizer.calibrated:
                raise RuntimeError(f"combiner {self.name!r} is used before it was calibrated")
            vals = self.normalizer(vals)
        return self.combine(vals, groups)

    def combine(self, vals: list[torch.Tensor], groups: torch.Tensor | None) -> Combined:
        raise NotImplementedError

    @property
    def differentiable(self) -> bool:
        """Whether the signal carries the rewards' gradients (reward backprop and ReNO need it)."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """Plain state for checkpoints (``torch.load(weights_only=True)`` reads it back)."""
        return {"name": self.name, "normalizer": self.normalizer.state_dict() if self.normalizer else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"combiner state is for {state.get('name')!r}, not {self.name!r}")
        if self.normalizer is not None:
            if state.get("normalizer") is None:
                raise ValueError(f"combiner state of {self.name!r} holds no calibration statistics")
            self.normalizer.load_state_dict(state["normalizer"])

    def describe(self) -> str:
        """One line for the log: the calibration statistics, when any."""
        if self.normalizer is None or self.normalizer.mean is None or self.normalizer.std is None:
            return self.name
        stats = ", ".join(
            f"{n}: mean {float(m):.4g} std {float(s):.4g}"
            for n, m, s in zip(self.names, self.normalizer.mean, self.normalizer.std, strict=True)
        )
        return f"{self.name} (z-scored on {self.normalizer.count} calibration samples; {stats})"


@dataclass(frozen=True)
class CombinerEntry:
    """One registered combiner: its name, class and a one-line summary (for help and docs)."""

    name: str
    cls: type[Combiner]
    summary: str


_COMBINERS: dict[str, CombinerEntry] = {}
C = TypeVar("C", bound=type[Combiner])


def register_combiner(name: str, summary: str, options: Sequence[str] = ()) -> Callable[[C], C]:
    """Class decorator: register a :class:`Combiner` subclass as ``reward.combine: name``; ``options``
    are the :class:`CombineOptions` fields it reads."""
    known = {f.name for f in fields(CombineOptions)}
    if not name.isidentifier() or not name.islower():
        raise ValueError(f"combiner name {name!r} must be a lowercase identifier")
    bad = [o for o in options if o not in known]
    if bad:
        raise ValueError(f"combiner {name!r} reads unknown options {bad}")

    def deco(cls: C) -> C:
        old = _COMBINERS.get(name)
        if old is not None and old.cls is not cls:
            raise ValueError(f"combiner {name!r} is already registered to {old.cls.__qualname__}")
        cls.name = name
        cls.options_read = tuple(options)
        _COMBINERS[name] = CombinerEntry(name, cls, summary)
        return cls

    return deco


def combiner_names() -> list[str]:
    """The names ``reward.combine`` accepts, in registration order."""
    return list(_COMBINERS)


def registered_combiners() -> list[CombinerEntry]:
    return list(_COMBINERS.values())


def get_combiner(name: str) -> type[Combiner]:
    """The class registered as ``name``; an unknown name is a one-line error with the closest match."""
    entry = _COMBINERS.get(name)
    if entry is None:
        close = difflib.get_close_matches(str(name), list(_COMBINERS), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DiffalignError(f"config key 'reward.combine' must be one of {', '.join(_COMBINERS)}, got {name!r}{hint}")
    return entry.cls


def check_options(name: str, options: CombineOptions) -> None:
    """Options set away from their defaults that combiner ``name`` does not read: a one-line error."""
    cls = get_combiner(name)
    default = CombineOptions()
    unused = [
        f.name
        for f in fields(CombineOptions)
        if getattr(options, f.name) != getattr(default, f.name) and f.name not in cls.options_read
    ]
    if unused:
        reads = ", ".join(cls.options_read) or "none"
        raise DiffalignError(
            f"reward.combine_options.{unused[0]} does not apply to reward.combine={name} (it reads: {reads}); "
            "drop it or choose another combiner"
        )


def build_combiner(
    name: str,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    options: CombineOptions | None = None,
    context: Literal["train", "reno"] = "train",
) -> Combiner:
    """The combiner ``name`` over the rewards ``names`` (checks its options first). ReNO backpropagates
    its reward, so a combiner without gradient (``pareto_signal: dominance``) is a one-line error there."""
    options = options or CombineOptions()
    check_options(name, options)
    combiner = get_combiner(name)(names, weights, options, context)
    if context == "reno" and not combiner.differentiable:
        raise DiffalignError(non_differentiable_message(name, options, "ReNO backpropagates the reward"))
    return combiner


def non_differentiable_message(name: str, options: CombineOptions, why: str) -> str:
    """The one-line error for a gradient-free combiner where the reward's gradient is needed."""
    return (
        f"reward.combine={name} with pareto_signal={options.pareto_signal} gives a reward without gradient, "
        f"but {why}: use pareto_signal=raw or zscore, or a policy-gradient method (grpo, ddpo, ...)"
    )


def _std_stat(members: torch.Tensor) -> float:
    return float(members.detach().double().std(dim=0, unbiased=False).mean()) if members.shape[0] > 1 else 0.0


@register_combiner("weighted", "r = sum_i w_i r_i", options=("normalize", "calibration_samples", "eps"))
class WeightedSum(Combiner):
    """The linear scalarization :func:`weighted_sum` (optionally of calibrated z-scores)."""

    def combine(self, vals, groups):
        total = self.weights[0] * vals[0]
        for w, v in zip(self.weights[1:], vals[1:], strict=True):
            total = total + w * v
        return Combined(total)


@register_combiner(
    "zscore",
    "r = sum_i w_i (r_i - mu_i) / sigma_i, statistics frozen after calibration",
    ("calibration_samples", "eps"),
)
class ZScoreSum(WeightedSum):
    """:class:`WeightedSum` of per-reward z-scores calibrated on the initial policy's samples."""

    always_normalize = True


@register_combiner(
    "pareto",
    "Parrot: train only on the batch's non-dominated samples",
    ("normalize", "calibration_samples", "eps", "pareto_signal", "pareto_groups"),
)
class Pareto(Combiner):
    """Parrot's batch-wise Pareto selection (spec §8.2): mask = :func:`pareto_mask` of the weighted reward
    vectors ``(w_k r_k)_k`` (a negative weight asks for a smaller reward; a zero weight drops it from
    dominance), signal = ``sum_k w_k r_k`` (``pareto_signal: raw``, the paper's reward weights) or
    ``sum_k w_k z_k`` with per-reward batch z-scores ``z_k`` (``zscore``, a labelled deviation).

    ``pareto_signal: dominance`` (a diffalign extension, not in the paper) keeps every sample and gives
    it the reward ``-|{j : j dominates i}|`` (:func:`dominated_by`): the non-dominated samples get the
    top reward 0 and the dominated ones push the policy away in proportion to how many samples beat them
    in every reward, so no weighting of the rewards is chosen and the dominated samples' negative signal,
    which the mask drops, is kept. It has no gradient, so only policy-gradient methods can use it.
    """

    @property
    def differentiable(self) -> bool:
        return self.options.pareto_signal != "dominance"

    def combine(self, vals, groups):
        use_groups = groups if self.options.pareto_groups else None
        weighted = torch.stack([w * v for w, v in zip(self.weights, vals, strict=True)], dim=1)
        if self.options.pareto_signal == "dominance":
            count = dominated_by(weighted, use_groups)
            stats = {"pareto/selected_fraction": float((count == 0).double().mean())}
            return Combined(-count.to(vals[0].dtype), stats=stats)
        mask = pareto_mask(weighted, use_groups)
        if self.options.pareto_signal == "zscore":
            vals = [batch_zscore(v, self.options.eps) for v in vals]
        total = self.weights[0] * vals[0]
        for w, v in zip(self.weights[1:], vals[1:], strict=True):
            total = total + w * v
        return Combined(total, mask=mask, stats={"pareto/selected_fraction": float(mask.double().mean())})


_ENSEMBLE_OPTIONS = ("normalize", "calibration_samples", "eps")


@register_combiner("ensemble_mean", "ensemble mean (1/k) sum_i R_i", _ENSEMBLE_OPTIONS)
class EnsembleMean(Combiner):
    """The members' mean (Coste et al.: not conservative)."""

    ensemble = True

    def combine(self, vals, groups):
        m = torch.stack(vals)
        return Combined(ensemble_mean(m), stats={"ensemble/std": _std_stat(m)})


@register_combiner("wco", "worst case over the ensemble: min_i R_i", _ENSEMBLE_OPTIONS)
class WorstCase(Combiner):
    """WCO: the smallest member per sample (:func:`worst_case`)."""

    ensemble = True

    def combine(self, vals, groups):
        m = torch.stack(vals)
        return Combined(worst_case(m), stats={"ensemble/std": _std_stat(m)})


@register_combiner(
    "uwo", "uncertainty-weighted: mean_i R_i - lambda Var_i R_i", (*_ENSEMBLE_OPTIONS, "uwo_lambda", "variance_ddof")
)
class UncertaintyWeighted(Combiner):
    """UWO: :func:`uncertainty_weighted` with ``uwo_lambda`` (default per context: :data:`UWO_LAMBDA`)."""

    ensemble = True

    @property
    def lam(self) -> float:
        lam = self.options.uwo_lambda
        return UWO_LAMBDA[self.context] if lam is None else float(lam)

    def combine(self, vals, groups):
        m = torch.stack(vals)
        ddof = int(self.options.variance_ddof)
        var = member_variance(m, ddof)
        stats = {"ensemble/std": _std_stat(m), "ensemble/variance": float(var.detach().double().mean())}
        return Combined(ensemble_mean(m) - self.lam * var, stats=stats)


@register_combiner(
    "ctrlu",
    "Ctrl-U: the members' mean, each sample weighted by exp(-U), U = u_scale (max - min), optional +U term",
    (*_ENSEMBLE_OPTIONS, "u_scale", "consistency"),
)
class CtrlU(Combiner):
    """Ctrl-U-style uncertainty weighting (spec §9.1) adapted to text-to-image rewards: the members are
    near-identical evaluations of the same image (or ensemble members); ``signal`` is their mean,
    ``weight = exp(-U)`` (detached: a reward loss ``-r`` can be negative, so a differentiable weight
    would reward raising U) and, with ``consistency > 0``, ``penalty = consistency * U`` (with gradient).
    """

    ensemble = True

    def combine(self, vals, groups):
        m = torch.stack(vals)
        u = member_uncertainty(m, self.options.u_scale)
        weight = uncertainty_weight(u.detach())
        penalty = self.options.consistency * u if self.options.consistency > 0 else None
        stats = {"ctrlu/uncertainty": float(u.detach().double().mean()), "ctrlu/weight": float(weight.double().mean())}
        return Combined(ensemble_mean(m), weight=weight, penalty=penalty, stats=stats)


__all__ = [
    "U_CLAMP",
    "UWO_LAMBDA",
    "CombineOptions",
    "Combined",
    "Combiner",
    "CombinerEntry",
    "ZScoreNormalizer",
    "batch_zscore",
    "build_combiner",
    "check_options",
    "check_values",
    "check_weights",
    "combiner_names",
    "reward_keys",
    "ensemble_mean",
    "get_combiner",
    "member_uncertainty",
    "member_variance",
    "pareto_mask",
    "register_combiner",
    "registered_combiners",
    "uncertainty_weight",
    "uncertainty_weighted",
    "weighted_sum",
    "worst_case",
]
