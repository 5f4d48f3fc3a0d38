"""Tiny random reward backbones saved the way the real weights are laid out (no downloads).

Used by ``tests/test_rewards*.py`` and ``benchmarks/bench_rewards.py``. Every builder writes into a
directory and returns what a test needs to load it through the public path
(``get_reward("NAME:model=...")``). Sizes: images 32 px, widths 32-64, one layer per tower.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reward_models import Reward
from reward_models.preprocess import CLIP_MEAN, CLIP_STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
OPEN_CLIP_PREPROCESS = {
    "size": 32,
    "mean": list(CLIP_MEAN),
    "std": list(CLIP_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

SHAPES_CAPTIONS = [
    "a red circle",
    "two blue squares",
    "a green triangle and a yellow circle",
    "three purple circles",
]


def _randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Overwrite every floating parameter with N(0, std) noise (LayerNorm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith("weight") and p.ndim == 1:  # norm scales
                noise = noise + 1.0
            p.copy_(noise)


def make_open_clip_dir(path: Path, seed: int = 0, with_weights: bool = True, asset_style: bool = False) -> Path:
    """An open_clip ``local-dir`` layout: ``open_clip_config.json`` (+ ``open_clip_model.safetensors``).

    ``asset_style`` writes it as ``scripts/train_shapes_clip.py`` exports ``assets/shapes-clip``:
    fp16 weights and no ``size`` in ``preprocess_cfg`` (open_clip takes it from the model).
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    preprocess = {k: v for k, v in OPEN_CLIP_PREPROCESS.items() if not (asset_style and k == "size")}
    (path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": preprocess}, indent=2)
    )
    if with_weights:
        model = make_open_clip_model(seed)
        dtype = torch.float16 if asset_style else torch.float32
        state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / "open_clip_model.safetensors"))
    return path


def make_open_clip_model(seed: int = 0) -> torch.nn.Module:
    """The tiny open_clip CLIP with seeded random weights."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**json.loads(json.dumps(OPEN_CLIP_CFG)))
    _randomize_(model.visual, seed + 1, std=0.1)
    return model


def aesthetic_head_state(in_dim: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LAION-layout MLP head (keys ``layers.{0,2,4,6,7}``), widths shrunk: in -> 64 -> 16 -> 8 -> 4 -> 1."""
    torch.manual_seed(seed)
    head = torch.nn.Sequential(
        torch.nn.Linear(in_dim, 64),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(64, 16),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 8),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(8, 4),
        torch.nn.Linear(4, 1),
    )
    _randomize_(head, seed + 1, std=0.5)
    return {f"layers.{k}": v.clone() for k, v in head.state_dict().items()}


def make_hps(path: Path, seed: int = 3) -> tuple[Path, Path, torch.nn.Module]:
    """A config-only open_clip dir plus an HPS-style checkpoint ``{"state_dict": sd}``; returns the model too."""
    cfg_dir = make_open_clip_dir(path / "arch", with_weights=False)
    model = make_open_clip_model(seed)
    ckpt = path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return cfg_dir, ckpt, model


def _clip_vocab() -> tuple[list[str], list[str]]:
    letters = list(string.ascii_lowercase)
    vocab = letters + [c + "</w>" for c in letters] + ["re", "red</w>", "ci", "cir", "circle</w>"]
    merges = ["#version: 0.2", "r e", "re d</w>", "c i", "ci r", "cir c", "l e</w>"]
    vocab += ["circ", "le</w>", "<|startoftext|>", "<|endoftext|>"]
    return vocab, merges


def make_pickscore_dir(path: Path, seed: int = 1) -> Path:
    """A transformers CLIPModel + CLIPProcessor (tiny BPE vocab, 32 px images) in one directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab()
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=32)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    eos = vocab.index("<|endoftext|>")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": vocab.index("<|startoftext|>"),
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    _randomize_(model.vision_model, seed + 1, std=0.1)
    model.save_pretrained(path)
    return path


def make_dinov2_dir(path: Path, seed: int = 2) -> Path:
    """A transformers Dinov2Model (32 px, 8 px patches) + BitImageProcessor (shortest edge 36, crop 32)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path.mkdir(parents=True, exist_ok=True)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    model = Dinov2Model(config)
    _randomize_(model, seed + 1, std=0.1)
    model.save_pretrained(path)
    BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        resample=3,
    ).save_pretrained(path)
    return path


