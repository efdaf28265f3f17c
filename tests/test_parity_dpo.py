"""Our DPO batches and losses equal TRL's DPOTrainer on the same rows, for every loss_type TRL has.

Tiny random model with LoRA, fp32 (``bf16=False``): the two sides run the same network on the same tokens, so they
agree to float rounding. TRL computes log-probs through a fused, chunked LM head, we through full logits and
``log_softmax``; the tolerance below (rel 1e-5) covers that difference in summation order.
"""

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback

from rlcourse.methods import dpo
from rlcourse.models import LoraSettings, tiny_model
from rlcourse.train import TrainConfig
from rlcourse.trl_runs import trl_config

ROWS = [
    {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
     "rejected": [{"role": "assistant", "content": r}]}
    for q, c, r in [
        ("Why is the sky blue?", "Air scatters blue light.", "Because it is. The sky is blue because blue."),
        ("2 + 2?", "4", "5, or maybe 22."),
        ("Name a planet.", "Mars, the red planet.", "Pluto"),
        ("Say hi.", "Hi!", "Goodbye, and a long farewell to you all."),
    ]
]
MAX_LENGTH = 64
RTOL = 1e-5
"""Relative tolerance of our loss and metrics vs TRL's, fp32 on the tiny model (differences seen: ≤ 1e-7)."""


def _trainer(tokenizer, tmp_path, settings: dpo.DPOSettings, max_length=MAX_LENGTH):
    model = tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    config = TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, bf16=False)
    args = trl_config(DPOConfig, config, tmp_path, **dpo.trl_kwargs(settings, max_length))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    # Move the policy away from the reference (fresh LoRA has B = 0, where every loss sits at a trivial point).
    # After the trainer is built, so that TRL's "ref" adapter keeps the fresh copy: π_ref = the base model.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return trainer


@pytest.fixture(scope="module")
def trainer(tokenizer, tmp_path_factory):
    return _trainer(tokenizer, tmp_path_factory.mktemp("trl"), dpo.DPOSettings())


def test_trl_defaults_we_override_are_set(trainer):
    args = trainer.args
    assert args.precompute_ref_log_probs is False and args.max_length == MAX_LENGTH
    assert args.truncation_mode == "keep_start" and args.pad_to_multiple_of is None
    assert args.sync_ref_model is False and args.use_weighting is False and args.ld_alpha is None
    assert not args.gradient_checkpointing  # README pitfall 4


@pytest.mark.parametrize("max_length", [MAX_LENGTH, 40])  # 40 truncates the longest rejected completions
def test_batches_are_identical(tokenizer, tmp_path, max_length):
    trainer = _trainer(tokenizer, tmp_path, dpo.DPOSettings(), max_length=max_length)
    theirs = next(iter(trainer.get_train_dataloader()))
    ours = dpo.batch_fn(dpo.tokenize_dataset(ROWS, tokenizer, max_length), 4, tokenizer.pad_token_id, max_length)(0)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(theirs[key], ours[key]), key
    assert ours["input_ids"].shape[0] == 8  # (2B, T): chosen rows first, then rejected


def test_trl_uses_a_copy_of_the_fresh_adapter_as_reference(trainer):
    # TRL 1.16, given a PeftModel, adds an adapter "ref" copied from "default"; with fresh LoRA (B = 0) that is the
    # base model, the same reference as our adapters-disabled one.
    assert dpo.REF_ADAPTER in trainer.model.peft_config


@pytest.mark.parametrize("loss_type,label_smoothing", [
    ("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0), ("ipo", 0.0),
])
def test_loss_and_metrics_match_trl(trainer, loss_type, label_smoothing):
    settings = dpo.DPOSettings(beta=0.5, loss_type=loss_type, label_smoothing=label_smoothing)
    trainer.loss_types, trainer.beta, trainer.label_smoothing = [loss_type], settings.beta, label_smoothing
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._metrics["train"].clear()
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
        # our reference: adapters disabled. TRL's: its "ref" adapter. Hide it so both use the same reference.
        ours = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        with _without_ref_adapter(trainer.model):
            our_loss, metrics = dpo.dpo_step(trainer.model, ours, settings)
    assert our_loss.item() == pytest.approx(trl_loss.item(), rel=RTOL)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "entropy", "mean_token_accuracy"):
        assert metrics[name].item() == pytest.approx(trainer._metrics["train"][name][-1], rel=RTOL, abs=1e-6), name


class _without_ref_adapter:
    """TRL's "ref" adapter is a copy of the initial one; ours is adapters-off. Compute ours with adapters off."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = self.model.peft_config.pop(dpo.REF_ADAPTER)

    def __exit__(self, *exc):
        self.model.peft_config[dpo.REF_ADAPTER] = self.saved


def test_our_reference_equals_trls_for_fresh_adapters(tokenizer, tmp_path):
    """With fresh adapters (B = 0) TRL's "ref"-adapter reference and our adapters-off reference are identical."""
    model = tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    args = trl_config(DPOConfig, TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, bf16=False), tmp_path,
                      **dpo.trl_kwargs(dpo.DPOSettings(), MAX_LENGTH))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_ref = trainer.compute_ref_log_probs(trainer.model, dict(batch))
        ours = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        with _without_ref_adapter(trainer.model), dpo.reference(trainer.model):
            ref = dpo.sequence_logps(trainer.model, ours)["logps"].sum(-1).chunk(2)
    for a, b in zip(ref, trl_ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-5)


def test_trl_refuses_tr_dpo_with_peft(tokenizer, tmp_path):
    """Why our TR-DPO has no TRL run beside it: TRL 1.16 raises for sync_ref_model on a PEFT model."""
    model = tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    kwargs = {**dpo.trl_kwargs(dpo.DPOSettings(), MAX_LENGTH), "sync_ref_model": True}
    args = trl_config(DPOConfig, TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, bf16=False), tmp_path,
                      **kwargs)
    with pytest.raises(NotImplementedError, match="PEFT"):
        DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)


def test_reference_sync_follows_trls_update_rule(tokenizer):
    """Our TR-DPO sync on the adapter equals TRL's SyncRefModelCallback rule applied to the same tensors."""
    model = tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    dpo.add_reference_adapter(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                p.add_(torch.randn_like(p))
    params = dict(model.named_parameters())
    names = [n for n in params if ".default." in n]
    policy = torch.nn.ParameterList([torch.nn.Parameter(params[n].detach().clone()) for n in names])
    target = torch.nn.ParameterList([torch.nn.Parameter(params[n.replace(".default.", ".ref.")].detach().clone())
                                     for n in names])
    SyncRefModelCallback._sync_target_model(policy, target, 0.3)
    dpo.sync_reference(model, 0.3)
    for n, expected in zip(names, target):
        torch.testing.assert_close(params[n.replace(".default.", ".ref.")].detach(), expected.detach())
