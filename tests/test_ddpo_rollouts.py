"""DDPO's step split into collect -> advantages -> PPO epochs, on a fake context (spec §2.2, §2.6), and
the shared rollout collector :func:`diffalign.rollouts.collect` (shared-noise pairs, gathered layout).

The fake context simulates process ``process_index`` of ``num_processes``: its ``gather`` concatenates
known tensors of the other processes around this process's own, in process order.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import pytest
import torch
from diffusers import DDIMScheduler
from train_fixtures import FakeCombining

from diffalign.config import SampleConfig, TrainConfig
from diffalign.methods import PromptBatch
from diffalign.methods.ddpo import DDPO, DDPOConfig, batch_advantages, clip_advantages, ppo_permutations
from diffalign.rollouts import Collected, collect, local_share
from diffalign.sampling import make_sampler


class FakeCtx(FakeCombining):
    """A StepContext over a toy network ``denoise(x, t) = (w + lora) * x`` (``lora`` is the trainable
    "adapter", 0 at init; ``reference()`` drops it), ``decode = sigmoid``, rewards from ``reward_fn``.

    ``gather`` simulates ``num_processes`` processes, this one being ``process_index``: float tensors are
    completed with ``others[q]`` popped per call for every other process q (known rewards); integer
    tensors (group ids) with this process's ids shifted by ``(q - process_index) * id_shift``.
    ``optimizer_step`` changes nothing (theta stays theta_old: ratio 1 on every minibatch).
    """

    def __init__(
        self,
        steps: int = 4,
        batch_size: int = 4,
        process_index: int = 0,
        num_processes: int = 1,
        others: dict[int, list[torch.Tensor]] | None = None,
        id_shift: int = 0,
        reward_fn: Callable[[torch.Tensor, list[str]], torch.Tensor] | None = None,
    ) -> None:
        self.sample = SampleConfig(steps=steps, eta=1.0, guidance_scale=1.0, batch_size=batch_size)
        self.scheduler = DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1
        )
        self.scheduler.set_timesteps(steps)
        self.sampler = make_sampler(self.scheduler)
        self.generator = torch.Generator().manual_seed(0)
        self.rng = random.Random(0)
        self.checkpointing = False
        self.w = torch.tensor(0.1)
        self.lora = torch.nn.Parameter(torch.tensor(0.0))
        self.process_index, self.num_processes = process_index, num_processes
        self.others = others or {}
        self.id_shift = id_shift
        self.reward_fn = reward_fn or (lambda images, prompts: images.mean(dim=(1, 2, 3)))
        self.in_reference = False
        self.reference_entries = 0
        self.updates = 0
        self.losses: list[float] = []
        self.device = torch.device("cpu")

    def denoiser(self, prompts):
        ref = self.in_reference

        def denoise(x, t):
            return (self.w if ref else self.w + self.lora) * x

        return denoise

    @contextlib.contextmanager
    def reference(self):
        self.reference_entries += 1
        self.in_reference = True
        try:
            yield
        finally:
            self.in_reference = False

    def initial_latents(self, n, generator=None):
        return torch.randn(n, 4, 2, 2, generator=self.generator)

    def decode(self, latents, differentiable=False):
        return torch.sigmoid(latents[:, :3])

    def rewards(self, images, prompts):
        r = self.reward_fn(images, prompts).float()
        return r, {"toy": r}

    def gather(self, tensor):
        shares = []
        for q in range(self.num_processes):
            if q == self.process_index:
                shares.append(tensor)
            elif tensor.dtype.is_floating_point:
                shares.append(self.others[q].pop(0).to(tensor.dtype))
            else:
                shares.append(tensor + (q - self.process_index) * self.id_shift)
        return torch.cat(shares)

    def prompt_keys(self, prompts):
        return list(prompts)

    def backward(self, loss):
        self.losses.append(float(loss.detach()))
        loss.backward()

    def optimizer_step(self):
        self.updates += 1
        self.lora.grad = None
        return 0.0

    def sync_gradients(self, params):
        return None


def by_prompt(images, prompts):
    """Reward = the number in the prompt ("p5" -> 5.0): known values whatever the images."""
    return torch.tensor([float(p[1:]) for p in prompts])


def two_process_batches(num_batches: int, n: int, process_index: int) -> list[PromptBatch]:
    """Batches of 2n global prompts p0.. (batch b: p{2nb} .. p{2nb + 2n - 1}); this process's half."""
    out = []
    for b in range(num_batches):
        everyone = [f"p{2 * n * b + i}" for i in range(2 * n)]
        out.append(PromptBatch(everyone[process_index * n : (process_index + 1) * n], everyone))
    return out


