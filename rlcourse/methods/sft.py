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
    out = forward_logprobs(model, batch, with_stats=True)  # moves the batch to the model's device
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


def warm_start(model, tokenizer, task, steps: int, batch_size: int, learning_rate: float, out_dir,
               max_length: int = 64, seed: int = 0):
    """SFT on the task's demonstrations before online RL (DeepSeek-R1's "cold start"); returns the run's log.

    Online RL learns only from completions that differ in reward. On the arithmetic task the base model restates
    the question and rarely ends on the right number, so most groups of samples score all 0 and carry no gradient;
    a few SFT steps teach the answer format, after which a group's samples do differ. The run lives in ``out_dir``
    and is resumed or reused from there (a finished run is loaded, not trained again).
    """
    from rlcourse.train import TrainConfig, train

    rows = task.sft("train").shuffle(seed=seed)
    batches = batch_fn(tokenize_dataset(rows, tokenizer), batch_size, tokenizer.pad_token_id, max_length)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                         checkpoint_every=max(steps, 1))
    return train(model, batches, step_fn(), config, out_dir, resume=True, progress=False)
