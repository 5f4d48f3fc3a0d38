"""The reward zoo on tiny random backbones saved like the real weights (no downloads).

Every reward is loaded through the public path ``get_reward("name:model=TMP,...")`` and checked for the
contract (shape [B], float32, finite, deterministic, batch-order invariant, frozen), gradients (only
for differentiable rewards), input validation and load errors. Preprocessing done in torch is
compared with each backbone's own processor on a fixed image.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rewards_fixtures import (
    CLIP_MEAN,
    CLIP_STD,
    TinyImageReward,
    aesthetic_head_state,
    make_dinov2_dir,
    make_hps,
    make_imagereward,
    make_open_clip_dir,
    make_pickscore_dir,
    shapes_batch,
    textured_image,
)

from diffalign.errors import DiffalignError
from reward_models import (
    Reward,
    RewardSpec,
    differentiable_rewards,
    get_reward,
    list_rewards,
    register_reward,
    require_differentiable,
)
from reward_models.registry import parse_value, reward_class

ALL = [
    "clip_score",
    "shapes_clip",
    "aesthetic",
    "hps",
    "pickscore",
    "imagereward",
    "dino_similarity",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "saturation",
    "shapes_gold",
]
DIFFERENTIABLE = {
    "clip_score",
    "shapes_clip",
    "shapes_clip_flawed",
    "aesthetic",
    "hps",
    "pickscore",
    "imagereward",
    "dino_similarity",
    "saturation",
}

# Measured on the fixed 40x48 / 64x64 / 100x80 / 24x20 test images (see test_preprocess_*):
# max |ours - processor| over the normalised pixel tensor 0.013-0.047 (PIL rounds the resized image to
# uint8; we do not), mean 0.003-0.006; embedding cosine >= 0.9999998.
PIXEL_MAX_TOL = 0.06
PIXEL_MEAN_TOL = 0.008
EMBED_COS_TOL = 0.9999


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network in tests: Hub lookups fail at once instead of retrying."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@dataclasses.dataclass
class Tiny:
    open_clip: Path
    shapes_clip: Path
    head: Path
    hps_arch: Path
    hps_ckpt: Path
    hps_model: torch.nn.Module
    pickscore: Path
    dino: Path
    references: Path
    imagereward: TinyImageReward

    def spec(self, name: str) -> str:
        return {
            "clip_score": f"clip_score:model=local-dir:{self.open_clip}",
            "shapes_clip": f"shapes_clip:model=local-dir:{self.shapes_clip}",
            "aesthetic": f"aesthetic:clip_model=local-dir:{self.open_clip},head={self.head}",
            "hps": f"hps:model=local-dir:{self.hps_arch},checkpoint={self.hps_ckpt}",
            "pickscore": f"pickscore:model={self.pickscore},processor={self.pickscore}",
            "imagereward": f"imagereward:model={self.imagereward.model_dir},tokenizer={self.imagereward.tokenizer_dir}",
            "dino_similarity": f"dino_similarity:model={self.dino},references={self.references}",
            "jpeg_compressibility": "jpeg_compressibility",
            "jpeg_incompressibility": "jpeg_incompressibility",
            "saturation": "saturation",
            "shapes_gold": "shapes_gold",
        }[name]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny_rewards")
    head = root / "aesthetic_head.pth"
    torch.save(aesthetic_head_state(32), head)
    hps_arch, hps_ckpt, hps_model = make_hps(root / "hps")
    refs = root / "refs"
    refs.mkdir()
    Image.fromarray(textured_image(40, 48)).save(refs / "a.png")
    Image.fromarray(textured_image(64, 64, seed=1)).save(refs / "b.png")
    return Tiny(
        open_clip=make_open_clip_dir(root / "open_clip"),
        shapes_clip=make_open_clip_dir(root / "shapes_clip", seed=5, asset_style=True),
        head=head,
        hps_arch=hps_arch,
        hps_ckpt=hps_ckpt,
        hps_model=hps_model,
        pickscore=make_pickscore_dir(root / "pickscore"),
        dino=make_dinov2_dir(root / "dino"),
        references=refs,
        imagereward=make_imagereward(root / "imagereward"),
    )


@pytest.fixture(scope="session")
def loaded(tiny: Tiny) -> dict[str, Reward]:
    """Each reward loaded once through ``get_reward``."""
    return {name: get_reward(tiny.spec(name)) for name in ALL}


@pytest.fixture(scope="session")
def batch() -> tuple[torch.Tensor, list[str]]:
    return shapes_batch()


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ALL)
def test_contract(loaded: dict[str, Reward], batch: tuple[torch.Tensor, list[str]], name: str) -> None:
    reward = loaded[name]
    images, prompts = batch
    assert reward.name == name and reward.differentiable == (name in DIFFERENTIABLE)
    lo, hi = reward.range
    assert lo < hi
    assert not any(p.requires_grad for p in reward.parameters())
    out = reward(images, prompts)
    assert out.shape == (len(prompts),) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, reward(images, prompts)), "two calls differ"
    perm = torch.tensor([2, 0, 3, 1])
    permuted = reward(images[perm], [prompts[i] for i in perm])
    torch.testing.assert_close(permuted, out[perm], rtol=1e-5, atol=1e-5)
    reward.train()
    assert not any(m.training for m in reward.modules()), "rewards stay in eval mode"


@pytest.mark.parametrize("name", ALL)
def test_gradients(loaded: dict[str, Reward], batch: tuple[torch.Tensor, list[str]], name: str) -> None:
    reward = loaded[name]
    images, prompts = batch
    x = images.clone().mul(0.98).add(0.01).requires_grad_(True)  # away from the clamp at 0 / 1
    out = reward(x, prompts)
    if name in DIFFERENTIABLE:
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0
        # each score depends only on its own image
        x2 = images.clone().requires_grad_(True)
        reward(x2, prompts)[1].backward()
        assert x2.grad[[0, 2, 3]].abs().max() == 0 and x2.grad[1].abs().max() > 0
    else:
        assert not out.requires_grad and out.grad_fn is None


def test_dtype_and_device_arguments(tiny: Tiny, batch: tuple[torch.Tensor, list[str]]) -> None:
    images, prompts = batch
    reward = get_reward(tiny.spec("clip_score"), device="cpu", dtype=torch.bfloat16)
    assert reward.dtype == torch.bfloat16
    out = reward(images, prompts)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = get_reward(tiny.spec("clip_score"))(images, prompts)
    assert (out - ref).abs().max() < 0.05


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs(loaded: dict[str, Reward], batch: tuple[torch.Tensor, list[str]], name: str) -> None:
    reward = loaded[name]
    images, prompts = batch
    with pytest.raises(DiffalignError) as err:
        reward(images * 2 - 1, prompts)
    assert_one_line(err, name, "[-1, 1]", "(images + 1) / 2")
    with pytest.raises(DiffalignError) as err:
        reward(images * 255, prompts)
    assert_one_line(err, "0-255", "divide by 255")
    with pytest.raises(DiffalignError) as err:
        reward((images * 255).to(torch.uint8), prompts)
    assert_one_line(err, "uint8", "images.float() / 255")
    with pytest.raises(DiffalignError) as err:
        reward(images.permute(0, 2, 3, 1), prompts)
    assert_one_line(err, "expected [B, 3, H, W]", "channels-last")
    with pytest.raises(DiffalignError) as err:
        reward(images[0], prompts[:1])
    assert_one_line(err, "unsqueeze(0)")
    with pytest.raises(DiffalignError) as err:
        reward(images, prompts[:3])
    assert_one_line(err, "4 images but 3 prompts")
    with pytest.raises(DiffalignError) as err:
        reward(images[:1], prompts[0])
    assert_one_line(err, "list of strings")
    nan = images.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(DiffalignError) as err:
        reward(nan, prompts)
    assert_one_line(err, "NaN")
    # a small overshoot (VAE decode) is tolerated
    assert torch.isfinite(reward((images * 1.0005).clamp(max=1.0005), prompts)).all()


@pytest.mark.parametrize("name", ALL)
def test_unknown_option(tiny: Tiny, name: str) -> None:
    spec = tiny.spec(name)
    with pytest.raises(DiffalignError) as err:
        get_reward(spec + ("," if ":" in spec else ":") + "bogus=1")
    msg = assert_one_line(err, f"reward '{name}' has no option 'bogus'", "accepted options:")
    first_option = next(iter(inspect.signature(reward_class(name).__init__).parameters.keys() - {"self"}))
    assert first_option in msg


def test_missing_weights_paths(tiny: Tiny, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    cases = {
        f"clip_score:model=local-dir:{missing}": ["does not exist", "open_clip_config.json"],
        f"clip_score:model=local-dir:{tiny.hps_arch}": ["no weights", "open_clip_model.safetensors"],
        f"clip_score:model=ViT-B-32,pretrained={missing}.pt": ["neither a known tag", "nope.pt"],
        "clip_score:model=ViT-Q-99": ["unknown open_clip architecture", "ViT-Q-99"],
        f"aesthetic:clip_model=local-dir:{tiny.open_clip},head={missing}.pth": ["aesthetic head", "does not exist"],
        f"hps:model=local-dir:{tiny.hps_arch},checkpoint={missing}.pt": ["HPS v2.1 checkpoint", "does not exist"],
        f"pickscore:model={missing},processor={tiny.pickscore}": ["PickScore model path", "CLIPModel directory"],
        f"pickscore:model={tiny.pickscore},processor={missing}": ["PickScore processor", "CLIPProcessor"],
        f"imagereward:model={missing},tokenizer={tiny.imagereward.tokenizer_dir}": ["ImageReward.pt", "med_config"],
        f"imagereward:model={tiny.imagereward.model_dir},tokenizer={missing}": ["tokenizer", "vocab.txt"],
        f"dino_similarity:model={missing},references={tiny.references}": ["DINOv2 model", "Dinov2Model"],
        f"dino_similarity:model={tiny.dino},references={missing}": ["references", "directory of images"],
        f"dino_similarity:model={tiny.dino},references={tmp_path}": ["holds no images"],
    }
    for spec, parts in cases.items():
        with pytest.raises(DiffalignError) as err:
            get_reward(spec)
        assert_one_line(err, *parts)


def test_hub_ids_fail_offline_with_one_line(tiny: Tiny) -> None:
    cases = {
        "pickscore:model=nobody-xyz/no-model": "nobody-xyz/no-model",
        f"dino_similarity:model=nobody-xyz/no-dino,references={tiny.references}": "nobody-xyz/no-dino",
        f"imagereward:model=nobody-xyz/no-ir,tokenizer={tiny.imagereward.tokenizer_dir}": "nobody-xyz/no-ir",
        "hps:model=local-dir:" + str(tiny.hps_arch) + ",checkpoint=hf-hub:nobody-xyz/hps/x.pt": "hf-hub:nobody-xyz",
        f"aesthetic:clip_model=local-dir:{tiny.open_clip}": "trl-lib/ddpo-aesthetic-predictor",
        "clip_score:model=hf-hub:nobody-xyz/no-clip": "nobody-xyz/no-clip",
        "clip_score:model=ViT-B-32,pretrained=openai": "Failed to download weights for tag 'openai'",
    }
    for spec, part in cases.items():
        with pytest.raises(DiffalignError) as err:
            get_reward(spec)
        assert_one_line(err, part, "expected")


def test_bad_checkpoints(tiny: Tiny, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"foo": torch.zeros(2)}}, wrong)
    with pytest.raises(DiffalignError) as err:
        get_reward(f"hps:model=local-dir:{tiny.hps_arch},checkpoint={wrong}")
    assert_one_line(err, "does not fit", "missing keys")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DiffalignError) as err:
        get_reward(f"hps:model=local-dir:{tiny.hps_arch},checkpoint={garbage}")
    assert_one_line(err, "garbage.pt")
    head64 = tmp_path / "head64.pth"
    torch.save(aesthetic_head_state(64), head64)
    with pytest.raises(DiffalignError) as err:
        get_reward(f"aesthetic:clip_model=local-dir:{tiny.open_clip},head={head64}")
    assert_one_line(err, "64-d embeddings", "32-d")
    with pytest.raises(DiffalignError) as err:
        get_reward(f"clip_score:model=local-dir:{tiny.open_clip},pretrained=openai2")
    assert_one_line(err, "drop pretrained")


# --------------------------------------------------------------------------------------------- registry


def test_list_and_classes() -> None:
    assert set(ALL) <= set(list_rewards())
    assert set(differentiable_rewards()) == DIFFERENTIABLE
    for name in ALL:
        assert reward_class(name).name == name


def test_spec_parsing() -> None:
    spec = RewardSpec.parse("clip_score:model=local-dir:/a/b,pretrained=none,scale=2.5,weight=0.5")
    assert spec.name == "clip_score" and spec.weight == 0.5
    assert spec.options == {"model": "local-dir:/a/b", "pretrained": None, "scale": 2.5}
    assert str(spec) == "clip_score:model=local-dir:/a/b,pretrained=none,scale=2.5,weight=0.5"
    plug = RewardSpec.parse("my_pkg.rewards:Ocr:lang=en,n=3,on=true")
    assert plug.name == "my_pkg.rewards:Ocr" and plug.options == {"lang": "en", "n": 3, "on": True}
    assert RewardSpec.parse("jpeg_compressibility") == RewardSpec("jpeg_compressibility", {}, 1.0)
    assert RewardSpec.parse("my_pkg.rewards:Ocr").options == {}
    assert [parse_value(v) for v in ("1", "-2", "1e-3", ".5", "True", "x", "v2.1", "NONE")] == [
        1,
        -2,
        1e-3,
        0.5,
        True,
        "x",
        "v2.1",
        None,
    ]
    for bad, part in {
        "": "empty reward spec",
        "clip_score:model": "not key=value",
        "clip_score:scale=1,scale=2": "given twice",
        "clip_score:weight=heavy": "weight must be a number",
        "clip score": "not a reward name",
        "my-pkg.x:Y": "plug-in",
    }.items():
        with pytest.raises(DiffalignError) as err:
            RewardSpec.parse(bad)
        assert_one_line(err, part)


def test_unknown_name_and_options() -> None:
    with pytest.raises(DiffalignError) as err:
        get_reward("clipscore")
    assert_one_line(err, "unknown reward 'clipscore'", "did you mean 'clip_score'", "jpeg_compressibility")
    with pytest.raises(DiffalignError) as err:
        get_reward("jpeg_compressibility:qualty=50")
    assert_one_line(err, "no option 'qualty'", "did you mean 'quality'", "accepted options: quality")
    with pytest.raises(DiffalignError) as err:
        get_reward("clip_score:scale=big")
    assert_one_line(err, "option scale expects float", "big")
    with pytest.raises(DiffalignError) as err:
        get_reward("shapes_gold:mode=exact")
    assert_one_line(err, "mode must be one of score, correct")
    with pytest.raises(DiffalignError) as err:
        get_reward("dino_similarity")
    assert_one_line(err, "needs option references=")
    with pytest.raises(DiffalignError) as err:
        get_reward("hps:version=3")
    assert_one_line(err, "unknown HPS version")


def test_plugins() -> None:
    reward = get_reward("rewards_fixtures:ConstantReward:value=2.5,weight=3")
    images, prompts = shapes_batch()
    assert torch.equal(reward(images, prompts), torch.full((4,), 2.5))
    assert reward.spec.weight == 3.0 and reward.name == "constant"
    with pytest.raises(DiffalignError) as err:
        get_reward("rewards_fixtures:textured_image")
    assert_one_line(err, "not a subclass of reward_models.Reward")
    with pytest.raises(DiffalignError) as err:
        get_reward("no_such_pkg.mod:Thing")
    assert_one_line(err, "cannot import reward plug-in module 'no_such_pkg.mod'")
    with pytest.raises(DiffalignError) as err:
        get_reward("rewards_fixtures:NoSuchClass")
    assert_one_line(err, "has no attribute 'NoSuchClass'")
    with pytest.raises(DiffalignError) as err:
        get_reward("rewards_fixtures:ConstantReward:valu=1")
    assert_one_line(err, "accepted options: value")


def test_register_reward_rules() -> None:
    with pytest.raises(ValueError):
        register_reward("clip_score")(type("Other", (Reward,), {"score": lambda self, i, p: i.sum((1, 2, 3))}))
    with pytest.raises(TypeError):
        register_reward("not_a_reward")(dict)
    with pytest.raises(ValueError):
        register_reward("bad name")


def test_require_differentiable(loaded: dict[str, Reward]) -> None:
    require_differentiable(["clip_score", "hps:version=v2", loaded["aesthetic"]], "alignprop")
    with pytest.raises(DiffalignError) as err:
        require_differentiable(["clip_score", "jpeg_compressibility"], "alignprop")
    msg = assert_one_line(
        err,
        "method 'alignprop' backpropagates through the reward, but reward 'jpeg_compressibility' is not "
        "differentiable; use a policy-gradient method such as 'ddpo' or pick a differentiable reward (",
    )
    for name in DIFFERENTIABLE:
        assert name in msg
    with pytest.raises(DiffalignError):
        require_differentiable([loaded["shapes_gold"]], "draft")


# ------------------------------------------------------------------------------------ per-reward checks


def _fixed_image(h: int, w: int) -> tuple[Image.Image, torch.Tensor]:
    arr = textured_image(h, w)
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0


def _assert_pixels_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()
    assert diff.max() <= PIXEL_MAX_TOL, f"max {diff.max():.4f}"
    assert diff.mean() <= PIXEL_MEAN_TOL, f"mean {diff.mean():.4f}"


SIZES = [(40, 48), (64, 64), (100, 80), (24, 20)]


@pytest.mark.parametrize("hw", SIZES)
def test_preprocess_matches_open_clip(loaded: dict[str, Reward], hw: tuple[int, int]) -> None:
    reward = loaded["clip_score"]
    pil, x = _fixed_image(*hw)
    ours, theirs = reward.pixel_values(x), reward.transform(pil)[None]
    _assert_pixels_close(ours, theirs)
    with torch.no_grad():
        a = F.normalize(reward.clip.encode_image(ours), dim=-1)
        b = F.normalize(reward.clip.encode_image(theirs), dim=-1)
    assert (a * b).sum() >= EMBED_COS_TOL


@pytest.mark.parametrize("hw", SIZES)
def test_preprocess_matches_hps_resize_max_size(loaded: dict[str, Reward], hw: tuple[int, int]) -> None:
    import open_clip

    # HPSv2's ResizeMaxSize(fill=0) == open_clip's resize_mode="longest" (fit the longest side, zero-pad)
    transform = open_clip.image_transform(32, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, resize_mode="longest")
    pil, x = _fixed_image(*hw)
    _assert_pixels_close(loaded["hps"].pixel_values(x), transform(pil)[None])


@pytest.mark.parametrize("hw", SIZES)
def test_preprocess_matches_clip_image_processor(loaded: dict[str, Reward], hw: tuple[int, int]) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    reward = loaded["pickscore"]
    pil, x = _fixed_image(*hw)
    ours = reward.pixels(x)
    _assert_pixels_close(ours, reward.processor(images=pil, return_tensors="pt").pixel_values)
    ip = reward.processor.image_processor
    pil_backend = CLIPImageProcessorPil(
        size=ip.size, crop_size=ip.crop_size, image_mean=ip.image_mean, image_std=ip.image_std
    )
    _assert_pixels_close(ours, pil_backend(images=pil, return_tensors="pt").pixel_values)


@pytest.mark.parametrize("hw", SIZES)
def test_preprocess_matches_bit_image_processor(loaded: dict[str, Reward], hw: tuple[int, int]) -> None:
    reward = loaded["dino_similarity"]
    pil, x = _fixed_image(*hw)
    theirs = reward.processor(images=pil, return_tensors="pt").pixel_values
    ours = reward.pixels(x)
    _assert_pixels_close(ours, theirs)
    with torch.no_grad():
        a = reward.dino(pixel_values=ours).pooler_output
        b = reward.dino(pixel_values=theirs).pooler_output
    assert F.cosine_similarity(a, b).min() >= EMBED_COS_TOL


@pytest.mark.parametrize("hw", SIZES)
def test_preprocess_matches_imagereward_transform(loaded: dict[str, Reward], hw: tuple[int, int]) -> None:
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    # ImageReward/ImageReward.py _transform(n_px), with n_px = the tiny model's 32
    transform = Compose(
        [
            Resize(32, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(32),
            ToTensor(),
            Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    pil, x = _fixed_image(*hw)
    _assert_pixels_close(loaded["imagereward"].pixel_values(x), transform(pil)[None])


def test_clip_score_values(tiny: Tiny, loaded: dict[str, Reward], batch: tuple[torch.Tensor, list[str]]) -> None:
    images, prompts = batch
    reward = loaded["clip_score"]
    with torch.no_grad():
        img = F.normalize(reward.clip.encode_image(reward.pixel_values(images)), dim=-1)
        txt = F.normalize(reward.clip.encode_text(reward.tokenizer(prompts)), dim=-1)
    cos = (img * txt).sum(-1)
    torch.testing.assert_close(reward(images, prompts), cos)
    scaled = get_reward(tiny.spec("clip_score") + ",scale=100")
    torch.testing.assert_close(scaled(images, prompts), 100 * cos, rtol=1e-5, atol=1e-4)
    clipscore = get_reward(tiny.spec("clip_score") + ",clipscore_w=2.5")
    torch.testing.assert_close(clipscore(images, prompts), 2.5 * cos.clamp(min=0))
    assert clipscore.range == (0.0, 2.5)
    # shapes_clip is the same score with another default model (here an asset-style dir: fp16, no size)
    shapes_clip = loaded["shapes_clip"]
    assert shapes_clip.pp_size == (32, 32) and shapes_clip.dtype == torch.float32
    same = get_reward(f"clip_score:model=local-dir:{tiny.shapes_clip}")
    torch.testing.assert_close(shapes_clip(images, prompts), same(images, prompts))


def test_clip_score_contrastive(
    tiny: Tiny, loaded: dict[str, Reward], batch: tuple[torch.Tensor, list[str]], tmp_path: Path
) -> None:
    images, prompts = batch
    negatives = ["two red circles", prompts[0], "a blue square", "a blue square", "three green triangles"]
    neg_file = tmp_path / "negatives.txt"
    neg_file.write_text("\n".join(negatives) + "\n\n")
    reward = get_reward(tiny.spec("clip_score") + f",negatives={neg_file}")
    tau = float(loaded["clip_score"].clip.logit_scale.exp())
    assert reward.temperature == pytest.approx(tau) and reward.range == (-float("inf"), 0.0)
    assert reward.negatives == ["two red circles", prompts[0], "a blue square", "three green triangles"]
    base = loaded["clip_score"]
    with torch.no_grad():
        img = F.normalize(base.clip.encode_image(base.pixel_values(images)), dim=-1).double()
    expected = []
    for i, prompt in enumerate(prompts):  # independent: one caption list per image, a plain softmax over it
        captions = [prompt] + [n for n in reward.negatives if n != prompt]
        with torch.no_grad():
            txt = F.normalize(base.clip.encode_text(base.tokenizer(captions)), dim=-1).double()
        logits = tau * txt @ img[i]
        expected.append(float(logits[0] - torch.logsumexp(logits, 0)))
    got = reward(images, prompts)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert bool((got <= 0).all())
    cooler = get_reward(tiny.spec("clip_score") + f",negatives={neg_file},temperature=1")
    assert float(cooler(images, prompts).std()) < float(got.std())  # tau = 1: nearly uniform over captions
    # differentiable, and shapes_clip takes the same options
    x = images.clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    shapes = get_reward(tiny.spec("shapes_clip") + ",negatives=shapes:train")
    assert len(shapes.negatives) == 105 and bool((shapes(images, prompts) <= 0).all())
    for options, words in [
        (f"negatives={tmp_path / 'missing.txt'}", ["does not exist"]),
        (f"negatives={neg_file},clipscore_w=2.5", ["either negatives", "clipscore_w"]),
        ("temperature=5", ["only applies with negatives"]),
        (f"negatives={neg_file},temperature=0", ["temperature must be > 0"]),
    ]:
        with pytest.raises(DiffalignError) as err:
            get_reward(tiny.spec("clip_score") + "," + options)
        assert_one_line(err, *words)


def test_shapes_clip_missing_asset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import reward_models.clip_score as cs

    monkeypatch.setattr(cs, "SHAPES_CLIP_DIR", tmp_path / "assets" / "shapes-clip")
    with pytest.raises(DiffalignError) as err:
        get_reward("shapes_clip")
    assert_one_line(err, "shapes CLIP asset is missing", "python scripts/train_shapes_clip.py", "model=local-dir:")


def test_aesthetic_head_layout(tiny: Tiny, loaded: dict[str, Reward], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = aesthetic_head_state(32)
    reward = loaded["aesthetic"]
    assert [type(m).__name__ for m in reward.head] == ["Linear", "Dropout"] * 3 + ["Linear", "Linear"]
    assert {f"layers.{k}" for k in reward.head.state_dict()} == set(state)
    images, prompts = shapes_batch()
    with torch.no_grad():
        emb = F.normalize(reward.clip.encode_image(reward.pixel_values(images)), dim=-1)
        x = emb
        for i in (0, 2, 4, 6, 7):  # the original MLP has no activations
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(reward(images, prompts), x.squeeze(-1))
    st = tmp_path / "head.safetensors"
    save_file(state, str(st))
    again = get_reward(f"aesthetic:clip_model=local-dir:{tiny.open_clip},head={st}")
    torch.testing.assert_close(again(images, prompts), x.squeeze(-1))


def test_hps_uses_checkpoint_weights(tiny: Tiny, loaded: dict[str, Reward]) -> None:
    images, prompts = shapes_batch()
    model = tiny.hps_model.eval()
    reward = loaded["hps"]
    with torch.no_grad():
        img = F.normalize(model.encode_image(reward.pixel_values(images)), dim=-1)
        txt = F.normalize(model.encode_text(reward.tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(reward(images, prompts), (img * txt).sum(-1))
    v2 = get_reward(f"hps:version=2,model=local-dir:{tiny.hps_arch},checkpoint={tiny.hps_ckpt}")
    assert v2.version == "v2"
    raw = tiny.hps_ckpt.parent / "raw.pt"  # a bare state dict (no "state_dict" wrapper) also loads
    torch.save(model.state_dict(), raw)
    torch.testing.assert_close(
        get_reward(f"hps:model=local-dir:{tiny.hps_arch},checkpoint={raw}")(images, prompts), reward(images, prompts)
    )


def test_pickscore_matches_reference_usage(tiny: Tiny, loaded: dict[str, Reward]) -> None:
    """PickScore's README: processor on PIL images, normalised features, logit_scale.exp() * dot."""
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = shapes_batch()
    processor = CLIPProcessor.from_pretrained(tiny.pickscore)
    model = CLIPModel.from_pretrained(tiny.pickscore).eval()
    pils = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    with torch.no_grad():
        image_inputs = processor(images=pils, return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        out = model.get_image_features(**image_inputs)
        img = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
        out = model.get_text_features(**text_inputs)
        txt = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
        expected = model.logit_scale.exp() * (img * txt).sum(-1)
    torch.testing.assert_close(loaded["pickscore"](images, prompts), expected, rtol=0, atol=0.05)


def test_imagereward_matches_blip_modules(tiny: Tiny, loaded: dict[str, Reward]) -> None:
    """The renamed checkpoint reproduces BLIP's ViT (timm, same code) and the ImageReward head formula."""
    from reward_models.imagereward import SCORE_MEAN, SCORE_STD

    reward = loaded["imagereward"]
    src = tiny.imagereward
    images, prompts = shapes_batch()
    pixels = reward.pixel_values(images)
    with torch.no_grad():
        ours = reward.vision(pixel_values=pixels).last_hidden_state
        theirs = src.vit.forward_features(pixels)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        tokens = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        assert tokens.input_ids.shape == (4, 35) and (tokens.input_ids[:, 0] == 2).all()  # [CLS] first
        hidden = src.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=theirs,
            encoder_attention_mask=torch.ones(theirs.shape[:-1], dtype=torch.long),
        ).last_hidden_state[:, 0]
        x = hidden
        for i in (0, 2, 4, 6, 7):
            x = x @ src.head[f"mlp.layers.{i}.weight"].T + src.head[f"mlp.layers.{i}.bias"]
    torch.testing.assert_close(reward(images, prompts), (x.squeeze(-1) - SCORE_MEAN) / SCORE_STD, rtol=1e-4, atol=1e-4)


