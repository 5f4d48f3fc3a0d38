"""Train a tiny SD3-style (rectified-flow, MMDiT) shapes-world pipeline on top of ``assets/shapes-sd`` (resumable).

Reuses the SD pipeline's parts (``--base``): its VAE (64x64x3 <-> 16x16x4), tokenizer and CLIP text
encoder. The CLIP body is frozen and used twice, as SD3's ``text_encoder`` and ``text_encoder_2``
(``CLIPTextModelWithProjection``, each with its own new projection head); only the
``SD3Transformer2DModel`` and the two projection heads train. No T5: prompts are encoded with
``max_sequence_length`` 0 (CLIP tokens only, 32), written to the export's ``diffalign.json`` so
diffalign encodes them the same way (plain diffusers: pass ``max_sequence_length=0`` to ``pipe(...)``).

Stages (each resumes from its own file in ``--work``; a finished stage is skipped):

1. ``data``        renders training scenes, encodes them once with the base VAE (latent mean), normalizes
                   them SD3-style (``(z - shift) * scale``, shift = mean, scale = 1 / std), and caches the
                   frozen CLIP's outputs (penultimate states, pooled state) for every training caption and "".
2. ``transformer`` rectified flow: ``x_sigma = (1 - sigma) x0 + sigma eps``, target ``v = eps - x0``,
                   sigma logit-normal (or uniform) then shifted by ``--shift`` (the scheduler's shift),
                   10% caption dropout for guidance, EMA of the weights, atomic checkpoints.
3. ``export``      a diffusers StableDiffusion3Pipeline directory (EMA weights, fp16 by default).
4. ``eval``        (``--eval N``) held-out gold accuracy of the exported pipeline: N prompts sampled with
                   the pipeline's flow ODE (Euler) through ``diffalign.pipelines.draw_images``, scored by
                   the exact verifier; one JSON line in ``log.txt`` and ``eval.jsonl``.

Example (logs and checkpoints under runs/shapes-flow/):

    python scripts/train_shapes_flow.py --work runs/shapes-flow --export assets/shapes-flow --link-vae --eval 128

Killing it at any moment and running the same command again continues where it stopped (step,
optimizer, EMA and random state are in the checkpoint, so the result equals an uninterrupted run).
Run it alone on a small CPU: two torch processes at once slow each other down many times over.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from asset_utils import atomic_save, log  # noqa: E402

from diffalign.errors import DiffalignError  # noqa: E402
from diffalign.shapes.data import random_specs, render_batch  # noqa: E402

MAX_SEQUENCE_LENGTH = 0  # T5 tokens in the prompt sequence: none (CLIP's 32 only)
DEFAULT_BASE = Path(__file__).resolve().parent.parent / "assets" / "shapes-sd"


@dataclass(frozen=True)
class Arch:
    """What fixes the trained weights' shapes and the objective; kept in every checkpoint (checked on resume)."""

    layers: int = 4
    width: int = 112  # attention heads x head_dim (the MMDiT's inner width); the shipped model's
    head_dim: int = 28
    patch: int = 2
    shift: float = 1.0  # the flow scheduler's shift, used for training sigmas and sampling alike

    def check(self) -> None:
        """One-line errors for sizes the transformer cannot take."""
        if self.layers < 1:
            raise DiffalignError(f"--layers must be >= 1, got {self.layers}")
        if self.head_dim < 1 or self.width < self.head_dim or self.width % self.head_dim:
            raise DiffalignError(f"--width ({self.width}) must be a positive multiple of --head-dim ({self.head_dim})")
        if self.patch not in (1, 2, 4):
            raise DiffalignError(
                f"--patch must be 1, 2 or 4 (the 16x16 latents are cut into patches), got {self.patch}"
            )
        if not self.shift > 0:
            raise DiffalignError(f"--shift must be > 0, got {self.shift}")


