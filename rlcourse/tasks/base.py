"""The task interface: shipped JSONL data in TRL's formats, plus a gold reward with TRL's signature.

A task owns six files under ``data/<name>/``::

    sft_{train,eval}.jsonl      prompt-completion (conversational)
    pref_{train,eval}.jsonl     preference with explicit prompt, plus the gold score of each side
    prompts_{train,eval}.jsonl  prompt-only, plus whatever columns the reward reads

and one reward function ``reward(prompts, completions, **columns) -> list[float]``, the signature
TRL's ``reward_funcs`` take. The reward is *gold*: a programmatic metric used for evaluation (and as
the reward itself only where a method is online RL with verifiable rewards).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlcourse.paths import DATA

SPLITS = ("train", "eval")

KIND_COLUMNS = {
    "sft": ("prompt", "completion"),
    "pref": ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
    "prompts": ("prompt",),
}
"""Columns every row of a file kind must have (``prompts`` files add the task's ``prompt_columns``)."""

MESSAGE_ROLES = {"prompt": "user", "completion": "assistant", "chosen": "assistant", "rejected": "assistant"}
"""Role of the last message in each conversational column."""


def message_text(item) -> str:
    """The text of a prompt or completion given as a string or as a list of chat messages.

    TRL passes conversational completions as ``[{"role": "assistant", "content": ...}]`` and prompts
    as the dataset's message list. For a list we return the content of its last message: the user's
    request for a prompt (a system message before it is skipped), the answer for a completion.
    """
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return str(item.get("content", ""))
    if isinstance(item, (list, tuple)):
        return message_text(item[-1]) if item else ""
    raise TypeError(f"expected a string or a list of chat messages, got {type(item).__name__}")


def user(text: str) -> list[dict]:
    """A one-message conversational prompt."""
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    """A one-message conversational completion."""
    return [{"role": "assistant", "content": text}]


def _check_messages(value, column: str, where: str) -> None:
    role = MESSAGE_ROLES[column]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: column {column!r} must be a non-empty list of messages, got {value!r:.80}")
    for message in value:
        if not isinstance(message, dict) or set(message) != {"role", "content"} or not isinstance(message["content"], str):
            raise ValueError(f"{where}: column {column!r} holds a malformed message {message!r:.80}")
    if value[-1]["role"] != role:
        raise ValueError(f"{where}: the last message of {column!r} must have role {role!r}, got {value[-1]['role']!r}")


def read_jsonl(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file, each checked to have ``columns`` (messages checked too); errors name file and line."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python scripts/make_data.py`")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                raise ValueError(f"{where}: empty line")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(f"{where}: missing column(s) {missing}; expected {list(columns)}")
            for column in columns:
                if column in MESSAGE_ROLES:
                    _check_messages(row[column], column, where)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows one JSON object per line, UTF-8, in a byte-stable way (same rows -> same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class Task:
    """A task: its data files and its gold reward."""

    name: str
    """Short identifier; also the folder under ``data/``."""
    description: str
    """One paragraph: what the model is asked to do and what the gold reward measures."""
    reward: Callable[..., list[float]]
    """Gold reward, TRL's ``reward_funcs`` signature; its ``__name__`` is what TRL logs (rewards/<name>)."""
    prompt_columns: tuple[str, ...] = ()
    """Extra columns of the prompts files that the reward reads (passed to it as keyword arguments)."""
    data_dir: Path | None = None
    """Where the JSONL files live; None means ``rlcourse.paths.DATA / name``."""
    system: str | None = None
    """A system message put before every prompt (the "prompt" column of every file kind); None: none, so the chat
    template adds its default. SmolLM2's default ("You are a helpful AI assistant named SmolLM, trained by Hugging
    Face") is 16 of an arithmetic prompt's 47 tokens; ``system=""`` leaves the template's 5 markup tokens."""

    def path(self, kind: str, split: str) -> Path:
        """The file of a kind ("sft", "pref", "prompts") and split ("train", "eval")."""
        if kind not in KIND_COLUMNS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {list(KIND_COLUMNS)}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        return (self.data_dir or DATA / self.name) / f"{kind}_{split}.jsonl"

    def rows(self, kind: str, split: str) -> list[dict]:
        """The checked rows of one file, as plain dicts."""
        columns = KIND_COLUMNS[kind] + (self.prompt_columns if kind == "prompts" else ())
        rows = read_jsonl(self.path(kind, split), columns)
        if self.system is not None:
            rows = [row | {"prompt": [{"role": "system", "content": self.system}] + row["prompt"]} for row in rows]
        return rows

    def _dataset(self, kind: str, split: str):
        from datasets import Dataset

        return Dataset.from_list(self.rows(kind, split))

    def sft(self, split: str):
        """Conversational prompt-completion dataset: "prompt" (user turn), "completion" (assistant turn)."""
        return self._dataset("sft", split)

    def preferences(self, split: str):
        """Conversational preference dataset with explicit prompt: "prompt", "chosen", "rejected",
        plus the gold scores "score_chosen" and "score_rejected"."""
        return self._dataset("pref", split)

    def prompts(self, split: str):
        """Prompt-only dataset: "prompt" (conversational) plus the reward's columns (``prompt_columns``)."""
        return self._dataset("prompts", split)
