"""Per-token log-probabilities, completion masks and entropies: the quantities every method is built from.

Shapes (see course/notation.md): B batch, T tokens, V vocabulary. A causal LM's logits at position t
predict token t+1, so every per-token tensor here has T-1 columns: column t scores ``input_ids[:, t+1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl.trainer.utils import pad


def to_model_device(model, batch: dict) -> dict:
    """A copy of ``batch`` with its tensors on the model's device (lists such as decoded texts are kept).

    Batches are built on the CPU (collation, the rollouts' padding); step functions and the log-prob helpers
    move them first, so the same code trains on a GPU. On the CPU it is a no-op.
    """
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log π(y_{t+1} | y_≤t) for each position.

    logits: (B, T, V) model outputs; input_ids: (B, T). Returns (B, T-1), computed in fp32
    (log_softmax in bf16 loses the small differences that preference losses depend on).
    """
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    targets = input_ids[:, 1:]  # (B, T-1)
    return torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H(π(·|y_≤t)) of each next-token distribution, in nats. logits (B, T, V) -> (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return -(logp.exp() * logp).sum(-1)


def shift_mask(completion_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mask aligned with token_logprobs: 1 where token t+1 is a (non-padding) completion token. (B, T) -> (B, T-1)."""
    mask = completion_mask[:, 1:]
    if attention_mask is not None:
        mask = mask * attention_mask[:, 1:]
    return mask.float()


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t values·mask per sequence: the summed completion log-prob log π(y|x) for log-prob inputs. (B, T) -> (B,)."""
    return (values * mask).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over masked tokens (length-normalised log-prob, as SimPO uses). (B, T) -> (B,)."""
    return masked_sum(values, mask) / mask.sum(-1).clamp(min=1)


def forward_logprobs(model, batch: dict, with_stats: bool = False) -> dict[str, torch.Tensor]:
    """Run the model on a right-padded batch and return per-token log-probs on completion tokens.

    batch: ``input_ids``, ``attention_mask``, ``completion_mask``, each (B, T).
    Returns ``logps`` (B, T-1), ``mask`` (B, T-1) and, with ``with_stats``, ``entropy`` (B, T-1) and
    ``is_top1`` (B, T-1): whether the target token was the policy's most likely one.
    """
    batch = to_model_device(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    out = {
        "logps": token_logprobs(logits, batch["input_ids"]),
        "mask": shift_mask(batch["completion_mask"], batch["attention_mask"]),
    }
    if with_stats:
        with torch.no_grad():
            out["entropy"] = token_entropy(logits)
            out["is_top1"] = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]).float()
    return out


def tokenize_prompt_completion(tokenizer, prompt, completion) -> dict[str, list[int]]:
    """Token ids of prompt + completion and a completion mask, the way TRL's SFTTrainer builds them.

    Conversational examples (message lists) go through the chat template: the prompt with the generation
    prompt appended, then prompt + completion in one pass; the completion starts where the two token
    sequences diverge (usually right after the prompt). Standard examples are plain text concatenation.
    """
    if isinstance(prompt, list):  # conversational
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
        start += 1
    return {"input_ids": ids, "completion_mask": [0] * start + [1] * (len(ids) - start)}


def collate(examples: list[dict], pad_token_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples into a batch (B, T); truncate each to ``max_length`` first (keep start)."""
    cut = slice(0, max_length)
    ids = [torch.tensor(e["input_ids"][cut]) for e in examples]
    cmask = [torch.tensor(e["completion_mask"][cut]) for e in examples]
    return {
        "input_ids": pad(ids, padding_value=pad_token_id),
        "attention_mask": pad([torch.ones_like(i) for i in ids], padding_value=0),
        "completion_mask": pad(cmask, padding_value=0),
    }
