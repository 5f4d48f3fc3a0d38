"""Adv-GRPO (diffalign/methods/adv_grpo.py; spec §6.2): the discriminator's loss falls under its updates,
its reward is finite and bounded, no gradient reaches the frozen backbone, the schedules, the replay
buffer, reference folders (prompts from sidecars; missing or empty: one line, also through the CLI),
a tiny end-to-end CLI run and an exact resume after a SIGKILL inside a checkpoint save (discriminator,
its Adam state and the replay buffer bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_ddpo_rollouts import FakeCtx
from test_method_state import _same
from train_fixtures import (
    assert_same_run,
    kill_inside_checkpoint_save,
    records,
    resume_latest,
    tiny_config,
    write_config,
)

from diffalign.checkpoint import MODULES_FILE
from diffalign.cli import main
from diffalign.config import DiffalignConfig, TrainConfig
from diffalign.errors import DiffalignError
from diffalign.methods import PromptBatch
from diffalign.methods.adv_grpo import (
    AdvGRPO,
    AdvGRPOConfig,
    DiscriminatorHead,
    FolderReferences,
    ReplayBuffer,
    bounded_reward,
    discriminator_loss,
    list_reference_images,
    mix_scores,
    select_tokens,
)
from reward_models import get_reward
from reward_models.adversarial import Adversarial
from reward_models.backbones import load_backbone

PROMPTS = ["a red circle", "two blue squares"]


# ------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(("kind", "at_zero"), [("hinge", 1.0), ("bce", float(np.log(2)))])
def test_discriminator_update_lowers_its_loss_on_a_fixed_batch(kind, at_zero):
    """At init (output layer 0) every score is 0: L_D = L0 (1 + w) (spec §6.2 sanity check 1: 1.3 for the
    hinge); Adam steps on one fixed batch lower it and raise mean s(real) - mean s(fake) (sanity check 2)."""
    gen = torch.Generator().manual_seed(0)
    real = torch.nn.functional.normalize(torch.randn(8, 5, 16, generator=gen) + 0.5, dim=-1)
    fake = torch.nn.functional.normalize(torch.randn(8, 5, 16, generator=gen) - 0.5, dim=-1)
    torch.manual_seed(0)
    head = DiscriminatorHead(16, 32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, betas=(0.5, 0.999))
    loss, st = discriminator_loss(head(real), head(fake), kind, 0.3)
    assert float(loss.detach()) == pytest.approx(at_zero * 1.3) and st["score_real"] == st["score_fake"] == 0.0
    losses, gaps = [], []
    for _ in range(20):
        loss, st = discriminator_loss(head(real), head(fake), kind, 0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        gaps.append(st["score_real"] - st["score_fake"])
    assert losses[-1] < 0.5 * losses[0] and gaps[-1] > gaps[1] > 0
    assert st["acc"] == st["acc_real"] == st["acc_fake"] == 1.0


def test_score_mix_bounds_and_token_selection():
    scores = torch.tensor([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]])
    assert torch.allclose(mix_scores(scores, 0.3), torch.tensor([0.7 * 1 + 0.3 * 4, 2.0]))  # equal tokens: s = h(f_0)
    assert torch.equal(mix_scores(scores[:, :1], 0.3), scores[:, 0])
    big = torch.tensor([-1e30, -5.0, 0.0, 1e30])
    assert torch.equal(bounded_reward(big, "clip", 2.0), torch.tensor([-2.0, -2.0, 0.0, 2.0]))
    assert torch.equal(bounded_reward(big, "sigmoid", 2.0)[[0, 3]], torch.tensor([0.0, 1.0]))
    tokens = torch.randn(3, 1 + 10, 4)
    picked = select_tokens(tokens, 4, torch.Generator().manual_seed(0))
    normed = torch.nn.functional.normalize(tokens, dim=-1)
    assert picked.shape == (3, 5, 4) and torch.equal(picked[:, 0], normed[:, 0])
    for b in range(3):  # distinct patches of the same image
        rows = {tuple(r.tolist()) for r in picked[b, 1:]}
        assert len(rows) == 4 and rows <= {tuple(r.tolist()) for r in normed[b, 1:]}
    assert torch.equal(select_tokens(tokens, 0, None), normed[:, :1])
    assert torch.equal(select_tokens(tokens, 64, torch.Generator()), normed)


def test_replay_buffer_is_fifo_samples_and_round_trips():
    buf = ReplayBuffer(5)
    for k in range(3):
        buf.push(torch.full((2, 1, 1), float(k)))
    assert len(buf) == 5 and buf.features.flatten().tolist() == [0.0, 1.0, 1.0, 2.0, 2.0]
    assert buf.ages.tolist() == [1, 2, 3, 4, 5] and buf.pushed == 6
    recent = buf.sample(4000, torch.Generator().manual_seed(0), "recent").flatten()
    assert abs(float((recent == 0).float().mean()) - 1 / 15) < 0.02  # rank 1 of weights 1..5
    again = ReplayBuffer(5)
    again.load_state_dict(buf.state_dict())
    assert _same(again.state_dict(), buf.state_dict())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(again.sample(7, g1, "uniform"), buf.sample(7, g2, "uniform"))
    empty = ReplayBuffer(0)
    empty.push(torch.ones(2, 1, 1))
    assert len(empty) == 0 and ReplayBuffer(3).state_dict()["features"].numel() == 0


# --------------------------------------------------------------------------------- a fake step
class AdvCtx(FakeCtx):
    """FakeCtx whose reward is the run's ``adversarial`` (bound by the method), with ``sync_gradients``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reward_models = {"adversarial": get_reward("adversarial")}

    def rewards(self, images, prompts):
        r = self.reward_models["adversarial"](images, prompts)
        return r, {"adversarial": r}

    def sync_gradients(self, params):
        self.synced = getattr(self, "synced", 0) + 1


