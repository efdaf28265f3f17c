"""What 4-bit NF4 quantisation and LoRA do: the pieces of QLoRA, from scratch.

Implements, after Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", and Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models":

- ``nf4_levels_from_quantiles``: the 16 NormalFloat-4 code values from quantiles of N(0, 1);
  ``nf4_levels`` is bitsandbytes' own table, which it must reproduce.
- ``quantize_nf4_blockwise`` / ``dequantize_nf4_blockwise``: blockwise absmax NF4, from scratch, with
  the same packed layout as ``bitsandbytes.functional.quantize_4bit`` (bit-for-bit equal on CPU).
- ``nf4_bits_per_parameter``: storage cost with and without double quantisation; ``distinct_per_block``
  shows that the course's "fp32" weights were 4-bit already (Q4_1, README pitfall 6).
- ``compute_dtype``: switch the dtype bitsandbytes' NF4 layers dequantise their weights to.
- ``lora_forward``: the LoRA layer y = x Wᵀ + (α/r)·x Aᵀ Bᵀ; ``adamw_step``: one decoupled-weight-decay
  Adam update, enough to watch a LoRA step change the adapters and nothing else.

What they cost on a model (parameters, weight memory, peak memory, NLL, logits, time) is measured with
``rlcourse.measure``.

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
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

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
