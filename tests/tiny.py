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


def _vae(seed: int = 0, **flow: float | bool):
    """The tiny VAE (4 latent channels); ``flow``: the flow families' ``scaling_factor``, ``shift_factor`` and
    ``use_quant_conv`` / ``use_post_quant_conv`` (False)."""
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
        **flow,
    )


def _flow_vae(scaling_factor: float, shift_factor: float, seed: int):
    """:func:`_vae` with a flow family's scaling and shift factors and no quant convs (SD3, FLUX)."""
    return _vae(
        seed,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
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
    vae = _flow_vae(1.5305, 0.0609, seed)  # SD3's scaling and shift factors
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


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer (``T5TokenizerFast``) over the shapes world, built in code: a ``tokenizers`` Unigram model
    whose pieces are the world's words (``▁red``) and single characters, T5's specials (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2) and its ``$A </s>`` post-processor; it saves as ``tokenizer.json`` and reloads offline."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from diffalign.shapes.tokenizer import WORDS

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -float(i)) for i, w in enumerate(WORDS)]
    vocab += [("▁", -50.0)] + [(c, -60.0) for c in string.ascii_lowercase + string.digits + ".,"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def build_flux(tmp: Path, seed: int = 0, schnell: bool = False):
    """FluxPipeline: a one double-stream + one single-stream block FLUX transformer on 4-channel latents (packed 2x2
    into 16-wide tokens), a CLIP (pooled projections) and a tiny T5 (the sequence), and FLUX-dev's scheduler with
    dynamic shifting and its distilled guidance embedding; ``schnell``: FLUX-schnell's shape instead (no guidance
    embedding, a static shift of 1).
    The VAE has FLUX's kind of scaling and shift factors. Images are 16x16 at 8x8 latents: 16 image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer(tmp)
    t5_tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = _flow_vae(0.3611, 0.1159, seed)  # FLUX's scaling and shift factors
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0 if schnell else 3.0,
        use_dynamic_shifting=not schnell,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_text_encoder(tokenizer, seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def save_flux(tmp: Path, seed: int = 0, schnell: bool = False, max_sequence_length: int = 16) -> Path:
    """:func:`build_flux` saved at ``tmp/pipe`` with a ``diffalign.json`` giving the default image size (16)
    and the T5 sequence length."""
    import json

    pipe = build_flux(tmp, seed, schnell)
    pipe.save_pretrained(tmp / "pipe")
    settings = {"max_sequence_length": max_sequence_length, "image_size": 16}
    (tmp / "pipe" / "diffalign.json").write_text(json.dumps(settings))
    return tmp / "pipe"
