"""DPO-family losses: properties from the math, the step on a tiny model, TR-DPO, data checks, exercise checkers."""

import math

import pytest
import torch
from datasets import Dataset

from rlcourse.batches import collate_pairs
from rlcourse.data import deterministic_preferences
from rlcourse.evaluate import GoldResult, win_rate
from rlcourse.exercises import check_dpo_loss, check_implicit_reward, check_ipo_loss
from rlcourse.logprobs import forward_logprobs, sequence_logps
from rlcourse.losses import dpo_loss, implicit_reward, ipo_loss
from rlcourse.losses.dpo import DPO_LOSSES
from rlcourse.methods import dpo, ipo
from rlcourse.models import (REF_ADAPTER, add_reference_adapter, base_policy, reference_policy,
                             remove_reference_adapter)
from rlcourse.tokenization import tokenize_pairs
from rlcourse.train import TrainConfig, train

from fixtures import perturb_lora


def _logps(B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(B, generator=g) * 30 for _ in range(4)]


@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
def test_dpo_loss_is_log_2_when_policy_equals_reference(beta):
    chosen, rejected, _, _ = _logps()
    assert dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta).item() == pytest.approx(math.log(2))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr, rc, rr = _logps()
    pc, pr = pc.requires_grad_(True), pr.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta=0.1).backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # gradient descent moves chosen up, rejected down
    # and the weight on each pair is β·σ(−margin)/B: largest where the implicit reward ranks the pair wrong
    margin = 0.1 * ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(-pc.grad, 0.1 * torch.sigmoid(-margin) / 5)


def test_implicit_reward_and_loss_depend_only_on_log_ratios():
    pc, pr, rc, rr = _logps()
    shift = torch.full_like(pc, 3.7)  # the same change to policy and reference log-probs cancels
    torch.testing.assert_close(implicit_reward(pc + shift, rc + shift, 0.2), implicit_reward(pc, rc, 0.2))
    torch.testing.assert_close(dpo_loss(pc + shift, pr, rc + shift, rr, 0.2), dpo_loss(pc, pr, rc, rr, 0.2))


def test_dpo_loss_is_bradley_terry_likelihood_of_the_implicit_rewards():
    pc, pr, rc, rr = _logps()
    p_chosen_wins = torch.sigmoid(implicit_reward(pc, rc, 0.3) - implicit_reward(pr, rr, 0.3))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.3), -p_chosen_wins.log().mean())


def test_variants_reduce_to_dpo_or_to_their_definitions():
    pc, pr, rc, rr = _logps()
    base = dpo_loss(pc, pr, rc, rr, 0.1)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.1, "cdpo", 0.0), base)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.1, "robust", 0.0), base)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.3), base)  # sigmoid ignores ε, as TRL
    z = 0.1 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.1, "hinge"), torch.relu(1 - z).mean())
    # robust DPO is unbiased: averaging it over a label that flips with probability ε gives the clean loss
    eps = 0.2
    robust = lambda a, b, c, d: dpo_loss(a, b, c, d, 0.1, "robust", eps)  # noqa: E731
    noisy = (1 - eps) * robust(pc, pr, rc, rr) + eps * robust(pr, pc, rr, rc)
    torch.testing.assert_close(noisy, base)


def test_cdpo_minimum_sits_at_a_finite_margin():
    eps = 0.1
    z = torch.linspace(-5, 10, 3001, requires_grad=True)
    loss = dpo.DPO_LOSSES["cdpo"](z, torch.zeros_like(z), 1.0, eps)
    best = z[loss.argmin()].item()
    assert best == pytest.approx(math.log((1 - eps) / eps), abs=0.01)


def test_hinge_gives_no_gradient_beyond_margin_one():
    pc = torch.tensor([20.0, 0.5], requires_grad=True)  # β·margin 2.0 and 0.05
    dpo_loss(pc, torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1, "hinge").backward()
    assert pc.grad[0] == 0 and pc.grad[1] < 0


