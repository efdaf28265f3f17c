"""rlcourse.measure on the tiny 2-layer model: parameter and weight-memory counts, NLL per token, the prose
paragraphs, logits differences, peak memory and the cost of a training step. Timings are never asserted.

The counts of a 4-bit layer are tested beside the NF4 maths, in tests/test_quantization.py.
"""

import sys

import pytest
import torch

from rlcourse.measure import (count_parameters, eval_batches, logits_difference, nll_per_token, peak_memory,
                              prose_paragraphs, step_cost, weight_memory_bytes)
from rlcourse.models import LoraSettings, tiny_model


CHAT = [
    {"prompt": [{"role": "user", "content": "Name a primary colour."}],
     "completion": [{"role": "assistant", "content": "Red."}]},
    {"prompt": [{"role": "user", "content": "What is two plus two?"}],
     "completion": [{"role": "assistant", "content": "Two plus two is four."}]},
    {"prompt": [{"role": "user", "content": "Say hello."}],
     "completion": [{"role": "assistant", "content": "Hello!"}]},
]


def test_weight_memory_counts_tied_weights_once_and_filters_modules(tokenizer):
    model = tiny_model(tokenizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = {id(p): p for p in model.parameters()}
    buffers = {id(b): b for b in model.buffers()}
    expected = sum(t.numel() * t.element_size() for t in [*params.values(), *buffers.values()])
    assert weight_memory_bytes(model) == expected
    q = model.model.layers[0].self_attn.q_proj
    assert weight_memory_bytes(model, ["model.layers.0.self_attn.q_proj"]) == q.weight.numel() * 4
    assert weight_memory_bytes(model, ["model.layers.0"]) == sum(
        p.numel() * 4 for p in model.model.layers[0].parameters())


def test_count_parameters_of_a_tiny_peft_model(tokenizer):
    lora = LoraSettings(r=4)
    model = tiny_model(tokenizer, lora=lora)
    trainable, total = count_parameters(model)
    assert (trainable, total) == model.get_nb_trainable_parameters()
    linears = [m for n, m in model.base_model.model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in n and n != "lm_head"]
    assert trainable == sum(lora.r * (m.in_features + m.out_features) for m in linears)
    base_total = count_parameters(tiny_model(tokenizer))[1]
    assert total == base_total + trainable


def test_nll_per_token_is_the_sft_loss(tokenizer):
    from rlcourse.logprobs import forward_logprobs
    from rlcourse.losses.sft import sft_loss

    model = tiny_model(tokenizer)
    batch = next(eval_batches(tokenizer, CHAT, batch_size=len(CHAT)))
    with torch.no_grad():
        out = forward_logprobs(model, batch)
        expected = sft_loss(out["logps"], out["mask"]).item()
    # in batches of 2 (padding differs) the token-level mean is the same
    assert nll_per_token(model, tokenizer, CHAT, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_prose_paragraphs_are_plain_text_and_score_every_token(tokenizer):
    texts = prose_paragraphs()
    assert len(texts) >= 20 and len(set(texts)) == len(texts)
    assert all(len(t.split()) >= 40 and ">>>" not in t and "\n" not in t for t in texts)
    batch = next(eval_batches(tokenizer, [{"prompt": "", "completion": t} for t in texts[:2]], batch_size=2))
    assert torch.equal(batch.completion_mask, batch.attention_mask)  # no prompt: every token counts


def test_logits_difference_zero_for_identical_models_and_positive_otherwise(tokenizer):
    a, b = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=0)
    batch = next(eval_batches(tokenizer, CHAT, batch_size=3))
    same = logits_difference(a, b, batch)
    assert same["max_abs"] == 0 and same["kl"] == pytest.approx(0, abs=1e-7) and same["top1_agreement"] == 1
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight.add_(0.05)
    diff = logits_difference(a, b, batch)
    assert diff["kl"] > 0 and diff["max_abs"] >= diff["mean_abs"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak_memory reads /proc (Linux)")
def test_peak_memory_sees_each_call_separately():
    def allocate(mb):
        def fn():
            t = torch.ones(mb * 2**20 // 4)  # touched, so resident
            return float(t[-1])
        return fn

    _, big = peak_memory(allocate(200))
    _, small = peak_memory(allocate(20))
    assert big["peak_increase"] >= 180 * 2**20
    # unlike ru_maxrss, a later, smaller computation is not hidden behind the earlier peak
    assert small["peak_increase"] < 100 * 2**20


def test_step_cost_reports_each_step_and_leaves_the_weights_alone(tokenizer):
    from rlcourse.logprobs import forward_logprobs
    from rlcourse.losses.sft import sft_loss

    model = tiny_model(tokenizer, lora=LoraSettings(r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = next(eval_batches(tokenizer, CHAT, batch_size=3))

    def sft_step(model, batch):
        out = forward_logprobs(model, batch)
        return sft_loss(out["logps"], out["mask"]), {}

    cost = step_cost(model, batch, {"sft": sft_step, "again": sft_step}, repeats=2, bf16=False)
    assert list(cost) == ["sft", "again"]
    for c in cost.values():
        assert c["seconds"] > 0 and set(c) == {"seconds", "peak_mb", "memory"}
        assert (c["peak_mb"] is None) == (c["memory"] == "not measured on this OS")
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
