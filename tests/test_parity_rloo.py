"""Our RLOO advantages and loss equal TRL's RLOOTrainer on the same completions (tiny model, fp32).

TRL generates and scores; we re-score its completions and compare the advantages (leave-one-out baseline on
the KL-penalised reward, with and without REINFORCE++'s global normalisation). Then the same batch, with old
log-probs shifted so that the sequence ratio spreads over the clip band, goes through our ``rloo_loss`` and
TRL's ``_compute_loss``: values and gradients. Tolerance: 1e-5 relative on losses and advantages, 1e-4 on
gradients (fp32; TRL's fused LM head sums in another order).
"""

import pytest
import torch

from rlcourse.losses.rloo import rloo_loss
from rlcourse.methods import rloo
from rlcourse.methods.rollouts import completion_logprobs
from rlcourse.models import reference_policy

from fixtures import ROLLOUT, flat_grads, rescore_trl_rollouts


@pytest.fixture(scope="module")
def setup(make_online_trainer, tokenizer):
    trainer, rows = make_online_trainer(rloo, rloo.Settings(beta=0.05))
    out, batch = _rescore(trainer, tokenizer, rows)
    return trainer, batch, out


def _rescore(trainer, tokenizer, rows):
    out, batch = rescore_trl_rollouts(trainer, tokenizer, rows, ROLLOUT)
    assert torch.equal(batch.completion_ids, out["completion_ids"]) and batch.rewards.std() > 0
    return out, batch


@pytest.mark.parametrize("beta,normalize", [(0.05, False), (0.05, True), (0.0, False), (0.0, True)])
def test_advantages_match_trl(setup, tokenizer, beta, normalize):
    trainer, _, _ = setup
    model = trainer.model
    trainer.beta, trainer.normalize_advantages = beta, normalize
    try:
        out, batch = _rescore(trainer, tokenizer, list(trainer.train_dataset))
    finally:
        trainer.beta, trainer.normalize_advantages = 0.05, False
    with torch.no_grad():
        logps, _ = completion_logprobs(model, batch)
        with reference_policy(model):
            ref, _ = completion_logprobs(model, batch)
    if beta:
        assert ((logps - ref) * batch.completion_mask).abs().sum() > 0  # the KL penalty is not empty
    settings = rloo.Settings(beta=beta, normalize_advantages=normalize)
    torch.testing.assert_close(rloo.advantages(batch, settings, ROLLOUT, logps, ref), out["advantages"],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((logps * batch.completion_mask).sum(-1), out["old_logps"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_loss_and_gradients_match_trl_on_fixed_completions(setup, eps_high):
    trainer, batch, out = setup
    model = trainer.model
    trainer.epsilon_high = eps_high
    mask = batch.completion_mask.float()
    with torch.no_grad():
        current, _ = completion_logprobs(model, batch)
    g = torch.Generator().manual_seed(0)
    old = current + 0.1 * torch.randn(current.shape, generator=g) * mask  # sequence ratios spread over the band
    adv = torch.randn(mask.size(0), generator=g)

    model.zero_grad()
    logps, _ = completion_logprobs(model, batch)
    ours = rloo_loss(logps, old, adv, mask, clip_eps=0.2, clip_eps_high=eps_high)
    ours.backward()
    our_grads = flat_grads(model)

    model.zero_grad()
    inputs = {k: out[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    theirs = trainer._compute_loss(model, inputs | {"old_logps": (old * mask).sum(-1), "advantages": adv})
    theirs.backward()
    ratio = torch.exp(((current - old) * mask).sum(-1))
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()  # both sides of the clip
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(our_grads, flat_grads(model), rtol=1e-4, atol=1e-6)