# ---------------------------------------------------------------- the parts
def load_base(base: Path) -> tuple[Any, Any, Any]:
    """(vae, tokenizer, CLIPTextModel) of the SD pipeline directory ``base``, frozen, fp32."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    for part in ("vae", "tokenizer", "text_encoder"):
        if not (base / part).is_dir():
            raise DiffalignError(f"--base {base} has no {part}/: pass the shapes SD pipeline (assets/shapes-sd)")
    vae = AutoencoderKL.from_pretrained(base / "vae").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text = CLIPTextModel.from_pretrained(base / "text_encoder").eval().requires_grad_(False)
    return vae, tokenizer, text


def make_text_encoders(text) -> tuple[Any, Any]:
    """SD3's two CLIPs: the base CLIP body (frozen, rounded to fp16 values so training sees exactly the
    weights the fp16 export ships) with a new trainable projection head each (seeded by the caller)."""
    from transformers import CLIPTextModelWithProjection

    out = []
    for _ in range(2):
        te = CLIPTextModelWithProjection(text.config)
        te.text_model.load_state_dict(text.state_dict())
        with torch.no_grad():
            for p in te.text_model.parameters():
                p.copy_(p.half().float())
        te.text_model.requires_grad_(False)
        out.append(te.eval())
    return out[0], out[1]


def make_transformer(arch: Arch, text_width: int, projection_dim: int, latent_size: int = 16):
    """The MMDiT: ``joint_attention_dim`` = both CLIPs' widths, ``pooled_projection_dim`` = both projections."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=arch.patch,
        in_channels=4,
        out_channels=4,
        num_layers=arch.layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.width // arch.head_dim,
        joint_attention_dim=2 * text_width,
        caption_projection_dim=arch.width,
        pooled_projection_dim=2 * projection_dim,
        pos_embed_max_size=max(16, latent_size // arch.patch),
    )


def make_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_trainable(arch: Arch, base: Path, seed: int) -> tuple[torch.nn.ModuleDict, Any, Any]:
    """(trainable {transformer, proj1, proj2}, text_encoder, text_encoder_2), initialized from ``seed``."""
    _, _, text = load_base(base)
    torch.manual_seed(seed)
    te1, te2 = make_text_encoders(text)
    transformer = make_transformer(arch, text.config.hidden_size, text.config.projection_dim)
    trainable = torch.nn.ModuleDict(
        {"transformer": transformer, "proj1": te1.text_projection, "proj2": te2.text_projection}
    )
    return trainable, te1, te2


def conditioning(trainable: torch.nn.ModuleDict, hidden: torch.Tensor, pooled: torch.Tensor):
    """(encoder_hidden_states, pooled_projections) as StableDiffusion3Pipeline.encode_prompt builds them
    from cached CLIP outputs: both CLIPs' penultimate states side by side (here the same body twice, then
    no T5 tokens), and the two projected pooled states concatenated."""
    context = torch.cat([hidden, hidden], dim=-1)
    pooled_proj = torch.cat([trainable["proj1"](pooled), trainable["proj2"](pooled)], dim=-1)
    return context, pooled_proj


def sample_sigmas(n: int, generator: torch.Generator, weighting: str, shift: float) -> torch.Tensor:
    """Training noise levels: logit-normal (SD3's default, sigmoid of N(0, 1)) or uniform, then the
    scheduler's shift ``s sigma / (1 + (s - 1) sigma)``."""
    if weighting == "logit_normal":
        sigma = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        sigma = torch.rand(n, generator=generator)
    return shift * sigma / (1 + (shift - 1) * sigma)


