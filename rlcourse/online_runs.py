"""What the online lessons (11 RLOO, 12 GRPO, and the ones after them) run around a method, the same for every
online method module (``rlcourse.methods.rloo``, ``rlcourse.methods.grpo``), so a notebook keeps only what its lesson
teaches: the method's settings, its parity check, its plots and variants.

    run = OnlineRun(grpo, task, sizes, P, out, seed)   # policy, held-out prompts, probe, rollout and train configs
    run.evaluate("base", base=True)                    # gold: sampled (what RL maximises) and greedy
    start = run.warm_start()                           # SFT on demonstrations, then a frozen "ref" copy of it
    ours = run.train_ours(settings)                    # our loop
    trainer = run.trl_trainer(settings)                # TRL's trainer, from the same adapters
    theirs = run.train_trl(trainer, ours)              # ... trained, with the same probes
    reruns = run.rerun_with_seeds(settings, seeds)     # the run-to-run noise a gain must clear
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlcourse import evaluate
from rlcourse.methods.rollouts import RolloutSettings, Rollouts, trl_metrics, trl_online_config
from rlcourse.sampling import SamplingSettings

SYSTEM: str | None = None
"""The online lessons' system message (their notebooks' ``system_prompt``, ``get_task(name, system=SYSTEM)``). None:
SmolLM2's chat template adds its default system prompt, 16 of an arithmetic prompt's 47 tokens. An empty one ("")
would leave 5 markup tokens and cut the tokens TRL's side computes by a third (it forwards every completion with its
prompt), but GRPO's gains vanished without it in our runs (lesson 11, "The system prompt stays")."""


