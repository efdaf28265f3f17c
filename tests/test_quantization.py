"""rlcourse.quantization against bitsandbytes and peft (the outside references) and against its own math, and
what rlcourse.measure counts for a 4-bit layer. The measurements on a model: tests/test_measure.py.

No real model is loaded: random tensors and single bitsandbytes layers.
"""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from rlcourse.exercises.qlora import check_lora_forward, check_quantize_nf4_blockwise
from rlcourse.measure import count_parameters, weight_memory_bytes
from rlcourse.quantization import (adamw_step, compute_dtype, dequantize_nf4_blockwise, lora_forward,
                                   nf4_bits_per_parameter, nf4_levels, nf4_levels_from_quantiles,
                                   quantize_nf4_blockwise)


def _linear4bit(weight: torch.Tensor, double_quant: bool = False, dtype=torch.float32) -> bnb.nn.Linear4bit:
    """A bitsandbytes NF4 layer holding ``weight``, quantised on CPU as transformers does it."""
    d_out, d_in = weight.shape
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=dtype, compress_statistics=double_quant,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, module=layer)
    layer.support_avx512bf16_for_cpu = False  # README pitfall 1, as rlcourse.models does
    return layer.to("cpu")  # quantisation happens here


def test_nf4_levels_come_from_normal_quantiles():
    levels = nf4_levels()
    assert levels.shape == (16,) and levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert (levels[1:] > levels[:-1]).all()
    torch.testing.assert_close(nf4_levels_from_quantiles(), levels, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape,blocksize", [((96, 64), 64), ((48, 256), 128), ((3, 1000), 64), ((451,), 64),
                                             ((7, 13), 64)])
def test_quantize_nf4_matches_bitsandbytes_bit_for_bit(shape, blocksize):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, absmax = quantize_nf4_blockwise(w, blocksize)
    ref_packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, state.absmax)
    ours = dequantize_nf4_blockwise(packed, absmax, w.shape, blocksize)
    theirs = bnbF.dequantize_4bit(ref_packed, state).reshape(w.shape)
    assert torch.equal(ours, theirs)


def test_dequantize_error_is_at_most_half_a_level_gap():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    packed, absmax = quantize_nf4_blockwise(w)
    err = (dequantize_nf4_blockwise(packed, absmax, w.shape) - w).abs().reshape(-1, 64)  # (blocks, 64)
    half_gap = (nf4_levels().diff().max() / 2) * absmax.unsqueeze(1)
    assert (err <= half_gap + 1e-6).all()
    # each block's largest |w| is a level (±1 · absmax), so it survives exactly
    blocks = w.reshape(-1, 64)
    assert torch.allclose(err.gather(1, blocks.abs().argmax(1, keepdim=True)), torch.zeros(len(blocks), 1))


def test_quantize_handles_an_all_zero_block():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    packed, absmax = quantize_nf4_blockwise(w)
    ref_packed, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed)
    assert torch.equal(dequantize_nf4_blockwise(packed, absmax, w.shape)[0], torch.zeros(64))


@pytest.mark.parametrize("double_quant", [False, True])
def test_bits_per_parameter_match_bitsandbytes_storage(double_quant):
    w = torch.randn(1024, 1024) * 0.02
    layer = _linear4bit(w, double_quant=double_quant)
    bits = 8 * weight_memory_bytes(layer) / w.numel()
    assert bits == pytest.approx(nf4_bits_per_parameter(64, double_quant), abs=0.01)


def test_weight_memory_and_parameter_count_of_a_4bit_layer():
    layer = _linear4bit(torch.randn(128, 64))
    # 4 bits per weight + one fp32 absmax per 64 weights + the 16-entry fp32 code table
    assert weight_memory_bytes(layer) == 128 * 64 // 2 + (128 * 64 // 64) * 4 + 16 * 4
    assert count_parameters(layer) == (0, 128 * 64)
    # transformers' footprint misses the quantisation state, we do not
    assert weight_memory_bytes(torch.nn.Linear(64, 128, bias=False)) == 128 * 64 * 4


def test_lora_forward_matches_peft_lora_linear():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(20, 12))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B starts at zero; make the update visible
    x = torch.randn(3, 5, 20)
    expected = model(x)
    got = lora_forward(x, layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                       alpha=8, r=4, bias=layer.base_layer.bias)
    torch.testing.assert_close(got, expected)


def test_lora_forward_on_a_4bit_base_matches_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", _linear4bit(torch.randn(32, 64) * 0.1))
    net.is_loaded_in_4bit = True
    model = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    W = bnbF.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)  # (32, 64)
    x = torch.randn(4, 64)
    got = lora_forward(x, W, layer.lora_A["default"].weight, layer.lora_B["default"].weight, alpha=16, r=8)
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)


def test_lora_with_zero_B_is_the_base_layer():
    x, W, A = torch.randn(2, 6), torch.randn(5, 6), torch.randn(3, 6)
    torch.testing.assert_close(lora_forward(x, W, A, torch.zeros(5, 3), alpha=16, r=3), x @ W.T)


def test_adamw_step_matches_torch():
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_()]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    state: dict = {}
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        adamw_step(ours, state, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_first_adamw_step_moves_every_parameter_by_about_lr():
    p = torch.randn(1000).requires_grad_()
    before = p.detach().clone()
    p.grad = torch.randn(1000) * 1e-2  # on step one only the sign matters, as long as |g| ≫ ε
    p.grad[p.grad.abs() < 1e-4] = 1e-4
    adamw_step([p], {}, lr=1e-3)
    torch.testing.assert_close((p.detach() - before).abs(), torch.full((1000,), 1e-3), atol=1e-5, rtol=0)


def test_compute_dtype_switches_and_restores():
    layer = _linear4bit(torch.randn(32, 64), dtype=torch.bfloat16)
    net = torch.nn.Sequential(layer)
    x = torch.randn(2, 64)
    with compute_dtype(net, torch.float32):
        assert layer.compute_dtype == torch.float32
        exact = net(x)
    assert layer.compute_dtype == torch.bfloat16
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(exact, x @ W.T)


def test_exercise_checkers_accept_the_right_answer_and_reject_wrong_ones():
    check_lora_forward(lora_forward)
    with pytest.raises(AssertionError, match="lora_forward"):
        check_lora_forward(lambda x, W, A, B, alpha, r: x @ W.T + (x @ A.T) @ B.T)  # forgot α/r
    check_quantize_nf4_blockwise(quantize_nf4_blockwise)

    def low_nibble_first(w, blocksize):
        packed, absmax = quantize_nf4_blockwise(w, blocksize)
        return ((packed & 0xF) << 4) | (packed >> 4), absmax

    with pytest.raises(AssertionError, match="quantize_nf4_blockwise"):
        check_quantize_nf4_blockwise(low_nibble_first)
