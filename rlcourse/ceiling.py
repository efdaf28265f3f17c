"""What this machine can do at best, measured: matmul throughput per dtype, memory bandwidth, the CPU's features, and
the times they imply for SmolLM2-135M. ``rlcourse.bench`` prints it above its table, so a step time reads against
the machine it ran on (a benchmark, not a test: nothing here is asserted).

Two bounds matter for a post-training step on a CPU:
- **compute**: a forward over T tokens costs about 2·P·T floating-point operations (P parameters), so it cannot take
  less than 2·P·T / (matmul FLOP/s); a LoRA step adds a backward through the frozen weights, another ~2·P·T;
- **memory**: decoding one token for a batch reads every weight once, so a decode step cannot take less than
  (weight bytes) / (memory bandwidth), however small the batch. 4-bit weights are read in 1/8 of fp32's bytes but
  must be dequantised to compute, which is why sampling from a merged, dequantised copy can be faster.

    python -m rlcourse.ceiling
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

SMOLLM2_PARAMS = 134_515_008
"""Parameters of SmolLM2-135M (embedding tied with the LM head)."""
HIDDEN, INTERMEDIATE = 576, 1536
"""SmolLM2-135M's hidden and MLP sizes: the shape of the matmuls that dominate its forward."""


@dataclass(frozen=True)
class Ceiling:
    """Measured peak rates of this machine (CPU threads: torch's current setting)."""

    hardware: str
    """The CPU (model, cores, the instruction-set flags that decide bf16) or the GPU, from ``rlcourse.precision``."""
    threads: int
    """torch's intra-op threads during the measurement."""
    matmul_gflops: dict[str, float]
    """dtype name -> GFLOP/s of a (tokens × 576) @ (576 × 1536) matmul, SmolLM2's MLP shape."""
    bandwidth_gbs: float
    """GB/s of a large tensor copy (bytes read + bytes written, per second)."""

    def forward_seconds(self, tokens: int, dtype: str = "float32", params: int = SMOLLM2_PARAMS) -> float:
        """The least time one forward over ``tokens`` tokens can take at the measured matmul rate: 2·P·T FLOPs."""
        return 2 * params * tokens / (self.matmul_gflops[dtype] * 1e9)

    def decode_seconds(self, bytes_per_param: float, params: int = SMOLLM2_PARAMS) -> float:
        """The least time one decoding step can take when every weight is read once (memory bound)."""
        return params * bytes_per_param / (self.bandwidth_gbs * 1e9)

    def describe(self) -> str:
        rates = ", ".join(f"{name} {g:.0f}" for name, g in self.matmul_gflops.items())
        return "\n".join([
            f"Machine: {self.hardware}; {self.threads} threads",
            f"Matmul (tokens × {HIDDEN} @ {HIDDEN} × {INTERMEDIATE}), GFLOP/s: {rates}; memory copy: "
            f"{self.bandwidth_gbs:.1f} GB/s",
            "Floors for SmolLM2-135M: a forward over 1,000 tokens "
            + ", ".join(f"{self.forward_seconds(1000, name):.2f} s in {name}" for name in self.matmul_gflops) + ";",
            f"  one decoding step (every weight read once) {self.decode_seconds(4) * 1e3:.0f} ms from fp32 weights, "
            f"{self.decode_seconds(2) * 1e3:.0f} ms from bf16, {self.decode_seconds(0.5) * 1e3:.0f} ms from 4-bit "
            "(before dequantising them)",
        ])


def _best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up: other processes only ever add time."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(dtype: torch.dtype, tokens: int = 512, repeats: int = 5) -> float:
    """GFLOP/s of a (tokens × 576) @ (576 × 1536) matmul in ``dtype`` on the CPU."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    b = torch.randn(HIDDEN, INTERMEDIATE, generator=g).to(dtype)
    seconds = _best_of(lambda: torch.mm(a, b), repeats)
    return 2 * tokens * HIDDEN * INTERMEDIATE / seconds / 1e9


def bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of copying a ``megabytes`` fp32 tensor into another (each byte read once and written once)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds = _best_of(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / seconds / 1e9


def measure(dtypes=(torch.float32, torch.bfloat16), tokens: int = 512, megabytes: int = 256,
            repeats: int = 5) -> Ceiling:
    """This machine's ``Ceiling`` (a few seconds; smaller sizes for a quick look)."""
    from rlcourse.precision import current

    return Ceiling(hardware=current().hardware, threads=torch.get_num_threads(),
                   matmul_gflops={str(d).removeprefix("torch."): matmul_gflops(d, tokens, repeats) for d in dtypes},
                   bandwidth_gbs=bandwidth_gbs(megabytes, repeats))


if __name__ == "__main__":
    print(measure().describe())
