"""Train the shapes-world text-to-image pipeline shipped in ``assets/shapes-sd/`` (resumable).

Stages (each resumes from its own checkpoint in ``--work``; a finished stage is skipped):

1. ``vae``   a tiny AutoencoderKL (64x64x3 <-> 16x16x4), trained on 32x32 random crops of scenes.
2. ``data``  renders training scenes, encodes them once to scaled latents, tokenizes the captions.
3. ``unet``  a tiny UNet2DConditionModel + CLIP text encoder trained jointly with the epsilon
             objective (10% caption dropout for classifier-free guidance), EMA of the weights.
4. ``export`` writes a standard diffusers StableDiffusionPipeline directory (EMA weights, DDIM).

Example (background, logs and checkpoints under runs/shapes-sd/):

    python scripts/train_shapes_sd.py --work runs/shapes-sd --unet-steps 6000 --export assets/shapes-sd

Killing it at any moment and running the same command again continues where it stopped.
Run it alone on a small CPU: two torch processes at once slow each other down many times over.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from asset_utils import atomic_save, log  # noqa: E402

from diffalign.shapes.data import random_specs, render_batch  # noqa: E402
from diffalign.shapes.tokenizer import build_tokenizer_files  # noqa: E402

MAX_TOKENS = 32


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def make_tokenizer(work: Path):
    from transformers import CLIPTokenizer

    tok_dir = build_tokenizer_files(work / "tokenizer_files")
    return CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=MAX_TOKENS)


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=64,
    )
    return CLIPTextModel(cfg)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's schedule and DDIM settings.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


# ---------------------------------------------------------------- stage 1: VAE
def train_vae(work: Path, steps: int, batch: int) -> None:
    ckpt = work / "vae.pt"
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
    if step >= steps:
        return
    log(work, f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, from step {step} to {steps}")
    t0 = time.time()
    while step < steps:
        images = render_batch(random_specs("train", batch, seed=10_000 + step), seed=10_000 + step)
        ij = torch.randint(0, 33, (2,))
        x = images[:, :, ij[0] : ij[0] + 32, ij[1] : ij[1] + 32] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / (4 * 8 * 8)
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == steps:
            log(work, f"vae step {step} loss {loss.item():.4f} kl {kl.item():.2f} {(time.time() - t0) / 50:.2f}s/step")
            t0 = time.time()
        if step % 200 == 0 or step == steps:
            atomic_save(
                {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "rng": torch.get_rng_state()}, ckpt
            )


def load_vae(work: Path):
    vae = make_vae()
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=False)["vae"])
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------- stage 2: data
@torch.no_grad()
def build_data(work: Path, n: int) -> None:
    path = work / "data.pt"
    if path.exists():
        return
    vae = load_vae(work)
    tokenizer = make_tokenizer(work)
    specs = random_specs("train", n, seed=1)
    latents = []
    for i in range(0, n, 500):
        images = render_batch(specs[i : i + 500], seed=1_000_000 + i)
        latents.append(vae.encode(images * 2 - 1).latent_dist.mean)
    latents = torch.cat(latents)
    scaling = float(1.0 / latents.std())
    captions = [s.caption() for s in specs]
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    atomic_save({"latents": latents * scaling, "ids": ids, "empty": empty, "scaling_factor": scaling}, path)
    log(work, f"data: {n} latents, scaling_factor {scaling:.4f}")


# ---------------------------------------------------------------- stage 3: UNet + text encoder
def train_unet(work: Path, steps: int, batch: int, lr: float) -> None:
    from diffusers import DDPMScheduler

    ckpt = work / "unet.pt"
    data = torch.load(work / "data.pt", weights_only=False)
    tokenizer = make_tokenizer(work)
    unet, text = make_unet(), make_text_encoder(tokenizer)
    unet = unet.to(memory_format=torch.channels_last)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
    if step >= steps:
        return
    sched = DDPMScheduler.from_config(make_scheduler().config)
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    log(
        work,
        f"unet: {n_params:.2f} M params, text {sum(p.numel() for p in text.parameters()) / 1e6:.2f} M, from step {step} to {steps}",
    )
    latents, ids, empty = data["latents"], data["ids"], data["empty"]
    t0 = time.time()
    while step < steps:
        idx = torch.randint(0, latents.shape[0], (batch,))
        x0, tok = latents[idx], ids[idx].clone()
        drop = torch.rand(batch) < 0.1
        tok[drop] = empty
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        xt = sched.add_noise(x0, noise, t).contiguous(memory_format=torch.channels_last)
        cond = text(tok).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in ((unet, ema_unet), (text, ema_text)):
                for p, q in zip(m.parameters(), e.parameters(), strict=True):
                    q.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(work, f"unet step {step} loss {loss.item():.4f} {(time.time() - t0) / 50:.2f}s/step")
            t0 = time.time()
        if step % 250 == 0 or step == steps:
            state = {
                "unet": unet.state_dict(),
                "text": text.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "rng": torch.get_rng_state(),
            }
            atomic_save(state, ckpt)
            if step % 1000 == 0:
                atomic_save(
                    {"ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(), "step": step},
                    work / f"ema_{step:06d}.pt",
                )


# ---------------------------------------------------------------- stage 4: export
def export(work: Path, out: Path, ema_file: Path | None = None) -> None:
    """Write a plain diffusers StableDiffusionPipeline directory from the EMA weights."""
    from diffusers import StableDiffusionPipeline

    data = torch.load(work / "data.pt", weights_only=False)
    tokenizer = make_tokenizer(work)
    unet, text = make_unet(), make_text_encoder(tokenizer)
    state = torch.load(ema_file or (work / "unet.pt"), weights_only=False)
    unet.load_state_dict(state["ema_unet"])
    text.load_state_dict(state["ema_text"])
    vae = load_vae(work)
    vae.register_to_config(scaling_factor=data["scaling_factor"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet.to(memory_format=torch.contiguous_format),
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "shapes_info.json").write_text(json.dumps({"unet_step": state["step"], "world_version": 1}, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    log(work, f"exported step {state['step']} to {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/shapes-sd"), help="checkpoints and log.txt")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--data", type=int, default=40_000, help="number of pre-encoded training scenes")
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--export", type=Path, default=None, help="pipeline directory to write at the end")
    p.add_argument(
        "--export-from", type=Path, default=None, help="an ema_*.pt snapshot to export instead of the latest"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    train_vae(args.work, args.vae_steps, args.vae_batch)
    build_data(args.work, args.data)
    train_unet(args.work, args.unet_steps, args.batch, args.lr)
    if args.export:
        export(args.work, args.export, args.export_from)


if __name__ == "__main__":
    main()