def configured(ctx: AdvCtx, **options: Any) -> AdvGRPO:
    cfg = AdvGRPOConfig(
        **{"group_size": 2, "train_batch_size": 2, "backbone": "shapes_clip", "hidden": 8, "patch_tokens": 4} | options
    )
    method = AdvGRPO(cfg, ctx.sample, TrainConfig())
    torch.manual_seed(0)
    method.configure(ctx)
    return method


def test_reward_is_finite_bounded_and_no_gradient_reaches_the_backbone():
    ctx = AdvCtx(steps=2, batch_size=2)
    method = configured(ctx, disc_lr=0.5, disc_steps=3)
    backbone = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in method.head.state_dict().items()}
    batch = PromptBatch(PROMPTS, PROMPTS)
    first = method.step(ctx, [batch])
    assert first.stats["disc_loss"] == pytest.approx(1.3) and first.stats["disc_updates"] == 3.0
    assert first.stats["disc_loss_last"] < 1.3
    assert torch.equal(first.rewards["adversarial"], torch.zeros(4)) and first.stats["advantage_abs"] == 0
    assert ctx.synced == 3 and not torch.equal(method.head.net[2].weight, head["net.2.weight"])
    for name, p in method.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None and torch.equal(p, backbone[name]), name
    assert all(p.grad is not None for p in method.head.parameters())
    # an extreme head: the reward stays finite and within its bound, also through the reward's forward
    with torch.no_grad():
        method.head.net[2].weight.fill_(1e6)
    images = torch.rand(6, 3, 16, 16)
    r = ctx.reward_models["adversarial"](images, ["a red circle"] * 6)
    assert torch.isfinite(r).all() and r.abs().max() <= 10.0 and r.abs().max() == 10.0
    assert ctx.reward_models["adversarial"].range == (-10.0, 10.0)
    method.cfg.reward = "sigmoid"
    r = method.reward_scores(images, ["a red circle"] * 6)
    assert torch.isfinite(r).all() and float(r.min()) >= 0 and float(r.max()) <= 1


def test_schedules_every_k_and_threshold():
    batch = PromptBatch(PROMPTS, PROMPTS)
    ctx = AdvCtx(steps=2, batch_size=2)
    method = configured(ctx, policy_every=2, disc_lr=0.1, replay_size=8)
    one, two = method.step(ctx, [batch]), method.step(ctx, [batch])
    assert (one.stats["policy_update"], one.updates, two.stats["policy_update"], two.updates) == (0.0, 0, 1.0, 2)
    assert one.stats["disc_updates"] == two.stats["disc_updates"] == 1.0 and two.stats["replay_size"] == 8.0
    # threshold: m_ref <= m_gen (at init both 0) -> discriminator only; m_ref > m_gen -> policy only
    ctx = AdvCtx(steps=2, batch_size=2)
    method = configured(ctx, schedule="threshold", disc_steps=2)
    first = method.step(ctx, [batch])
    assert first.stats["policy_update"] == 0.0 and first.stats["disc_updates"] == 2.0 and first.updates == 0
    method.reference_mean = lambda *args: 1e9
    weights = method.head.net[2].weight.clone()
    second = method.step(ctx, [batch])
    assert second.stats["policy_update"] == 1.0 and second.stats["disc_updates"] == 0.0 and second.updates == 2
    assert torch.equal(method.head.net[2].weight, weights)  # no discriminator step on a policy turn
    assert set(first.stats) == set(second.stats)  # the same metrics every step


