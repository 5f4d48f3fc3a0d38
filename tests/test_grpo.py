"""GRPO (diffalign/methods/grpo.py; spec §6.1 on DDIM): group advantages from known rewards, ratio 1 and
KL 0 at the reference, the LoRA-disabled reference (``Rollout.reference``), validation, tiny CLI runs
with and without the KL, and two processes whose groups never straddle them.

The loss itself against hand-computed values is in tests/test_grpo_loss.py.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_ddpo_rollouts import FakeCtx
from train_fixtures import Brightness, launch_two_processes, tiny_config, write_config

from diffalign.cli import main
from diffalign.combine import build_combiner
from diffalign.config import DiffalignConfig, SampleConfig, TrainConfig
from diffalign.errors import DiffalignError
from diffalign.methods import PromptBatch, build_method
from diffalign.methods.grpo import GRPO, GRPOConfig
from reward_models import Reward


def queue_rewards(values: list[float]):
    """A reward_fn handing out ``values`` in order, one per sample."""
    pending = list(values)

    def reward_fn(images, prompts):
        out = torch.tensor(pending[: len(prompts)])
        del pending[: len(prompts)]
        return out

    return reward_fn


# ------------------------------------------------------------------------------------ advantages
@pytest.mark.parametrize("adv_std", ["global", "group"])
def test_advantages_from_known_rewards_two_processes(adv_std):
    """Process 0 of 2; 4 prompts, G = 3. Gathered rewards (process 0 first):
        group 0 (p0): 1 2 3   group 1 (p1): 5 5 5   | process 1: group 2 (p2): 0 2 4   group 3 (p3): 1 1 7
    group means 2, 5, 2, 3 -> centered [-1 0 1 | 0 0 0 | -2 0 2 | -2 -2 4]
    global: mean 3, squared deviations 4+1+0+4+4+4+9+1+1+4+4+16 = 52, std sqrt(52/12) = sqrt(13/3)
    group:  std of group 0 = sqrt(2/3); group 1 is constant -> exactly 0; 1 of 4 groups has zero std."""
    others = {1: [torch.tensor([0.0, 2.0, 4.0, 1.0, 1.0, 7.0])]}
    ctx = FakeCtx(batch_size=2, process_index=0, num_processes=2, others=others, id_shift=2)
    ctx.reward_fn = queue_rewards([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    method = GRPO(GRPOConfig(group_size=3, adv_std=adv_std, train_batch_size=3), ctx.sample, TrainConfig())
    batch = PromptBatch(["p0", "p1"], ["p0", "p1", "p2", "p3"])
    rollout = method.collect(ctx, [batch], ctx.sampler)
    assert rollout.trajectories.prompts == ["p0"] * 3 + ["p1"] * 3
    assert rollout.trajectories.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert rollout.gathered_group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    adv, stats = method.local_advantages(ctx, rollout)
    s = math.sqrt(13 / 3) if adv_std == "global" else math.sqrt(2 / 3)
    a = 1 / (s + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-a, 0.0, a, 0.0, 0.0, 0.0]))
    assert torch.equal(adv[3:], torch.zeros(3))
    assert stats == {"zero_std_fraction": 0.25}
    # clipping: |A| <= adv_clip_max
    others = {1: [torch.tensor([0.0, 2.0, 4.0, 1.0, 1.0, 7.0])]}
    ctx = FakeCtx(batch_size=2, process_index=0, num_processes=2, others=others, id_shift=2)
    ctx.reward_fn = queue_rewards([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    clipped = GRPO(GRPOConfig(group_size=3, adv_std=adv_std, adv_clip_max=0.4), ctx.sample, TrainConfig())
    adv, _ = clipped.local_advantages(ctx, clipped.collect(ctx, [batch], ctx.sampler))
    torch.testing.assert_close(adv, torch.tensor([-0.4, 0.0, 0.4, 0.0, 0.0, 0.0]))


def test_raw_advantages_are_the_rewards_clipped():
    """``adv_std: none`` (Parrot Eq. 4's REINFORCE weight): A_i = R_i, no baseline, no scaling, clamped to
    +-adv_clip_max; this process's share of the same gathered rewards as above."""
    others = {1: [torch.tensor([0.0, 2.0, 4.0, 1.0, 1.0, 7.0])]}
    ctx = FakeCtx(batch_size=2, process_index=0, num_processes=2, others=others, id_shift=2)
    ctx.reward_fn = queue_rewards([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    method = GRPO(GRPOConfig(group_size=3, adv_std="none", adv_clip_max=4.0), ctx.sample, TrainConfig())
    batch = PromptBatch(["p0", "p1"], ["p0", "p1", "p2", "p3"])
    adv, _ = method.local_advantages(ctx, method.collect(ctx, [batch], ctx.sampler))
    torch.testing.assert_close(adv, torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0]))
    with pytest.raises(DiffalignError, match="'group', 'global' or 'none'"):
        GRPOConfig(adv_std="batch")


def test_groups_of_process_one_and_of_later_batches():
    """Process 1 samples the second half of each batch's prompts; batch b's ids follow batch b-1's."""
    others = {0: [torch.zeros(4), torch.zeros(4)]}
    ctx = FakeCtx(batch_size=2, process_index=1, num_processes=2, others=others, id_shift=2)
    method = GRPO(GRPOConfig(group_size=2, train_batch_size=2), ctx.sample, TrainConfig())
    batches = [PromptBatch(["c", "d"], ["a", "b", "c", "d"]), PromptBatch(["g", "c"], ["e", "f", "g", "c"])]
    rollout = method.collect(ctx, batches, ctx.sampler)
    assert rollout.trajectories.prompts == ["c", "c", "d", "d", "g", "g", "c", "c"]
    assert rollout.trajectories.group_ids.tolist() == [2, 2, 3, 3, 6, 6, 7, 7]  # "c" twice: two groups
    assert rollout.gathered_group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    with pytest.raises(RuntimeError, match="contiguous slice"):
        method.collect(ctx, [PromptBatch(["a", "d"], ["a", "b", "c", "d"])], ctx.sampler)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_fake_step_reference_passes_and_updates(beta):
    """beta = 0 never enters the reference; beta > 0 once per minibatch. With theta = theta_old and the
    adapter at 0 (policy == reference): ratio 1, KL 0, every backward's loss is -mean(A) of its minibatch."""
    ctx = FakeCtx(steps=3, batch_size=2)
    ctx.sample.num_batches = 2
    cfg = GRPOConfig(group_size=2, beta=beta, train_batch_size=2, adv_std="group")
    method = GRPO(cfg, ctx.sample, TrainConfig(gradient_accumulation_steps=2))
    assert method.updates_per_step() == 2  # 2 batches x 2 prompts x G 2 = 8 trajectories = 4 minibatches
    result = method.step(ctx, [PromptBatch(["a", "b"], ["a", "b"]), PromptBatch(["c", "d"], ["c", "d"])])
    assert result.updates == 2 == ctx.updates
    assert ctx.reference_entries == (4 if beta > 0 else 0)
    assert result.stats["kl"] == 0.0 and result.stats["clipfrac"] == 0.0 and result.stats["approx_kl"] < 1e-12
    assert result.reward.shape == (8,) and result.images.shape == (4, 3, 2, 2)  # the last batch's images
    assert set(result.stats) == {"approx_kl", "clipfrac", "kl", "advantage_abs", "zero_std_fraction"}
    # with the adapter away from 0 the reference differs: KL > 0 (ratio still 1: theta = theta_old)
    ctx = FakeCtx(steps=3, batch_size=2)
    with torch.no_grad():
        ctx.lora.fill_(0.05)
    result = GRPO(cfg, ctx.sample, TrainConfig()).step(ctx, [PromptBatch(["a", "b"], ["a", "b"])])
    assert (result.stats["kl"] > 0) == (beta > 0) and result.stats["approx_kl"] < 1e-12


def test_sde_window_trains_only_its_stochastic_steps(monkeypatch):
    """sde_window = W: rollouts are stochastic in the first W steps only (log-prob 0 stored after them) and
    the training steps are drawn from those W."""
    import diffalign.methods.grpo as grpo_module

    drawn = []
    subsample = grpo_module.timestep_subsample
    monkeypatch.setattr(
        grpo_module, "timestep_subsample", lambda n, t, *a, **k: drawn.append(t) or subsample(n, t, *a, **k)
    )
    ctx = FakeCtx(steps=3, batch_size=2)
    cfg = GRPOConfig(group_size=2, train_batch_size=2, sde_window=2, shuffle_timesteps=True)
    method = GRPO(cfg, ctx.sample, TrainConfig(gradient_accumulation_steps=2))
    rollout = method.collect(ctx, [PromptBatch(["a", "b"], ["a", "b"])], ctx.sampler)
    assert (rollout.trajectories.log_probs[:, 2:] == 0).all() and (rollout.trajectories.log_probs[:, :2] != 0).all()
    method.step(ctx, [PromptBatch(["a", "b"], ["a", "b"])])
    assert drawn == [2]


@pytest.mark.parametrize("shared", [False, True])
def test_shared_noise_starts_each_group_from_one_latent(shared):
    """grpo.shared_noise: the G samples of a prompt's group share x_T (DanceGRPO); groups differ."""
    ctx = FakeCtx(steps=3, batch_size=2)
    method = GRPO(GRPOConfig(group_size=3, train_batch_size=2, shared_noise=shared), ctx.sample, TrainConfig())
    x = method.collect(ctx, [PromptBatch(["a", "b"], ["a", "b"])], ctx.sampler).trajectories.latents
    assert torch.equal(x[0, 0], x[1, 0]) == shared and torch.equal(x[3, 0], x[5, 0]) == shared
    assert not torch.equal(x[0, 0], x[3, 0]) and not torch.equal(x[0, 1], x[1, 1])


# ----------------------------------------------------------------------------- the tiny pipeline
class FakeAcc:
    """What Rollout asks of accelerate, for one CPU process."""

    process_index, num_processes, is_main_process = 0, 1, True
    device = torch.device("cpu")
    scaler = None

    def gather(self, tensor):
        return tensor

    def backward(self, loss):
        loss.backward()


def pipe_rollout(sd_dir, text_encoder: bool = False, steps: int = 3, batch_size: int = 2):
    """The trainer's real :class:`Rollout` over the tiny SD pipeline with LoRA (B = 0), Brightness reward,
    and an ``optimizer_step`` that changes nothing."""
    from diffalign.pipelines import LoraSettings, add_lora, load_pipeline
    from diffalign.trainer import Rollout

    pipe = load_pipeline(str(sd_dir))
    params = add_lora(pipe, LoraSettings(rank=2, alpha=2.0, text_encoder=text_encoder))
    sample = SampleConfig(steps=steps, eta=1.0, guidance_scale=2.0, batch_size=batch_size)
    model = SimpleNamespace(gradient_checkpointing=False, lora=SimpleNamespace(text_encoder=text_encoder))
    trainer = SimpleNamespace(
        acc=FakeAcc(),
        pipe=pipe,
        cfg=SimpleNamespace(sample=sample, model=model),
        generator=torch.Generator().manual_seed(0),
        rng=random.Random(0),
        rewards={"brightness": Brightness()},
        reward_weights=[1.0],
        combiner=build_combiner("weighted", ["brightness"]),
        params=params,
    )
    ctx = Rollout(trainer)
    ctx.optimizer_step = lambda: 0.0
    return ctx, params


def unet_out(pipe, x, t, emb):
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=emb).sample


