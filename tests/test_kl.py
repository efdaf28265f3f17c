"""KL helpers: exact KL, the k1/k2/k3 estimators, KL in the reward vs in the loss, the adaptive controller, and
parity of our KL term with TRL 1.16's GRPOTrainer on the same tensors. Lesson 10's study: tests/test_kl_study.py."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import categoricals, expectation
from rlcourse.exercises import check_exact_token_kl, check_kl_k3
from rlcourse.kl import (
    AdaptiveKLController,
    exact_token_kl,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss_term,
    kl_penalized_rewards,
)

# --- random categoricals ---------------------------------------------------------------------------


# --- exact KL ---------------------------------------------------------------------------------------


def test_exact_kl_matches_the_definition_and_torch():
    logp, logq = categoricals(0)
    ours = exact_token_kl(logp, logq)
    assert ours.item() == pytest.approx(sum(math.exp(a) * (a - b) for a, b in zip(logp.tolist(), logq.tolist())))
    torch.testing.assert_close(ours, torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="sum"))


def test_exact_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(logits, -1)  # (B, T, V)
    assert exact_token_kl(logp, logp).shape == (3, 5)
    assert torch.equal(exact_token_kl(logp, logp), torch.zeros(3, 5))
    assert (exact_token_kl(logp, torch.log_softmax(logits + torch.randn_like(logits), -1)) > 0).all()


def test_exact_kl_treats_zero_probability_as_zero_and_rejects_mismatched_shapes():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.0]))  # a -inf entry
    logq = torch.log(torch.tensor([0.25, 0.25, 0.5]))
    assert exact_token_kl(logp, logq).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="same vocabulary"):
        exact_token_kl(logp, logq[:2])


# --- estimators: unbiasedness, bias, sign, small-r behaviour --------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_k1_and_k3_are_unbiased_and_k2_is_not_exact_expectations(seed):
    logp, logq = categoricals(seed, scale=1.5)  # "samples" a ~ p: the policy; q: the reference
    kl = exact_token_kl(logp, logq)
    assert expectation(logp, kl_k1(logp, logq)).item() == pytest.approx(kl.item(), rel=1e-12)
    assert expectation(logp, kl_k3(logp, logq)).item() == pytest.approx(kl.item(), rel=1e-12)
    assert abs(expectation(logp, kl_k2(logp, logq)).item() - kl.item()) > 1e-3  # biased


def test_estimators_from_samples_k1_k3_unbiased_k2_biased():
    """Monte Carlo with many samples: the sample means of k1 and k3 are within 4 standard errors of the
    exact KL; k2's is far outside."""
    logp, logq = categoricals(7, k=10, scale=1.5)
    kl = exact_token_kl(logp, logq).item()
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for fn, unbiased in [(kl_k1, True), (kl_k3, True), (kl_k2, False)]:
        values = fn(logp[samples], logq[samples])
        z = (values.mean().item() - kl) / (values.std().item() / math.sqrt(len(values)))
        assert (abs(z) < 4) if unbiased else (abs(z) > 10), (fn.__name__, z)


def test_k3_has_lower_variance_than_k1_when_the_distributions_are_close():
    logp, _ = categoricals(3)
    logq = torch.log_softmax(logp + 0.1 * torch.randn(8, generator=torch.Generator().manual_seed(4),
                                                      dtype=torch.float64), -1)
    var = lambda v: expectation(logp, (v - expectation(logp, v)) ** 2).item()  # noqa: E731
    assert var(kl_k3(logp, logq)) < 0.1 * var(kl_k1(logp, logq))


@settings(max_examples=200, deadline=None)
@given(st.floats(-30, 30), st.floats(-30, 30))
def test_k3_and_k2_are_never_negative(logp, ref_logp):
    a, b = torch.tensor([logp], dtype=torch.float64), torch.tensor([ref_logp], dtype=torch.float64)
    assert kl_k3(a, b).item() >= 0
    assert kl_k2(a, b).item() >= 0


@settings(max_examples=200, deadline=None)
@given(st.floats(-0.1, 0.1))
def test_k3_is_half_the_squared_log_ratio_for_small_ratios(log_r):
    # k3 = e^{log r} − log r − 1 = (log r)²/2 + (log r)³/6 + ...: the gap is third order.
    logps = torch.tensor([-2.0], dtype=torch.float64)
    k3 = kl_k3(logps, logps + log_r).item()
    assert abs(k3 - log_r**2 / 2) <= abs(log_r) ** 3 / 6 * math.exp(abs(log_r)) + 1e-15
    assert k3 >= 0
    assert k3 == pytest.approx(kl_k2(logps, logps + log_r).item(), abs=abs(log_r) ** 3 + 1e-15)


