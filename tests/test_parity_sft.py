"""Our SFT batch and loss equal TRL's SFTTrainer on the same rows (tiny model, fp32: exact up to float noise)."""

import pytest
import torch
from trl import SFTConfig

from rlcourse.metrics import MetricsLog
from rlcourse.methods import sft
from rlcourse.parity import assert_first_step
from rlcourse.train import TrainConfig
from rlcourse.trl_runs import trl_config

from fixtures import MAX_LENGTH, SFT_ROWS


@pytest.fixture(scope="module")
def trainer_and_ours(make_trainer, tokenizer):
    trainer = make_trainer(sft, sft.Settings(), SFT_ROWS, perturb=None)
    return trainer, sft.batches(SFT_ROWS, tokenizer, 4, MAX_LENGTH)(0)


def test_trl_config_makes_runs_comparable(tmp_path):
    args = trl_config(SFTConfig, TrainConfig(steps=7, batch_size=3, learning_rate=1e-4, seed=5), tmp_path)
    assert (args.max_steps, args.per_device_train_batch_size, args.seed, args.learning_rate) == (7, 3, 5, 1e-4)
    assert args.train_sampling_strategy == "sequential" and args.lr_scheduler_type == "constant"
    assert not args.gradient_checkpointing  # README pitfall 4
    assert args.report_to in ([], "none", ["none"])  # no external loggers
    assert args.logging_steps == 1 and args.gradient_accumulation_steps == 1


def test_batches_are_identical(trainer_and_ours):
    trainer, ours = trainer_and_ours
    theirs = next(iter(trainer.get_train_dataloader()))
    assert torch.equal(theirs["input_ids"], ours.input_ids)
    assert torch.equal(theirs["attention_mask"], ours.attention_mask)
    # TRL marks trained tokens with labels != -100; ours with completion_mask
    assert torch.equal(theirs["labels"] != -100, ours.completion_mask.bool())


@pytest.mark.parametrize("loss_type,dft", [("nll", False), ("dft", True)])
def test_loss_matches_trl(trainer_and_ours, loss_type, dft):
    trainer, ours = trainer_and_ours
    trainer.args.loss_type = loss_type
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
        our_loss, _ = sft.sft_step(trainer.model, ours, sft.Settings(dft=dft))
    assert our_loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)


def test_assert_first_step_reports_and_fails_beyond_tolerance(capsys):
    ours = MetricsLog([{"step": 1, "loss": 2.0}])
    assert_first_step(ours, MetricsLog([{"step": 1, "loss": 2.001}]), {"loss": "loss"}, rtol=1e-3)
    assert "2.001000" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="loss: ours 2.000000 vs TRL 2.100000"):
        assert_first_step(ours, MetricsLog([{"step": 1, "loss": 2.1}]), {"loss": "loss"}, rtol=1e-3)
