"""KTO, BCO and DRO on unpaired data (lesson 09): one completion per row, with a label or a scalar reward.

The losses live in ``rlcourse.losses.kto``, ``rlcourse.losses.bco`` and ``rlcourse.losses.dro``; this module turns
rows into batches and a batch into (loss, metrics) for ``rlcourse.train.train``:

- ``unpaired_rows``: preference pairs → (prompt, completion, label, score) rows, shuffled with a seed. TRL's
  ``unpair`` puts every chosen row before every rejected one; walked in order, a run would see only desirable
  rows for half an epoch, so both our run and TRL's get the same shuffled rows (TRL keeps an unpaired dataset as it
  is). ``score`` is the gold score of the row's completion (the pair's ``score_chosen`` or ``score_rejected``):
  DRO's scalar reward.
- ``flip_pairs``: swap chosen and rejected in a seeded fraction of the pairs (the label-noise experiment). Unpairing
  a swapped pair flips both of its labels, so DPO and KTO see the same noise.
- ``tokenize_dataset``: as TRL 1.16's ``KTOTrainer._prepare_dataset`` (the chat template of prompt and of
  prompt + completion; the completion starts where the two part; no EOS added to conversational rows; rows whose
  prompt fills ``max_length`` dropped).
- ``batch_fn``: the step's rows in order, collated like TRL's ``DataCollatorForUnpairedPreference``, plus the
  mismatched "KL" sequences (x_i, y_{i−1}), rotated *within the batch* (``rlcourse.losses.kto.mismatched_completions``)
  as TRL builds them within each ``per_device_train_batch_size`` block of the dataset. The two agree when the number
  of rows is a multiple of the batch size, which ``batch_fn`` requires.
- ``kto_step``, ``bco_step``, ``dro_step``: the three losses on the same batches. KTO's z₀ comes from the KL
  sequences (no gradient, as TRL: its KL forward runs under ``no_grad``); BCO's shift δ from a running mean of the
  rewards (``rlcourse.losses.bco.RewardShift``), no KL sequences needed; DRO regresses the gold score with a learned
  per-prompt value V(x) (``PromptValues``, updated by its own optimizer inside the step: DRO-V's value half).

Neither BCO nor DRO has a TRL 1.16 trainer. Their step functions hold state (δ; the value table and its
optimizer) and expose it as ``state_dict`` / ``load_state_dict``, so ``rlcourse.train`` checkpoints resume it.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import torch

from rlcourse.logprobs import collate, forward_logprobs, masked_sum, to_model_device
from rlcourse.losses.bco import RewardShift, bco_loss
from rlcourse.losses.dro import dro_loss, dro_policy_loss, dro_value_loss
from rlcourse.losses.kto import kto_loss, kto_reference_point, mismatched_completions
from rlcourse.methods.dpo import _common_prefix
from rlcourse.models import reference_policy
from rlcourse.train import batch_indices


@dataclass(frozen=True)
class KTOSettings:
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


# ── data ─────────────────────────────────────────────────────────────────────────────────────────────────────


def flip_pairs(pairs, fraction: float, seed: int = 0) -> list[dict]:
    """The preference rows with chosen and rejected swapped in ``round(fraction·n)`` rows chosen with ``seed``.

    Scores travel with their completions, so a flipped row's ``score_chosen`` is the lower one: the gold metric
    still knows which completion is better; only the label is wrong. Each row gets ``flipped`` (bool).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: the share of labels to flip must lie in [0, 1]")
    rows = [dict(r) for r in pairs]
    flipped = set(random.Random(seed).sample(range(len(rows)), round(fraction * len(rows))))
    for i, row in enumerate(rows):
        row["flipped"] = i in flipped
        if i in flipped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            if "score_chosen" in row and "score_rejected" in row:
                row["score_chosen"], row["score_rejected"] = row["score_rejected"], row["score_chosen"]
    return rows


