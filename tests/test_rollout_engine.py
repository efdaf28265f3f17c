"""The rollout engine (``rlcourse.rollout_engine``) samples from a merged copy of the policy that follows every
update and every adapter context; its log-probs are the policy's own up to rounding; the shared-prompt forward of
the training step gives the full forward's log-probs and gradients; TRL's sampler correction is reproduced."""

import math

import pytest
import torch

from rlcourse.batches import RolloutBatch, pad_rollout
from rlcourse.losses.grpo import grpo_loss
from rlcourse.losses.off_policy import SAMPLER_IS_MODES, sampler_gap_metrics, sampler_importance_weights
from rlcourse.methods import grpo
from rlcourse.methods.rollouts import Rollouts, completion_logprobs, trl_inputs
from rlcourse.models import add_reference_adapter, base_policy, reference_policy
from rlcourse.rollout_engine import Sampler, _draw, _nucleus, sampler_for
from rlcourse.sampling import SamplingSettings, eos_token_ids, generate, prompt_ids

from fixtures import ROLLOUT, arithmetic_prompts, flat_grads, length_reward, perturb_lora

G = 4


@pytest.fixture
def perturbed(policy):
    perturb_lora(policy, seed=1, scale=0.3)  # LoRA away from 0, so policy and base differ
    return policy


def _prompts(tokenizer, n=2):
    return prompt_ids(tokenizer, [r["prompt"] for r in arithmetic_prompts(n)])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_sampler_is_the_policy_merged_in_every_context(perturbed, tokenizer):
    ids = _prompts(tokenizer, 1)[0]
    sampler = Sampler(perturbed, dtype=torch.float32)
    torch.testing.assert_close(_logits(sampler.model, ids), _logits(perturbed, ids), rtol=1e-4, atol=1e-4)
    with base_policy(perturbed):
        sampler.sync()
        base = _logits(perturbed, ids)
        torch.testing.assert_close(_logits(sampler.model, ids), base, rtol=1e-4, atol=1e-4)
    add_reference_adapter(perturbed)
    perturb_lora(perturbed, seed=2, scale=0.3)  # the trained adapter moves, "ref" stays
    with reference_policy(perturbed):
        sampler.sync()
        torch.testing.assert_close(_logits(sampler.model, ids), _logits(perturbed, ids), rtol=1e-4, atol=1e-4)
    assert (_logits(sampler.model, ids) - base).abs().max() > 1e-3, "the reference must differ from the base"


def test_sampler_follows_an_optimizer_step(perturbed, tokenizer):
    ids = _prompts(tokenizer, 1)[0]
    sampler = sampler_for(perturbed)
    before = _logits(sampler.model, ids)
    optimizer = torch.optim.SGD([p for p in perturbed.parameters() if p.requires_grad], lr=1.0)
    perturbed(input_ids=torch.tensor([ids])).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    assert sampler_for(perturbed) is sampler, "one sampler per policy, synced at each call"
    after = _logits(sampler.model, ids)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, _logits(perturbed, ids), rtol=1e-4, atol=1e-4)


def test_greedy_samples_are_transformers_greedy_generate(perturbed, tokenizer):
    prompts = [r["prompt"] for r in arithmetic_prompts(3)]
    ours = generate(perturbed, tokenizer, prompts, SamplingSettings(max_new_tokens=8, do_sample=False),
                    progress=False)
    ids = prompt_ids(tokenizer, prompts)
    theirs = []
    perturbed.eval()
    for p in ids:  # one at a time: no padding involved on transformers' side
        with torch.no_grad():
            out = perturbed.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                     eos_token_id=eos_token_ids(perturbed, tokenizer),
                                     pad_token_id=tokenizer.pad_token_id)
        theirs.append(tokenizer.decode(out[0, len(p):], skip_special_tokens=True).strip())
    assert ours == theirs


def test_samples_carry_the_policys_log_probs_and_stop_at_eos(perturbed, tokenizer):
    ids = _prompts(tokenizer)
    eos = eos_token_ids(perturbed, tokenizer)
    torch.manual_seed(0)
    samples = sampler_for(perturbed).sample(ids, G, 12, eos, tokenizer.pad_token_id, temperature=0.7)
    assert len(samples.completion_ids) == len(ids) * G
    for row, lp in zip(samples.completion_ids, samples.logps):
        assert len(row) == len(lp) and 1 <= len(row) <= 12
        assert not any(t in eos for t in row[:-1]), "a completion is cut right after its first EOS"
    batch = RolloutBatch(**pad_rollout([p for p in ids for _ in range(G)], samples.completion_ids,
                                       tokenizer.pad_token_id, samples.logps),
                         rewards=torch.zeros(len(ids) * G), completions=[""] * (len(ids) * G))
    with torch.no_grad():
        policy_logps, _ = completion_logprobs(perturbed, batch, temperature=0.7)
    gap = sampler_gap_metrics(policy_logps, batch.sampler_logps, batch.completion_mask)
    assert gap["sampling/sampling_logp_difference/max"] < 1e-4  # fp32: rounding only


