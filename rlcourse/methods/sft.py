"""Supervised fine-tuning on prompt-completion data with a completion-only loss (NLL or DFT).

The loss itself lives in ``rlcourse.losses.sft``; this module tokenizes the data the way TRL's
SFTTrainer does and turns a batch into (loss, metrics) for ``rlcourse.train.train``.
"""

from __future__ import annotations

from functools import partial

import torch

from rlcourse.logprobs import collate, forward_logprobs, tokenize_prompt_completion
from rlcourse.losses.sft import dft_loss, sft_loss
from rlcourse.train import batch_indices


def tokenize_dataset(dataset, tokenizer) -> list[dict]:
    """Each prompt-completion row as ``input_ids`` + ``completion_mask``, in dataset order."""
    return [tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"]) for row in dataset]


def batch_fn(tokenized: list[dict], batch_size: int, pad_token_id: int, max_length: int):
    """step -> collated batch, walking the rows in order (TRL's ``train_sampling_strategy="sequential"``)."""
    return lambda step: collate([tokenized[i] for i in batch_indices(step, batch_size, len(tokenized))],
                                pad_token_id, max_length)


def sft_step(model, batch: dict, dft: bool = False) -> tuple[torch.Tensor, dict]:
    """One SFT step's loss and the metrics TRL's SFTTrainer logs (entropy, token accuracy, tokens)."""
    out = forward_logprobs(model, batch, with_stats=True)
    mask = out["mask"]
    loss = (dft_loss if dft else sft_loss)(out["logps"], mask)
    n = mask.sum().clamp(min=1)
    metrics = {
        "entropy": (out["entropy"] * mask).sum() / n,
        "mean_token_accuracy": (out["is_top1"] * mask).sum() / n,
        "completion_tokens": mask.sum(),
    }
    return loss, metrics


def step_fn(dft: bool = False):
    return partial(sft_step, dft=dft)