# ---------------------------------------------------------------- stage 1: data
@torch.no_grad()
def build_data(work: Path, base: Path, n: int) -> None:
    """Latents of ``n`` training scenes, their caption index, and the frozen CLIP outputs per caption."""
    path = work / "data.pt"
    if path.exists():
        return
    vae, tokenizer, text = load_base(base)
    te, _ = make_text_encoders(text)
    specs = random_specs("train", n, seed=1)
    t0 = time.time()
    raw = []
    for i in range(0, n, 500):
        images = render_batch(specs[i : i + 500], seed=1_000_000 + i)
        raw.append(vae.encode(images * 2 - 1).latent_dist.mean)
    raw = torch.cat(raw)
    shift = float(raw.mean())
    scale = float(1.0 / (raw - shift).std())
    captions = sorted({s.caption() for s in specs}) + [""]  # "" last: the unconditional caption
    index = {c: i for i, c in enumerate(captions)}
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    out = te.text_model(ids, output_hidden_states=True)
    data = {
        "latents": (raw - shift) * scale,
        "caption_index": torch.tensor([index[s.caption()] for s in specs]),
        "captions": captions,
        "hidden": out.hidden_states[-2].contiguous(),  # SD3 uses the penultimate layer
        "pooled": out.pooler_output.contiguous(),
        "shift_factor": shift,
        "scaling_factor": scale,
    }
    atomic_save(data, path)
    log(
        work,
        f"data: {n} latents ({time.time() - t0:.0f} s), {len(captions) - 1} captions, shift {shift:.4f} scale {scale:.4f}",
    )