def test_jpeg_values(loaded: dict[str, Reward]) -> None:
    import io

    images, prompts = shapes_batch()
    buffer = io.BytesIO()
    arr = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(buffer, format="JPEG", quality=95)
    size_kb = buffer.tell() / 1000
    comp = loaded["jpeg_compressibility"](images, prompts)
    incomp = loaded["jpeg_incompressibility"](images, prompts)
    assert comp[0].item() == pytest.approx(-size_kb) and torch.equal(comp, -incomp)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert loaded["jpeg_compressibility"](flat, ["x"]) > loaded["jpeg_compressibility"](noise, ["x"])
    low = get_reward("jpeg_incompressibility:quality=30")(images, prompts)
    assert (low < incomp).all()
    with pytest.raises(DiffalignError):
        get_reward("jpeg_compressibility:quality=0")


def test_shapes_gold_values(loaded: dict[str, Reward]) -> None:
    images, prompts = shapes_batch()
    assert torch.equal(loaded["shapes_gold"](images, prompts), torch.ones(4))
    swapped = [prompts[1], prompts[0], prompts[3], prompts[2]]
    score = loaded["shapes_gold"](images, swapped)
    assert (score < 1).all() and (score >= 0).all()
    correct = get_reward("shapes_gold:mode=correct")
    assert torch.equal(correct(images, prompts), torch.ones(4))
    assert torch.equal(correct(images, swapped), torch.zeros(4))
    with pytest.raises(DiffalignError) as err:
        loaded["shapes_gold"](images, ["a photo of a cat"] + prompts[1:])
    assert_one_line(err, "cannot parse shapes caption", "a photo of a cat")