def test_eval_stats_and_backbones(tmp_path):
    from rewards_fixtures import make_dinov2_dir

    ctx = AdvCtx(steps=2, batch_size=2)
    method = configured(ctx)
    stats = method.eval_stats(ctx, torch.rand(4, 3, 8, 8), PROMPTS * 2)
    assert stats == {
        k: stats[k] for k in ("adv/acc", "adv/acc_real", "adv/acc_fake", "adv/reward_real", "adv/reward_fake")
    }
    assert stats["adv/acc"] == 0.0  # score 0 at init: neither side is called right
    dino = load_backbone("dinov2", str(make_dinov2_dir(tmp_path / "dino")))
    images = torch.rand(2, 3, 40, 40)
    tokens = dino.tokens(images)
    pooled = dino.dino(pixel_values=dino.pixels(images)).pooler_output
    assert tokens.shape == (2, 1 + 16, dino.dim) and torch.allclose(tokens[:, 0], pooled)
    assert not any(p.requires_grad for p in dino.parameters())
    with pytest.raises(DiffalignError, match="unknown backbone 'vgg'"):
        load_backbone("vgg")
    with pytest.raises(DiffalignError, match="use it only in reward.rewards of an adv_grpo run"):
        Adversarial()(images, ["x", "y"])


# ----------------------------------------------------------------------------------- references
def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((12, 20, 3), 20 * i, dtype=np.uint8)).save(folder / name)


def test_reference_folder_with_prompts(tmp_path):
    folder = tmp_path / "refs"
    write_images(folder, [f"{i}.png" for i in range(8)])
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "prompt": "cat" if i < 4 else "dog"}) + "\n" for i in range(7))
    )
    (folder / "7.txt").write_text("bird\n")
    files, prompts = list_reference_images(str(folder))
    assert [f.name for f in files] == [f"{i}.png" for i in range(8)] and prompts[7] == "bird" and prompts[0] == "cat"
    refs = FolderReferences(str(folder), heldout=1, seed=0, match_prompts=True)
    assert len(refs.heldout) == 1 and len(refs.train) == 7
    images = refs.draw(["bird"] * 3 + ["cat", "unknown"], torch.Generator().manual_seed(0), 8, 6)
    assert images.shape == (5, 3, 8, 6) and float(images.min()) >= 0 and float(images.max()) <= 1
    if "bird" in refs.by_prompt:  # bird's only image is 7.png (value 140): every bird draw is it
        assert torch.allclose(images[:3], torch.full_like(images[:3], 140 / 255), atol=1e-6)
    (folder / "prompts.jsonl").write_text('{"file": "0.png"}\n')
    with pytest.raises(DiffalignError, match=r"prompts.jsonl:1: expected"):
        list_reference_images(str(folder))


def adv_config(tmp_path: Path, sd_dir: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    adv = {
        "group_size": 2,
        "train_batch_size": 2,
        "backbone": "shapes_clip",
        "hidden": 16,
        "patch_tokens": 4,
        "disc_lr": 1e-2,
        "disc_steps": 2,
        "replay_size": 6,
        "replay_sampling": "recent",
        "eval_references": 4,
    } | sections.pop("adv_grpo", {})
    base = {"reward": {"rewards": ["adversarial"]}, "adv_grpo": adv}
    return tiny_config(sd_dir, out, "adv_grpo", **(base | sections))


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_missing_or_empty_reference_folder_is_one_line(tmp_path, sd_dir, capsys, kind):
    target = tmp_path / "refs"
    if kind == "empty":
        target.mkdir()
        (target / "notes.txt").write_text("no images here")
    elif kind == "file":
        target.write_text("x")
    cfg = adv_config(tmp_path, sd_dir, tmp_path / "run", adv_grpo={"reference": str(target)})
    path = write_config(tmp_path / "c.yaml", cfg)
    expected = {"missing": "does not exist", "empty": "holds no images", "file": "is a file, not a folder"}[kind]
    with pytest.raises(DiffalignError) as err:
        DiffalignConfig.from_yaml(path)
    message = str(err.value)
    assert str(target) in message and expected in message and "give a folder of reference images" in message
    assert "\n" not in message
    capsys.readouterr()
    assert main(["train", "--config", str(path)]) == 2
    printed = capsys.readouterr().err
    assert "Traceback" not in printed and printed.count("error:") == 1 and str(target) in printed
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"reward": {"rewards": ["train_fixtures:Brightness"]}}, "list adversarial exactly once in reward.rewards"),
        ({"eval": {"rewards": ["adversarial"]}}, "eval.rewards: adversarial is the training discriminator"),
        ({"adv_grpo": {"backbone": "vgg"}}, "adv_grpo.backbone 'vgg' is unknown"),
        ({"adv_grpo": {"replay_fraction": 2.0}}, "adv_grpo.replay_fraction must be in [0, 1]"),
        ({"prompts": {"train": ["a photo of a cat"]}}, "'a photo of a cat' is not a shapes caption"),
        ({"sample": {"eta": 0.0}}, "needs sample.eta > 0"),
    ],
)
def test_validation_errors(tmp_path, sd_dir, sections, message):
    cfg = adv_config(tmp_path, sd_dir, tmp_path / "run", **sections)
    with pytest.raises(DiffalignError) as err:
        DiffalignConfig.from_yaml(write_config(tmp_path / "c.yaml", cfg))
    assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------ end to end and resume