def test_apo_zero_pushes_both_rewards_away_from_zero_apo_down_lowers_chosen():
    pc, pr = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    dpo_loss(pc, pr, torch.zeros(3), torch.zeros(3), 0.1, "apo_zero").backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # APO-down: once the rejected reward is below the chosen one, both are pushed down (the chosen one less);
    # at ρ_w = ρ_l the two terms' pulls on the chosen log-prob cancel exactly
    pc, pr = torch.zeros(3, requires_grad=True), torch.full((3,), -5.0, requires_grad=True)
    dpo_loss(pc, pr, torch.zeros(3), torch.zeros(3), 0.1, "apo_down").backward()
    assert (pc.grad > 0).all() and (pr.grad > 0).all() and (pc.grad < pr.grad).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_minimum_sits_at_margin_one_over_two_beta(beta):
    h = torch.linspace(-2, 8, 10001)
    zeros, ones = torch.zeros_like(h), torch.ones_like(h)
    losses = torch.stack([ipo_loss(h[i:i + 1], zeros[:1], zeros[:1], zeros[:1], ones[:1], ones[:1], beta)
                          for i in range(0, len(h), 10)])
    best = h[::10][losses.argmin()].item()
    assert best == pytest.approx(1 / (2 * beta), abs=0.011)
    assert ipo_loss(torch.tensor([1 / (2 * beta)]), *[torch.zeros(1)] * 3, torch.ones(1), torch.ones(1), beta) == 0


def test_ipo_normalises_by_completion_length():
    # a 10-token chosen completion with log-ratio 10 is a per-token margin of 1, as a 1-token one with log-ratio 1
    z = torch.zeros(1)
    long = ipo_loss(torch.tensor([10.0]), z, z, z, torch.tensor([10.0]), torch.tensor([4.0]), 0.5)
    short = ipo_loss(torch.tensor([1.0]), z, z, z, torch.tensor([1.0]), torch.tensor([7.0]), 0.5)
    assert long.item() == pytest.approx(0.0) and short.item() == pytest.approx(0.0)


def test_unknown_loss_type_and_bad_label_smoothing_are_refused():
    a = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown loss_type 'ipo'.*ipo_loss"):
        dpo_loss(a, a, a, a, 0.1, "ipo")
    with pytest.raises(ValueError, match=r"label_smoothing=0.5 must lie in \[0, 0.5\)"):
        dpo_loss(a, a, a, a, 0.1, "robust", 0.5)
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo.Settings(loss_type="kto")
    assert set(DPO_LOSSES) == set(dpo.LOSS_TYPES)
    with pytest.raises(ValueError, match="IPO is rlcourse.methods.ipo"):
        dpo.Settings(loss_type="ipo")


# ── the step on the tiny model ───────────────────────────────────────────────────────────────────────────────

ROWS = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for q, c, r in [("2 + 2?", "4", "5"), ("Say hi.", "Hi!", "Bye."), ("A fruit?", "An apple.", "A rock."),
                        ("Sky colour?", "Blue.", "Green, mostly.")]]


