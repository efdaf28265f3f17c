"""Generate completions from the policy: chat template, explicit sampling settings, through the rollout engine.

Used by the gold evaluation, the probes, the data-generation script and every online method; the sampling itself is
``rlcourse.rollout_engine``'s (a merged copy of the policy, each prompt's prefill shared by its samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn. Every online method states these explicitly."""

    max_new_tokens: int = 48
    """Longest completion, in tokens."""
    do_sample: bool = True
    """False: greedy decoding (temperature and top_p are then ignored)."""
    temperature: float = 1.0
    """Softmax temperature; 1.0 samples from the policy itself (what on-policy RL assumes)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 keeps the whole distribution."""


def prompt_text(tokenizer, prompt) -> str:
    """A prompt as the model sees it: chat template + generation prompt for conversations, else as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt as the policy sees it: a message list through the chat template with the generation
    prompt, a string as it is (no special tokens added)."""
    if isinstance(prompts[0], str):
        return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return [list(ids) for ids in tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]]


def sample_ids(model, tokenizer, prompts: list, settings: SamplingSettings, num_return_sequences: int = 1,
               seed: int | None = 0):
    """``rlcourse.rollout_engine.Samples`` of ``prompts`` from the policy as it stands (its sampler, synced):
    ``num_return_sequences`` per prompt, prompt i's k-th at row ``i * num_return_sequences + k``, each cut after its
    first end-of-sequence token (kept). No top-k cut (TRL's ``top_k=0``)."""
    from rlcourse.rollout_engine import sampler_for

    if seed is not None:
        torch.manual_seed(seed)
    return sampler_for(model).sample(
        prompt_ids(tokenizer, prompts), num_return_sequences, settings.max_new_tokens, eos_token_ids(model, tokenizer),
        tokenizer.pad_token_id, do_sample=settings.do_sample, temperature=settings.temperature, top_p=settings.top_p)


def generate(
    model,
    tokenizer,
    prompts: list,
    settings: SamplingSettings = SamplingSettings(),
    num_return_sequences: int = 1,
    batch_size: int = 16,
    seed: int | None = 0,
    progress: bool = True,
) -> list[str]:
    """Completions for ``prompts`` (strings or message lists), ``num_return_sequences`` per prompt, in order.

    Returns decoded completion texts without special tokens: prompt i's k-th sample is at
    ``i * num_return_sequences + k``. Sampled by the rollout engine (``rlcourse.rollout_engine``) from the policy
    as it stands, ``batch_size`` prompts at a time, each prompt's prefill shared by its samples.
    """
    if seed is not None:
        torch.manual_seed(seed)
    out: list[str] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generating", disable=not progress or len(batches) < 2, leave=False):
        samples = sample_ids(model, tokenizer, prompts[start : start + batch_size], settings, num_return_sequences,
                             seed=None)
        out.extend(tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True))
    return [o.strip() for o in out]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and any the model's generation config declares."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return declared if tokenizer.eos_token_id in declared else [tokenizer.eos_token_id, *declared]


def generate_ids(
    model,
    tokenizer,
    prompts: list,
    settings: SamplingSettings,
    num_return_sequences: int = 1,
    seed: int | None = 0,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompts and sampled completions, the way TRL's GRPO/RLOO trainers lay them out: each prompt
    repeated ``num_return_sequences`` times (prompt i's k-th sample is row ``i * num_return_sequences + k``), each
    completion cut right after its first end-of-sequence token, which it keeps. Returns (prompt_ids,
    completion_ids), two lists of token-id lists of equal length."""
    samples = sample_ids(model, tokenizer, prompts, settings, num_return_sequences, seed)
    ids = prompt_ids(tokenizer, prompts)
    return [p for p in ids for _ in range(num_return_sequences)], samples.completion_ids