# ------------------------------------------------------------------------------------- DDPO step
@pytest.mark.parametrize("process_index", [0, 1])
def test_ddpo_advantages_per_process_and_loss_at_ratio_one(process_index):
    """Two simulated processes, two sampling batches of 4 prompts each per process: the gathered rewards
    are [batch 0: process 0, process 1, batch 1: process 0, process 1] = 0..15; DDPO (tracking off)
    normalizes all 16, clips, and this process trains on its own rows; at theta = theta_old every
    backward's loss is -mean(A) of its minibatch (spec §2.6)."""
    n, clip = 4, 1.5
    other = 1 - process_index
    # the other process's rewards, one tensor per gather call (= per batch), as by_prompt would give them
    others = {other: [torch.arange(8 * b + 4 * other, 8 * b + 4 * other + 4).float() for b in range(2)]}
    ctx = FakeCtx(batch_size=n, process_index=process_index, num_processes=2, others=others, id_shift=n)
    ctx.reward_fn = by_prompt
    ctx.sample.num_batches = 2
    cfg = DDPOConfig(train_batch_size=n, per_prompt_stat_tracking=False, adv_clip_max=clip)
    method = DDPO(cfg, ctx.sample, TrainConfig(method="ddpo"))
    batches = two_process_batches(2, n, process_index)

    rollout = method.collect(ctx, batches, ctx.sampler)
    assert torch.equal(rollout.gathered_reward, torch.arange(16).float())  # batch-major, process order
    assert torch.equal(rollout.gathered_group_ids, torch.arange(16))  # one group per sample
    assert rollout.trajectories.prompts == batches[0].local + batches[1].local
    adv, per_prompt = method.local_advantages(ctx, rollout, batches)

    # by hand: R = 0..15, mean 7.5, population std sqrt((16^2 - 1) / 12) = sqrt(21.25)
    r = torch.arange(16, dtype=torch.float64)
    expected_all = ((r - 7.5) / (21.25**0.5 + 1e-8)).float().clamp(-clip, clip)
    torch.testing.assert_close(expected_all, clip_advantages(batch_advantages(r.float()), clip))
    mine = torch.cat([expected_all[8 * b + 4 * process_index : 8 * b + 4 * process_index + 4] for b in range(2)])
    assert torch.equal(adv, mine)
    assert per_prompt == 0.0
    assert adv.abs().max() == clip  # the extremes are clipped (|15 - 7.5| / 4.61 = 1.63 > 1.5)

    st = method.ppo_epochs(ctx, rollout.trajectories, adv, ctx.sampler)
    n_train = ctx.sample.steps  # timestep_fraction 1
    assert len(st.losses) == 2 * n_train and len(st.norms) == 2 == ctx.updates  # 2 minibatches of 4
    # minibatch order: ppo_permutations replays the rng draws of the epoch
    order, _ = ppo_permutations(random.Random(0), 2 * n, ctx.sample.steps)
    for m in range(2):
        minibatch = adv[torch.tensor(order[m * n : (m + 1) * n])]
        for loss in st.losses[m * n_train : (m + 1) * n_train]:
            assert loss == pytest.approx(-float(minibatch.mean()), abs=1e-6)
    assert max(st.clipfracs) == 0.0 and max(st.approx_kls) < 1e-12


