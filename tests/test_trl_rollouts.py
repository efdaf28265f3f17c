"""TRL's online trainers sampling through the rollout engine (``rlcourse.trl_rollouts``): the same completions our
loop samples from the same weights and seed, in TRL's layout, from weights synced after every optimizer step."""

from __future__ import annotations

import pytest
import torch

from rlcourse.methods import grpo, rloo
from rlcourse.methods.rollouts import Rollouts
from rlcourse.rollout_engine import sampler_for
from rlcourse.sampling import eos_token_ids, prompt_ids
from rlcourse.trl_rollouts import GENERATION, _groups, engine_trainer_class, trl_trainer_class

from fixtures import ROLLOUT, length_reward

SETTINGS = {grpo: grpo.Settings(), rloo: rloo.Settings(beta=0.05)}


def test_groups_finds_runs_of_g_identical_prompts():
    a, b = [1, 2], [3]
    assert _groups([a, a, b, b], 2) == [a, b]
    assert _groups([a, b, a, b], 2) is None  # not in runs
    assert _groups([a, a, b], 2) is None  # not a multiple of G
    assert _groups([a, a], 1) is None


@pytest.mark.parametrize("method", [grpo, rloo], ids=["grpo", "rloo"])
def test_trl_samples_what_our_rollouts_sample(make_online_trainer, tokenizer, method):
    """Same weights, same seed: TRL's trainer (its tokenisation, grouping, EOS cut, padding) gets exactly the
    completions our ``Rollouts`` draws from the engine, and scores them as we do."""
    trainer, rows = make_online_trainer(method, SETTINGS[method], generation="engine")
    assert type(trainer).__name__.endswith("WithEngine")
    G = ROLLOUT.num_generations
    sampler = sampler_for(trainer.model)  # built before the seed: building one draws its initial weights
    torch.manual_seed(7)
    out = trainer._generate_and_score_completions([dict(r) for r in rows for _ in range(G)])
    theirs = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])]

    policy = trainer.model
    ids = prompt_ids(tokenizer, [r["prompt"] for r in rows])
    torch.manual_seed(7)
    samples = sampler.sample(ids, G, ROLLOUT.sampling.max_new_tokens, eos_token_ids(policy, tokenizer),
                             tokenizer.pad_token_id)
    assert theirs == samples.completion_ids
    assert [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"])] == [
        p for p in ids for _ in range(G)]
    ours = Rollouts(policy, tokenizer, rows, length_reward, ROLLOUT).score(rows, [p for p in ids for _ in range(G)],
                                                                          samples.completion_ids)
    if method is grpo:  # RLOO's trainer keeps only the advantages
        torch.testing.assert_close(out["advantages"], grpo.grpo_advantages(ours.rewards, G))
    assert len(trainer.rollout_timings) == 1 and trainer.rollout_timings[0]["decode"] > 0


def test_trl_samples_from_the_weights_of_every_step(make_online_trainer):
    """Two steps: the second samples from the weights the first optimizer step left (the sampler synced to them)."""
    trainer, _ = make_online_trainer(grpo, SETTINGS[grpo], generation="engine")
    versions = []
    generate = trainer._generate_single_turn

    def recording(*args, **kwargs):
        result = generate(*args, **kwargs)
        sampler = sampler_for(trainer.model)
        versions.append(sampler.version)
        assert sampler.version == sampler._policy_version()  # sampled from the policy as it stood
        return result

    trainer._generate_single_turn = recording
    trainer.args.max_steps = 2
    trainer.train()
    assert len(versions) == 2 and versions[0] != versions[1]


def test_the_engine_refuses_what_it_cannot_sample(make_online_trainer):
    trainer, rows = make_online_trainer(grpo, SETTINGS[grpo], generation="engine")
    trainer.top_k = 5
    with pytest.raises(ValueError, match="top_k=5"):
        trainer._generate_and_score_completions([dict(r) for r in rows for _ in range(ROLLOUT.num_generations)])
    with pytest.raises(ValueError, match="choose one of"):
        trl_trainer_class(grpo, "vllm")
    assert trl_trainer_class(grpo, "transformers") is grpo.trl_classes()[0]
    assert trl_trainer_class(rloo, "engine") is engine_trainer_class(rloo.trl_classes()[0])
    assert GENERATION[0] == "engine"


def test_bench_splits_a_trl_engine_step_into_its_parts(make_online_trainer):
    """``make bench`` times TRL's engine-sampling step from the engine's own timings: nothing falls to "other"
    unmeasured except bookkeeping."""
    from rlcourse.bench import PHASES, TRLPhases

    trainer, _ = make_online_trainer(grpo, SETTINGS[grpo], generation="engine")
    timer = TRLPhases(trainer, length_reward)
    trainer.reward_funcs = [timer.reward_fn]
    trainer.add_callback(timer)
    trainer.args.max_steps = 1
    trainer.train()
    (step,) = timer.steps
    assert all(step[p] > 0 for p in ("prefill", "decode", "reward", "policy_forward", "backward", "optimizer"))
    assert sum(step[p] for p in PHASES) <= step["step"]