def lora_layers(*models):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]


def test_reference_is_the_base_model_and_restores_adapters(sd_dir):
    """Inside ``reference()`` the UNet and the text encoder give exactly the base pipeline's outputs
    (non-zero LoRA everywhere); outside they differ; after an exception inside, the adapters are on again."""
    from diffalign.pipelines import load_pipeline

    ctx, params = pipe_rollout(sd_dir, text_encoder=True)
    pipe, base = ctx.pipe, load_pipeline(str(sd_dir))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))  # B != 0: the LoRA changes the outputs
    assert lora_layers(pipe.unet) and lora_layers(pipe.text_encoder)  # LoRA on the text encoder too
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    with torch.no_grad():
        emb_base = base.text_encoder(ids)[0]
        emb_lora = pipe.text_encoder(ids)[0]
    want = unet_out(base, x, t, emb_base)
    with_lora = unet_out(pipe, x, t, emb_base)
    assert not torch.equal(with_lora, want) and not torch.equal(emb_lora, emb_base)
    with ctx.reference():
        assert torch.equal(unet_out(pipe, x, t, emb_base), want)
        with torch.no_grad():
            assert torch.equal(pipe.text_encoder(ids)[0], emb_base)
        with ctx.reference():  # nested: still the base after the inner exit
            pass
        assert torch.equal(unet_out(pipe, x, t, emb_base), want)
    assert torch.equal(unet_out(pipe, x, t, emb_base), with_lora)
    with pytest.raises(RuntimeError, match="inside"), ctx.reference():
        raise RuntimeError("inside")
    assert torch.equal(unet_out(pipe, x, t, emb_base), with_lora)
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], emb_lora)
    assert all(not layer.disable_adapters for layer in lora_layers(pipe.unet, pipe.text_encoder))
    assert all(p.requires_grad for p in params)


