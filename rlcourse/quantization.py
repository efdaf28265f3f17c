"""What 4-bit NF4 quantisation and LoRA do, and what they cost: the pieces of QLoRA, measurable.

Implements, after Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", and Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models":

- ``nf4_levels_from_quantiles``: the 16 NormalFloat-4 code values from quantiles of N(0, 1);
  ``nf4_levels`` is bitsandbytes' own table, which it must reproduce.
- ``quantize_nf4_blockwise`` / ``dequantize_nf4_blockwise``: blockwise absmax NF4, from scratch, with
  the same packed layout as ``bitsandbytes.functional.quantize_4bit`` (bit-for-bit equal on CPU).
- ``nf4_bits_per_parameter``: storage cost with and without double quantisation; ``distinct_per_block``
  shows that the course's "fp32" weights were 4-bit already (Q4_1, README pitfall 6).
- ``lora_forward``: the LoRA layer y = x Wᵀ + (α/r)·x Aᵀ Bᵀ; ``adamw_step``: one decoupled-weight-decay
  Adam update, enough to watch a LoRA step change the adapters and nothing else.
- Measurements on a model: ``count_parameters``, ``weight_memory_bytes``, ``peak_memory``,
  ``nll_per_token`` (on the task's demonstrations, or on ``prose_paragraphs``, text neither model wrote),
  ``logits_difference``, ``time_per_forward``, and ``compute_dtype`` to switch the dtype NF4 weights
  are dequantised to.

Departures from the paper:
- NF4 levels: the paper defines each level as the mean of two adjacent quantiles of N(0, 1),
  q_i = ½(Q(i/(2ᵏ+1)) + Q((i+1)/(2ᵏ+1))); bitsandbytes, which everyone actually runs, evaluates Φ⁻¹ at
  evenly spaced probabilities from 0.5 to 0.9677083 (8 positive levels, 7 negative, plus an exact
  zero). We follow bitsandbytes.
- Rounding: a value goes to the nearest level, ties to the lower one, and the block is scaled by
  multiplying with 1/absmax rather than dividing by absmax - both exactly as bitsandbytes' CPU kernel,
  so that the packed bytes agree bit for bit.
- No double quantisation in the course model (``bnb_4bit_use_double_quant=False``): it saves ~0.37
  bits per parameter, which matters for 65B models and not for a 135M one. Paged optimisers (the
  third QLoRA ingredient) are a CUDA unified-memory feature and have no CPU counterpart here.
- ``peak_memory`` measures resident memory of this process (Linux), not allocator statistics: see its
  docstring for what that does and does not include.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import math
import re
import threading
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from rlcourse.logprobs import collate, forward_logprobs, to_model_device, tokenize_prompt_completion

NF4_OFFSET = 0.9677083
"""Largest probability bitsandbytes feeds to Φ⁻¹ for NF4; = 1 - (1/32 + 1/30) / 2."""


# ----------------------------------------------------------------------------- NF4 from scratch


def nf4_levels() -> torch.Tensor:
    """bitsandbytes' 16 NF4 code values, sorted, in [-1, 1]: the table its kernels use. Shape (16,)."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu")


def nf4_levels_from_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The NF4 levels rebuilt from normal quantiles, as bitsandbytes' ``create_normal_map`` does.

    Positive side: Φ⁻¹ at 8 evenly spaced probabilities from ``offset`` down to 0.5 (exclusive);
    negative side: -Φ⁻¹ at 7 such probabilities; plus an exact 0. The asymmetry (8 vs 7) spends all
    16 codes while keeping 0 representable (a zero weight stays exactly zero). Dividing by the largest
    level maps the range onto [-1, 1], the range of a block after absmax scaling. Shape (16,), fp32.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    # torch.linspace in fp32 first, as bitsandbytes does, so the probabilities carry the same rounding
    positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())  # (8,)
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())  # (7,)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values  # (16,)
    return (levels / levels.max()).float()


