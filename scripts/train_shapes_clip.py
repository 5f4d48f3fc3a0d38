"""Train the shapes-world proxy reward: a tiny open_clip CLIP, shipped in ``assets/shapes-clip/`` (resumable).

Contrastive image-text training (CLIP, Radford et al. 2021, arXiv 2103.00020, Eq. in Fig. 3) on
shapes scenes of every split, with one *hard negative* caption per image (one attribute changed:
a color, a shape or a count), and image augmentations (blur, noise, color jitter) so that it
scores imperfect generated images smoothly. The result is an honest proxy: correlated with the
exact gold verifier, not identical to it (it has never seen generated images and it is small).

Stage 2 (``--finetune-3obj N``, used for the shipped asset with N = 300) continues with three-object
scenes in a quarter of each batch and count negatives that also *add* an object: without it the CLIP,
which had only seen one- and two-object scenes, could not tell "one object too many" from right, and
reward fine-tuning walked straight into that blind spot (docs/training.md).

The asset directory uses open_clip's own local layout (``open_clip_config.json`` +
``open_clip_model.safetensors``), loaded by ``open_clip.create_model("local-dir:assets/shapes-clip")``
exactly as a hub checkpoint would be. Weights are stored in fp16 (loaded into fp32).

    python scripts/train_shapes_clip.py --work runs/shapes-clip --steps 1000 --finetune-3obj 300 \
        --export assets/shapes-clip
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from asset_utils import atomic_save, log  # noqa: E402

from diffalign.shapes.data import render_batch  # noqa: E402
from diffalign.shapes.splits import all_specs  # noqa: E402
from diffalign.shapes.world import COLORS, MAX_OBJECTS, SHAPES, SceneSpec  # noqa: E402
from reward_models.preprocess import CLIP_MEAN as MEAN  # noqa: E402
from reward_models.preprocess import CLIP_STD as STD  # noqa: E402

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
# ``--size small``: the ensemble members and the hackable proxy (about 1.9 MB each in fp16; most of it is
# the 49,408-token embedding open_clip's tokenizer needs, hence the narrow text tower)
SMALL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}
SIZES = {"base": MODEL_CFG, "small": SMALL_CFG}
PALETTE = [(c, s) for c in COLORS for s in SHAPES]  # every (color, shape) object


def swap_attribute(obj: tuple[str, str], kind: str, rng: random.Random) -> tuple[str, str]:
    """``obj`` = (color, shape) with its color or its shape replaced by another one."""
    if kind == "color":
        return (rng.choice([c for c in COLORS if c != obj[0]]), obj[1])
    return (obj[0], rng.choice([s for s in SHAPES if s != obj[1]]))


def hard_negative(spec: SceneSpec, rng: random.Random, add_objects: bool = False) -> SceneSpec:
    """The same scene with one attribute changed (color, shape or count of one object).

    Stage 1: a count change adds a copy to a one-object scene and removes an object otherwise.
    ``add_objects`` (stage 2): count changes are twice as likely and also add an object (a copy of
    one, or a random one) up to ``MAX_OBJECTS``, half of the time when the scene has room.
    """
    objects = spec.objects()
    kinds = ["color", "shape", "count"] + (["count"] if add_objects else [])
    for _ in range(100):
        objs = list(objects)
        i = rng.randrange(len(objs))
        kind = rng.choice(kinds)
        if kind in ("color", "shape"):
            objs[i] = swap_attribute(objs[i], kind, rng)
        elif not add_objects and len(objs) == 1:
            objs.append(objs[0])
        elif add_objects and len(objs) < MAX_OBJECTS and (len(objs) == 1 or rng.random() < 0.5):
            objs.append(rng.choice(objs) if rng.random() < 0.7 else rng.choice(PALETTE))
        else:
            objs.pop(i)
        neg = SceneSpec.from_objects(objs)
        if neg != spec:
            return neg
    raise RuntimeError("no hard negative")  # pragma: no cover


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur, pixel noise and color jitter (images in [0, 1])."""
    b = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    w = torch.rand(b, 1, 1, 1, generator=g)
    x = w * blurred + (1 - w) * x
    x = x * (1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5))
    x = x + torch.randn(x.shape, generator=g) * 0.06 * torch.rand(b, 1, 1, 1, generator=g)
    return x.clamp(0, 1)


