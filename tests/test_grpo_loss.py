"""GRPO loss and KL terms on hand-made tensors (diffalign/methods/grpo_loss.py; spec §2.6, §6.1)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.methods.grpo_loss import gaussian_mean_kl, grpo_loss, k3_kl


# ------------------------------------------------------------------------------------ grpo_loss
def test_ratio_one_gives_minus_mean_advantage():
    logp_old = torch.tensor([-1.3, 0.2, 4.0, -0.7])
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, stats = grpo_loss(logp_old.clone(), logp_old, adv, clip_range=1e-4)
    # -mean([1, -2, 0.5, 3]) = -2.5 / 4
    torch.testing.assert_close(loss, torch.tensor(-0.625))
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0 and stats["ratio"] == 1
    assert stats["kl"] == 0
    torch.testing.assert_close(stats["policy_loss"], loss)


def test_clipping_hand_values():
    # rho = 1.5, eps = 0.2:
    #   A = +1: max(-1.5, -1.2) = -1.2 (clipped branch, no gradient)
    #   A = -1: max(+1.5, +1.2) = +1.5 (unclipped branch, d/dlogp = -A rho / B = 1.5 / 2)
    # rho = 0.5, eps = 0.2:
    #   A = +1: max(-0.5, -0.8) = -0.5 (unclipped, d/dlogp = -rho / B = -0.5 / 2)
    #   A = -1: max(+0.5, +0.8) = +0.8 (clipped, no gradient)
    logp_old = torch.zeros(2)
    logp = torch.full((2,), math.log(1.5), requires_grad=True)
    loss, stats = grpo_loss(logp, logp_old, torch.tensor([1.0, -1.0]), clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 1.5) / 2))
    assert stats["clipfrac"] == 1
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(0.5 * math.log(1.5) ** 2))
    torch.testing.assert_close(stats["ratio"], torch.tensor(1.5))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.75]))

    logp = torch.full((2,), math.log(0.5), requires_grad=True)
    loss, _ = grpo_loss(logp, logp_old, torch.tensor([1.0, -1.0]), clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor((-0.5 + 0.8) / 2))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-0.25, 0.0]))


def test_partial_clipfrac():
    # |rho - 1| = [0, 0.5, 0.1]: with eps = 0.2 only the middle one counts
    logp = torch.log(torch.tensor([1.0, 1.5, 1.1]))
    _, stats = grpo_loss(logp, torch.zeros(3), torch.ones(3), clip_range=0.2)
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(1 / 3))


def test_gradient_at_ratio_one_is_minus_advantage_over_batch():
    logp_old = torch.tensor([0.3, -2.0, 1.1, 0.0, -0.4])
    adv = torch.tensor([1.5, -0.5, 0.0, 2.0, -3.0])
    logp = logp_old.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, logp_old, adv, clip_range=1e-4)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 5)


def test_beta_zero_ignores_kl_and_beta_adds_mean_kl():
    logp_old = torch.zeros(3)
    adv = torch.tensor([1.0, 2.0, -3.0])  # -mean = 0
    loss0, _ = grpo_loss(logp_old.clone(), logp_old, adv, 0.1)
    bad = torch.tensor([float("inf"), float("nan"), 1.0])
    loss_ignored, stats = grpo_loss(logp_old.clone(), logp_old, adv, 0.1, kl=bad, beta=0.0)
    assert torch.equal(loss_ignored, loss0) and torch.isfinite(loss_ignored)
    kl = torch.tensor([0.3, 0.6, 0.0])
    loss, stats = grpo_loss(logp_old.clone(), logp_old, adv, 0.1, kl=kl, beta=0.5)
    # 0 + 0.5 * mean([0.3, 0.6, 0]) = 0.15
    torch.testing.assert_close(loss, torch.tensor(0.15))
    torch.testing.assert_close(stats["kl"], torch.tensor(0.3))
    torch.testing.assert_close(stats["policy_loss"], torch.tensor(0.0))


def test_gradient_with_k3_penalty():
    # d/dlogp [ -A rho / B + beta * k3 / B ] at rho = 1, d = ref - logp: (-A + beta (1 - e^d)) / B
    logp_old = torch.tensor([0.0, 0.5])
    ref = torch.tensor([0.2, 0.5])
    adv = torch.tensor([1.0, -1.0])
    logp = logp_old.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, logp_old, adv, 1e-4, kl=k3_kl(logp, ref), beta=0.1)
    loss.backward()
    d = ref - logp_old
    torch.testing.assert_close(logp.grad, (-adv + 0.1 * (1 - torch.exp(d))) / 2)


def test_grpo_loss_errors():
    z = torch.zeros(3)
    with pytest.raises(ValueError):
        grpo_loss(z, z, torch.zeros(2), 0.1)
    with pytest.raises(ValueError):
        grpo_loss(z, z, z, 0.0)
    with pytest.raises(ValueError):
        grpo_loss(z, z, z, 0.1, beta=0.1)  # beta > 0 without kl
    with pytest.raises(ValueError):
        grpo_loss(z, z, z, 0.1, kl=torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError):
        grpo_loss(z, z, z, 0.1, kl=z, beta=-1.0)


# ------------------------------------------------------------------------------------------ KL
def test_k3_hand_values():
    logp = torch.tensor([0.0, 0.0, -3.0])
    ref = torch.tensor([1.0, -1.0, -3.0])
    # d = ref - logp = [1, -1, 0]: e - 1 - 1 = e - 2; e^-1 + 1 - 1 = e^-1; 0
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([math.e - 2, math.exp(-1), 0.0]))
    x = torch.tensor([0.7, -1.2], requires_grad=True)
    out = k3_kl(x, x.detach())
    assert torch.equal(out, torch.zeros(2))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(2))  # d/dlogp = 1 - e^d = 0 at the reference


def test_k3_nonnegative_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4096, generator=g) * 3
    for scale in (3.0, 1e-2, 1e-6):
        ref = logp + torch.randn(4096, generator=g) * scale
        assert (k3_kl(logp, ref) >= 0).all()
        assert (k3_kl(logp.double(), ref.double()) >= 0).all()


def test_gaussian_mean_kl_hand_values():
    mean = torch.zeros(2, 1, 2, 2)
    ref = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    # std 0.5: sample 0 elements 1 / (2 * 0.25) = 2 -> mean 2, sum 8;
    #          sample 1 elements [0, 0, 0, 4 / 0.5 = 8] -> mean 2, sum 8
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, 0.5), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, 0.5, reduction="sum"), torch.tensor([8.0, 8.0]))
    # per-sample std [0.5, 1.0]: sample 1 elements [0, 0, 0, 4 / 2 = 2] -> mean 0.5
    per_sample = torch.tensor([0.5, 1.0])
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, per_sample), torch.tensor([2.0, 0.5]))
    # the broadcast form ddim_step returns ([B, 1, 1, 1]) gives the same
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, per_sample.reshape(2, 1, 1, 1)), torch.tensor([2.0, 0.5]))
    assert torch.equal(gaussian_mean_kl(ref, ref, 0.3), torch.zeros(2))


def test_gaussian_mean_kl_sum_is_the_exact_gaussian_kl():
    g = torch.Generator().manual_seed(1)
    mu, mu_ref = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    s = torch.tensor(0.37)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mu, s), torch.distributions.Normal(mu_ref, s))
    torch.testing.assert_close(gaussian_mean_kl(mu, mu_ref, s, reduction="sum"), exact.sum(dim=(1, 2)))
    torch.testing.assert_close(gaussian_mean_kl(mu, mu_ref, s), exact.mean(dim=(1, 2)))
    with pytest.raises(ValueError):
        gaussian_mean_kl(mu, mu_ref[:2], s)