def test_ddpo_step_reports_local_values_and_mean_loss():
    """The whole step on one process: rewards and images are this process's, the loss -mean(A)."""
    ctx = FakeCtx(batch_size=4)
    ctx.reward_fn = by_prompt
    cfg = DDPOConfig(train_batch_size=4, per_prompt_stat_tracking=False)
    method = DDPO(cfg, ctx.sample, TrainConfig(method="ddpo"))
    prompts = ["p1", "p2", "p3", "p6"]
    result = method.step(ctx, [PromptBatch(prompts, prompts)])
    assert torch.equal(result.reward, torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert torch.equal(result.rewards["toy"], result.reward)
    assert result.images.shape == (4, 3, 2, 2) and result.updates == 1
    assert result.loss == pytest.approx(0.0, abs=1e-6)  # full batch: mean of standardized advantages is 0
    assert result.stats["clipfrac"] == 0.0 and result.stats["per_prompt_fraction"] == 0.0
    assert result.stats["advantage_abs"] == pytest.approx(float(batch_advantages(result.reward).abs().mean()))


def test_ddpo_tracker_keys_are_the_global_prompts():
    """With per-prompt tracking the stat tracker sees every process's prompts (batch.everyone)."""
    others = {1: [torch.tensor([10.0, 20.0])]}
    ctx = FakeCtx(batch_size=2, process_index=0, num_processes=2, others=others, id_shift=2)
    ctx.reward_fn = by_prompt
    method = DDPO(DDPOConfig(train_batch_size=2, stat_min_count=1), ctx.sample, TrainConfig(method="ddpo"))
    batch = PromptBatch(["p1", "p2"], ["p1", "p2", "p10", "p20"])
    rollout = method.collect(ctx, [batch], ctx.sampler)
    adv, per_prompt = method.local_advantages(ctx, rollout, [batch])
    assert set(method.tracker.stats) == {"p1", "p2", "p10", "p20"}
    assert per_prompt == 1.0 and torch.equal(adv, torch.zeros(2))  # one reward per prompt: its own mean


# ----------------------------------------------------------------------------------- collect
def test_collect_shared_noise_pairs_start_from_the_same_latent():
    ctx = FakeCtx(steps=3)
    got = collect(ctx, ["a", "a", "b", "b"], [0, 0, 1, 1], eta=1.0, share_noise=2)
    x = got.trajectories.latents
    assert x.shape == (4, 4, 4, 2, 2)
    assert torch.equal(x[0, 0], x[1, 0]) and torch.equal(x[2, 0], x[3, 0])
    assert not torch.equal(x[0, 0], x[2, 0])
    assert not torch.equal(x[0, 1], x[1, 1])  # independent per-step noise after x_T
    plain = collect(FakeCtx(steps=3), ["a", "a", "b", "b"], [0, 0, 1, 1], eta=1.0)
    assert not torch.equal(plain.trajectories.latents[0, 0], plain.trajectories.latents[1, 0])
    with pytest.raises(ValueError):
        collect(FakeCtx(), ["a", "b", "c"], [0, 1, 2], eta=1.0, share_noise=2)
    with pytest.raises(ValueError):
        collect(FakeCtx(), ["a", "b"], [0], eta=1.0)


def test_collect_share_noise_groups_start_from_one_latent():
    """share_noise=k: k consecutive samples (a GRPO group) share x_T, then differ by per-step noise."""
    got = collect(FakeCtx(steps=3), ["a"] * 3 + ["b"] * 3, [0, 0, 0, 1, 1, 1], eta=1.0, share_noise=3)
    x = got.trajectories.latents
    for i in (1, 2):
        assert torch.equal(x[0, 0], x[i, 0]) and torch.equal(x[3, 0], x[3 + i, 0])
        assert not torch.equal(x[0, 1], x[i, 1])
    assert not torch.equal(x[0, 0], x[3, 0])
    with pytest.raises(ValueError, match="share_noise"):
        collect(FakeCtx(), ["a"] * 4, [0] * 4, eta=1.0, share_noise=3)


def test_collect_records_everything_and_rescoring_matches():
    """Trajectories carry prompts, keys, ids, rewards; the stored log-probs are recomputed exactly (§1.6)."""
    ctx = FakeCtx(steps=4, process_index=1, num_processes=2, others={0: [torch.tensor([7.0, 8.0])]}, id_shift=2)
    got = collect(ctx, ["x", "y"], [2, 3], eta=1.0)
    t = got.trajectories
    assert t.prompts == ["x", "y"] and t.prompt_keys == ["x", "y"] and torch.equal(t.group_ids, torch.tensor([2, 3]))
    assert torch.equal(got.gathered_group_ids, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(got.gathered_reward[:2], torch.tensor([7.0, 8.0]))
    assert torch.equal(got.gathered_reward[2:], t.reward) and torch.equal(t.rewards["toy"], t.reward)
    assert got.num_processes == 2 and torch.equal(got.local(got.gathered_reward, 1), t.reward)
    assert t.log_probs.shape == (2, 4) and torch.equal(t.timesteps, ctx.sampler.timesteps)
    from diffalign.sampling import denoise_step

    for k in range(4):
        out = denoise_step(ctx.denoiser(t.prompts), ctx.sampler, t.latents[:, k], t.timesteps[k], 1.0,
                           prev_sample=t.latents[:, k + 1])  # fmt: skip
        torch.testing.assert_close(out.log_prob, t.log_probs[:, k], rtol=0, atol=1e-6)


def test_collected_cat_and_local_share_of_batches():
    g = torch.arange(12)  # 2 batches x 2 processes x 3 rows
    assert torch.equal(local_share(g, 0, 2, batches=2), torch.tensor([0, 1, 2, 6, 7, 8]))
    assert torch.equal(local_share(g, 1, 2, batches=2), torch.tensor([3, 4, 5, 9, 10, 11]))
    with pytest.raises(ValueError):
        local_share(torch.arange(10), 0, 2, batches=2)
    parts = []
    for b in range(2):
        ctx = FakeCtx(steps=2, process_index=0, num_processes=2, others={1: [torch.ones(2) * b]}, id_shift=2)
        parts.append(collect(ctx, ["a", "b"], [4 * b, 4 * b + 1], eta=1.0))
    both = Collected.cat(parts)
    assert both.batches == 2 and len(both.trajectories) == 4 and both.images.shape[0] == 4
    assert torch.equal(both.gathered_group_ids, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    assert torch.equal(both.local(both.gathered_reward, 0), both.trajectories.reward)