def load_state(ckpt: Path, model, opt, g: torch.Generator, rng: random.Random) -> int:
    """Restore a training checkpoint written by :func:`save_state`; returns its step."""
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    g.set_state(state["gen"])
    rng.setstate(state["rng"])
    return int(state["step"])


def save_state(ckpt: Path, model, opt, step: int, g: torch.Generator, rng: random.Random) -> None:
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step}
    atomic_save(state | {"gen": g.get_state(), "rng": rng.getstate()}, ckpt)


def update(model, opt, loss: torch.Tensor) -> None:
    """One AdamW step, then CLIP's clamp of the logit scale at 100."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, 4.6052)


def clip_loss(model, tokenizer, images: torch.Tensor, captions: list[str], negatives: list[str]):
    """CLIP's symmetric contrastive loss with one hard-negative caption per image; returns (loss, logits)."""
    b = images.shape[0]
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(captions + negatives)), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T  # [B, 2B]: B positives then B hard negatives
    target = torch.arange(b)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)), logits


def finetune_three_objects(args, model, tokenizer, pool, specs) -> None:
    """Stage 2 (``--finetune-3obj N``): teach the CLIP that one object too many is wrong.

    Stage 1 renders world-v1 scenes only (1-2 objects) and its count negatives only remove objects,
    so the CLIP never sees a third object and barely penalizes one (``scripts/probe_proxy.py``: 0.68
    preference for the correct render, chance 0.5). Stage 2 fine-tunes the stage-1 weights for N steps
    (AdamW lr 3e-4) on batches that are 1/4 random three-object scenes, with ``hard_negative(..., add_objects=True)``.
    Resumable from ``WORK/clip_ft.pt``.
    """
    seed2 = 1 if args.seed == 0 else 1 + 7919 * args.seed
    rng, g = random.Random(seed2), torch.Generator().manual_seed(seed2)
    three = [SceneSpec.from_objects([rng.choice(PALETTE) for _ in range(3)]) for _ in range(8000)]
    pool3_path = args.work / "pool3.pt"
    if not pool3_path.exists():
        images = torch.cat([render_batch(three[i : i + 1000], seed=9_000_000 + i) for i in range(0, 8000, 1000)])
        atomic_save({"images": (images * 255).byte()}, pool3_path)
    new_images = torch.load(pool3_path, weights_only=False)["images"]
    allowed3 = subset_indices(len(three), args.subset, seed2)
    old_specs = [specs[i] for i in pool["idx"]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    ckpt, step = args.work / "clip_ft.pt", 0
    if ckpt.exists():
        step = load_state(ckpt, model, opt, g, rng)
    log(args.work, f"clip stage 2 (three objects): from step {step} to {args.finetune_3obj}")
    b = args.batch
    n3 = b // 4
    while step < args.finetune_3obj:
        s1 = args.allowed[torch.randint(0, len(args.allowed), (b - n3,), generator=g)]
        s3 = allowed3[torch.randint(0, len(allowed3), (n3,), generator=g)]
        images = torch.cat([pool["images"][s1], new_images[s3]]).float() / 255
        batch_specs = [old_specs[i] for i in s1.tolist()] + [three[i] for i in s3.tolist()]
        images = normalize(augment(images, g))
        captions = [s.caption() for s in batch_specs]
        loss, logits = clip_loss(
            model, tokenizer, images, captions, [hard_negative(s, rng, add_objects=True).caption() for s in batch_specs]
        )
        update(model, opt, loss)
        step += 1
        if step % 50 == 0 or step == args.finetune_3obj:
            acc = (logits.argmax(1) == torch.arange(b)).float().mean()
            log(args.work, f"clip stage 2 step {step} loss {loss.item():.3f} acc {acc:.2f}")
            save_state(ckpt, model, opt, step, g, rng)


def subset_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """The scenes a member trains on: all ``n`` (in order) for ``fraction == 1``, else a random
    ``int(n * fraction)`` of them drawn with ``seed`` (ensemble members see different data)."""
    if fraction >= 1.0:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))[: int(n * fraction)].sort().values


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def export(model: torch.nn.Module, out: Path, model_cfg: dict) -> None:
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    save_file(
        {k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
        str(tmp / "open_clip_model.safetensors"),
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    import open_clip

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/shapes-clip"))
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=30_000, help="pre-rendered scenes to draw batches from")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export", type=Path, default=None)
    p.add_argument(
        "--finetune-3obj",
        type=int,
        default=0,
        help="after stage 1, fine-tune this many steps with three-object scenes and add-one-object negatives "
        "(the shipped asset uses 300; see docs/training.md)",
    )
    p.add_argument("--size", choices=sorted(SIZES), default="base", help="base: the shipped proxy; small: members")
    p.add_argument("--seed", type=int, default=0, help="initialization and batch order (0: the shipped proxy's)")
    p.add_argument("--subset", type=float, default=1.0, help="train on this fraction of the scenes (drawn by --seed)")
    p.add_argument("--pool-path", type=Path, default=None, help="pre-rendered scenes to share (default WORK/pool.pt)")
    args = p.parse_args(argv)
    if not 0.0 < args.subset <= 1.0:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model_cfg = SIZES[args.size]
    open_clip.factory._MODEL_CONFIGS["shapes-clip"] = model_cfg
    model = open_clip.create_model("shapes-clip")
    tokenizer = open_clip.get_tokenizer("shapes-clip")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    ckpt, step = args.work / "clip.pt", 0
    g = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    if ckpt.exists():
        step = load_state(ckpt, model, opt, g, rng)
    pool_path = args.pool_path or args.work / "pool.pt"
    if not pool_path.exists():
        specs = all_specs()
        idx = torch.randint(0, len(specs), (args.pool,), generator=torch.Generator().manual_seed(1)).tolist()
        chosen = [specs[i] for i in idx]
        images = torch.cat([render_batch(chosen[i : i + 1000], seed=7_000_000 + i) for i in range(0, args.pool, 1000)])
        atomic_save({"images": (images * 255).byte(), "idx": idx}, pool_path)
    pool = torch.load(pool_path, weights_only=False)
    specs = all_specs()
    args.allowed = subset_indices(len(pool["idx"]), args.subset, args.seed)
    log(
        args.work,
        f"clip: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, from step {step} to {args.steps}",
    )
    t0 = time.time()
    while step < args.steps:
        sel = args.allowed[torch.randint(0, len(args.allowed), (args.batch,), generator=g)]
        images = normalize(augment(pool["images"][sel].float() / 255, g))
        batch_specs = [specs[pool["idx"][i]] for i in sel.tolist()]
        captions = [s.caption() for s in batch_specs]
        negatives = [hard_negative(s, rng).caption() for s in batch_specs]
        loss, logits = clip_loss(model, tokenizer, images, captions, negatives)
        target = torch.arange(args.batch)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)
        update(model, opt, loss)
        step += 1
        if step % 50 == 0:
            acc = (logits.argmax(1) == target).float().mean()
            log(args.work, f"clip step {step} loss {loss.item():.3f} acc {acc:.2f} {(time.time() - t0) / 50:.2f}s/step")
            t0 = time.time()
        if step % 250 == 0 or step == args.steps:
            save_state(ckpt, model, opt, step, g, rng)
    if args.finetune_3obj:
        finetune_three_objects(args, model, tokenizer, pool, specs)
    if args.export:
        export(model, args.export, model_cfg)
        log(args.work, f"exported to {args.export}")


if __name__ == "__main__":
    main()
