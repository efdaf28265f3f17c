"""Conversions between TRL's dataset formats, written out so that each one can be read in a minute.

TRL's own functions are the reference (``tests/test_data.py`` checks ours against them):

========================  ============================================  =============================
ours                      from → to                                     TRL
========================  ============================================  =============================
``to_standard``           conversational → standard                     ``maybe_apply_chat_template``
``unpair``                preference → unpaired preference              ``unpair_preference_dataset``
``pair``                  unpaired preference → preference              (none: the inverse of unpair)
``extract_prompt``        implicit → explicit prompt preference         ``extract_prompt``
``to_implicit_prompt``    explicit → implicit prompt preference         (none: the inverse)
``to_language_modeling``  prompt-completion → language modelling        (inside ``SFTTrainer``)
``to_prompt_completion``  conv. language modelling → prompt-completion  (none)
                          preference → prompt-completion (chosen)
``to_prompt_only``        any kind with a prompt → prompt-only          (none)
========================  ============================================  =============================

Which conversions lose information, and so cannot be undone: ``to_standard`` (the roles become
template text), ``to_language_modeling`` on standard rows (the prompt/completion boundary is gone),
``to_prompt_only`` and ``to_prompt_completion`` on preference rows (they drop completions).

Departures from TRL:
- ``unpair`` needs an explicit prompt. TRL's ``unpair_preference_dataset`` on implicit-prompt data
  writes rows without a ``prompt`` column, which are not unpaired preference data; run
  ``extract_prompt`` first (as ``KTOTrainer`` does).
- ``extract_prompt`` never uses a negative index. TRL's moves the split one character back when the
  character before it is a space, also when the split is at 0, where ``chosen[-1]`` is the *last*
  character: a pair differing in its first character and whose chosen side ends with a space gets
  almost the whole chosen text as its "prompt". Ours keeps the split at 0. It also raises a clear
  error on an empty side, where TRL's raises UnboundLocalError.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from typing import Any, Iterable, Mapping

from .formats import TEXT_FIELDS, DatasetFormatError, Format, Kind, Problem, detect_format, is_conversational


def as_rows(data: Any) -> list[dict]:
    """A list of row dicts from a list of dicts or a ``datasets.Dataset``."""
    if isinstance(data, Mapping):
        raise DatasetFormatError([Problem(None, None, "got a single dict, not a dataset",
                                          "pass a list of rows (wrap one example in a list) or a datasets.Dataset")])
    return [dict(row) if isinstance(row, Mapping) else row for row in data]


def _require(example: Mapping, *kinds: Kind) -> Format:
    fmt = detect_format(example)
    if fmt.kind not in kinds:
        raise DatasetFormatError([Problem(None, None, f"this conversion takes {' or '.join(map(str, kinds))} rows, "
                                          f"got a {fmt} row", "convert the row to one of those formats first")])
    return fmt


# --- conversational → standard: the chat template --------------------------------------------------------


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def to_standard(example: Mapping[str, Any], tokenizer) -> dict:
    """Render a conversational example as plain text with the tokenizer's chat template; standard ones pass through.

    - ``messages`` becomes ``text``, the whole conversation rendered.
    - ``prompt`` is rendered with the generation prompt (the "assistant turn starts here" marker) when it
      ends with a user or tool turn, or left open (``continue_final_message``) when it ends with an
      assistant turn to be continued.
    - each completion (``completion``, ``chosen``, ``rejected``) is what ``prompt + completion``, rendered
      as one conversation, adds after the prompt. The prompt is first cut to the part every rendering
      shares, because some templates render a prompt alone differently from the same prompt followed by
      a reply; then prompt + completion always equals the full rendering.
    - implicit-prompt ``chosen``/``rejected`` are each rendered whole.

    An example's ``chat_template_kwargs`` column is passed to the template, as TRL does.
    """
    if not is_conversational(example):
        return dict(example)
    fmt = detect_format(example)
    template_kwargs = example.get("chat_template_kwargs") or {}

    def render(messages, **kwargs) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs, **template_kwargs)

    out = {k: v for k, v in example.items() if k not in TEXT_FIELDS}  # label and pass-through columns
    if fmt.kind is Kind.LANGUAGE_MODELING:
        out.pop("messages", None)
        out["text"] = render(example["messages"])
        return out
    if "prompt" not in example:  # implicit prompt: each side is a whole conversation
        return {**out, "chosen": render(example["chosen"]), "rejected": render(example["rejected"])}
    last_role = example["prompt"][-1]["role"]
    if last_role not in ("user", "tool", "assistant"):
        raise DatasetFormatError([Problem(None, "prompt", f'the prompt ends with a "{last_role}" message',
                                          "end it with the user turn the model should answer")])
    continues = last_role == "assistant"
    prompt = render(example["prompt"], add_generation_prompt=not continues, continue_final_message=continues)
    full = {k: render(example["prompt"] + example[k]) for k in ("chosen", "rejected", "completion") if k in fmt.fields}
    for text in full.values():
        prompt = _common_prefix(prompt, text)
    out["prompt"] = prompt
    for k, text in full.items():
        out[k] = text[len(prompt):]
    return out


# --- paired ↔ unpaired preferences ------------------------------------------------------------------------


def unpair(data: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Preference rows (prompt, chosen, rejected) → unpaired rows (prompt, completion, label).

    Each pair becomes two rows, ``label=True`` for the chosen side and ``label=False`` for the rejected
    side; other columns are copied to both. Order as TRL's: all chosen rows, then all rejected rows
    (TRL does this per ``map`` batch, 1,000 rows by default, so its order differs beyond 1,000 pairs).
    """
    rows = as_rows(data)
    for i, row in enumerate(rows):
        fmt = detect_format(row)
        if fmt.kind is not Kind.PREFERENCE:
            raise DatasetFormatError([Problem(i, None, f"is a {fmt} row, not a preference row with an explicit "
                                              "prompt", "run extract_prompt on implicit-prompt rows first")])
    extra = lambda row: {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}  # noqa: E731
    chosen = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True, **extra(r)} for r in rows]
    rejected = [{"prompt": r["prompt"], "completion": r["rejected"], "label": False, **extra(r)} for r in rows]
    return chosen + rejected


