"""Benchmark rows for reward models: our loop vs TRL's RewardTrainer on the same preference pairs (see
rlcourse.bench). ``batch_size`` counts pairs, so each step runs 2 × batch_size sequences."""

from __future__ import annotations

from rlcourse.bench import StepTimer


def _setup(batch_size: int, steps: int):
    from rlcourse.methods import reward_model as rm
    from rlcourse.models import LoraSettings, load_reward_model, load_tokenizer
    from rlcourse.tasks import get_task

    tok = load_tokenizer()
    rows = rm.training_pairs(get_task("concise"), batch_size * steps, batch_size)
    return tok, rows, load_reward_model(lora=LoraSettings(), seed=0, tokenizer=tok)


def ours(batch_size: int, steps: int, out) -> list[float]:
    from rlcourse.methods import reward_model as rm
    from rlcourse.train import TrainConfig, train

    tok, rows, model = _setup(batch_size, steps)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4, checkpoint_every=10**9)
    rm_config = rm.RewardModelConfig()
    batches = rm.batch_fn(rm.tokenize_pairs(rows, tok, rm_config.max_length), batch_size, tok.pad_token_id)
    return train(model, batches, rm.step_fn(rm_config), config, out, resume=False, progress=False)["step_time"]


def trl(batch_size: int, steps: int, out) -> list[float]:
    from trl import RewardConfig, RewardTrainer

    from rlcourse.methods import reward_model as rm
    from rlcourse.train import TrainConfig
    from rlcourse.trl_runs import run_trl, trl_config

    tok, rows, model = _setup(batch_size, steps)
    rm_config = rm.RewardModelConfig()
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4)
    args = trl_config(RewardConfig, config, out, max_length=rm_config.max_length,
                      center_rewards_coefficient=rm_config.center_rewards_coefficient, disable_tqdm=True)
    timer = StepTimer()
    run_trl(RewardTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[timer]))
    return timer.times


BENCH = {"ours": ours, "TRL": trl}