def unpaired_rows(pairs, seed: int = 0) -> list[dict]:
    """Preference rows → shuffled (prompt, completion, label[, score]) rows, two per pair (see the module docstring)."""
    from rlcourse.data.convert import unpair

    rows = unpair(pairs)
    for row in rows:
        if "score_chosen" in row and "score_rejected" in row:
            row["score"] = row["score_chosen"] if row["label"] else row["score_rejected"]
        for key in ("score_chosen", "score_rejected"):
            row.pop(key, None)
    random.Random(seed).shuffle(rows)
    return rows


def _check_row(row, i: int) -> None:
    for column in ("prompt", "completion", "label"):
        if column not in row:
            raise ValueError(f"unpaired row {i}: missing column {column!r}. Fix: give every row 'prompt', 'completion' "
                             "and 'label' (True = desirable); unpaired_rows() converts preference pairs.")
    for column in ("prompt", "completion"):
        value = row[column]
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "content" in m for m in value):
            raise ValueError(f"unpaired row {i}: column {column!r} must be a non-empty list of chat messages, got "
                             f"{value!r:.80}. Fix: wrap text as [{{'role': 'user'|'assistant', 'content': text}}].")
    if not isinstance(row["label"], bool):
        raise ValueError(f"unpaired row {i}: 'label' must be True (desirable) or False (undesirable), got "
                         f"{row['label']!r}. Fix: convert it with bool().")


def tokenize_dataset(rows, tokenizer, max_length: int | None = None) -> list[dict]:
    """``prompt_ids``, ``completion_ids``, ``label`` (and ``score`` when present) of each row, as KTOTrainer builds them.

    Bad rows raise a ValueError naming the row and the fix; rows whose prompt fills ``max_length`` are dropped with
    a warning, as TRL drops them.
    """
    def ids(messages, **kw):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]

    out, dropped = [], []
    for i, row in enumerate(rows):
        _check_row(row, i)
        prompt_ids = ids(row["prompt"], add_generation_prompt=True)
        full = ids(row["prompt"] + row["completion"])
        start = _common_prefix(prompt_ids, full)  # where the completion starts, as in DPO's tokenisation
        if max_length is not None and start >= max_length:
            dropped.append(i)
            continue
        item = {"prompt_ids": prompt_ids[:start], "completion_ids": full[start:], "label": row["label"]}
        if "score" in row:
            item["score"] = float(row["score"])
        out.append(item)
    if dropped:
        warnings.warn(f"dropped {len(dropped)} rows whose prompt fills max_length={max_length} (rows {dropped[:5]}"
                      f"{'...' if len(dropped) > 5 else ''}); raise max_length to keep them")
    if not out:
        raise ValueError("no rows left to train on")
    return out


def _collate(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int, max_length: int | None):
    return collate([{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
                    for p, c in zip(prompts, completions)], pad_token_id, max_length)


def batch_fn(tokenized: list[dict], batch_size: int, pad_token_id: int, max_length: int | None):
    """step -> the batch of that step: ``input_ids``, ``attention_mask``, ``completion_mask`` (B, T), ``label`` (B,),
    ``score`` (B,) when the rows have one, ``prompt_index`` (B,) (the row's prompt, for DRO's values), and the
    mismatched ``KL_input_ids``, ``KL_attention_mask``, ``KL_completion_mask``."""
    n = len(tokenized)
    if batch_size < 2 or n % batch_size:
        raise ValueError(f"{n} rows in batches of {batch_size}: KTO's mismatched pairs are built within each batch "
                         "(as TRL builds them within each block of the dataset), which needs batch_size ≥ 2 and a "
                         f"number of rows divisible by it. Fix: keep the first {n - n % batch_size} rows.")
    prompt_index = {}
    for t in tokenized:
        prompt_index.setdefault(tuple(t["prompt_ids"]), len(prompt_index))

    def batches(step: int) -> dict:
        rows = [tokenized[i] for i in batch_indices(step, batch_size, n)]
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        batch = _collate(prompts, completions, pad_token_id, max_length)
        kl = _collate(prompts, mismatched_completions(completions), pad_token_id, max_length)
        batch |= {f"KL_{k}": v for k, v in kl.items()}
        batch["label"] = torch.tensor([r["label"] for r in rows])
        batch["prompt_index"] = torch.tensor([prompt_index[tuple(p)] for p in prompts])
        if all("score" in r for r in rows):
            batch["score"] = torch.tensor([r["score"] for r in rows])
        return batch

    batches.n_prompts = len(prompt_index)
    return batches


# ── steps ────────────────────────────────────────────────────────────────────────────────────────────────────


def _sequence_logps(model, batch: dict, prefix: str = "", with_entropy: bool = False):
    """Summed completion log-probs (B,) of the batch's sequences (``prefix="KL_"``: the mismatched ones)."""
    part = {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "completion_mask")}
    out = forward_logprobs(model, part, with_stats=with_entropy)
    return masked_sum(out["logps"], out["mask"]), out


