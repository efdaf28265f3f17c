"""Supervised fine-tuning on prompt-completion rows with a completion-only loss: NLL, or DFT (lesson 01).

The loss lives in ``rlcourse.losses.sft``; rows are tokenised as TRL's SFTTrainer does
(``rlcourse.tokenization.tokenize_sft``) and walked in order as ``Sequences`` batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import SequenceBatches, Sequences
from rlcourse.logprobs import forward_logprobs, masked_token_mean
from rlcourse.losses.sft import dft_loss, sft_loss
from rlcourse.tokenization import tokenize_sft


@dataclass(frozen=True)
class Settings:
    """SFT's one option; TRL's name in brackets (``SFTConfig``)."""

    dft: bool = False
    """Dynamic Fine-Tuning [``loss_type="dft"``]: each token's NLL weighted by its stop-gradient probability."""


def trl_classes():
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer, SFTConfig


def batches(rows, tokenizer, batch_size: int, max_length: int | None) -> SequenceBatches:
    """step -> ``Sequences`` of that step's prompt-completion rows, in order (TRL's sequential sampler)."""
    return SequenceBatches(tokenize_sft(rows, tokenizer), batch_size, tokenizer.pad_token_id, max_length)


def sft_step(model, batch: Sequences, settings: Settings = Settings()) -> tuple[torch.Tensor, dict]:
    """One SFT step's loss and the metrics TRL's SFTTrainer logs (entropy, token accuracy, tokens)."""
    out = forward_logprobs(model, batch, with_stats=True)  # moves the batch to the model's device
    mask = out["mask"]
    loss = (dft_loss if settings.dft else sft_loss)(out["logps"], mask)
    metrics = {
        "entropy": masked_token_mean(out["entropy"], mask),
        "mean_token_accuracy": masked_token_mean(out["is_top1"], mask),
        "completion_tokens": mask.sum(),
    }
    return loss, metrics


def step_fn(settings: Settings = Settings()):
    """``sft_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(sft_step, settings=settings)


def trl_kwargs(settings: Settings, max_length: int | None) -> dict:
    """The ``SFTConfig`` options that make TRL's run match ours: completion-only loss, the same loss and truncation."""
    return dict(max_length=max_length, completion_only_loss=True, loss_type="dft" if settings.dft else "nll")


def warm_start(model, tokenizer, task, steps: int, batch_size: int, learning_rate: float, max_length: int, out_dir,
               seed: int = 0):
    """SFT on the task's demonstrations before online RL (DeepSeek-R1's "cold start"); returns the run's log.

    Online RL learns only from completions that differ in reward. On the arithmetic task the base model restates
    the question and rarely ends on the right number, so most groups of samples score all 0 and carry no gradient;
    a few SFT steps teach the answer format, after which a group's samples do differ. The run lives in ``out_dir``
    and is resumed or reused from there (a finished run is loaded, not trained again).
    """
    from rlcourse.train import TrainConfig, train

    rows = task.sft("train").shuffle(seed=seed)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                         checkpoint_every=max(steps, 1))
    return train(model, batches(rows, tokenizer, batch_size, max_length), step_fn(), config, out_dir, resume=True,
                 progress=False)
