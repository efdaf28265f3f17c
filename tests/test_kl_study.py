"""Lesson 10's KL study (rlcourse.kl_study): the exact toy problem reaches the closed-form optimum only with a
reverse-KL gradient, the estimator statistics on a categorical whose answers are known, and sampling from the tiny
model draws from the policy's whole distribution."""

import math

import pytest
import torch
from fixtures import categoricals, expectation

from rlcourse.kl import AdaptiveKLController, exact_token_kl, kl_k1, kl_k3
from rlcourse.kl_study import (
    TOY_MODES,
    estimator_stats,
    optimal_policy,
    optimal_policy_forward_kl,
    sample_token_kl,
    toy_optimize,
)


# --- the exact toy problem --------------------------------------------------------------------------

REF = torch.log_softmax(torch.tensor([1.5, 1.0, 0.5, 0.0, -0.5, -1.0], dtype=torch.float64), -1)
R = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)


def test_optimal_policy_maximises_reward_minus_beta_kl():
    beta = 0.3
    star = optimal_policy(REF, R, beta)
    objective = lambda lp: (lp.exp() * R).sum() - beta * exact_token_kl(lp, REF)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = torch.log_softmax(star + 0.1 * torch.randn(6, generator=g, dtype=torch.float64), -1)
        assert objective(other) < objective(star)


@pytest.mark.parametrize("mode,reaches_optimum", [("reward_k1", True), ("loss_k2", True), ("loss_k3_ratio", True),
                                                  ("loss_k3", False), ("loss_k1", False)])
def test_toy_optimisation_reaches_the_closed_form_only_with_a_reverse_kl_gradient(mode, reaches_optimum):
    assert mode in TOY_MODES
    betas = [0.3, 1.0]
    out = toy_optimize(REF, R, betas, mode, steps=1500, lr=0.05)
    star = optimal_policy(REF, R, torch.tensor(betas, dtype=torch.float64).reshape(-1, 1))
    gap = (out["logprobs"].exp() - star.exp()).abs().max().item()
    assert (gap < 1e-3) if reaches_optimum else (gap > 0.05), gap
    assert out["kl"].shape == (1501, 2) and out["kl"][0].abs().max() < 1e-12  # starts at π_ref


def test_plain_k3_in_the_loss_converges_to_the_forward_kl_optimum():
    betas = [0.3, 1.0]
    forward = optimal_policy_forward_kl(REF, R, torch.tensor(betas, dtype=torch.float64).reshape(-1, 1))  # (2, K)
    torch.testing.assert_close(forward.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    objective = lambda lp, b: (lp.exp() * R).sum() - b * exact_token_kl(REF, lp)  # noqa: E731  E[r] − β KL(ref‖π)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        other = torch.log_softmax(forward[0] + 0.1 * torch.randn(6, generator=g, dtype=torch.float64), -1)
        assert objective(other, 0.3) < objective(forward[0], 0.3)
    out = toy_optimize(REF, R, betas, "loss_k3", steps=1500, lr=0.05)
    assert (out["logprobs"].exp() - forward.exp()).abs().max() < 1e-3


def test_toy_controller_brings_the_kl_to_its_target():
    controller = AdaptiveKLController(init_beta=1.0, target=0.4, horizon=10)
    out = toy_optimize(REF, R, [1.0], "reward_k1", steps=1500, lr=0.05, controller=controller)
    assert out["kl"][-300:].mean().item() == pytest.approx(0.4, rel=0.1)
    assert out["beta"][-1].item() == pytest.approx(controller.beta)
    assert out["beta"][-1].item() < 1.0  # β had to fall: at β = 1 the KL stays below 0.4


# --- estimator statistics and sampling on the tiny model ----------------------------------------------


def test_estimator_stats_on_a_synthetic_categorical():
    """One 'prompt' whose completions are 3 independent draws from the same categorical: exact stats known."""
    logp, logq = categoricals(5, k=6, scale=1.5)
    n, length = 4000, 3
    draws = torch.multinomial(logp.exp(), n * length, replacement=True,
                              generator=torch.Generator().manual_seed(1)).reshape(n, length)
    kl = exact_token_kl(logp, logq)
    stats = estimator_stats(logp[draws], logq[draws], kl.expand(n, length), torch.ones(n, length),
                            torch.zeros(n, dtype=torch.long))
    for name in ["k1", "k3"]:
        assert abs(stats["token"][name]["bias"]) < 4 * stats["token"][name]["bias_se"]
    assert abs(stats["token"]["k2"]["bias"]) > 10 * stats["token"]["k2"]["bias_se"]
    assert stats["sequence"]["exact"]["std"] == pytest.approx(0, abs=1e-9)  # every prefix has the same KL
    k1_std = math.sqrt(length * expectation(logp, (kl_k1(logp, logq) - kl) ** 2).item())
    assert stats["sequence"]["k1"]["std"] == pytest.approx(k1_std, rel=0.05)
    assert stats["counts"] == {"completions": n, "tokens": n * length, "exact_kl_per_token": pytest.approx(kl.item())}


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from rlcourse.models import LoraSettings, tiny_model

    return tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))


