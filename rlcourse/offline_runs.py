"""What the offline lessons (01 SFT, 05–09 DPO and its family) run around a method: the policy, the gold evaluation
on held-out prompts, our run and TRL's from the same adapters with the same probes. A notebook keeps what its lesson
teaches: the data, the method's step and settings, the parity check, the plots.

    run = OfflineRun(task, eval_prompts, tok, P, out, seed, learning_rate)  # policy, probe, TrainConfig
    run.evaluate("base", base=True)                                          # greedy gold, adapters off
    ours = run.train_ours(batches, dpo.step_fn(settings))                    # our loop, with the probes
    theirs = run.train_trl(dpo, settings, train_rows, ours)                  # TRL's trainer, from the same start
"""

from __future__ import annotations

from pathlib import Path

from rlcourse import evaluate


class OfflineRun:
    """One offline lesson's runs: the policy and its start adapters, the held-out gold results (``gold``, greedy, by
    name), and training by our loop and by TRL from those adapters.

    P: the profile (steps, batch size, probes, checkpoints, generation sizes); ``learning_rate`` None: the profile's.
    Probes (gold and KL on the held-out prompts) run at ``probe_steps(P.steps, P.probe_every)``.
    """

    def __init__(self, task, eval_prompts, tokenizer, P, out, seed: int = 0, learning_rate: float | None = None):
        from rlcourse.models import LoraSettings, load_model, lora_state
        from rlcourse.probe import make_probe, probe_steps
        from rlcourse.sampling import SamplingSettings
        from rlcourse.train import TrainConfig

        self.task, self.eval_prompts, self.tok, self.P, self.out = task, eval_prompts, tokenizer, P, Path(out)
        self.policy = load_model(lora=LoraSettings(), seed=seed)
        self.initial_adapters = lora_state(self.policy)
        self.probe = make_probe(tokenizer, task, eval_prompts, max_new_tokens=P.max_new_tokens,
                                batch_size=P.eval_batch_size, seed=seed)
        self.probe_at = probe_steps(P.steps, every=P.probe_every)
        self.greedy = SamplingSettings(max_new_tokens=P.max_new_tokens, do_sample=False)
        self.config = TrainConfig(steps=P.steps, batch_size=P.batch_size,
                                  learning_rate=learning_rate or P.learning_rate, seed=seed,
                                  checkpoint_every=P.checkpoint_every)
        self.gold: dict = {}
        self.trainer = None  # the last TRL trainer, for checks on its own batches

    def evaluate(self, name: str, base: bool = False):
        """Greedy gold of the policy as it stands (``base``: adapters off) on the held-out prompts: ``gold[name]``."""
        self.gold[name] = evaluate.gold_eval(self.policy, self.tok, self.task, self.eval_prompts, self.greedy,
                                             self.P.eval_batch_size, base=base)
        print(f"{name}: {self.gold[name]}")
        return self.gold[name]

    def start_over(self) -> None:
        """Back to the start adapters (every run here starts from the same ones)."""
        from rlcourse.models import restore_lora

        restore_lora(self.policy, self.initial_adapters)

    def train_ours(self, batches, step_fn, name: str = "ours", folder: str = "ours", step0=None):
        """Our loop (``rlcourse.train.train``) from the start adapters, probed, its run in ``out/folder``; evaluated as
        ``gold[name]``. ``step0``: a log of another run from the same adapters whose step-0 probe this run reuses
        (the same model, the same seeded probe: the same row) instead of probing again."""
        from rlcourse.train import train

        self.start_over()
        log = train(self.policy, batches, step_fn, self.config, self.out / folder, resume=False, probe=self.probe,
                    probe_at=self.probe_at - {0} if step0 is not None else self.probe_at)
        if step0 is not None:
            log.merge([step0.at(0)])
        self.evaluate(name)
        return log

    def train_trl(self, method, settings, rows, ours, name: str = "TRL", folder: str = "trl",
                  rename: dict[str, str] | None = None):
        """TRL's trainer for ``method`` (``trl_classes``, ``trl_kwargs``) on ``rows``, from the start adapters, with the
        same config and probes; its log joins our step-0 probe (the same adapters: the same row), is saved in
        ``out/folder`` and returned; the result is evaluated as ``gold[name]``. ``rename``: TRL metric names to ours
        (KTO: its ``kl`` is our ``z0``). The trainer stays in ``self.trainer``."""
        from rlcourse.probe import ProbeCallback
        from rlcourse.trl_runs import run_trl, trl_config

        self.start_over()
        trainer_cls, config_cls = method.trl_classes()
        args = trl_config(config_cls, self.config, self.out / folder, **method.trl_kwargs(settings, self.P.max_length))
        trl_probe = ProbeCallback(self.probe, self.probe_at - {0})
        self.trainer = trainer_cls(model=self.policy, args=args, train_dataset=rows, processing_class=self.tok,
                                   callbacks=[trl_probe])
        log = run_trl(self.trainer)
        for old, new in (rename or {}).items():
            for row in log.rows:
                if old in row:
                    row[new] = row.pop(old)
        log = log.merge(trl_probe.rows + [ours.at(0)])
        log.save(self.out / folder)
        self.evaluate(name)
        return log
