"""QuantizedLinear: close to the float layer within each scheme's error, gradients to the input
only, storage that never reaches a state_dict, and refusals that leave the model untouched."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafit.quant import (
    QuantizedLinear,
    dequantize_model,
    is_quantized,
    pick_backend,
    quantize_model,
    quantized_modules,
)

BACKENDS = [
    ("nf4", "bitsandbytes"),
    ("nf4", "torchao"),
    ("int8", "torchao"),
    ("int8", "bitsandbytes"),
]
# Relative Frobenius error of the dequantized weight for Gaussian weights: NF4 spends 4 bits
# (~0.09 measured), int8 per-row 8 bits (~0.01).
WEIGHT_ERROR = {"nf4": 0.12, "int8": 0.015}


def _linear(n_in=256, n_out=128, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    nn.init.normal_(lin.weight, std=0.02)
    return lin


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scheme,library", BACKENDS)
def test_forward_is_within_the_scheme_error(scheme, library):
    lin = _linear()
    q = QuantizedLinear.quantize(lin.weight, lin.bias, scheme, "cpu", library)
    assert _rel(q.dequantize(torch.float32), lin.weight) < WEIGHT_ERROR[scheme]
    x = torch.randn(3, 7, 256)
    y = q(x)
    assert y.shape == (3, 7, 128) and y.dtype == torch.bfloat16
    assert _rel(y, lin(x)) < WEIGHT_ERROR[scheme] * 1.5
    # And exactly the layer with the dequantized weight (up to bf16 matmul rounding).
    expected = F.linear(x.bfloat16(), q.dequantize(), q.bias)
    torch.testing.assert_close(y.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_the_two_nf4_backends_dequantize_to_the_same_weights():
    lin = _linear()
    a = QuantizedLinear.quantize(lin.weight, None, "nf4", "cpu", "bitsandbytes").dequantize()
    b = QuantizedLinear.quantize(lin.weight, None, "nf4", "cpu", "torchao").dequantize()
    # Same format (QLoRA's NF4 levels, blocks of 64); they round the double-quantized scales a
    # little differently (~2% here, against NF4's own ~9% error).
    assert _rel(a, b) < 0.05


@pytest.mark.parametrize("scheme,library", BACKENDS)
def test_input_gradient_uses_the_dequantized_weight_and_the_weight_gets_none(scheme, library):
    lin = _linear()
    q = QuantizedLinear.quantize(lin.weight, lin.bias, scheme, "cpu", library)
    x = torch.randn(5, 256, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(5, 128, dtype=torch.bfloat16)
    q(x).backward(dy)
    torch.testing.assert_close(x.grad.float(), (dy @ q.dequantize()).float(), atol=1e-2, rtol=1e-2)
    assert all(not p.requires_grad for p in q.parameters())
    assert all(b.grad is None for b in q.buffers())


def test_storage_is_small_and_never_in_a_state_dict():
    lin = _linear(1024, 512)
    nf4 = QuantizedLinear.quantize(lin.weight, lin.bias, "nf4", "cpu")
    int8 = QuantizedLinear.quantize(lin.weight, lin.bias, "int8", "cpu")
    bf16_bytes = lin.weight.numel() * 2
    assert nf4.nbytes() < bf16_bytes * 0.27  # ~4.13 bits per weight
    assert int8.nbytes() < bf16_bytes * 0.51
    assert set(nf4.state_dict()) == {"bias"} and set(int8.state_dict()) == {"bias"}


def test_dtype_casts_leave_the_quantized_storage_alone():
    lin = _linear()
    q = QuantizedLinear.quantize(lin.weight, lin.bias, "nf4", "cpu")
    before = q.dequantize()
    dtypes = {k: b.dtype for k, b in q.named_buffers()}
    q.half().float().to(torch.bfloat16)
    assert {k: b.dtype for k, b in q.named_buffers()} == dtypes
    assert torch.equal(q.dequantize(), before)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64)), nn.Linear(64, 8)
    )


def test_quantize_model_keeps_the_named_modules_and_dequantize_undoes_it():
    model = _mlp()
    x = torch.randn(4, 64)
    ref = model(x)
    assert quantize_model(model, "nf4", keep={"3"}) == 2
    assert [p for p, _ in quantized_modules(model)] == ["0", "2.0"]
    assert type(model[3]) is nn.Linear and is_quantized(model)
    model.to(torch.bfloat16)  # the float rest, as training stores it
    approx = model(x.bfloat16())
    assert _rel(approx, ref) < 0.15
    assert dequantize_model(model, torch.bfloat16) == 2 and not is_quantized(model)
    torch.testing.assert_close(model(x.bfloat16()).float(), approx.float(), atol=3e-2, rtol=3e-2)


def test_refusals_leave_the_model_untouched():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="no nn.Linear layers to quantize"):
        quantize_model(model, "nf4")
    model = _mlp()
    with pytest.raises(ValueError, match="unknown quantization 'fp4'"):
        quantize_model(model, "fp4")
    with pytest.raises(ValueError, match="unknown quantization backend 'triton'"):
        quantize_model(model, "nf4", library="triton")
    assert not is_quantized(model)
    with pytest.raises(ValueError, match="does not run on mps"):
        pick_backend("nf4", "mps", "bitsandbytes")


def test_under_checkpointing_the_recompute_weight_serves_backward(monkeypatch):
    from torch.utils.checkpoint import checkpoint

    lin = _linear(64, 32)
    q = QuantizedLinear.quantize(lin.weight, lin.bias, "nf4")
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    checkpoint(q, x, use_reentrant=False).float().sum().backward()
    expected, x.grad = x.grad.clone(), None
    calls = []
    real = q.dequantize
    monkeypatch.setattr(q, "dequantize", lambda *a: calls.append(1) or real(*a))
    q.keep_dequantized = True  # what prepare_for_training sets with gradient checkpointing
    checkpoint(q, x, use_reentrant=False).float().sum().backward()
    assert torch.equal(x.grad, expected)
    assert len(calls) == 2  # forward + recompute; backward reuses the recompute's weight
