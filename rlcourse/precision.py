"""The floating-point precision the course computes in on this machine: bf16 where the hardware has it, else fp32.

bf16 halves the bytes every weight and activation moves, and where the hardware computes it natively (x86 CPUs
with AVX512-bf16 or AMX, Arm CPUs with the BF16 extension, CUDA GPUs from Ampere on) a bf16 matmul runs several
times faster than an fp32 one. Everywhere else PyTorch *emulates* bf16 and a training step runs ~35× slower than
in fp32 (README pitfall 10): most Intel Core laptops since 12th gen, AMD Zen 2/3, many cloud VMs. So the course
picks per machine, and both sides of every parity check follow the same choice:

============================  ===========================================  ==============================================
                              ``bf16`` (native bf16)                        ``fp32`` (everywhere else)
============================  ===========================================  ==============================================
NF4 weights dequantised to    bf16                                         fp32
our loop                      bf16 autocast, LoRA parameters in bf16       no autocast, everything fp32
TRL                           ``bf16=True`` (on CPU ``use_cpu=True``:       ``bf16=False``; the bf16 cast TRL gives a
                              autocast); TRL casts LoRA to bf16            quantized model's LoRA is undone (pitfall 12)
parity tolerances             ``rlcourse.parity.TOLERANCES["bf16"]``       ``rlcourse.parity.TOLERANCES["fp32"]``
============================  ===========================================  ==============================================

``RLCOURSE_DTYPE=bf16|fp32|auto`` overrides the choice (``auto``, the default, is the detection below).

How native bf16 is told apart from emulated, on a CPU: the processor must have the instructions (``avx512_bf16``
or ``amx_bf16`` among the x86 flags of ``/proc/cpuinfo``, ``bf16`` among an Arm CPU's features) *and* the
libraries must be allowed to use them. ``ONEDNN_MAX_CPU_ISA`` caps oneDNN, which runs PyTorch's bf16 matmuls on
x86, and ``ATEN_CPU_CAPABILITY`` caps PyTorch's own vector kernels; capped below bf16 (e.g. both ``avx2``), a bf16
CPU computes bf16 as slowly as one without it, which is how the test suite exercises the fp32 path on a bf16
machine (``tests/test_precision.py``). Where the flags cannot be read (macOS, Windows) the course uses fp32: it is
never slow, and ``RLCOURSE_DTYPE=bf16`` is there for a machine known to be fast in bf16.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_VAR = "RLCOURSE_DTYPE"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still allow bf16 arithmetic; lower ones (AVX2, AVX512_CORE, ...) emulate it.
_ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                     "ALL", "DEFAULT"}


@dataclass(frozen=True)
class CPUInfo:
    """What the processor offers and what the libraries are allowed to use of it."""

    model: str
    """The processor's name (``model name`` in /proc/cpuinfo), or what ``platform`` says."""
    arch: str
    """``x86_64``, ``aarch64``, ``arm64``, ..."""
    flags: frozenset[str]
    """The instruction-set flags of /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    capability: str
    """PyTorch's vector-kernel level, ``torch.backends.cpu.get_cpu_capability()`` (``AVX2``, ``AVX512``, ...)."""
    onednn_max_isa: str | None
    """``$ONEDNN_MAX_CPU_ISA``: a cap on what oneDNN uses (None: no cap)."""

    @property
    def bf16_instructions(self) -> bool:
        """The processor has bf16 arithmetic (whether or not the libraries may use it)."""
        if self.arch in ("x86_64", "amd64", "i686"):
            return any(f in self.flags for f in _X86_BF16_FLAGS)
        return "bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 runs natively here: the instructions exist and neither oneDNN nor PyTorch is capped below them."""
        if not self.bf16_instructions:
            return False
        if self.arch in ("x86_64", "amd64", "i686"):
            capped = self.onednn_max_isa is not None and self.onednn_max_isa.upper() not in _ONEDNN_BF16_ISAS
            return not capped and self.capability.upper().startswith(("AVX512", "AVX10")) and _onednn_bf16()
        return _onednn_bf16()

    def summary(self) -> str:
        """One line: the processor, its vector extensions and whether bf16 is native."""
        shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "bf16") if f in self.flags]
        caps = [f"PyTorch kernels {self.capability}"]
        if self.onednn_max_isa:
            caps.append(f"ONEDNN_MAX_CPU_ISA={self.onednn_max_isa}")
        bf16 = "native bf16" if self.native_bf16 else (
            "bf16 instructions present but capped" if self.bf16_instructions else "no native bf16")
        return (f"{self.model} ({self.arch}, {os.cpu_count()} logical cores): {' '.join(shown) or 'flags unknown'}; "
                f"{', '.join(caps)}; {bf16}")


