"""Benchmark rows for ORPO: our loop vs TRL's ORPOTrainer on the same preference pairs (see rlcourse.bench)."""

from __future__ import annotations

from rlcourse.bench import StepTimer
from rlcourse.benchmarks.dpo import MAX_LENGTH, _setup


def ours(batch_size: int, steps: int, out) -> list[float]:
    from rlcourse.methods import reference_free as rf
    from rlcourse.train import TrainConfig, train

    tok, rows, model = _setup(batch_size, steps)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4, checkpoint_every=10**9)
    batches = rf.batch_fn(rf.tokenize_dataset(rows, tok, MAX_LENGTH), batch_size, tok.pad_token_id, MAX_LENGTH)
    return train(model, batches, rf.orpo_step_fn(), config, out, resume=False, progress=False)["step_time"]


def trl(batch_size: int, steps: int, out) -> list[float]:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from rlcourse.methods import reference_free as rf
    from rlcourse.train import TrainConfig
    from rlcourse.trl_runs import run_trl, trl_config

    tok, rows, model = _setup(batch_size, steps)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4)
    args = trl_config(ORPOConfig, config, out, disable_tqdm=True, **rf.trl_orpo_kwargs(rf.ORPOSettings(), MAX_LENGTH))
    timer = StepTimer()
    run_trl(ORPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[timer]))
    return timer.times


BENCH = {"ours": ours, "TRL": trl}
