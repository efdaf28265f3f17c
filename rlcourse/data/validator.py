"""A validator for TRL datasets: every problem in one error, each located (row, field) and with a fix.

TRL's trainers check little up front: a malformed row tends to surface as a KeyError deep inside
``map``, a chat-template error, or, worst, as silently wrong training (a pair whose two sides are
identical contributes a zero DPO margin; an over-long example is truncated and loses its answer).
``validate`` checks what can be checked before training:

- columns: a format's columns all there, none from another format; a column that is probably a
  renamed one (``output`` for ``completion``) is named in the fix;
- one format for all rows (the most common exact format, or the one asked for);
- text: strings, not empty; standard and conversational columns not mixed in one row;
- messages: dicts with ``role`` (system/user/assistant/tool) and ``content``; system only first,
  user first after it, no two user turns in a row, tool results after an assistant turn; a prompt
  that does not end with a system turn; completions that start and end with the assistant;
- preference: chosen differs from rejected; an implicit prompt really is shared;
- unpaired preference: ``label`` is a bool; stepwise supervision: one bool label per step;
- length (with a tokenizer and ``max_length``): prompt + completion tokens within the limit.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

from .convert import as_rows, extract_prompt, to_standard
from .formats import (
    ROLES,
    DatasetFormatError,
    Format,
    Kind,
    Problem,
    closest_format,
    column_problems,
    looks_conversational,
    present_fields,
)

_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
                 "developer": "system", "function": "tool", "ipython": "tool"}
COMPLETION_FIELDS = ("completion", "chosen", "rejected")
"""Columns that hold what the model should (or should not) say after the prompt."""


def _type_name(value: Any) -> str:
    return "a list of messages" if isinstance(value, list) else type(value).__name__


def _check_text(i: int, field: str, value: Any) -> list[Problem]:
    if isinstance(value, list):
        return [Problem(i, field, "a list of messages in a standard row (its other text columns are plain text)",
                        "make every text column of the row plain text (to_standard applies the chat template) "
                        "or every one a list of messages")]
    if not isinstance(value, str):
        return [Problem(i, field, f"expected a string, got {_type_name(value)}: {value!r:.40}",
                        "store the text as a string, or drop the row")]
    if not value.strip():
        return [Problem(i, field, f"empty text ({value!r})", "fill it in, or drop the row")]
    return []


def _check_message(i: int, field: str, j: int, message: Any) -> list[Problem]:
    if not isinstance(message, Mapping):
        return [Problem(i, field, f"a message must be a dict, got {_type_name(message)}",
                        'write it as {"role": ..., "content": ...}', j)]
    if "role" not in message:
        if "from" in message or "value" in message:
            return [Problem(i, field, 'message uses ShareGPT keys "from"/"value"',
                            'rename them to "role"/"content" (trl.maybe_convert_to_chatml does it)', j)]
        return [Problem(i, field, 'message has no "role"', f'add "role": one of {", ".join(ROLES)}', j)]
    problems = []
    role = message["role"]
    if role not in ROLES:
        alias = _ROLE_ALIASES.get(str(role).lower())
        fix = f'rename it to "{alias}"' if alias else f"use one of {', '.join(ROLES)}"
        problems.append(Problem(i, field, f"role {role!r} is not one of {', '.join(ROLES)}", fix, j))
    content = message.get("content")
    if content is None:
        if message.get("tool_calls") is None:  # an assistant turn that only calls tools may have no content
            problems.append(Problem(i, field, 'message has no "content"', 'add "content": the message text', j))
    elif isinstance(content, str):
        if not content.strip():
            problems.append(Problem(i, field, f'empty "content" ({content!r})', "fill it in, or drop the message", j))
    elif not (isinstance(content, list) and all(isinstance(part, Mapping) and "type" in part for part in content)):
        problems.append(Problem(i, field, f'"content" must be a string (or a list of typed parts), got '
                                f"{_type_name(content)}", "store the message text as a string", j))
    return problems


def _check_messages(i: int, field: str, value: Any) -> list[Problem]:
    if isinstance(value, str):
        return [Problem(i, field, "plain text in a conversational row (its other text columns are messages)",
                        'wrap it as [{"role": "assistant", "content": ...}] ("user" for a prompt), '
                        "or make the whole row standard")]
    if not isinstance(value, list):
        return [Problem(i, field, f"expected a list of messages, got {_type_name(value)}",
                        'write it as [{"role": ..., "content": ...}, ...]')]
    if not value:
        return [Problem(i, field, "no messages (an empty list)", "add the messages, or drop the row")]
    return [p for j, m in enumerate(value) for p in _check_message(i, field, j, m)]


def _roles(messages: list) -> list:
    return [m.get("role") if isinstance(m, Mapping) else None for m in messages]


def _check_role_order(i: int, field: str, roles: list, before: list) -> list[Problem]:
    """Order rules on ``roles`` (one column's messages), given the ``before`` roles of the conversation."""
    problems, seen = [], list(before)
    for j, role in enumerate(roles):
        if role not in ROLES:  # already reported by _check_message
            seen.append(role)
            continue
        if role == "system" and seen:
            problems.append(Problem(i, field, 'a "system" message after the start of the conversation',
                                    "move it to the front (one system message, first), or merge it there", j))
        elif role != "system" and role != "user" and all(r == "system" for r in seen):
            problems.append(Problem(i, field, f'the conversation starts with "{role}", not "user"',
                                    "start with the user turn (add it before, or move it from another column)", j))
        elif role == "user" and seen and seen[-1] == "user":
            problems.append(Problem(i, field, 'two "user" turns in a row',
                                    "merge them into one user message, or put the assistant's reply between them", j))
        elif role == "tool" and (not seen or seen[-1] not in ("assistant", "tool")):
            problems.append(Problem(i, field, 'a "tool" message not after an assistant turn',
                                    "a tool result must follow the assistant turn that called the tool", j))
        seen.append(role)
    return problems


def _check_conversation(i: int, row: Mapping, fmt: Format) -> list[Problem]:
    """Role order across the row's columns: the prompt first, then each completion after it."""
    problems = []
    prompt_roles = _roles(row["prompt"]) if "prompt" in fmt.fields else []
    if prompt_roles:
        problems += _check_role_order(i, "prompt", prompt_roles, [])
        if prompt_roles[-1] == "system":
            problems.append(Problem(i, "prompt", 'the prompt ends with a "system" message',
                                    "end it with the user turn the model should answer", len(prompt_roles) - 1))
    if problems:  # a broken prompt would make every completion after it look wrong too
        return problems
    for field in fmt.fields:
        if field == "prompt" or not isinstance(row[field], list) or field not in COMPLETION_FIELDS + ("messages",):
            continue
        roles = _roles(row[field])
        problems += _check_role_order(i, field, roles, prompt_roles)
        if not roles:
            continue
        if prompt_roles and roles[0] != "assistant" and roles[0] in ROLES:
            problems.append(Problem(i, field, f'the completion starts with a "{roles[0]}" message',
                                    f'a completion is the model\'s reply: move the {roles[0]} turn into "prompt"', 0))
        if roles[-1] != "assistant" and roles[-1] in ROLES:
            problems.append(Problem(i, field, f'ends with a "{roles[-1]}" message, not the assistant\'s',
                                    "end it with the assistant's reply (that is what the model learns to write)",
                                    len(roles) - 1))
    return problems


def _check_values(i: int, row: Mapping, fmt: Format) -> list[Problem]:
    """Everything about the values of a row whose columns are right for ``fmt``."""
    problems = []
    if fmt.kind is Kind.STEPWISE_SUPERVISION:
        return _check_stepwise(i, row)
    for field in fmt.fields:
        if field == "label":
            label = row["label"]
            if not isinstance(label, bool):
                fix = (f"use True/False: bool({label!r})" if isinstance(label, (int, float))
                       else 'parse it into True/False (e.g. label == "True")')
                problems.append(Problem(i, "label", f"must be a bool, got {type(label).__name__} {label!r}", fix))
        elif fmt.conversational:
            problems += _check_messages(i, field, row[field])
        else:
            problems += _check_text(i, field, row[field])
    if fmt.conversational and not problems:
        problems += _check_conversation(i, row, fmt)
    if fmt.kind in (Kind.PREFERENCE, Kind.IMPLICIT_PREFERENCE) and not problems:
        problems += _check_pair(i, row, fmt)
    return problems


def _check_pair(i: int, row: Mapping, fmt: Format) -> list[Problem]:
    chosen, rejected = row["chosen"], row["rejected"]
    if chosen == rejected:
        return [Problem(i, "chosen", 'identical to "rejected"',
                        "a preference pair needs two different completions; drop the row or regenerate one side")]
    if fmt.kind is Kind.IMPLICIT_PREFERENCE:
        if chosen[0] != rejected[0]:
            return [Problem(i, "chosen", 'shares no start with "rejected", so there is no prompt to extract',
                            'give both sides the same prompt, or store it in a "prompt" column (explicit format)')]
        if fmt.conversational:
            split = extract_prompt(row)
            role = split["chosen"][0]["role"]
            if role != "assistant":
                k = len(split["prompt"])
                return [Problem(i, "chosen", f'after the shared prompt the sides go on with a "{role}" message, so '
                                "the extracted completion would not start with the assistant's reply",
                                "make chosen and rejected share every turn up to the final assistant reply", k)]
    return []


def _check_stepwise(i: int, row: Mapping) -> list[Problem]:
    problems = []
    if isinstance(row["prompt"], list):
        problems.append(Problem(i, "prompt", "stepwise supervision has no conversational form in TRL",
                                "render the prompt as plain text first (to_standard applies the chat template)"))
    else:
        problems += _check_text(i, "prompt", row["prompt"])
    steps, labels = row["completions"], row["labels"]
    if not isinstance(steps, list) or not steps:
        problems.append(Problem(i, "completions", f"expected a non-empty list of steps, got {_type_name(steps)}",
                                "store the solution as a list of step strings"))
    else:
        for j, step in enumerate(steps):
            for p in _check_text(i, "completions", step):
                problems.append(Problem(i, "completions", f"step {j}: {p.what}", p.fix))
    if not isinstance(labels, list):
        problems.append(Problem(i, "labels", f"expected a list of bools, got {_type_name(labels)}",
                                "store one True/False per step"))
        return problems
    bad = [j for j, label in enumerate(labels) if not isinstance(label, bool)]
    if bad:
        problems.append(Problem(i, "labels", f"step labels must be bools; steps {bad} are not",
                                "use True (the step is correct) or False"))
    if isinstance(steps, list) and len(labels) != len(steps):
        problems.append(Problem(i, "labels", f"{len(labels)} labels for {len(steps)} completions (steps)",
                                "give exactly one label per step (True = the step is correct)"))
    return problems


def token_lengths(data: Any, tokenizer) -> list[dict[str, int]]:
    """Token counts per row: one entry per text column, and ``total``, the longest sequence a trainer builds.

    Conversational rows are rendered with the chat template first (``to_standard``). Columns are
    tokenized separately (so that prompt and completion can be told apart); TRL tokenizes prompt +
    completion as one text and appends EOS to standard completions that lack it, so its count can
    differ by a token or two. Stepwise steps are joined with "\\n". Rows must be valid.
    """
    rows = [to_standard(row, tokenizer) for row in as_rows(data)]
    keys = [[k for k in ("text", "prompt", "completion", "chosen", "rejected") if isinstance(r.get(k), str)]
            for r in rows]
    texts = [r[k] for r, ks in zip(rows, keys) for k in ks]
    for r in rows:
        if isinstance(r.get("completions"), list):
            texts.append("\n".join(r["completions"]))
    counts = iter([len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else [])
    out = [{k: next(counts) for k in ks} for ks in keys]
    for r, lengths in zip(rows, out):
        if isinstance(r.get("completions"), list):
            lengths["completions"] = next(counts)
    for lengths in out:
        prompt = lengths.get("prompt", 0)
        sides = [lengths[k] for k in ("text", "completion", "chosen", "rejected", "completions") if k in lengths]
        lengths["total"] = prompt + max(sides) if sides else prompt
    return out


def _check_lengths(rows: list, indices: list[int], tokenizer, max_length: int) -> list[Problem]:
    problems = []
    for i, lengths in zip(indices, token_lengths([rows[i] for i in indices], tokenizer)):
        prompt = lengths.get("prompt", 0)
        prompt_only = not any(k in lengths for k in ("completion", "chosen", "rejected", "completions"))
        for field in ("text", "prompt", "completion", "chosen", "rejected", "completions"):
            if field not in lengths or (field == "prompt" and not prompt_only):
                continue  # the prompt is counted with each completion, unless it is all there is
            n = lengths[field] + (prompt if field != "prompt" else 0)
            if n > max_length:
                name = "messages" if field == "text" and "messages" in rows[i] else field
                parts = f" (prompt {prompt} + {field} {lengths[field]})" if prompt and field != "prompt" else ""
                problems.append(Problem(i, name, f"{n} tokens{parts} > max_length {max_length}",
                                        "the trainer would truncate it and cut the end of the completion; filter "
                                        "out rows longer than max_length, shorten the prompt, or raise max_length"))
    return problems


def validate(data: Any, format: Format | None = None, tokenizer=None, max_length: int | None = None,
             max_problems: int = 20) -> Format:
    """Check a dataset (a list of dicts or a ``datasets.Dataset``) and return its format.

    ``format``: the format every row must have; by default the most common exact format among the rows
    (ties to the earliest row). ``tokenizer`` + ``max_length``: also flag rows longer than the limit.
    Raises one DatasetFormatError listing every problem (the message shows ``max_problems`` of them).
    """
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs a tokenizer to count tokens")
    rows = as_rows(data)
    if not rows:
        raise DatasetFormatError([Problem(None, None, "the dataset is empty", "give it at least one row")])
    exact: dict[int, Format] = {}
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            fmt, missing, extra = closest_format(present_fields(row), looks_conversational(row))
            if not missing and not extra:
                exact[i] = fmt
    expected = format
    if expected is None and exact:
        counts = Counter(exact.values())
        expected = max(counts, key=lambda f: (counts[f], -min(i for i in exact if exact[i] == f)))
    reference = next((i for i in exact if exact[i] == expected), None)  # the first row of that format

    problems, checked = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            problems.append(Problem(i, None, f"a row must be a dict of columns, got {_type_name(row)}",
                                    "build each row as a dict"))
            continue
        fmt = exact.get(i)
        if fmt is not None and expected is not None and fmt != expected:
            renamed = [p for p in column_problems(i, row, expected) if p.fix.startswith("rename")]
            if renamed:  # e.g. prompt + "output": prompt-only by its columns, but really a renamed completion
                problems += renamed
                continue
            like = f"row {reference} is" if format is None else "the format asked for is"
            problems.append(Problem(i, None, f"is {fmt} (columns {', '.join(fmt.fields)}) while {like} {expected} "
                                    f"(columns {', '.join(expected.fields)})",
                                    "every row of a dataset must have the same format: convert or drop this row, "
                                    "or split the dataset by format"))
        if fmt is None:
            fmt = expected or closest_format(present_fields(row), looks_conversational(row))[0]
            column = column_problems(i, row, fmt)
            problems += column
            if any(p.what.startswith("missing") for p in column):
                continue
        row_problems = _check_values(i, row, fmt)
        problems += row_problems
        if not row_problems:
            checked.append(i)
    if tokenizer is not None and max_length is not None:
        problems += _check_lengths(rows, checked, tokenizer, max_length)
    if problems:
        problems.sort(key=lambda p: -1 if p.row is None else p.row)
        raise DatasetFormatError(problems, n_rows=len(rows), max_shown=max_problems)
    return expected
