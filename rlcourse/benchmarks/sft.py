"""Benchmark rows for SFT: our loop vs TRL's SFTTrainer on the same demonstrations (see rlcourse.bench)."""

from __future__ import annotations

from rlcourse.bench import StepTimer


def _setup(batch_size: int, steps: int):
    from rlcourse.models import LoraSettings, load_model, load_tokenizer
    from rlcourse.tasks import get_task

    tok = load_tokenizer()
    rows = get_task("concise").sft("train").select(range(batch_size * steps))
    return tok, rows, load_model(lora=LoraSettings(), seed=0)


def ours(batch_size: int, steps: int, out) -> list[float]:
    from rlcourse.methods import sft
    from rlcourse.train import TrainConfig, train

    tok, rows, model = _setup(batch_size, steps)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4, checkpoint_every=10**9)
    batches = sft.batch_fn(sft.tokenize_dataset(rows, tok), batch_size, tok.pad_token_id, 256)
    return train(model, batches, sft.step_fn(), config, out, resume=False, progress=False)["step_time"]


def trl(batch_size: int, steps: int, out) -> list[float]:
    from trl import SFTConfig, SFTTrainer

    from rlcourse.train import TrainConfig
    from rlcourse.trl_runs import run_trl, trl_config

    tok, rows, model = _setup(batch_size, steps)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4)
    args = trl_config(SFTConfig, config, out, max_length=256, completion_only_loss=True, disable_tqdm=True)
    timer = StepTimer()
    run_trl(SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[timer]))
    return timer.times


BENCH = {"ours": ours, "TRL": trl}