def _onednn_bf16() -> bool:
    """oneDNN (through PyTorch) says it can run bf16 here; it honours ONEDNN_MAX_CPU_ISA."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    try:
        text = path.read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = platform.processor() or platform.machine(), frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware") and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.cache
def _cpuinfo_cached() -> tuple[str, frozenset[str]]:
    return _read_cpuinfo()


def cpu_info() -> CPUInfo:
    """This machine's CPU as the course sees it (the environment caps are read at each call)."""
    model, flags = _cpuinfo_cached()
    return CPUInfo(model=model, arch=platform.machine().lower(), flags=flags,
                   capability=torch.backends.cpu.get_cpu_capability(),
                   onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None)


@dataclass(frozen=True)
class Precision:
    """The precision the course computes in, and why."""

    name: str
    """``"bf16"`` or ``"fp32"``."""
    device: str
    """``"cuda"`` or ``"cpu"``: where the course's models run (CUDA when available, as the ``auto`` profile)."""
    reason: str
    """Why this precision: detected, or set by ``$RLCOURSE_DTYPE``."""
    hardware: str
    """The device in one line (CPU flags, or the GPU's name)."""

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: NF4 weights are dequantised to it, and a quantized model's LoRA parameters held in it."""
        return DTYPES[self.name]

    @property
    def bf16(self) -> bool:
        """True when runs autocast to bf16 (``TrainConfig.bf16``, TRL's ``bf16=``)."""
        return self.name == "bf16"

    def autocast(self, device_type: str | None = None):
        """bf16 autocast in bf16 mode, nothing in fp32 mode: the context our training loop runs its steps in."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type or self.device, dtype=torch.bfloat16)

    def describe(self) -> str:
        """What a notebook prints: the precision, why, and the hardware."""
        return f"precision: {self.name} ({self.reason})\n{self.device}: {self.hardware}"


def _gpu() -> tuple[bool, str]:
    name = torch.cuda.get_device_name()
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return native, f"{name} ({'native bf16' if native else 'no native bf16'})"


def current() -> Precision:
    """The precision for this machine: ``$RLCOURSE_DTYPE`` if set to bf16 or fp32, else bf16 where native."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        native, hardware = _gpu()
    else:
        info = cpu_info()
        native, hardware = info.native_bf16, info.summary()
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted in DTYPES:
        return Precision(wanted, device, f"set by {ENV_VAR}={wanted}", hardware)
    if wanted != "auto":
        raise ValueError(f"{ENV_VAR}={wanted!r} is not a precision. Fix: set it to bf16, fp32 or auto "
                         f"(auto: bf16 where the {device.upper()} computes it natively, else fp32), or unset it.")
    if native:
        return Precision("bf16", device, f"the {device.upper()} computes bf16 natively", hardware)
    return Precision("fp32", device, f"the {device.upper()} has no native bf16: emulated bf16 is far slower than fp32",
                     hardware)


def autocast(model_or_device=None):
    """``current().autocast(...)`` for a model (its device) or a device type: bf16 autocast only in bf16 mode."""
    device_type = model_or_device
    if isinstance(model_or_device, torch.nn.Module):
        device_type = next(model_or_device.parameters()).device.type
    elif isinstance(model_or_device, torch.device):
        device_type = model_or_device.type
    return current().autocast(device_type)
