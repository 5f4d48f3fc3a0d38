"""scripts/train_shapes_flow.py at a tiny size: training, exact resume, export, loading, sampling, evaluation."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import train_shapes_flow as tsf  # noqa: E402

TINY = ["--data", "16", "--batch", "4", "--layers", "1", "--width", "32", "--head-dim", "16"]
TINY += ["--threads", "1", "--log-every", "1", "--ckpt-every", "1000", "--warmup", "2"]
PROMPTS = ["a red circle", "two blue squares"]


def _run(work: Path, steps: int, *extra: str) -> dict | None:
    return tsf.main(["--work", str(work), "--steps", str(steps), *TINY, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps straight, exported (fp16) and evaluated on 2 held-out prompts with 2 ODE steps."""
    work = tmp_path_factory.mktemp("flow") / "straight"
    row = _run(work, 4, "--export", str(work / "pipe"), "--eval", "2", "--eval-steps", "2")
    assert row is not None and row["n"] == 2 and 0.0 <= row["accuracy"] <= 1.0 and row["step"] == 4
    assert json.loads((work / "eval.jsonl").read_text().splitlines()[-1]) == row
    return work


def test_resume_after_two_steps_equals_four_steps_straight(trained: Path, tmp_path: Path) -> None:
    work = tmp_path / "resumed"
    _run(work, 2)
    assert torch.load(work / "flow.pt", weights_only=False)["step"] == 2
    _run(work, 4)
    a = torch.load(trained / "flow.pt", weights_only=False)
    b = torch.load(work / "flow.pt", weights_only=False)
    assert a["step"] == b["step"] == 4 and torch.equal(a["rng"], b["rng"])
    for key in ("trainable", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert "from step 2 to 4" in (work / "log.txt").read_text()
    with pytest.raises(SystemExit):  # another architecture on the same checkpoint: one line
        _run(work, 6, "--layers", "2")


def test_export_loads_in_plain_diffusers_and_diffalign_with_the_same_images(trained: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from diffalign.pipelines import draw_images, load_pipeline, sequence_length

    pipe_dir = trained / "pipe"
    assert json.loads((pipe_dir / "diffalign.json").read_text()) == {"max_sequence_length": 0}
    plain = StableDiffusion3Pipeline.from_pretrained(
        str(pipe_dir), text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    plain.set_progress_bar_config(disable=True)
    theirs = plain(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=3.0,
        max_sequence_length=0,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="pt",
    ).images
    ours_pipe = load_pipeline(str(pipe_dir))
    assert sequence_length(ours_pipe) == 0
    ours = draw_images(ours_pipe, PROMPTS, [0, 1], steps=3, guidance=3.0, eta=0.0)
    assert theirs.shape == ours.shape == (2, 3, 64, 64)
    assert torch.allclose(theirs, ours, atol=1e-6)


def test_link_vae_export_holds_the_base_vae_once_and_loads(trained: Path) -> None:
    from diffusers import AutoencoderKL

    from diffalign.pipelines import load_pipeline

    linked = trained / "linked"
    _run(trained, 4, "--export", str(linked), "--link-vae")  # training is done: export only
    weights = linked / tsf.VAE_WEIGHTS
    assert weights.is_symlink() and not Path(weights.readlink()).is_absolute()
    assert weights.resolve() == (tsf.DEFAULT_BASE / tsf.VAE_WEIGHTS).resolve()
    assert tsf.dir_mb(linked) < tsf.dir_mb(trained / "pipe")
    base_vae = AutoencoderKL.from_pretrained(tsf.DEFAULT_BASE / "vae")
    pipe = load_pipeline(str(linked))
    for name, value in base_vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name].float(), value.float()), name
    own = json.loads((linked / "vae" / "config.json").read_text())  # SD3's latent shift and scale, not SD's
    assert own["shift_factor"] is not None and own["scaling_factor"] != base_vae.config.scaling_factor


def test_training_conditioning_equals_what_diffalign_encodes(trained: Path) -> None:
    """The cached CLIP outputs + projection heads used in training equal encode_prompts on the pipeline."""
    from diffalign.pipelines import encode_prompts, set_sequence_length

    arch = tsf.Arch(layers=1, width=32, head_dim=16)
    pipe, step = tsf.build_pipeline(trained, tsf.DEFAULT_BASE, arch)
    assert step == 4
    set_sequence_length(pipe, 0)
    data = torch.load(trained / "data.pt", weights_only=False)
    idx = torch.tensor([0, len(data["captions"]) - 1])  # a caption and ""
    trainable = torch.nn.ModuleDict(
        {"proj1": pipe.text_encoder.text_projection, "proj2": pipe.text_encoder_2.text_projection}
    )
    with torch.no_grad():
        context, pooled = tsf.conditioning(trainable, data["hidden"][idx], data["pooled"][idx])
        cond = encode_prompts(pipe, [data["captions"][0]], guidance=True)
    assert cond.cond.shape == (1, 32, 128)  # 32 CLIP tokens, no T5 tokens
    assert torch.allclose(cond.cond, context[:1], atol=1e-6) and torch.allclose(cond.uncond, context[1:], atol=1e-6)
    assert torch.allclose(cond.added_cond["pooled_projections"], pooled[:1], atol=1e-6)
    assert torch.allclose(cond.added_uncond["pooled_projections"], pooled[1:], atol=1e-6)


def test_diffalign_sample_on_the_export_writes_images(trained: Path, tmp_path: Path, capsys) -> None:
    from diffalign.cli import main

    out = tmp_path / "samples"
    args = ["sample", "--model", str(trained / "pipe"), "--prompt", "a red circle", "--n", "2", "--steps", "2"]
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 2 and (out / "grid" / "grid.png").is_file()


def test_bad_settings_file_and_bad_options_are_one_line_errors(trained: Path, tmp_path: Path, capsys) -> None:
    from diffalign.errors import DiffalignError
    from diffalign.pipelines import load_pipeline

    bad = tmp_path / "pipe"
    shutil.copytree(trained / "pipe", bad)
    (bad / "diffalign.json").write_text('{"max_sequence_length": 9999}')
    with pytest.raises(DiffalignError, match=r"max_sequence_length must be an integer in \[0, 512\]"):
        load_pipeline(str(bad))
    (bad / "diffalign.json").write_text('{"max_seq_len": 0}')
    with pytest.raises(DiffalignError, match="unknown setting 'max_seq_len'"):
        load_pipeline(str(bad))
    for option, message in (("--patch=3", "--patch must be 1, 2 or 4"), ("--width=40", "multiple of --head-dim")):
        with pytest.raises(SystemExit) as exc:
            _run(tmp_path / "w", 1, option)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("train_shapes_flow.py: error: ") and message in err


def test_default_model_fits_the_asset_budget() -> None:
    """The default MMDiT in fp16 plus the two fp16 CLIPs and the fp16 VAE stay well under 10 MB."""
    transformer = tsf.make_transformer(tsf.Arch(), text_width=64, projection_dim=64)
    n = sum(p.numel() for p in transformer.parameters())
    assert 1e6 < n < 3e6
    base = sum(
        f.stat().st_size for part in ("vae", "text_encoder") for f in (tsf.DEFAULT_BASE / part).glob("*.safetensors")
    )
    clip = sum(f.stat().st_size for f in (tsf.DEFAULT_BASE / "text_encoder").glob("*.safetensors"))
    assert 2 * n + (base + clip) / 2 < 10 * 2**20
