"""The ``arithmetic`` task: small integer sums, differences and products with an exact checker.

"What is 7 + 5? Reply with the number only." The gold reward is 1 if the completion's *last* number
equals the answer, else 0 (see :func:`parse_answer`). Why the last and not the first: the base model
almost always restates the question before answering ("7 + 5 = 12"), so a first-number rule scored
it 0–10% on every phrasing we tried; the last number is its answer. Learning to reply with the number
only is then the format the SFT data teaches, and a separate format reward can ask for it.

Operand ranges (OPERANDS) were chosen by measuring the base 4-bit model; see data/README.md.
Problems are split by their unordered operand pair, so "3 + 5" in eval means "5 + 3" is not in train.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlcourse.tasks.base import Task, message_text

TEMPLATE = "What is {a} {op} {b}? Reply with the number only."
"""The only phrasing; the operator is written as + - *."""

OPERANDS = {"+": (1, 20), "-": (1, 20), "*": (2, 12)}
"""Inclusive operand range per operation; subtraction keeps a >= b so answers are never negative."""

N_EVAL = 100
"""Held-out problems."""

NUMBER = re.compile(r"(?<!\d)-?\d+(?:\.\d+)?")
"""An optionally signed integer or decimal; a "-" right after a digit is an operator, not a sign."""

PROBLEM = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)")
"""The first "a op b" in a prompt, to recover the answer when no ``answer`` column is given."""


@dataclass(frozen=True)
class Problem:
    """One arithmetic question."""

    a: int
    """Left operand."""
    op: str
    """"+", "-" or "*"."""
    b: int
    """Right operand."""

    @property
    def answer(self) -> int:
        return apply(self.a, self.op, self.b)

    @property
    def text(self) -> str:
        return TEMPLATE.format(a=self.a, op=self.op, b=self.b)


def apply(a: int, op: str, b: int) -> int:
    """a op b for op in + - *."""
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def all_problems() -> list[Problem]:
    """Every problem in OPERANDS' ranges, in a fixed order (731 of them)."""
    problems = []
    for op, (lo, hi) in OPERANDS.items():
        for a in range(lo, hi + 1):
            for b in range(lo, hi + 1):
                if op == "-" and b > a:
                    continue
                problems.append(Problem(a, op, b))
    return problems


def split_problems(seed: int = 0) -> dict[str, list[Problem]]:
    """Shuffled train and eval problems; both orders of a commutative pair land in the same split."""
    rng = random.Random(seed)

    def key(p: Problem):
        return (p.op, min(p.a, p.b), max(p.a, p.b)) if p.op in "+*" else (p.op, p.a, p.b)

    problems = all_problems()
    keys = sorted({key(p) for p in problems})
    rng.shuffle(keys)
    eval_keys, n = set(), 0
    for k in keys:  # take whole keys until N_EVAL problems are held out
        if n >= N_EVAL:
            break
        eval_keys.add(k)
        n += sum(1 for p in problems if key(p) == k)
    rng.shuffle(problems)
    return {
        "train": [p for p in problems if key(p) not in eval_keys],
        "eval": [p for p in problems if key(p) in eval_keys][:N_EVAL],
    }


def parse_answer(text: str) -> float | None:
    """The last number in ``text``, or None if it has none.

    Parsed: optionally signed integers and decimals ("12", "-3", "12.0"); a minus sign directly after a
    digit is read as an operator ("7-5" gives 5). Not parsed: thousands separators ("1,200" gives 200),
    number words ("twelve"). The answers of this task are below 1000, so neither arises for a right answer.
    """
    numbers = NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def is_correct(completion: str, answer: int) -> bool:
    """Whether the last number of ``completion`` equals ``answer`` exactly ("12.0" counts as 12)."""
    parsed = parse_answer(completion)
    return parsed is not None and parsed == answer


def answer_from_prompt(prompt: str) -> int:
    """The answer to a prompt of this task, computed from its first "a op b"."""
    match = PROBLEM.search(prompt)
    if match is None:
        raise ValueError(f"no 'a op b' expression in the prompt {prompt!r:.80}")
    return apply(int(match.group(1)), match.group(2), int(match.group(3)))


def arithmetic_gold(prompts, completions, answer=None, **columns) -> list[float]:
    """TRL reward function: 1.0 if a completion's last number equals the answer, else 0.0.

    ``answer`` is the dataset column TRL passes (one int per completion); without it the answer is
    computed from the prompt text. Prompts/completions may be strings or chat message lists. Other
    keyword arguments (``completion_ids``, ``trainer_state``, ...) are ignored.
    """
    if answer is None:
        answer = [answer_from_prompt(message_text(p)) for p in prompts]
    return [
        1.0 if is_correct(message_text(c), int(a)) else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]


TASK = Task(
    name="arithmetic",
    description=(
        "Compute a + b, a - b (a >= b) with operands 1-20, or a * b with operands 2-12, replying with the "
        "number. Gold reward: 1 if the last number in the completion equals the answer, else 0."
    ),
    reward=arithmetic_gold,
    prompt_columns=("answer",),
)
