"""Our reward-model batch, scores and loss equal TRL's RewardTrainer on the same pairs (tiny model, fp32),
and README pitfall 2 (TRL casts the score head of a quantized model to bf16) is pinned down."""

import json

import pytest
import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from rlcourse import reward_artifact, reward_eval
from rlcourse.batches import collate_reward_pairs
from rlcourse.tokenization import tokenize_reward_pair, tokenize_reward_pairs
from rlcourse.methods import reward_model as rm
from rlcourse.models import LoraSettings
from rlcourse.train import TrainConfig, train
from rlcourse.trl_runs import run_trl, trl_config

PAIRS = [
    ("Why is the sky blue?", "Air scatters blue light more than red light.", "Because.", 1.0, 0.0),
    ("Name a planet.", "Mars, the red planet.", "There are many planets in the solar system and", 1.0, 0.25),
    ("Give me a tip for saving money.", "Cook at home more often.", "Money money money money.", 0.9, 0.4),
    ("What is DNA?", "DNA stores genetic instructions in cells.", "It is a thing that", 1.0, 0.5),
]
ROWS = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}], "score_chosen": sc, "score_rejected": sr}
        for q, c, r, sc, sr in PAIRS]


def tiny_reward_model(tokenizer, seed: int = 0, lora: LoraSettings | None = None):
    """A randomly initialised 2-layer Llama with a scalar score head and SmolLM2's tokenizer."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)  # a head large enough that rewards differ visibly
    if lora is not None:
        torch.manual_seed(seed)
        model = get_peft_model(model, lora.peft_config(task_type="SEQ_CLS"))
    return model


def _trainer(tokenizer, tmp_path, margin_scale=0.0, center=None, bf16=False):
    model = tiny_reward_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # non-zero LoRA B so that the adapters take part in the forward pass
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    config = TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, bf16=bf16)
    data = rm.add_margin(Dataset.from_list(ROWS), margin_scale)
    settings = rm.Settings(center_rewards_coefficient=center)
    args = trl_config(RewardConfig, config, tmp_path, **rm.trl_kwargs(settings, 128))
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    ours = rm.batches(data, tokenizer, 4, 128)(0)
    return trainer, ours


@pytest.fixture(scope="module")
def plain(tokenizer, tmp_path_factory):
    return _trainer(tokenizer, tmp_path_factory.mktemp("trl"))


def test_batches_are_identical(tokenizer, tmp_path):
    trainer, ours = _trainer(tokenizer, tmp_path, margin_scale=2.0)
    theirs = next(iter(trainer.get_train_dataloader()))
    assert torch.equal(theirs["input_ids"], ours.input_ids)  # (2B, T), chosen first
    assert torch.equal(theirs["attention_mask"], ours.attention_mask)
    torch.testing.assert_close(theirs["margin"], ours.margin)
    expected = torch.tensor([2.0 * (sc - sr) for *_, sc, sr in PAIRS])
    torch.testing.assert_close(ours.margin, expected)


def test_sequence_rewards_read_the_last_real_token_as_transformers_does(plain):
    """Our pooling (last position of the attention mask) equals transformers' (last token that is not the pad
    token) on a right-padded batch: SmolLM2's template ends with "<|im_end|>\\n", and "\\n" is not padding."""
    trainer, ours = plain
    assert (ours.attention_mask == 0).any()  # the batch is padded
    with torch.no_grad():
        theirs = trainer.model(input_ids=ours.input_ids, attention_mask=ours.attention_mask).logits.squeeze(-1)
        mine = rm.sequence_rewards(trainer.model, ours.input_ids, ours.attention_mask)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert theirs.std() > 1e-3  # the check means something only if the rewards differ


@pytest.mark.parametrize("margin_scale,center", [(0.0, None), (2.0, None), (0.0, 0.01), (1.5, 0.5)])
def test_loss_and_metrics_match_trl(tokenizer, tmp_path, margin_scale, center):
    trainer, ours = _trainer(tokenizer, tmp_path, margin_scale=margin_scale, center=center)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
        our_loss, metrics = rm.reward_step(trainer.model, ours, rm.Settings(center_rewards_coefficient=center))
    assert our_loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for name in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert metrics[name].item() == pytest.approx(logged[name], rel=1e-5, abs=1e-6), name


def test_margin_and_centering_change_the_loss(tokenizer, tmp_path):
    """Guards the parametrized test above: the variants really differ on this batch."""
    losses = {}
    for margin_scale, center in [(0.0, None), (2.0, None), (0.0, 0.5)]:
        trainer, ours = _trainer(tokenizer, tmp_path / f"{margin_scale}-{center}", margin_scale, center)
        with torch.no_grad():
            settings = rm.Settings(center_rewards_coefficient=center)
            losses[margin_scale, center] = rm.reward_step(trainer.model, ours, settings)[0].item()
    assert len({round(v, 6) for v in losses.values()}) == 3


