"""Measuring a model: its size, the memory and time a forward pass or a training step takes, and how far its
outputs move (lessons 03 and 07).

- Size: ``count_parameters`` (trainable, total; packed 4-bit weights counted as the weights they stand for) and
  ``weight_memory_bytes`` (with the quantisation state bitsandbytes keeps outside ``parameters()``).
- Memory and time: ``peak_memory(fn)``, how far this process's resident memory rises while ``fn`` runs;
  ``time_per_forward``, the fastest of a few no-grad forward passes; ``step_cost``, seconds and peak memory of
  training-step functions on the same batch (forward and backward, no optimizer update).
- Outputs: ``nll_per_token`` on a prompt/completion dataset (``eval_batches``), for instance the task's
  demonstrations or ``prose_paragraphs``, text neither model wrote; ``logits_difference`` between two models.

Memory on a CPU is the resident memory of this process (Linux): one reader of ``/proc/self/status`` and one reset
of its peak (``VmHWM``, by writing 5 to ``/proc/self/clear_refs``) serve both ``peak_memory`` and ``step_cost``;
``peak_memory``'s docstring says what that does and does not include. Elsewhere memory is not measured (NaN or
None). Timings depend on the machine: notebooks and benchmarks print them, tests never assert them.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import math
import re
import statistics
import threading
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from rlcourse.batches import Sequences, collate
from rlcourse.logprobs import forward_logprobs, to_model_device
from rlcourse.tokenization import tokenize_sft


# ----------------------------------------------------------------------------- size of a model


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


# ----------------------------------------------------------------------------- memory and time


def _proc_status_kib(field: str) -> int | None:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``: resident now, ``VmHWM``: peak); None where unreadable."""
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


@torch.no_grad()
def time_per_forward(model, batch: Sequences, repeats: int = 3, warmup: bool = True) -> float:
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
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            if batch.input_ids.is_cuda:  # kernels run asynchronously: wait for them before reading the clock
                torch.cuda.synchronize()
            if i or not warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return min(times)


def step_cost(model, batch, step_fns: dict[str, Callable], repeats: int = 3,
              bf16: bool | None = None) -> dict[str, dict]:
    """{name: {"seconds": median seconds per step, "peak_mb": extra peak memory or None, "memory": what it is}}.

    What lesson 07 asks of dropping the reference model: each step function runs (forward and backward, in the
    training loop's precision, no optimizer update) once to warm up, then ``repeats`` times on the same batch.
    ``seconds`` is the median of those steps. ``peak_mb`` is how much memory the steps needed above what was held
    before them: on CUDA the peak allocated memory (``torch.cuda.max_memory_allocated`` after a reset) minus the
    memory allocated before; on a Linux CPU the peak resident memory (``VmHWM`` after a reset) minus the resident
    memory before; elsewhere None.

    step_fns: name -> step_fn(model, batch) -> (loss, metrics). ``bf16``: autocast as ``TrainConfig.bf16`` does
    (None: this machine's precision, ``rlcourse.precision``). Gradients are cleared after each step; the
    model's weights are not changed.
    """
    device = next(model.parameters()).device
    if bf16 is None:
        from rlcourse.precision import current

        bf16 = current().bf16
    cuda = device.type == "cuda"
    model.train()
    results = {}
    for name, step in step_fns.items():
        def one_step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = step(model, batch)
            loss.backward()
            model.zero_grad(set_to_none=True)

        one_step()  # warm-up: first-call allocations and kernel selection
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        else:
            measured = _reset_peak_rss()
            held = _proc_status_kib("VmRSS") * 1024 if measured else None
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            one_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if cuda:
            peak, memory = (torch.cuda.max_memory_allocated() - held) / 2**20, "CUDA peak allocated above the model"
        elif held is not None:
            peak = (_proc_status_kib("VmHWM") * 1024 - held) / 2**20
            memory = "peak resident memory above the model (CPU)"
        else:
            peak, memory = None, "not measured on this OS"
        results[name] = {"seconds": statistics.median(times), "peak_mb": peak, "memory": memory}
    return results


# ----------------------------------------------------------------------------- what a model's outputs lose


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


def eval_batches(tokenizer, dataset, batch_size: int = 8, max_length: int | None = None) -> Iterator[Sequences]:
    """Right-padded ``Sequences`` (``input_ids``, ``attention_mask``, ``completion_mask``, each (N, T)) of a
    prompt/completion dataset, tokenized as TRL's SFTTrainer does (``rlcourse.tokenization``)."""
    rows = tokenize_sft(dataset, tokenizer)
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
def logits_difference(model_a, model_b, batch: Sequences) -> dict[str, float]:
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
        out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits.float()
        logits.append(out[inputs.attention_mask.bool()].cpu())  # (positions, V)
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