BERT_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(string.ascii_lowercase)
    + [
        "red",
        "blue",
        "green",
        "yellow",
        "purple",
        "circle",
        "square",
        "triangle",
        "two",
        "three",
        "and",
        "##s",
        ",",
        ".",
    ]
)


def make_bert_tokenizer(path: Path) -> Path:
    """A BERT WordPiece tokenizer with a tiny vocab (what ImageReward uses: bert-base-uncased)."""
    from transformers import BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    BertTokenizer(str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    return path


@dataclass
class TinyImageReward:
    """Files of a tiny ImageReward in the original layout, plus the modules that produced them."""

    model_dir: Path
    tokenizer_dir: Path
    vit: torch.nn.Module  # timm VisionTransformer: the same code as BLIP's vit.py
    text: torch.nn.Module  # transformers BlipTextModel (BLIP's med.py key names)
    head: dict[str, torch.Tensor]


def make_imagereward(path: Path, seed: int = 4) -> TinyImageReward:
    """``ImageReward.pt`` with original keys (``blip.visual_encoder.*`` from a timm ViT,
    ``blip.text_encoder.*``, ``mlp.layers.*``, plus unused ``blip.vision_proj``) and ``med_config.json``."""
    import timm.models.vision_transformer as vt
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    model_dir = path / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vit = vt.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=1,
        num_heads=1,
        mlp_ratio=2.0,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
    ).eval()
    _randomize_(vit, seed + 1, std=0.1)
    med = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "model_type": "bert",
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(BERT_VOCAB),
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    (model_dir / "med_config.json").write_text(json.dumps(med, indent=2))
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=len(BERT_VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=40,
            encoder_hidden_size=64,
            is_decoder=True,
            layer_norm_eps=1e-12,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            bos_token_id=None,
            sep_token_id=None,
        ),
        add_pooling_layer=False,
    ).eval()
    _randomize_(text, seed + 2, std=0.2)
    head = {f"mlp.{k}": v for k, v in aesthetic_head_state(32, seed + 3).items()}
    sd: dict[str, torch.Tensor] = {}
    sd.update({f"blip.visual_encoder.{k}": v.clone() for k, v in vit.state_dict().items()})
    sd.update({f"blip.text_encoder.{k}": v.clone() for k, v in text.state_dict().items()})
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1).clone()
    sd["blip.vision_proj.weight"] = torch.zeros(16, 64)
    sd["blip.text_proj.weight"] = torch.zeros(16, 32)
    sd.update(head)
    torch.save(sd, model_dir / "ImageReward.pt")
    return TinyImageReward(model_dir, make_bert_tokenizer(path / "tokenizer"), vit, text, head)


def shapes_batch(captions: list[str] | None = None, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Renders of shapes captions as ``[B, 3, size, size]`` in [0, 1], with the captions."""
    from diffalign.shapes.world import parse_caption, render

    captions = captions or SHAPES_CAPTIONS
    rng = np.random.default_rng(seed)
    arrays = [render(parse_caption(c), rng, size)[0] for c in captions]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return images, list(captions)


def textured_image(height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    """A fixed uint8 HxWx3 test image with edges, gradients and noise (for preprocessing checks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 3.0) * np.cos(yy / 4.0)], axis=-1)
    base[height // 4 : height // 2, width // 3 : 2 * width // 3] = (0.9, 0.1, 0.2)
    base += rng.normal(0, 0.05, base.shape)
    return (np.clip(base, 0, 1) * 255).round().astype(np.uint8)


class ConstantReward(Reward):
    """A plug-in reward for the registry tests: ``rewards_fixtures:ConstantReward:value=2.5``."""

    name = "constant"
    range = (0.0, 10.0)

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.value = float(value)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.full((images.shape[0],), self.value, device=images.device)