def test_estimators_are_zero_when_policy_equals_reference_and_follow_the_sampler_convention():
    logps = torch.tensor([[-1.0, -2.0]])
    assert torch.equal(kl_k1(logps, logps), torch.zeros(1, 2)) and torch.equal(kl_k3(logps, logps), torch.zeros(1, 2))
    # the sampled token is more likely under the policy than under the reference: k1 > 0
    assert kl_k1(torch.tensor([-0.1]), torch.tensor([-2.0])).item() == pytest.approx(1.9)
    with pytest.raises(ValueError, match="same sampled tokens"):
        kl_k3(logps, logps[:, :1])


# --- KL in the reward ---------------------------------------------------------------------------------


def _batch(seed=0, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    ref_logps = -torch.rand(B, T, generator=g) * 3
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, :2] = 0  # prompt-side zeros
    mask[2, 5:] = 0
    return torch.tensor([1.0, -0.5, 2.0]), logps, ref_logps, mask


def test_sequence_penalty_is_reward_minus_beta_times_summed_k1():
    rewards, logps, ref_logps, mask = _batch()
    got = kl_penalized_rewards(rewards, logps, ref_logps, mask, beta=0.1)
    torch.testing.assert_close(got, rewards - 0.1 * ((logps - ref_logps) * mask).sum(-1))
    per_row = kl_penalized_rewards(rewards, logps, ref_logps, mask, beta=torch.tensor([0.0, 0.1, 1.0]))
    assert per_row[0] == rewards[0]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_token_penalty_puts_the_reward_on_the_last_completion_token_and_sums_to_the_sequence_form(estimator):
    rewards, logps, ref_logps, mask = _batch()
    tokens = kl_penalized_rewards(rewards, logps, ref_logps, mask, 0.2, per_token=True, estimator=estimator)
    seq = kl_penalized_rewards(rewards, logps, ref_logps, mask, 0.2, estimator=estimator)
    assert tokens.shape == logps.shape
    torch.testing.assert_close(tokens.sum(-1), seq)
    assert (tokens[mask == 0] == 0).all()
    penalty_only = kl_penalized_rewards(torch.zeros(3), logps, ref_logps, mask, 0.2, per_token=True, estimator=estimator)
    torch.testing.assert_close((tokens - penalty_only)[[0, 1, 2], [5, 3, 4]], rewards)


def test_reward_penalty_carries_no_gradient_and_bad_input_is_named():
    rewards, logps, ref_logps, mask = _batch()
    logps.requires_grad_(True)
    assert not kl_penalized_rewards(rewards, logps, ref_logps, mask, 0.1).requires_grad
    with pytest.raises(ValueError, match=r"rows \[1\] have no completion token"):
        mask[1] = 0
        kl_penalized_rewards(rewards, logps, ref_logps, mask, 0.1, per_token=True)
    with pytest.raises(ValueError, match="negative"):
        kl_penalized_rewards(rewards, logps, ref_logps, torch.ones_like(mask), -0.1)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalized_rewards(rewards, logps, ref_logps, torch.ones_like(mask), 0.1, estimator="k4")
    with pytest.raises(ValueError, match="same N"):
        kl_penalized_rewards(rewards[:2], logps, ref_logps, mask, 0.1)


# --- KL in the loss: which KL does each surrogate's gradient follow? --------------------------------


