"""What a step function receives: one dataclass per kind of batch, and the walkers that build them step by step.

| batch | holds | methods |
|---|---|---|
| ``Sequences`` | (N, T) prompt + completion tokens, right-padded, with a completion mask | SFT |
| ``PairBatch`` | B preference pairs as 2B sequences, the B chosen first | DPO, IPO, CPO, SimPO, ORPO |
| ``UnpairedBatch`` | B labelled completions and their B mismatched (x_i, y_{i−1}) sequences | KTO, BCO, DRO |
| ``RewardPairBatch`` | B pairs as 2B whole conversations (no completion mask), optional margins | reward model |
| ``RolloutBatch`` | N = B·G sampled completions, TRL's layout, with their rewards | RLOO, GRPO |

Batches are built on the CPU; a step moves one with ``batch.to(device)`` (``rlcourse.logprobs.to_model_device``).
A walker, called with a step number, returns that step's batch: rows in order, wrapping round at the end, as TRL's
sequential sampler walks a pre-shuffled dataset. Shapes: course/notation.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence, TypeVar

import torch
from trl.trainer.utils import pad

from rlcourse.tokenization import join

T = TypeVar("T")


def batch_indices(step: int, batch_size: int, n: int) -> list[int]:
    """Rows of step ``step`` when walking the (pre-shuffled) data in order, wrapping around at the end."""
    return [(step * batch_size + i) % n for i in range(batch_size)]


class Batch:
    """``to(device)``: the same batch with every tensor (and nested batch) on ``device``."""

    def to(self, device):
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, Batch)):
                moved[f.name] = value.to(device)
        return replace(self, **moved)


@dataclass(frozen=True)
class Sequences(Batch):
    """N right-padded prompt + completion sequences."""

    input_ids: torch.Tensor
    """(N, T) token ids, padded with the pad token."""
    attention_mask: torch.Tensor
    """(N, T) 1 on real tokens."""
    completion_mask: torch.Tensor
    """(N, T) 1 on completion tokens (the ones a loss scores)."""

    @classmethod
    def from_dict(cls, batch: dict) -> Sequences:
        """The three tensors of a collated dict, e.g. a batch of TRL's own collator (for a parity check)."""
        return cls(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])


@dataclass(frozen=True)
class PairBatch(Batch):
    """B preference pairs in one forward: rows 0..B−1 prompt + chosen, rows B..2B−1 prompt + rejected."""

    sequences: Sequences
    """(2B, T), chosen rows first."""
    step: int = 0
    """Optimizer steps done before this batch (TR-DPO's reference sync reads it)."""


def pair_prompt_layout(seqs: Sequences) -> tuple[torch.Tensor, ...] | None:
    """(2B, T) pair sequences, chosen rows first, as one prompt per pair and its two completions, the layout
    ``rlcourse.logprobs.shared_prompt_logits`` forwards each prompt once in: prompt_ids, prompt_mask (B, P)
    left-padded; completion_ids, completion_mask (2B, C) right-padded (0), interleaved (row 2b: pair b's chosen,
    2b+1: its rejected). None when a pair's two prompts differ, one is empty, or a completion has a token its mask
    leaves out (a batch not made by ``tokenize_pairs``)."""
    B = seqs.input_ids.size(0) // 2
    lengths = seqs.attention_mask.sum(-1)  # (2B,) real tokens, right-padded
    starts = (seqs.completion_mask.bool() & seqs.attention_mask.bool()).int().argmax(-1)  # (2B,) first completion
    prompts, completions = [], []
    for b in range(B):
        pair = (b, B + b)  # chosen, rejected
        p = int(starts[b])
        if p == 0 or p != int(starts[B + b]) or not torch.equal(seqs.input_ids[b, :p], seqs.input_ids[B + b, :p]):
            return None
        if not all(bool(seqs.completion_mask[r, p:lengths[r]].all()) for r in pair):
            return None  # a completion token the loss skips: keep the plain forward
        prompts.append(seqs.input_ids[b, :p])
        completions += [seqs.input_ids[r, p:lengths[r]] for r in pair]
    P, C = max(len(x) for x in prompts), max(len(x) for x in completions)
    prompt_ids = seqs.input_ids.new_zeros((B, P))
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = seqs.input_ids.new_zeros((2 * B, C))
    completion_mask = torch.zeros_like(completion_ids)
    for b, x in enumerate(prompts):
        prompt_ids[b, P - len(x):], prompt_mask[b, P - len(x):] = x, 1
    for r, x in enumerate(completions):
        completion_ids[r, :len(x)], completion_mask[r, :len(x)] = x, 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@dataclass(frozen=True)
