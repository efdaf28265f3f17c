"""Example data for lesson 02: one example of every TRL format, random valid examples (for the
exercise checkers), and a gallery of malformed datasets that the validator must catch."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

from .formats import ALL_FORMATS, Format, Kind

_Q = "At what temperature does water boil at sea level?"
_USER = [{"role": "user", "content": _Q}]
_GOOD = [{"role": "assistant", "content": "At 100 °C."}]
_BAD = [{"role": "assistant", "content": "At 50 °C."}]

EXAMPLES: dict[Format, dict] = {
    Format(Kind.LANGUAGE_MODELING, False): {"text": "Water boils at 100 °C at sea level."},
    Format(Kind.LANGUAGE_MODELING, True): {"messages": _USER + _GOOD},
    Format(Kind.PROMPT_ONLY, False): {"prompt": "Water boils at"},
    Format(Kind.PROMPT_ONLY, True): {"prompt": _USER},
    Format(Kind.PROMPT_COMPLETION, False): {"prompt": "Water boils at", "completion": " 100 °C."},
    Format(Kind.PROMPT_COMPLETION, True): {"prompt": _USER, "completion": _GOOD},
    Format(Kind.PREFERENCE, False): {"prompt": "Water boils at", "chosen": " 100 °C.", "rejected": " 50 °C."},
    Format(Kind.PREFERENCE, True): {"prompt": _USER, "chosen": _GOOD, "rejected": _BAD},
    Format(Kind.IMPLICIT_PREFERENCE, False): {"chosen": "Water boils at 100 °C.", "rejected": "Water boils at 50 °C."},
    Format(Kind.IMPLICIT_PREFERENCE, True): {"chosen": _USER + _GOOD, "rejected": _USER + _BAD},
    Format(Kind.UNPAIRED_PREFERENCE, False): {"prompt": "Water boils at", "completion": " 50 °C.", "label": False},
    Format(Kind.UNPAIRED_PREFERENCE, True): {"prompt": _USER, "completion": _BAD, "label": False},
    Format(Kind.STEPWISE_SUPERVISION, False): {
        "prompt": "What is 12 × 3 + 4?",
        "completions": ["12 × 3 = 36.", "36 + 4 = 41."],
        "labels": [True, False],
    },
}
"""One hand-written example of each format in ``ALL_FORMATS``."""
assert set(EXAMPLES) == set(ALL_FORMATS)

# Words that share first letters, so that random pairs often share a prefix inside a word
# (the case where extract_prompt's per-character split shows).
_WORDS = ("blue", "black", "brown", "green", "grey", "red", "rose", "sky", "sea", "sun", "is", "the", "a", "very")


def _sentence(rng: random.Random, n_min: int = 1, n_max: int = 5) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(n_min, n_max)))


def _prompt_messages(rng: random.Random) -> list[dict]:
    messages = [{"role": "system", "content": _sentence(rng)}] if rng.random() < 0.3 else []
    if rng.random() < 0.3:  # an earlier exchange
        messages += [{"role": "user", "content": _sentence(rng)}, {"role": "assistant", "content": _sentence(rng)}]
    return messages + [{"role": "user", "content": _sentence(rng)}]


def random_example(fmt: Format, rng: random.Random) -> dict:
    """A random valid example of ``fmt`` (short sentences from a tiny vocabulary)."""
    conv = fmt.conversational
    reply = (lambda: [{"role": "assistant", "content": _sentence(rng)}]) if conv else (lambda: " " + _sentence(rng))
    prompt = _prompt_messages(rng) if conv else _sentence(rng)
    kind = fmt.kind
    if kind is Kind.LANGUAGE_MODELING:
        return {"messages": prompt + reply()} if conv else {"text": prompt + reply()}
    if kind is Kind.PROMPT_ONLY:
        return {"prompt": prompt}
    if kind is Kind.PROMPT_COMPLETION:
        return {"prompt": prompt, "completion": reply()}
    if kind is Kind.UNPAIRED_PREFERENCE:
        return {"prompt": prompt, "completion": reply(), "label": rng.random() < 0.5}
    if kind is Kind.STEPWISE_SUPERVISION:
        n = rng.randint(1, 4)
        return {"prompt": prompt, "completions": [_sentence(rng) for _ in range(n)],
                "labels": [rng.random() < 0.5 for _ in range(n)]}
    chosen, rejected = reply(), reply()
    while rejected == chosen:
        rejected = reply()
    if kind is Kind.PREFERENCE:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}  # implicit prompt


@dataclass(frozen=True)
class Malformed:
    """A small dataset with one known problem, and where the validator must point."""

    case: str
    """What is wrong, in a few words."""
    rows: list[dict]
    """The dataset: valid rows and one broken row."""
    row: int | None
    """Index of the broken row (None for a problem with the whole dataset)."""
    field: str | None
    """The column the validator must name (None when it is the row as a whole)."""
    max_length: int | None = None
    """Token limit to validate with (the over-long case; needs a tokenizer)."""
    expected: str = field(default="")
    """A phrase the error message must contain (part of the fix)."""


def _pref(**changes) -> dict:
    return {**copy.deepcopy(EXAMPLES[Format(Kind.PREFERENCE, True)]), **changes}


def _pc(**changes) -> dict:
    return {**copy.deepcopy(EXAMPLES[Format(Kind.PROMPT_COMPLETION, True)]), **changes}


def _say(role: str, content: str = "Hello.") -> dict:
    return {"role": role, "content": content}


def malformed_gallery() -> list[Malformed]:
    """One small dataset per problem the validator catches; the broken row comes after valid ones."""
    std_pref = EXAMPLES[Format(Kind.PREFERENCE, False)]
    unpaired = EXAMPLES[Format(Kind.UNPAIRED_PREFERENCE, False)]
    stepwise = EXAMPLES[Format(Kind.STEPWISE_SUPERVISION, False)]
    return [
        Malformed("missing column", [_pref(), {"prompt": _USER, "chosen": _GOOD}], 1, "rejected",
                  expected='add a "rejected" column'),
        Malformed("column from another format", [_pc(), _pc(chosen=_GOOD)], 1, "chosen", expected="drop the column"),
        Malformed("renamed column", [_pc(), {"prompt": _USER, "output": _GOOD}], 1, "completion",
                  expected='rename the column "output" to "completion"'),
        Malformed("wrong type", [dict(std_pref), {**std_pref, "chosen": 100}], 1, "chosen",
                  expected="store the text as a string"),
        Malformed("empty text", [dict(std_pref), {**std_pref, "rejected": "  "}], 1, "rejected", expected="fill it in"),
        Malformed("chosen identical to rejected", [_pref(), _pref(), _pref(rejected=_GOOD)], 2, "chosen",
                  expected="drop the row or regenerate one side"),
        Malformed("unknown role", [_pc(), _pc(prompt=[_say("human", _Q)])], 1, "prompt",
                  expected='rename it to "user"'),
        Malformed("message without role", [_pc(), _pc(prompt=[{"content": _Q}])], 1, "prompt",
                  expected='add "role"'),
        Malformed("message without content", [_pc(), _pc(completion=[{"role": "assistant"}])], 1, "completion",
                  expected='add "content"'),
        Malformed("ShareGPT keys", [_pc(), _pc(prompt=[{"from": "human", "value": _Q}])], 1, "prompt",
                  expected="maybe_convert_to_chatml"),
        Malformed("completion not ending with the assistant",
                  [_pc(), _pc(completion=[_say("assistant"), _say("tool", "42")])], 1, "completion",
                  expected="end it with the assistant's reply"),
        Malformed("two user turns in a row", [_pc(), _pc(prompt=[_say("user"), _say("user", _Q)])], 1, "prompt",
                  expected="merge them into one user message"),
        Malformed("system message not first",
                  [_pc(), _pc(prompt=[_say("user", _Q), _say("system", "Be brief."), _say("user")])], 1, "prompt",
                  expected="move it to the front"),
        Malformed("prompt ending with a system message", [_pc(), _pc(prompt=[_say("system", "Be brief.")])], 1,
                  "prompt", expected="end it with the user turn"),
        Malformed("standard and conversational mixed in a row", [_pc(), _pc(completion="At 100 °C.")], 1,
                  "completion", expected='wrap it as [{"role": "assistant"'),
        Malformed("implicit prompt not shared",
                  [EXAMPLES[Format(Kind.IMPLICIT_PREFERENCE, False)], {"chosen": "Yes, 100 °C.", "rejected": "No."}],
                  1, "chosen", expected="give both sides the same prompt"),
        Malformed("label not a bool", [dict(unpaired), {**unpaired, "label": 1}], 1, "label",
                  expected="use True/False"),
        Malformed("stepwise labels do not match the steps",
                  [dict(stepwise), {**stepwise, "labels": [True, True, False]}], 1, "labels",
                  expected="one label per step"),
        Malformed("over-long example", [_pc(), _pc(completion=[_say("assistant", "It boils at 100 °C. " * 40)])], 1,
                  "completion", max_length=64, expected="filter out rows longer than max_length"),
        Malformed("mixed formats across rows", [dict(std_pref)] * 7 + [{"prompt": "Water boils at",
                                                                        "completion": " 100 °C."}],
                  7, None, expected="every row of a dataset must have the same format"),
    ]