def _expected_grad(loss_of_logp, ref):
    """∇_θ of Σ_a sg(π(a)) · loss(log π(a)) at random logits θ: the expected gradient under sampling from π."""
    theta = torch.randn(8, generator=torch.Generator().manual_seed(11), dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(theta, -1)
    (logp.detach().exp() * loss_of_logp(logp, ref)).sum().backward()
    return theta.grad, theta


def _true_grad(kl_of_logp, ref):
    theta = torch.randn(8, generator=torch.Generator().manual_seed(11), dtype=torch.float64, requires_grad=True)
    kl_of_logp(torch.log_softmax(theta, -1), ref).backward()
    return theta.grad


def test_k3_loss_follows_forward_kl_and_k3_times_ratio_follows_reverse_kl():
    _, ref = categoricals(2)
    reverse = _true_grad(lambda lp, r: exact_token_kl(lp, r), ref)  # ∇ KL(π ‖ π_ref)
    forward = _true_grad(lambda lp, r: exact_token_kl(r, lp), ref)  # ∇ KL(π_ref ‖ π)
    k3, _ = _expected_grad(lambda lp, r: kl_loss_term(lp, r, 1.0), ref)
    k3_ratio, _ = _expected_grad(lambda lp, r: kl_loss_term(lp, r, 1.0, old_logps=lp.detach()), ref)
    k2, _ = _expected_grad(lambda lp, r: kl_loss_term(lp, r, 1.0, estimator="k2"), ref)
    k1, _ = _expected_grad(lambda lp, r: kl_loss_term(lp, r, 1.0, estimator="k1"), ref)
    torch.testing.assert_close(k3, forward)
    torch.testing.assert_close(k3_ratio, reverse)
    torch.testing.assert_close(k2, reverse)
    torch.testing.assert_close(k1, torch.zeros_like(k1))  # k1 in the loss does not regularise at all
    assert not torch.allclose(forward, reverse)


def test_loss_term_value_is_beta_k3_and_the_ratio_is_one_on_policy():
    _, logps, ref_logps, _ = _batch()
    torch.testing.assert_close(kl_loss_term(logps, ref_logps, 0.3), 0.3 * kl_k3(logps, ref_logps))
    torch.testing.assert_close(kl_loss_term(logps, ref_logps, 0.3, old_logps=logps), 0.3 * kl_k3(logps, ref_logps))


# --- the adaptive controller ------------------------------------------------------------------------


def test_controller_follows_ziegler_update_rule():
    # e = clip(KL / target − 1, −0.2, 0.2); β ← β (1 + e · n_steps / horizon). Here 2.5 / 2 − 1 = 0.25 -> 0.2.
    c = AdaptiveKLController(init_beta=0.1, target=2.0, horizon=100)
    assert c.update(2.5, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert c.update(1.0, n_steps=10) == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))  # 1/2 - 1 = -0.5 -> -0.2
    before = c.beta
    assert c.update(2.0, n_steps=10) == before  # on target: unchanged
    assert c.update(2.2, n_steps=10) == pytest.approx(before * (1 + 0.1 * 0.1))  # inside the clip band


def test_controller_rejects_bad_settings_and_nan():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(init_beta=0.1, target=0.0)
    with pytest.raises(ValueError, match="not finite"):
        AdaptiveKLController(init_beta=0.1, target=1.0).update(float("nan"), 1)


# --- parity with TRL 1.16's GRPOTrainer: its per-token KL term is β·k3 (× the ratio by default) ---------


@pytest.fixture(scope="module")
def grpo(tokenizer, tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlcourse.models import LoraSettings, tiny_model
    from rlcourse.train import TrainConfig
    from rlcourse.trl_runs import trl_config

    model = tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # move the policy away from the reference (LoRA B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    args = trl_config(GRPOConfig, TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, bf16=False),
                      tmp_path_factory.mktemp("grpo"), beta=0.1, loss_type="bnpo", num_generations=4,
                      max_completion_length=8)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "Say hi."}]}] * 4)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                          args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call the loss directly
    return trainer


