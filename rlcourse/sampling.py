"""Generate completions from the policy: chat template, left padding, explicit sampling settings.

Used by the gold evaluation, by the data-generation script and by every online method.
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


@torch.no_grad()
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
    ``i * num_return_sequences + k``.
    """
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    texts = [prompt_text(tokenizer, p) for p in prompts]
    out: list[str] = []
    # top_k=0: no top-k cut, said explicitly. Left unset, generate() fills in its default of 50 and the samples no
    # longer come from the policy's distribution (which the sampled gold and the probes' KL assume); TRL uses 0 too.
    sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=0) if settings.do_sample else {}
    try:
        batches = range(0, len(texts), batch_size)
        for start in tqdm(batches, desc="generating", disable=not progress or len(batches) < 2, leave=False):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            ids = model.generate(
                **enc,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                num_return_sequences=num_return_sequences,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            completion_ids = ids[:, enc["input_ids"].shape[1] :]  # (B * n, T_new)
            out.extend(tokenizer.batch_decode(completion_ids, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [o.strip() for o in out]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and any the model's generation config declares."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return declared if tokenizer.eos_token_id in declared else [tokenizer.eos_token_id, *declared]


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: list,
    settings: SamplingSettings,
    num_return_sequences: int = 1,
    seed: int | None = 0,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompts and sampled completions, the way TRL's GRPO/RLOO trainers produce them.

    Each prompt (a message list or a string) is repeated ``num_return_sequences`` times, so prompt i's k-th
    sample is row ``i * num_return_sequences + k``. The settings are passed as a fresh ``GenerationConfig``
    (top_k=0: no top-k cut), so the model's own generation defaults cannot change them. Each completion is
    cut right after its first end-of-sequence token, which it keeps; one that never ends is ``max_new_tokens``
    long. Returns (prompt_ids, completion_ids), two lists of token-id lists of equal length.
    """
    from transformers import GenerationConfig

    from trl.trainer.utils import pad

    if seed is not None:
        torch.manual_seed(seed)
    repeated = [p for p in prompts for _ in range(num_return_sequences)]
    if isinstance(repeated[0], str):
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in repeated]
    else:
        prompt_ids = [list(ids) for ids in tokenizer.apply_chat_template(
            repeated, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]]
    eos = eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        **(dict(temperature=settings.temperature, top_p=settings.top_p, top_k=0) if settings.do_sample else {}),
    )
    tensors = [torch.tensor(ids) for ids in prompt_ids]
    input_ids = pad(tensors, padding_value=tokenizer.pad_token_id, padding_side="left").to(model.device)  # (N, P)
    attention_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left").to(model.device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.train(was_training)
    completions = out[:, input_ids.shape[1]:].cpu()  # (N, C)
    completion_ids = []
    for row in completions.tolist():
        end = next((t + 1 for t, tok in enumerate(row) if tok in eos), len(row))
        completion_ids.append(row[:end])
    return prompt_ids, completion_ids
