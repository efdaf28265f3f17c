"""CPO, SimPO and ORPO losses: their definitions, the properties the papers state, the ladder between them, the
errors on bad input, and the exercise checkers. Random tensors only (parity with TRL: tests/test_parity_cpo_orpo_kto.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlcourse.exercises.preference_variants import (
    check_cpo_loss, check_log_odds, check_orpo_loss, check_simpo_loss, check_simpo_reward,
)
from rlcourse.logprobs import masked_sum
from rlcourse.losses import sft_loss
from rlcourse.losses.cpo import cpo_loss, simpo_loss, simpo_reward
from rlcourse.losses.orpo import log1mexp, log_odds, odds_ratio_loss, orpo_loss


def _pairs(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(B, generator=g) * 40, -torch.rand(B, generator=g) * 40  # summed log-probs, ≤ 0


# ---------------------------------------------------------------- CPO

def test_cpo_without_nll_is_dpo_with_a_uniform_reference():
    chosen, rejected = _pairs()
    beta = 0.3
    dpo_with_zero_reference = -F.logsigmoid(beta * ((chosen - 0) - (rejected - 0))).mean()
    torch.testing.assert_close(cpo_loss(chosen, rejected, beta=beta, cpo_alpha=0.0), dpo_with_zero_reference)


def test_cpo_adds_alpha_times_the_token_mean_nll_of_the_chosen_completions():
    g = torch.Generator().manual_seed(1)
    chosen_tok = -torch.rand(3, 7, generator=g) * 4  # (B, T) per-token log-probs of y_w
    chosen_mask = (torch.rand(3, 7, generator=g) > 0.3).float()
    chosen_mask[:, 0] = 1
    rejected = -torch.rand(3, generator=g) * 20
    chosen = masked_sum(chosen_tok, chosen_mask)
    nll = sft_loss(chosen_tok, chosen_mask)
    expected = -F.logsigmoid(0.1 * (chosen - rejected)).mean() + 0.7 * nll
    torch.testing.assert_close(cpo_loss(chosen, rejected, nll, beta=0.1, cpo_alpha=0.7), expected)


def test_cpo_label_smoothing_is_the_conservative_mixture():
    chosen, rejected = _pairs()
    z = 0.2 * (chosen - rejected)
    expected = (-(0.9) * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z)).mean()
    torch.testing.assert_close(cpo_loss(chosen, rejected, beta=0.2, cpo_alpha=0, label_smoothing=0.1), expected)


def test_cpo_is_log2_when_chosen_and_rejected_are_equally_likely():
    x = -torch.rand(5) * 30
    assert cpo_loss(x, x.clone(), cpo_alpha=0).item() == pytest.approx(math.log(2))


def test_cpo_nll_term_pulls_the_chosen_log_prob_up_even_on_a_won_pair():
    # A pair already separated by a wide margin: the sigmoid term is flat, the NLL gradient is not.
    chosen_tok = torch.full((1, 4), -2.0, requires_grad=True)
    mask = torch.ones(1, 4)
    chosen = masked_sum(chosen_tok, mask)
    loss = cpo_loss(chosen, torch.tensor([-500.0]), sft_loss(chosen_tok, mask), beta=1.0, cpo_alpha=1.0)
    loss.backward()
    assert (chosen_tok.grad < -0.2).all()  # ≈ −1/4 per token from the NLL, ~0 from the preference term


def test_cpo_errors_name_the_argument_and_the_fix():
    chosen, rejected = _pairs()
    with pytest.raises(ValueError, match="nll_loss"):
        cpo_loss(chosen, rejected)  # cpo_alpha defaults to 1.0, as in TRL
    with pytest.raises(ValueError, match="policy_rejected_logps has shape \\(5,\\)"):
        cpo_loss(chosen, rejected[:5], cpo_alpha=0)
    with pytest.raises(ValueError, match="masked_sum"):
        cpo_loss(chosen[None], rejected[None], cpo_alpha=0)  # (1, B): per-token shape by mistake
    with pytest.raises(ValueError, match="nll_loss has shape"):
        cpo_loss(chosen, rejected, torch.ones(6))
    with pytest.raises(ValueError, match="label_smoothing"):
        cpo_loss(chosen, rejected, cpo_alpha=0, label_smoothing=0.5)


# ---------------------------------------------------------------- SimPO

def test_simpo_reward_is_invariant_to_repeating_a_completions_token_log_probs():
    g = torch.Generator().manual_seed(2)
    logps = -torch.rand(4, 6, generator=g) * 3  # (B, T)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    mask[:, 0] = 1
    twice = torch.cat([logps, logps], dim=1)  # (B, 2T): every completion said twice
    twice_mask = torch.cat([mask, mask], dim=1)
    torch.testing.assert_close(simpo_reward(twice, twice_mask, 2.0), simpo_reward(logps, mask, 2.0))
    # ...whereas the summed log-prob (DPO's and CPO's reward) doubles: longer is "worse" or "better" by length alone
    torch.testing.assert_close(masked_sum(twice, twice_mask), 2 * masked_sum(logps, mask))


def test_simpo_loss_depends_on_lengths_only_through_the_average():
    chosen, rejected = _pairs()
    lw, ll = torch.randint(1, 30, (6,)).float(), torch.randint(1, 30, (6,)).float()
    torch.testing.assert_close(simpo_loss(chosen, rejected, lw, ll), simpo_loss(3 * chosen, 3 * rejected, 3 * lw, 3 * ll))


def test_simpo_matches_its_equation():
    chosen, rejected = _pairs()
    lw, ll = torch.arange(1, 7).float(), torch.arange(6, 0, -1).float()
    beta, gamma = 2.5, 1.2
    expected = -F.logsigmoid(beta * chosen / lw - beta * rejected / ll - gamma).mean()
    torch.testing.assert_close(simpo_loss(chosen, rejected, lw, ll, beta=beta, gamma=gamma), expected)


def test_simpo_is_log2_exactly_at_the_target_margin():
    beta, gamma = 2.0, 0.8
    rejected = torch.tensor([-12.0, -3.0])
    lengths = torch.tensor([4.0, 1.0])
    chosen = (rejected / lengths + gamma / beta) * lengths  # average reward gap = γ/β
    assert simpo_loss(chosen, rejected, lengths, lengths, beta, gamma).item() == pytest.approx(math.log(2))


def test_simpo_gradient_vanishes_once_the_margin_saturates_and_not_before():
    lengths = torch.tensor([5.0])
    for gap, vanishes in [(40.0, True), (0.0, False)]:
        chosen = torch.tensor([-10.0 + gap], requires_grad=True)
        simpo_loss(chosen, torch.tensor([-10.0]), lengths, lengths, beta=2.0, gamma=0.5).backward()
        assert (abs(chosen.grad.item()) < 1e-6) == vanishes


def test_simpo_with_unit_lengths_and_no_margin_is_cpo_without_nll():
    chosen, rejected = _pairs()
    ones = torch.ones(6)
    torch.testing.assert_close(simpo_loss(chosen, rejected, ones, ones, beta=0.4, gamma=0.0),
                               cpo_loss(chosen, rejected, beta=0.4, cpo_alpha=0))


def test_simpo_refuses_an_empty_completion():
    chosen, rejected = _pairs(2)
    with pytest.raises(ValueError, match="rejected_lengths.*max_length"):
        simpo_loss(chosen, rejected, torch.ones(2), torch.tensor([3.0, 0.0]))


# ---------------------------------------------------------------- ORPO

def test_log_odds_is_log_p_over_1_minus_p_and_stays_finite_at_the_ends():
    logp = torch.tensor([-0.01, -0.3, -0.69, -0.7, -2.0, -9.0], dtype=torch.float64)
    p = logp.exp()
    torch.testing.assert_close(log_odds(logp), torch.log(p / (1 - p)))
    extreme = log_odds(torch.tensor([-1e-7, -80.0]))
    assert torch.isfinite(extreme).all() and extreme[1].item() == pytest.approx(-80.0)
    naive = torch.tensor([-1e-7]) - torch.log(1 - torch.tensor([-1e-7]).exp())  # cancels in float32
    assert abs(naive.item() - extreme[0].item()) > 0.01  # the stable form matters
    torch.testing.assert_close(log1mexp(torch.tensor([-0.5])), torch.log(1 - torch.tensor([-0.5]).exp()))


def test_odds_ratio_term_is_log2_and_the_log_odds_ratio_zero_when_equally_likely():
    x = -torch.rand(8) * 5
    assert (log_odds(x) - log_odds(x.clone())).abs().max().item() == 0.0
    torch.testing.assert_close(odds_ratio_loss(x, x.clone()), torch.full((8,), math.log(2)))


def test_odds_ratio_term_falls_as_the_chosen_completion_gets_likelier():
    rejected = torch.full((4,), -2.0)
    chosen = torch.tensor([-3.0, -2.0, -1.0, -0.1])
    losses = odds_ratio_loss(chosen, rejected)
    assert (losses[1:] < losses[:-1]).all()


def test_orpo_is_sft_plus_lambda_times_the_mean_odds_ratio_term():
    g = torch.Generator().manual_seed(3)
    chosen, rejected = -torch.rand(5, generator=g) * 3, -torch.rand(5, generator=g) * 3
    nll = torch.tensor(2.5)
    lor = log_odds(chosen) - log_odds(rejected)
    expected = nll - 0.25 * F.logsigmoid(lor).mean()
    torch.testing.assert_close(orpo_loss(chosen, rejected, nll, lambda_=0.25), expected)
    assert orpo_loss(chosen, rejected, nll, lambda_=0.0).item() == nll.item()  # λ = 0: plain SFT


def test_orpo_errors_name_the_argument():
    chosen, rejected = -torch.rand(3), -torch.rand(3)
    with pytest.raises(ValueError, match="policy_chosen_logps has positive values"):
        orpo_loss(-chosen, rejected, torch.tensor(1.0))
    with pytest.raises(ValueError, match="nll_loss must be a scalar"):
        orpo_loss(chosen, rejected, torch.ones(3))
    with pytest.raises(ValueError, match="policy_rejected_logps has shape"):
        orpo_loss(chosen, rejected[:2], torch.tensor(1.0))


# ---------------------------------------------------------------- exercise checkers

def test_checkers_accept_the_reference_and_reject_wrong_answers(capsys):
    check_cpo_loss(cpo_loss)
    check_simpo_reward(simpo_reward)
    check_simpo_loss(simpo_loss)
    check_log_odds(log_odds)
    check_orpo_loss(orpo_loss)
    with pytest.raises(AssertionError, match="simpo_loss"):  # forgot the margin
        check_simpo_loss(lambda cw, cr, lw, lr, beta, gamma: -F.logsigmoid(beta * (cw / lw - cr / lr)).mean())
    with pytest.raises(AssertionError, match="simpo_reward"):  # summed, not averaged
        check_simpo_reward(lambda logps, mask, beta: beta * (logps * mask).sum(-1))
    with pytest.raises(AssertionError, match="log_odds"):  # log of the probability, not of the odds
        check_log_odds(lambda logps: logps)
    with pytest.raises(AssertionError, match="orpo_loss"):  # sign of the odds-ratio term flipped
        check_orpo_loss(lambda cw, cr, nll, lam: nll + lam * F.logsigmoid(log_odds(cw) - log_odds(cr)).mean())
    with pytest.raises(AssertionError, match="cpo_loss"):  # NLL term dropped
        check_cpo_loss(lambda cw, cr, nll, beta, alpha: -F.logsigmoid(beta * (cw - cr)).mean())
    assert capsys.readouterr().out.count("✓") == 5


def test_the_package_exports_the_losses_and_checkers_of_lessons_07_to_09():
    import rlcourse.exercises
    import rlcourse.losses

    for name in ["cpo_loss", "simpo_loss", "simpo_reward", "orpo_loss", "odds_ratio_loss", "log_odds", "kto_loss",
                 "kto_reference_point", "bco_loss", "bco_pair_loss", "RewardShift",
                 "dro_loss", "dro_policy_loss", "dro_value_loss"]:
        assert name in rlcourse.losses.__all__ and hasattr(rlcourse.losses, name), name
    for name in ["check_cpo_loss", "check_simpo_reward", "check_simpo_loss", "check_log_odds", "check_orpo_loss",
                 "check_kto_reference_point", "check_kto_loss", "check_bco_loss", "check_dro_value_loss",
                 "check_dro_policy_loss"]:
        assert name in rlcourse.exercises.__all__ and hasattr(rlcourse.exercises, name), name


def test_rlcourse_losses_exports_every_loss_of_every_loss_module():
    import importlib
    import pkgutil

    import rlcourse.losses

    for info in pkgutil.iter_modules(rlcourse.losses.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"rlcourse.losses.{info.name}")
        for name, value in vars(module).items():
            defined_here = getattr(value, "__module__", None) == module.__name__
            if name.endswith("_loss") and not name.startswith("_") and defined_here:
                assert name in rlcourse.losses.__all__ and getattr(rlcourse.losses, name) is value, name


def test_unattempted_exercise_is_reported_not_failed(capsys):
    def stub(*args):
        raise NotImplementedError
    check_orpo_loss(stub)
    assert "not attempted" in capsys.readouterr().out
