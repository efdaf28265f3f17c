"""KTO, BCO and DRO losses: definitions, the properties the papers state, the ladder KTO → BCO, bad input, and the
exercise checkers. Random tensors only (parity with TRL's KTOTrainer and bco_pair: tests/test_parity_cpo_orpo_kto.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlcourse.batches import mismatched_completions
from rlcourse.exercises.preference_variants import (
    check_bco_loss, check_dro_policy_loss, check_dro_value_loss, check_kto_loss, check_kto_reference_point,
)
from rlcourse.losses.bco import RewardShift, bco_loss, bco_pair_loss
from rlcourse.losses.dro import dro_loss, dro_policy_loss, dro_value_loss
from rlcourse.losses.kto import kto_loss, kto_reference_point


def _unpaired(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = -torch.rand(B, generator=g) * 40
    policy = ref + torch.randn(B, generator=g) * 3
    labels = torch.tensor([True, False] * (B // 2))
    return policy, ref, labels


# ---------------------------------------------------------------- KTO

def test_mismatched_completions_rotate_by_one_so_no_prompt_keeps_its_own():
    assert mismatched_completions(["y1", "y2", "y3", "y4"]) == ["y4", "y1", "y2", "y3"]
    ys = list(range(7))
    assert all(a != b for a, b in zip(ys, mismatched_completions(ys)))
    assert sorted(mismatched_completions(ys)) == ys  # every completion used exactly once
    with pytest.raises(ValueError, match="batch_size ≥ 2"):
        mismatched_completions(["alone"])


def test_reference_point_is_the_mean_log_ratio_clamped_at_zero_without_gradient():
    ref = torch.tensor([-10.0, -20.0, -5.0])
    policy = (ref + torch.tensor([1.0, 2.0, -0.6])).requires_grad_(True)
    z0 = kto_reference_point(policy, ref)
    assert z0.item() == pytest.approx(0.8) and not z0.requires_grad
    assert kto_reference_point(ref - 1.0, ref).item() == 0.0  # a negative KL estimate is clamped to 0
    undetached = (policy - ref).mean()  # even if a caller forgets the stop-gradient, kto_loss applies it
    kto_loss(policy, ref, torch.tensor([True, False, True]), undetached, beta=1.0).backward()
    direct = policy.detach().clone().requires_grad_(True)
    kto_loss(direct, ref, torch.tensor([True, False, True]), undetached.detach(), beta=1.0).backward()
    torch.testing.assert_close(policy.grad, direct.grad)


def test_kto_reduces_to_its_reference_point_when_policy_equals_reference():
    # π_θ = π_ref: every reward r_θ = 0, the KL estimate z₀ = 0, every value is λ_y σ(0) = λ_y / 2.
    _, ref, labels = _unpaired()
    z0 = kto_reference_point(ref.clone(), ref)
    assert z0.item() == 0.0
    loss = kto_loss(ref.clone(), ref, labels, z0, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    assert loss.item() == pytest.approx((4 * 1.0 + 4 * 1.5) / 8 / 2)


def test_kto_matches_its_equation():
    policy, ref, labels = _unpaired()
    beta, z0, wd, wu = 0.2, torch.tensor(0.7), 1.3, 0.8
    r = policy - ref
    per_example = torch.where(labels, wd * (1 - torch.sigmoid(beta * (r - z0))), wu * (1 - torch.sigmoid(beta * (z0 - r))))
    torch.testing.assert_close(kto_loss(policy, ref, labels, z0, beta, wd, wu), per_example.mean())


def test_kto_pushes_desirable_rewards_up_and_undesirable_down_and_saturates():
    policy, ref, labels = _unpaired()
    policy = policy.clone().requires_grad_(True)
    kto_loss(policy, ref, labels, torch.tensor(0.5), beta=0.5).backward()
    assert (policy.grad[labels] < 0).all() and (policy.grad[~labels] > 0).all()  # descent raises / lowers them
    far = torch.tensor([500.0], requires_grad=True)
    kto_loss(far, torch.zeros(1), torch.tensor([True]), 0.0, beta=1.0).backward()
    assert far.grad.abs().item() < 1e-12  # unlike DPO's −log σ, the value function is bounded: no push past it


def test_kto_with_a_zero_reference_point_is_apo_zero_unpaired():
    policy, ref, labels = _unpaired()
    r = 0.1 * (policy - ref)
    apo = torch.where(labels, 1 - torch.sigmoid(r), torch.sigmoid(r)).mean()  # TRL's "apo_zero_unpaired"
    torch.testing.assert_close(kto_loss(policy, ref, labels, 0.0, beta=0.1), apo)


def test_kto_errors_name_the_argument():
    policy, ref, labels = _unpaired()
    with pytest.raises(TypeError, match="labels.*bool"):
        kto_loss(policy, ref, labels.float(), 0.0)
    with pytest.raises(ValueError, match="labels has shape \\(7,\\)"):
        kto_loss(policy, ref, labels[:7], 0.0)
    with pytest.raises(ValueError, match="ref_kl_logps"):
        kto_reference_point(policy, ref[:3])


# ---------------------------------------------------------------- BCO

def test_bco_is_binary_cross_entropy_on_the_shifted_implicit_reward():
    policy, ref, labels = _unpaired()
    beta, delta = 0.2, 0.4
    r = beta * (policy - ref)
    bce = F.binary_cross_entropy_with_logits(r - delta, labels.float())
    torch.testing.assert_close(bco_loss(policy, ref, labels, beta, delta), bce)


def test_bco_pair_is_twice_bco_on_the_same_rows_unpaired():
    policy, ref, labels = _unpaired()
    chosen, rejected = policy[labels], policy[~labels]
    ref_chosen, ref_rejected = ref[labels], ref[~labels]
    for delta in (0.0, 0.3):
        pair = bco_pair_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, delta=delta)
        torch.testing.assert_close(pair, 2 * bco_loss(policy, ref, labels, beta=0.1, delta=delta))


def test_bco_is_log2_when_policy_equals_reference_and_no_shift():
    _, ref, labels = _unpaired()
    assert bco_loss(ref.clone(), ref, labels).item() == pytest.approx(math.log(2))


def test_reward_shift_is_the_running_mean_of_every_reward_seen():
    shift = RewardShift()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(n, generator=g) for n in (4, 4, 6, 2)]
    first = shift.update(batches[0])
    assert first == pytest.approx(batches[0].mean().item(), abs=1e-6)
    for b in batches[1:]:
        shift.update(b)
    assert shift.mean == pytest.approx(torch.cat(batches).mean().item(), abs=1e-6)
    assert shift.count == 16
    assert shift.update(torch.empty(0)) == shift.mean  # an empty batch changes nothing


def test_bco_gradient_does_not_flow_through_the_shift():
    policy, ref, labels = _unpaired()
    policy = policy.clone().requires_grad_(True)
    delta = torch.tensor(0.3, requires_grad=True)
    bco_loss(policy, ref, labels, 0.1, delta).backward()
    assert delta.grad is None and policy.grad is not None


def test_bco_saturates_like_a_classifier_not_like_kto():
    # −log σ keeps a gradient of −1 for a desirable example far *below* the shift; KTO's 1 − σ gives ~0 there.
    low = torch.tensor([-50.0], requires_grad=True)
    bco_loss(low, torch.zeros(1), torch.tensor([True]), beta=1.0).backward()
    assert low.grad.item() == pytest.approx(-1.0)
    low_kto = torch.tensor([-50.0], requires_grad=True)
    kto_loss(low_kto, torch.zeros(1), torch.tensor([True]), 0.0, beta=1.0).backward()
    assert abs(low_kto.grad.item()) < 1e-15


def test_bco_and_kto_agree_in_direction_and_bco_pulls_twice_as_hard_at_the_reference_point():
    # Same unpaired data, same implicit reward: KTO's 1 − σ(β(r − z₀)) and BCO's −log σ(βr − δ) with δ = βz₀.
    policy, ref, labels = _unpaired()
    beta, z0 = 0.2, 0.5
    grads = []
    for loss in (lambda p: kto_loss(p, ref, labels, z0, beta), lambda p: bco_loss(p, ref, labels, beta, beta * z0)):
        p = policy.clone().requires_grad_(True)
        loss(p).backward()
        grads.append(p.grad)
    assert (grads[0].sign() == grads[1].sign()).all()
    at_reference = (ref + z0).requires_grad_(True)  # every r_θ = z₀: each example sits on the reference point
    kto_grad, = torch.autograd.grad(kto_loss(at_reference, ref, labels, z0, beta), at_reference)
    bco_grad, = torch.autograd.grad(bco_loss(at_reference, ref, labels, beta, beta * z0), at_reference)
    torch.testing.assert_close(bco_grad, 2 * kto_grad)  # σ'(0) = 1/4 vs (1 − σ(0)) = 1/2


# ---------------------------------------------------------------- DRO

def test_dro_residual_vanishes_at_the_optimal_policy_and_value():
    # Four completions of one prompt: π* = π_ref exp(r/τ) / Z and V* = τ log Z make r − V* − τ log π*/π_ref = 0.
    tau = 0.5
    ref_logps = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    rewards = torch.tensor([1.0, 0.0, 0.5, -1.0], dtype=torch.float64)
    log_z = torch.logsumexp(ref_logps + rewards / tau, 0)
    policy_logps = ref_logps + rewards / tau - log_z
    values = torch.full((4,), (tau * log_z).item(), dtype=torch.float64)
    assert dro_loss(policy_logps, ref_logps, rewards, values, tau).item() == pytest.approx(0.0, abs=1e-24)
    assert dro_loss(policy_logps, ref_logps, rewards, values + 0.1, tau).item() > 1e-3


def test_dro_policy_and_value_losses_share_the_joint_gradient():
    g = torch.Generator().manual_seed(5)
    ref = -torch.rand(6, generator=g) * 30
    inputs = dict(ref_logps=ref, rewards=torch.rand(6, generator=g), tau=0.3)
    policy = (ref + torch.randn(6, generator=g)).requires_grad_(True)
    values = torch.rand(6, generator=g).requires_grad_(True)
    joint_policy, joint_values = torch.autograd.grad(dro_loss(policy, values=values, **inputs), (policy, values))
    (policy_grad,) = torch.autograd.grad(dro_policy_loss(policy, values=values.detach(), **inputs), policy)
    (value_grad,) = torch.autograd.grad(
        dro_value_loss(values, inputs["rewards"], policy.detach(), ref, inputs["tau"]), values)
    torch.testing.assert_close(policy_grad, joint_policy / inputs["tau"])  # ∂L_π/∂θ = (1/τ) ∂L_DRO/∂θ
    torch.testing.assert_close(value_grad, joint_values)


def test_dro_value_loss_is_minimised_by_the_mean_regularised_return():
    g = torch.Generator().manual_seed(6)
    ref = -torch.rand(5, generator=g) * 10
    policy = ref + torch.randn(5, generator=g)
    rewards, tau = torch.rand(5, generator=g), 0.4
    best = (rewards - tau * (policy - ref)).mean()  # one prompt, five completions: V(x) shared
    value = best.clone().requires_grad_(True)
    dro_value_loss(value.expand(5), rewards, policy, ref, tau).backward()
    assert abs(value.grad.item()) < 1e-6
    worse = dro_value_loss((best + 0.2).expand(5), rewards, policy, ref, tau)
    assert worse > dro_value_loss(best.expand(5), rewards, policy, ref, tau)


def test_dro_policy_gradient_raises_completions_that_beat_their_value():
    ref = torch.tensor([-5.0, -5.0])
    policy = ref.clone().requires_grad_(True)  # π_θ = π_ref: the quadratic term has no gradient yet
    dro_policy_loss(policy, ref, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), tau=0.1).backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # above the baseline: made likelier; below: less likely


def test_dro_errors_name_the_argument():
    with pytest.raises(ValueError, match="values has shape"):
        dro_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(1))


# ---------------------------------------------------------------- exercise checkers

def test_checkers_accept_the_reference_and_reject_wrong_answers(capsys):
    check_kto_reference_point(kto_reference_point)
    check_kto_loss(kto_loss)
    check_bco_loss(bco_loss)
    check_dro_value_loss(dro_value_loss)
    check_dro_policy_loss(dro_policy_loss)
    assert capsys.readouterr().out.count("✓") == 8  # values and gradients for three of the five
    with pytest.raises(AssertionError, match="gradient"):  # z₀ not detached
        check_kto_reference_point(lambda p, r: (p - r).mean().clamp(min=0))
    with pytest.raises(AssertionError, match="kto_reference_point"):  # not clamped
        check_kto_reference_point(lambda p, r: (p - r).mean().detach())
    with pytest.raises(AssertionError, match="kto_loss"):  # weights swapped
        check_kto_loss(lambda p, r, y, z, b, wd, wu: kto_loss(p, r, y, z, b, wu, wd))
    with pytest.raises(AssertionError, match="bco_loss"):  # shift ignored
        check_bco_loss(lambda p, r, y, b, d: bco_loss(p, r, y, b, 0.0))
    with pytest.raises(AssertionError, match="dro_policy_loss gradient"):  # penalty computed on a detached ratio
        check_dro_policy_loss(lambda p, r, rw, v, tau: -(p * (rw - v) - 0.5 * tau * (p - r).detach() ** 2).mean())
    with pytest.raises(AssertionError, match="dro_policy_loss"):  # penalty without the ½
        check_dro_policy_loss(lambda p, r, rw, v, tau: -(p * (rw - v) - tau * (p - r) ** 2).mean())




# ---------------------------------------------------------------- resumable state of the step functions

def test_bco_and_dro_step_state_round_trips_through_a_checkpoint(tmp_path):
    from rlcourse.methods import bco, dro

    step = bco.step_fn(bco.Settings(beta=0.1))
    assert isinstance(step, bco.BCOStep)
    step.shift.update(torch.tensor([1.0, 2.0, 6.0]))
    torch.save(step.state_dict(), tmp_path / "bco.pt")
    back = bco.step_fn()
    back.load_state_dict(torch.load(tmp_path / "bco.pt"))
    assert (back.shift.mean, back.shift.count) == (3.0, 3)

    step = dro.step_fn(4, dro.Settings(tau=1.0, value_lr=0.1))
    assert isinstance(step, dro.DROStep)
    with torch.no_grad():
        step.values.values.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    step.values.values.sum().backward()
    step.optimizer.step()  # Adam's moments are state too
    torch.save(step.state_dict(), tmp_path / "dro.pt")
    back = dro.step_fn(4)
    back.load_state_dict(torch.load(tmp_path / "dro.pt"))
    assert torch.equal(back.values.values, step.values.values)
    moments = back.optimizer.state_dict()["state"][0]
    assert torch.equal(moments["exp_avg"], step.optimizer.state_dict()["state"][0]["exp_avg"])
