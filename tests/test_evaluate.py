"""Gold evaluation: greedy answers, or the mean of several samples per prompt (the policy's expected reward)."""

import numpy as np
import pytest

from rlcourse import evaluate
from rlcourse.models import tiny_model
from rlcourse.sampling import SamplingSettings


class CountTask:
    """A reward that is 1 for an even number of characters: enough to check the bookkeeping."""

    def reward(self, prompts, completions, **columns):
        assert len(prompts) == len(completions) == len(columns["answer"])
        return [float(len(c) % 2 == 0) for c in completions]


PROMPTS = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": i + 1} for i in range(3)]


def test_sampled_gold_is_one_mean_per_prompt_over_its_samples(tokenizer, monkeypatch):
    model = tiny_model(tokenizer)
    samples = {0: ["a", "bb", "cc", "dd"], 1: ["e", "f", "g", "hh"], 2: ["ii", "jj", "kk", "ll"]}
    flat = [c for i in range(3) for c in samples[i]]
    monkeypatch.setattr(evaluate, "generate", lambda *a, num_return_sequences, **k: flat)
    result = evaluate.gold_eval(model, tokenizer, CountTask(), PROMPTS, SamplingSettings(do_sample=True), samples=4)
    assert result.scores == [0.75, 0.25, 1.0]
    assert result.completions == ["a", "e", "ii"] and len(result.prompts) == 3


def test_greedy_gold_refuses_several_samples(tokenizer):
    with pytest.raises(ValueError, match="samples=3"):
        evaluate.gold_eval(tiny_model(tokenizer), tokenizer, CountTask(), PROMPTS,
                           SamplingSettings(do_sample=False), samples=3)


def _gold(scores):
    return evaluate.GoldResult(scores=list(scores), completions=[""] * len(scores), prompts=[""] * len(scores))


def test_gain_over_runs_is_the_mean_of_each_runs_paired_gain():
    before = _gold([0, 0, 1, 1])
    runs = [_gold([1, 0, 1, 1]), _gold([1, 1, 1, 1]), _gold([0, 0, 1, 0])]
    s = evaluate.gain_over_runs(before, runs)
    assert s["gains"] == [0.25, 0.5, -0.25]
    assert s["mean"] == pytest.approx(1 / 6)
    assert s["sd"] == pytest.approx(np.std([0.25, 0.5, -0.25], ddof=1))
    assert s["ci"][0] < 0 < s["ci"][1]  # one run lost ground: not beyond run-to-run noise


def test_gain_over_runs_interval_widens_when_runs_disagree():
    rng = np.random.default_rng(0)
    before = _gold(np.zeros(100))
    agree = [_gold(rng.random(100) < 0.3) for _ in range(3)]
    disagree = [_gold(rng.random(100) < p) for p in (0.05, 0.3, 0.55)]
    width = lambda s: s["ci"][1] - s["ci"][0]
    assert width(evaluate.gain_over_runs(before, disagree)) > 2 * width(evaluate.gain_over_runs(before, agree))
    assert evaluate.gain_over_runs(before, agree)["ci"][0] > 0


def test_gain_over_runs_names_the_run_with_other_prompts():
    with pytest.raises(ValueError, match="run 1 has 2 gold scores"):
        evaluate.gain_over_runs(_gold([0, 1, 1]), [_gold([1, 1, 1]), _gold([1, 1])])


def test_sampling_has_no_top_k_cut(tokenizer):
    """Sampled gold and the probes' KL assume samples from the policy itself. generate() fills an unset top_k with
    50; a near-uniform tiny model shows the difference: 300 one-token samples hit far more than 50 tokens."""
    from rlcourse.sampling import generate_ids

    model = tiny_model(tokenizer, seed=0)
    prompt = [[{"role": "user", "content": "Say something."}]]
    settings = SamplingSettings(max_new_tokens=1, do_sample=True, temperature=1.0)
    texts = evaluate.generate(model, tokenizer, prompt, settings, num_return_sequences=300, batch_size=1)
    assert len(set(texts)) > 100
    _, ids = generate_ids(model, tokenizer, prompt, settings, num_return_sequences=300)
    assert len({c[0] for c in ids}) > 100