class UnpairedBatch(Batch):
    """B completions, each labelled desirable or not, with what KTO, BCO and DRO need besides."""

    sequences: Sequences
    """(B, T) prompt + completion of each row."""
    mismatched: Sequences
    """(B, T) prompt x_i with the completion of row i−1 of the batch: KTO's "KL" sequences for its z₀."""
    label: torch.Tensor
    """(B,) bool, True = desirable."""
    prompt_index: torch.Tensor
    """(B,) which distinct training prompt each row has (DRO's value table is indexed by it)."""
    score: torch.Tensor | None = None
    """(B,) the gold score of each completion, DRO's scalar reward; None when the rows have none."""


@dataclass(frozen=True)
class RewardPairBatch(Batch):
    """B preference pairs as 2B whole conversations, chosen first; a reward model reads every token."""

    input_ids: torch.Tensor
    """(2B, T) right-padded."""
    attention_mask: torch.Tensor
    """(2B, T)."""
    margin: torch.Tensor | None = None
    """(B,) Llama 2's margin of each pair, or None."""


@dataclass(frozen=True)
class RolloutBatch(Batch):
    """N = B·G sampled completions in TRL's layout (row iG + k: prompt i's k-th sample), scored."""

    prompt_ids: torch.Tensor
    """(N, P) left-padded prompts."""
    prompt_mask: torch.Tensor
    """(N, P)."""
    completion_ids: torch.Tensor
    """(N, C) right-padded completions, each cut after its first EOS."""
    completion_mask: torch.Tensor
    """(N, C) 1 on completion tokens."""
    rewards: torch.Tensor
    """(N,) the task's reward of each completion."""
    completions: list[str]
    """The N decoded completions (for a look at what was sampled)."""
    sampler_logps: torch.Tensor | None = None
    """(N, C) the sampler's log-prob of each completion token (0 on padding), for the sampler/policy gap; None
    for completions that did not come from the rollout engine."""
    timings: dict = field(default_factory=dict, compare=False)
    """Seconds spent producing the batch, by phase ("sync", "prefill", "decode", "reward"): the step breakdown."""

    def head(self, rows: int) -> RolloutBatch:
        """The first ``rows`` rows (whole groups, when ``rows`` is a multiple of G), in the same layout: a smaller
        batch for a check that does not need them all."""
        cut = {f.name: getattr(self, f.name)[:rows] for f in fields(self)
               if isinstance(getattr(self, f.name), (torch.Tensor, list))}
        return replace(self, **cut)


# ── collation ────────────────────────────────────────────────────────────────────────────────────────────────


def collate(examples: list[dict], pad_token_id: int, max_length: int | None = None) -> Sequences:
    """Tokenised rows (``input_ids``, ``completion_mask`` lists) -> right-padded ``Sequences``; each row is cut to
    ``max_length`` first, keeping its start."""
    cut = slice(0, max_length)
    ids = [torch.tensor(e["input_ids"][cut]) for e in examples]
    cmask = [torch.tensor(e["completion_mask"][cut]) for e in examples]
    return Sequences(input_ids=pad(ids, padding_value=pad_token_id),
                     attention_mask=pad([torch.ones_like(i) for i in ids], padding_value=0),
                     completion_mask=pad(cmask, padding_value=0))


def collate_pairs(pairs: list[dict], pad_token_id: int, max_length: int | None = None) -> Sequences:
    """B tokenised pairs -> (2B, T) ``Sequences``, the B chosen first, as TRL's ``DataCollatorForPreference``."""
    rows = [join(p["prompt_ids"], p[side]) for side in ("chosen_ids", "rejected_ids") for p in pairs]
    return collate(rows, pad_token_id, max_length)


def collate_reward_pairs(pairs: list[dict], pad_token_id: int) -> RewardPairBatch:
    """B tokenised pairs (``chosen_ids``, ``rejected_ids``, optional ``margin``) -> a right-padded ``RewardPairBatch``
    of 2B whole sequences, the B chosen first, as TRL's reward collator (no truncation: too long pairs are dropped
    before, ``rlcourse.tokenization.tokenize_reward_pairs``)."""
    ids = [torch.tensor(p["chosen_ids"]) for p in pairs] + [torch.tensor(p["rejected_ids"]) for p in pairs]
    margin = torch.tensor([p["margin"] for p in pairs], dtype=torch.float) if "margin" in pairs[0] else None
    return RewardPairBatch(input_ids=pad(ids, padding_value=pad_token_id),  # (2B, T)
                           attention_mask=pad([torch.ones_like(i) for i in ids], padding_value=0), margin=margin)


def mismatched_completions(completions: Sequence[T]) -> list[T]:
    """The completions of a batch rotated by one, for the KL estimate: [y_B, y_1, ..., y_{B−1}].

    Pairing prompt i with the result, x_i gets y_{i−1} (and x_1 gets y_B): every completion of the batch is used
    once, never with its own prompt (for B ≥ 2), as TRL's ``KTOTrainer`` builds its ``KL_completion_ids``.
    """
    if len(completions) < 2:
        raise ValueError(f"a batch of {len(completions)} example(s) has no mismatched pair: KTO's KL estimate needs "
                         "batch_size ≥ 2 (TRL refuses per_device_train_batch_size=1 for the same reason).")
    return [completions[-1], *completions[:-1]]


