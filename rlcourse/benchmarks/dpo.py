"""Benchmark rows for DPO: our loop vs TRL's DPOTrainer on the same preference pairs (see rlcourse.bench)."""

from __future__ import annotations

from rlcourse.bench import StepTimer

MAX_LENGTH = 256
"""Longest prompt + completion; the concise task's pairs fit, so neither side truncates."""


def _setup(batch_size: int, steps: int):
    from rlcourse.models import LoraSettings, load_model, load_tokenizer
    from rlcourse.tasks import get_task

    tok = load_tokenizer()
    rows = get_task("concise").preferences("train").select(range(batch_size * steps))
    return tok, rows, load_model(lora=LoraSettings(), seed=0)


def ours(batch_size: int, steps: int, out) -> list[float]:
    from rlcourse.methods import dpo
    from rlcourse.train import TrainConfig, train

    tok, rows, model = _setup(batch_size, steps)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4, checkpoint_every=10**9)
    batches = dpo.batch_fn(dpo.tokenize_dataset(rows, tok, MAX_LENGTH), batch_size, tok.pad_token_id, MAX_LENGTH)
    return train(model, batches, dpo.step_fn(), config, out, resume=False, progress=False)["step_time"]


def trl(batch_size: int, steps: int, out) -> list[float]:
    from trl import DPOConfig, DPOTrainer

    from rlcourse.methods import dpo
    from rlcourse.train import TrainConfig
    from rlcourse.trl_runs import run_trl, trl_config

    tok, rows, model = _setup(batch_size, steps)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4)
    args = trl_config(DPOConfig, config, out, disable_tqdm=True, **dpo.trl_kwargs(dpo.DPOSettings(), MAX_LENGTH))
    timer = StepTimer()
    run_trl(DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[timer]))
    return timer.times


BENCH = {"ours": ours, "TRL": trl}
