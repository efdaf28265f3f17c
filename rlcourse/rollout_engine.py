"""The rollout engine: every completion the course samples (online rollouts, gold evaluation, probes) comes from here.

Training needs the policy as 4-bit NF4 + LoRA (small, trainable); sampling needs none of that and pays for it: a
4-bit layer dequantises its weight at every forward, so a 16-token completion dequantises every weight 16 times,
and ``model.generate(num_return_sequences=G)`` repeats each prompt's prefill G times. The engine samples instead
from a *merged, dequantised copy* of the policy, the way TRL's trainers sample from vLLM:

    sampler = Sampler(policy)         # once: a plain model in the fast dtype, the 4-bit base unpacked once
    sampler.sync()                    # after each optimizer step: W = W_base + Σ scale·B·A of the active adapters
    ids, logps = sampler.sample(prompt_ids, n=G, ...)   # prefill once per prompt, then G samples decode from it

``sync`` reads the policy as it stands, context included: inside ``models.base_policy`` (adapters off) it copies
the base, inside ``models.reference_policy`` the "ref" adapter. ``sampler_for(policy)`` keeps one sampler per
policy and syncs it at every call, so a caller cannot sample from stale weights; a sync costs one pass over the
weights, far less than the decoding it precedes.

The copy is not bit-identical to the policy it trains: its matmuls run on W + ΔW merged, the policy's on the
dequantised W and the LoRA path apart, and in bf16 the merged weight is rounded once more. ``sample`` returns the
sampler's log-probability of every token it drew, so the gap to the policy's own log-probs on the same tokens can
be measured each step (``losses.off_policy.sampler_gap_metrics``, logged by ``rollouts.rollout_metrics``): the
off-policy gap that vLLM rollouts have too, and that TRL's truncated importance-sampling correction
(``losses.off_policy``) accounts for.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _dequantised(layer) -> torch.Tensor:
    """A linear layer's weight in fp32: a bitsandbytes 4-bit weight unpacked, any other as it is."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    return weight.detach().float()


def _compute_dtype(policy) -> torch.dtype:
    """The dtype the policy's matmuls run in: a 4-bit layer's compute dtype (the course's precision on this machine,
    ``rlcourse.precision``: bf16 where native, else fp32), else its floating-point weights' dtype."""
    import bitsandbytes as bnb

    for module in policy.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.compute_dtype is not None:
            return module.compute_dtype
    return next(p.dtype for p in policy.parameters() if p.is_floating_point())


def _lora_layers(policy) -> dict[str, torch.nn.Module]:
    """The policy's LoRA layers by their name in the plain model (peft's wrapper prefixes removed)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer):
            layers[_plain_name(name)] = module
    return layers


def _plain_name(name: str) -> str:
    for prefix in ("base_model.model.", "base_layer."):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer", "")


@dataclass
class Samples:
    """What ``Sampler.sample`` drew: row ``i * n + k`` is prompt i's k-th sample."""

    completion_ids: list[list[int]]
    """Each completion's tokens, cut after its first end-of-sequence token (kept); else ``max_new_tokens`` long."""
    logps: list[list[float]]
    """The sampler's log-probability of each of those tokens, at the sampling temperature (before top-p)."""
    prefill_s: float = 0.0
    """Seconds spent on the prompts' forward (once per distinct prompt)."""
    decode_s: float = 0.0
    """Seconds spent decoding, token by token, all samples at once."""


