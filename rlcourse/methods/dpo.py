"""DPO and its relatives on preference pairs: tokenisation as TRL's DPOTrainer does it, one step, TR-DPO.

The losses live in ``rlcourse.losses.dpo``; this module turns preference rows into batches and a batch into
(loss, metrics) for ``rlcourse.train.train``:

- ``tokenize_pair``: prompt, prompt+chosen and prompt+rejected through the chat template; the completions start
  where the tokenised prompt and each prompt+completion part (the shorter common prefix of the two), exactly as
  TRL 1.16's ``DPOTrainer._prepare_dataset`` does.
- ``collate_pairs``: one (2B, T) batch, the B chosen sequences first and the B rejected ones after them, each cut to
  ``max_length`` (keep the start) and right-padded, as TRL's ``DataCollatorForPreference``. One forward pass of
  the policy serves both halves; one no-grad forward of the reference as well.
- ``dpo_step``: the policy forward, the reference forward (the same network with its adapters disabled, or the
  TR-DPO reference adapter), the loss chosen by ``DPOSettings.loss_type``, and the metrics TRL logs.
- TR-DPO (Gorbatovski et al. 2024): the reference is a second LoRA adapter named "ref", a copy of the initial
  adapters, softly updated every τ steps: ref ← α·θ + (1−α)·ref. TRL 1.16 refuses ``sync_ref_model=True`` for a
  PEFT model (``NotImplementedError`` in ``DPOTrainer.__init__``), so there is no TRL run to compare with; TRL's
  ``SyncRefModelCallback`` applies the same update rule to whole models, and ``tests/test_parity_dpo.py`` checks
  ours against it. Departure: the update mixes the adapter *factors* A and B, not the weight update B·A; after a
  sync the reference's ΔW is not exactly α·ΔW_θ + (1−α)·ΔW_ref (the product of two mixes is not the mix of the
  products). With α = 1 (a hard update) it is exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.logprobs import shift_mask, to_model_device, token_entropy, token_logprobs
from rlcourse.losses.dpo import DPO_LOSSES, dpo_loss, implicit_reward, ipo_loss
from rlcourse.models import REF_ADAPTER, add_reference_adapter, reference_policy, remove_reference_adapter  # noqa: F401
from rlcourse.train import batch_indices
from trl.trainer.utils import pad


LOSS_TYPES = tuple(DPO_LOSSES) + ("ipo",)
"""Every ``loss_type`` our step accepts."""


@dataclass(frozen=True)
class DPOSettings:
    """The method's options; the TRL names are in brackets (``DPOConfig`` fields)."""

    beta: float = 0.1
    """β [``beta``]: the strength of the pull towards π_ref; for IPO, the paper's τ (target margin 1/(2β))."""
    loss_type: str = "sigmoid"
    """One of LOSS_TYPES [``loss_type``]: sigmoid (DPO), cdpo (no TRL equivalent), robust, hinge, apo_zero,
    apo_down, ipo."""
    label_smoothing: float = 0.0
    """ε [``label_smoothing``]: the assumed probability that a label is flipped (cdpo and robust only)."""
    sync_ref_every: int = 0
    """τ [``ref_model_sync_steps``]: TR-DPO updates the reference every τ steps; 0 keeps it fixed (plain DPO)."""
    sync_alpha: float = 0.6
    """α [``ref_model_mixup_alpha``]: TR-DPO's mix ref ← α·θ + (1−α)·ref (1 copies the policy)."""

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {list(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be positive")
        if self.sync_ref_every < 0 or not 0 < self.sync_alpha <= 1:
            raise ValueError(f"sync_ref_every={self.sync_ref_every} must be ≥ 0 and sync_alpha={self.sync_alpha} "
                             "in (0, 1]")


# ── data ─────────────────────────────────────────────────────────────────────────────────────────────────────


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer, prompt, chosen, rejected) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` of one conversational preference row, as TRL builds them.

    prompt: a list of messages ending with the user's turn; chosen, rejected: lists with the assistant's turn.
    """
    def ids(messages, **kw):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]

    prompt_ids = ids(prompt, add_generation_prompt=True)
    prompt_chosen = ids(prompt + chosen)
    prompt_rejected = ids(prompt + rejected)
    # The completion starts where the tokenised prompt and prompt+completion part (TRL: common_prefix_length)
    start = min(_common_prefix(prompt_ids, prompt_chosen), _common_prefix(prompt_ids, prompt_rejected))
    return {"prompt_ids": prompt_ids[:start], "chosen_ids": prompt_chosen[start:],
            "rejected_ids": prompt_rejected[start:]}


def _check_row(row, i: int) -> None:
    for column in ("prompt", "chosen", "rejected"):
        if column not in row:
            raise ValueError(f"preference row {i}: missing column {column!r}. Fix: give every row 'prompt', "
                             "'chosen' and 'rejected' (see lesson 02 for the formats and a converter).")
        value = row[column]
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "content" in m for m in value):
            raise ValueError(f"preference row {i}: column {column!r} must be a non-empty list of chat messages "
                             f"(conversational format), got {value!r:.80}. Fix: wrap text as "
                             "[{'role': 'user'|'assistant', 'content': text}].")
    if row["chosen"] == row["rejected"]:
        raise ValueError(f"preference row {i}: 'chosen' and 'rejected' are identical, so the pair says nothing. "
                         "Fix: drop the row.")


def tokenize_dataset(dataset, tokenizer, max_length: int | None = None, tokenize=None) -> list[dict]:
    """Each preference row tokenised by ``tokenize`` (default ``tokenize_pair``; CPO and ORPO pass theirs), in order.

    Rows whose prompt alone fills ``max_length`` are dropped with a warning, as TRL drops them (truncation would
    leave no completion token to learn from). Bad rows raise a ValueError naming the row and the fix.
    """
    tokenize = tokenize or tokenize_pair
    out, dropped = [], []
    for i, row in enumerate(dataset):
        _check_row(row, i)
        tokens = tokenize(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        if max_length is not None and len(tokens["prompt_ids"]) >= max_length:
            dropped.append(i)
            continue
        out.append(tokens)
    if dropped:
        warnings.warn(f"dropped {len(dropped)} preference rows whose prompt fills max_length={max_length} "
                      f"(rows {dropped[:5]}{'...' if len(dropped) > 5 else ''}); raise max_length to keep them")
    if not out:
        raise ValueError("no preference rows left to train on")
    return out


def collate_pairs(examples: list[dict], pad_token_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """B tokenised pairs -> a (2B, T) batch: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected.

    Each sequence is cut to ``max_length`` (keep the start), then right-padded. Returns ``input_ids``,
    ``attention_mask`` and ``completion_mask``, each (2B, T).
    """
    cut = slice(0, max_length)
    seqs, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for e in examples:
            seqs.append(torch.tensor((e["prompt_ids"] + e[side])[cut]))
            masks.append(torch.tensor(([0] * len(e["prompt_ids"]) + [1] * len(e[side]))[cut]))
    return {
        "input_ids": pad(seqs, padding_value=pad_token_id, padding_side="right"),  # (2B, T)
        "attention_mask": pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="right"),
        "completion_mask": pad(masks, padding_value=0, padding_side="right"),
    }


def batch_fn(tokenized: list[dict], batch_size: int, pad_token_id: int, max_length: int | None):
    """step -> the (2B, T) batch of that step, walking the pairs in order (TRL's sequential sampler).

    The batch also carries ``step`` (the optimizer steps done before it), which TR-DPO's sync schedule reads.
    """
    def batches(step: int) -> dict:
        rows = [tokenized[i] for i in batch_indices(step, batch_size, len(tokenized))]
        return {**collate_pairs(rows, pad_token_id, max_length), "step": step}

    return batches


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


reference = reference_policy
"""π_ref: the TR-DPO adapter "ref" if the model has one, else the same network with its adapters disabled."""


# ── one step ─────────────────────────────────────────────────────────────────────────────────────────────────


def sequence_logps(model, batch: dict) -> dict[str, torch.Tensor]:
    """Forward a (2B, T) batch; per-token log-probs, mask and logits' statistics.

    Returns ``logps`` (2B, T-1) masked to completion tokens, ``mask`` (2B, T-1), ``logits`` (2B, T, V).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    mask = shift_mask(batch["completion_mask"], batch["attention_mask"])  # (2B, T-1)
    return {"logps": token_logprobs(logits, batch["input_ids"]) * mask, "mask": mask, "logits": logits}


def dpo_step(model, batch: dict, settings: DPOSettings = DPOSettings()) -> tuple[torch.Tensor, dict]:
    """One step's loss and the metrics TRL's DPOTrainer logs (``rewards/*``, ``logps/*``, entropy, token accuracy).

    batch: from ``batch_fn`` ((2B, T) tensors, chosen rows first). With ``settings.sync_ref_every`` = τ > 0 the
    reference adapter is updated first whenever ``batch["step"]`` is a positive multiple of τ, i.e. right after
    optimizer step kτ, where TRL's ``SyncRefModelCallback`` does it.
    """
    batch = to_model_device(model, batch)
    step = batch.get("step", 0)
    if settings.sync_ref_every and step > 0 and step % settings.sync_ref_every == 0:
        if REF_ADAPTER not in model.peft_config:
            raise ValueError("TR-DPO needs a reference adapter: call add_reference_adapter(model) before training")
        sync_reference(model, settings.sync_alpha)

    out = sequence_logps(model, batch)
    logps = out["logps"].sum(-1)  # (2B,) log π_θ(y|x)
    with torch.no_grad(), reference(model):
        ref_logps = sequence_logps(model, batch)["logps"].sum(-1)  # (2B,) log π_ref(y|x)
    chosen, rejected = logps.chunk(2)  # (B,), (B,)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    lengths = out["mask"].sum(-1)  # (2B,) completion tokens
    chosen_len, rejected_len = lengths.chunk(2)

    if settings.loss_type == "ipo":
        loss = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, settings.beta)
    else:
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, settings.beta, settings.loss_type,
                        settings.label_smoothing)

    with torch.no_grad():
        r_chosen = implicit_reward(chosen, ref_chosen, settings.beta)  # (B,)
        r_rejected = implicit_reward(rejected, ref_rejected, settings.beta)
        mask = out["mask"]
        chosen_mask = mask.chunk(2)[0]  # (B, T-1)
        logits = out["logits"]
        is_top1 = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]).float().chunk(2)[0]  # (B, T-1)
        margin_per_token = (chosen - ref_chosen) / chosen_len.clamp(min=1) \
            - (rejected - ref_rejected) / rejected_len.clamp(min=1)  # (B,) h of IPO
        metrics = {
            "rewards/chosen": r_chosen.mean(),
            "rewards/rejected": r_rejected.mean(),
            "rewards/margins": (r_chosen - r_rejected).mean(),
            "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
            "logps/chosen": chosen.mean(),
            "logps/rejected": rejected.mean(),
            "margin_per_token": margin_per_token.mean(),
            "entropy": (token_entropy(logits) * mask).sum() / mask.sum().clamp(min=1),
            "mean_token_accuracy": (is_top1 * chosen_mask).sum() / chosen_mask.sum().clamp(min=1),
        }
    return loss, metrics


def step_fn(settings: DPOSettings = DPOSettings()):
    """``dpo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(dpo_step, settings=settings)


def trl_kwargs(settings: DPOSettings, max_length: int | None) -> dict:
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
    return dict(beta=settings.beta, loss_type=[settings.loss_type], label_smoothing=settings.label_smoothing,
                max_length=max_length, truncation_mode="keep_start", precompute_ref_log_probs=False,
                pad_to_multiple_of=None, padding_free=False, use_weighting=False, ld_alpha=None,
                f_divergence_type="reverse_kl", disable_dropout=True, sync_ref_model=False)


# ── a data set with deterministic preferences (lesson 06) ────────────────────────────────────────────────────

DETERMINISTIC_PAIRS = [
    ("Is the sky blue on a clear day? Answer yes or no.", "Yes.", "No."),
    ("Is fire cold? Answer yes or no.", "No.", "Yes."),
    ("What is 2 + 2? Reply with the number only.", "4", "5"),
    ("What is 3 + 4? Reply with the number only.", "7", "8"),
    ("Name the colour of grass in one word.", "Green.", "Purple."),
    ("Name the largest planet in one word.", "Jupiter.", "Mercury."),
    ("What is the opposite of hot? One word.", "Cold.", "Loud."),
    ("How many legs does a cat have? Reply with the number only.", "4", "3"),
]
"""(question, chosen, rejected): every pair is labelled the same way every time it is seen, so the preference
probability is 1, the case where IPO's analysis says DPO over-fits."""


def deterministic_preferences(n_pairs: int = 8):
    """A conversational preference dataset of ``n_pairs`` short pairs whose label never varies (lesson 06).

    Short completions (one to three tokens) make the per-token margin IPO targets easy to read and the steps fast.
    Training walks it in order and wraps around, so each pair is seen again every ``n_pairs / batch_size`` steps.
    """
    from datasets import Dataset

    if not 1 <= n_pairs <= len(DETERMINISTIC_PAIRS):
        raise ValueError(f"n_pairs={n_pairs}: choose 1..{len(DETERMINISTIC_PAIRS)}")
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for q, c, r in DETERMINISTIC_PAIRS[:n_pairs]
    ])
