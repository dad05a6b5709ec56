"""Every registered base-layer kind: step-0 identity, merged == unmerged, PEFT's shapes; and the
registry itself (a new kind is one registered class, no edits to the layer)."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from helpers import model_input, outputs, tiny_llama
from lorafit import LoraConfig, inject, load_adapter, merge, save_adapter, unmerge
from lorafit.tuner.kinds import LayerKind, kind_of, register_kind, registered_kinds
from lorafit.tuner.kinds import base as kinds_base
from lorafit.tuner.layer import LoraLayer
from lorafit.tuner.variants import variants_for


class GainLinear(nn.Module):
    """A stand-in for a quantized linear: the stored weight is not the weight used (y = g x W^T),
    so the kind must 'dequantize' on read and 're-quantize' on write, as NF4 / int8 kinds will."""

    def __init__(self, d_in: int, d_out: int, gain: float = 3.0):
        super().__init__()
        self.in_features, self.out_features, self.gain = d_in, d_out, gain
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        return F.linear(x, self.gain * self.weight, self.bias)


class GainLinearKind(LayerKind):
    name = "gain_linear"
    label = "GainLinear (test)"
    module_types = (GainLinear,)
    all_linear = True

    def fan_dims(self, module):
        return module.in_features, module.out_features

    def weight(self, module):
        return module.gain * module.weight  # a fresh tensor, like a dequantized one

    def write_weight(self, module, w):
        module.weight.data.copy_((w / module.gain).to(module.weight.dtype))

    def branch(self, module, x, A, B):
        return F.linear(F.linear(x, A), B)

    def base_op(self, module, x, w, bias=True):
        return F.linear(x, w.to(module.weight.dtype), module.bias if bias else None)

    def probe(self, module, gen):
        return torch.randn(8, module.in_features, generator=gen)


register_kind(GainLinearKind())

# One sample per registered kind: (module, input). A kind registered without a sample fails below.
SAMPLES = {
    "linear": lambda: (nn.Linear(12, 10), torch.randn(3, 5, 12)),
    "gpt2_conv1d": lambda: (Conv1D(10, 12), torch.randn(3, 5, 12)),
    "embedding": lambda: (nn.Embedding(20, 10, padding_idx=0), torch.randint(0, 20, (3, 5))),
    "conv": lambda: (nn.Conv2d(4, 6, 3, padding=1, stride=2), torch.randn(2, 4, 7, 7)),
    "gain_linear": lambda: (GainLinear(12, 10), torch.randn(3, 5, 12)),
}
EXTRA = {  # more modules of the same kinds
    "conv1d": lambda: (nn.Conv1d(4, 6, 3), torch.randn(2, 4, 9)),
    "conv3d": lambda: (nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1)), torch.randn(2, 2, 3, 5, 5)),
}
ALL = {**SAMPLES, **EXTRA}


def _sample(name):
    torch.manual_seed(0)
    return ALL[name]()


def _randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_every_registered_kind_has_a_sample():
    ours = {k.name for k in registered_kinds() if type(k).__module__.startswith("lorafit.")}
    assert ours == {"linear", "gpt2_conv1d", "embedding", "conv", "quantized-linear"}
    assert ours | {"gain_linear"} == set(SAMPLES) | {"quantized-linear"}
    assert {kind_of(make()[0]).name for make in ALL.values()} == set(SAMPLES)


@pytest.mark.parametrize("sample", list(ALL))
@pytest.mark.parametrize("dora", [False, True])
def test_step0_identity(sample, dora):
    base, x = _sample(sample)
    expected = base(x)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=4, alpha=8, variants=variants_for({"use_dora": dora}))
    layer.active = ["a"]
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sample", list(ALL))
@pytest.mark.parametrize("dora", [False, True])
def test_merged_equals_unmerged_and_round_trip(sample, dora):
    base, x = _sample(sample)
    W0 = base.weight.detach().clone()
    layer = LoraLayer(base)
    layer.add_adapter("a", r=3, alpha=6, variants=variants_for({"use_dora": dora}))
    layer.active = ["a"]
    _randomize(layer)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, base(x), atol=1e-3)  # the adapter does something
    layer.merge(["a"])
    torch.testing.assert_close(base(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)  # merged: not added twice
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), W0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sample", list(ALL))
def test_branch_equals_base_op_with_dense_update(sample):
    """The low-rank branch equals running the base op with W + scale * B A (nothing written)."""
    base, x = _sample(sample)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=3, alpha=6)
    layer.active = ["a"]
    _randomize(layer)
    dense = layer.base_output(x, layer.out_major_weight() + layer.delta_weight("a"))
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)


PEFT_SHAPES = {  # r = 3; what PEFT stores for these modules
    "linear": ((3, 12), (10, 3)),
    "gpt2_conv1d": ((3, 12), (10, 3)),
    "embedding": ((3, 20), (10, 3)),
    "conv": ((3, 4, 3, 3), (6, 3, 1, 1)),
    "conv1d": ((3, 4, 3), (6, 3, 1)),
    "conv3d": ((3, 2, 1, 3, 3), (3, 3, 1, 1, 1)),
    "gain_linear": ((3, 12), (10, 3)),
}


@pytest.mark.parametrize("sample", list(ALL))
def test_shapes_follow_peft(sample):
    base, x = _sample(sample)
    kind = kind_of(base)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=3, alpha=3, variants=variants_for({"use_dora": True}))
    ad = layer.adapters["a"]
    assert (tuple(ad.A.shape), tuple(ad.B.shape)) == PEFT_SHAPES[sample]
    assert ad.A.dtype == ad.B.dtype == torch.float32
    fan_out = ad.B.shape[0]
    assert tuple(ad.magnitude.shape) == kind.magnitude_shape(base)
    assert ad.magnitude.numel() == fan_out == layer.dims()[1]
    assert layer.out_major_weight().shape[0] == fan_out
    assert layer.delta_weight("a").shape == layer.out_major_weight().shape
    probe = kind.probe(base, torch.Generator().manual_seed(0))
    assert base(probe).shape == layer(probe).shape


@pytest.mark.parametrize(
    "sample,max_rank", [("linear", 10), ("embedding", 10), ("conv", 6), ("conv3d", 3)]
)
def test_max_rank_is_min_of_update_dims(sample, max_rank):
    base, _ = _sample(sample)
    assert kind_of(base).max_rank(base) == max_rank


def test_embedding_init_and_no_dropout():
    base, x = _sample("embedding")
    layer = LoraLayer(base)
    layer.add_adapter("a", r=4, alpha=4, dropout=0.5, init="gaussian")  # PEFT ignores init here
    ad = layer.adapters["a"]
    assert torch.all(ad.A == 0) and ad.B.std().item() == pytest.approx(1.0, rel=0.5)
    layer.active = ["a"]
    _randomize(layer)
    layer.train()
    assert torch.equal(layer(x), layer(x))  # ids are never dropped out


def test_conv_refusals_and_unknown_modules():
    for bad in (nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, dilation=2)):
        with pytest.raises(TypeError, match="grouped or dilated"):
            LoraLayer(bad)
    with pytest.raises(TypeError, match="padding_mode"):
        LoraLayer(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert kind_of(nn.LayerNorm(4)) is None
    with pytest.raises(TypeError, match="cannot wrap"):
        LoraLayer(nn.LayerNorm(4))


def test_most_specific_registered_class_wins(monkeypatch):
    monkeypatch.setattr(kinds_base, "_BY_TYPE", dict(kinds_base._BY_TYPE))  # undone after the test
    monkeypatch.setattr(kinds_base, "_KINDS", list(kinds_base._KINDS))

    class MyLinear(nn.Linear):
        pass

    assert kind_of(MyLinear(2, 2)).name == "linear"  # a subclass falls back to its parent's kind

    class MyLinearKind(type(kind_of(nn.Linear(1, 1)))):
        name = "my_linear"
        module_types = (MyLinear,)

    mine = register_kind(MyLinearKind())
    assert kind_of(MyLinear(2, 2)) is mine and kind_of(nn.Linear(2, 2)).name == "linear"
    with pytest.raises(ValueError, match="already has the layer kind"):
        register_kind(MyLinearKind())


class GainNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = GainLinear(6, 8)
        self.down = nn.Linear(8, 4)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def test_a_new_kind_works_end_to_end_without_layer_changes(tmp_path):
    model = GainNet()
    x = {"x": torch.randn(3, 6)}
    base = outputs(model, x)
    inject(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True))
    assert isinstance(model.up, LoraLayer) and model.up.kind.name == "gain_linear"
    torch.testing.assert_close(outputs(model, x), base, atol=1e-6, rtol=0)
    with torch.no_grad():
        for p in model.up.adapters.parameters():
            p.add_(0.3)
    adapted = outputs(model, x)
    merge(model, verify=True)
    torch.testing.assert_close(outputs(model, x), adapted, atol=1e-5, rtol=1e-5)
    unmerge(model)
    save_adapter(model, tmp_path / "ad")
    fresh = GainNet()
    load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(outputs(fresh, x), adapted, atol=1e-6, rtol=0)


def test_llama_step0_identity_through_inject():
    model = tiny_llama()
    x = model_input("llama")
    before = outputs(model, x)
    inject(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert torch.equal(outputs(model, x), before)


SRC = Path(__file__).resolve().parents[2] / "src" / "lorafit"
KINDS_DIR = SRC / "tuner" / "kinds"
# Checks outside kinds/ that name a kind's module type but are not about LoRA kinds.
ALLOWED = {
    ("ops/lm_loss.py", "type(head) is nn.Linear"): (
        "the fused linear cross-entropy needs the loss head to be exactly a plain nn.Linear "
        "(its weight and bias used as F.linear would): loss maths, not a LoRA kind"
    ),
    ("quant/linear.py", "type(module) is nn.Linear"): (
        "quantization replaces plain nn.Linear modules by QuantizedLinear: it defines a base "
        "module type, below the LoRA layer, and says which modules it can stand in for"
    ),
    ("quant/linear.py", "isinstance(m, QuantizedLinear)"): (
        "finding the modules quantization made (to dequantize them): the module type's own package"
    ),
}


def _kind_type_names() -> set[str]:
    """Class names of every registered kind's module types and their bases below nn.Module."""
    out = set()
    for kind in registered_kinds():
        for cls in kind.module_types:
            out.update(c.__name__ for c in cls.__mro__ if issubclass(c, nn.Module))
    return out - {"Module"}


