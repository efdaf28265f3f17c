"""KL(π_θ ‖ π_ref) of the policy from its reference, measured on completions sampled from the policy.

For a completion y ~ π_θ(·|x) the sequence KL is E_y[Σ_t log π_θ(y_t|·) − log π_ref(y_t|·)]. We report the
lower-variance form that sums, at each sampled prefix, the exact KL between the two next-token
distributions over the whole vocabulary: Σ_t KL(π_θ(·|x, y_<t) ‖ π_ref(·|x, y_<t)). Both have the same
expectation; lesson 10 compares them (and the k1/k2/k3 estimators) in detail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlcourse.logprobs import collate, tokenize_prompt_completion
from rlcourse.models import reference_policy


@torch.no_grad()
def sequence_kl(model, tokenizer, prompts: list, completions: list[str], batch_size: int = 8) -> list[float]:
    """Σ_t KL(π_θ ‖ π_ref) at each completion token, one value (nats) per completion."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            tokenize_prompt_completion(tokenizer, p, [{"role": "assistant", "content": c}] if isinstance(p, list) else c)
            for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size])
        ]
        batch = collate(rows, tokenizer.pad_token_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logp = F.log_softmax(model(**inputs).logits[:, :-1].float(), -1)  # (B, T-1, V)
        with reference_policy(model):
            logq = F.log_softmax(model(**inputs).logits[:, :-1].float(), -1)  # (B, T-1, V)
        token_kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1)
        mask = batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]
        out.extend((token_kl * mask).sum(-1).tolist())
    model.train(was_training)
    return out
