"""Exercises for lesson 02 (dataset formats): write a function, and a ``check_...`` compares it with the
package's on random valid examples of every format.

The engine here is the dict/list sibling of ``_check.compare`` (which compares tensors): it reports the
first input where the two functions disagree, the path to the first differing value, and both values.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any, Callable

from rlcourse.data import ALL_FORMATS, Format, Kind, detect_format, extract_prompt, random_example, unpair


def _show(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def _first_difference(got: Any, expected: Any, path: str = "") -> str | None:
    """Where two nested dict/list values first differ, e.g. ``[3]["label"]: got 1, expected True``."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(got) != set(expected):
            return (f"{path or 'the result'} has keys {sorted(got)}, expected {sorted(expected)}")
        for key in expected:
            found = _first_difference(got[key], expected[key], f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(expected, list) and isinstance(got, list):
        if len(got) != len(expected):
            return f"{path or 'the result'} has {len(got)} items, expected {len(expected)}"
        for k, (g, e) in enumerate(zip(got, expected)):
            found = _first_difference(g, e, f"{path}[{k}]")
            if found:
                return found
        return None
    if type(got) is not type(expected) or got != expected:
        return f"{path or 'the result'}: got {got!r} ({type(got).__name__}), expected {expected!r}"
    return None


def compare_data(
    name: str,
    learner_fn: Callable,
    reference_fn: Callable,
    make_input: Callable[[random.Random], Any],
    trials: int = 50,
    normalise: Callable[[Any], Any] = lambda x: x,
    note: str = "",
) -> None:
    """Call both functions on ``trials`` random inputs; raise AssertionError at the first mismatch.

    ``make_input(rng)`` returns the one argument both functions take (each gets its own deep copy, so a
    function that modifies its input cannot affect the other). ``normalise`` is applied to both results
    before comparing (e.g. to ignore row order); ``note`` is added to a mismatch message to say how.
    """
    for trial in range(trials):
        value = make_input(random.Random(trial))
        expected = normalise(reference_fn(copy.deepcopy(value)))
        try:
            got = learner_fn(copy.deepcopy(value))
        except NotImplementedError:
            raise AssertionError(f"{name}: not implemented yet - replace `raise NotImplementedError` with your code")
        except Exception as error:
            raise AssertionError(f"{name}: raised {type(error).__name__}: {error}\n"
                                 f"  on input {_show(value)}") from error
        difference = _first_difference(normalise(got), expected)
        if difference:
            raise AssertionError(f"{name}: {difference}{note}\n  on input {_show(value)}\n  expected {_show(expected)}")
    print(f"✓ {name}: matches the reference on {trials} random inputs")


def check_detect_format(learner_fn: Callable[[dict], Any], trials: int = 60) -> None:
    """``learner_fn(example)`` must return the example's format: a ``Format`` or a ``(Kind, conversational)`` pair.

    Inputs: random valid examples of all 13 formats (7 kinds, standard and conversational, less
    conversational stepwise supervision).
    """
    def as_pair(result):
        if isinstance(result, Format):
            return [result.kind.value, result.conversational]
        if isinstance(result, (tuple, list)) and len(result) == 2:
            kind = result[0].value if isinstance(result[0], Kind) else result[0]
            return [kind, bool(result[1])]
        return result

    compare_data("detect_format", learner_fn, detect_format,
                 lambda rng: random_example(rng.choice(ALL_FORMATS), rng), trials, normalise=as_pair)


def check_unpair(learner_fn: Callable[[list[dict]], list[dict]], trials: int = 30) -> None:
    """``learner_fn(rows)`` must turn explicit-prompt preference rows into unpaired rows
    (prompt, completion, label: True for chosen, False for rejected). Row order is not checked.
    """
    def make_rows(rng):
        fmt = Format(Kind.PREFERENCE, rng.random() < 0.5)
        return [random_example(fmt, rng) for _ in range(rng.randint(1, 5))]

    def sorted_rows(rows):
        if not isinstance(rows, list):
            return rows
        return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))

    compare_data("unpair", learner_fn, unpair, make_rows, trials, normalise=sorted_rows,
                 note=" (row indices are after sorting both results, since row order is not checked)")


def check_extract_prompt(learner_fn: Callable[[dict], dict], trials: int = 60) -> None:
    """``learner_fn(example)`` must split an implicit-prompt preference example into prompt, chosen and
    rejected as TRL's ``extract_prompt`` does (standard strings split per character, a space just before
    the split going to the completions; conversations split per message).
    """
    compare_data("extract_prompt", learner_fn, extract_prompt,
                 lambda rng: random_example(Format(Kind.IMPLICIT_PREFERENCE, rng.random() < 0.5), rng), trials)
