import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import model_input, randomize_adapters, tiny_llama
from lorafit import LoraConfig, inject
from lorafit.ops import fused
from lorafit.ops.lm_loss import causal_lm_loss
from lorafit.train.step import prepare_for_training


@pytest.fixture(autouse=True)
def fusion_on():
    fused.set_fusion(True)
    yield
    fused.set_fusion(True)


def _inputs(kernel: str, shape: tuple[int, ...], dtype: torch.dtype):
    g = torch.Generator().manual_seed(sum(shape))
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    H = shape[-1]
    if kernel == "swiglu_forward":
        return r(*shape), r(*shape)
    if kernel in ("swiglu_backward", "swiglu_backward_and_forward"):
        return r(*shape), r(*shape), r(*shape)
    if kernel.startswith("rotary_rows"):  # (N, q | k | v) rows, 2 rotated heads of 8 + v (8)
        n = shape[0] * shape[1]
        return r(n, H), r(n, 8), r(n, 8), 2, 8
    if kernel == "scale_grad":  # (tokens, out) gradient and output, the scale c (out,): 70, 195
        n = shape[0] * shape[1] * 5  # tokens, so the blocks of 64 and a remainder both run
        return r(n, H), r(n, H), r(H).abs() + 0.5
    x, w = r(*shape) * 3, r(H)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    if kernel == "rms_norm_forward":
        return x, w, 1e-6, dtype
    if kernel == "rms_norm_backward":
        return x, w, rstd, r(*shape)
    if kernel == "rms_norm_weight_grad":
        return x, rstd, r(*shape)
    logits = r(shape[0] * shape[1], 50) * 4  # cross_entropy_grad_: (n, V)
    target = torch.randint(0, 50, (logits.shape[0],), generator=g)
    if kernel == "cross_entropy_hits":
        target[::3] = logits[::3].float().argmax(-1)  # some rows predicted right
        return logits, target
    return logits, target, torch.rand(logits.shape[0], generator=g) < 0.7  # some rows left out


def _copies(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


KERNELS = [
    "swiglu_forward",
    "swiglu_backward",
    "swiglu_backward_and_forward",
    "rms_norm_forward",
    "rms_norm_backward",
    "rms_norm_weight_grad",
    "cross_entropy_grad_",
    "cross_entropy_hits",
    "rotary_rows_forward",
    "rotary_rows_backward",
    "scale_grad",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", KERNELS)
def test_compiled_kernel_matches_its_eager_reference_at_every_shape(name, dtype):
    kernel = getattr(fused, name)
    # Start from a clean compile: the tests before this one compiled the same functions for
    # their own models (sizes, dtypes), and enough of those reach torch's recompile limit, after
    # which a kernel runs eagerly by design. That is a property of this test process, not of the
    # kernel under test.
    torch._dynamo.reset()
    kernel.compiled, kernel.failed = None, False
    for shape in [(2, 7, 24), (3, 13, 24)]:  # batches of another length reuse the compile
        args = _inputs(name, shape, dtype)
        got, want = kernel(*_copies(args)), kernel.fn(*_copies(args))  # one kernel writes its input
        assert kernel.compiled is not None and not kernel.failed
        for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
            assert g.dtype == w.dtype and g.shape == w.shape
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * w.abs().max())


@pytest.mark.parametrize("compiled", [True, False])
def test_cross_entropy_grad_is_the_loss_and_gradient_of_f_cross_entropy(compiled):
    """Over the valid rows (the others: no loss, zero gradient), as F.cross_entropy with
    ignore_index gives them; the gradient is written over the logits (no second (n, V) tensor)."""
    fused.set_fusion(compiled)
    logits, target, valid = _inputs("cross_entropy_grad_", (4, 9, 8), torch.float32)
    assert 0 < valid.sum() < len(valid)
    leaf = logits.clone().requires_grad_(True)
    want = F.cross_entropy(leaf, target.masked_fill(~valid, -100), reduction="sum")
    want.backward()
    loss, grad = fused.cross_entropy_grad_(logits, target, valid)
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grad, leaf.grad)
    assert grad.data_ptr() == logits.data_ptr()


@pytest.mark.parametrize("compiled", [True, False])
def test_cross_entropy_hits_is_f_cross_entropy_and_the_argmax_hits(compiled):
    fused.set_fusion(compiled)
    logits, target = _inputs("cross_entropy_hits", (4, 9, 8), torch.bfloat16)
    logits[1, :] = 0.5  # a row of ties: argmax is the first column, as torch's
    target[1] = 0
    loss, hits = fused.cross_entropy_hits(logits, target)
    want = F.cross_entropy(logits.float(), target, reduction="sum")
    torch.testing.assert_close(loss, want)
    assert hits.item() == (logits.float().argmax(-1) == target).sum().item() >= 13


