"""SFT and DFT losses: definitions, gradients, and the exercise checkers."""

import pytest
import torch

from rlcourse.exercises import check_dft_loss, check_sft_loss, check_token_logprobs
from rlcourse.logprobs import token_logprobs
from rlcourse.losses import dft_loss, sft_loss


def test_sft_loss_is_token_mean_nll_over_the_batch():
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sft_loss(logps, mask).item() == pytest.approx((1 + 2 + 3) / 3)


def test_dft_weights_each_token_by_its_probability_without_gradient_through_the_weight():
    logps = torch.tensor([[-0.1, -3.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    loss = dft_loss(logps, mask)
    p = logps.detach().exp()
    assert loss.item() == pytest.approx((-(p * logps.detach()).sum() / 2).item())
    loss.backward()
    torch.testing.assert_close(logps.grad, -p / 2)  # d/dlogp of -sg(p)·logp/N


def test_dft_equals_sft_when_the_policy_is_certain():
    logps = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    assert dft_loss(logps, mask).item() == sft_loss(logps, mask).item() == 0


def test_checkers_accept_the_reference_and_reject_a_wrong_answer(capsys):
    check_token_logprobs(token_logprobs)
    check_sft_loss(sft_loss)
    check_dft_loss(dft_loss)
    with pytest.raises(AssertionError, match="sft_loss"):
        check_sft_loss(lambda logps, mask: -(logps * mask).sum(-1).mean())  # per-sequence sum: wrong
    with pytest.raises(AssertionError, match="gradient"):
        check_dft_loss(lambda logps, mask: -(logps.exp() * logps * mask).sum() / mask.sum())  # no stop-gradient
    with pytest.raises(AssertionError):
        check_token_logprobs(lambda logits, ids: torch.log_softmax(logits, -1)[:, 1:].gather(2, ids[:, 1:, None])[..., 0])


def test_unattempted_exercise_is_reported_not_failed(capsys):
    def stub(logps, mask):
        raise NotImplementedError
    check_sft_loss(stub)
    assert "not attempted" in capsys.readouterr().out