def _label_metrics(rewards: torch.Tensor, logps: torch.Tensor, labels: torch.Tensor, out: dict) -> dict:
    """TRL's KTO metrics: ``rewards/*`` (β·log-ratio) and ``logps/*`` averaged per label, entropy."""
    metrics = {"entropy": (out["entropy"] * out["mask"]).sum() / out["mask"].sum().clamp(min=1)}
    for name, which in (("chosen", labels), ("rejected", ~labels)):
        if which.any():
            metrics[f"rewards/{name}"] = rewards[which].mean()
            metrics[f"logps/{name}"] = logps.detach()[which].mean()
    if labels.any() and (~labels).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def kto_step(model, batch: dict, settings: KTOSettings = KTOSettings()) -> tuple[torch.Tensor, dict]:
    """One KTO step: the loss and the metrics KTOTrainer logs (``rewards/*``, ``logps/*``, entropy), and ``z0``, the
    reference point, which TRL logs as ``kl`` (renamed here: the probes' ``kl`` is the sampled KL to the base)."""
    batch = to_model_device(model, batch)
    logps, out = _sequence_logps(model, batch, with_entropy=True)  # (B,) log π_θ(y|x)
    with torch.no_grad():
        kl_logps, _ = _sequence_logps(model, batch, "KL_")  # (B,) log π_θ(y'|x), mismatched
        with reference_policy(model):
            ref_logps, _ = _sequence_logps(model, batch)
            ref_kl_logps, _ = _sequence_logps(model, batch, "KL_")
    z0 = kto_reference_point(kl_logps, ref_kl_logps)
    labels = batch["label"].bool()
    loss = kto_loss(logps, ref_logps, labels, z0, settings.beta, settings.desirable_weight,
                    settings.undesirable_weight)
    with torch.no_grad():
        metrics = _label_metrics(settings.beta * (logps - ref_logps), logps, labels, out) | {"z0": z0}
    return loss, metrics


def kto_step_fn(settings: KTOSettings = KTOSettings()):
    """``kto_step`` with its settings bound, for ``rlcourse.train.train``."""
    return lambda model, batch: kto_step(model, batch, settings)


def trl_kto_kwargs(settings: KTOSettings, max_length: int | None) -> dict:
    """The ``KTOConfig`` options that make TRL's run match ours: the KTO loss, β, λ_D, λ_U, the same truncation,
    the reference recomputed every step, no padding to a multiple, dropout off."""
    return dict(loss_type="kto", beta=settings.beta, desirable_weight=settings.desirable_weight,
                undesirable_weight=settings.undesirable_weight, max_length=max_length,
                precompute_ref_log_probs=False, pad_to_multiple_of=None, disable_dropout=True, sync_ref_model=False)


