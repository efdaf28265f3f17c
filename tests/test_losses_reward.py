"""Reward-model losses: properties from the math, the ladder of variants, Spearman, and the exercise checkers."""

import math

import numpy as np
import pytest
import torch

from rlcourse.evaluate import average_ranks, spearman
from rlcourse.exercises import check_bradley_terry_loss, check_reward_model_loss, check_spearman
from rlcourse.losses import bradley_terry_loss, center_rewards_loss, margin_loss, reward_model_loss


def _pairs(seed=0, B=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, generator=g) * 2, torch.randn(B, generator=g) * 2


def test_bradley_terry_is_log2_when_the_scores_are_equal():
    r = torch.randn(5)
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))


def test_bradley_terry_is_the_negative_log_likelihood_of_the_preferences():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    p = 1 / (1 + np.exp(-np.array([2.0, -1.0])))  # P(y_w ≻ y_l) under Bradley–Terry
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(-np.log(p).mean(), rel=1e-6)


def test_bradley_terry_ignores_a_constant_shift_and_falls_as_the_gap_grows():
    chosen, rejected = _pairs()
    torch.testing.assert_close(bradley_terry_loss(chosen + 7.5, rejected + 7.5), bradley_terry_loss(chosen, rejected))
    losses = [bradley_terry_loss(torch.tensor([d]), torch.tensor([0.0])).item() for d in (-2, 0, 2, 10)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 1e-4


def test_bradley_terry_gradient_is_sigmoid_of_the_reversed_gap():
    """d/dr_w of −log σ(r_w − r_l) is −σ(r_l − r_w) (per pair, then / B): a pair already ranked right pulls weakly."""
    chosen, rejected = _pairs()
    chosen.requires_grad_(True)
    bradley_terry_loss(chosen, rejected).backward()
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(rejected - chosen.detach()) / len(chosen))


def test_margin_loss_adds_one_term_and_is_bradley_terry_at_zero_margin():
    chosen, rejected = _pairs()
    torch.testing.assert_close(margin_loss(chosen, rejected, torch.zeros(8)), bradley_terry_loss(chosen, rejected))
    m = torch.rand(8)
    torch.testing.assert_close(margin_loss(chosen, rejected, m), bradley_terry_loss(chosen - m, rejected))
    assert margin_loss(chosen, rejected, m) > bradley_terry_loss(chosen, rejected)  # a margin asks for more


def test_center_term_is_zero_for_antisymmetric_rewards_and_blind_to_the_gap():
    chosen, rejected = _pairs()
    assert center_rewards_loss(chosen, -chosen).item() == 0
    shift = torch.randn(8)
    torch.testing.assert_close(center_rewards_loss(chosen + shift, rejected - shift), center_rewards_loss(chosen, rejected))
    mid = (chosen + rejected) / 2
    assert center_rewards_loss(chosen, rejected).item() == pytest.approx((4 * mid**2).mean().item(), rel=1e-6)


def test_centering_picks_the_shift_that_bradley_terry_leaves_free():
    """Minimising BT + η·center over a constant shift c of every reward lands at the c that zeroes the mean."""
    chosen, rejected = _pairs()
    c = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([c], lr=2.0)
    for _ in range(300):
        opt.zero_grad()
        reward_model_loss(chosen + c, rejected + c, center_rewards_coefficient=0.01).backward()
        opt.step()
    assert (chosen + rejected + 2 * c).mean().item() == pytest.approx(0, abs=1e-4)


def test_reward_model_loss_composes_the_three():
    chosen, rejected = _pairs()
    m = torch.rand(8)
    torch.testing.assert_close(reward_model_loss(chosen, rejected), bradley_terry_loss(chosen, rejected))
    torch.testing.assert_close(reward_model_loss(chosen, rejected, m), margin_loss(chosen, rejected, m))
    torch.testing.assert_close(reward_model_loss(chosen, rejected, m, 0.3),
                               margin_loss(chosen, rejected, m) + 0.3 * center_rewards_loss(chosen, rejected))


def test_average_ranks_and_spearman():
    assert average_ranks([5, 1, 5, 3]).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = np.array([0.1, 0.5, 0.5, 0.9, 1.0])
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone: ranks agree
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(5)))
    y = np.array([3.0, 1.0, 2.0, 5.0, 4.0])  # by hand: Pearson of the ranks
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([3, 1, 2, 5, 4])
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])


def test_checkers_accept_the_reference_and_reject_wrong_answers():
    check_bradley_terry_loss(bradley_terry_loss)
    check_reward_model_loss(reward_model_loss)
    check_spearman(spearman)
    with pytest.raises(AssertionError, match="bradley_terry_loss"):
        check_bradley_terry_loss(lambda c, r: -torch.log(torch.sigmoid(c - r)).sum())  # sum, not mean
    with pytest.raises(AssertionError, match="reward_model_loss"):
        check_reward_model_loss(lambda c, r, m, eta: margin_loss(c, r, m) + eta * ((c - r) ** 2).mean())
    with pytest.raises(AssertionError, match="spearman"):
        check_spearman(lambda x, y: np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])  # no ties


def test_unattempted_exercise_is_reported_not_failed(capsys):
    def stub(*args):
        raise NotImplementedError
    check_bradley_terry_loss(stub)
    check_spearman(stub)
    assert capsys.readouterr().out.count("not attempted") == 2
