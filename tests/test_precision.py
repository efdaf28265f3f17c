"""Precision per machine (rlcourse.precision) and the thread settings of a course process (rlcourse.threads).

Detection is tested on described CPUs (a CPUInfo built by hand, cpuinfo text written to a file) so that every
branch runs on whatever CPU the suite runs on; the capped-ISA recipe that makes a bf16 CPU behave like one without
it is tested in a fresh process, since oneDNN reads its cap once.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from rlcourse import parity, precision, threads
from rlcourse.models import LoraSettings, as_trl_trains, is_quantized, tiny_model
from rlcourse.train import TrainConfig

X86_BF16 = frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"})
X86_AVX2 = frozenset({"avx", "avx2", "fma"})


def _cpu(flags, arch="x86_64", capability="AVX512", cap=None):
    return precision.CPUInfo(model="test CPU", arch=arch, flags=flags, capability=capability, onednn_max_isa=cap)


@pytest.fixture
def onednn_bf16(monkeypatch):
    """Pretend oneDNN allows bf16 (its own answer depends on this machine); the flags decide."""
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: True)


def test_avx512_bf16_is_native(onednn_bf16):
    assert _cpu(X86_BF16).native_bf16


def test_avx2_only_is_not_native_whatever_onednn_says(onednn_bf16):
    cpu = _cpu(X86_AVX2, capability="AVX2")
    assert not cpu.bf16_instructions and not cpu.native_bf16
    assert "no native bf16" in cpu.summary()


@pytest.mark.parametrize("cap,capability", [("AVX2", "AVX512"), ("avx512_core", "AVX512"), (None, "AVX2")])
def test_a_bf16_cpu_capped_below_bf16_is_not_native(onednn_bf16, cap, capability):
    cpu = _cpu(X86_BF16, capability=capability, cap=cap)
    assert cpu.bf16_instructions and not cpu.native_bf16
    assert "capped" in cpu.summary()


def test_a_cap_that_allows_bf16_keeps_it_native(onednn_bf16):
    assert _cpu(X86_BF16, cap="AVX512_CORE_AMX").native_bf16


def test_arm_needs_the_bf16_feature(onednn_bf16):
    assert _cpu(frozenset({"fp", "asimd", "sve", "bf16"}), arch="aarch64", capability="SVE256").native_bf16
    assert not _cpu(frozenset({"fp", "asimd"}), arch="aarch64", capability="DEFAULT").native_bf16


def test_onednn_refusing_bf16_wins(monkeypatch):
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: False)
    assert not _cpu(X86_BF16).native_bf16


def test_cpuinfo_is_read_for_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some CPU @ 3GHz\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                   "processor\t: 1\nmodel name\t: Some CPU @ 3GHz\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert precision._read_cpuinfo(x86) == ("Some CPU @ 3GHz", frozenset({"fpu", "avx2", "avx512_bf16"}))
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve bf16\nCPU part\t: 0xd40\n")
    assert precision._read_cpuinfo(arm)[1] == frozenset({"fp", "asimd", "sve", "bf16"})
    assert precision._read_cpuinfo(tmp_path / "missing")[1] == frozenset()  # macOS, Windows


@pytest.mark.parametrize("value,name", [("bf16", "bf16"), ("fp32", "fp32"), (" FP32 ", "fp32")])
def test_rlcourse_dtype_overrides_the_detection(monkeypatch, value, name):
    monkeypatch.setenv("RLCOURSE_DTYPE", value)
    p = precision.current()
    assert p.name == name and p.dtype == precision.DTYPES[name] and "RLCOURSE_DTYPE" in p.reason
    assert TrainConfig(steps=1, batch_size=1, learning_rate=0.1).bf16 == (name == "bf16")


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setenv("RLCOURSE_DTYPE", "auto")
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False) \
        or not torch.cuda.is_available() and precision.cpu_info().native_bf16
    assert precision.current().name == ("bf16" if native else "fp32")
    assert precision.current().hardware in precision.current().describe()


def test_a_wrong_rlcourse_dtype_says_the_fix(monkeypatch):
    monkeypatch.setenv("RLCOURSE_DTYPE", "fp16")
    with pytest.raises(ValueError, match="RLCOURSE_DTYPE='fp16'.*Fix: set it to bf16, fp32 or auto"):
        precision.current()


def test_autocast_only_in_bf16(monkeypatch):
    x = torch.randn(4, 4)
    monkeypatch.setenv("RLCOURSE_DTYPE", "fp32")
    with precision.autocast("cpu"):
        assert (x @ x).dtype == torch.float32
    monkeypatch.setenv("RLCOURSE_DTYPE", "bf16")
    with precision.autocast(torch.nn.Linear(4, 4)):
        assert (x @ x).dtype == torch.bfloat16


def test_the_emulation_recipe_makes_this_machine_fp32():
    """ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 (what the README suggests for trying the fp32 path on a
    bf16 CPU) must make the course choose fp32 here, whichever CPU this is. oneDNN reads the cap at start-up, so
    a fresh process."""
    code = ("import json, torch; from rlcourse import precision as p; c = p.current(); "
            "print(json.dumps([c.name, torch.backends.cpu.get_cpu_capability()]))")
    env = {k: v for k, v in os.environ.items() if k != "RLCOURSE_DTYPE"} | {
        "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    name, capability = json.loads(out.strip().splitlines()[-1])
    assert name == "fp32"
    assert capability in ("AVX2", "DEFAULT", "NO AVX")


def test_every_precision_has_tolerances_and_fp32_is_tighter():
    assert set(parity.TOLERANCES) == set(precision.DTYPES)
    bf16, fp32 = parity.TOLERANCES["bf16"], parity.TOLERANCES["fp32"]
    for field in bf16.__dataclass_fields__:
        assert 0 < getattr(fp32, field) < getattr(bf16, field), field
    assert parity.tolerance() == parity.TOLERANCES[precision.current().name]


def test_train_casts_a_plain_model_only_when_asked(tokenizer, tmp_path):
    """An unquantized model keeps fp32 adapters whatever the precision (TRL only casts quantized models)."""
    from rlcourse.methods import sft

    model = tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    assert not is_quantized(model)
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]}]
    from rlcourse.train import train

    batches = sft.batches(rows * 2, tokenizer, 2, 32)
    train(model, batches, sft.step_fn(), TrainConfig(steps=1, batch_size=2, learning_rate=1e-3, bf16=True), tmp_path,
          progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("bf16", [True, False])
def test_adapters_are_rounded_to_bf16_as_trls_constructor_leaves_them(tokenizer, bf16):
    """TRL's constructor casts a quantized model's adapters to bf16; match_precision casts them back in fp32. Our loop
    (as_trl_trains) must start from the same values, on bf16's grid, in the precision it trains in."""
    model = tiny_model(tokenizer, lora=LoraSettings(r=4, alpha=8))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    as_trl_trains(model, bf16)
    for p in (p for p in model.parameters() if p.requires_grad):
        assert p.dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert torch.equal(p.float(), p.bfloat16().float())