def quantize_nf4_blockwise(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax NF4 quantisation of any float tensor, in bitsandbytes' storage layout.

    The flattened tensor is cut into blocks of ``blocksize`` values; block b is scaled by
    s_b = max|w_i| over the block so it lies in [-1, 1], and every value is replaced by the index of
    the nearest NF4 level q_j:  idx_i = argmin_j |w_i / s_b - q_j|.
    Two 4-bit indices are packed per byte (first value in the high nibble).

    Returns ``packed`` (ceil(N/2), 1) uint8 and ``absmax`` (N_blocks,) fp32, N = w.numel().
    """
    flat = w.detach().reshape(-1).float()  # (N,)
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = F.pad(flat, (0, pad)).view(-1, blocksize)  # (N_blocks, blocksize); zero padding leaves absmax alone
    absmax = blocks.abs().amax(dim=1)  # (N_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]  # (N,)
    scaled = F.pad(scaled, (0, n % 2))  # an odd count gets a 0.0 partner to fill the last byte
    levels = nf4_levels()
    midpoints = (levels[:-1] + levels[1:]) / 2  # (15,) decision boundaries between neighbouring levels
    # nearest level = how many boundaries lie strictly below the value (a tie goes to the lower level)
    idx = torch.bucketize(scaled, midpoints).to(torch.uint8)  # (N,) or (N+1,)
    packed = (idx[0::2] << 4) | idx[1::2]  # (ceil(N/2),)
    return packed.unsqueeze(1), absmax


def dequantize_nf4_blockwise(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize_nf4_blockwise``: ŵ_i = q[idx_i] · s_b, computed in fp32, returned as ``dtype``."""
    n = math.prod(shape)
    packed = packed.reshape(-1)
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()  # (2·ceil(N/2),) high nibble first
    values = nf4_levels()[idx]
    pad = (-values.numel()) % blocksize
    values = F.pad(values, (0, pad)).view(-1, blocksize)  # (N_blocks, blocksize)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n].reshape(shape).to(dtype)


def distinct_per_block(w: torch.Tensor, blocksize: int = 32) -> torch.Tensor:
    """How many distinct values each block of ``blocksize`` consecutive weights holds. (N_blocks,) int.

    A 4-bit format can hold at most 16 per block: weights dequantised from GGUF's Q4_1 (blocks of 32)
    show exactly that ceiling, which is how we can tell they were 4-bit before we quantise them again.
    """
    blocks = w.detach().reshape(-1, blocksize).sort(dim=1).values  # (N_blocks, blocksize)
    return (blocks.diff(dim=1) != 0).sum(dim=1) + 1


def nf4_bits_per_parameter(blocksize: int = 64, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Storage bits per weight: 4 for the code, plus the block's absmax shared by ``blocksize`` weights.

    Without double quantisation the absmax is fp32: 4 + 32/64 = 4.5 bits. With it (QLoRA §3) the
    absmaxes are themselves quantised to 8 bits in blocks of ``blocksize2``, each block with one fp32
    scale: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits. (Constant-size code tables are not counted.)
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize


# ----------------------------------------------------------------------------- LoRA


def lora_forward(
    x: torch.Tensor,
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    alpha: float,
    r: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A LoRA linear layer (Hu et al. 2021, Eq. 3):  h = W₀x + ΔWx = W₀x + (α/r)·B A x.

    x: (..., d_in) input; W: (d_out, d_in) frozen weight W₀; A: (r, d_in) down-projection (random init);
    B: (d_out, r) up-projection (zero init, so ΔW = 0 at the start); alpha: α; r: the rank;
    bias: (d_out,) or None. Returns (..., d_out). ΔW = (α/r)·B A is never formed: x goes through A
    first, which costs r·(d_in + d_out) multiply-adds per token instead of d_in·d_out.
    """
    return F.linear(x, W, bias) + (alpha / r) * F.linear(F.linear(x, A), B)


@torch.no_grad()
def adamw_step(
    params: list[torch.Tensor],
    state: dict,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One AdamW update in place (Loshchilov & Hutter 2019, Algorithm 2) on every tensor in ``params`` with a grad.

    θ ← θ(1 - lr·λ);  m ← β₁m + (1-β₁)g;  v ← β₂v + (1-β₂)g²;  θ ← θ - lr·m̂/(√v̂ + ε),
    with m̂ = m/(1-β₁ᵗ), v̂ = v/(1-β₂ᵗ). ``state`` (a dict, empty at first) keeps t, m and v per tensor.
    On the first step m̂/√v̂ = g/|g|: every parameter with a non-zero gradient moves by about ``lr``.
    """
    beta1, beta2 = betas
    for p in params:
        if p.grad is None:
            continue
        s = state.setdefault(id(p), {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        s["t"] += 1
        g = p.grad
        p.mul_(1 - lr * weight_decay)
        s["m"].mul_(beta1).add_(g, alpha=1 - beta1)
        s["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat = s["m"] / (1 - beta1 ** s["t"])
        v_hat = s["v"] / (1 - beta2 ** s["t"])
        p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


# ----------------------------------------------------------------------------- measuring a model


def _logical_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter stands for: a packed 4-bit Params4bit holds two per byte."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and quant_state.shape is not None:
        return math.prod(quant_state.shape)
    return p.numel()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once, 4-bit weights unpacked."""
    trainable = total = 0
    for p in model.parameters():  # parameters() already skips a tied tensor's second name
        n = _logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _quant_state_bytes(quant_state) -> int:
    """Bytes bitsandbytes keeps beside a packed weight: per-block absmax, code table, double-quant state."""
    tensors = [quant_state.absmax, quant_state.code]
    if quant_state.nested:
        tensors += [quant_state.state2.absmax, quant_state.state2.code, quant_state.offset]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def weight_memory_bytes(model: torch.nn.Module, modules: Iterable[str] | None = None) -> int:
    """Bytes held by the model's parameters and buffers (each tensor once), or only by ``modules``.

    A 4-bit weight counts its packed uint8 storage plus its quantisation state (per-block absmax and
    code table), which bitsandbytes keeps outside ``parameters()`` and which ``get_memory_footprint``
    therefore misses. ``modules``: module names as in ``named_modules()``; their sub-modules count too.
    """
    prefixes = None if modules is None else tuple(modules)
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if prefixes is not None and not any(name == m or name.startswith(m + ".") for m in prefixes):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
            quant_state = getattr(t, "quant_state", None)
            if quant_state is not None:
                total += _quant_state_bytes(quant_state)
    return total


@contextlib.contextmanager
def compute_dtype(model: torch.nn.Module, dtype: torch.dtype):
    """Temporarily change the dtype every bitsandbytes Linear4bit dequantises its weight to for the matmul."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [m.compute_dtype for m in layers]
    for m in layers:
        m.compute_dtype = dtype
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.compute_dtype = d


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; Linux ≥ 4.0 only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _return_free_heap_to_os() -> None:
    """glibc keeps freed memory for reuse; give it back so an earlier run cannot hide this one's allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object]) -> tuple[object, dict[str, float]]:
    """Run ``fn()`` and measure how far this process's resident memory (RSS) rose above its start.

    Returns ``(fn(), info)`` with ``info``: ``rss_before`` and ``peak_rss`` in bytes, ``peak_increase``
    = peak - before (what ``fn`` allocated on top of what was already resident: activations, logits,
    gradients, dequantised weight tiles), and ``method``.

    Why not ``resource.getrusage().ru_maxrss``: it is the process's all-time peak, so after loading
    one model it can never show that a second computation needed less. Here we first return free heap
    memory to the OS, then reset the kernel's peak counter (``/proc/self/clear_refs``) and read VmHWM
    afterwards. Where that is not allowed we poll VmRSS every millisecond from a thread (may miss a
    peak shorter than that). Memory that existed before the call (the model's weights) is excluded:
    add ``weight_memory_bytes`` for the total. Run ``fn`` once before measuring it: a first call also
    pays one-off costs (weights memory-mapped from disk being read in, thread pools, kernel caches).
    Linux only; elsewhere the values are NaN.
    """
    gc.collect()
    _return_free_heap_to_os()
    before_kib = _proc_status_kib("VmRSS")
    if before_kib is None:
        return fn(), {"rss_before": math.nan, "peak_rss": math.nan, "peak_increase": math.nan, "method": "unavailable"}
    if _reset_peak_rss():
        result = fn()
        peak_kib = _proc_status_kib("VmHWM")
        method = "VmHWM after clear_refs"
    else:
        peak = [before_kib]
        done = threading.Event()

        def poll():
            while not done.is_set():
                peak[0] = max(peak[0], _proc_status_kib("VmRSS") or 0)
                time.sleep(0.001)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            result = fn()
        finally:
            done.set()
            thread.join()
        peak_kib = max(peak[0], _proc_status_kib("VmRSS") or 0)
        method = "VmRSS polled every 1 ms"
    return result, {
        "rss_before": before_kib * 1024.0,
        "peak_rss": peak_kib * 1024.0,
        "peak_increase": (peak_kib - before_kib) * 1024.0,
        "method": method,
    }


PROSE_MODULES = ("heapq", "doctest", "pdb", "sched", "csv", "socket", "tempfile", "getopt", "site", "timeit",
                 "urllib.request", "urllib.parse", "calendar", "tokenize")
"""Standard-library modules whose documentation is mostly prose (heapq's is an essay, in ``__about__``)."""


def prose_paragraphs(min_words: int = 40) -> list[str]:
    """Paragraphs of English prose that neither model wrote: the module documentation of Python's standard library.

    Offline, fixed for a given Python version, and neutral between the fp32 and the NF4 model, unlike the
    concise task's demonstrations, which ``scripts/make_data.py`` sampled from the NF4 model itself (a model
    finds its own samples likely). Paragraphs with code, lists or tables are skipped; duplicates kept once.
    """
    paragraphs: dict[str, None] = {}
    for name in PROSE_MODULES:
        module = importlib.import_module(name)
        for doc in (module.__doc__ or "", getattr(module, "__about__", "")):
            for para in re.split(r"\n\s*\n", doc):
                lines = para.strip().splitlines()
                if any(line[:1].isspace() or line.lstrip().startswith((">>>", "-", "*", "...")) for line in lines):
                    continue  # a code example or a list
                text = " ".join(" ".join(line.split()) for line in lines)
                if len(text.split()) >= min_words and " -- " not in text and "==" not in text:  # no API listings
                    paragraphs.setdefault(text, None)
    return list(paragraphs)


def eval_batches(tokenizer, dataset, batch_size: int = 8, max_length: int | None = None) -> Iterator[dict]:
    """Right-padded batches (``input_ids``, ``attention_mask``, ``completion_mask``, each (B, T)) of a
    prompt/completion dataset, tokenized as TRL's SFTTrainer does (``rlcourse.logprobs``)."""
    rows = [tokenize_prompt_completion(tokenizer, ex["prompt"], ex["completion"]) for ex in dataset]
    for start in range(0, len(rows), batch_size):
        yield collate(rows[start : start + batch_size], tokenizer.pad_token_id, max_length)


@torch.no_grad()
def nll_per_token(model, tokenizer, dataset, batch_size: int = 8, max_length: int | None = None) -> float:
    """Mean negative log-likelihood (nats) per completion token of a prompt/completion dataset.

    -(1/N) Σ log π(y_t | x, y_<t) over all N completion tokens of all examples (a token-level mean,
    so a long completion weighs more than a short one, as in SFT's loss). exp() of it is the perplexity.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for batch in eval_batches(tokenizer, dataset, batch_size, max_length):
            out = forward_logprobs(model, batch)
            total += -(out["logps"] * out["mask"]).sum().item()
            count += out["mask"].sum().item()
    finally:
        model.train(was_training)
    return total / count


@torch.no_grad()
def logits_difference(model_a, model_b, batch: dict) -> dict[str, float]:
    """How far model_b's outputs are from model_a's on one batch, over its non-padding positions.

    Returns ``max_abs`` and ``mean_abs`` |logits_a - logits_b|, ``kl`` = mean over positions of
    KL(π_a‖π_b) = Σ_v π_a(v) (log π_a(v) - log π_b(v)) in nats, and ``top1_agreement``, the fraction
    of positions whose most likely next token is the same.
    """
    logits = []
    for model in (model_a, model_b):  # each on its own device; compared on the CPU
        inputs = to_model_device(model, batch)
        was_training = model.training
        model.eval()
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
        logits.append(out[inputs["attention_mask"].bool()].cpu())  # (positions, V)
        model.train(was_training)
    a, b = logits  # (positions, V) each
    logp_a, logp_b = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1)  # (positions,)
    diff = (a - b).abs()
    return {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "kl": kl.mean().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    }


@torch.no_grad()
def time_per_forward(model, batch: dict, repeats: int = 3, warmup: bool = True) -> float:
    """Wall-clock seconds of one no-grad forward pass on ``batch``: the fastest of ``repeats``.

    The minimum, not the mean: on a shared machine other processes only ever add time, so the fastest
    run is the best estimate of the model's own cost.

    ``warmup``: run one untimed pass first, which pays one-off costs (weights read in from a memory-mapped
    file, allocations, kernel selection); skip it only if the model has just run on similar inputs.
    """
    batch = to_model_device(model, batch)
    was_training = model.training
    model.eval()
    times = []
    try:
        for i in range(repeats + int(warmup)):
            start = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if batch["input_ids"].is_cuda:  # kernels run asynchronously: wait for them before reading the clock
                torch.cuda.synchronize()
            if i or not warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return min(times)
