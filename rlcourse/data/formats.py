"""TRL's dataset formats as data: the seven kinds, standard vs conversational, and detection.

A TRL dataset has a *kind* (which columns it has, i.e. what a trainer can learn from it) and a
*format* (standard: the columns hold plain strings; conversational: they hold lists of
``{"role", "content"}`` messages). The kinds, with their columns:

=====================  ==========================================  ==============================
kind                   columns                                     trainers (TRL 1.16)
=====================  ==========================================  ==============================
language modelling     ``text`` (standard) / ``messages`` (conv.)  SFT, GKD (``messages``)
prompt-only            ``prompt``                                  GRPO, RLOO, Online DPO
prompt-completion      ``prompt``, ``completion``                  SFT
preference (explicit)  ``prompt``, ``chosen``, ``rejected``        DPO, reward model, CPO, ORPO
preference (implicit)  ``chosen``, ``rejected``                    the same, after extract_prompt
unpaired preference    ``prompt``, ``completion``, ``label``       KTO
stepwise supervision   ``prompt``, ``completions``, ``labels``     (PRM; trainer not in TRL 1.16)
=====================  ==========================================  ==============================

Departures from TRL's ``is_conversational``: TRL looks at one arbitrary column of the example
(``set.pop()`` order); we look at the text columns in a fixed order, so a malformed row that mixes
plain text and messages is classified the same way on every run (``validate`` then reports the mix).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

ROLES = ("system", "user", "assistant", "tool")
"""The message roles TRL's formats use."""

TEXT_FIELDS = ("messages", "text", "prompt", "completion", "chosen", "rejected")
"""Columns that hold text: a string in standard rows, a list of messages in conversational rows."""

ALL_FIELDS = ("text", "messages", "prompt", "completion", "chosen", "rejected", "label", "completions", "labels")
"""Every column name that carries meaning in some TRL format; other columns are passed through."""


class Kind(str, Enum):
    """What a dataset's rows contain, independent of standard vs conversational."""

    LANGUAGE_MODELING = "language modelling"
    PROMPT_ONLY = "prompt-only"
    PROMPT_COMPLETION = "prompt-completion"
    PREFERENCE = "preference (explicit prompt)"
    IMPLICIT_PREFERENCE = "preference (implicit prompt)"
    UNPAIRED_PREFERENCE = "unpaired preference"
    STEPWISE_SUPERVISION = "stepwise supervision"

    def __str__(self) -> str:
        return self.value


_FIELDS = {
    Kind.LANGUAGE_MODELING: ("text",),
    Kind.PROMPT_ONLY: ("prompt",),
    Kind.PROMPT_COMPLETION: ("prompt", "completion"),
    Kind.PREFERENCE: ("prompt", "chosen", "rejected"),
    Kind.IMPLICIT_PREFERENCE: ("chosen", "rejected"),
    Kind.UNPAIRED_PREFERENCE: ("prompt", "completion", "label"),
    Kind.STEPWISE_SUPERVISION: ("prompt", "completions", "labels"),
}


@dataclass(frozen=True)
class Format:
    """The format of a row or a dataset: its kind and whether its text columns are conversational."""

    kind: Kind
    """Which columns the rows have (see the table in the module docstring)."""
    conversational: bool
    """True when the text columns are lists of {"role", "content"} messages, False for plain strings."""

    @property
    def fields(self) -> tuple[str, ...]:
        """The columns a row of this format must have, in TRL's order."""
        if self.kind is Kind.LANGUAGE_MODELING:
            return ("messages",) if self.conversational else ("text",)
        return _FIELDS[self.kind]

    def __str__(self) -> str:
        return f"{'conversational' if self.conversational else 'standard'} {self.kind.value}"


ALL_FORMATS = tuple(
    Format(kind, conversational)
    for kind in Kind
    for conversational in (False, True)
    if not (kind is Kind.STEPWISE_SUPERVISION and conversational)  # TRL has no conversational stepwise data
)
"""Every format TRL defines: 7 kinds × {standard, conversational}, less conversational stepwise supervision."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, located precisely enough to fix it."""

    row: int | None
    """Index of the offending row; None for a problem with the whole dataset."""
    field: str | None
    """The column at fault; None when the problem is with the row as a whole."""
    what: str
    """What is wrong, with the offending value where it helps."""
    fix: str
    """How to fix it."""
    message: int | None = None
    """Index of the offending message inside a conversational field, if any."""

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f'field "{self.field}"' + (f" (message {self.message})" if self.message is not None else ""))
        return f"{', '.join(where) or 'dataset'}: {self.what} — {self.fix}"


class DatasetFormatError(ValueError):
    """Every problem found in a dataset, raised once so that all of them can be fixed in one go."""

    def __init__(self, problems: list[Problem], n_rows: int | None = None, max_shown: int = 20):
        self.problems = list(problems)
        """All problems found (the message shows the first ``max_shown``)."""
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''}" + (f" in {n_rows} rows" if n_rows is not None else "")
        lines = [f"{head}:"] + [f"  {p}" for p in self.problems[:max_shown]]
        if n > max_shown:
            lines.append(f"  ... and {n - max_shown} more ({n} in total; see .problems)")
        super().__init__("\n".join(lines))