def test_sample_token_kl_is_zero_with_fresh_adapters_and_masks_after_eos(tiny, tokenizer):
    prompts = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Name a planet, please."}]]
    out = sample_token_kl(tiny, tokenizer, prompts, num_samples=3, max_new_tokens=6, seed=0, batch_size=2)
    assert out["logps"].shape == out["exact_kl"].shape == out["mask"].shape == (6, 6)
    assert out["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert out["completion_ids"].shape == (6, 6) and out["completion_ids"].dtype == torch.long
    ended = out["completion_ids"] == tokenizer.eos_token_id  # the first EOS counts, everything after it is masked
    first_eos = torch.where(ended.any(1), ended.float().argmax(1), torch.full((6,), 6))
    torch.testing.assert_close(out["mask"].sum(1), (first_eos + 1).clamp(max=6).float())
    # LoRA's B starts at zero: the policy *is* the reference, so every KL is 0 up to rounding
    assert out["exact_kl"].abs().max() < 1e-5 and (out["logps"] - out["ref_logps"]).abs().max() < 1e-5
    # a mask is 1 on a prefix only (1s, then 0s)
    assert (out["mask"][:, 1:] <= out["mask"][:, :-1]).all() and (out["mask"][:, 0] == 1).all()


def test_sample_token_kl_sees_a_perturbed_policy(tiny, tokenizer):
    with torch.no_grad():
        saved = {n: p.clone() for n, p in tiny.named_parameters() if "lora_B" in n}
        for n, p in tiny.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    try:
        out = sample_token_kl(tiny, tokenizer, [[{"role": "user", "content": "Say hi."}]], num_samples=4,
                              max_new_tokens=5, seed=1)
    finally:
        with torch.no_grad():
            for n, p in tiny.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    m = out["mask"] > 0
    assert (out["exact_kl"][m] > 0).all()
    # the log-probs are those of the sampled tokens: k3 ≥ 0 everywhere, k1 of either sign is allowed
    assert (kl_k3(out["logps"], out["ref_logps"])[m] >= 0).all()


def test_sampled_kl_draws_from_the_whole_distribution(tokenizer):
    """k1/k3 are unbiased only for samples from π itself: no top-k cut (generate()'s default would be 50)."""
    from rlcourse.models import LoraSettings, tiny_model

    model = tiny_model(tokenizer, seed=0, lora=LoraSettings(r=4, alpha=8))
    out = sample_token_kl(model, tokenizer, [[{"role": "user", "content": "Say something."}]], num_samples=300,
                          max_new_tokens=1, batch_size=100)
    assert len(set(out["completion_ids"][:, 0].tolist())) > 100
