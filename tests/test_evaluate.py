"""Gold evaluation: greedy answers, or the mean of several samples per prompt (the policy's expected reward)."""

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