@pytest.mark.parametrize("kl", ["mean", "k3"])
def test_ratio_one_and_kl_zero_at_the_reference(sd_dir, kl):
    """LoRA B = 0 at init: policy == reference == theta_old on the tiny pipeline, so on the first minibatch
    (and on all, with updates that change nothing) rho = 1, approx_kl = 0, KL = 0 exactly, and the
    loss is -mean(A) of the minibatch (spec §6.1 sanity check 3); with B != 0 the KL becomes > 0."""
    ctx, params = pipe_rollout(sd_dir)
    cfg = GRPOConfig(group_size=2, beta=0.5, kl=kl, train_batch_size=2, adv_std="group")
    method = GRPO(cfg, ctx.sample, TrainConfig())
    batch = PromptBatch(["a red circle", "two blue squares"], ["a red circle", "two blue squares"])
    rollout = method.collect(ctx, [batch], ctx.sampler)
    adv, _ = method.local_advantages(ctx, rollout)
    assert adv.abs().sum() > 0
    gen_state = ctx.generator.get_state()
    st = method.train_epochs(ctx, rollout.trajectories, adv, ctx.sampler)
    assert len(st.losses) == 2 * 3 and st.kls == [0.0] * 6 and st.clipfracs == [0.0] * 6
    assert max(st.approx_kls) < 1e-12
    order = torch.randperm(4, generator=torch.Generator().set_state(gen_state))  # the epoch's first draw
    for m in range(2):
        want = -float(adv[order[2 * m : 2 * m + 2]].mean())
        for loss in st.losses[3 * m : 3 * m + 3]:
            assert loss == pytest.approx(want, abs=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # the policy term trains
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn_like(p, device="cpu"))
    st = method.train_epochs(ctx, rollout.trajectories, adv, ctx.sampler)
    assert min(st.kls) > 0  # the reference now differs from the policy


