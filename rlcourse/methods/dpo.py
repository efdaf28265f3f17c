"""DPO and its relatives on preference pairs: tokenisation as TRL's DPOTrainer does it, one step, TR-DPO.

The losses live in ``rlcourse.losses.dpo``; this module turns preference rows into batches and a batch into
(loss, metrics) for ``rlcourse.train.train``:

- ``batches``: pairs tokenised as TRL 1.16's ``DPOTrainer._prepare_dataset`` does (``rlcourse.tokenization``),
  collated into ``PairBatch``es: one (2B, T) forward, the B chosen sequences first and the B rejected ones after
  them, each cut to ``max_length`` (keep the start) and right-padded, as TRL's ``DataCollatorForPreference``. One
  forward pass of the policy serves both halves; one no-grad forward of the reference as well.
- ``dpo_step``: the policy forward, the reference forward (the same network with its adapters disabled, or the
  TR-DPO reference adapter), the loss chosen by ``Settings.loss_type`` (TRL's ``loss_type`` list: DPO's sigmoid and
  its variants with the same inputs), and the metrics TRL logs. IPO (lesson 06), which also reads the completions'
  lengths, is ``rlcourse.methods.ipo``, on the same batches and forwards.
- TR-DPO (Gorbatovski et al. 2024): the reference is a second LoRA adapter named "ref", a copy of the initial
  adapters, softly updated every τ steps: ref ← α·θ + (1−α)·ref. TRL 1.16 refuses ``sync_ref_model=True`` for a
  PEFT model (``NotImplementedError`` in ``DPOTrainer.__init__``), so there is no TRL run to compare with; TRL's
  ``SyncRefModelCallback`` applies the same update rule to whole models, and ``tests/test_parity_dpo.py`` checks
  ours against it. Departure: the update mixes the adapter *factors* A and B, not the weight update B·A; after a
  sync the reference's ΔW is not exactly α·ΔW_θ + (1−α)·ΔW_ref (the product of two mixes is not the mix of the
  products). With α = 1 (a hard update) it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import PairBatch, PairBatches
from rlcourse.logprobs import masked_token_mean, sequence_logps, to_model_device
from rlcourse.losses.dpo import DPO_LOSSES, dpo_loss, implicit_reward
from rlcourse.metrics import preference_metrics
from rlcourse.models import REF_ADAPTER, reference_policy
from rlcourse.tokenization import tokenize_pairs


LOSS_TYPES = tuple(DPO_LOSSES)
"""Every ``loss_type`` our step accepts: DPO's sigmoid and the variants of TRL's list with the same inputs (IPO,
TRL's ``loss_type="ipo"``, normalises by length: ``rlcourse.methods.ipo``)."""


@dataclass(frozen=True)
class Settings:
    """The method's options; the TRL names are in brackets (``DPOConfig`` fields)."""

    beta: float = 0.1
    """β [``beta``]: the strength of the pull towards π_ref."""
    loss_type: str = "sigmoid"
    """One of LOSS_TYPES [``loss_type``]: sigmoid (DPO), cdpo (no TRL equivalent), robust, hinge, apo_zero,
    apo_down."""
    label_smoothing: float = 0.0
    """ε [``label_smoothing``]: the assumed probability that a label is flipped (cdpo and robust only)."""
    sync_ref_every: int = 0
    """τ [``ref_model_sync_steps``]: TR-DPO updates the reference every τ steps; 0 keeps it fixed (plain DPO)."""
    sync_alpha: float = 0.6
    """α [``ref_model_mixup_alpha``]: TR-DPO's mix ref ← α·θ + (1−α)·ref (1 copies the policy)."""

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {list(LOSS_TYPES)} (IPO is "
                             "rlcourse.methods.ipo)")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be positive")
        if self.sync_ref_every < 0 or not 0 < self.sync_alpha <= 1:
            raise ValueError(f"sync_ref_every={self.sync_ref_every} must be ≥ 0 and sync_alpha={self.sync_alpha} "
                             "in (0, 1]")


def trl_classes():
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer, DPOConfig


def batches(rows, tokenizer, batch_size: int, max_length: int | None) -> PairBatches:
    """step -> the ``PairBatch`` of that step, walking the pairs in order (TRL's sequential sampler). Bad rows raise a
    ValueError naming the row and the fix; rows whose prompt fills ``max_length`` are dropped, as TRL drops them."""
    return PairBatches(tokenize_pairs(rows, tokenizer, max_length), batch_size, tokenizer.pad_token_id, max_length)


# ── the reference policy ─────────────────────────────────────────────────────────────────────────────────────


@torch.no_grad()
def sync_reference(model, alpha: float) -> None:
    """TR-DPO's soft update of the reference adapter: ref ← α·θ + (1−α)·ref, tensor by tensor (the rule of TRL's
    ``SyncRefModelCallback``, applied to the LoRA factors)."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if ".default." in name:
            ref = params[name.replace(".default.", f".{REF_ADAPTER}.")]
            ref.mul_(1.0 - alpha).add_(param.to(ref.dtype), alpha=alpha)


# ── one step ─────────────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class PairLogps:
    """What a preference step reads from one policy forward and one reference forward of a (2B, T) ``PairBatch``."""

    chosen: torch.Tensor
    """(B,) log π_θ(y_w|x), summed over the completion tokens."""
    rejected: torch.Tensor
    """(B,) log π_θ(y_l|x)."""
    ref_chosen: torch.Tensor
    """(B,) log π_ref(y_w|x), no gradient."""
    ref_rejected: torch.Tensor
    """(B,) log π_ref(y_l|x)."""
    chosen_len: torch.Tensor
    """(B,) completion tokens of y_w."""
    rejected_len: torch.Tensor
    """(B,) completion tokens of y_l."""
    out: dict
    """``forward_logprobs``' dict of the policy forward (mask, entropy, is_top1), for the metrics."""


def policy_and_reference(model, batch: PairBatch) -> PairLogps:
    """The policy's summed log-probs of both completions, with gradient, and the reference's (the same network with
    its adapters disabled, or the "ref" adapter), without."""
    seqs = to_model_device(model, batch.sequences)
    logps, out = sequence_logps(model, seqs, with_stats=True)  # (2B,) log π_θ(y|x)
    with torch.no_grad(), reference_policy(model):
        ref_logps, _ = sequence_logps(model, seqs)  # (2B,) log π_ref(y|x)
    chosen, rejected = logps.chunk(2)  # (B,), (B,)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_len, rejected_len = out["mask"].sum(-1).chunk(2)  # (B,) completion tokens
    return PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, out)


