"""KTO (Ethayarajh et al. 2024, lesson 09) on unpaired data: one completion per row, labelled desirable or not.

The loss lives in ``rlcourse.losses.kto``; this module turns rows into batches and a batch into (loss, metrics) for
``rlcourse.train.train``, as TRL 1.16's ``KTOTrainer`` does. BCO (``rlcourse.methods.bco``) and DRO
(``rlcourse.methods.dro``) train on the same batches.

- Rows: ``rlcourse.data.unpaired_rows`` turns preference pairs into shuffled (prompt, completion, label, score)
  rows; both our run and TRL's get the same rows.
- ``batches``: tokenised as ``KTOTrainer._prepare_dataset`` (the chat template of prompt and of prompt + completion;
  the completion starts where the two part; no EOS added to conversational rows; rows whose prompt fills
  ``max_length`` dropped), collated into ``UnpairedBatch``es like TRL's ``DataCollatorForUnpairedPreference``, with
  the mismatched "KL" sequences (x_i, y_{i−1}) rotated within the batch (``rlcourse.batches.UnpairedBatches``).
- ``kto_step``: z₀ comes from the mismatched sequences, with no gradient, as TRL's (its KL forward runs under
  ``no_grad``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import UnpairedBatch, UnpairedBatches
from rlcourse.logprobs import masked_token_mean, sequence_logps, to_model_device
from rlcourse.losses.kto import kto_loss, kto_reference_point
from rlcourse.models import reference_policy
from rlcourse.tokenization import tokenize_unpaired


@dataclass(frozen=True)
class Settings:
    """KTO's options; the TRL names are in brackets (``KTOConfig`` fields)."""

    beta: float = 0.1
    """β [``beta``]: scales the implicit reward inside the value function."""
    desirable_weight: float = 1.0
    """λ_D [``desirable_weight``]: weight of each desirable example's loss."""
    undesirable_weight: float = 1.0
    """λ_U [``undesirable_weight``]: weight of each undesirable example's loss (λ_U > λ_D is loss aversion)."""

    def __post_init__(self):
        if self.beta <= 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError(f"beta={self.beta}, desirable_weight={self.desirable_weight} and "
                             f"undesirable_weight={self.undesirable_weight} must all be positive")


def trl_classes():
    from trl import KTOConfig, KTOTrainer

    return KTOTrainer, KTOConfig


def batches(rows, tokenizer, batch_size: int, max_length: int | None) -> UnpairedBatches:
    """step -> the ``UnpairedBatch`` of that step, rows in order. Bad rows raise a ValueError naming the row and the
    fix; the rows must fill whole batches (the mismatched pairs are built within a batch, as TRL builds them)."""
    return UnpairedBatches(tokenize_unpaired(rows, tokenizer, max_length), batch_size, tokenizer.pad_token_id,
                           max_length)


def label_metrics(rewards: torch.Tensor, logps: torch.Tensor, labels: torch.Tensor, out: dict) -> dict:
    """TRL's KTO metrics: ``rewards/*`` (β·log-ratio) and ``logps/*`` averaged per label, and the entropy."""
    metrics = {"entropy": masked_token_mean(out["entropy"], out["mask"])}
    for name, which in (("chosen", labels), ("rejected", ~labels)):
        if which.any():
            metrics[f"rewards/{name}"] = rewards[which].mean()
            metrics[f"logps/{name}"] = logps.detach()[which].mean()
    if labels.any() and (~labels).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def kto_step(model, batch: UnpairedBatch, settings: Settings = Settings()) -> tuple[torch.Tensor, dict]:
    """One KTO step: the loss and the metrics KTOTrainer logs (``rewards/*``, ``logps/*``, entropy), and ``z0``, the
    reference point, which TRL logs as ``kl`` (renamed here: the probes' ``kl`` is the sampled KL to the base)."""
    batch = to_model_device(model, batch)
    logps, out = sequence_logps(model, batch.sequences, with_stats=True)  # (B,) log π_θ(y|x)
    with torch.no_grad():
        kl_logps, _ = sequence_logps(model, batch.mismatched)  # (B,) log π_θ(y'|x), mismatched
        with reference_policy(model):
            ref_logps, _ = sequence_logps(model, batch.sequences)
            ref_kl_logps, _ = sequence_logps(model, batch.mismatched)
    z0 = kto_reference_point(kl_logps, ref_kl_logps)
    labels = batch.label.bool()
    loss = kto_loss(logps, ref_logps, labels, z0, settings.beta, settings.desirable_weight,
                    settings.undesirable_weight)
    with torch.no_grad():
        metrics = label_metrics(settings.beta * (logps - ref_logps), logps, labels, out) | {"z0": z0}
    return loss, metrics


def step_fn(settings: Settings = Settings()):
    """``kto_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(kto_step, settings=settings)


def trl_kwargs(settings: Settings, max_length: int | None) -> dict:
    """The ``KTOConfig`` options that make TRL's run match ours: the KTO loss, β, λ_D, λ_U, the same truncation,
    the reference recomputed every step, no padding to a multiple, dropout off."""
    return dict(loss_type="kto", beta=settings.beta, desirable_weight=settings.desirable_weight,
                undesirable_weight=settings.undesirable_weight, max_length=max_length,
                precompute_ref_log_probs=False, pad_to_multiple_of=None, disable_dropout=True, sync_ref_model=False)