def _names_in(node: ast.AST) -> set[str]:
    return {
        n.attr if isinstance(n, ast.Attribute) else n.id
        for n in ast.walk(node)
        if isinstance(n, (ast.Attribute, ast.Name))
    }


def _is_kind_valued(node: ast.AST, kind_vars: set[str]) -> bool:
    """Whether an expression reads a layer kind: `x.kind`, `kind_of(m)`, `layer_kind(m).name`,
    or a name assigned from one of those."""
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and (n.attr == "kind" or n.attr.endswith("_kind")):
            return True
        if isinstance(n, ast.Call) and "kind" in ast.unparse(n.func).lower():
            return True
        if isinstance(n, ast.Name) and n.id in kind_vars:
            return True
    return False


def _kind_tests(path: Path, rel: str = "") -> list[str]:
    """Places in `path` that test which kind a module is: a kind's name compared with something
    that reads a kind, or isinstance / issubclass / type(x) is against a kind's module type."""
    tree = ast.parse(path.read_text())
    kind_names = {k.name for k in registered_kinds()}
    type_names = _kind_type_names()
    kind_vars: set[str] = set()
    for node in ast.walk(tree):  # names bound to a kind (one pass per file is enough here)
        if isinstance(node, ast.Assign) and _is_kind_valued(node.value, kind_vars):
            kind_vars.update(t.id for t in node.targets if isinstance(t, ast.Name))
    found = []
    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            elts = [
                e for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set)) for e in s.elts
            ]
            names_a_kind = any(
                isinstance(s, ast.Constant) and s.value in kind_names for s in sides + elts
            )
            hit = names_a_kind and any(_is_kind_valued(s, kind_vars) for s in sides)
            is_type_of = any(
                isinstance(s, ast.Call) and ast.unparse(s.func) == "type" for s in sides
            )
            if is_type_of:
                others = [s for s in sides if not isinstance(s, ast.Call)]
                hit = hit or any(_names_in(s) & type_names for s in others)
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("isinstance", "issubclass")
            and len(node.args) == 2
        ):
            hit = bool(_names_in(node.args[1]) & type_names)
        if hit:
            found.append((rel or path.name, ast.unparse(node), node.lineno))
    return found


