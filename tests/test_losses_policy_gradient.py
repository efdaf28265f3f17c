"""The policy-gradient ladder: properties from the math, bad input, and the exercise checkers."""

import pytest
import torch

from rlcourse.exercises import check_clipped_surrogate, check_group_advantages, check_rloo_advantages
from rlcourse.losses.grpo import aggregate_loss, grpo_advantages, grpo_loss, importance_ratio
from rlcourse.losses.rloo import reinforce_loss, reinforce_pp_advantages, rloo_advantages, rloo_loss
from rlcourse.methods import grpo, rloo
from rlcourse.methods.rollouts import RolloutSettings
from rlcourse.sampling import SamplingSettings

g = torch.Generator().manual_seed(0)


def _batch(N=6, C=5):
    mask = (torch.rand(N, C, generator=g) > 0.3).float()
    mask[:, 0] = 1
    return -torch.rand(N, C, generator=g) * 3, mask


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [2, 4, 8])
def test_group_advantages_have_zero_mean_per_group(scale, G):
    rewards = torch.randn(5 * G, generator=g)
    adv = grpo_advantages(rewards, G, scale).view(5, G)
    torch.testing.assert_close(adv.mean(1), torch.zeros(5), atol=1e-6, rtol=0)


def test_group_advantages_scale_options():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0])  # the second group has no spread
    group = grpo_advantages(rewards, 4, "group")
    assert torch.equal(group[4:], torch.zeros(4))  # equal rewards: no signal, and no division by zero
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25])
    torch.testing.assert_close(grpo_advantages(rewards, 4, "none")[:4], centred)
    torch.testing.assert_close(group[:4], centred / (torch.tensor([1.0, 0, 0, 0]).std() + 1e-4))
    torch.testing.assert_close(grpo_advantages(rewards, 4, "batch")[:4], centred / (rewards.std() + 1e-4))


