"""Per-token log-probabilities, completion masks and entropies: the quantities every method is built from.

Shapes (see course/notation.md): N sequences, T tokens, V vocabulary. A causal LM's logits at position t
predict token t+1, so every per-token tensor here has T-1 columns: column t scores ``input_ids[:, t+1]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # only for annotations: rlcourse.batches loads TRL's collation helpers
    from rlcourse.batches import Sequences


def to_model_device(model, batch):
    """``batch`` (a ``rlcourse.batches`` dataclass) with its tensors on the model's device.

    Batches are built on the CPU (collation, the rollouts' padding); step functions and the log-prob helpers
    move them first, so the same code trains on a GPU. On the CPU it is a no-op.
    """
    return batch.to(next(model.parameters()).device)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log π(y_{t+1} | y_≤t) for each position.

    logits: (N, T, V) model outputs; input_ids: (N, T). Returns (N, T-1), computed in fp32
    (log_softmax in bf16 loses the small differences that preference losses depend on).
    """
    logits = logits[:, :-1].float()  # (N, T-1, V): position t predicts token t+1
    targets = input_ids[:, 1:]  # (N, T-1)
    return torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H(π(·|y_≤t)) of each next-token distribution, in nats. logits (N, T, V) -> (N, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs_and_entropy(logits: torch.Tensor, input_ids: torch.Tensor,
                               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and, from the same log-softmax, ``token_entropy`` where ``mask`` is set (0 elsewhere, no
    gradient): one pass over the (N, T-1, V) distributions instead of two, and the entropy's only at the tokens
    whose mean is logged. logits (N, T, V), input_ids (N, T), mask (N, T-1) -> (N, T-1), (N, T-1)."""
    return logprobs_and_entropy(logits[:, :-1], input_ids[:, 1:], mask)


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs_and_entropy`` for logits already aligned with their targets: logits (N, L, V), row t
    predicting ``targets[:, t]`` (N, L); mask (N, L) -> log-probs (N, L), entropy (N, L, 0 off the mask)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, L, V)
    logps = torch.gather(logp, 2, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        where = mask.bool()
        chosen = logp.detach()[where]  # (M, V): the masked positions' distributions
        entropy = torch.zeros_like(logps, dtype=logp.dtype).masked_scatter(where, -(chosen.exp() * chosen).sum(-1))
    return logps, entropy


def shift_mask(completion_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mask aligned with token_logprobs: 1 where token t+1 is a (non-padding) completion token.
    (N, T) -> (N, T-1)."""
    mask = completion_mask[:, 1:]
    if attention_mask is not None:
        mask = mask * attention_mask[:, 1:]
    return mask.float()


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t values·mask per sequence: the summed completion log-prob log π(y|x) for log-prob inputs. (N, T) -> (N,)."""
    return (values * mask).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over masked tokens (length-normalised log-prob, as SimPO uses). (N, T) -> (N,)."""
    return masked_sum(values, mask) / mask.sum(-1).clamp(min=1)


def forward_logprobs(model, sequences: Sequences, with_stats: bool = False) -> dict[str, torch.Tensor]:
    """Run the model on right-padded ``Sequences`` and return per-token log-probs on completion tokens.

    Returns ``logps`` (N, T-1), ``mask`` (N, T-1) and, with ``with_stats``, ``entropy`` (N, T-1, at completion
    tokens only: 0 elsewhere) and ``is_top1`` (N, T-1): whether the target token was the policy's most likely one.
    """
    seqs = to_model_device(model, sequences)
    logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits  # (N, T, V)
    mask = shift_mask(seqs.completion_mask, seqs.attention_mask)
    if not with_stats:
        return {"logps": token_logprobs(logits, seqs.input_ids), "mask": mask}
    logps, entropy = token_logprobs_and_entropy(logits, seqs.input_ids, mask)
    with torch.no_grad():
        is_top1 = (logits[:, :-1].argmax(-1) == seqs.input_ids[:, 1:]).float()
    return {"logps": logps, "mask": mask, "entropy": entropy, "is_top1": is_top1}


def sequence_logps(model, sequences: Sequences, with_stats: bool = False) -> tuple[torch.Tensor, dict]:
    """log π(y|x) of each sequence, (N,): its completion tokens' log-probs summed; and ``forward_logprobs``' dict."""
    out = forward_logprobs(model, sequences, with_stats)
    return masked_sum(out["logps"], out["mask"]), out


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over every masked token of the batch (one number): how TRL logs entropy and accuracy."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def shared_prompt_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor, G: int,
                         prompt_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits (N, C, V) that predict each of N = B·G completions' tokens, each of the B prompts forwarded once.

    prompt_ids, prompt_mask: (B, P), left-padded. completion_ids, completion_mask: (N, C), right-padded; rows
    b·G .. b·G+G−1 continue prompt b. The prompts run first and keep their keys and values; those are repeated G
    times and the completions (their last token predicts nothing) run on top of them, with positions that continue
    each prompt's. Gradients flow through the shared keys and values back into the prompts' forward, so a LoRA
    update sees what a forward over the N full sequences would give it, up to rounding, for B·(G−1)·P fewer token
    forwards. With ``prompt_logits`` also returns the prompts' own logits (B, P, V) (else None): position t predicts
    prompt token t+1.
    """
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                logits_to_keep=0 if prompt_logits else 1)
    kept = out.logits if prompt_logits else None
    first = out.logits[:, -1:].repeat_interleave(G, dim=0)  # (N, 1, V): predicts completion token 0
    C = completion_ids.size(1)
    if C == 1:
        return first, kept
    cache = out.past_key_values
    cache.batch_repeat_interleave(G)
    after = positions[:, -1:].repeat_interleave(G, dim=0) + 1 + torch.arange(C - 1, device=positions.device)
    mask = torch.cat([prompt_mask.repeat_interleave(G, dim=0), completion_mask[:, :-1]], dim=1)  # (N, P+C−1)
    rest = model(input_ids=completion_ids[:, :-1], attention_mask=mask, position_ids=after,
                 past_key_values=cache, use_cache=True).logits  # (N, C−1, V)
    return torch.cat([first, rest], dim=1), kept
