"""Our GRPO advantages and loss equal TRL's GRPOTrainer on the same completions (tiny model, fp32).

Generation is taken out of the comparison: either TRL generates and we score its completions, or we build
the batch and feed it to TRL's own ``_compute_loss``. Covered: every ``loss_type`` (grpo, bnpo, dr_grpo,
dapo), clip-higher, GSPO's sequence-level ratio, β > 0 with the k3 term (with and without TRL's bias
correction), ratios away from 1 so the clip is active, and the three ``scale_rewards``. Tolerance: 1e-5
relative on the loss, 1e-4 on the gradients (fp32; TRL's fused LM head sums in another order).
"""

import pytest
import torch

from rlcourse.losses.grpo import grpo_loss
from rlcourse.methods import grpo
from rlcourse.methods.rollouts import Rollouts, completion_logprobs, trl_inputs
from rlcourse.models import reference_policy

from fixtures import ROLLOUT, flat_grads, length_reward, rescore_trl_rollouts

G, MAX_NEW = ROLLOUT.num_generations, ROLLOUT.sampling.max_new_tokens


@pytest.fixture(scope="module")
def setup(make_online_trainer, tokenizer):
    trainer, rows = make_online_trainer(grpo, grpo.Settings(beta=0.04))
    trainer.current_gradient_accumulation_steps = 1
    batch = Rollouts(trainer.model, tokenizer, rows, length_reward, ROLLOUT, seed=3)(0)
    return trainer, rows, batch


def _both(trainer, batch, variant):
    """(our loss, our grads), (TRL's loss, TRL's grads) on ``batch`` for the trainer settings in ``variant``."""
    model = trainer.model
    for k, v in variant.items():
        setattr(trainer, k, v)
    trainer.args.use_bias_correction_kl = variant.get("kl_bias_correction", True)
    mask = batch.completion_mask.float()
    with torch.no_grad(), reference_policy(model):
        ref, _ = completion_logprobs(model, batch)
    with torch.no_grad():
        current, _ = completion_logprobs(model, batch)
    old = current + 0.3 * torch.randn(current.shape, generator=torch.Generator().manual_seed(0)) * mask  # ρ ≠ 1
    adv = grpo.advantages(batch, grpo.Settings(), ROLLOUT)

    model.zero_grad()
    logps, _ = completion_logprobs(model, batch)
    ours = grpo_loss(logps, old, adv, mask, ref, trainer.beta, 0.2, trainer.epsilon_high,
                     trainer.importance_sampling_level, trainer.loss_type, MAX_NEW,
                     kl_bias_correction=trainer.args.use_bias_correction_kl)
    ours.backward()
    our_grads = flat_grads(model)

    model.zero_grad()
    inputs = trl_inputs(batch, adv) | {"old_per_token_logps": old, "ref_per_token_logps": ref}
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    return (ours.detach(), our_grads), (theirs.detach(), flat_grads(model))


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
    trainer, _, batch = setup
    (ours, our_grads), (theirs, their_grads) = _both(trainer, batch, VARIANTS[name])
    assert theirs.abs() > 1e-4, "a vanishing loss would make the comparison empty"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(our_grads, their_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl_on_its_own_completions(setup, tokenizer, scale_rewards):
    trainer, rows, _ = setup
    trainer.scale_rewards = scale_rewards
    out, ours = rescore_trl_rollouts(trainer, tokenizer, rows, ROLLOUT)
    assert torch.equal(ours.completion_ids, out["completion_ids"])
    assert torch.equal(ours.prompt_ids, out["prompt_ids"])
    assert ours.rewards.std() > 0
    torch.testing.assert_close(grpo.advantages(ours, grpo.Settings(scale_rewards=scale_rewards), ROLLOUT),
                               out["advantages"], rtol=1e-5, atol=1e-6)


def test_the_step_logs_the_advantages_that_trl_inputs_carry(setup):
    """The step writes nothing into the batch: ``grpo.advantages`` computes the advantages, ``trl_inputs`` carries
    them to TRL's loss, and the step logs the same ones."""
    trainer, _, batch = setup
    adv = grpo.advantages(batch, grpo.Settings(), ROLLOUT)
    inputs = trl_inputs(batch, adv)
    assert inputs["advantages"] is adv and inputs["num_items_in_batch"] == batch.completion_mask.sum()
    with torch.no_grad():
        _, metrics = grpo.grpo_step(trainer.model, batch, grpo.Settings(), ROLLOUT)
    assert metrics["advantages/abs_max"] == adv.abs().max() and metrics["advantages/std"] == adv.std()


def test_our_prompt_tokens_are_trls(setup):
    trainer, rows, batch = setup
    trl_ids, _, _ = trainer._tokenize_prompts([r["prompt"] for r in rows])
    ours = [ids[m.bool()].tolist() for ids, m in zip(batch.prompt_ids, batch.prompt_mask)]
    assert ours == [list(ids) for ids in trl_ids for _ in range(G)]
