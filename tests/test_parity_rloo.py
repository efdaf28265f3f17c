"""Our RLOO advantages and loss equal TRL's RLOOTrainer on the same completions (tiny model, fp32).

TRL generates and scores; we re-score its completions and compare the advantages (leave-one-out baseline on
the KL-penalised reward, with and without REINFORCE++'s global normalisation). Then the same batch, with old
log-probs shifted so that the sequence ratio spreads over the clip band, goes through our ``rloo_loss`` and
TRL's ``_compute_loss``: values and gradients. Tolerance: 1e-5 relative on losses and advantages, 1e-4 on
gradients (fp32; TRL's fused LM head sums in another order).
"""

from dataclasses import replace

import pytest
import torch
from datasets import Dataset
from trl import RLOOTrainer

from rlcourse.losses.policy_gradient import rloo_loss
from rlcourse.methods.online import OnlineConfig, Rollouts, advantages_of, completion_logprobs, trl_online_config
from rlcourse.models import LoraSettings, reference_policy, tiny_model
from rlcourse.sampling import SamplingSettings
from rlcourse.tasks import get_task
from rlcourse.train import TrainConfig

G, PROMPTS, MAX_NEW = 4, 2, 6


def length_reward(prompts, completions, **kwargs):
    """A deterministic reward with spread on a random model's gibberish: characters modulo 7."""
    return [float(len(c[-1]["content"]) % 7) for c in completions]


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    rows = list(get_task("arithmetic").prompts("train").select(range(PROMPTS)))
    model = tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    config = OnlineConfig(algorithm="rloo", num_generations=G, prompts_per_step=PROMPTS, beta=0.05,
                          sampling=SamplingSettings(max_new_tokens=MAX_NEW))
    train = TrainConfig(steps=1, batch_size=config.completions_per_step, learning_rate=1e-3, bf16=False)
    args = trl_online_config(config, train, tmp_path_factory.mktemp("rloo"))
    trainer = RLOOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # move the policy away from the reference (B = 0 at init)
        if ".default." in name and "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.train()
    out, batch = _score_with_trl(trainer, model, tokenizer, rows, config)
    return trainer, model, config, batch, out


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def _score_with_trl(trainer, model, tokenizer, rows, config):
    """TRL samples and scores G completions per row; we re-score the same completions. -> (TRL's out, our batch)"""
    inputs = [dict(r) for r in rows for _ in range(G)]  # TRL's sampler repeats each prompt G times
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(inputs)
    prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"])]
    completion_ids = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])]
    batch = Rollouts(model, tokenizer, rows, length_reward, config).score(rows, prompt_ids, completion_ids)
    assert torch.equal(batch["completion_ids"], out["completion_ids"]) and batch["rewards"].std() > 0
    return out, batch


@pytest.mark.parametrize("beta,normalize", [(0.05, False), (0.05, True), (0.0, False), (0.0, True)])
def test_advantages_match_trl(setup, tokenizer, beta, normalize):
    trainer, model, config, _, _ = setup
    trainer.beta, trainer.normalize_advantages = beta, normalize
    config = replace(config, beta=beta, normalize_advantages=normalize)
    try:
        out, batch = _score_with_trl(trainer, model, tokenizer, list(trainer.train_dataset), config)
    finally:
        trainer.beta, trainer.normalize_advantages = 0.05, False
    with torch.no_grad():
        logps, _ = completion_logprobs(model, batch)
        with reference_policy(model):
            ref, _ = completion_logprobs(model, batch)
    if beta:
        assert ((logps - ref) * batch["completion_mask"]).abs().sum() > 0  # the KL penalty is not empty
    torch.testing.assert_close(advantages_of(batch, config, logps, ref), out["advantages"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((logps * batch["completion_mask"]).sum(-1), out["old_logps"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_loss_and_gradients_match_trl_on_fixed_completions(setup, eps_high):
    trainer, model, config, batch, out = setup
    trainer.epsilon_high = eps_high
    mask = batch["completion_mask"].float()
    with torch.no_grad():
        current, _ = completion_logprobs(model, batch)
    g = torch.Generator().manual_seed(0)
    old = current + 0.1 * torch.randn(current.shape, generator=g) * mask  # sequence ratios spread over the band
    adv = torch.randn(mask.size(0), generator=g)

    model.zero_grad()
    logps, _ = completion_logprobs(model, batch)
    ours = rloo_loss(logps, old, adv, mask, clip_eps=0.2, clip_eps_high=eps_high)
    ours.backward()
    our_grads = _grads(model)

    model.zero_grad()
    inputs = {k: out[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    theirs = trainer._compute_loss(model, inputs | {"old_logps": (old * mask).sum(-1), "advantages": adv})
    theirs.backward()
    ratio = torch.exp(((current - old) * mask).sum(-1))
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()  # both sides of the clip
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(our_grads, _grads(model), rtol=1e-4, atol=1e-6)