@torch.no_grad()
def pair_metrics(p: PairLogps, beta: float) -> dict:
    """The metrics TRL's DPOTrainer logs (``rewards/*``, ``logps/*``, entropy, token accuracy), and the per-token
    margin h that IPO's target is about (lesson 06)."""
    r_chosen = implicit_reward(p.chosen, p.ref_chosen, beta)  # (B,)
    r_rejected = implicit_reward(p.rejected, p.ref_rejected, beta)
    mask = p.out["mask"]
    chosen_mask = mask.chunk(2)[0]  # (B, T-1)
    is_top1 = p.out["is_top1"].chunk(2)[0]  # (B, T-1)
    margin_per_token = (p.chosen - p.ref_chosen) / p.chosen_len.clamp(min=1) \
        - (p.rejected - p.ref_rejected) / p.rejected_len.clamp(min=1)  # (B,) h of IPO
    return preference_metrics(r_chosen, r_rejected, p.chosen, p.rejected) | {
        "margin_per_token": margin_per_token.mean(),
        "entropy": masked_token_mean(p.out["entropy"], mask),
        "mean_token_accuracy": masked_token_mean(is_top1, chosen_mask),
    }


def dpo_step(model, batch: PairBatch, settings: Settings = Settings()) -> tuple[torch.Tensor, dict]:
    """One step's loss and the metrics TRL's DPOTrainer logs (``rewards/*``, ``logps/*``, entropy, token accuracy).

    batch: (2B, T) sequences, chosen rows first. With ``settings.sync_ref_every`` = τ > 0 the reference adapter is
    updated first whenever ``batch.step`` is a positive multiple of τ, i.e. right after optimizer step kτ, where
    TRL's ``SyncRefModelCallback`` does it.
    """
    if settings.sync_ref_every and batch.step > 0 and batch.step % settings.sync_ref_every == 0:
        if REF_ADAPTER not in model.peft_config:
            raise ValueError("TR-DPO needs a reference adapter: call add_reference_adapter(model) before training")
        sync_reference(model, settings.sync_alpha)
    p = policy_and_reference(model, batch)
    loss = dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, settings.beta, settings.loss_type,
                    settings.label_smoothing)
    return loss, pair_metrics(p, settings.beta)


def step_fn(settings: Settings = Settings()):
    """``dpo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(dpo_step, settings=settings)


def trl_kwargs(settings: Settings, max_length: int | None) -> dict:
    """The ``DPOConfig`` options that make TRL's run match ours (pass them to ``rlcourse.trl_runs.trl_config``).

    Set explicitly, whatever TRL's defaults: the same β, loss and ε; the same truncation (keep the start of each
    sequence at ``max_length``); the reference recomputed at every step like ours (``precompute_ref_log_probs=False``);
    no padding to a multiple; no padding-free batches; no WPO weighting, no LD-DPO; the reverse-KL f-divergence
    (plain DPO). TR-DPO has no TRL counterpart with PEFT, see the module docstring.
    """
    if settings.loss_type == "cdpo":
        raise ValueError("TRL 1.16 has no cDPO loss_type ('sigmoid' ignores label_smoothing): compare cdpo with "
                         "the math, not with TRL")
    if settings.sync_ref_every:
        raise ValueError("TRL 1.16's DPOTrainer does not support sync_ref_model with a PEFT model")
    return dpo_config_kwargs(settings.beta, settings.loss_type, settings.label_smoothing, max_length)


def dpo_config_kwargs(beta: float, loss_type: str, label_smoothing: float, max_length: int | None) -> dict:
    """``DPOConfig`` options for a loss of TRL's ``loss_type`` list (DPO's and IPO's ``trl_kwargs``)."""
    return dict(beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing, max_length=max_length,
                truncation_mode="keep_start", precompute_ref_log_probs=False, pad_to_multiple_of=None,
                padding_free=False, use_weighting=False, ld_alpha=None, f_divergence_type="reverse_kl",
                disable_dropout=True, sync_ref_model=False)