def test_draw_and_nucleus_sample_the_right_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.2]]).repeat(20_000, 1)
    counts = torch.bincount(_draw(probs, torch.Generator().manual_seed(0)), minlength=3).float() / 20_000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.015, rtol=0)
    kept = _nucleus(probs[:1], top_p=0.6)  # 0.5 < 0.6: the second token is needed to reach the mass
    torch.testing.assert_close(kept, torch.tensor([[0.5, 0.3, 0.0]]))
    # the most likely token always stays
    torch.testing.assert_close(_nucleus(probs[:1], top_p=0.4), torch.tensor([[0.5, 0.0, 0.0]]))


def test_shared_prompt_forward_gives_the_full_forwards_logprobs_and_gradients(perturbed, tokenizer):
    batch = Rollouts(perturbed, tokenizer, arithmetic_prompts(2), length_reward, ROLLOUT, seed=0)(0)
    results = []
    for groups in (1, ROLLOUT.num_generations):
        perturbed.zero_grad()
        logps, _ = completion_logprobs(perturbed, batch, num_generations=groups)
        (logps * batch.completion_mask).sum().backward()
        results.append((logps.detach() * batch.completion_mask, flat_grads(perturbed)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


def test_shared_prompt_forward_falls_back_when_prompts_differ_within_a_group(perturbed, tokenizer):
    batch = Rollouts(perturbed, tokenizer, arithmetic_prompts(2), length_reward, ROLLOUT, seed=0)(0)
    with torch.no_grad():
        full, _ = completion_logprobs(perturbed, batch)
        mixed, _ = completion_logprobs(perturbed, batch, num_generations=2 * ROLLOUT.num_generations)  # 2 prompts
    torch.testing.assert_close(mixed, full)


def _trl_weights(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16's GRPOTrainer._generate_and_score_completions, the vLLM correction, transcribed."""
    per_token_logps_diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        per_token_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(per_token_logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)


@pytest.mark.parametrize("mode", SAMPLER_IS_MODES)
@pytest.mark.parametrize("clip", [(None, 3.0), (0.5, 1.5)])
def test_sampler_weights_are_trls(mode, clip):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(6, 5, generator=g) * 3
    sampling = old + 0.4 * torch.randn(6, 5, generator=g)
    mask = torch.ones(6, 5)
    mask[:, 3:] = 0
    ours = sampler_importance_weights(old, sampling, mask, mode, *clip)
    torch.testing.assert_close(ours, _trl_weights(old, sampling, mask, mode, *clip))
    assert ((ours == 0) | (ours == clip[1]) | ((ours > 0) & (ours < clip[1]))).all()


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_grpo_loss_with_the_sampler_correction_is_trls(make_online_trainer, tokenizer, mode):
    trainer, rows = make_online_trainer(grpo, grpo.Settings())
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    batch = Rollouts(model, tokenizer, rows, length_reward, ROLLOUT, seed=3)(0)
    mask = batch.completion_mask.float()
    with torch.no_grad():
        old, _ = completion_logprobs(model, batch)
    sampling = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(0)) * mask
    weights = sampler_importance_weights(old, sampling, mask, mode, None, 1.2)
    adv = grpo.advantages(batch, grpo.Settings(), ROLLOUT)
    logps, _ = completion_logprobs(model, batch)
    ours = grpo_loss(logps, old, adv, mask, loss_type="dapo", max_completion_length=ROLLOUT.sampling.max_new_tokens,
                     sampler_weights=weights)
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    try:
        inputs = trl_inputs(batch, adv) | {"old_per_token_logps": old, "importance_sampling_ratio": weights}
        theirs = trainer._compute_loss(model, inputs)
    finally:
        trainer.use_vllm = False
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-7)
    assert (weights != 1).any(), "the correction must change something for the check to mean anything"


def test_online_step_logs_the_sampler_gap_and_its_time(policy, tokenizer):
    batch = Rollouts(policy, tokenizer, arithmetic_prompts(2), length_reward, ROLLOUT, seed=0)(0)
    assert set(batch.timings) == {"sync", "prefill", "decode", "reward"}
    settings = grpo.Settings(sampler_correction="token_truncate")
    _, metrics = grpo.step_fn(settings, ROLLOUT)(policy, batch)
    assert metrics["sampling/sampling_logp_difference/max"] < 1e-4
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-4)
    assert {"time/prefill", "time/decode", "time/reward", "time/reference_forward"} <= set(metrics)