def bco_step_fn(beta: float = 0.1):
    """A BCO step (unpaired, with the running reward shift δ) for ``rlcourse.train.train``; δ lives in the closure.

    Before each loss, δ is updated with the batch's rewards (detached), then used: the order of TRL's removed
    ``BCOTrainer``. The mismatched KL sequences of the batch are not used.
    """
    shift = RewardShift()

    def step(model, batch: dict) -> tuple[torch.Tensor, dict]:
        batch = to_model_device(model, batch)
        logps, out = _sequence_logps(model, batch, with_entropy=True)
        with torch.no_grad(), reference_policy(model):
            ref_logps, _ = _sequence_logps(model, batch)
        rewards = beta * (logps - ref_logps)  # (B,)
        delta = shift.update(rewards)
        labels = batch["label"].bool()
        loss = bco_loss(logps, ref_logps, labels, beta, delta)
        with torch.no_grad():
            metrics = _label_metrics(rewards.detach(), logps, labels, out) | {"delta": torch.tensor(delta, device=logps.device)}
        return loss, metrics

    step.shift = shift
    step.state_dict = lambda: {"mean": shift.mean, "count": shift.count}
    step.load_state_dict = lambda state: vars(shift).update(state)
    return step


class PromptValues(torch.nn.Module):
    """DRO's value V(x): one learned scalar per training prompt (the prompts are few and each has its rows)."""

    def __init__(self, n_prompts: int):
        super().__init__()
        self.values = torch.nn.Parameter(torch.zeros(n_prompts))

    def forward(self, prompt_index: torch.Tensor) -> torch.Tensor:
        return self.values[prompt_index]  # (B,)


def dro_step_fn(n_prompts: int, tau: float = 1.0, value_lr: float = 0.1):
    """A DRO-V step for ``rlcourse.train.train``: the value half updates V (its own Adam, ``value_lr``), then the
    policy half's loss is returned for the loop to update the policy. Needs ``batch["score"]`` (the scalar reward).

    ``step.values`` is the value table. Metrics: ``dro_loss`` (the joint objective, before the updates),
    ``value_loss``, ``advantage`` (mean r − V), ``logratio`` (mean log π_θ/π_ref per completion).
    """
    values = PromptValues(n_prompts)
    optimizer = torch.optim.Adam(values.parameters(), lr=value_lr)

    def step(model, batch: dict) -> tuple[torch.Tensor, dict]:
        if "score" not in batch:
            raise ValueError("DRO needs a scalar reward per row: build the rows with unpaired_rows() from pairs with "
                             "'score_chosen' and 'score_rejected', or give every row a 'score'")
        batch = to_model_device(model, batch)
        values.to(batch["score"].device)  # in place: the value optimizer keeps the same parameter
        logps, out = _sequence_logps(model, batch, with_entropy=True)
        with torch.no_grad(), reference_policy(model):
            ref_logps, _ = _sequence_logps(model, batch)
        rewards = batch["score"].to(logps.dtype)
        v = values(batch["prompt_index"])
        with torch.no_grad():
            joint = dro_loss(logps.float(), ref_logps.float(), rewards.float(), v.float(), tau)
        value_loss = dro_value_loss(v, rewards.float(), logps.float(), ref_logps.float(), tau)
        optimizer.zero_grad()
        value_loss.backward()
        optimizer.step()
        v = values(batch["prompt_index"]).detach()  # the updated baseline
        loss = dro_policy_loss(logps.float(), ref_logps.float(), rewards.float(), v, tau)
        with torch.no_grad():
            logratio = (logps - ref_logps).float()
            metrics = {"dro_loss": joint, "value_loss": value_loss.detach(), "advantage": (rewards - v).mean(),
                       "logratio": logratio.mean(), "reward": rewards.mean(),
                       "entropy": (out["entropy"] * out["mask"]).sum() / out["mask"].sum().clamp(min=1)}
        return loss, metrics

    step.values = values
    step.state_dict = lambda: {"values": values.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(state: dict) -> None:
        values.load_state_dict(state["values"])
        optimizer.load_state_dict(state["optimizer"])

    step.load_state_dict = load_state_dict
    return step