def test_one_training_step_matches_trl_gradients(tokenizer, tmp_path):
    """After one update from the same adapters and head, our parameters equal TRL's (fp32, no autocast)."""
    trainer, ours = _trainer(tokenizer, tmp_path / "trl", center=0.01)
    model = trainer.model
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in start)  # the head is trained (peft's modules_to_save)
    trainer.train()
    theirs = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = start[n].clone()
    config = TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, bf16=False)
    train(model, lambda step: ours, rm.step_fn(rm.Settings(center_rewards_coefficient=0.01)), config,
          tmp_path / "ours", progress=False)
    moved = False
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), theirs[n], rtol=1e-4, atol=1e-6)
            moved |= not torch.equal(p.detach(), start[n])
    assert moved


def test_pairs_longer_than_max_length_are_dropped_like_trl(tokenizer, tmp_path, capsys):
    longest = max(len(r["chosen_ids"]) for r in tokenize_reward_pairs(ROWS, tokenizer))
    kept = tokenize_reward_pairs(ROWS, tokenizer, max_length=longest - 1)
    assert 0 < len(kept) < len(ROWS) and "dropped" in capsys.readouterr().out
    args = trl_config(RewardConfig, TrainConfig(steps=1, batch_size=1, learning_rate=1e-3, bf16=False), tmp_path,
                      max_length=longest - 1)
    trainer = RewardTrainer(model=tiny_reward_model(tokenizer, lora=LoraSettings(r=4, alpha=8)), args=args,
                            train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    assert len(trainer.train_dataset) == len(kept)
    assert trainer.train_dataset["chosen_ids"] == [r["chosen_ids"] for r in kept]
    with pytest.raises(ValueError, match="raise max_length"):
        tokenize_reward_pairs(ROWS, tokenizer, max_length=3)


def test_margin_needs_gold_scores_and_names_the_row():
    rows = [dict(ROWS[0]), {**ROWS[1], "score_rejected": None}]
    with pytest.raises(ValueError, match=r"row 1: field 'score_rejected'.*margin_scale=0"):
        rm.add_margin(Dataset.from_list(rows), 1.0)


def test_heldout_eval_and_probe(plain, tokenizer):
    trainer, _ = plain
    res = reward_eval.heldout_eval(trainer.model, tokenizer, ROWS, batch_size=3)
    assert res.chosen.shape == res.rejected.shape == (4,)
    assert 0 <= res.accuracy <= 1 and -1 <= res.spearman <= 1
    probe = reward_eval.make_probe(tokenizer, ROWS, batch_size=2)(trainer.model)
    assert probe == {"eval_accuracy": res.accuracy, "eval_spearman": pytest.approx(res.spearman, abs=1e-6)}


def test_saved_model_reloads_with_the_same_scores(plain, tokenizer, tmp_path):
    from peft import PeftModel

    trainer, _ = plain
    model = trainer.model
    reward_artifact.save_reward_model(model, tmp_path / "rm", {"seed": 0})
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text()) == {"seed": 0}
    base = tiny_reward_model(tokenizer)  # the same transformer ...
    with torch.no_grad():
        base.score.weight.normal_(0, 0.5)  # ... with another head: the saved one must replace it
    reloaded = PeftModel.from_pretrained(base, tmp_path / "rm")
    with torch.no_grad():
        a = reward_eval.score_pairs(model, tokenizer, ROWS)
        b = reward_eval.score_pairs(reloaded, tokenizer, ROWS)
    assert (a[0] != 0).all()
    for x, y in zip(a, b):
        assert x.tolist() == pytest.approx(y.tolist(), rel=1e-6)


def test_load_or_train_refuses_a_model_trained_otherwise(tmp_path, monkeypatch):
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "reward_model.json").write_text(json.dumps({"profile": "ci", "seed": 0, "task": "concise",
                                                          "config": {"margin_scale": 1.0}}))
    monkeypatch.setattr(reward_artifact, "load_saved_reward_model",
                        lambda f: (None, json.loads((f / "reward_model.json").read_text())))
    with pytest.raises(ValueError, match="trained with"):
        reward_artifact.load_or_train_reward_model("ci", folder=folder)


# README pitfall 2, on a tiny 4-bit model: TRL casts every trainable parameter of a quantized model to bf16,
# the score head included; without autocast the head then meets fp32 hidden states and fails.

@pytest.fixture(scope="module")
def quantized(tokenizer, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from rlcourse.models import disable_bnb_cpu_repack

    folder = tmp_path_factory.mktemp("tiny-rm")
    tiny_reward_model(tokenizer).save_pretrained(folder)

    def load():
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.bfloat16))
        assert disable_bnb_cpu_repack(model) > 0
        return model

    return load


