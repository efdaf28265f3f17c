"""Our GRPO advantages and loss equal TRL's GRPOTrainer on the same completions (tiny model, fp32).

Generation is taken out of the comparison: either TRL generates and we score its completions, or we build
the batch and feed it to TRL's own ``_compute_loss``. Covered: every ``loss_type`` (grpo, bnpo, dr_grpo,
dapo), clip-higher, GSPO's sequence-level ratio, β > 0 with the k3 term (with and without TRL's bias
correction), ratios away from 1 so the clip is active, and the three ``scale_rewards``. Tolerance: 1e-5
relative on the loss, 1e-4 on the gradients (fp32; TRL's fused LM head sums in another order).
"""

import pytest
import torch
from datasets import Dataset
from trl import GRPOTrainer

from rlcourse.methods.online import OnlineConfig, Rollouts, completion_logprobs, trl_inputs, trl_online_config
from rlcourse.losses.policy_gradient import grpo_advantages, grpo_loss
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
    config = OnlineConfig(num_generations=G, prompts_per_step=PROMPTS,
                          sampling=SamplingSettings(max_new_tokens=MAX_NEW))
    train = TrainConfig(steps=1, batch_size=config.completions_per_step, learning_rate=1e-3, bf16=False)
    args = trl_online_config(config, train, tmp_path_factory.mktemp("grpo"), beta=0.04)
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # move the policy away from the reference (adapters' B = 0 at init)
        if ".default." in name and "lora_B" in name:
            p.data.normal_(0, 0.05)
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    batch = Rollouts(model, tokenizer, rows, length_reward, config, seed=3)(0)
    return trainer, model, rows, config, batch


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def _both(trainer, model, batch, variant):
    """(our loss, our grads), (TRL's loss, TRL's grads) on ``batch`` for the trainer settings in ``variant``."""
    for k, v in variant.items():
        setattr(trainer, k, v)
    trainer.args.use_bias_correction_kl = variant.get("kl_bias_correction", True)
    mask = batch["completion_mask"].float()
    with torch.no_grad(), reference_policy(model):
        ref, _ = completion_logprobs(model, batch)
    with torch.no_grad():
        current, _ = completion_logprobs(model, batch)
    old = current + 0.3 * torch.randn(current.shape, generator=torch.Generator().manual_seed(0)) * mask  # ρ ≠ 1
    adv = grpo_advantages(batch["rewards"], G)

    model.zero_grad()
    logps, _ = completion_logprobs(model, batch)
    ours = grpo_loss(logps, old, adv, mask, ref, trainer.beta, 0.2, trainer.epsilon_high,
                     trainer.importance_sampling_level, trainer.loss_type, MAX_NEW,
                     kl_bias_correction=trainer.args.use_bias_correction_kl)
    ours.backward()
    our_grads = _grads(model)

    model.zero_grad()
    inputs = trl_inputs(batch | {"advantages": adv}) | {"old_per_token_logps": old, "ref_per_token_logps": ref}
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    return (ours.detach(), our_grads), (theirs.detach(), _grads(model))


VARIANTS = {
    "grpo": dict(loss_type="grpo", beta=0.0, epsilon_high=0.2, importance_sampling_level="token"),
    "bnpo": dict(loss_type="bnpo", beta=0.0, epsilon_high=0.2, importance_sampling_level="token"),
    "dr_grpo": dict(loss_type="dr_grpo", beta=0.0, epsilon_high=0.2, importance_sampling_level="token"),
    "dapo": dict(loss_type="dapo", beta=0.0, epsilon_high=0.2, importance_sampling_level="token"),
    "dapo-clip-higher": dict(loss_type="dapo", beta=0.0, epsilon_high=0.28, importance_sampling_level="token"),
    "grpo-beta-k3": dict(loss_type="grpo", beta=0.04, epsilon_high=0.2, importance_sampling_level="token"),
    "grpo-beta-k3-no-correction": dict(loss_type="grpo", beta=0.04, epsilon_high=0.2,
                                       importance_sampling_level="token", kl_bias_correction=False),
    "gspo": dict(loss_type="grpo", beta=0.0, epsilon_high=0.2, importance_sampling_level="sequence"),
    "gspo-dapo-beta": dict(loss_type="dapo", beta=0.04, epsilon_high=0.28, importance_sampling_level="sequence"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loss_and_gradients_match_trl_on_fixed_completions(setup, name):
    trainer, model, _, _, batch = setup
    (ours, our_grads), (theirs, their_grads) = _both(trainer, model, batch, VARIANTS[name])
    assert theirs.abs() > 1e-4, "a vanishing loss would make the comparison empty"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(our_grads, their_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl_on_its_own_completions(setup, tokenizer, scale_rewards):
    trainer, model, rows, config, _ = setup
    trainer.scale_rewards = scale_rewards
    inputs = [dict(r) for r in rows for _ in range(G)]  # TRL's sampler repeats each prompt G times
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(inputs)
    prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"])]
    completion_ids = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])]
    ours = Rollouts(model, tokenizer, rows, length_reward, config).score(rows, prompt_ids, completion_ids)
    assert torch.equal(ours["completion_ids"], out["completion_ids"])
    assert torch.equal(ours["prompt_ids"], out["prompt_ids"])
    assert ours["rewards"].std() > 0
    torch.testing.assert_close(grpo_advantages(ours["rewards"], G, scale_rewards), out["advantages"],
                               rtol=1e-5, atol=1e-6)


def test_our_prompt_tokens_are_trls(setup, tokenizer):
    trainer, _, rows, _, batch = setup
    trl_ids, _, _ = trainer._tokenize_prompts([r["prompt"] for r in rows])
    ours = [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    assert ours == [list(ids) for ids in trl_ids for _ in range(G)]