def test_dino_references(tiny: Tiny, loaded: dict[str, Reward], tmp_path: Path) -> None:
    reward = loaded["dino_similarity"]
    assert reward.references.shape[0] == 2
    ref = torch.from_numpy(textured_image(40, 48)).permute(2, 0, 1)[None].float() / 255
    single = get_reward(f"dino_similarity:model={tiny.dino},references={tiny.references / 'a.png'}")
    assert single(ref, [""]).item() == pytest.approx(1.0, abs=1e-5)  # the reference itself
    images, prompts = shapes_batch()
    best = get_reward(tiny.spec("dino_similarity") + ",reduce=max")
    assert (best(images, prompts) >= reward(images, prompts) - 1e-6).all()
    emb = tmp_path / "refs.pt"
    torch.save(reward.references.clone(), emb)
    from_emb = get_reward(f"dino_similarity:model={tiny.dino},references={emb}")
    torch.testing.assert_close(from_emb(images, prompts), reward(images, prompts))
    torch.save(torch.zeros(2, 7), emb)
    with pytest.raises(DiffalignError) as err:
        get_reward(f"dino_similarity:model={tiny.dino},references={emb}")
    assert_one_line(err, "must be a tensor [N, 32]")


@pytest.mark.parametrize(
    ("value", "is_path"),
    [
        ("bert-base-uncased", False),
        ("yuvalkirstain/PickScore_v1", False),
        ("/models/pickscore", True),
        ("./pickscore", True),
        ("~/models/x", True),
        ("models/pick/score", True),
        ("HPS_v2.1_compressed.pt", True),
        ("C:\\models\\x", True),
    ],
)
def test_local_path_or_hub_id(value: str, is_path: bool) -> None:
    from reward_models.loading import local_or_hub, looks_like_path

    assert looks_like_path(value) == is_path
    if is_path:
        with pytest.raises(DiffalignError, match="does not exist; expected LAYOUT"):
            local_or_hub(value, "model", "LAYOUT")
    else:
        assert local_or_hub(value, "model", "LAYOUT") == value
