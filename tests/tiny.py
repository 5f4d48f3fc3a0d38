"""Tiny random SD- and SDXL-shaped pipelines built offline (sizes after diffusers' own dummy components)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_tokenizer(tmp: Path, max_length: int = 16):
    """A real CLIP BPE tokenizer (vocabulary trimmed to the shapes world), saved nowhere else."""
    from transformers import CLIPTokenizer

    from diffalign.shapes.tokenizer import build_tokenizer_files

    files = build_tokenizer_files(tmp / "tok_files")
    return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=max_length)


def _text_encoder(tokenizer, hidden: int = 32, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_sd(tmp: Path, seed: int = 0):
    """StableDiffusionPipeline: UNet (4, 8) channels at 8x8 latents (16x16 images)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=_vae(seed),
        text_encoder=_text_encoder(tokenizer, seed=seed),
        tokenizer=tokenizer,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl(tmp: Path, seed: int = 0):
    """StableDiffusionXLPipeline: two text encoders, text_time added conditioning, 8x8 latents."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=4,
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(seed),
        text_encoder=_text_encoder(tokenizer, seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, projection=True, seed=seed + 1),
        tokenizer_2=tokenizer,
        scheduler=_ddim(),
    )


def build_sd3(tmp: Path, seed: int = 0):
    """StableDiffusion3Pipeline: a two-block MMDiT at 8x8 latents (16x16 images), two CLIPs, no T5.

    Sizes after diffusers' SD3 dummy components; ``joint_attention_dim`` is the two CLIPs' concatenated
    width (64), so the prompt sequence is theirs plus T5's zeros (the pipeline's ``text_encoder_3=None``
    path). The VAE has a shift factor, as SD3's does, so decoding checks it.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tokenizer = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,  # the last block is context-pre-only (no to_add_out); the first has every projection
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_text_encoder(tokenizer, projection=True, seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, projection=True, seed=seed + 1),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