def test_rloo_baseline_leaves_each_sample_out():
    rewards = torch.randn(12, generator=g)
    adv = rloo_advantages(rewards, 4)
    for i in range(12):
        group = rewards[(i // 4) * 4 : (i // 4) * 4 + 4]
        others = torch.cat([group[: i % 4], group[i % 4 + 1 :]])
        assert adv[i].item() == pytest.approx((rewards[i] - others.mean()).item(), abs=1e-6)
    torch.testing.assert_close(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    # RLOO's advantage is GRPO's unscaled one times G/(G-1)
    torch.testing.assert_close(adv, grpo_advantages(rewards, 4, "none") * 4 / 3)


def test_reinforce_pp_normalises_over_the_whole_batch():
    adv = reinforce_pp_advantages(torch.randn(16, generator=g) * 3 + 2)
    assert adv.mean().abs() < 1e-6 and adv.std().item() == pytest.approx(1.0, abs=1e-3)


def test_on_policy_rloo_gradient_is_reinforce():
    logps, mask = _batch()
    adv = torch.randn(6, generator=g)
    a = logps.clone().requires_grad_(True)
    rloo_loss(a, a.detach(), adv, mask).backward()
    b = logps.clone().requires_grad_(True)
    reinforce_loss((b * mask).sum(-1), adv).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_clipped_gradient_is_zero_outside_the_clip_band_only():
    # one token per sequence; ratios 1.5 and 0.5 are outside [0.8, 1.2], 1.1 and 0.9 inside
    old = torch.zeros(6, 1)
    ratio = torch.tensor([[1.5], [0.5], [1.1], [0.9], [1.5], [0.5]])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    logps = ratio.log().requires_grad_(True)
    grpo_loss(logps, old, adv, torch.ones(6, 1), clip_eps=0.2, loss_type="bnpo").backward()
    grad = logps.grad.squeeze(-1)
    assert grad[0] == 0 and grad[1] == 0  # ρ above 1+ε with A > 0, below 1−ε with A < 0: clipped
    assert (grad[2:] != 0).all()  # inside the band, or on the side where min() keeps the unclipped term
    # clip-higher widens the band upwards: 1.5 is inside [0.8, 1.6]
    logps.grad = None
    grpo_loss(logps, old, adv, torch.ones(6, 1), clip_eps=0.2, clip_eps_high=0.6, loss_type="bnpo").backward()
    assert logps.grad[0] != 0 and logps.grad[1] == 0


def test_dr_grpo_does_not_normalise_by_completion_length():
    per_token = torch.rand(4, 10, generator=g).requires_grad_(True)
    mask = torch.zeros(4, 10)
    for i, length in enumerate([1, 3, 6, 10]):
        mask[i, :length] = 1
    aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=10).backward()
    grad = per_token.grad[mask.bool()]
    torch.testing.assert_close(grad, torch.full_like(grad, 1 / 40))  # every token weighs the same: 1/(N·L_max)
    per_token.grad = None
    aggregate_loss(per_token, mask, "grpo").backward()
    assert per_token.grad[0, 0] == pytest.approx(1 / 4) and per_token.grad[3, 0] == pytest.approx(1 / 40)
    # lengthening a completion by tokens of zero loss leaves dr_grpo unchanged, but moves grpo's mean
    longer = mask.clone()
    longer[0, :5] = 1
    flat = per_token.detach().clone()
    flat[0, 1:5] = 0
    assert aggregate_loss(flat, longer, "dr_grpo", max_completion_length=10) == aggregate_loss(flat, mask, "dr_grpo",
                                                                                             max_completion_length=10)
    assert aggregate_loss(flat, longer, "grpo") != aggregate_loss(flat, mask, "grpo")


def test_dapo_equals_bnpo_without_accumulation_and_uses_num_items():
    logps, mask = _batch()
    per_token = logps.abs()
    assert aggregate_loss(per_token, mask, "dapo") == aggregate_loss(per_token, mask, "bnpo")
    half = aggregate_loss(per_token, mask, "dapo", num_items=2 * mask.sum())
    torch.testing.assert_close(half, aggregate_loss(per_token, mask, "bnpo") / 2)


def test_gspo_ratio_is_one_per_sequence_the_exp_of_the_mean_log_ratio():
    logps, mask = _batch()
    old = logps - 0.1 * torch.randn(logps.shape, generator=g)
    seq = importance_ratio(logps, old, mask, "sequence")
    assert seq.shape == (6, 1)
    expected = torch.exp(((logps - old) * mask).sum(-1) / mask.sum(-1))
    torch.testing.assert_close(seq.squeeze(-1), expected)


def test_grpo_loss_at_ratio_one_without_kl_is_minus_the_mean_advantage_per_token():
    logps, mask = _batch()
    adv = torch.randn(6, generator=g)
    loss = grpo_loss(logps, logps, adv, mask, loss_type="grpo")
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)


def test_bad_input_gets_a_clear_error():
    logps, mask = _batch()
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(logps, mask, "sum")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(logps, mask, "dr_grpo")
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="num_generations >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, logps, torch.zeros(6), mask, beta=0.1)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_ratio(logps, logps, mask, "batch")
    with pytest.raises(ValueError, match="num_generations=1"):
        RolloutSettings(num_generations=1)
    with pytest.raises(ValueError, match="do_sample"):
        RolloutSettings(sampling=SamplingSettings(do_sample=False))
    with pytest.raises(ValueError, match="loss_type"):
        grpo.Settings(loss_type="ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.Settings(scale_rewards="std")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo.Settings(importance_sampling_level="batch")
    with pytest.raises(ValueError, match="beta"):
        rloo.Settings(beta=-0.1)


def test_checkers_accept_the_reference_and_reject_wrong_answers(capsys):
    check_rloo_advantages(rloo_advantages)
    check_group_advantages(lambda r, G: grpo_advantages(r, G, "group"))
    check_clipped_surrogate(lambda lp, old, a, m, eps: grpo_loss(lp, old, a, m, clip_eps=eps, loss_type="grpo"))
    with pytest.raises(AssertionError, match="rloo_advantages"):
        check_rloo_advantages(lambda r, G: r - r.view(-1, G).mean(1).repeat_interleave(G))  # includes itself
    with pytest.raises(AssertionError, match="group_advantages"):
        check_group_advantages(lambda r, G: (r.view(-1, G) - r.view(-1, G).mean(1, keepdim=True)).view(-1)
                               / (r.std() + 1e-4))  # batch std, not the group's
    with pytest.raises(AssertionError, match="clipped_surrogate"):  # no clipping at all
        check_clipped_surrogate(lambda lp, old, a, m, eps: grpo_loss(lp, old, a, m, clip_eps=100.0, loss_type="grpo"))


def test_unattempted_exercise_is_reported_not_failed(capsys):
    def stub(rewards, num_generations):
        raise NotImplementedError
    check_group_advantages(stub)
    assert "not attempted" in capsys.readouterr().out
