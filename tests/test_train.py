"""The from-scratch loop: same seed -> identical metrics; an interrupted run resumes where it stopped."""

import json

import pytest
import torch

from rlcourse.metrics import MetricsLog
from rlcourse.methods import sft
from rlcourse.models import LoraSettings, tiny_model
from rlcourse.train import TrainConfig, train

QA = [("What is 2 + 2?", "4."), ("Name a fruit.", "An apple."), ("Say hi.", "Hi!"), ("Colour of grass?", "Green."),
      ("Opposite of up?", "Down."), ("A pet?", "A cat.")]
CONFIG = TrainConfig(steps=5, batch_size=2, learning_rate=1e-2, checkpoint_every=2, seed=3)


def _run(tokenizer, out_dir, step_fn=None, **kwargs):
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in QA]
    model = tiny_model(tokenizer, seed=0, lora=LoraSettings(r=4, alpha=8))
    batches = sft.batch_fn(sft.tokenize_dataset(rows, tokenizer), 2, tokenizer.pad_token_id, 64)
    log = train(model, batches, step_fn or sft.step_fn(), CONFIG, out_dir, progress=False, **kwargs)
    return model, log


def _drop_time(log: MetricsLog):
    return [{k: v for k, v in r.items() if k != "step_time"} for r in log.rows]


def test_same_seed_gives_identical_metrics(tokenizer, tmp_path):
    _, a = _run(tokenizer, tmp_path / "a")
    _, b = _run(tokenizer, tmp_path / "b")
    assert _drop_time(a) == _drop_time(b)
    assert a["loss"][-1] < a["loss"][0]  # and it learns


def test_interrupted_run_resumes_to_the_same_result(tokenizer, tmp_path):
    model_full, full = _run(tokenizer, tmp_path / "full")

    calls = {"n": 0}

    def crash_at_step_4(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # as if the user stopped the kernel during step 4
        return sft.sft_step(model, batch)

    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, tmp_path / "run", step_fn=crash_at_step_4)
    saved = json.loads((tmp_path / "run" / "checkpoint" / "progress.json").read_text())
    assert saved["step"] == 2  # the last checkpoint survived the crash
    assert len(MetricsLog.load(tmp_path / "run")) == 2  # and so did the metrics log

    model_resumed, resumed = _run(tokenizer, tmp_path / "run")
    assert _drop_time(resumed) == _drop_time(full)
    for (n, p), (_, q) in zip(model_full.named_parameters(), model_resumed.named_parameters()):
        assert torch.equal(p, q), n
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_finished_run_is_reused_and_restart_keeps_the_old_one(tokenizer, tmp_path):
    _, first = _run(tokenizer, tmp_path / "run")
    calls = {"n": 0}

    def counting(model, batch):
        calls["n"] += 1
        return sft.sft_step(model, batch)

    _, again = _run(tokenizer, tmp_path / "run", step_fn=counting)
    assert calls["n"] == 0 and _drop_time(again) == _drop_time(first)
    _run(tokenizer, tmp_path / "run", resume=False)
    assert list(tmp_path.glob("run.bak-*")), "resume=False must move the previous run aside, not delete it"


def test_resuming_with_another_configuration_is_refused(tokenizer, tmp_path):
    _run(tokenizer, tmp_path / "run")
    rows = [{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}]
    model = tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    batches = sft.batch_fn(sft.tokenize_dataset(rows, tokenizer), 2, tokenizer.pad_token_id, 64)
    other = TrainConfig(steps=5, batch_size=2, learning_rate=5e-3, checkpoint_every=2, seed=3)
    with pytest.raises(ValueError, match="different configuration"):
        train(model, batches, sft.step_fn(), other, tmp_path / "run", progress=False)


def test_probe_results_are_merged_at_their_steps(tokenizer, tmp_path):
    seen = []

    def probe(model):
        seen.append(model.training)
        return {"gold": float(len(seen))}

    _, log = _run(tokenizer, tmp_path / "p", probe=probe, probe_at={0, 2, 5})
    assert [r["step"] for r in log.rows if "gold" in r] == [0, 2, 5]
    assert log.at(0) == {"step": 0, "gold": 1.0}
