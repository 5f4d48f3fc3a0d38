"""The preference and reward-difference losses against hand-computed values (spec §4.6, §5.1, §5.2 sanity
checks): Diffusion-DPO and D3PO (diffalign/methods/dpo_loss.py), PRDP (diffalign/methods/prdp_loss.py)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.methods.dpo_loss import d3po_loss, diffusion_dpo_loss, preference_from_rewards
from diffalign.methods.prdp_loss import prdp_loss

LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------------- Diffusion-DPO
def test_dpo_is_log2_at_the_reference_and_swapping_flips_the_gradient():
    err_w = torch.tensor([0.5, 0.2, 0.9], requires_grad=True)
    err_l = torch.tensor([0.4, 0.3, 0.1], requires_grad=True)
    loss, st = diffusion_dpo_loss(err_w, err_l, err_w.detach().clone(), err_l.detach().clone(), beta=5000.0)
    assert loss.item() == pytest.approx(LOG2, abs=1e-7) and st["implicit_acc"].item() == 0.5
    loss.backward()
    # dL/de_w = -(1/B) sigma(-u) * (-beta/2) = beta / (4B) at u = 0; dL/de_l = -beta / (4B)
    torch.testing.assert_close(err_w.grad, torch.full((3,), 5000.0 / 12))
    torch.testing.assert_close(err_l.grad, torch.full((3,), -5000.0 / 12))
    # winner and loser swapped: the gradient on each tensor flips sign
    a, b = err_w.detach().clone().requires_grad_(True), err_l.detach().clone().requires_grad_(True)
    swapped, _ = diffusion_dpo_loss(b, a, b.detach(), a.detach(), beta=5000.0)
    swapped.backward()
    torch.testing.assert_close(a.grad, -err_w.grad)


def test_dpo_by_hand():
    """beta 2: d_theta = 0.1 - 0.3 = -0.2, d_ref = 0.2 - 0.2 = 0 -> u = -(2/2)(-0.2) = 0.2; L = -log sigma(0.2)."""
    loss, st = diffusion_dpo_loss(
        torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2]), beta=2.0
    )
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), rel=1e-6)
    assert st["implicit_acc"].item() == 1.0 and st["reward_margin"].item() == pytest.approx(0.2)
    # the same image as winner and loser: u = 0 whatever theta
    same, _ = diffusion_dpo_loss(
        torch.tensor([0.7]), torch.tensor([0.7]), torch.tensor([0.1]), torch.tensor([0.1]), 9.0
    )
    assert same.item() == pytest.approx(LOG2)
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.0)


# ---------------------------------------------------------------------------------------------- D3PO
def test_d3po_is_log2_at_the_reference_with_the_known_gradient():
    logp_a = torch.tensor([-1.0, -2.0], requires_grad=True)
    logp_b = torch.tensor([-1.5, -0.5], requires_grad=True)
    pref = torch.tensor([1, -1])  # pair 0: a wins; pair 1: b wins
    loss, st = d3po_loss(logp_a, logp_b, logp_a.detach(), logp_b.detach(), pref, beta=0.1, eps=0.1)
    assert loss.item() == pytest.approx(LOG2, abs=1e-7)
    loss.backward()
    # winner: -beta / (2B) = -0.025, loser +0.025
    torch.testing.assert_close(logp_a.grad, torch.tensor([-0.025, 0.025]))
    torch.testing.assert_close(logp_b.grad, torch.tensor([0.025, -0.025]))
    assert st["ratio_clipfrac"].item() == 0.0


def test_d3po_ties_and_the_clamp_give_no_gradient():
    logp_a = torch.tensor([0.3, 0.05], requires_grad=True)
    logp_b = torch.tensor([0.0, 0.0], requires_grad=True)
    ref = torch.zeros(2)
    # pair 0: a's ratio exp(0.3) > 1.1 -> clamped; pair 1: a tie
    loss, st = d3po_loss(logp_a, logp_b, ref, ref, torch.tensor([1, 0]), beta=0.1, eps=0.1)
    loss.backward()
    assert logp_a.grad[0].item() == 0.0  # outside the band
    assert logp_a.grad[1].item() == 0.0 and logp_b.grad[1].item() == 0.0  # the tie
    by_hand = (-math.log(1 / (1 + math.exp(-0.1 * math.log(1.1)))) + LOG2) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert st["ratio_clipfrac"].item() == pytest.approx(0.25)


def test_preferences_from_rewards_and_dominance():
    assert preference_from_rewards(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])).tolist() == [1, -1, 0]
    a = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    # dominates, incomparable, dominated, equal
    assert preference_from_rewards(None, None, a, b).tolist() == [1, 0, -1, 0]


# ---------------------------------------------------------------------------------------------- PRDP
def flat(values):
    return torch.tensor(values, dtype=torch.float64)


def test_prdp_is_zero_when_predicted_and_true_differences_agree():
    """Two trajectories of one prompt, T = 2, beta 0.5, r = (1, 0): the loss is 0 iff s_0 - s_1 = 2."""
    ref = torch.zeros(2, 2, dtype=torch.float64)
    logp = flat([[1.0, 3.0], [0.0, 0.0]])  # s = (2, 0)
    loss, st = prdp_loss(logp, logp, ref, flat([1.0, 0.0]), torch.tensor([0, 0]), beta=0.5, clip_range=10.0)
    assert loss.item() == 0.0 and st["pairs"].item() == 1
    # at theta = ref every rho is 0: the loss is the mean of (dr / beta)^2 (spec §4.6)
    loss, _ = prdp_loss(ref, ref, ref, flat([1.0, 0.0]), torch.tensor([0, 0]), beta=0.5, clip_range=1.0)
    assert loss.item() == pytest.approx(4.0)


def test_prdp_pairs_per_prompt_and_ties_by_hand():
    """Prompt 0: r = (3, 1, 1) -> pairs (0,1), (0,2) (the tie (1,2) is left out); prompt 1: r = (2, 2) -> none.
    theta = theta_old = ref (all log-ratios 0) and beta 1: each pair's error is dr^2 = 4, the loss 4."""
    z = torch.zeros(5, 3, dtype=torch.float64)
    loss, st = prdp_loss(z, z, z, flat([3.0, 1.0, 1.0, 2.0, 2.0]), torch.tensor([0, 0, 0, 1, 1]), 1.0, 0.1)
    assert loss.item() == pytest.approx(4.0) and st["pairs"].item() == 2
    # no pair at all: a zero that keeps the graph
    leaf = z.clone().requires_grad_(True)
    loss, st = prdp_loss(leaf, z, z, flat([1.0] * 5), torch.tensor([0, 0, 0, 1, 1]), 1.0, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and st["pairs"].item() == 0 and torch.equal(leaf.grad, torch.zeros_like(z))


def test_prdp_pair_weights_from_the_combiner_by_hand():
    """weights w (Parrot's mask x Ctrl-U's weight) weigh pair (i, j) by w_i w_j. Prompt 0: r = (3, 1, 0) at
    theta = ref, beta 1: errors (0,1) 4, (0,2) 9, (1,2) 1. Sample 2 outside P (w 0): only (0,1) -> 4.
    w = (1, 0.5, 1): (0.5 x 4 + 9 + 0.5 x 1) / 2 = 5.75; the gradient of a w = 0 sample is exactly 0."""
    z = torch.zeros(3, 2, dtype=torch.float64)
    ids, r = torch.tensor([0, 0, 0]), flat([3.0, 1.0, 0.0])
    loss, st = prdp_loss(z, z, z, r, ids, 1.0, 0.1, weights=torch.tensor([1.0, 1.0, 0.0]))
    assert loss.item() == pytest.approx(4.0) and st["pairs"].item() == 1
    loss, _ = prdp_loss(z, z, z, r, ids, 1.0, 0.1, weights=torch.tensor([1.0, 0.5, 1.0]))
    assert loss.item() == pytest.approx(5.75)
    leaf = (z + torch.tensor([[0.3], [0.1], [-0.2]], dtype=torch.float64)).requires_grad_(True)
    loss, _ = prdp_loss(leaf, leaf.detach(), z, r, ids, 1.0, 0.1, weights=torch.tensor([1.0, 1.0, 0.0]))
    loss.backward()
    assert torch.equal(leaf.grad[2], torch.zeros(2, dtype=torch.float64)) and leaf.grad[0].abs().sum() > 0


def test_prdp_clipped_form_by_hand():
    """One pair, T = 2, beta 1, r = (1, 0), eps 0.1, ref 0, theta_old log-ratios 0.
    theta: rho_0 = (0.3, 0.0), rho_1 = (0.0, 0.0) -> s = (0.15, 0); clipped rho_0 = (0.1, 0) -> s_clip = (0.05, 0).
    e = (0.15 - 1)^2 = 0.7225, e_clip = (0.05 - 1)^2 = 0.9025 -> the clipped branch is the max: l = 0.9025, and
    its gradient reaches no clipped step: d l / d rho_0[0] = 0, d l / d rho_0[1] = 2 (0.05 - 1) / 2 = -0.95,
    and +0.95 on both (unclipped) steps of the loser."""
    z = torch.zeros(2, 2, dtype=torch.float64)
    logp = flat([[0.3, 0.0], [0.0, 0.0]]).requires_grad_(True)
    loss, st = prdp_loss(logp, z, z, flat([1.0, 0.0]), torch.tensor([7, 7]), beta=1.0, clip_range=0.1)
    assert loss.item() == pytest.approx(0.9025)
    loss.backward()
    torch.testing.assert_close(logp.grad, flat([[0.0, -0.95], [0.95, 0.95]]))
    assert st["clipfrac"].item() == pytest.approx(0.25) and st["rdp_error"].item() == pytest.approx(0.7225)
    # at theta = theta_old the two forms coincide: l = e
    old = logp.detach()
    same, _ = prdp_loss(old, old, z, flat([1.0, 0.0]), torch.tensor([7, 7]), beta=1.0, clip_range=0.1)
    assert same.item() == pytest.approx(0.7225)


def test_prdp_fixed_point_on_a_categorical_policy():
    """1-step, 2-outcome policy, r = (1, 0), uniform reference, beta 1 (spec §4.6): minimizing the RDP loss
    over the logits reaches pi(0) / pi(1) = e."""
    logits = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    ref = torch.log(torch.full((2, 1), 0.5, dtype=torch.float64))
    opt = torch.optim.SGD([logits], lr=0.2)
    for _ in range(300):
        logp = torch.log_softmax(logits, 0)[:, None]  # trajectory i took outcome i
        loss, _ = prdp_loss(logp, logp.detach(), ref, flat([1.0, 0.0]), torch.tensor([0, 0]), 1.0, 1e9)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.softmax(logits, 0)
    assert (p[0] / p[1]).item() == pytest.approx(math.e, rel=1e-6)
