"""Tokenising rows the way TRL 1.16's trainers do: the chat template, and where the completion starts.

Every trainer renders the prompt alone (with the generation prompt) and the prompt with its completion, and lets
the completion start where the two token sequences part (``common_prefix``), because a template may render the
end of the prompt differently once a reply follows. SFT, KTO, DPO and its relatives, and the reward model all
build on the three helpers here; what differs between trainers (an EOS appended, a pair's shared split point)
is said where it differs.
"""

from __future__ import annotations

import warnings


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         add_generation_prompt=add_generation_prompt)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share: where a completion starts after its prompt."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_prompt_completion(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one row, as SFTTrainer and KTOTrainer build them.

    Conversational rows (message lists): the prompt with the generation prompt, then prompt + completion in one
    pass; the completion starts where the two part (usually right after the prompt). Standard rows (text): plain
    concatenation, no special tokens.
    """
    if isinstance(prompt, list):
        prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
        ids = chat_ids(tokenizer, prompt + completion)
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    start = common_prefix(prompt_ids, ids)
    return ids[:start], ids[start:]


def join(prompt_ids: list[int], completion_ids: list[int]) -> dict[str, list[int]]:
    """One tokenised row: ``input_ids`` of prompt + completion, and the ``completion_mask`` (1 on completion tokens)."""
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def tokenize_prompt_completion(tokenizer, prompt, completion) -> dict[str, list[int]]:
    """``input_ids`` of prompt + completion and their ``completion_mask``, as SFTTrainer builds them."""
    return join(*split_prompt_completion(tokenizer, prompt, completion))


def tokenize_pair(tokenizer, prompt, chosen, rejected) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` of one conversational preference row, as DPOTrainer.

    Both completions start at the same token: the shorter of the two common prefixes with the prompt.
    """
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    prompt_chosen = chat_ids(tokenizer, prompt + chosen)
    prompt_rejected = chat_ids(tokenizer, prompt + rejected)
    start = min(common_prefix(prompt_ids, prompt_chosen), common_prefix(prompt_ids, prompt_rejected))
    return {"prompt_ids": prompt_ids[:start], "chosen_ids": prompt_chosen[start:],
            "rejected_ids": prompt_rejected[start:]}


def with_eos(tokens: dict[str, list[int]], eos_token_id: int) -> dict[str, list[int]]:
    """A tokenised pair with EOS appended to each completion that does not already end with it.

    CPOTrainer and ORPOTrainer do this (``add_eos_token_if_needed``) after tokenising the chat-templated text.
    SmolLM2's template ends a turn with ``<|im_end|>\\n``, so every completion gets a second ``<|im_end|>``:
    harmless for generation, but it changes the log-probs, so parity must include it.
    """
    out = dict(tokens)
    for side in ("chosen_ids", "rejected_ids"):
        if not out[side] or out[side][-1] != eos_token_id:
            out[side] = out[side] + [eos_token_id]
    return out


# ── whole datasets, with the row checks and TRL's drop rule ──────────────────────────────────────────────────


def _check_messages(kind: str, row, i: int, columns: tuple[str, ...], fix: str) -> None:
    for column in columns:
        if column not in row:
            names = ", ".join(map(repr, columns))
            raise ValueError(f"{kind} row {i}: missing column {column!r}. Fix: give every row {names}"
                             f"{fix}.")
        value = row[column]
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "content" in m for m in value):
            raise ValueError(f"{kind} row {i}: column {column!r} must be a non-empty list of chat messages "
                             f"(conversational format), got {value!r:.80}. Fix: wrap text as "
                             "[{'role': 'user'|'assistant', 'content': text}].")


def check_pair_row(row, i: int) -> None:
    """A conversational preference row: 'prompt', 'chosen', 'rejected' as message lists, chosen ≠ rejected."""
    _check_messages("preference", row, i, ("prompt", "chosen", "rejected"),
                    " (see lesson 02 for the formats and a converter)")
    if row["chosen"] == row["rejected"]:
        raise ValueError(f"preference row {i}: 'chosen' and 'rejected' are identical, so the pair says nothing. "
                         "Fix: drop the row.")


def check_unpaired_row(row, i: int) -> None:
    """An unpaired row: 'prompt' and 'completion' as message lists, a bool 'label'."""
    if "label" not in row:
        raise ValueError(f"unpaired row {i}: missing column 'label'. Fix: give every row 'prompt', 'completion' and "
                         "'label' (True = desirable); rlcourse.data.unpaired_rows() converts preference pairs.")
    _check_messages("unpaired", row, i, ("prompt", "completion"), " and 'label' (True = desirable)")
    if not isinstance(row["label"], bool):
        raise ValueError(f"unpaired row {i}: 'label' must be True (desirable) or False (undesirable), got "
                         f"{row['label']!r}. Fix: convert it with bool().")


