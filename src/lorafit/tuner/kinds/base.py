"""The base-layer kind interface, and the registry `kind_of(module)` looks modules up in.

A *kind* is everything that differs between the base modules LoRA can wrap (nn.Linear, GPT-2's
Conv1D, nn.Embedding, nn.ConvNd, later quantized linears): sizes, the A/B shapes, how the frozen
weight maps to an "out-major" matrix (rows = output features) and back, the LoRA branch, the base
op run with another weight, the default init, and the PEFT key names. `LoraLayer`, merge and the
file format talk to a kind only through these methods, so a new base type is one new file here
that subclasses `LayerKind` and calls `register_kind`.

Kinds are stateless singletons: the module is always passed in, and sizes are read from its
attributes (in_features, num_embeddings, kernel_size, ...), never guessed from tensor shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lorafit.tuner.registered import Registered


class LayerKind(Registered):
    """One family of wrappable base modules. Subclasses set the class attributes and implement
    `fan_dims`, `weight`, `write_weight`, `branch`, `base_op` and `probe`."""

    name: str = ""
    """Short identifier, used in messages only."""
    label: str = ""
    """How error messages name the supported modules, e.g. "nn.Linear"."""
    module_types: tuple[type, ...] = ()
    """The module classes of this kind (and their subclasses, unless those have a kind of their
    own)."""
    gguf_lora: bool = False
    """llama.cpp's LoRA GGUF can hold this kind's adapters (A, B over a weight matrix it applies
    as W + alpha/r B A)."""
    all_linear: bool = False
    """Whether target_modules="all-linear" selects these modules (PEFT: Linear and Conv1D)."""
    fan_in_fan_out: bool = False
    """The weight is stored (in, out); written to adapter_config.json for PEFT."""
    dropout: bool = True
    """Whether lora_dropout applies to the branch input (PEFT: not for embeddings)."""
    own_init: bool = False
    """A and B always get this kind's init, whatever init_lora_weights says (PEFT: embeddings)."""
    svd_init: bool = False
    """The weight is one dense (out, in) matrix that an SVD-based init (PiSSA) may re-express."""
    quantized: bool = False
    """The weight is stored quantized: readable (dequantized), never written in place."""
    plain_linear: bool = False
    """The module computes exactly F.linear(x, module.weight, module.bias) with its stored
    (out, in) weight, so other code may run it that way (serve's lean decoding step)."""
    peft_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    """PEFT's tensor-name suffixes for A and B after `<module path>.`."""

    # --- sizes -------------------------------------------------------------------------------
    def check(self, module: nn.Module) -> None:
        """Raise TypeError for a module of this kind that LoRA cannot wrap (e.g. grouped convs)."""

    def fan_dims(self, module: nn.Module) -> tuple[int, int]:
        """(fan_in, fan_out) as the A and B shapes see them."""
        raise NotImplementedError

    def adapter_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """PEFT's shapes of A and B for rank r."""
        fan_in, fan_out = self.fan_dims(module)
        return (r, fan_in), (fan_out, r)

    def max_rank(self, module: nn.Module) -> int:
        """The highest rank B A can have: min(d_in, d_out) of the flattened update."""
        a_shape, b_shape = self.adapter_shapes(module, 1)
        return min(b_shape[0], math.prod(a_shape[1:]))

    def magnitude_shape(self, module: nn.Module) -> tuple[int, ...]:
        """Shape of a per-output vector as PEFT stores it (DoRA's magnitude)."""
        return (self.fan_dims(module)[1],)

    def device(self, module: nn.Module) -> torch.device:
        return module.weight.device

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the base op computes in (a quantized kind answers its compute dtype)."""
        return module.weight.dtype

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return getattr(module, "bias", None)

    # --- the frozen weight in out-major layout -----------------------------------------------
    def weight(self, module: nn.Module) -> torch.Tensor:
        """The base weight with rows = output features, in its stored dtype (a view where
        possible; a quantized kind dequantizes)."""
        raise NotImplementedError

    def weight_shape(self, module: nn.Module) -> torch.Size:
        """The out-major weight's shape (without dequantizing a quantized one)."""
        return self.weight(module).shape

    def write_weight(self, module: nn.Module, w: torch.Tensor) -> None:
        """Store an out-major weight `w` (any float dtype) into the module, in place."""
        raise NotImplementedError

    def weight_version(self, module: nn.Module) -> tuple:
        """Changes whenever the stored weight changes (storage or in-place write): a cache key."""
        return (module.weight.data_ptr(), module.weight._version)

    # --- init and compute ----------------------------------------------------------------------
    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
        """Default init in place (B is zeros on entry): A Kaiming-uniform, or N(0, 1/r) for
        "gaussian"; init=False also randomises B (PEFT's non-identity init, for tests)."""
        if init == "gaussian":
            nn.init.normal_(A, std=1 / A.shape[0])
            return
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))

    def branch(
        self, module: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor
    ) -> torch.Tensor:
        """B(A(x)) for this kind's op; A and B already cast (and B already scaled)."""
        raise NotImplementedError

    def base_op(
        self, module: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: bool = True
    ) -> torch.Tensor:
        """The base module's op run with the out-major weight `w` instead of its own."""
        raise NotImplementedError

    def with_branch(
        self,
        module: nn.Module,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        out_scale: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """c * (module(x) + scale * B(A(x))) computed as one (A, B: the adapter's own parameters,
        uncast; c = out_scale(), a per-output (out,) tensor that may need a gradient, called only
        when this form runs; no c without out_scale), or None where this kind (or this module) has no such form and the layer adds
        `branch` to the module's output itself."""
        return None

    def join(self, modules: Sequence[nn.Module]) -> bool:
        """Make the frozen weights of modules that read the same input (q / k / v; gate / up) row
        blocks of one tensor, so `group_with_branch` multiplies by all of them at once; False
        (nothing changed) where this kind or these modules have no such form."""
        return False

    def group_with_branch(
        self,
        modules: Sequence[nn.Module],
        x: torch.Tensor,
        factors: Sequence[tuple],
        joined: bool = False,
    ) -> tuple[torch.Tensor, ...] | torch.Tensor | None:
        """`with_branch` of every module of a `join`ed group on the same x, as one op (factors:
        (A, B, scale, out_scale) per module; `joined`: the outputs as one (..., sum out) tensor),
        or None where it does not apply now: each module is then called on its own."""
        return None

    def per_output(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector (out,) shaped to broadcast over the module's output."""
        return v  # output features are the last dim

    def probe(self, module: nn.Module, gen: torch.Generator) -> torch.Tensor:
        """A small random input, to compare merged and unmerged outputs."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<layer kind {self.name}>"


_BY_TYPE: dict[type, LayerKind] = {}
_KINDS: list[LayerKind] = []


def register_kind(kind: LayerKind) -> LayerKind:
    """Make `kind` the kind of its module_types (and of their subclasses without one)."""
    for cls in kind.module_types:
        if cls in _BY_TYPE and _BY_TYPE[cls] is not kind:
            raise ValueError(f"{cls.__name__} already has the layer kind {_BY_TYPE[cls].name!r}")
        _BY_TYPE[cls] = kind
    if kind not in _KINDS:
        _KINDS.append(kind)
    return kind


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of `module`, or None when LoRA cannot wrap it. The most specific registered class
    wins, so a quantized subclass of nn.Linear gets its own kind once one is registered."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    return None


def registered_kinds() -> list[LayerKind]:
    return list(_KINDS)


# A one-op form keeps its input x for the A gradient, gt^T x (gt: the branch's (tokens, r) output
# gradient). When x is the output of an op whose own inputs autograd keeps anyway, that op can mark
# x with those inputs and with how to get gt^T x from them (`input_for_grad`): the one-op form then
# keeps them instead, and x is freed after the forward. RMSNorm's output w * x / rms(x) gives
# ((gt / rms)^T x) * w without rebuilding it; SwiGLU's is made again from gate and up, in the same
# pass as SwiGLU's own backward (which is why the function also gets x's gradient).
_INPUT_FOR_GRAD = "_lorafit_input_for_grad"


def input_for_grad(x: torch.Tensor, t_mm: Callable[..., torch.Tensor], *kept: torch.Tensor):
    """Mark x: `t_mm(gt, gx, *kept)` is gt^T x (2-D, (r, in)), where gx is the gradient of x the
    one-op form computed just before (the tensor its backward returns; None when it computed
    none); `kept` (detached) stay unchanged until backward. Returns x. The mark holds for x as it
    is now: written in place later, x is kept."""
    setattr(x, _INPUT_FOR_GRAD, (t_mm, kept, x._version))
    return x


def kept_input(x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple]:
    """(t_mm, tensors to keep) for a one-op form's input x: x's mark, or x itself."""
    mark = getattr(x, _INPUT_FOR_GRAD, None)
    if mark is None or mark[2] != x._version:
        return _t_mm, (x,)
    return mark[0], mark[1]


def _t_mm(gt: torch.Tensor, gx: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return gt.T.mm(x.reshape(gt.shape[0], -1))