def _file_config(tmp_path: Path, sd_dir: Path, out: Path) -> Path:
    cfg = adv_config(
        tmp_path,
        sd_dir,
        out,
        train={"steps": 4},
        eval={"every": 2, "num_prompts": 2, "seeds": [0, 1]},
        checkpoint={"every": 2, "keep": 3},
    )
    return write_config(tmp_path / f"{out.name}.yaml", cfg)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, sd_dir: Path) -> Path:
    """An uninterrupted 4-step run of ``diffalign train`` (in this process: one thread, as the subprocesses)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("adv_ref")
    out = tmp / "ref"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--config", str(_file_config(tmp, sd_dir, out))]) == 0
    text = printed.getvalue()
    assert "finished 4 steps of adv_grpo" in text and "(disc)" in text
    assert "--reward adversarial" not in text  # the gallery command leaves the run's discriminator out
    return out


def test_cli_end_to_end(reference_run: Path):
    metrics, evals = records(reference_run / "metrics.jsonl"), records(reference_run / "eval.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and [e["step"] for e in evals] == [0, 2, 4]
    keys = {"disc_loss", "disc_acc", "disc_acc_real", "disc_acc_fake", "policy_update", "replay_size"}
    assert all(keys <= set(m) and m["samples"] == 4 and "reward/adversarial" in m for m in metrics)
    assert metrics[0]["disc_loss"] == pytest.approx(1.3) and metrics[0]["reward"] == 0.0
    assert [m["replay_size"] for m in metrics] == [4.0, 6.0, 6.0, 6.0]  # 4 samples per step, capacity 6
    assert metrics[-1]["reward/adversarial"] != 0.0
    for e in evals:
        assert {"adv/acc", "adv/acc_real", "adv/acc_fake", "reward/adversarial", "hacking"} <= set(e)
        assert 0.0 <= e["adv/acc"] <= 1.0
    assert evals[0]["adv/acc"] == 0.0 and evals[-1]["reward"] == evals[-1]["reward/adversarial"]
    modules = load_file(reference_run / MODULES_FILE)
    assert set(modules) == {"disc.net.0.weight", "disc.net.0.bias", "disc.net.2.weight", "disc.net.2.bias"}
    state = torch.load(reference_run / "checkpoints" / "step_4" / "state.pt", weights_only=True)
    replay = state["method"]["replay"]
    assert state["method"]["steps"] == 4 and replay["features"].shape == (6, 5, 64) and replay["pushed"] == 16
    assert int(state["method_optimizers"]["disc"]["state"][0]["step"]) == 8  # 2 discriminator steps per step


def test_kill_inside_checkpoint_save_then_resume_is_exact(reference_run: Path, tmp_path: Path, sd_dir: Path):
    run = tmp_path / "killed"
    cfg = _file_config(tmp_path, sd_dir, run)
    kill_inside_checkpoint_save(cfg, 4)
    resume_latest(cfg, 2)
    assert_same_run(reference_run, run)  # metrics (discriminator stats included), evaluations, LoRA
    ours, theirs = run / "checkpoints" / "step_4", reference_run / "checkpoints" / "step_4"
    assert _same(load_file(ours / MODULES_FILE), load_file(theirs / MODULES_FILE))
    a, b = torch.load(ours / "state.pt", weights_only=True), torch.load(theirs / "state.pt", weights_only=True)
    assert _same(a["method"], b["method"]) and _same(a["method_optimizers"], b["method_optimizers"])