def _grpo_inputs(model):
    from rlcourse.logprobs import token_logprobs
    from rlcourse.models import base_policy

    g = torch.Generator().manual_seed(0)
    B, P, C = 4, 5, 7
    prompt_ids = torch.randint(0, 1000, (1, P), generator=g).expand(B, P)  # one prompt, G = 4 completions
    completion_ids = torch.randint(0, 1000, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 5:] = 0
    completion_mask[2, 3:] = 0
    ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P + C)
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), completion_mask], 1)
    # the base model as the reference (TRL's "ref" adapter here copies the randomised policy: KL 0)
    with torch.no_grad(), base_policy(model):
        ref = token_logprobs(model(input_ids=ids, attention_mask=attention).logits, ids)[:, P - 1 :]  # (B, C)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": torch.zeros(B), "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    return inputs, ids, attention, P


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("bias_correction", [True, False])
def test_grpo_kl_term_is_beta_k3_on_the_same_tensors(grpo, bias_correction):
    """With zero advantages TRL's bnpo loss is β·mean_tokens(k3 [× ratio]); its logged "kl" is mean_tokens(k3)."""
    from rlcourse.logprobs import token_logprobs

    model = grpo.model
    grpo.args.use_bias_correction_kl = bias_correction
    inputs, ids, attention, P = _grpo_inputs(model)
    model.train()
    model.zero_grad()
    trl_loss = grpo._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads, trl_kl = _lora_grads(model), grpo._metrics["train"]["kl"][-1]
    model.zero_grad()

    logps = token_logprobs(model(input_ids=ids, attention_mask=attention).logits, ids)[:, P - 1 :]  # (B, C)
    mask = inputs["completion_mask"].float()
    term = kl_loss_term(logps, inputs["ref_per_token_logps"], beta=0.1,
                        old_logps=logps.detach() if bias_correction else None)
    ours = (term * mask).sum() / mask.sum()
    ours.backward()
    ours_kl = ((kl_k3(logps, inputs["ref_per_token_logps"]) * mask).sum() / mask.sum()).item()
    assert ours_kl > 1e-3  # the policy really differs from the reference
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert ours_kl == pytest.approx(trl_kl, rel=1e-5)
    ours_grads = _lora_grads(model)
    assert ours_grads.keys() == trl_grads.keys() and ours_grads
    for name in trl_grads:
        torch.testing.assert_close(ours_grads[name], trl_grads[name], rtol=1e-4, atol=1e-7)
    model.zero_grad()


def test_grpo_default_beta_is_zero_and_rloo_default_is_not():
    from trl import GRPOConfig, RLOOConfig

    assert GRPOConfig.__dataclass_fields__["beta"].default == 0.0  # README pitfall 7: no KL term by default
    assert RLOOConfig.__dataclass_fields__["beta"].default == 0.05
    assert GRPOConfig.__dataclass_fields__["use_bias_correction_kl"].default is True


# --- exercises ---------------------------------------------------------------------------------------


def test_exercise_checkers_accept_the_reference_and_reject_wrong_answers(capsys):
    check_kl_k3(kl_k3)
    check_exact_token_kl(exact_token_kl)
    with pytest.raises(AssertionError, match="kl_k3"):
        check_kl_k3(lambda logps, ref_logps: torch.exp(logps - ref_logps) - (logps - ref_logps) - 1)  # flipped ratio
    with pytest.raises(AssertionError, match="exact_token_kl"):
        check_exact_token_kl(lambda logp, logq: (logq.exp() * (logq - logp)).sum(-1))  # the other direction

    def stub(*args):
        raise NotImplementedError

    check_kl_k3(stub)
    assert "not attempted" in capsys.readouterr().out


# --- the probes' sequence KL --------------------------------------------------------------------------


def test_sequence_kl_is_the_exact_kl_summed_over_the_completion_tokens(policy, tokenizer):
    """On the tiny policy against its "ref" adapter: the completion positions' logits alone give what the full
    forward gives, for prompts of different lengths, an empty completion and a policy equal to its reference."""
    import torch.nn.functional as F

    from fixtures import arithmetic_prompts, perturb_lora
    from rlcourse.batches import collate
    from rlcourse.kl import sequence_kl
    from rlcourse.logprobs import shift_mask
    from rlcourse.models import add_reference_adapter, reference_policy
    from rlcourse.tokenization import tokenize_prompt_completion

    prompts = [r["prompt"] for r in arithmetic_prompts(3)]
    prompts[1] = [{"role": "user", "content": "What is 2 + 2? Take a deep breath, then reply with the number."}]
    completions = ["12", "4, since two and two make four", ""]
    perturb_lora(policy, 1, 0.05)
    add_reference_adapter(policy)
    assert sequence_kl(policy, tokenizer, prompts, completions) == pytest.approx([0.0] * 3, abs=1e-6)
    perturb_lora(policy, 2, 0.05)  # the policy moves, the reference stays

    rows = [tokenize_prompt_completion(tokenizer, p, [{"role": "assistant", "content": c}])
            for p, c in zip(prompts, completions)]
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logp = F.log_softmax(policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1], -1)
        with reference_policy(policy):
            logq = F.log_softmax(policy(input_ids=batch.input_ids,
                                        attention_mask=batch.attention_mask).logits[:, :-1], -1)
    expected = (exact_token_kl(logp, logq) * shift_mask(batch.completion_mask, batch.attention_mask)).sum(-1)
    got = sequence_kl(policy, tokenizer, prompts, completions, batch_size=2)
    assert expected[0] > 0 and expected[1] > expected[0]
    assert got == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)