class Sampler:
    """A merged, dequantised, plain copy of ``policy`` for sampling, in ``dtype`` (None: the dtype the policy computes
    in, ``_compute_dtype``: for the course's 4-bit policy the machine's precision, bf16 where it is native, else
    fp32)."""

    KEEP_PREFILLS = 8
    """Prefills kept for prompts sampled again with unchanged weights (an evaluation's greedy pass after its sampled
    one, batch by batch): each holds a batch of prompts' keys and values."""

    def __init__(self, policy, dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM

        self.dtype = dtype or _compute_dtype(policy)
        config = copy.deepcopy(policy.config)
        if hasattr(config, "quantization_config"):  # the copy is plain: no 4-bit layers
            del config.quantization_config
        self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval().requires_grad_(False)
        self.model.to(next(policy.parameters()).device)  # beside the policy (the GPU's, on CUDA)
        self.model.generation_config = getattr(policy, "generation_config", self.model.generation_config)
        self.lora = _lora_layers(policy)
        self.base: dict[str, torch.Tensor] = {}  # fp32 base weights of the LoRA layers, unpacked once
        self.trainable: dict[str, torch.nn.Module] = {}  # other layers the optimizer changes (none with LoRA alone)
        plain = dict(self.model.named_modules())
        with torch.no_grad():
            for name, module in policy.named_modules():
                key = _plain_name(name)
                if key in self.lora or "lora_" in name or key not in plain:
                    continue
                if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight is not None:
                    self._copy(module, plain[key])
                    if any(p.requires_grad for p in module.parameters(recurse=False)):
                        self.trainable[key] = module
            for key, layer in self.lora.items():
                self.base[key] = _dequantised(layer.get_base_layer())
        self.syncs = 0
        self.version = None  # what the copy holds (``_policy_version``); a sync with nothing new copies nothing
        self.prefills: OrderedDict = OrderedDict()  # (version, prompts) -> a prefill, for prompts sampled again
        self.sync()

    def _copy(self, source, target) -> None:
        target.weight.copy_(_dequantised(source).to(self.dtype))
        if getattr(source, "bias", None) is not None:
            target.bias.copy_(source.bias.detach())

    def _policy_version(self) -> tuple:
        """Changes whenever the weights the policy computes with may have: an in-place update of a trained
        parameter (its ``_version``), a parameter given another tensor, or another adapter context (disabled, or
        which adapter is active)."""
        layer = next(iter(self.lora.values()), None)
        context = () if layer is None else (layer.disable_adapters, tuple(layer.active_adapters))
        # a parameter's tensor (data_ptr: replaced by a cast) and its in-place updates (_version: an optimizer step)
        versions = tuple((p.data_ptr(), p._version) for layer in self.lora.values() for p in layer.parameters())
        trained = tuple((p.data_ptr(), p._version) for m in self.trainable.values()
                        for p in m.parameters(recurse=False))
        return context, versions, trained

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's current weights: each LoRA layer's base plus the update of its active adapters (none
        while the adapters are disabled). TRL does the same before each generation with vLLM. Nothing is copied when
        nothing changed since the last sync (e.g. the greedy pass of an evaluation after its sampled one)."""
        version = self._policy_version()
        if version == self.version:
            return
        self.version = version
        plain = dict(self.model.named_modules())
        for name, layer in self.lora.items():
            weight = self.base[name]
            if not layer.disable_adapters:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        weight = weight + layer.get_delta_weight(adapter).float()
            plain[name].weight.copy_(weight)
        for name, module in self.trainable.items():
            self._copy(module, plain[name])
        self.syncs += 1

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, eos_ids: list[int], pad_id: int,
               do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> Samples:
        """``n`` completions of each prompt (token-id lists), the prompt's prefill computed once for all of them.

        Sampling is from softmax(logits / temperature), cut to the top-p nucleus when ``top_p`` < 1, with no top-k
        cut (TRL's ``top_k=0``); ``do_sample=False`` is greedy. Draws use ``generator`` (None: torch's global one).
        """
        device = next(self.model.parameters()).device
        B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
        ids = torch.full((B, P), pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prompt_ids):  # left padding: every prompt ends at the last column
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): padding does not shift a prompt's positions
        t0 = time.perf_counter()
        key = (self.version, tuple(map(tuple, prompt_ids)))
        if key not in self.prefills:  # the same prompts with the same weights are prefilled once (kept: 8 batches)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            self.prefills[key] = (out.past_key_values, out.logits)
            while len(self.prefills) > self.KEEP_PREFILLS:
                self.prefills.popitem(last=False)
        self.prefills.move_to_end(key)
        cache, prefill_logits = self.prefills[key]
        cache = copy.deepcopy(cache)  # decoding grows and reorders the cache; the kept prefill stays as it was
        cache.batch_repeat_interleave(n)  # the prompt's keys and values, shared by its n samples
        logits = prefill_logits[:, -1].repeat_interleave(n, dim=0)  # (N, V), N = B·n: predicts each first token
        mask = mask.repeat_interleave(n, dim=0)
        position = positions[:, -1:].repeat_interleave(n, dim=0) + 1  # (N, 1)
        prefill_s = time.perf_counter() - t0
        eos = torch.tensor(eos_ids, device=device)
        N = B * n
        tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
        token_logps = torch.zeros((N, max_new_tokens), device=device)
        alive = torch.arange(N, device=device)  # rows still decoding; finished ones leave the batch and the cache
        for t in range(max_new_tokens):
            logp = F.log_softmax(logits.float() / (temperature if do_sample else 1.0), dim=-1)  # (alive, V)
            if not do_sample:
                token = logp.argmax(-1)
            else:
                probs = logp.exp()
                if top_p < 1.0:
                    probs = _nucleus(probs, top_p)
                token = _draw(probs, generator)
            tokens[alive, t] = token
            token_logps[alive, t] = logp.gather(-1, token[:, None]).squeeze(-1)
            going = ~torch.isin(token, eos)
            if t == max_new_tokens - 1 or not bool(going.any()):
                break
            if not bool(going.all()):
                keep = going.nonzero().squeeze(-1)
                alive, token, mask, position = alive[keep], token[keep], mask[keep], position[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                             past_key_values=cache, use_cache=True)
            logits, position = out.logits[:, -1], position + 1
        decode_s = time.perf_counter() - t0 - prefill_s
        rows, row_logps = tokens[:, : t + 1].tolist(), token_logps[:, : t + 1].tolist()  # (N, T)
        completions, logps = [], []
        for row, lp in zip(rows, row_logps):
            end = next((t + 1 for t, tok in enumerate(row) if tok in eos_ids), len(row))
            completions.append(row[:end])
            logps.append(lp[:end])
        return Samples(completions, logps, prefill_s, decode_s)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (N, V) kept on the smallest set of tokens whose mass reaches ``top_p`` (unnormalised is fine for
    ``torch.multinomial``); the most likely token always stays."""
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # mass before a token already reached top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` (N, V), unnormalised: the first whose cumulative mass passes a uniform draw.
    The same distribution as ``torch.multinomial``, ~20× faster on a CPU at V = 49,152 (no exponential per token)."""
    cdf = probs.cumsum(-1)  # (N, V)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.size(-1) - 1)


_SAMPLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def sampler_for(policy) -> Sampler:
    """The policy's sampler, built on first use and synced to the policy's current weights at every call."""
    sampler = _SAMPLERS.get(policy)
    if sampler is None:
        sampler = _SAMPLERS[policy] = Sampler(policy)
    else:
        sampler.sync()
    return sampler