def test_first_step_of_dpo_is_log_2_and_accuracy_zero(tokenizer, policy):
    loss, metrics = dpo.dpo_step(policy, dpo.batches(ROWS, tokenizer, 4, 64)(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # fresh LoRA: π_θ = π_ref
    assert metrics["rewards/margins"].item() == pytest.approx(0, abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 0  # ties are not wins


def test_padding_does_not_change_the_loss(tokenizer, policy):
    """A pair batched with a much longer pair gives the same per-pair log-probs as alone."""
    tokenized = tokenize_pairs(ROWS, tokenizer)
    alone, _ = sequence_logps(policy, collate_pairs(tokenized[:1], tokenizer.pad_token_id))
    both, _ = sequence_logps(policy, collate_pairs(tokenized[:1] + tokenized[3:], tokenizer.pad_token_id))
    torch.testing.assert_close(both[[0, 2]], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step_fn", [dpo.step_fn(dpo.Settings(beta=0.5)), ipo.step_fn(ipo.Settings(beta=0.5))],
                         ids=["dpo", "ipo"])
def test_training_raises_the_margin(tokenizer, policy, tmp_path, step_fn):
    batches = dpo.batches(ROWS, tokenizer, 4, 64)
    config = TrainConfig(steps=6, batch_size=4, learning_rate=1e-2, bf16=False, checkpoint_every=100)
    log = train(policy, batches, step_fn, config, tmp_path, progress=False)
    assert log["rewards/margins"][-1] > log["rewards/margins"][0] and log["rewards/accuracies"][-1] == 1.0
    assert log["loss"][-1] < log["loss"][0]


def test_tr_dpo_reference_adapter_starts_at_the_base_and_follows_the_policy(tokenizer, policy, tmp_path):
    add_reference_adapter(policy)
    batches = dpo.batches(ROWS, tokenizer, 4, 64)
    settings = dpo.Settings(beta=0.5, sync_ref_every=2, sync_alpha=1.0)
    loss, _ = dpo.dpo_step(policy, batches(0), settings)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # ref adapter = fresh copy = base
    config = TrainConfig(steps=4, batch_size=4, learning_rate=1e-2, bf16=False, checkpoint_every=100)
    log = train(policy, batches, dpo.step_fn(settings), config, tmp_path, progress=False)
    # α = 1: at steps 2 and 4 (0-based batch index) the reference becomes the policy, so that step's margin is 0
    assert log.at(3)["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert log.at(2)["rewards/margins"] != pytest.approx(0, abs=1e-5)
    assert all(not p.requires_grad for n, p in policy.named_parameters() if ".ref." in n)
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".default." in n)
    with pytest.raises(ValueError, match="already has an adapter"):
        add_reference_adapter(policy)
    remove_reference_adapter(policy)  # as after a TRL run, so that a fresh reference can be added
    assert REF_ADAPTER not in policy.peft_config and policy.active_adapter == "default"
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_tr_dpo_without_reference_adapter_says_how_to_fix(tokenizer, policy):
    batch = dpo.batches(ROWS, tokenizer, 4, 64)(2)
    with pytest.raises(ValueError, match="add_reference_adapter"):
        dpo.dpo_step(policy, batch, dpo.Settings(sync_ref_every=2))


def test_deterministic_preferences_are_conversational_pairs():
    data = deterministic_preferences(8)
    assert isinstance(data, Dataset) and len(data) == 8
    assert all(r["chosen"] != r["rejected"] for r in data)
    with pytest.raises(ValueError, match="n_pairs"):
        deterministic_preferences(100)


# ── the win rate ─────────────────────────────────────────────────────────────────────────────────────────────

def test_win_rate_counts_ties_half_and_is_paired():
    before = GoldResult([0.5, 0.5, 1.0, 0.0], [""] * 4)
    after = GoldResult([1.0, 0.5, 0.0, 0.0], [""] * 4)
    rate, (lo, hi) = win_rate(before, after)
    assert rate == pytest.approx((1 + 0.5 + 0 + 0.5) / 4) and lo <= rate <= hi
    assert win_rate(before, before)[0] == 0.5
    with pytest.raises(ValueError, match="same prompts"):
        win_rate(before, GoldResult([1.0], [""]))


# ── exercise checkers ────────────────────────────────────────────────────────────────────────────────────────

def test_checkers_accept_the_reference_and_reject_wrong_answers(capsys):
    check_implicit_reward(implicit_reward)
    check_dpo_loss(dpo_loss)
    check_ipo_loss(ipo_loss)
    with pytest.raises(AssertionError, match="implicit_reward"):
        check_implicit_reward(lambda p, r, beta: p - r)  # forgot β
    with pytest.raises(AssertionError, match="dpo_loss"):
        check_dpo_loss(lambda pc, pr, rc, rr, beta: -torch.nn.functional.logsigmoid(beta * (pc - pr)).mean())  # no ref
    with pytest.raises(AssertionError, match="ipo_loss"):
        check_ipo_loss(lambda pc, pr, rc, rr, lc, lr, beta: (((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2).mean())


def test_unattempted_exercise_is_reported_not_failed(capsys):
    def stub(*args):
        raise NotImplementedError
    check_dpo_loss(stub)
    assert "not attempted" in capsys.readouterr().out


def test_reference_is_a_frozen_copy_of_a_trained_adapter_and_the_base_stays_reachable(tokenizer, policy):
    # An SFT start before online RL: the copy made after training is the reference, not the base model.
    perturb_lora(policy, seed=0, scale=0.5)
    batch = collate_pairs(tokenize_pairs(ROWS, tokenizer), tokenizer.pad_token_id, 64)
    with torch.no_grad():
        trained = forward_logprobs(policy, batch)["logps"]
        with base_policy(policy):
            base = forward_logprobs(policy, batch)["logps"]
        add_reference_adapter(policy)
        with reference_policy(policy):
            ref = forward_logprobs(policy, batch)["logps"]
        with base_policy(policy):
            base_after = forward_logprobs(policy, batch)["logps"]
    torch.testing.assert_close(ref, trained)  # the copy is the trained policy ...
    assert not torch.allclose(ref, base)  # ... which differs from the base model
    torch.testing.assert_close(base_after, base)  # and the base is still the adapters switched off
    assert policy.active_adapter == "default"