def present_fields(example: Mapping[str, Any]) -> set[str]:
    """The format columns an example really has: a column holding None counts as absent.

    (``datasets.Dataset`` fills columns a row lacks with None, so absent and None must mean the same.)
    """
    return {k for k in ALL_FIELDS if example.get(k) is not None}


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], Mapping) and "role" in value[0]


def is_conversational(example: Mapping[str, Any]) -> bool:
    """True if the example's first text column (in the order of ``TEXT_FIELDS``) is a list of messages.

    Same answer as ``trl.is_conversational`` on well-formed examples (see the module docstring).
    """
    for key in TEXT_FIELDS:
        if example.get(key) is not None:
            return _is_messages(example[key])
    return False


def looks_conversational(example: Mapping[str, Any]) -> bool:
    """Like ``is_conversational`` but lenient: the first text column is a list (of anything).

    Used for detection, so that a row of messages with a broken first message (no ``role``, ShareGPT's
    ``from``/``value``) is still treated as conversational and its messages are checked one by one.
    """
    for key in TEXT_FIELDS:
        if example.get(key) is not None:
            return isinstance(example[key], list)
    return False


def closest_format(fields: set[str], conversational: bool = False) -> tuple[Format, set[str], set[str]]:
    """The format whose columns differ least from ``fields``: (format, missing columns, extra columns).

    ``conversational`` sets the flag of the candidates (language modelling takes it from its column
    name, ``text`` or ``messages``; stepwise supervision is always standard). Ties go to the format that
    explains the row by missing columns rather than extra ones, then to the earlier kind.
    """
    best = None
    for kind in Kind:
        if kind is Kind.LANGUAGE_MODELING:
            candidates = [Format(kind, False), Format(kind, True)]
        else:
            candidates = [Format(kind, conversational and kind is not Kind.STEPWISE_SUPERVISION)]
        for fmt in candidates:
            wanted = set(fmt.fields)
            missing, extra = wanted - fields, fields - wanted
            cost = (len(missing) + len(extra), len(extra))  # on a tie, a missing column is the likelier mistake
            if best is None or cost < best[0]:
                best = (cost, fmt, missing, extra)
    return best[1], best[2], best[3]


_ALIASES = {
    "instruction": "prompt", "question": "prompt", "query": "prompt", "input": "prompt", "context": "prompt",
    "response": "completion", "output": "completion", "answer": "completion", "target": "completion",
    "conversations": "messages", "conversation": "messages", "chat": "messages", "dialog": "messages",
    "content": "text", "preferred": "chosen", "accepted": "chosen", "dispreferred": "rejected",
    "steps": "completions", "step_labels": "labels", "kto_label": "label",
}


_SUFFIXES = ("", "s", "_response", "_text", "_completion", "_answer", "_messages", "_conversation")
"""``chosen_response`` is probably ``chosen``; ``score_chosen`` is not."""


def _renamable(missing: str, others: list[str]) -> str | None:
    """A column of the row that is probably ``missing`` under another name (an alias or a typo)."""
    for other in others:
        low = other.lower()
        if _ALIASES.get(low) == missing or low in {missing + suffix for suffix in _SUFFIXES}:
            return other
    close = difflib.get_close_matches(missing, others, n=1, cutoff=0.75)
    return close[0] if close else None


def column_problems(row: int | None, example: Mapping[str, Any], fmt: Format) -> list[Problem]:
    """Missing and extra columns of ``example`` for the format ``fmt``, each with a fix.

    A missing column that another column of the row probably stands for (``output`` for
    ``completion``, ``promt`` for ``prompt``) gets "rename it" as its fix.
    """
    fields = present_fields(example)
    wanted = set(fmt.fields)
    others = [k for k in example if k not in ALL_FIELDS and example[k] is not None]
    problems = []
    for f in [f for f in fmt.fields if f not in fields]:
        what = f"missing{' (the value is None)' if f in example else ''}; a {fmt} row has {', '.join(fmt.fields)}"
        other = _renamable(f, others)
        if other is not None:
            fix = f'rename the column "{other}" to "{f}"'
            if other.lower() == "conversations":
                fix += " (trl.maybe_convert_to_chatml also renames ShareGPT's from/value keys to role/content)"
        else:
            fix = f'add a "{f}" column, or choose a format without it'
        problems.append(Problem(row, f, what, fix))
    for f in sorted(fields - wanted):
        problems.append(Problem(row, f, f"not a column of a {fmt} row ({', '.join(fmt.fields)})",
                                "drop the column, or choose the format it belongs to"))
    return problems


def detect_format(example: Mapping[str, Any]) -> Format:
    """The format of one example, from its columns (kind) and the type of its text columns (conversational).

    Raises DatasetFormatError when the columns match no format, naming the nearest one and what differs.
    Columns outside ``ALL_FIELDS`` (ids, scores, ...) are ignored, as TRL's trainers ignore them.
    """
    if not isinstance(example, Mapping):
        raise DatasetFormatError([Problem(None, None, f"an example must be a dict, got {type(example).__name__}",
                                          "build each row as a dict of columns")])
    fmt, missing, extra = closest_format(present_fields(example), looks_conversational(example))
    if missing or extra:
        raise DatasetFormatError(column_problems(None, example, fmt))
    return fmt
