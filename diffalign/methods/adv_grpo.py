"""Adv-GRPO: GRPO whose reward is a discriminator trained during RL on frozen vision features
(Mao et al. 2025, "The Image as Its Own Reward", arXiv 2511.20256; spec §6.2, GRPO §6.1).

Per training step, on the shared GRPO rollouts (:class:`~diffalign.methods.grpo.GRPO`: G samples per
prompt, group-relative advantages, clipped ratio, optional KL to the base model):

    f = normalize(B(x))  [1 + N, D]                 frozen backbone tokens of image x (CLS / pooled first, then
                                                    N patches), each L2-normalized (backbone: dinov2, open_clip,
                                                    shapes_clip; reward_models/backbones.py)
    h(f_j) = W2 GELU(W1 f_j + b1) + b2               the trainable head, on every token (DINO variant's MLP)
    s(x) = (1 - w) h(f_0) + w mean_{j>=1} h(f_j)     image score; w = patch_weight (0.3 in the paper's reward:
                                                    r = 0.7 h(f_0) + 0.3 mean h(f_p))
    r(x) = clamp(s(x), -c, c)  or  sigmoid(s(x))     the reward (bounded: reward = clip / sigmoid, c = reward_clip)

    L_D = L(h(f_0^+), h(f_0^-)) + w L(h(f_p^+), h(f_p^-))      over p = patch_tokens sampled patches per image
    hinge: L(a, b) = 1/2 [mean ReLU(1 - a) + mean ReLU(1 + b)]  (the DINO variant's loss)
    bce:   L(a, b) = 1/2 [mean softplus(-a) + mean softplus(b)] (the non-saturating GAN loss)

``+`` are reference images ("real"), ``-`` the policy's samples ("fake": this step's images, mixed with
past samples from a replay buffer). The reward enters the run as the reward ``adversarial``
(:mod:`reward_models.adversarial`) listed in ``reward.rewards``, so it is combined with any other
rewards by ``reward.combine``, logged and watched by the hacking guardrail like any reward.

Schedule (spec §6.2 "Update schedule"): ``every_k`` makes a GRPO update on every ``policy_every``-th
step and ``disc_steps`` discriminator updates on every step (the paper's DINO script: policy_every=10);
``threshold`` (the PickScore script) compares the mean reward of a reference batch m_ref with that of
the step's samples m_gen under the current discriminator: m_ref <= m_gen -> ``disc_steps``
discriminator updates and no policy update, else the policy update only. Rewards (hence advantages)
are always computed at sampling time, before the step's discriminator updates.

The discriminator head, its Adam optimizer (betas 0.5, 0.999 as the paper) and the replay buffer are
the method's state (checkpointed; randomness from ``ctx.generator``); the frozen backbone is reloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from diffalign.errors import DiffalignError
from diffalign.methods.base import PromptBatch, StepContext, StepResult
from diffalign.methods.grpo import GRPO, GRPOConfig, GRPOStats, validate_grpo
from diffalign.methods.registry import MethodEntry, register_method
from diffalign.rollouts import zero_std_fraction

if TYPE_CHECKING:
    from diffalign.config import DiffalignConfig, SampleConfig, TrainConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIDECARS = ("metadata.jsonl", "prompts.jsonl")  # Hugging Face imagefolder; diffalign sample's index
REWARD_NAME = "adversarial"


@dataclass
class AdvGRPOConfig(GRPOConfig):
    """The ``adv_grpo:`` section: every ``grpo:`` key (same defaults) and the discriminator's (docs/training.md)."""

    # reference images ("real"): "shapes" = the shapes generator's renders of the step's prompts; else a folder
    # of images (optional prompts: metadata.jsonl {"file_name", "prompt"}, diffalign sample's prompts.jsonl,
    # or one <image stem>.txt per image)
    reference: str = "shapes"
    match_prompts: bool = True  # real images of the step's prompts where the folder has them (else any)
    eval_references: int = 32  # held-out references for the eval accuracy (a folder keeps at most a quarter)
    backbone: str = "dinov2"  # frozen features: dinov2, open_clip, shapes_clip (reward_models/backbones.py)
    backbone_model: str | None = None  # path / hub id; none: facebook/dinov2-base, the shapes CLIP asset
    hidden: int = 512  # head width: Linear(D, hidden) -> GELU -> Linear(hidden, 1)
    patch_tokens: int = 64  # patches sampled per image for the loss (0: the global token only)
    patch_weight: float = 0.3  # w: reward (1-w) h(f_0) + w mean h(f_p); loss L_img + w L_patch
    loss: Literal["hinge", "bce"] = "hinge"
    reward: Literal["clip", "sigmoid"] = "clip"  # bound the score: clamp to +-reward_clip, or sigmoid
    reward_clip: float = 10.0
    disc_lr: float = 1.0e-4  # Adam lr of the head (paper 1e-4, betas 0.5 / 0.999)
    disc_beta1: float = 0.5
    disc_beta2: float = 0.999
    disc_steps: int = 1  # discriminator updates per step (every_k) or per losing step (threshold)
    disc_batch_size: int = 0  # real and fake images per update, per process; 0: the step's samples
    schedule: Literal["every_k", "threshold"] = "every_k"
    policy_every: int = 1  # every_k: GRPO update on every k-th step (paper's DINO script: 10)
    replay_size: int = 0  # past samples kept (features, over all processes); 0: no replay
    replay_fraction: float = 0.5  # share of each update's fakes drawn from the replay buffer
    replay_sampling: Literal["uniform", "recent"] = "uniform"  # recent: probability rising linearly with age rank

    def __post_init__(self) -> None:
        super().__post_init__()
        s = "adv_grpo"
        if not self.reference.strip():
            raise DiffalignError(f"{s}.reference is empty; give 'shapes' or a folder of reference images")
        if self.loss not in ("hinge", "bce"):
            raise DiffalignError(f"{s}.loss must be hinge or bce, got {self.loss!r}")
        if self.reward not in ("clip", "sigmoid"):
            raise DiffalignError(f"{s}.reward must be clip or sigmoid, got {self.reward!r}")
        if self.schedule not in ("every_k", "threshold"):
            raise DiffalignError(f"{s}.schedule must be every_k or threshold, got {self.schedule!r}")
        if self.replay_sampling not in ("uniform", "recent"):
            raise DiffalignError(f"{s}.replay_sampling must be uniform or recent, got {self.replay_sampling!r}")
        checks = [
            (self.hidden >= 1, "hidden must be >= 1"),
            (self.patch_tokens >= 0, "patch_tokens must be >= 0"),
            (0.0 <= self.patch_weight <= 1.0, "patch_weight must be in [0, 1]"),
            (self.reward_clip > 0, "reward_clip must be > 0"),
            (self.disc_lr > 0, "disc_lr must be > 0"),
            (
                0.0 <= self.disc_beta1 < 1.0 and 0.0 <= self.disc_beta2 < 1.0,
                "disc_beta1 and disc_beta2 must be in [0, 1)",
            ),
            (self.disc_steps >= 1, "disc_steps must be >= 1"),
            (self.disc_batch_size >= 0, "disc_batch_size must be >= 0 (0: the step's samples)"),
            (self.policy_every >= 1, "policy_every must be >= 1"),
            (self.replay_size >= 0, "replay_size must be >= 0"),
            (0.0 <= self.replay_fraction <= 1.0, "replay_fraction must be in [0, 1]"),
            (self.eval_references >= 1, "eval_references must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise DiffalignError(f"{s}.{message}")


# ------------------------------------------------------------------------------- pure functions
class DiscriminatorHead(torch.nn.Module):
    """h: ``Linear(D, hidden) -> GELU -> Linear(hidden, 1)`` on each token (the DINO variant's head).

    The output layer starts at zero, so the first scores are all 0: L_D = 1 + w (hinge) and every
    advantage of the first step is 0 (spec §6.2 sanity check 1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[..., D]`` -> scores ``[...]``."""
        return self.net(tokens).squeeze(-1)


def mix_scores(token_scores: torch.Tensor, patch_weight: float) -> torch.Tensor:
    """s = (1 - w) h(f_0) + w mean_{j>=1} h(f_j) over ``[B, 1 + P]`` token scores -> ``[B]`` (spec §6.2, the
    DINO reward with w = 0.3); h(f_0) alone when there are no patch tokens."""
    if token_scores.shape[1] == 1 or patch_weight == 0:
        return token_scores[:, 0]
    return (1 - patch_weight) * token_scores[:, 0] + patch_weight * token_scores[:, 1:].mean(dim=1)


def bounded_reward(scores: torch.Tensor, kind: str, clip: float) -> torch.Tensor:
    """The reward from the raw score s: ``clamp(s, -clip, clip)`` (``clip``) or ``sigmoid(s)`` (``sigmoid``)."""
    return torch.sigmoid(scores) if kind == "sigmoid" else scores.clamp(-clip, clip)


def _half_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def discriminator_loss(
    real: torch.Tensor, fake: torch.Tensor, kind: str, patch_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_D = L(h(f_0^+), h(f_0^-)) + w L(h(f_p^+), h(f_p^-)) (spec §6.2, "DINO variant") on token scores
    ``real [B, 1 + P]`` and ``fake [B', 1 + P]``; L is the hinge or the binary cross-entropy (module docstring).

    Stats: accuracies of the image score s (real when s > 0): ``acc_real``, ``acc_fake``, their mean
    ``acc``, and the mean scores."""
    loss = _half_loss(real[:, 0], fake[:, 0], kind)
    if real.shape[1] > 1 and patch_weight > 0:
        loss = loss + patch_weight * _half_loss(real[:, 1:], fake[:, 1:], kind)
    s_real, s_fake = mix_scores(real.detach(), patch_weight), mix_scores(fake.detach(), patch_weight)
    acc_real, acc_fake = float((s_real > 0).float().mean()), float((s_fake < 0).float().mean())
    stats = {
        "loss": float(loss.detach()),
        "acc": (acc_real + acc_fake) / 2,
        "acc_real": acc_real,
        "acc_fake": acc_fake,
        "score_real": float(s_real.mean()),
        "score_fake": float(s_fake.mean()),
    }
    return loss, stats


def select_tokens(tokens: torch.Tensor, patches: int, generator: torch.Generator | None) -> torch.Tensor:
    """L2-normalized tokens ``[B, 1 + N, D]`` -> the global token and ``patches`` patch tokens per image,
    drawn without replacement from ``generator`` (all N when ``patches >= N`` or no generator; none for 0).

    Both the discriminator's loss and the reward see normalized features (the reference code normalizes
    only on the reward path, spec §6.2 pitfall iv)."""
    tokens = F.normalize(tokens.float(), dim=-1)
    n = tokens.shape[1] - 1
    if patches == 0 or n == 0:
        return tokens[:, :1]
    if patches >= n or generator is None:
        return tokens
    order = torch.argsort(torch.rand(tokens.shape[0], n, generator=generator), dim=1)[:, :patches] + 1
    index = torch.cat([torch.zeros(tokens.shape[0], 1, dtype=torch.long), order], dim=1).to(tokens.device)
    return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[2]))


# ----------------------------------------------------------------------------------- replay buffer
class ReplayBuffer:
    """Features ``[1 + P, D]`` of past policy samples, first in first out, at most ``capacity`` (CPU)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.features: torch.Tensor | None = None  # [count, 1 + P, D]
        self.ages = torch.zeros(0, dtype=torch.long)  # insertion number of each row
        self.pushed = 0

    def __len__(self) -> int:
        return 0 if self.features is None else self.features.shape[0]

    def push(self, features: torch.Tensor) -> None:
        """Append rows, dropping the oldest beyond ``capacity``."""
        if self.capacity == 0:
            return
        features = features.detach().float().cpu()
        ages = torch.arange(self.pushed, self.pushed + features.shape[0])
        self.pushed += features.shape[0]
        feats = features if self.features is None else torch.cat([self.features, features])
        self.features = feats[-self.capacity :].clone()
        self.ages = torch.cat([self.ages, ages])[-self.capacity :].clone()

    def sample(self, n: int, generator: torch.Generator, mode: str) -> torch.Tensor:
        """``n`` rows with replacement: uniform, or (``recent``) with probability proportional to the age rank."""
        size = len(self)
        if mode == "recent":
            weights = torch.arange(1, size + 1, dtype=torch.float64)
            index = torch.multinomial(weights, n, replacement=True, generator=generator)
        else:
            index = torch.randint(size, (n,), generator=generator)
        return self.features[index]

    def state_dict(self) -> dict[str, Any]:
        empty = torch.zeros(0)
        return {
            "features": empty if self.features is None else self.features,
            "ages": self.ages,
            "pushed": self.pushed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        feats = state["features"]
        self.features = None if feats.numel() == 0 else feats.float().clone()
        self.ages, self.pushed = state["ages"].long().clone(), int(state["pushed"])


# ------------------------------------------------------------------------------------- references
def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[3, H, W]`` -> ``[3, height, width]``: scaled to cover (bilinear, antialiased), centre crop."""
    _, h, w = image.shape
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - height) // 2, (nw - width) // 2
    return image[:, top : top + height, left : left + width].clamp(0, 1).contiguous()


def _read_sidecar(sidecar: Path) -> dict[str, str]:
    """File name -> prompt from a JSONL sidecar: ``{"file_name" or "file": NAME, "prompt" or "text": TEXT}`` lines."""
    out: dict[str, str] = {}
    for n, line in enumerate(sidecar.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DiffalignError(f"{sidecar}:{n}: not JSON ({err.msg}); write one object per line") from None
        record = record if isinstance(record, dict) else {}
        name = record.get("file_name", record.get("file"))
        text = record.get("prompt", record.get("text"))
        if not isinstance(name, str) or not isinstance(text, str):
            raise DiffalignError(f'{sidecar}:{n}: expected {{"file_name": "IMAGE", "prompt": "TEXT"}}')
        out[name] = text.strip()
    return out


def list_reference_images(folder: str) -> tuple[list[Path], list[str | None]]:
    """The images of a reference folder (sorted) and the prompt of each (None when unknown).

    Prompts come from ``metadata.jsonl`` (one ``{"file_name": ..., "prompt": ...}`` per line, ``text``
    also accepted: the Hugging Face imagefolder layout), ``prompts.jsonl`` (``{"file": ..., "prompt": ...}``:
    what ``diffalign sample`` writes next to its images) or ``<image stem>.txt``. A missing folder,
    a file instead of a folder, a folder without images or a bad sidecar line is a one-line error.
    """
    path = Path(folder).expanduser()
    what = f"adv_grpo.reference: reference folder {folder!r}"
    fix = "give a folder of reference images (png, jpg, webp), or reference=shapes on the shapes world"
    if not path.exists():
        raise DiffalignError(f"{what} does not exist (looked under {Path.cwd()}); {fix}")
    if not path.is_dir():
        raise DiffalignError(f"{what} is a file, not a folder; {fix}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DiffalignError(f"{what} holds no images ({', '.join(IMAGE_SUFFIXES)}); {fix}")
    prompts: dict[str, str] = {}
    for sidecar in (path / name for name in SIDECARS):
        if sidecar.is_file():
            prompts |= _read_sidecar(sidecar)
    for f in files:
        txt = f.with_suffix(".txt")
        if f.name not in prompts and txt.is_file():
            prompts[f.name] = txt.read_text(encoding="utf-8").strip()
    return files, [prompts.get(f.name) for f in files]


class FolderReferences:
    """Reference images from a folder: a held-out part (``heldout`` files of a seeded permutation, for
    the eval accuracy; at most a quarter) and the rest for training, indexed by prompt when known."""

    def __init__(self, folder: str, heldout: int, seed: int, match_prompts: bool) -> None:
        files, prompts = list_reference_images(folder)
        k = min(heldout, len(files) // 4)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        self.heldout = [files[i] for i in sorted(order[:k])] or list(files)  # too few: the training images
        self.train = [(files[i], prompts[i]) for i in sorted(order[k:])]
        self.by_prompt: dict[str, list[int]] = {}
        if match_prompts:
            for i, (_, prompt) in enumerate(self.train):
                if prompt is not None:
                    self.by_prompt.setdefault(prompt, []).append(i)

    @staticmethod
    def _load(path: Path, height: int, width: int) -> torch.Tensor:
        from reward_models.loading import load_image

        return fit_image(load_image(path), height, width)

    def draw(self, prompts: list[str], generator: torch.Generator, height: int, width: int) -> torch.Tensor:
        """One training reference per prompt (one of that prompt's when the folder has some), ``[B, 3, h, w]``."""
        picks = torch.rand(len(prompts), generator=generator).tolist()
        out = []
        for prompt, u in zip(prompts, picks, strict=True):
            pool = self.by_prompt.get(prompt) or range(len(self.train))
            out.append(self._load(self.train[pool[min(int(u * len(pool)), len(pool) - 1)]][0], height, width))
        return torch.stack(out)

    def heldout_images(self, prompts: list[str], count: int, height: int, width: int) -> torch.Tensor:
        """The held-out references (the same every evaluation), at most ``count``."""
        return torch.stack([self._load(p, height, width) for p in self.heldout[:count]])


class ShapesReferences:
    """The shapes world's generator as the reference set: a fresh render of each prompt (any layout)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @staticmethod
    def _render(prompt: str, seed: list[int], height: int, width: int) -> torch.Tensor:
        import numpy as np

        from diffalign.shapes.world import parse_caption, render

        pixels, _ = render(parse_caption(prompt), np.random.default_rng(seed))
        image = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0)
        return fit_image(image, height, width)

    def draw(self, prompts: list[str], generator: torch.Generator, height: int, width: int) -> torch.Tensor:
        seeds = torch.randint(2**62, (len(prompts),), generator=generator).tolist()
        return torch.stack([self._render(p, [s], height, width) for p, s in zip(prompts, seeds, strict=True)])

    def heldout_images(self, prompts: list[str], count: int, height: int, width: int) -> torch.Tensor:
        """Renders of the evaluation's prompts with fixed seeds (layouts never drawn in training)."""
        chosen = prompts[:count]
        return torch.stack([self._render(p, [self.seed, 0x65766C, i], height, width) for i, p in enumerate(chosen)])


# ------------------------------------------------------------------------------------------ method
class AdvGRPO(GRPO):
    """GRPO with the discriminator reward it trains (module docstring)."""

    name = "adv_grpo"
    needs_differentiable_reward = False

    def __init__(self, cfg: AdvGRPOConfig, sample: SampleConfig, train: TrainConfig) -> None:
        super().__init__(cfg, sample, train)
        self.steps_done = 0
        self.buffer = ReplayBuffer(cfg.replay_size)

    def updates_per_step(self) -> int:
        per = super().updates_per_step()
        return max(1, per // self.cfg.policy_every) if self.cfg.schedule == "every_k" else per

    # ----------------------------------------------------------------------------- state
    def configure(self, ctx: StepContext) -> None:
        """Load the frozen backbone, build the head (global RNG, seeded by the trainer) and its Adam, open
        the references and bind the run's ``adversarial`` reward to :meth:`reward_scores`."""
        from reward_models.adversarial import Adversarial
        from reward_models.backbones import load_backbone

        cfg = self.cfg
        self.backbone = load_backbone(cfg.backbone, cfg.backbone_model, ctx.device)
        self.head = DiscriminatorHead(self.backbone.dim, cfg.hidden)
        self.opt = torch.optim.Adam(self.head.parameters(), lr=cfg.disc_lr, betas=(cfg.disc_beta1, cfg.disc_beta2))
        seed = int(self.train.seed)
        if cfg.reference == "shapes":
            self.references: ShapesReferences | FolderReferences = ShapesReferences(seed)
        else:
            self.references = FolderReferences(cfg.reference, cfg.eval_references, seed, cfg.match_prompts)
        bound = [k for k, r in ctx.reward_models.items() if isinstance(r, Adversarial)]
        if len(bound) != 1:
            raise DiffalignError(
                "adv_grpo trains on its discriminator's reward: list adversarial exactly once in reward.rewards "
                "(alone: reward.rewards=[adversarial])"
            )
        self.reward_key = bound[0]
        span = (0.0, 1.0) if cfg.reward == "sigmoid" else (-cfg.reward_clip, cfg.reward_clip)
        ctx.reward_models[self.reward_key].bind(self.reward_scores, span)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"disc": self.head}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"disc": self.opt}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps_done, "replay": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps"])
        self.buffer.load_state_dict(state["replay"])

    # --------------------------------------------------------------------------- scoring
    def features(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Normalized frozen features ``[B, 1 + P, D]`` (``patch_tokens`` sampled patches; all with no generator)."""
        return select_tokens(self.backbone.tokens(images), self.cfg.patch_tokens, generator)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """The raw image score s(x) ``[B]`` over every patch token (no graph; the mean over all patches is the
        expectation of the paper's mean over 64 random ones, without the draw)."""
        with torch.no_grad():
            feats = self.features(images, None)
            return mix_scores(self.head(feats.to(self._head_device())), self.cfg.patch_weight).float()

    def reward_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """What the ``adversarial`` reward returns: the bounded score r(x) ``[B]`` (finite)."""
        return bounded_reward(self.scores(images), self.cfg.reward, self.cfg.reward_clip)

    def _head_device(self) -> torch.device:
        return next(self.head.parameters()).device

    # -------------------------------------------------------------------- discriminator
    def train_discriminator(
        self, ctx: StepContext, fresh: torch.Tensor, prompts: list[str], size: tuple[int, int], updates: int
    ) -> dict[str, float]:
        """``updates`` Adam steps of L_D (:func:`discriminator_loss`) on reference images vs fakes (this step's
        ``fresh`` features, a ``replay_fraction`` share from the replay buffer); gradients averaged over
        processes. With ``updates = 0``: the loss and accuracies of one batch, without a step.

        Returns the first update's loss and accuracies, computed before it (the discriminator that scored
        this step's samples, on fresh samples it has not trained on), and the last update's loss."""
        cfg, gen, dev = self.cfg, ctx.generator, self._head_device()
        n = fresh.shape[0]
        b = cfg.disc_batch_size or n
        n_replay = round(b * cfg.replay_fraction) if len(self.buffer) else 0
        records: list[dict[str, float]] = []
        for _ in range(max(updates, 1)):
            real_prompts = [prompts[i] for i in torch.randint(n, (b,), generator=gen).tolist()]
            real = self.features(self.references.draw(real_prompts, gen, *size).to(dev), gen)
            fresh_idx = torch.randperm(n, generator=gen)[: b - n_replay] if b - n_replay <= n else None
            if fresh_idx is None:
                fresh_idx = torch.randint(n, (b - n_replay,), generator=gen)
            fake = fresh[fresh_idx.to(fresh.device)]
            if n_replay:
                fake = torch.cat([fake, self.buffer.sample(n_replay, gen, cfg.replay_sampling).to(dev)])
            if updates == 0:
                with torch.no_grad():
                    _, st = discriminator_loss(self.head(real), self.head(fake), cfg.loss, cfg.patch_weight)
            else:
                loss, st = discriminator_loss(self.head(real), self.head(fake), cfg.loss, cfg.patch_weight)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                ctx.sync_gradients(self.head.parameters())
                self.opt.step()
            records.append(st)
        first = {f"disc_{k}": v for k, v in records[0].items()}  # the discriminator that scored the step's samples
        return first | {"disc_loss_last": records[-1]["loss"], "disc_updates": float(updates)}

    def reference_mean(self, ctx: StepContext, prompts: list[str], size: tuple[int, int]) -> float:
        """m_ref: the mean reward of one batch of references under the current discriminator, over processes."""
        real = self.references.draw(prompts, ctx.generator, *size)
        value = self.reward_scores(real, prompts).double().mean().reshape(1)
        return float(ctx.gather(value).mean())

    # ------------------------------------------------------------------------------ step
    def step(self, ctx: StepContext, batches: list[PromptBatch]) -> StepResult:
        cfg, sampler = self.cfg, ctx.sampler
        self.steps_done += 1
        rollout = self.collect(ctx, batches, sampler)  # rewards: the discriminator before this step's updates
        images, prompts = rollout.images, rollout.trajectories.prompts
        size = (images.shape[-2], images.shape[-1])
        fresh = self.features(images.float(), ctx.generator).to(self._head_device())
        stats: dict[str, float] = {}
        if cfg.schedule == "every_k":
            policy = self.steps_done % cfg.policy_every == 0
            updates = cfg.disc_steps
        else:
            m_gen = float(rollout.gathered_rewards[self.reward_key].double().mean())
            m_ref = self.reference_mean(ctx, prompts, size)
            policy = m_ref > m_gen
            updates = 0 if policy else cfg.disc_steps
            stats |= {"disc_reward_ref": m_ref, "disc_reward_gen": m_gen}
        stats |= self.train_discriminator(ctx, fresh, prompts, size, updates)
        self.buffer.push(ctx.gather(fresh.contiguous()).cpu())
        stats |= {"policy_update": float(policy), "replay_size": float(len(self.buffer))}
        if policy:
            adv, group_stats = self.local_advantages(ctx, rollout)
            st = self.train_epochs(ctx, rollout.trajectories, adv, sampler)
        else:
            adv = torch.zeros(len(rollout.trajectories))
            zero = zero_std_fraction(rollout.gathered_reward, rollout.gathered_group_ids)
            group_stats, st = {"zero_std_fraction": zero}, GRPOStats()
        shown = images[-len(batches[-1].local) * cfg.group_size :]
        return st.result(rollout.trajectories, adv, shown, **group_stats, **stats, **rollout.stats)

    # ------------------------------------------------------------------------ evaluation
    def eval_stats(self, ctx: StepContext, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """The discriminator on held-out references vs the evaluation's policy images: ``adv/acc`` (mean of
        ``adv/acc_real``, real when s > 0, and ``adv/acc_fake``) and the mean rewards ``adv/reward_real`` /
        ``adv/reward_fake``. Near 1: the policy is easily told apart (reward saturated); near 0.5: the
        policy matches the references' features, or the discriminator collapsed (docs/training.md)."""
        size = (images.shape[-2], images.shape[-1])
        real = self.references.heldout_images(prompts, self.cfg.eval_references, *size)
        s_real, s_fake = self.scores(real), self.scores(images)
        acc_real, acc_fake = float((s_real > 0).float().mean()), float((s_fake < 0).float().mean())
        bound = self.cfg.reward, self.cfg.reward_clip
        return {
            "adv/acc": (acc_real + acc_fake) / 2,
            "adv/acc_real": acc_real,
            "adv/acc_fake": acc_fake,
            "adv/reward_real": float(bounded_reward(s_real, *bound).mean()),
            "adv/reward_fake": float(bounded_reward(s_fake, *bound).mean()),
        }


# ---------------------------------------------------------------------------------------- registry
def validate_adv_grpo(cfg: DiffalignConfig) -> None:
    """GRPO's checks; ``adversarial`` exactly once in ``reward.rewards`` and never in ``eval.rewards``; a
    known backbone; the reference folder exists and holds images (or shapes prompts for ``shapes``)."""
    from reward_models import RewardSpec
    from reward_models.backbones import backbone_kinds

    validate_grpo(cfg)
    g = cfg.method_config
    names = [RewardSpec.parse(r).name for r in cfg.reward.rewards]
    if names.count(REWARD_NAME) != 1:
        raise DiffalignError(
            f"adv_grpo trains on its discriminator's reward: list {REWARD_NAME} exactly once in reward.rewards "
            f"(alone: reward.rewards=[{REWARD_NAME}]; with others: reward.rewards=[{REWARD_NAME},shapes_clip]), "
            f"got {cfg.reward.rewards}"
        )
    if any(RewardSpec.parse(r).name == REWARD_NAME for r in cfg.eval.rewards):
        raise DiffalignError(
            f"eval.rewards: {REWARD_NAME} is the training discriminator (its accuracy is logged as adv/acc); drop it"
        )
    if g.backbone not in backbone_kinds():
        raise DiffalignError(f"adv_grpo.backbone {g.backbone!r} is unknown; use one of {', '.join(backbone_kinds())}")
    if g.reference == "shapes":
        from diffalign.prompts import load_prompts, non_shapes_prompt

        bad = non_shapes_prompt(load_prompts(cfg.prompts.train, "prompts.train"))
        if bad is not None:
            raise DiffalignError(
                f"adv_grpo.reference=shapes renders the training prompts, but {bad!r} is not a shapes caption; "
                "give adv_grpo.reference=FOLDER of reference images"
            )
    else:
        list_reference_images(g.reference)


register_method(
    MethodEntry("adv_grpo", AdvGRPO, AdvGRPOConfig, "adv_grpo", False, validate_adv_grpo, samplers=("ddim", "flow"))
)
