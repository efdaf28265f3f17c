"""Our DPO batches and losses equal TRL's DPOTrainer on the same rows, for every loss_type TRL has.

Tiny random model with LoRA, fp32 (``bf16=False``): the two sides run the same network on the same tokens, so they
agree to float rounding. TRL computes log-probs through a fused, chunked LM head, we through full logits and
``log_softmax``; the tolerance below (rel 1e-5) covers that difference in summation order.
"""

import pytest
import torch
from trl.trainer.callbacks import SyncRefModelCallback

from rlcourse.batches import PairBatch, Sequences
from rlcourse.logprobs import sequence_logps
from rlcourse.methods import dpo, ipo
from rlcourse.models import REF_ADAPTER, add_reference_adapter, reference_policy

from fixtures import MAX_LENGTH, PREFERENCE_ROWS

RTOL = 1e-5
"""Relative tolerance of our loss and metrics vs TRL's, fp32 on the tiny model (differences seen: ≤ 1e-7)."""


@pytest.fixture(scope="module")
def trainer(make_trainer):
    return make_trainer(dpo, dpo.Settings())


def test_trl_defaults_we_override_are_set(trainer):
    args = trainer.args
    assert args.precompute_ref_log_probs is False and args.max_length == MAX_LENGTH
    assert args.truncation_mode == "keep_start" and args.pad_to_multiple_of is None
    assert args.sync_ref_model is False and args.use_weighting is False and args.ld_alpha is None
    assert not args.gradient_checkpointing  # README pitfall 4


@pytest.mark.parametrize("max_length", [MAX_LENGTH, 40])  # 40 truncates the longest rejected completions
def test_batches_are_identical(make_trainer, tokenizer, max_length):
    trainer = make_trainer(dpo, dpo.Settings(), max_length=max_length)
    theirs = next(iter(trainer.get_train_dataloader()))
    ours = dpo.batches(PREFERENCE_ROWS, tokenizer, 4, max_length)(0)
    assert isinstance(ours, PairBatch) and ours.step == 0
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(theirs[key], getattr(ours.sequences, key)), key
    assert ours.sequences.input_ids.shape[0] == 8  # (2B, T): chosen rows first, then rejected


def test_trl_uses_a_copy_of_the_fresh_adapter_as_reference(trainer):
    # TRL 1.16, given a PeftModel, adds an adapter "ref" copied from "default"; with fresh LoRA (B = 0) that is the
    # base model, the same reference as our adapters-disabled one.
    assert REF_ADAPTER in trainer.model.peft_config


@pytest.mark.parametrize("loss_type,label_smoothing", [
    ("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0), ("ipo", 0.0),
])
def test_loss_and_metrics_match_trl(trainer, loss_type, label_smoothing):
    step = (ipo.step_fn(ipo.Settings(beta=0.5)) if loss_type == "ipo"  # IPO: its own module, TRL's loss_type
            else dpo.step_fn(dpo.Settings(beta=0.5, loss_type=loss_type, label_smoothing=label_smoothing)))
    trainer.loss_types, trainer.beta, trainer.label_smoothing = [loss_type], 0.5, label_smoothing
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._metrics["train"].clear()
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
        # our reference: adapters disabled. TRL's: its "ref" adapter. Hide it so both use the same reference.
        with _without_ref_adapter(trainer.model):
            our_loss, metrics = step(trainer.model, PairBatch(Sequences.from_dict(batch)))
    assert our_loss.item() == pytest.approx(trl_loss.item(), rel=RTOL)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "entropy", "mean_token_accuracy"):
        assert metrics[name].item() == pytest.approx(trainer._metrics["train"][name][-1], rel=RTOL, abs=1e-6), name


class _without_ref_adapter:
    """TRL's "ref" adapter is a copy of the initial one; ours is adapters-off. Compute ours with adapters off."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = self.model.peft_config.pop(REF_ADAPTER)

    def __exit__(self, *exc):
        self.model.peft_config[REF_ADAPTER] = self.saved


def test_our_reference_equals_trls_for_fresh_adapters(make_trainer):
    """With fresh adapters (B = 0) TRL's "ref"-adapter reference and our adapters-off reference are identical."""
    trainer = make_trainer(dpo, dpo.Settings(), perturb=None)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_ref = trainer.compute_ref_log_probs(trainer.model, dict(batch))
        with _without_ref_adapter(trainer.model), reference_policy(trainer.model):
            ref = sequence_logps(trainer.model, Sequences.from_dict(batch))[0].chunk(2)
    for a, b in zip(ref, trl_ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-5)


def test_trl_refuses_tr_dpo_with_peft(make_trainer):
    """Why our TR-DPO has no TRL run beside it: TRL 1.16 raises for sync_ref_model on a PEFT model."""
    with pytest.raises(NotImplementedError, match="PEFT"):
        make_trainer(dpo, dpo.Settings(), sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model with a PEFT model"):  # and our trl_kwargs says so
        dpo.trl_kwargs(dpo.Settings(sync_ref_every=2), MAX_LENGTH)


def test_reference_sync_follows_trls_update_rule(policy):
    """Our TR-DPO sync on the adapter equals TRL's SyncRefModelCallback rule applied to the same tensors."""
    add_reference_adapter(policy)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".default." in name:
                p.add_(torch.randn_like(p))
    params = dict(policy.named_parameters())
    names = [n for n in params if ".default." in n]
    current = torch.nn.ParameterList([torch.nn.Parameter(params[n].detach().clone()) for n in names])
    target = torch.nn.ParameterList([torch.nn.Parameter(params[n.replace(".default.", ".ref.")].detach().clone())
                                     for n in names])
    SyncRefModelCallback._sync_target_model(current, target, 0.3)
    dpo.sync_reference(policy, 0.3)
    for n, expected in zip(names, target):
        torch.testing.assert_close(params[n.replace(".default.", ".ref.")].detach(), expected.detach())
