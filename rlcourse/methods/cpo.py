"""CPO (Xu et al. 2024, lesson 07) on preference pairs: no reference model, one forward per step.

The loss lives in ``rlcourse.losses.cpo``; this module turns preference rows into batches and a batch into
(loss, metrics) for ``rlcourse.train.train``, as TRL 1.16's ``trl.experimental.cpo.CPOTrainer`` does with
``loss_type="sigmoid"``. SimPO (``rlcourse.methods.simpo``) and ORPO (``rlcourse.methods.orpo``) reuse this module's
forward and metrics: TRL's ORPOTrainer and CPOTrainer share them too.

- ``batches``: DPO's ``PairBatch``es, with one EOS token appended to each completion
  (``rlcourse.tokenization.with_eos``). Departure we reproduce for parity: CPOTrainer tokenises the chat-templated
  *text* and then calls ``add_eos_token_if_needed``; SmolLM2's template ends a turn with ``<|im_end|>\\n``, so every
  completion gets a second ``<|im_end|>``.
- ``cpo_step``: one policy forward, no reference forward; the NLL term is the token mean over the chosen completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import PairBatch, PairBatches, Sequences, pair_prompt_layout
from rlcourse.logprobs import (logprobs_and_entropy, masked_sum, masked_token_mean, shared_prompt_logits, shift_mask,
                               to_model_device, token_logprobs, token_logprobs_and_entropy)
from rlcourse.losses.cpo import cpo_loss
from rlcourse.losses.sft import sft_loss
from rlcourse.metrics import preference_metrics
from rlcourse.tokenization import tokenize_pairs


@dataclass(frozen=True)
class Settings:
    """CPO's options; the TRL names are in brackets (``CPOConfig`` fields)."""

    beta: float = 0.1
    """β [``beta``]: scales the log-prob margin."""
    cpo_alpha: float = 1.0
    """α [``cpo_alpha``]: weight of the NLL term on the chosen completions."""
    label_smoothing: float = 0.0
    """ε [``label_smoothing``]: conservative smoothing of the preference term (TRL's addition; 0: the paper)."""

    def __post_init__(self):
        if self.beta <= 0 or self.cpo_alpha < 0:
            raise ValueError(f"beta={self.beta} must be positive and cpo_alpha={self.cpo_alpha} non-negative")


def trl_classes():
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig


def batches(rows, tokenizer, batch_size: int, max_length: int | None) -> PairBatches:
    """step -> the ``PairBatch`` of that step: DPO's tokenisation, checks and batching, plus the EOS CPOTrainer
    appends to each completion."""
    tokenized = tokenize_pairs(rows, tokenizer, max_length, append_eos=True)
    return PairBatches(tokenized, batch_size, tokenizer.pad_token_id, max_length)


