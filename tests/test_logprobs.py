"""rlcourse.logprobs against a naive loop, and padded == unpadded (tokenisation and collation: test_tokenization.py,
test_batches.py)."""

import pytest
import torch
import torch.nn.functional as F

from rlcourse.batches import PairBatch, RolloutBatch, Sequences, collate
from rlcourse.logprobs import (forward_logprobs, masked_mean, masked_sum, sequence_logps, to_model_device,
                               token_entropy, token_logprobs, token_logprobs_and_entropy)
from rlcourse.models import tiny_model
from rlcourse.tokenization import tokenize_prompt_completion


def naive_token_logprobs(logits, input_ids):
    B, T, _ = logits.shape
    out = torch.zeros(B, T - 1)
    for b in range(B):
        for t in range(T - 1):
            probs = torch.softmax(logits[b, t].double(), -1)
            out[b, t] = torch.log(probs[input_ids[b, t + 1]]).float()
    return out


def test_token_logprobs_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 17, generator=g) * 4
    ids = torch.randint(0, 17, (3, 6), generator=g)
    torch.testing.assert_close(token_logprobs(logits, ids), naive_token_logprobs(logits, ids), atol=1e-5, rtol=1e-5)


def test_entropy_matches_definition_and_bounds():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=g)
    p = torch.softmax(logits[:, :-1], -1)
    torch.testing.assert_close(token_entropy(logits), -(p * p.log()).sum(-1))
    assert (token_entropy(logits) <= torch.log(torch.tensor(9.0)) + 1e-6).all()
    uniform = torch.zeros(1, 3, 9)
    torch.testing.assert_close(token_entropy(uniform), torch.full((1, 2), torch.log(torch.tensor(9.0)).item()))


def test_logprobs_and_entropy_from_one_log_softmax_equal_the_two_apart():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 6, 11, generator=g) * 3).requires_grad_()
    ids = torch.randint(0, 11, (3, 6), generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.4).float()
    logps, entropy = token_logprobs_and_entropy(logits, ids, mask)
    torch.testing.assert_close(logps, token_logprobs(logits, ids))
    torch.testing.assert_close(entropy, token_entropy(logits.detach()) * mask)  # 0 off the mask
    assert not entropy.requires_grad
    grad, = torch.autograd.grad(logps.sum(), logits)
    expected, = torch.autograd.grad(token_logprobs(logits, ids).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_masked_sum_and_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert masked_sum(v, m).tolist() == [3.0, 6.0]
    assert masked_mean(v, m).tolist() == [1.5, 6.0]


def test_padded_batch_equals_unpadded_rows(tokenizer):
    model = tiny_model(tokenizer).eval()
    rows = [
        tokenize_prompt_completion(tokenizer, [{"role": "user", "content": q}], [{"role": "assistant", "content": a}])
        for q, a in [("Hi?", "Hello there, how can I help you today?"), ("Capital of France?", "Paris.")]
    ]
    batch = collate(rows, tokenizer.pad_token_id)
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum()  # the second row is padded
    with torch.no_grad():
        padded = forward_logprobs(model, batch)
        for i, row in enumerate(rows):
            alone = forward_logprobs(model, collate([row], tokenizer.pad_token_id))
            n = alone["mask"].shape[1]
            torch.testing.assert_close(padded["mask"][i, :n], alone["mask"][0])
            torch.testing.assert_close(padded["logps"][i, :n] * padded["mask"][i, :n],
                                       alone["logps"][0] * alone["mask"][0], atol=1e-5, rtol=1e-5)
            assert padded["mask"][i, n:].sum() == 0  # padding never counts
            torch.testing.assert_close(masked_sum(padded["logps"], padded["mask"])[i],
                                       masked_sum(alone["logps"], alone["mask"])[0], atol=1e-4, rtol=1e-5)


def test_sequence_logps_sums_the_completion_tokens(tokenizer):
    model = tiny_model(tokenizer).eval()
    row = tokenize_prompt_completion(tokenizer, [{"role": "user", "content": "Hi?"}],
                                     [{"role": "assistant", "content": "Hello."}])
    batch = collate([row], tokenizer.pad_token_id)
    with torch.no_grad():
        summed, out = sequence_logps(model, batch, with_stats=True)
    assert summed.shape == (1,) and {"logps", "mask", "entropy", "is_top1"} <= set(out)
    torch.testing.assert_close(summed, masked_sum(out["logps"], out["mask"]))
    assert out["mask"].sum() == sum(row["completion_mask"])


def test_to_model_device_moves_the_tensors_and_keeps_the_rest():
    # The meta device stands in for a GPU: batches are built on the CPU and must follow the model.
    model = torch.nn.Linear(2, 2, device="meta")
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = RolloutBatch(prompt_ids=ids, prompt_mask=ids, completion_ids=ids, completion_mask=ids,
                         rewards=torch.zeros(2), completions=["a", "b"])
    moved = to_model_device(model, batch)
    assert type(moved) is RolloutBatch and moved.prompt_ids.device.type == "meta" and moved.prompt_ids.shape == (2, 3)
    assert moved.completions == ["a", "b"]
    assert batch.prompt_ids.device.type == "cpu"  # a copy: the caller's batch stays where it was
    pairs = to_model_device(model, PairBatch(Sequences(ids, ids, ids), step=4))
    assert pairs.step == 4 and pairs.sequences.input_ids.device.type == "meta"  # nested batches move too
    on_cpu = to_model_device(torch.nn.Linear(2, 2), batch)
    assert on_cpu.prompt_ids is batch.prompt_ids  # no copy of the data on the CPU


def test_pair_forward_with_each_prompt_once_equals_the_forward_of_every_sequence(tokenizer, monkeypatch):
    """The shared-prompt forward (rlcourse.methods.cpo.pair_forward) against the plain one over all 2B sequences
    (its fallback, forced): per-sequence log-probs, ORPO's NLL over prompt and completion tokens, entropy, and the
    LoRA gradients of both."""
    from rlcourse.methods import cpo

    from fixtures import PREFERENCE_ROWS, flat_grads, perturb_lora, tiny_policy

    policy = tiny_policy(tokenizer)
    perturb_lora(policy, seed=0, scale=0.05)
    seqs = cpo.batches(PREFERENCE_ROWS, tokenizer, 4, None)(0).sequences

    def run():
        policy.zero_grad()
        out = cpo.pair_forward(policy, seqs, prompt_tokens=True)
        logps = masked_sum(out["logps"], out["mask"])  # (2B,) chosen rows first
        nll = -(masked_sum(out["prompt_logps"], out["prompt_mask"]).sum() + logps[:4].sum())  # ORPO's tokens
        entropy = (out["entropy"] * out["mask"]).sum() / out["mask"].sum()
        (logps.sum() + nll).backward()
        return logps.detach(), nll.detach(), entropy, flat_grads(policy).clone()

    assert cpo.pair_prompt_layout(seqs) is not None
    shared = run()
    monkeypatch.setattr(cpo, "pair_prompt_layout", lambda seqs: None)
    plain = run()
    for ours, full in zip(shared, plain, strict=True):
        torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-5)