@pytest.mark.parametrize("bf16", [False, True])
def test_pitfall2_trl_casts_the_score_head_to_bf16(quantized, tokenizer, tmp_path, bf16):
    from peft import get_peft_model

    model = get_peft_model(quantized(), LoraSettings(r=4, alpha=8).peft_config(task_type="SEQ_CLS"))
    head = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    assert head and head[0].dtype == torch.float32
    args = trl_config(RewardConfig, TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, bf16=bf16), tmp_path,
                      max_length=128)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    assert head[0].dtype == torch.bfloat16  # cast by TRL, whatever bf16 says
    batch = next(iter(trainer.get_train_dataloader()))
    if not bf16:
        with pytest.raises(RuntimeError, match="dtype"):
            trainer.compute_loss(trainer.model, dict(batch))
    else:  # use_cpu=True + bf16=True: autocast makes the head's input bf16 too (what our loop does)
        trainer.train()
        assert trainer.state.log_history[0]["loss"] > 0


def test_pitfall12_match_precision_undoes_trls_cast_in_fp32(quantized, tokenizer, tmp_path):
    """In fp32 (a CPU without native bf16) TRL's bf16 cast would make the run fail (above) or, for a policy, train
    bf16 adapters twice as slowly as ours: ``run_trl`` casts them back first (``match_precision``)."""
    from peft import get_peft_model

    model = get_peft_model(quantized(), LoraSettings(r=4, alpha=8).peft_config(task_type="SEQ_CLS"))
    args = trl_config(RewardConfig, TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, bf16=False), tmp_path,
                      max_length=128)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}  # TRL's cast
    log = run_trl(trainer)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert log.rows[0]["loss"] > 0 and log.rows[0]["grad_norm"] > 0


@pytest.mark.parametrize("bf16", [True, False])
def test_our_loop_casts_the_head_like_trl_and_runs(quantized, tokenizer, tmp_path, bf16):
    from peft import get_peft_model

    model = get_peft_model(quantized(), LoraSettings(r=4, alpha=8).peft_config(task_type="SEQ_CLS"))
    batches = rm.batches(ROWS, tokenizer, 4, None)
    log = train(model, batches, rm.step_fn(rm.Settings()),
                TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, bf16=bf16), tmp_path, progress=False)
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert all(p.dtype == dtype for p in model.parameters() if p.requires_grad)
    assert log.rows[0]["grad_norm"] > 0
    res = reward_eval.heldout_eval(model, tokenizer, ROWS)  # scoring outside training: autocast where the head is bf16
    assert res.chosen.dtype == res.rejected.dtype and len(res.chosen) == 4


def test_on_plain_text_transformers_reads_the_token_before_the_final_eos(plain, tokenizer):
    """Standard (non-chat) pairs get EOS appended, as RewardTrainer does; SmolLM2's EOS is its pad token, so
    transformers' pooling skips it and reads the token before, where ours reads the EOS itself. The lesson
    says so; the course's data are conversational, where the two agree (test above)."""
    trainer, _ = plain
    rows = [{"prompt": "Q: Why is the sky blue?\nA:", "chosen": " Scattering.", "rejected": " No idea, sorry."}]
    pair = tokenize_reward_pair(tokenizer, rows[0])
    assert pair["chosen_ids"][-1] == tokenizer.eos_token_id == tokenizer.pad_token_id
    batch = collate_reward_pairs([pair], tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
        mine = rm.sequence_rewards(trainer.model, batch.input_ids, batch.attention_mask)
        shorter = batch.attention_mask.clone()
        shorter[torch.arange(2), shorter.sum(-1) - 1] = 0  # drop the final EOS from our pooling
        before_eos = rm.sequence_rewards(trainer.model, batch.input_ids, shorter)
    assert not torch.allclose(mine, theirs)
    torch.testing.assert_close(before_eos, theirs, rtol=1e-5, atol=1e-6)


def test_load_or_train_trains_saves_and_then_loads_the_same_model(tokenizer, tmp_path, monkeypatch):
    """The path lessons 13 and 15 take, on the tiny model: no artifact -> train (ci profile) and save; then
    the same call loads it, frozen, with the trained scores."""
    import rlcourse.models as models

    def tiny_loader(lora=None, seed=0, tokenizer=tokenizer, **kwargs):
        return tiny_reward_model(tokenizer, seed=0 if lora is None else seed, lora=lora)

    monkeypatch.setattr(models, "load_reward_model", tiny_loader)
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: tokenizer)
    folder = tmp_path / "ci" / "reward_model"
    trained, meta = reward_artifact.load_or_train_reward_model("ci", folder=folder)
    assert (folder / "reward_model.json").exists() and (tmp_path / "ci" / "ours" / "checkpoint").exists()
    assert meta["profile"] == "ci" and meta["train"]["steps"] == 3 and 0 <= meta["heldout"]["accuracy"] <= 1
    loaded, meta2 = reward_artifact.load_or_train_reward_model("ci", folder=folder)
    assert meta2 == meta and not any(p.requires_grad for p in loaded.parameters())
    rows = ROWS[:2]
    a, b = reward_eval.score_pairs(trained, tokenizer, rows), reward_eval.score_pairs(loaded, tokenizer, rows)
    for x, y in zip(a, b):
        assert x.tolist() == pytest.approx(y.tolist(), abs=1e-2)  # bf16 training vs fp32 reload, under autocast