class OnlineRun:
    """One online lesson's runs: the policy, its held-out gold results, and our and TRL's training of ``method``.

    method: an online method module. sizes: the lesson's ``rlcourse.profiles.OnlineSizes`` (or any object with
    those fields). P: the profile (steps, batch size, probes, checkpoints). trl_generation: how TRL's trainer samples
    (``rlcourse.trl_rollouts``): "engine", through the rollout engine ours uses, as TRL samples through vLLM on a GPU
    (a fifth of its step saved on a CPU, ``make bench``), or "transformers", its own ``model.generate``. Training
    prompts are the task's train split shuffled with ``seed``; held-out prompts its first ``sizes.n_eval`` eval
    prompts. ``gold`` and ``gold_greedy`` collect ``evaluate``'s results by name.
    """

    def __init__(self, method, task, sizes, P, out, seed: int = 0, temperature: float = 1.0,
                 trl_generation: str = "engine"):
        from rlcourse.models import LoraSettings, load_model, load_tokenizer
        from rlcourse.probe import make_probe, probe_steps
        from rlcourse.train import TrainConfig
        from rlcourse.trl_rollouts import trl_trainer_class

        self.method, self.task, self.sizes, self.P, self.out, self.seed = method, task, sizes, P, Path(out), seed
        self.trl_trainer_cls = trl_trainer_class(method, trl_generation)
        self.train_rows = task.prompts("train").shuffle(seed=seed)
        held_out = task.prompts("eval")
        self.eval_prompts = held_out.select(range(min(sizes.n_eval, len(held_out))))
        self.tok = load_tokenizer()
        self.policy = load_model(lora=LoraSettings(), seed=seed)
        self.greedy = SamplingSettings(max_new_tokens=sizes.max_new_tokens, do_sample=False)
        self.sampled = SamplingSettings(max_new_tokens=sizes.max_new_tokens, do_sample=True, temperature=1.0)
        self.gold: dict = {}
        self.gold_greedy: dict = {}
        self.start_name = "base"
        self.rollout = RolloutSettings(
            num_generations=sizes.num_generations, prompts_per_step=sizes.prompts_per_step,
            sampling=SamplingSettings(max_new_tokens=sizes.max_new_tokens, do_sample=True, temperature=temperature,
                                      top_p=1.0))
        self.train_config = TrainConfig(steps=sizes.steps, batch_size=self.rollout.completions_per_step,
                                        learning_rate=sizes.learning_rate, seed=seed,
                                        checkpoint_every=P.checkpoint_every)
        self.probe_prompts = self.eval_prompts.select(range(min(sizes.n_probe, len(self.eval_prompts))))
        self.probe = make_probe(self.tok, task, self.probe_prompts, max_new_tokens=sizes.max_new_tokens,
                                batch_size=P.eval_batch_size, seed=seed)
        # ci: one probe, at the end (the step-0 one costs a whole evaluation)
        self.probe_at = {sizes.steps} if P.name == "ci" else probe_steps(sizes.steps, every=sizes.probe_every)
        self.rollouts: Rollouts | None = None
        self.initial_adapters: dict | None = None
        self.logs: dict = {}  # "ours", "TRL": the main runs' logs
        self.summary: dict = {}  # "sampled", "greedy": evaluate.report's, once ``report`` ran
        self.seeds: list[int] = []
        self.noise: dict = {}  # evaluate.report_runs', once ``rerun_with_seeds`` ran
        self.gap: dict = {}  # the sampler/policy gap of our run, once ``sampler_gap`` ran
        self.label = method.__name__.rsplit(".", 1)[-1].upper()  # "RLOO", "GRPO": plot titles

    def sampled_gold(self, base: bool = False, prompts=None):
        """Gold of the policy as it stands: the mean of ``eval_samples`` samples per held-out prompt (``prompts``:
        other held-out prompts, e.g. the probes'); ``base``: of the base model, ``base_eval_samples`` per prompt."""
        prompts = self.eval_prompts if prompts is None else prompts
        samples = self.sizes.base_eval_samples if base else self.sizes.eval_samples
        return evaluate.gold_eval(self.policy, self.tok, self.task, prompts, self.sampled,
                                  self.P.eval_batch_size, base=base, samples=samples)

    def evaluate(self, name: str, base: bool = False) -> None:
        """Gold on the held-out prompts under ``name``: sampled (the policy's expected reward, what RL maximises)
        and greedy; ``base``: with the adapters off."""
        self.gold[name] = self.sampled_gold(base)
        self.gold_greedy[name] = evaluate.gold_eval(self.policy, self.tok, self.task, self.eval_prompts, self.greedy,
                                                    self.P.eval_batch_size, base=base)
        print(f"{name}: sampled {self.gold[name]}   greedy {self.gold_greedy[name]}")

    def warm_start(self) -> str:
        """SFT on the task's demonstrations (``sizes.warm_start_steps``; none when 0), then a frozen "ref" copy of
        the SFT adapter, as TRL makes one of the adapter it gets: RL starts from there, with it as the reference.
        Evaluates the start, remembers the adapters both runs start from, and returns the start's name."""
        from rlcourse.methods import sft
        from rlcourse.models import add_reference_adapter, lora_state

        if self.sizes.warm_start_steps:
            sft.warm_start(self.policy, self.tok, self.task, self.sizes.warm_start_steps, self.P.batch_size,
                           self.sizes.warm_start_learning_rate, self.sizes.warm_start_max_length,
                           self.out / "warm_start", seed=self.seed)
            add_reference_adapter(self.policy)
            self.start_name = "SFT start"
            self.evaluate(self.start_name)
        self.initial_adapters = lora_state(self.policy)
        return self.start_name

    def train_ours(self, settings):
        """Our loop from the start adapters, with the probes; evaluates the result as "ours". The rollouts are kept
        in ``self.rollouts`` (their first batch feeds the parity check)."""
        from rlcourse.train import train

        self.rollouts = Rollouts(self.policy, self.tok, self.train_rows, self.task.reward, self.rollout, seed=self.seed)
        log = train(self.policy, self.rollouts, self.method.step_fn(settings, self.rollout), self.train_config,
                    self.out / "ours", resume=False, probe=self.probe, probe_at=self.probe_at)
        self.evaluate("ours")
        self.logs["ours"] = log
        return log

    def trl_trainer(self, settings):
        """TRL's trainer for the method, on the policy back at the start adapters. TRL makes its own "ref" copy when
        β ≠ 0; with β = 0 it needs none, but the probes' KL to the reference does, so ours is put back."""
        from rlcourse.models import REF_ADAPTER, add_reference_adapter, remove_reference_adapter, restore_lora
        from rlcourse.probe import ProbeCallback

        remove_reference_adapter(self.policy)
        restore_lora(self.policy, self.initial_adapters)
        self.trl_probe = ProbeCallback(self.probe, self.probe_at - {0})  # step 0: the same adapters as ours
        trainer = self.trl_trainer_cls(model=self.policy, reward_funcs=self.task.reward,
                                       args=trl_online_config(self.method, settings, self.rollout, self.train_config,
                                                              self.out / "trl"),
                                       train_dataset=self.train_rows, processing_class=self.tok,
                                       callbacks=[self.trl_probe])
        if self.sizes.warm_start_steps and REF_ADAPTER not in self.policy.peft_config:
            add_reference_adapter(self.policy)
        return trainer

    def train_trl(self, trainer, ours):
        """Train ``trainer``; its log (per-token KL renamed ``kl_token``) with our step-0 probe and its own probes,
        saved; evaluates the result as "TRL"."""
        from rlcourse.trl_runs import run_trl

        start = [{k: ours.at(0)[k] for k in ("step", "gold", "kl")}] if "gold" in ours.at(0) else []
        log = trl_metrics(run_trl(trainer)).merge(start + self.trl_probe.rows)
        log.save(self.out / "trl")
        self.evaluate("TRL")
        self.logs["TRL"] = log
        return log

    def report(self) -> tuple[dict, dict]:
        """The gold results against the start, sampled then greedy (``evaluate.report``), and a look at samples."""
        print(f"sampled, the mean of {self.sizes.eval_samples} samples per held-out prompt (the base model's: "
              f"{self.sizes.base_eval_samples}), the reward RL maximises:")
        self.summary["sampled"] = evaluate.report(self.gold, baseline=self.start_name)
        print("greedy:")
        self.summary["greedy"] = evaluate.report(self.gold_greedy, baseline=self.start_name)
        evaluate.show_samples(self.gold_greedy, k=4)
        return self.summary["sampled"], self.summary["greedy"]

    def sampler_gap(self) -> dict:
        """How far the rollout engine's log-probs were from the 4-bit policy's on the tokens our run sampled
        (``sampling/sampling_logp_difference/*``, per step): plotted to ``sampler_gap.png``, summarised, and asserted
        within this precision's bound (``rlcourse.parity.Tolerance.sampler_gap``); a sampler that missed a sync
        drifts past it. Returns {"mean": mean of the per-step means, "max": the largest, "bound": the bound}."""
        from rlcourse import plots
        from rlcourse.parity import tolerance

        ours, names = self.logs["ours"], ["sampling/sampling_logp_difference/mean",
                                          "sampling/sampling_logp_difference/max"]
        plots.overlay({"ours": ours}, names, f"{self.label}: |log π_sampler − log π_policy| per sampled token",
                      self.out / "sampler_gap.png")
        means, largest = ([v for v in ours[name] if v is not None] for name in names)  # probe-only rows have none
        self.gap = {"mean": sum(means) / len(means), "max": max(largest), "bound": tolerance().sampler_gap}
        print(f"sampler/policy gap over the run: mean of the per-step means {self.gap['mean']:.2e}, largest "
              f"{self.gap['max']:.2e} (bound {self.gap['bound']:g}, {len(means)} steps)")
        if self.gap["max"] >= self.gap["bound"]:
            raise AssertionError(f"the sampler's log-probs drifted {self.gap['max']:.3g} from the policy's (bound "
                                 f"{self.gap['bound']:g}): is it synced after every optimizer step?")
        return self.gap

    def rerun_with_seeds(self, settings, seeds) -> tuple[dict, dict]:
        """Both loops again from the start adapters, once per seed in ``seeds``; returns the reruns,
        {"ours": [(seed, log, gold), ...], "TRL": [...]}, and the gains of all the runs over the start
        (``evaluate.report_runs``, printed), and plots each run's gain and every run's training reward.

        A seed changes only the order of the training prompts (the task's train split shuffled with it), the
        rollouts' sampling and TRL's own seed: what separates two runs of the same recipe, so the spread of their
        gold gains is the run-to-run noise a claimed gain must beat (``evaluate.gain_over_runs``). Probes are left
        out to save time. Our runs see the "ref" adapter rebuilt from the start adapters when the policy had one;
        TRL's trainer is given the policy without it and makes its own, as in the main runs. Logs go to
        ``out/seeds/ours-<seed>`` and ``out/seeds/trl-<seed>``.
        """
        from rlcourse import plots
        from rlcourse.models import REF_ADAPTER, add_reference_adapter, remove_reference_adapter, restore_lora
        from rlcourse.train import train
        from rlcourse.trl_runs import run_trl

        if not seeds:
            print("extra_seeds=0: one run a side. Set extra_seeds (e.g. 4) to measure the run-to-run noise a gain "
                  "must clear.")
            return {}, {}
        policy, out_dir = self.policy, self.out / "seeds"
        with_ref = REF_ADAPTER in policy.peft_config

        def back_to_start(ref: bool) -> None:
            remove_reference_adapter(policy)
            restore_lora(policy, self.initial_adapters)
            if ref:  # a frozen copy of the start adapters, as before the main runs
                add_reference_adapter(policy)

        reruns = {"ours": [], "TRL": []}
        for seed in seeds:
            rows = self.task.prompts("train").shuffle(seed=seed)
            tc = replace(self.train_config, seed=seed)

            back_to_start(with_ref)
            log = train(policy, Rollouts(policy, self.tok, rows, self.task.reward, self.rollout, seed=seed),
                        self.method.step_fn(settings, self.rollout), tc, out_dir / f"ours-{seed}", resume=False,
                        progress=False)
            reruns["ours"].append((seed, log, self.sampled_gold()))

            back_to_start(False)  # TRL adds its own "ref" when it needs one
            trainer = self.trl_trainer_cls(model=policy, reward_funcs=self.task.reward, train_dataset=rows,
                                           processing_class=self.tok,
                                           args=trl_online_config(self.method, settings, self.rollout, tc,
                                                                  out_dir / f"trl-{seed}"))
            log = trl_metrics(run_trl(trainer))
            log.save(out_dir / f"trl-{seed}")
            reruns["TRL"].append((seed, log, self.sampled_gold()))
            del trainer
        back_to_start(with_ref)  # leave the policy as it came

        runs_gold = {name: [self.gold[name]] + [g for _, _, g in reruns[name]] for name in ("ours", "TRL")}
        self.seeds = [self.seed] + list(seeds)
        print(f"seeds {self.seeds}; gold sampled, {self.sizes.eval_samples} per prompt; gain over {self.start_name}:")
        self.noise = evaluate.report_runs(self.gold[self.start_name], runs_gold, baseline=self.start_name)
        plots.gains_by_run(self.noise, self.start_name, f"{self.label}: gold gain of each seed's run",
                           self.out / "seeds.png")
        plots.overlay({f"{name} seed {s}": log for name in ("ours", "TRL")
                       for s, log in [(self.seed, self.logs[name])] + [(s, l) for s, l, _ in reruns[name]]},
                      ["reward"], f"{self.label}: training reward of every run", self.out / "seeds_reward.png")
        return reruns, self.noise

    def train_variant(self, name: str, settings, rollout: RolloutSettings, steps: int):
        """Our loop with other settings (and rollouts) for ``steps`` steps from the start adapters, no probes; the
        variant's gold (sampled, on the probes' ``n_probe`` held-out prompts: a variant is a quick look, not a claim)
        is taken when the profile is not ``ci`` (there a variant only exercises the code). Returns (log, gold or
        None)."""
        from rlcourse.models import restore_lora
        from rlcourse.train import train

        restore_lora(self.policy, self.initial_adapters)
        tc = replace(self.train_config, steps=steps, batch_size=rollout.completions_per_step)
        log = train(self.policy, Rollouts(self.policy, self.tok, self.train_rows, self.task.reward, rollout,
                                          seed=self.seed),
                    self.method.step_fn(settings, rollout), tc, self.out / "variants" / name, resume=False,
                    progress=False)
        gold = None if self.P.name == "ci" else self.sampled_gold(prompts=self.probe_prompts)
        if gold is not None:
            print(f"{name:>12}: gold {gold}")
        return log, gold

    def save_results(self, settings, parity: list, variants: dict, variant_steps: int) -> None:
        """``results.json``: the sizes, settings, gold (sampled and greedy, against the start), the run-to-run noise,
        the parity on fixed completions, the KL at the end and the variants' gold."""
        import json
        from dataclasses import asdict

        ours, theirs = self.logs["ours"], self.logs["TRL"]
        (self.out / "results.json").write_text(json.dumps({
            "profile": self.P.name, "sizes": asdict(self.sizes),
            "config": {k: str(v) for k, v in {**vars(settings), **vars(self.rollout)}.items()},
            "gold_start": self.start_name, "gold": self.summary["sampled"], "gold_greedy": self.summary["greedy"],
            "run_to_run": {"seeds": self.seeds, **self.noise}, "parity_fixed_completions": parity,
            "sampler_gap": self.gap,
            "kl_end": {"ours": ours.at(self.sizes.steps).get("kl"), "TRL": theirs.at(self.sizes.steps).get("kl")},
            "variants": {k: {"gold_mean": v.mean, "steps": variant_steps} for k, v in variants.items()},
        }, indent=1))
        print("wrote", self.out / "results.json")
