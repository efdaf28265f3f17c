"""Exercises of lesson 03: the LoRA layer and blockwise NF4 quantisation."""

from __future__ import annotations

import torch

from rlcourse.exercises._check import compare
from rlcourse.quantization import lora_forward, quantize_nf4_blockwise


def _lora_inputs(g: torch.Generator) -> dict:
    d_in, d_out = torch.randint(4, 24, (2,), generator=g).tolist()
    r = int(torch.randint(1, 5, (1,), generator=g))
    return {
        "x": torch.randn(3, 5, d_in, generator=g),  # (B, T, d_in)
        "W": torch.randn(d_out, d_in, generator=g),
        "A": torch.randn(r, d_in, generator=g),
        "B": torch.randn(d_out, r, generator=g),  # non-zero: a zero B (LoRA's init) would hide a wrong update
        "alpha": float(torch.randint(1, 64, (1,), generator=g)),
        "r": r,
    }


def _weight_inputs(g: torch.Generator) -> dict:
    blocksize = [64, 128][int(torch.randint(0, 2, (1,), generator=g))]
    rows = int(torch.randint(1, 9, (1,), generator=g))
    return {"w": torch.randn(rows, 2 * blocksize, generator=g) * 0.02, "blocksize": blocksize}


def check_lora_forward(fn) -> None:
    """fn(x (..., d_in), W (d_out, d_in), A (r, d_in), B (d_out, r), alpha, r) -> (..., d_out): W x + (α/r)·B A x."""
    compare("lora_forward", fn, lora_forward, _lora_inputs, atol=1e-4, rtol=1e-4)


def check_quantize_nf4_blockwise(fn) -> None:
    """fn(w, blocksize) -> (packed (N/2, 1) uint8, absmax (N/blocksize,) fp32), bitsandbytes' layout, exactly."""
    compare("quantize_nf4_blockwise", fn, quantize_nf4_blockwise, _weight_inputs, atol=0.0, rtol=0.0)
