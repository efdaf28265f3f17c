"""Gold evaluation: generate on held-out prompts and score with the task's programmatic metric.

The gold metric is never what an offline method trains on, so it tells whether the method really
worked. "Before" is the base model: the policy with its adapters disabled. Uncertainty comes from the
finite set of prompts: we report a 95% bootstrap interval of the mean, and for before/after the paired
bootstrap interval of the improvement (the same prompts are scored twice, so the pairing removes
prompt-difficulty noise). Decoding is greedy by default so a re-run gives the same numbers.
"""

from __future__ import annotations

import contextlib
import textwrap
from dataclasses import dataclass, field

import numpy as np

from rlcourse.models import base_policy
from rlcourse.sampling import SamplingSettings, generate

GREEDY = SamplingSettings(max_new_tokens=48, do_sample=False)


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class GoldResult:
    """Gold rewards of one model on the held-out prompts."""

    scores: list[float]
    """Gold reward of each prompt's completion."""
    completions: list[str]
    """The generated completions, in prompt order."""
    prompts: list = field(repr=False, default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def ci(self) -> tuple[float, float]:
        return bootstrap_ci(self.scores)

    def __str__(self) -> str:
        lo, hi = self.ci
        return f"{self.mean:.3f} [95% CI {lo:.3f}, {hi:.3f}] on {len(self.scores)} prompts"


def gold_eval(model, tokenizer, task, prompts, settings: SamplingSettings = GREEDY, batch_size: int = 16,
              base: bool = False, seed: int = 0, samples: int = 1) -> GoldResult:
    """Generate for every row of ``prompts`` (a prompt-only dataset) and score with ``task.reward``.

    base=True evaluates the base model (adapters disabled) instead of the trained policy. ``samples`` > 1 (with a
    sampling ``settings``) draws that many completions per prompt; each prompt's score is then their mean, the
    policy's expected reward on it, so intervals and paired gains stay per prompt. ``completions`` keeps each
    prompt's first sample.
    """
    if samples < 1 or (samples > 1 and not settings.do_sample):
        raise ValueError(f"samples={samples}: use 1 for greedy decoding, or more with do_sample=True")
    rows = list(prompts)
    prompt_list = [r["prompt"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    with base_policy(model) if base else contextlib.nullcontext():
        completions = generate(model, tokenizer, prompt_list, settings, num_return_sequences=samples,
                               batch_size=batch_size, seed=seed)  # prompt by prompt: samples in a row
    repeated = {k: [v for v in values for _ in range(samples)] for k, values in columns.items()}
    scores = task.reward([p for p in prompt_list for _ in range(samples)], completions, **repeated)
    per_prompt = np.asarray(scores, dtype=float).reshape(len(rows), samples).mean(axis=1)
    return GoldResult([float(s) for s in per_prompt], completions[::samples], prompt_list)


def improvement(before: GoldResult, after: GoldResult, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean paired gain (after − before) on the same prompts, with its 95% bootstrap interval."""
    diff = np.asarray(after.scores) - np.asarray(before.scores)
    return float(diff.mean()), bootstrap_ci(diff, seed=seed)


def report(results: dict[str, GoldResult], baseline: str = "base") -> dict:
    """Print each model's gold mean and its paired gain over ``baseline``; return them as a dict (for JSON)."""
    out = {}
    for name, res in results.items():
        line = f"{name:>8}: gold {res}"
        entry = {"mean": res.mean, "ci": res.ci, "n": len(res.scores)}
        if name != baseline and baseline in results:
            gain, (lo, hi) = improvement(results[baseline], res)
            verdict = "better than" if lo > 0 else ("worse than" if hi < 0 else "not distinguishable from")
            line += f"  | gain {gain:+.3f} [{lo:+.3f}, {hi:+.3f}]: {verdict} {baseline}"
            entry.update(gain=gain, gain_ci=(lo, hi))
        print(line)
        out[name] = entry
    return out


def show_samples(results: dict[str, GoldResult], k: int = 3, width: int = 100) -> None:
    """Print the first ``k`` prompts with each model's completion and gold score."""
    first = next(iter(results.values()))
    for i in range(min(k, len(first.prompts))):
        prompt = first.prompts[i]
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        print(f"── prompt: {text}")
        for name, res in results.items():
            body = textwrap.shorten(res.completions[i].replace("\n", " "), width=width * 2, placeholder=" …")
            print(f"   {name:>6} [{res.scores[i]:.2f}] {body}")


def average_ranks(values) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing the mean of the ranks they span (so [5, 1, 5] -> [2.5, 1, 2.5])."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, group = np.unique(values, return_inverse=True)
    return (np.bincount(group, weights=ranks) / np.bincount(group))[group]


def spearman(x, y) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks of ``x`` and ``y``.

    In [-1, 1]; nan when either input is constant (its ranks carry no order).
    """
    rx, ry = average_ranks(x), average_ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def win_rate(before: GoldResult, after: GoldResult, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Paired gold win rate of ``after`` over ``before`` on the same prompts, with its 95% bootstrap interval.

    Prompt by prompt: 1 if ``after``'s gold score is higher, 0.5 for a tie, 0 if lower; the win rate is the mean.
    0.5 means no difference; "better than" needs the whole interval above 0.5.
    """
    if len(before.scores) != len(after.scores):
        raise ValueError(f"win_rate needs the same prompts on both sides: got {len(before.scores)} and "
                         f"{len(after.scores)} scores. Fix: evaluate both models on the same prompt rows.")
    a, b = np.asarray(after.scores), np.asarray(before.scores)
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    return float(outcome.mean()), bootstrap_ci(outcome, seed=seed)


def win_rates(results: dict[str, GoldResult], baseline: str = "base", seed: int = 0) -> dict[str, dict]:
    """``win_rate`` of every result over ``results[baseline]``, printed one line each with the verdict its interval
    allows; returns {name: {"win_rate": rate, "ci": (lo, hi)}}, for a notebook's results.json."""
    wins = {}
    width = max(len(name) for name in results)
    for name, result in results.items():
        if name == baseline:
            continue
        rate, (lo, hi) = win_rate(results[baseline], result, seed=seed)
        verdict = "beats" if lo > 0.5 else ("loses to" if hi < 0.5 else "is not distinguishable from")
        wins[name] = {"win_rate": rate, "ci": (lo, hi)}
        print(f"{name:>{width}}: win rate vs {baseline} {rate:.3f} [95% CI {lo:.3f}, {hi:.3f}]: {verdict} the {baseline}")
    return wins


def gain_over_runs(before: GoldResult, runs: list[GoldResult], n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """The paired gain over ``before`` of several training runs that differ only in their seeds, averaged.

    The interval is a two-level bootstrap: resample the runs, then the prompts within each run. It holds both the
    run-to-run noise of training (sampling, data order) and the choice of held-out prompts, so a lower end above 0
    is a gain beyond run-to-run noise. With a handful of runs, it is an estimate of that noise, not a bound.
    """
    if not runs:
        raise ValueError("gain_over_runs needs at least one run. Fix: pass the GoldResult of each seed's run.")
    n = len(before.scores)
    for i, run in enumerate(runs):
        if len(run.scores) != n:
            raise ValueError(f"run {i} has {len(run.scores)} gold scores, the baseline {n}. Fix: evaluate every "
                             "run on the same prompt rows as the baseline.")
    diffs = np.stack([np.asarray(r.scores, dtype=float) for r in runs]) - np.asarray(before.scores, dtype=float)
    rng = np.random.default_rng(seed)
    n_runs = len(runs)
    pick_runs = rng.integers(0, n_runs, size=(n_boot, n_runs, 1))
    pick_prompts = rng.integers(0, n, size=(n_boot, n_runs, n))
    means = diffs[pick_runs, pick_prompts].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    gains = diffs.mean(axis=1)
    return {"gains": [float(g) for g in gains], "mean": float(gains.mean()),
            "sd": float(gains.std(ddof=1)) if n_runs > 1 else 0.0, "ci": (float(lo), float(hi)), "runs": n_runs}


def report_runs(before: GoldResult, runs: dict[str, list[GoldResult]], baseline: str = "base") -> dict:
    """Print, for each name, the gain of every seed's run and their mean with ``gain_over_runs``' interval."""
    out = {}
    for name, results in runs.items():
        s = gain_over_runs(before, results)
        lo, hi = s["ci"]
        verdict = ("beyond run-to-run noise" if lo > 0 else "below" if hi < 0 else "not beyond run-to-run noise")
        print(f"{name:>8}: gain per run {', '.join(f'{g:+.3f}' for g in s['gains'])} | mean {s['mean']:+.3f} "
              f"± {s['sd']:.3f} (sd over {s['runs']} runs) [{lo:+.3f}, {hi:+.3f}] over {baseline}: {verdict}")
        out[name] = s
    return out