def _drop_long_prompts(items: list[tuple[int, dict]], max_length: int | None, kind: str) -> list[dict]:
    """TRL drops rows whose prompt alone fills ``max_length`` (truncation would leave no completion token)."""
    kept = [t for _, t in items if max_length is None or len(t["prompt_ids"]) < max_length]
    dropped = [i for i, t in items if max_length is not None and len(t["prompt_ids"]) >= max_length]
    if dropped:
        warnings.warn(f"dropped {len(dropped)} {kind} rows whose prompt fills max_length={max_length} "
                      f"(rows {dropped[:5]}{'...' if len(dropped) > 5 else ''}); raise max_length to keep them")
    if not kept:
        raise ValueError(f"no {kind} rows left to train on")
    return kept


def tokenize_sft(dataset, tokenizer) -> list[dict]:
    """Each prompt-completion row as ``input_ids`` + ``completion_mask``, in order (SFTTrainer's tokenisation)."""
    return [tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"]) for row in dataset]


def tokenize_pairs(dataset, tokenizer, max_length: int | None = None, append_eos: bool = False) -> list[dict]:
    """Each preference row by ``tokenize_pair`` (and ``with_eos`` when ``append_eos``: CPO, SimPO, ORPO), in order.

    Bad rows raise a ValueError naming the row and the fix; rows whose prompt fills ``max_length`` are dropped with
    a warning, as TRL drops them.
    """
    items = []
    for i, row in enumerate(dataset):
        check_pair_row(row, i)
        tokens = tokenize_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        items.append((i, with_eos(tokens, tokenizer.eos_token_id) if append_eos else tokens))
    return _drop_long_prompts(items, max_length, "preference")


def tokenize_unpaired(rows, tokenizer, max_length: int | None = None) -> list[dict]:
    """``prompt_ids``, ``completion_ids``, ``label`` (and ``score`` when present) of each row, as KTOTrainer builds
    them (no EOS added to conversational rows), in order; checks and drop rule as ``tokenize_pairs``."""
    items = []
    for i, row in enumerate(rows):
        check_unpaired_row(row, i)
        prompt_ids, completion_ids = split_prompt_completion(tokenizer, row["prompt"], row["completion"])
        item = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": row["label"]}
        if "score" in row:
            item["score"] = float(row["score"])
        items.append((i, item))
    return _drop_long_prompts(items, max_length, "unpaired")


def tokenize_reward_pair(tokenizer, row: dict) -> dict:
    """``chosen_ids`` and ``rejected_ids`` of one preference row, as ``RewardTrainer`` builds them: whole sequences.

    Conversational rows: the chat template over prompt + chosen (and prompt + rejected), whole, with no
    generation prompt. Standard rows: plain text, prompt + completion, with the EOS token appended when
    missing. A ``margin`` value is carried along.
    """
    for field in ("chosen", "rejected"):
        if field not in row:
            raise ValueError(f"a preference row needs {field!r}; this one has {sorted(row)}. Fix: see lesson 02's "
                             f"preference format (prompt, chosen, rejected).")
    prompt = row.get("prompt")
    out = {}
    for field in ("chosen", "rejected"):
        completion = row[field]
        if isinstance(completion, list):  # conversational
            messages = (prompt or []) + completion
            out[f"{field}_ids"] = chat_ids(tokenizer, messages)
        else:
            text = (prompt or "") + completion
            if not text.endswith(tokenizer.eos_token):
                text += tokenizer.eos_token
            out[f"{field}_ids"] = tokenizer(text)["input_ids"]
    if "margin" in row:
        out["margin"] = float(row["margin"])
    return out


def tokenize_reward_pairs(dataset, tokenizer, max_length: int | None = None) -> list[dict]:
    """Every row tokenized by ``tokenize_reward_pair``, in order; pairs longer than ``max_length`` are dropped (as
    TRL does), with a message saying how many. Raises a ValueError when none is left."""
    rows = [tokenize_reward_pair(tokenizer, row) for row in dataset]
    if max_length is None:
        return rows
    kept = [r for r in rows if len(r["chosen_ids"]) <= max_length and len(r["rejected_ids"]) <= max_length]
    if len(kept) < len(rows):
        print(f"dropped {len(rows) - len(kept)} of {len(rows)} pairs longer than max_length={max_length} tokens")
    if not kept:
        raise ValueError(f"every pair is longer than max_length={max_length} tokens. Fix: raise max_length.")
    return kept
