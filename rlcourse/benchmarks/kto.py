"""Benchmark rows for KTO: our loop vs TRL's KTOTrainer on the same unpaired rows (see rlcourse.bench).

A KTO step runs four forwards (policy and reference, each on the rows and on the mismatched KL pairs), so expect
it to be the slowest of the offline methods per step.
"""

from __future__ import annotations

from rlcourse.bench import StepTimer
from rlcourse.benchmarks.dpo import MAX_LENGTH, _setup


def _rows(batch_size: int, steps: int):
    from rlcourse.methods import kto

    tok, pairs, model = _setup(batch_size, steps)  # batch_size × steps pairs: twice the unpaired rows needed
    return tok, kto.unpaired_rows(pairs)[: batch_size * steps], model


def ours(batch_size: int, steps: int, out) -> list[float]:
    from rlcourse.methods import kto
    from rlcourse.train import TrainConfig, train

    tok, rows, model = _rows(batch_size, steps)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4, checkpoint_every=10**9)
    batches = kto.batch_fn(kto.tokenize_dataset(rows, tok, MAX_LENGTH), batch_size, tok.pad_token_id, MAX_LENGTH)
    return train(model, batches, kto.kto_step_fn(), config, out, resume=False, progress=False)["step_time"]


def trl(batch_size: int, steps: int, out) -> list[float]:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from rlcourse.methods import kto
    from rlcourse.train import TrainConfig
    from rlcourse.trl_runs import run_trl, trl_config

    tok, rows, model = _rows(batch_size, steps)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4)
    args = trl_config(KTOConfig, config, out, disable_tqdm=True, **kto.trl_kto_kwargs(kto.KTOSettings(), MAX_LENGTH))
    timer = StepTimer()
    run_trl(KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                       callbacks=[timer]))
    return timer.times


BENCH = {"ours": ours, "TRL": trl}
