"""What the parity and step tests share: the tiny policy, a LoRA perturbation, a TRL trainer built for a method
module, the rows they train on and the reward of the online runs. ``conftest.py`` wraps the trainer factory as the
``make_trainer`` fixture; a parity test starts from it::

    @pytest.fixture(scope="module")
    def trainer(make_trainer):
        return make_trainer(dpo, dpo.Settings())  # PREFERENCE_ROWS, LoRA B perturbed (seed 1, scale 0.3)

    def test_loss_matches_trl(trainer, tokenizer):
        theirs = next(iter(trainer.get_train_dataloader()))
        ours = dpo.batches(PREFERENCE_ROWS, tokenizer, 4, MAX_LENGTH)(0)
        ...
"""

from __future__ import annotations

import torch
from datasets import Dataset

from rlcourse.methods import rollouts
from rlcourse.models import LoraSettings, tiny_model
from rlcourse.sampling import SamplingSettings
from rlcourse.train import TrainConfig
from rlcourse.trl_runs import trl_config

MAX_LENGTH = 64
"""Token budget of the offline parity runs: every row of the rows below fits."""

PREFERENCE_ROWS = [
    {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
     "rejected": [{"role": "assistant", "content": r}]}
    for q, c, r in [
        ("Why is the sky blue?", "Air scatters blue light.", "Because it is. The sky is blue because blue."),
        ("2 + 2?", "4", "5, or maybe 22."),
        ("Name a planet.", "Mars, the red planet.", "Pluto"),
        ("Say hi.", "Hi!", "Goodbye, and a long farewell to you all."),
    ]
]
"""Four conversational preference pairs of uneven lengths (so a batch is padded)."""

SFT_ROWS = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in PREFERENCE_ROWS]
"""The same prompts with their chosen answers, as prompt-completion rows."""


def sft_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    """Conversational prompt-completion rows from (question, answer) pairs."""
    return [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in pairs]


ROLLOUT = rollouts.RolloutSettings(num_generations=4, prompts_per_step=2, sampling=SamplingSettings(max_new_tokens=6))
"""The online parity runs' rollouts: G = 4 completions of at most 6 tokens for each of 2 prompts."""
ONLINE_PERTURB = (1, 0.05)
"""(seed, scale) of the online parity runs' LoRA perturbation (``perturb_lora``); the offline runs use (1, 0.3)."""


def length_reward(prompts, completions, **kwargs):
    """A deterministic reward with spread on a random model's gibberish: characters modulo 7."""
    return [float(len(c[-1]["content"]) % 7) for c in completions]


def arithmetic_prompts(n: int) -> list[dict]:
    """The first ``n`` prompt-only rows of the arithmetic task's train split, with the online lessons' system message
    (``rlcourse.online_runs.SYSTEM``): the online runs' prompts."""
    from rlcourse.online_runs import SYSTEM
    from rlcourse.tasks import get_task

    return list(get_task("arithmetic", system=SYSTEM).prompts("train").select(range(n)))


def tiny_policy(tokenizer):
    """The tiny random 2-layer model with fresh LoRA adapters (r = 4, α = 8; B = 0, so policy = base)."""
    return tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))


@torch.no_grad()
def perturb_lora(model, seed: int, scale: float) -> None:
    """Move the policy away from the reference: every B of the trained ("default") adapter drawn from N(0, scale²),
    tensor after tensor from one generator seeded with ``seed``. Fresh LoRA (B = 0) sits where every loss is at a
    trivial point. Other adapters (TRL's "ref" copy) are left alone."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name and ".default." in name:
            p.normal_(0, scale, generator=g)


def train_config(batch_size: int) -> TrainConfig:
    """One fp32 step of ``batch_size`` examples: the run both sides of a parity test are configured for."""
    return TrainConfig(steps=1, batch_size=batch_size, learning_rate=1e-3, bf16=False)


def trl_trainer(method, settings, rows, tokenizer, output_dir, *, max_length: int | None = MAX_LENGTH,
                batch_size: int = 4, rollout: rollouts.RolloutSettings | None = None, reward=length_reward,
                perturb: tuple[int, float] | None = (1, 0.3), generation: str = "transformers", **overrides):
    """TRL's trainer of a method module (``method.trl_classes()``), on the tiny policy and ``rows``, configured by
    ``method.trl_kwargs(settings, ...)`` (``overrides`` win). Online methods (``rollout`` given) get
    ``rollouts.trl_online_config`` and ``reward`` as TRL's ``reward_funcs``.

    ``perturb``: (seed, scale) of ``perturb_lora``, applied once the trainer is built, so that TRL's "ref" adapter
    keeps the fresh copy (π_ref = the base model, as ours with the adapters off); None keeps the fresh adapters.
    ``generation``: how an online trainer samples (``rlcourse.trl_rollouts.GENERATION``), TRL's own by default.
    """
    from rlcourse.trl_rollouts import trl_trainer_class

    _, config_cls = method.trl_classes()
    trainer_cls = trl_trainer_class(method, generation) if rollout is not None else method.trl_classes()[0]
    data = dict(model=tiny_policy(tokenizer), train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if rollout is None:
        kwargs = method.trl_kwargs(settings, max_length) | overrides
        trainer = trainer_cls(args=trl_config(config_cls, train_config(batch_size), output_dir, **kwargs), **data)
    else:
        args = rollouts.trl_online_config(method, settings, rollout, train_config(rollout.completions_per_step),
                                          output_dir, **overrides)
        trainer = trainer_cls(args=args, reward_funcs=reward, **data)
    if perturb is not None:
        perturb_lora(trainer.model, *perturb)
    return trainer


def flat_grads(model) -> torch.Tensor:
    """Every trainable parameter's gradient, flattened into one vector."""
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def rescore_trl_rollouts(trainer, tokenizer, rows, rollout: rollouts.RolloutSettings, reward=length_reward):
    """TRL samples and scores G completions per row (seed 0); we re-score the same completions with
    ``rollouts.Rollouts.score``. -> (TRL's outputs dict, our ``RolloutBatch``)."""
    inputs = [dict(r) for r in rows for _ in range(rollout.num_generations)]  # TRL repeats each prompt G times
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(inputs)
    prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"])]
    completion_ids = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])]
    batch = rollouts.Rollouts(trainer.model, tokenizer, rows, reward, rollout).score(rows, prompt_ids, completion_ids)
    return out, batch


def categoricals(seed: int, k: int = 8, scale: float = 1.0):
    """Two random categoricals over k outcomes, as log-probs (float64): the policy p and the reference q."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64) * scale, -1)
    logq = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64) * scale, -1)
    return logp, logq


def expectation(logp, values):
    """E_{a ~ p}[values(a)], exactly."""
    return (logp.exp() * values).sum(-1)