# ---------------------------------------------------------------- threads

def test_thread_settings_are_a_short_spin_and_usable_cores(monkeypatch):
    env = threads.environment()
    assert int(env["GOMP_SPINCOUNT"]) < 300_000  # libgomp's default, the one that hogs a shared CPU
    assert "OMP_NUM_THREADS" not in env or int(env["OMP_NUM_THREADS"]) < (os.cpu_count() or 1)
    assert threads.kernel_env_args() == f"--env GOMP_SPINCOUNT {threads.SPINCOUNT}"


def test_a_cpu_quota_or_mask_caps_the_threads(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert threads.environment()["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert "OMP_NUM_THREADS" not in threads.environment()


def test_import_rlcourse_sets_them_before_torch_and_never_over_the_user():
    code = ("import os, sys, json; import rlcourse; print(json.dumps(['torch' in sys.modules, "
            "os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_NUM_THREADS'), os.environ.get('OMP_WAIT_POLICY')]))")
    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "RLCOURSE_THREADS")}

    def run(**extra):
        out = subprocess.run([sys.executable, "-c", code], env=base | extra, capture_output=True, text=True,
                             check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    torch_loaded, spin, n, policy = run()
    assert not torch_loaded, "import rlcourse must not import torch: the OpenMP settings would come too late"
    assert spin == threads.SPINCOUNT and n == threads.environment().get("OMP_NUM_THREADS") and policy is None
    assert run(GOMP_SPINCOUNT="7", OMP_NUM_THREADS="1")[1:3] == ["7", "1"]
    assert run(OMP_WAIT_POLICY="PASSIVE")[1:4:2] == [None, "PASSIVE"]  # their policy, not overridden by our spin
    assert run(RLCOURSE_THREADS="off")[1:] == [None, None, None]


def test_the_course_kernel_gets_the_spin_count():
    """`make install` writes the settings into the Jupyter kernel spec, for notebooks that import torch first."""
    kernel = os.path.join(sys.prefix, "share", "jupyter", "kernels", "rlcourse", "kernel.json")
    if not os.path.exists(kernel):
        pytest.skip("the course kernel is not installed in this environment (make install does it)")
    assert json.load(open(kernel)).get("env", {}).get("GOMP_SPINCOUNT") == threads.SPINCOUNT