# ---------------------------------------------------------------- stage 2: transformer
def train(work: Path, base: Path, arch: Arch, args: argparse.Namespace) -> None:
    """Rectified-flow training of the transformer and projection heads, resumable bit for bit."""
    ckpt = work / "flow.pt"
    data = torch.load(work / "data.pt", weights_only=False)
    trainable, _, _ = build_trainable(arch, base, args.seed)
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ema = copy.deepcopy(trainable).requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["arch"] != asdict(arch):
            raise DiffalignError(
                f"{ckpt} was trained with {state['arch']}, not {asdict(arch)}: use the same options or another --work"
            )
        trainable.load_state_dict(state["trainable"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["rng"])
        step = state["step"]
    if step >= args.steps:
        return
    n_params = sum(p.numel() for p in trainable["transformer"].parameters())
    log(work, f"transformer: {n_params / 1e6:.3f} M params ({asdict(arch)}), from step {step} to {args.steps}")
    latents, cap_index = data["latents"], data["caption_index"]
    hidden, pooled, empty = data["hidden"], data["pooled"], len(data["captions"]) - 1
    transformer = trainable["transformer"].train()
    t0, t_step = time.time(), step
    while step < args.steps:
        idx = torch.randint(0, latents.shape[0], (args.batch,), generator=gen)
        x0, cap = latents[idx], cap_index[idx].clone()
        cap[torch.rand(args.batch, generator=gen) < args.uncond] = empty
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(args.batch, gen, args.weighting, arch.shift)
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * noise
        context, pooled_proj = conditioning(trainable, hidden[cap], pooled[cap])
        pred = transformer(
            hidden_states=x_sigma, timestep=sigma * 1000, encoder_hidden_states=context, pooled_projections=pooled_proj
        ).sample
        loss = F.mse_loss(pred, noise - x0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p, q in zip(trainable.parameters(), ema.parameters(), strict=True):
                q.lerp_(p, 1 - decay)
        if step % args.log_every == 0 or step == args.steps:
            rate = (time.time() - t0) / (step - t_step)
            log(work, f"flow step {step} loss {loss.item():.4f} {rate:.3f}s/step")
            t0, t_step = time.time(), step
        if step % args.ckpt_every == 0 or step == args.steps:
            state = {
                "trainable": trainable.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "rng": gen.get_state(),
                "step": step,
                "arch": asdict(arch),
            }
            atomic_save(state, ckpt)
        if step % 1000 == 0:  # kept for --export-from
            atomic_save({"ema": ema.state_dict(), "step": step, "arch": asdict(arch)}, work / f"ema_{step:06d}.pt")


# ---------------------------------------------------------------- stage 3: export
def build_pipeline(work: Path, base: Path, arch: Arch, ema_file: Path | None = None):
    """A StableDiffusion3Pipeline (fp32, in memory) from the EMA weights; also returns the step."""
    from diffusers import StableDiffusion3Pipeline

    source = ema_file or (work / "flow.pt")
    if not source.is_file():
        raise DiffalignError(f"nothing to export: {source} does not exist (train with --steps N first)")
    data = torch.load(work / "data.pt", weights_only=False)
    state = torch.load(source, weights_only=False)
    if state["arch"] != asdict(arch):
        raise DiffalignError(
            f"{source} holds {state['arch']}, not {asdict(arch)}: pass the options it was trained with"
        )
    trainable, te1, te2 = build_trainable(arch, base, seed=0)
    trainable.load_state_dict(state["ema"])  # the projection heads are te1's / te2's own modules
    vae, tokenizer, _ = load_base(base)
    vae.register_to_config(scaling_factor=data["scaling_factor"], shift_factor=data["shift_factor"])
    pipe = StableDiffusion3Pipeline(
        transformer=trainable["transformer"].eval(),
        scheduler=make_scheduler(arch.shift),
        vae=vae,
        text_encoder=te1,
        tokenizer=tokenizer,
        text_encoder_2=te2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return pipe, state["step"]


def dir_mb(path: Path) -> float:
    """Megabytes of the files under ``path`` (a symlink counts as 0: its target is stored elsewhere)."""
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


VAE_WEIGHTS = Path("vae") / "diffusion_pytorch_model.safetensors"


def export(
    work: Path, base: Path, arch: Arch, out: Path, dtype: str, ema_file: Path | None = None, link_vae: bool = False
) -> None:
    """Write a plain diffusers StableDiffusion3Pipeline directory (atomically: temp dir, then rename).

    ``link_vae``: the VAE's weight file becomes a relative symlink to ``base``'s (the same frozen VAE,
    kept in its stored precision), so the two shipped pipelines hold it once; only its config.json
    (SD3's latent shift and scale) is the export's own."""
    pipe, step = build_pipeline(work, base, arch, ema_file)
    modules = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2) + (() if link_vae else (pipe.vae,))
    for module in modules:
        # torch's own .to: diffusers' ModelMixin.to warns about fp32 modules these models do not have
        torch.nn.Module.to(module, {"float16": torch.float16, "float32": torch.float32}[dtype])
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if link_vae:
        target = (base / VAE_WEIGHTS).resolve()
        if not target.is_file():
            raise DiffalignError(f"--link-vae: {target} does not exist (is --base an SD pipeline directory?)")
        (tmp / VAE_WEIGHTS).unlink()
        (tmp / VAE_WEIGHTS).symlink_to(os.path.relpath(target, (out / VAE_WEIGHTS).parent.resolve()))
    (tmp / "diffalign.json").write_text(json.dumps({"max_sequence_length": MAX_SEQUENCE_LENGTH}, indent=1) + "\n")
    info = {"transformer_step": step, "world_version": 1, "arch": asdict(arch), "base": "assets/shapes-sd"}
    (tmp / "shapes_info.json").write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(work, f"exported step {step} to {out} ({dir_mb(out):.2f} MB, {dtype})")


# ---------------------------------------------------------------- stage 4: eval
def evaluate(work: Path, model: Path, n: int, steps: int, cfg: float, seed: int, batch: int = 32) -> dict:
    """Gold accuracy of ``model`` on ``n`` held-out prompts, sampled with the pipeline's flow ODE."""
    from diffalign.pipelines import draw_images, load_pipeline
    from diffalign.shapes import sample_prompts
    from diffalign.shapes.verifier import gold_accuracy, verify_batch

    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    prompts = sample_prompts("heldout", n, seed=seed + 1)
    t0 = time.time()
    images = torch.cat(
        [
            draw_images(
                pipe,
                prompts[i : i + batch],
                [seed + j for j in range(i, min(i + batch, n))],
                steps=steps,
                guidance=cfg,
                eta=0.0,
            )
            for i in range(0, n, batch)
        ]
    )
    gold = gold_accuracy(verify_batch(images, prompts))
    info = json.loads((model / "shapes_info.json").read_text()) if (model / "shapes_info.json").is_file() else {}
    row = {"split": "heldout", "n": n, "steps": steps, "cfg": cfg, "seed": seed, "step": info.get("transformer_step")}
    row |= {k: round(v, 4) for k, v in gold.items()} | {"seconds": round(time.time() - t0, 1)}
    log(work, "eval " + json.dumps(row))
    with open(work / "eval.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/shapes-flow"), help="checkpoints and log.txt")
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the shapes SD pipeline whose VAE/CLIP are reused")
    p.add_argument("--data", type=int, default=40_000, help="number of pre-encoded training scenes")
    p.add_argument("--steps", type=int, default=6_000, help="the shipped model: 6000")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warmup steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (ramped up from 0.1 over the first steps)")
    p.add_argument("--uncond", type=float, default=0.1, help="caption dropout probability (for guidance)")
    p.add_argument(
        "--weighting", choices=("logit_normal", "uniform"), default="logit_normal", help="how sigma is drawn"
    )
    p.add_argument("--layers", type=int, default=Arch.layers, help="MMDiT blocks")
    p.add_argument("--width", type=int, default=Arch.width, help="MMDiT width (heads x head dim)")
    p.add_argument("--head-dim", type=int, default=Arch.head_dim)
    p.add_argument("--patch", type=int, default=Arch.patch, help="patch size on the 16x16x4 latents")
    p.add_argument("--shift", type=float, default=Arch.shift, help="the flow scheduler's shift (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--export", type=Path, default=None, help="pipeline directory to write at the end")
    p.add_argument("--export-from", type=Path, default=None, help="an ema_*.pt snapshot to export instead")
    p.add_argument("--export-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument(
        "--link-vae",
        action="store_true",
        help="store the VAE weights as a relative symlink to --base's (the same frozen VAE, held once in assets/)",
    )
    p.add_argument("--eval", type=int, default=0, help="held-out prompts to sample and verify at the end (0: none)")
    p.add_argument("--eval-steps", type=int, default=20, help="Euler ODE steps of the evaluation")
    p.add_argument("--eval-cfg", type=float, default=5.0, help="guidance scale of the evaluation")
    p.add_argument("--eval-seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("data", "steps", "batch", "warmup", "threads", "log_every", "ckpt_every", "eval_steps"):
        if getattr(args, name) < 1 and not (name == "steps" and args.steps == 0):
            raise DiffalignError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval < 0:
        raise DiffalignError(f"--eval must be >= 0, got {args.eval}")
    if not 0.0 <= args.uncond < 1.0 or not 0.0 <= args.ema < 1.0:
        raise DiffalignError("--uncond and --ema must be in [0, 1)")
    if args.export_from is not None and not args.export_from.is_file():
        raise DiffalignError(f"--export-from {args.export_from}: no such file")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Run the stages; returns the evaluation row when ``--eval`` is given. Bad input: one line, exit 2."""
    try:
        return run(argv)
    except DiffalignError as exc:
        print(f"train_shapes_flow.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: list[str] | None = None) -> dict | None:
    """The stages in order (see the module docstring)."""
    args = parse_args(argv)
    arch = Arch(args.layers, args.width, args.head_dim, args.patch, args.shift)
    arch.check()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    build_data(args.work, args.base, args.data)
    train(args.work, args.base, arch, args)
    out = args.export
    if out is None and args.eval:
        out = args.work / "pipeline"
    if out is not None:
        export(args.work, args.base, arch, out, args.export_dtype, args.export_from, args.link_vae)
    if args.eval:
        return evaluate(args.work, out, args.eval, args.eval_steps, args.eval_cfg, args.eval_seed)
    return None


if __name__ == "__main__":
    main()
