"""TRL's online trainers sampling through the course's rollout engine, the way they sample through vLLM on a GPU.

TRL's ``GRPOTrainer`` and ``RLOOTrainer`` generate with ``model.generate`` unless told to use vLLM (CUDA only). On a
CPU that path dequantises every 4-bit weight at every decoded token and prefills each prompt G times: 7.0 s of
GRPOTrainer's 26.9 s step at the ``cpu`` profile's size from the base model, 3.4 s through the engine
(``make bench`` on a 2-core AVX2 CPU, fp32). ``engine_trainer_class(GRPOTrainer)`` is the same trainer with one
method replaced, ``_generate_single_turn`` (the one that holds TRL's vLLM branch): the prompt ids TRL tokenised go to
``rlcourse.rollout_engine``, a merged copy of the same policy synced after every optimizer step (TRL's vLLM
weight-sync pattern), and the completions come back as TRL's own path returns them, each cut after its first
end-of-sequence token. Everything else is TRL's code: rewards, advantages, the log-probs of the 4-bit policy, the
loss, the optimizer. The sampler's log-probs are not handed to TRL (it has no importance-sampling correction outside
vLLM); our loop measures the sampler/policy gap on the same engine every step.

    trainer_cls = engine_trainer_class(method.trl_classes()[0])   # or trl_trainer_class(method, "engine")
"""

from __future__ import annotations

import inspect
import time

from rlcourse.rollout_engine import sampler_for

GENERATION = ("engine", "transformers")
"""How TRL's side of an online lesson samples: through the rollout engine, or TRL's own ``model.generate``."""


class EngineGeneration:
    """Mixin for a TRL online trainer: its generation goes through the rollout engine. ``rollout_timings`` collects
    each call's seconds (sync, prefill, decode), for the step breakdown of ``rlcourse.bench``."""

    _returns_logprobs = False  # GRPOTrainer's _generate_single_turn returns (ids, logprobs); RLOOTrainer's ids only

    def _generate_single_turn(self, prompt_ids, images=None, multimodal_fields=None, num_generations=None,
                              has_tool_images=False):
        if images is not None or multimodal_fields or getattr(self, "use_vllm", False):
            raise ValueError("the rollout engine samples text prompts on the trainer's own model: no images, and "
                             "not with use_vllm=True (use TRL's own generation there: trl_generation='transformers')")
        if self.top_k not in (None, 0) or self.min_p is not None or self.repetition_penalty != 1.0:
            raise ValueError(f"the rollout engine samples with temperature and top_p only; this config sets top_k="
                             f"{self.top_k}, min_p={self.min_p}, repetition_penalty={self.repetition_penalty}: set "
                             f"top_k=0, min_p=None, repetition_penalty=1.0, or use TRL's own generation")
        G = num_generations or self.num_generations
        t0 = time.perf_counter()
        sampler = sampler_for(self.accelerator.unwrap_model(self.model))  # synced after the last optimizer step
        sync_s = time.perf_counter() - t0
        unique = _groups(prompt_ids, G)  # TRL repeats each prompt G times in a row: prefill each once
        prompts, n = (prompt_ids, 1) if unique is None else (unique, G)
        samples = sampler.sample(prompts, n, self.max_completion_length, list(self.eos_token_ids),
                                 self._tokenizer.pad_token_id, temperature=self.temperature,
                                 top_p=1.0 if self.top_p is None else self.top_p)
        self.rollout_timings = getattr(self, "rollout_timings", []) + [
            {"sync": sync_s, "prefill": samples.prefill_s, "decode": samples.decode_s}]
        return (samples.completion_ids, None) if self._returns_logprobs else samples.completion_ids


def _groups(prompt_ids: list[list[int]], G: int) -> list[list[int]] | None:
    """The distinct prompts when ``prompt_ids`` is runs of ``G`` identical prompts (TRL's ``RepeatSampler`` layout),
    else None."""
    if G < 2 or len(prompt_ids) % G:
        return None
    firsts = prompt_ids[::G]
    if any(prompt_ids[i] != firsts[i // G] for i in range(len(prompt_ids))):
        return None
    return firsts


_CLASSES: dict[type, type] = {}


def engine_trainer_class(trainer_cls: type) -> type:
    """``trainer_cls`` (TRL's GRPOTrainer, RLOOTrainer) with its generation through the rollout engine."""
    if trainer_cls not in _CLASSES:
        signature = inspect.signature(trainer_cls._generate_single_turn).parameters
        if "prompt_ids" not in signature:
            raise TypeError(f"{trainer_cls.__name__}._generate_single_turn{tuple(signature)} is not the method "
                            f"rlcourse.trl_rollouts replaces (TRL 1.16's): check the pinned TRL version")
        _CLASSES[trainer_cls] = type(f"{trainer_cls.__name__}WithEngine", (EngineGeneration, trainer_cls),
                                     {"_returns_logprobs": "num_generations" in signature})
    return _CLASSES[trainer_cls]


def trl_trainer_class(method, generation: str = "engine") -> type:
    """TRL's trainer class of an online ``method`` module, sampling as ``generation`` says (``GENERATION``)."""
    if generation not in GENERATION:
        raise ValueError(f"generation={generation!r}: choose one of {GENERATION}")
    trainer_cls, _ = method.trl_classes()
    return engine_trainer_class(trainer_cls) if generation == "engine" else trainer_cls
