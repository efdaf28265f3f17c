"""Regenerate the task data under data/<task>/ from the base model, seeded, and measure the base model.

    python scripts/make_data.py --task all --seed 0          # write data/concise/ and data/arithmetic/
    python scripts/make_data.py --task arithmetic --baseline  # only measure base-model gold, write nothing

What it writes (format and columns: data/README.md):
- prompts_{train,eval}: every train prompt, and 100 held-out eval prompts (the task's own split).
- sft_{train,eval}: demonstrations. concise: the best-scoring of two base-model samples, each also cut
  to its leading whole sentences (one sample is drawn with a system prompt asking for one short
  sentence: context distillation); kept when its gold score is >= SFT_MIN_SCORE. arithmetic: the exact
  answer ("12").
- pref_{train,eval}: base-model samples ranked by the gold reward; chosen = best, rejected = worst,
  pairs with equal scores dropped. concise: the same two samples. arithmetic: two samples at
  temperature 1; a correct sample is chosen if there is one, else the exact answer.

The sampled model is ``rlcourse.models.load_model()`` (4-bit NF4, bf16 compute) on the CPU. Every
``generate`` call is seeded, so with the same library versions and hardware the files come out byte for
byte the same. Takes roughly 10-20 minutes on 2 CPU cores (more on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlcourse.models import load_model, load_tokenizer
from rlcourse.sampling import SamplingSettings, generate
from rlcourse.tasks import arithmetic, concise, get_task
from rlcourse.tasks.base import assistant, user, write_jsonl

BATCH_ROWS = 32
"""Sequences per generate() forward batch (prompts per batch = BATCH_ROWS // samples per prompt)."""

CONCISE_GEN = {"train": 256, "eval": 48}
"""Concise prompts per split that get sampled SFT and preference rows."""
CONCISE_N_EVAL_PROMPTS = 100
"""Concise eval prompts shipped in prompts_eval (the held-out split has 150)."""
CONCISE_SAMPLING = SamplingSettings(max_new_tokens=48, do_sample=True, temperature=0.9)
"""Sampling for the concise candidates."""
CONCISE_SYSTEM = "Answer in one short sentence."
"""System prompt for one of the two candidates: the base model's own short answers (context distillation)."""
SFT_MIN_SCORE = 0.9
"""A concise SFT demonstration must score at least this (gold)."""

ARITH_SFT_TRAIN = 320
"""Arithmetic train problems with an SFT row (the eval SFT file has all 100 eval problems)."""
ARITH_GEN = {"train": 256, "eval": 64}
"""Arithmetic problems per split that get sampled preference rows."""
ARITH_SAMPLING = SamplingSettings(max_new_tokens=32, do_sample=True, temperature=1.0)
"""Sampling for arithmetic preference candidates and the sampled baseline (on-policy temperature)."""

GREEDY_48 = SamplingSettings(max_new_tokens=48, do_sample=False)
GREEDY_32 = SamplingSettings(max_new_tokens=32, do_sample=False)


def sample(model, tokenizer, prompts, settings, n, seed):
    """n completions per prompt, grouped per prompt: out[i] is the list for prompts[i]."""
    flat = generate(model, tokenizer, prompts, settings, num_return_sequences=n,
                    batch_size=max(1, BATCH_ROWS // n), seed=seed)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def make_concise(model, tokenizer, seed: int) -> dict:
    task = get_task("concise")
    split = concise.split_prompts(seed)
    split["eval"] = split["eval"][:CONCISE_N_EVAL_PROMPTS]
    stats = {}
    for name in ("train", "eval"):
        write_jsonl(task.path("prompts", name), [{"prompt": user(p.text)} for p in split[name]])
        texts = [p.text for p in split[name][: CONCISE_GEN[name]]]
        with_system = [[{"role": "system", "content": CONCISE_SYSTEM}] + user(t) for t in texts]
        short = sample(model, tokenizer, with_system, CONCISE_SAMPLING, 1, seed + 1)
        plain = sample(model, tokenizer, [user(t) for t in texts], CONCISE_SAMPLING, 1, seed + 2)
        sft_rows, pref_rows, from_system = [], [], 0
        for text, candidates in zip(texts, (s + p for s, p in zip(short, plain))):  # system-prompted first
            scores = [concise.score_answer(text, c).value for c in candidates]
            # SFT: raw candidates first so a naturally short answer wins ties over a trimmed ramble
            trimmed = candidates + [concise.leading_sentences(c) for c in candidates]
            trimmed_scores = scores + [concise.score_answer(text, c).value for c in trimmed[len(candidates):]]
            best = max(range(len(trimmed)), key=lambda i: (trimmed_scores[i], -i))
            if trimmed_scores[best] >= SFT_MIN_SCORE:
                sft_rows.append({"prompt": user(text), "completion": assistant(trimmed[best])})
            hi = max(range(len(scores)), key=lambda i: (scores[i], -i))
            lo = min(range(len(scores)), key=lambda i: (scores[i], i))
            if scores[hi] > scores[lo]:
                from_system += hi == 0
                pref_rows.append({
                    "prompt": user(text), "chosen": assistant(candidates[hi]), "rejected": assistant(candidates[lo]),
                    "score_chosen": round(scores[hi], 4), "score_rejected": round(scores[lo], 4),
                })
        write_jsonl(task.path("sft", name), sft_rows)
        write_jsonl(task.path("pref", name), pref_rows)
        stats[name] = {
            "prompts": len(split[name]), "sampled_prompts": len(texts), "sft_rows": len(sft_rows),
            "pref_rows": len(pref_rows),
            "mean_score_chosen": round(statistics.mean(r["score_chosen"] for r in pref_rows), 3),
            "mean_score_rejected": round(statistics.mean(r["score_rejected"] for r in pref_rows), 3),
            "pref_chosen_from_system_prompt": from_system,
        }
    return stats


def make_arithmetic(model, tokenizer, seed: int) -> dict:
    task = get_task("arithmetic")
    split = arithmetic.split_problems(seed)
    stats = {}
    for name in ("train", "eval"):
        problems = split[name]
        write_jsonl(task.path("prompts", name), [{"prompt": user(p.text), "answer": p.answer} for p in problems])
        sft = problems[:ARITH_SFT_TRAIN] if name == "train" else problems
        write_jsonl(task.path("sft", name), [{"prompt": user(p.text), "completion": assistant(str(p.answer))} for p in sft])
        gen = problems[: ARITH_GEN[name]]
        samples = sample(model, tokenizer, [user(p.text) for p in gen], ARITH_SAMPLING, 2, seed + 3)
        rows, gold_chosen = [], 0
        for p, candidates in zip(gen, samples):
            right = [c for c in candidates if arithmetic.is_correct(c, p.answer)]
            wrong = [c for c in candidates if not arithmetic.is_correct(c, p.answer)]
            if not wrong:
                continue  # both samples correct: no pair
            gold_chosen += not right
            rows.append({
                "prompt": user(p.text), "chosen": assistant(right[0] if right else str(p.answer)),
                "rejected": assistant(wrong[0]), "score_chosen": 1.0, "score_rejected": 0.0,
            })
        write_jsonl(task.path("pref", name), rows)
        stats[name] = {"prompts": len(problems), "sft_rows": len(sft), "sampled_prompts": len(gen),
                       "pref_rows": len(rows), "pref_chosen_is_exact_answer": gold_chosen}
    return stats


def baseline_concise(model, tokenizer, seed: int) -> dict:
    """Mean gold of the base model's greedy (and one sampled, T=1) completion on the shipped eval prompts."""
    prompts = [user(p.text) for p in concise.split_prompts(seed)["eval"][:CONCISE_N_EVAL_PROMPTS]]
    out = {}
    for label, settings in (("greedy", GREEDY_48), ("sampled_t1", SamplingSettings(max_new_tokens=48))):
        completions = generate(model, tokenizer, prompts, settings, batch_size=BATCH_ROWS, seed=seed)
        scores = [concise.score_answer(p[-1]["content"], c) for p, c in zip(prompts, completions)]
        out[label] = {
            "mean_gold": round(statistics.mean(s.value for s in scores), 3),
            "mean_words": round(statistics.mean(s.n_words for s in scores), 1),
            "finished": round(statistics.mean(s.ends_sentence for s in scores), 3),
            "example": completions[0],
        }
    return {"max_new_tokens": 48, "eval_prompts": len(prompts), **out}


def baseline_arithmetic(model, tokenizer, seed: int) -> dict:
    """Accuracy of the base model on the shipped eval prompts: greedy, and 4 samples per prompt at T=1."""
    problems = arithmetic.split_problems(seed)["eval"]
    prompts, answers = [user(p.text) for p in problems], [p.answer for p in problems]
    out = {"max_new_tokens": 32, "eval_prompts": len(problems)}
    for label, settings, n in (("greedy", GREEDY_32, 1), ("sampled_t1", ARITH_SAMPLING, 4)):
        groups = sample(model, tokenizer, prompts, settings, n, seed)
        correct = [arithmetic.is_correct(c, a) for g, a in zip(groups, answers) for c in g]
        first = [bool((m := arithmetic.NUMBER.search(c))) and float(m.group()) == a
                 for g, a in zip(groups, answers) for c in g]
        by_op = {}
        for p, g in zip(problems, groups):
            by_op.setdefault(p.op, []).extend(arithmetic.is_correct(c, p.answer) for c in g)
        out[label] = {
            "accuracy": round(statistics.mean(correct), 3),
            "accuracy_if_first_number_parsed": round(statistics.mean(first), 3),
            "accuracy_by_op": {op: round(statistics.mean(v), 3) for op, v in sorted(by_op.items())},
            "example": groups[0][0],
        }
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["all", "concise", "arithmetic"], default="all")
    parser.add_argument("--seed", type=int, default=0, help="seeds the splits and every generate() call")
    parser.add_argument("--baseline", action="store_true",
                        help="measure the base model's gold metric on the shipped eval prompts; write nothing")
    args = parser.parse_args(argv)
    tasks = ["concise", "arithmetic"] if args.task == "all" else [args.task]
    tokenizer, model = load_tokenizer(), load_model()
    for name in tasks:
        start = time.time()
        if args.baseline:
            result = (baseline_concise if name == "concise" else baseline_arithmetic)(model, tokenizer, args.seed)
        else:
            result = (make_concise if name == "concise" else make_arithmetic)(model, tokenizer, args.seed)
        result["seconds"] = round(time.time() - start)
        print(json.dumps({name: result}, indent=1, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    sys.exit(main())
