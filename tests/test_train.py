"""The from-scratch loop: same seed -> identical metrics; an interrupted run resumes where it stopped."""

import json

import pytest
import torch

from rlcourse.metrics import MetricsLog
from rlcourse.methods import sft
from rlcourse.models import REF_ADAPTER, add_reference_adapter
from rlcourse.train import TrainConfig, train

from fixtures import sft_rows, tiny_policy

ROWS = sft_rows([("What is 2 + 2?", "4."), ("Name a fruit.", "An apple."), ("Say hi.", "Hi!"),
                 ("Colour of grass?", "Green."), ("Opposite of up?", "Down."), ("A pet?", "A cat.")])
CONFIG = TrainConfig(steps=5, batch_size=2, learning_rate=1e-2, checkpoint_every=2, seed=3)


def _run(tokenizer, out_dir, step_fn=None, **kwargs):
    model = tiny_policy(tokenizer)
    log = train(model, sft.batches(ROWS, tokenizer, 2, 64), step_fn or sft.step_fn(), CONFIG, out_dir,
                progress=False, **kwargs)
    return model, log


def _drop_time(log: MetricsLog):
    """The rows without the wall-clock ones (``step_time`` and the step breakdown, ``time/*``)."""
    return [{k: v for k, v in r.items() if k != "step_time" and not k.startswith("time/")} for r in log.rows]


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


def test_resuming_with_another_configuration_is_refused(tokenizer, policy, tmp_path):
    _run(tokenizer, tmp_path / "run")
    batches = sft.batches(sft_rows([("a", "b")]), tokenizer, 2, 64)
    other = TrainConfig(steps=5, batch_size=2, learning_rate=5e-3, checkpoint_every=2, seed=3)
    with pytest.raises(ValueError, match="different configuration"):
        train(policy, batches, sft.step_fn(), other, tmp_path / "run", progress=False)


def test_probe_results_are_merged_at_their_steps(tokenizer, tmp_path):
    seen = []

    def probe(model):
        seen.append(model.training)
        return {"gold": float(len(seen))}

    _, log = _run(tokenizer, tmp_path / "p", probe=probe, probe_at={0, 2, 5})
    assert [r["step"] for r in log.rows if "gold" in r] == [0, 2, 5]
    assert log.at(0) == {"step": 0, "gold": 1.0}


def test_resume_restores_a_moving_reference_adapter_and_the_step_functions_state(tokenizer, tmp_path):
    """TR-DPO's reference adapter moves during training and BCO's δ or DRO's values live in the step function:
    an interrupted run must come back with both, not with a fresh reference or a zeroed state."""
    from rlcourse.methods.dpo import sync_reference

    def stateful_step(crash_at=None):
        state = {"calls": 0, "seen": 0.0}

        def step(model, batch):
            state["calls"] += 1
            if state["calls"] == crash_at:
                raise KeyboardInterrupt
            sync_reference(model, 0.5)  # the reference follows the policy, as TR-DPO's does
            loss, metrics = sft.sft_step(model, batch)
            state["seen"] += loss.item()
            return loss, metrics

        step.state_dict = lambda: {"seen": state["seen"]}
        step.load_state_dict = lambda saved: state.update(saved)
        step.state = state
        return step

    def run(out_dir, step_fn):
        model = tiny_policy(tokenizer)
        add_reference_adapter(model)
        train(model, sft.batches(ROWS, tokenizer, 2, 64), step_fn, CONFIG, out_dir, progress=False)
        return model

    full_step = stateful_step()
    full = run(tmp_path / "full", full_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", stateful_step(crash_at=4))
    resumed_step = stateful_step()
    resumed = run(tmp_path / "run", resumed_step)

    assert resumed_step.state["seen"] == pytest.approx(full_step.state["seen"], rel=1e-6)
    ref = {n: p for n, p in full.named_parameters() if f".{REF_ADAPTER}." in n}
    assert ref
    for n, p in resumed.named_parameters():
        if n in ref:
            assert torch.equal(p, ref[n]), n


def test_a_checkpoint_with_step_state_refuses_a_step_function_without_it(tokenizer, tmp_path):
    def crash_after_state(model, batch, calls={"n": 0}):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return sft.sft_step(model, batch)

    crash_after_state.state_dict = lambda: {"x": 1}
    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, tmp_path / "run", step_fn=crash_after_state)
    with pytest.raises(ValueError, match="step function had state"):
        _run(tokenizer, tmp_path / "run", step_fn=sft.step_fn())


@pytest.mark.parametrize("method", ["bco", "dro"])
def test_bco_and_dro_steps_resume_through_train_with_their_state(tokenizer, tmp_path, method):
    """BCO's running δ and DRO's value table (and its Adam) come back from the checkpoint: an interrupted run ends
    where the uninterrupted one does, metrics, adapters and step state alike."""
    from rlcourse.data import unpaired_rows
    from rlcourse.methods import bco, dro, kto

    from fixtures import PREFERENCE_ROWS

    pairs = [{**r, "score_chosen": 1.0, "score_rejected": 0.2 * i} for i, r in enumerate(PREFERENCE_ROWS)]
    batches = kto.batches(unpaired_rows(pairs, seed=0), tokenizer, 2, 64)
    new_step = {"bco": lambda: bco.step_fn(bco.Settings(beta=0.5)),
                "dro": lambda: dro.step_fn(batches.n_prompts, dro.Settings(tau=0.5, value_lr=0.1))}[method]

    def crash_at_step_4(step):
        if step == 3:
            raise KeyboardInterrupt  # as if the user stopped the kernel during step 4
        return batches(step)

    def run(out_dir, walker, step_fn):
        model = tiny_policy(tokenizer)
        return model, train(model, walker, step_fn, CONFIG, out_dir, progress=False)

    full_step = new_step()
    model_full, full = run(tmp_path / "full", batches, full_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", crash_at_step_4, new_step())
    resumed_step = new_step()
    model_resumed, resumed = run(tmp_path / "run", batches, resumed_step)

    assert _drop_time(resumed) == _drop_time(full)
    for (n, p), (_, q) in zip(model_full.named_parameters(), model_resumed.named_parameters()):
        assert torch.equal(p, q), n
    if method == "bco":
        assert resumed_step.state_dict() == full_step.state_dict() and full_step.shift.count == 10  # 5 steps × 2
    else:
        assert torch.equal(resumed_step.values.values, full_step.values.values)
        assert full_step.values.values.abs().sum() > 0  # the values did move