def _key(value: Any) -> str:
    """A hashable stand-in for a prompt (conversational prompts are lists of dicts)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def pair(data: Iterable[Mapping[str, Any]], drop_unmatched: bool = False) -> list[dict]:
    """Unpaired rows → preference rows: the k-th ``True`` row of a prompt is paired with its k-th ``False`` row.

    The inverse of ``unpair``: ``pair(unpair(rows)) == rows``. Other columns are taken from the chosen
    (``True``) row. Rows left without a partner (a prompt with more desirable than undesirable
    completions, or the reverse) raise DatasetFormatError, or are dropped with ``drop_unmatched=True``.
    """
    rows = as_rows(data)
    rejected = defaultdict(deque)  # prompt → its False rows, in order
    for i, row in enumerate(rows):
        fmt = detect_format(row)
        if fmt.kind is not Kind.UNPAIRED_PREFERENCE:
            raise DatasetFormatError([Problem(i, None, f"is a {fmt} row, not an unpaired preference row",
                                              "pair() takes prompt/completion/label rows")])
        if row["label"] is False:
            rejected[_key(row["prompt"])].append(i)
    pairs, problems = [], []
    for i, row in enumerate(rows):
        if row["label"] is not True:
            continue
        waiting = rejected[_key(row["prompt"])]
        if not waiting:
            problems.append(Problem(i, "label", "a desirable completion with no undesirable one for its prompt",
                                    "drop the row, or pass drop_unmatched=True"))
            continue
        j = waiting.popleft()
        extra = {k: v for k, v in row.items() if k not in ("prompt", "completion", "label")}
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rows[j]["completion"], **extra})
    for left in rejected.values():
        problems += [Problem(j, "label", "an undesirable completion with no desirable one for its prompt",
                             "drop the row, or pass drop_unmatched=True") for j in left]
    if problems and not drop_unmatched:
        raise DatasetFormatError(sorted(problems, key=lambda p: p.row), n_rows=len(rows))
    return pairs


# --- implicit ↔ explicit prompt ---------------------------------------------------------------------------


def extract_prompt(example: Mapping[str, Any]) -> dict:
    """Implicit-prompt preference → explicit: the longest shared start of chosen and rejected becomes the prompt.

    Works on strings (a shared prefix of characters) and on message lists (of whole messages). Two
    adjustments, both TRL's:
    - when one side is a prefix of the other, the split is one element earlier, so neither side is empty;
    - on strings, a space just before the split moves to the completions (``"The sky is"`` + ``" blue."``).
    The split is per character: ``"It is red."`` vs ``"It is raw."`` gives the prompt ``"It is r"``.
    """
    chosen, rejected = example["chosen"], example["rejected"]
    shortest = min(len(chosen), len(rejected))
    if shortest == 0:
        raise DatasetFormatError([Problem(None, "chosen" if not chosen else "rejected", "empty",
                                          "both sides need the prompt and a completion")])
    k = 0
    while k < shortest and chosen[k] == rejected[k]:
        k += 1
    if k == shortest:  # one side is a prefix of the other: leave at least one element on each side
        k = shortest - 1
    elif k > 0 and chosen[k - 1] == " ":
        k -= 1
    rest = {key: v for key, v in example.items() if key not in ("prompt", "chosen", "rejected")}
    return {"prompt": chosen[:k], "chosen": chosen[k:], "rejected": rejected[k:], **rest}


def to_implicit_prompt(example: Mapping[str, Any]) -> dict:
    """Explicit-prompt preference → implicit: the prompt is prepended to both sides.

    ``to_implicit_prompt(extract_prompt(x)) == x`` always. The other way round holds when chosen and
    rejected already differ in their first message (conversational) or in their first character after
    a leading space (standard); otherwise extract_prompt finds a longer shared prompt.
    """
    _require(example, Kind.PREFERENCE)
    rest = {k: v for k, v in example.items() if k not in ("prompt", "chosen", "rejected")}
    prompt = example["prompt"]
    return {"chosen": prompt + example["chosen"], "rejected": prompt + example["rejected"], **rest}


# --- prompt-completion ↔ language modelling, and to prompt-only ------------------------------------------


def to_language_modeling(example: Mapping[str, Any]) -> dict:
    """Prompt-completion → language modelling: ``text = prompt + completion`` (standard) or
    ``messages = prompt + completion`` (conversational). SFT on the result trains on every token,
    the prompt's included, where SFT on prompt-completion data trains on the completion only.
    """
    fmt = _require(example, Kind.PROMPT_COMPLETION)
    rest = {k: v for k, v in example.items() if k not in ("prompt", "completion")}
    return {("messages" if fmt.conversational else "text"): example["prompt"] + example["completion"], **rest}


def to_prompt_completion(example: Mapping[str, Any]) -> dict:
    """Conversational language modelling → prompt-completion (the last message, an assistant's, is the
    completion), or preference → prompt-completion (the chosen side is the completion, e.g. SFT before DPO).

    The inverse of ``to_language_modeling`` for conversational rows whose completion is one assistant
    message. Standard ``text`` has no boundary left to split at, and raises DatasetFormatError.
    """
    fmt = _require(example, Kind.LANGUAGE_MODELING, Kind.PREFERENCE)
    if fmt.kind is Kind.PREFERENCE:
        rest = {k: v for k, v in example.items() if k not in ("prompt", "chosen", "rejected")}
        return {"prompt": example["prompt"], "completion": example["chosen"], **rest}
    if not fmt.conversational:
        raise DatasetFormatError([Problem(None, "text", "plain text does not say where the prompt ends",
                                          "keep prompt and completion as separate columns when building the data")])
    messages = example["messages"]
    if messages[-1].get("role") != "assistant" or len(messages) < 2:
        raise DatasetFormatError([Problem(None, "messages", "the conversation does not end with an assistant reply "
                                          "after a prompt", "end it with the assistant's message")])
    rest = {k: v for k, v in example.items() if k != "messages"}
    return {"prompt": messages[:-1], "completion": messages[-1:], **rest}


def to_prompt_only(example: Mapping[str, Any]) -> dict:
    """Any row with an explicit prompt → prompt-only (for online methods, which sample their own completions)."""
    _require(example, Kind.PROMPT_ONLY, Kind.PROMPT_COMPLETION, Kind.PREFERENCE, Kind.UNPAIRED_PREFERENCE,
             Kind.STEPWISE_SUPERVISION)
    dropped = ("completion", "chosen", "rejected", "label", "completions", "labels")
    return {k: v for k, v in example.items() if k not in dropped}