def test_no_module_outside_kinds_tests_a_kind(tmp_path):
    """Only tuner/kinds/ knows which module types exist: nowhere else in lorafit compares kind
    names or checks a module's type against a kind's (isinstance(m, nn.Linear), type(m) is ...)."""
    files = [p for p in SRC.rglob("*.py") if KINDS_DIR not in p.parents]
    assert len(files) >= 40 and any("ops" in p.parts for p in files)
    hits = [h for p in files for h in _kind_tests(p, p.relative_to(SRC).as_posix())]
    found = [f"{rel}:{line}: {text}" for rel, text, line in hits if (rel, text) not in ALLOWED]
    assert not found, found
    stale = set(ALLOWED) - {(rel, text) for rel, text, _ in hits}
    assert not stale, f"allow-list entries that no longer occur: {stale}"

    old_style = tmp_path / "old.py"  # the check can fail: what layer.py used to do, and worse
    old_style.write_text(
        "kind = options.schedule\n"
        'if kind == "linear":\n    pass\n'  # not a layer kind: not flagged
        'if self.kind == "embedding" or layer_kind(b) in ("linear", "conv"):\n    pass\n'
        "k = kind_of(m)\n"
        'if k.name == "conv":\n    pass\n'
        "if isinstance(m, (nn.Linear, Conv1D)) or issubclass(t, _ConvNd):\n    pass\n"
        "if type(m) is nn.Embedding or type(m) in (nn.Conv2d,):\n    pass\n"
        "if isinstance(m, nn.LayerNorm) or type(x) is float:\n    pass\n"  # not kinds
    )
    assert sorted(line for _, _, line in _kind_tests(old_style)) == [4, 4, 7, 9, 9, 11, 11]