def pair_forward(model, seqs: Sequences, prompt_tokens: bool = False) -> dict[str, torch.Tensor]:
    """One policy forward of B pairs ((2B, T) sequences, chosen rows first), each pair's prompt forwarded once
    (``batches.pair_prompt_layout``, ``logprobs.shared_prompt_logits``: the same log-probs and gradients as TRL's
    forward over all 2B sequences, up to rounding, for ~a fifth fewer token-forwards on the concise task; logits only
    where a loss reads them). Returns the completions' per-token ``logps``, their ``mask`` and ``entropy`` (no
    gradient), chosen rows first; with ``prompt_tokens`` also ``prompt_logps`` and ``prompt_mask`` (B, ·): the
    log-probs of each prompt's own tokens, which ORPO's NLL covers as TRL's does. A batch the layout does not fit
    gets the plain forward over the 2B sequences (then the (·, T-1) columns of every token; same keys)."""
    layout = pair_prompt_layout(seqs)
    if layout is None:
        logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits  # (2B, T, V)
        mask = shift_mask(seqs.completion_mask, seqs.attention_mask)  # (2B, T-1) completion tokens
        logps, entropy = token_logprobs_and_entropy(logits, seqs.input_ids, mask)  # (2B, T-1) each
        out = {"logps": logps, "mask": mask, "entropy": entropy}
        if prompt_tokens:  # the chosen rows' real tokens that are not completion tokens
            out |= {"prompt_logps": logps.chunk(2)[0],
                    "prompt_mask": (seqs.attention_mask[:, 1:].float() - mask).chunk(2)[0]}
        return out
    prompt_ids, prompt_mask, completion_ids, completion_mask = layout  # (B, P) x2, (2B, C) x2, pairs interleaved
    logits, prompt_logits = shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 2,
                                                 prompt_logits=prompt_tokens)  # (2B, C, V), (B, P, V) or None
    B2 = completion_ids.size(0)
    chosen_first = torch.cat([torch.arange(0, B2, 2), torch.arange(1, B2, 2)]).to(completion_ids.device)
    mask = completion_mask[chosen_first].float()  # (2B, C)
    logps, entropy = logprobs_and_entropy(logits[chosen_first], completion_ids[chosen_first], mask)
    out = {"logps": logps, "mask": mask, "entropy": entropy}
    if prompt_tokens:  # left-padded: a prompt token counts when it and the one before it are real
        out |= {"prompt_logps": token_logprobs(prompt_logits, prompt_ids),  # (B, P-1)
                "prompt_mask": (prompt_mask[:, 1:] * prompt_mask[:, :-1]).float()}
    return out


def reference_free_metrics(chosen: torch.Tensor, rejected: torch.Tensor, scale: float, out: dict) -> dict:
    """TRL's ``rewards/*`` (scale × log-prob, summed or averaged as the loss uses them), ``logps/*`` and entropy."""
    return preference_metrics(scale * chosen.detach(), scale * rejected.detach(), chosen, rejected) | {
        "entropy": masked_token_mean(out["entropy"], out["mask"])}


def chosen_nll(out: dict, alpha: float) -> torch.Tensor:
    """The NLL term: token mean over the chosen completions; TRL computes (and logs) it only when α > 0."""
    if not alpha:
        return torch.zeros((), device=out["mask"].device)
    return sft_loss(out["logps"].chunk(2)[0], out["mask"].chunk(2)[0])


def cpo_step(model, batch: PairBatch, settings: Settings = Settings()) -> tuple[torch.Tensor, dict]:
    """One CPO step: the loss and the metrics CPOTrainer logs (``rewards/*``, ``logps/*``, ``nll_loss``).

    batch: (2B, T) sequences, chosen rows first. No reference model: one forward of the policy.
    """
    out = pair_forward(model, to_model_device(model, batch.sequences))
    chosen, rejected = masked_sum(out["logps"], out["mask"]).chunk(2)  # (B,), (B,) log π_θ(y|x)
    nll = chosen_nll(out, settings.cpo_alpha)
    loss = cpo_loss(chosen, rejected, nll, settings.beta, settings.cpo_alpha, settings.label_smoothing)
    # TRL logs what the loss compares: summed log-probs
    metrics = reference_free_metrics(chosen, rejected, settings.beta, out)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def step_fn(settings: Settings = Settings()):
    """``cpo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(cpo_step, settings=settings)


def trl_kwargs(settings: Settings, max_length: int | None) -> dict:
    """The ``CPOConfig`` options that make TRL's run match ours: the sigmoid loss, β, α, ε; AlphaPO's reward shaping
    off (``alpha=0``); the same ``max_length``; dropout off. (TRL 1.16's CPO tokenisation ignores
    ``max_prompt_length``, so it is left alone.)"""
    return dict(loss_type="sigmoid", beta=settings.beta, cpo_alpha=settings.cpo_alpha,
                label_smoothing=settings.label_smoothing, alpha=0.0, max_length=max_length, disable_dropout=True)