def test_doras_scale_gradient_runs_the_compiled_kernel_in_the_one_op_forms():
    """The tuner cannot import ops: ops/fused.py puts its kernel in the tuner's slot at import."""
    from lorafit.tuner.kinds import linear

    assert linear._kernels["scale_grad"] is fused.scale_grad
    g = torch.Generator().manual_seed(0)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        for n in (40, 200):  # fewer than 64 tokens; blocks of 64 and a remainder
            grad = torch.randn(24, n, generator=g).to(dtype).T  # a transposed gradient
            y = torch.randn(n, 24, generator=g).to(dtype)
            c = torch.rand(24, generator=g).to(dtype) + 0.5
            want = linear.scale_grad(grad, y, c)
            got = fused.scale_grad(grad, y, c)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_gradients_with_the_compiled_scale_kernel_equal_the_eager_ones(dtype, monkeypatch):
    from lorafit.tuner.kinds import linear

    def grads():
        model = tiny_llama()
        inject(model, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
        randomize_adapters(model)
        with torch.no_grad():  # magnitudes away from the row norms, so the scale matters
            for n, p in model.named_parameters():
                if n.endswith("magnitude"):
                    p.mul_(torch.linspace(0.5, 1.5, p.numel()).reshape(p.shape))
        prepare_for_training(model, "bf16" if dtype == torch.bfloat16 else "fp32")
        model.train()
        ids = torch.tensor([[5, 9, 3, 7, 11, 2], [1, 6, 10, 12, 14, 3]])
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if n.endswith("magnitude")}

    torch._dynamo.reset()
    fused.scale_grad.compiled, fused.scale_grad.failed = None, False
    fast = grads()
    assert fused.scale_grad.compiled is not None and not fused.scale_grad.failed
    monkeypatch.setitem(linear._kernels, "scale_grad", linear.scale_grad)
    slow = grads()
    assert fast and fast.keys() == slow.keys()
    for n, g in slow.items():
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(fast[n], g, rtol=tol, atol=tol * g.abs().max(), msg=n)


def test_swiglu_backward_is_the_gradient_of_swiglu_forward():
    gate, up, dout = _inputs("swiglu_backward", (2, 5, 16), torch.float32)
    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    (F.silu(g) * u).backward(dout)
    d_gate, d_up = fused.swiglu_backward(gate, up, dout).split(16, -1)
    torch.testing.assert_close(d_gate, g.grad)
    torch.testing.assert_close(d_up, u.grad)


def test_a_kernel_that_cannot_compile_warns_once_and_runs_eagerly(monkeypatch):
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(1)
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(fused.torch, "compile", broken_compile)
    kernel = fused.fused(fused.swiglu_forward.fn)
    gate, up = _inputs("swiglu_forward", (2, 3, 8), torch.float32)
    with pytest.warns(RuntimeWarning, match="could not compile swiglu_forward"):
        out = kernel(gate, up)
    torch.testing.assert_close(out, F.silu(gate) * up)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(kernel(gate, up), out)  # eager now, no second try or warning
    assert calls == [1] and kernel.failed


@pytest.mark.parametrize("failure", ["compiling", "running"])
def test_a_kernel_that_writes_its_input_falls_back_only_when_compiling_failed(failure, monkeypatch):
    """cross_entropy_grad_ writes the gradient over the logits: after a failure while running
    (out of memory, say) the logits may be half-written, and an eager rerun would compute the loss
    of that, silently. Only a compile error (raised before anything runs) falls back."""

    def broken_compile(fn, **kwargs):
        def run(logits, *rest):
            if failure == "compiling":
                raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")
            logits.zero_()  # what a kernel that stopped half-way leaves
            raise RuntimeError("can't allocate memory")

        return run

    monkeypatch.setattr(fused.torch, "compile", broken_compile)
    kernel = fused.fused(fused.cross_entropy_grad_.fn, writes_input=True)
    logits, target, valid = _inputs("cross_entropy_grad_", (2, 3, 8), torch.float32)
    want = fused.cross_entropy_grad_.fn(logits.clone(), target, valid)
    if failure == "running":
        with pytest.raises(RuntimeError, match="allocate"):
            kernel(logits, target, valid)
        assert not kernel.failed
        return
    with pytest.warns(RuntimeWarning, match="could not compile"):
        got = kernel(logits, target, valid)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_fused_kernels_false_in_the_run_config_runs_eager_torch(monkeypatch):
    def no_compile(fn, **kwargs):
        raise AssertionError("compiled although fused_kernels is off")

    monkeypatch.setattr(fused.torch, "compile", no_compile)
    kernel = fused.fused(fused.swiglu_backward.fn)
    model = tiny_llama()
    prepare_for_training(model, "fp32", fused_kernels=False)
    assert not fused.fusion_enabled()
    args = _inputs("swiglu_backward", (2, 3, 8), torch.float32)
    torch.testing.assert_close(kernel(*args), kernel.fn(*args))
    assert kernel.compiled is None


def _loss_and_grads(precision: str, fused_kernels: bool):
    model = tiny_llama()
    inject(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    prepare_for_training(model, precision, fused_kernels=fused_kernels)
    model.train()
    ids = model_input("llama")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = causal_lm_loss(model, batch, 8)[0]
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad]
    assert len(grads) == 2 * 7 * 2  # A and B of 7 linears in each of 2 layers
    return loss.detach(), torch.cat(grads)


def test_fused_and_eager_fp32_training_give_the_same_loss_and_adapter_grads():
    loss_on, grads_on = _loss_and_grads("fp32", True)
    loss_off, grads_off = _loss_and_grads("fp32", False)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads_on, grads_off, rtol=1e-5, atol=1e-5 * grads_off.abs().max())


def test_fused_bf16_training_is_as_close_to_fp32_as_eager_bf16():
    """Under bf16 both paths round differently; the fused one must not round worse."""
    loss_ref, grads_ref = _loss_and_grads("fp32", False)
    err = {}
    for on in (True, False):
        loss, grads = _loss_and_grads("bf16", on)
        assert abs(loss - loss_ref) / loss_ref < 1e-3
        err[on] = ((grads - grads_ref).norm() / grads_ref.norm()).item()
    assert err[True] < 1.25 * err[False] + 1e-3, err