# ---------------------------------------------------------------------------------- validation
def load_config(tmp_path, sd_dir, overrides):
    cfg = tiny_config(sd_dir, tmp_path / "run", "grpo", grpo={"group_size": 2, "train_batch_size": 2})
    return DiffalignConfig.from_yaml(write_config(tmp_path / "c.yaml", cfg), list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.eta=0"], "grpo needs sample.eta > 0"),
        (["grpo.group_size=1"], "grpo.group_size must be >= 2"),
        (["grpo.train_batch_size=3"], "must be divisible by grpo.train_batch_size (3)"),
        (["train.gradient_accumulation_steps=3"], "not divisible by train.gradient_accumulation_steps (3)"),
        (["grpo.adv_std=batch"], "grpo.adv_std"),
        (["grpo.beta=-1"], "grpo.beta must be >= 0"),
        (["grpo.sde_window=-1"], "grpo.sde_window must be >= 0"),
        (["grpo.sde_window=99"], "grpo.sde_window (99) must be at most sample.steps"),
    ],
)
def test_validation_errors(tmp_path, sd_dir, overrides, message):
    with pytest.raises(DiffalignError) as err:
        load_config(tmp_path, sd_dir, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_black_box_reward_and_updates_per_step(tmp_path, sd_dir):
    cfg = load_config(tmp_path, sd_dir, ["reward.rewards=[jpeg_compressibility]", "sample.num_batches=2"])
    method = build_method(cfg)
    assert isinstance(method, GRPO) and cfg.grpo.group_size == 2
    # 2 batches x 2 prompts x G 2 = 8 trajectories per process, minibatches of 2, no accumulation
    assert method.samples_per_step() == 8 and method.updates_per_step() == 4


# ---------------------------------------------------------------------------------- end to end
def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_cli_trains_grpo(tmp_path, sd_dir, beta, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(
        sd_dir,
        out,
        "grpo",
        grpo={"group_size": 2, "train_batch_size": 2, "beta": beta, "timestep_fraction": 0.7},
        train={"lr_schedule": "cosine"},
        eval={"every": 0, "num_prompts": 1, "seeds": [0]},
        checkpoint={"every": 0},
    )
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    assert "finished 3 steps of grpo" in capsys.readouterr().out
    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["samples"] == 4  # 2 prompts x G 2
        assert {"approx_kl", "clipfrac", "kl", "advantage_abs", "zero_std_fraction"} <= set(m)
        if beta == 0:
            assert m["kl"] == 0.0  # no reference pass at all
    assert metrics[-1]["updates"] == 3 * 2  # 4 trajectories / minibatches of 2, every step
    assert metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine horizon is steps x updates_per_step
    if beta > 0:
        assert metrics[-1]["kl"] > 0  # the LoRA moved away from the reference
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


class PromptRecorder(Reward):
    """A black-box reward that appends the prompts and values of each call to DIR/<pid>.jsonl."""

    name = "prompt_recorder"
    differentiable = False
    range = (-1.0, 1.0)

    def __init__(self, dir: str = ".") -> None:
        super().__init__()
        self.dir = dir

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        values = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
        if images.shape[0] > 1:  # training calls only (evaluation here scores one image per call)
            with open(Path(self.dir) / f"{os.getpid()}.jsonl", "a") as fh:
                fh.write(json.dumps({"prompts": prompts}) + "\n")
        return values


def test_two_processes_keep_groups_whole(tmp_path, sd_dir):
    """accelerate launch --multi_gpu --num_processes 2 on CPU: each process samples G copies of its own
    half of the global prompts, the groups never straddle processes, and GRPO trains 2 steps."""
    pytest.importorskip("accelerate")
    from diffalign.prompts import PromptSampler, load_prompts

    out, rec = tmp_path / "run", tmp_path / "rec"
    rec.mkdir()
    g, batch = 3, 2
    cfg = tiny_config(
        sd_dir,
        out,
        "grpo",
        reward={"rewards": [f"test_grpo:PromptRecorder:dir={rec}"]},
        sample={"batch_size": batch},
        train={"steps": 2},
        grpo={"group_size": g, "train_batch_size": 3, "beta": 0.05},
        eval={"every": 0, "num_prompts": 1, "seeds": [0], "batch_size": 1},
        checkpoint={"every": 0},
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    proc = launch_two_processes(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["samples"] == 2 * batch * g for m in metrics)
    calls = [[json.loads(x)["prompts"] for x in p.read_text().splitlines()] for p in rec.iterdir()]
    assert len(calls) == 2 and all(len(c) == 2 for c in calls)
    stream = PromptSampler(load_prompts("shapes:train"), seed=0)
    for step in range(2):
        everyone = stream.next(2 * batch)
        halves = [[q for q in everyone[p * batch : (p + 1) * batch] for _ in range(g)] for p in range(2)]
        assert sorted(c[step] for c in calls) == sorted(halves)  # every group on one process, whole


def test_resume_from_a_checkpoint_is_exact(tmp_path, sd_dir):
    """GRPO's draws (noise, trajectory order, trained steps) come from the trainer's checkpointed
    generator: resuming at step 1 rewrites steps 2 and 3 exactly."""
    out = tmp_path / "run"
    cfg = tiny_config(
        sd_dir,
        out,
        "grpo",
        grpo={"group_size": 2, "train_batch_size": 2, "beta": 0.05, "timestep_fraction": 0.7},
        eval={"every": 0, "num_prompts": 1, "seeds": [0]},
        checkpoint={"every": 1, "keep": 3},
    )
    path = str(write_config(tmp_path / "cfg.yaml", cfg))
    assert main(["train", "--config", path]) == 0
    first = [{k: v for k, v in m.items() if k != "time"} for m in rows(out / "metrics.jsonl")]
    assert main(["train", "--config", path, "--resume", str(out / "checkpoints" / "step_1")]) == 0
    again = [{k: v for k, v in m.items() if k != "time"} for m in rows(out / "metrics.jsonl")]
    assert [m["step"] for m in again] == [1, 2, 3] and again == first