def pad_rollout(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                sampler_logps: list[list[float]] | None = None) -> dict:
    """TRL's layout: prompts left-padded (N, P), completions right-padded (N, C), with their masks; and the
    sampler's per-token log-probs (N, C), right-padded with 0, when given."""
    p = [torch.tensor(ids) for ids in prompt_ids]
    c = [torch.tensor(ids) for ids in completion_ids]
    logps = {} if sampler_logps is None else {"sampler_logps": pad(
        [torch.tensor(lp, dtype=torch.float32) for lp in sampler_logps], padding_value=0.0, padding_side="right")}
    return logps | {
        "prompt_ids": pad(p, padding_value=pad_token_id, padding_side="left"),  # (N, P)
        "prompt_mask": pad([torch.ones_like(t) for t in p], padding_value=0, padding_side="left"),
        "completion_ids": pad(c, padding_value=pad_token_id, padding_side="right"),  # (N, C)
        "completion_mask": pad([torch.ones_like(t) for t in c], padding_value=0, padding_side="right"),
    }


# ── walkers: step -> batch ───────────────────────────────────────────────────────────────────────────────────


@dataclass
class SequenceBatches:
    """step -> ``Sequences`` of that step's rows (``tokenization.tokenize_sft`` output)."""

    tokenized: list[dict]
    batch_size: int
    pad_token_id: int
    max_length: int | None = None

    def __call__(self, step: int) -> Sequences:
        rows = [self.tokenized[i] for i in batch_indices(step, self.batch_size, len(self.tokenized))]
        return collate(rows, self.pad_token_id, self.max_length)


@dataclass
class PairBatches:
    """step -> ``PairBatch`` of that step's pairs (``tokenization.tokenize_pairs`` output)."""

    tokenized: list[dict]
    batch_size: int
    pad_token_id: int
    max_length: int | None = None

    def __call__(self, step: int) -> PairBatch:
        pairs = [self.tokenized[i] for i in batch_indices(step, self.batch_size, len(self.tokenized))]
        return PairBatch(collate_pairs(pairs, self.pad_token_id, self.max_length), step=step)


@dataclass
class RewardPairBatches:
    """step -> ``RewardPairBatch`` of that step's pairs (``tokenization.tokenize_reward_pairs`` output)."""

    tokenized: list[dict]
    batch_size: int
    pad_token_id: int

    def __call__(self, step: int) -> RewardPairBatch:
        pairs = [self.tokenized[i] for i in batch_indices(step, self.batch_size, len(self.tokenized))]
        return collate_reward_pairs(pairs, self.pad_token_id)


class UnpairedBatches:
    """step -> ``UnpairedBatch`` of that step's rows (``tokenization.tokenize_unpaired`` output).

    The mismatched sequences are rotated *within the batch*, as TRL builds them within each block of
    ``per_device_train_batch_size`` rows; the two agree only when the rows are a whole number of batches,
    which is required.
    """

    def __init__(self, tokenized: list[dict], batch_size: int, pad_token_id: int, max_length: int | None = None):
        n = len(tokenized)
        if batch_size < 2 or n % batch_size:
            fix = ("use batch_size ≥ 2" if batch_size < 2 else f"use batch_size ≤ {n}, or more rows" if n < batch_size
                   else f"keep the first {n - n % batch_size} rows")
            raise ValueError(f"{n} rows in batches of {batch_size}: KTO's mismatched pairs are built within each batch "
                             "(as TRL builds them within each block of the dataset), which needs batch_size ≥ 2 and a "
                             f"number of rows divisible by it. Fix: {fix}.")
        self.tokenized, self.batch_size = tokenized, batch_size
        self.pad_token_id, self.max_length = pad_token_id, max_length
        self.prompt_index: dict[tuple, int] = {}
        for t in tokenized:
            self.prompt_index.setdefault(tuple(t["prompt_ids"]), len(self.prompt_index))

    @property
    def n_prompts(self) -> int:
        """Distinct prompts among the rows (the size of DRO's value table)."""
        return len(self.prompt_index)

    def __call__(self, step: int) -> UnpairedBatch:
        rows = [self.tokenized[i] for i in batch_indices(step, self.batch_size, len(self.tokenized))]
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        sequences = collate([join(p, c) for p, c in zip(prompts, completions)], self.pad_token_id, self.max_length)
        mismatched = collate([join(p, c) for p, c in zip(prompts, mismatched_completions(completions))],
                             self.pad_token_id, self.max_length)
        score = torch.tensor([r["score"] for r in rows]) if all("score" in r for r in rows) else None
        return UnpairedBatch(sequences, mismatched, label=torch.tensor([r["label"] for r in rows]),
                             prompt_index=torch.tensor([self.prompt_index[tuple(p)] for p in prompts]), score=score)
