"""The decoding step of a Llama-family model written out lean, every row with its own adapter.

transformers' forward is general: per layer and per projection it goes through module calls,
LoRA layers that look up the per-row adapter names, attention-interface dispatch and a cache
object, about 900 small eager ops for one token of a 30-layer model. A decoding step needs far
less: this module runs the same weights (the model's own tensors, nothing copied) through a
function of a layer's tensors (`decode_layer`), layer after layer, which `torch.compile` can fuse
(on CPU the element-wise ops become a few C++ kernels; the matmuls stay oneDNN / MKL calls).

Every loaded adapter's factors are stacked per projection (`AdapterTable`):
    A_cat (n * r, in)      B_cat (out, n * r)      n adapters, each padded to rank r, B scaled
and each row picks its adapter with a 0/1 mask over the n blocks:
    lora(x) = ((x @ A_cat^T) * mask) @ B_cat^T
(Punica / S-LoRA's "compute all, keep the row's own"): two matmuls per projection whatever mix of
adapters the batch holds, static shapes, no sorting or gathering of rows. Rows whose adapter does
not touch a projection (or base rows) get zeros there. The n * r columns are few (4 adapters of
r=16: 64), so the extra work is small next to the base matmul. Projections that read the same
input (q | k | v; gate | up: `weights.FUSED`) go as one: their A's stacked into one matmul, their
B's block-diagonal (each member's slice of x A^T feeds only its own outputs) and added to the
base output in one `addmm`, their base weights as one matrix with 4-bit weights: a layer makes
four base matmuls and eight small LoRA ones instead of seven and fourteen.

Other per-op savings (a decoding step is hundreds of small ops, each costing microseconds of
dispatch): RMSNorm as one `rms_norm`, the rotary embedding of all query and key heads as one
batched matmul by a per-row rotation built once per step (`rotation`), attention by
`scaled_dot_product_attention` (grouped-query, no mask for a lone row).

The base weights come from `weights.py`: the modules' own, or 4-bit copies (`--decode-weights`).

Only what this function reproduces exactly is accepted (`unsupported` says why not otherwise):
Llama / Mistral / Qwen2 layers (RMSNorm, rotary, grouped-query attention, SwiGLU), plain LoRA
adapters on the seven projections (no DoRA, none on embeddings / head), no dynamic rope.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.serve.kv import KVSlots
from lorafit.serve.weights import WEIGHTS, layer_groups
from lorafit.tuner.kinds import kind_of
from lorafit.tuner.layer import LoraLayer

FAMILIES = ("llama", "mistral", "qwen2")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _projections(layer: nn.Module) -> dict[str, nn.Module]:
    attn, mlp = layer.self_attn, layer.mlp
    return {**{p: getattr(attn, p) for p in ATTENTION}, **{p: getattr(mlp, p) for p in MLP}}


def unsupported(model: nn.Module) -> str | None:
    """Why the lean step cannot run this model (None: it can)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in FAMILIES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {FAMILIES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (SwiGLU with silu only)"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    rotary = model.model.rotary_emb
    if "dynamic" in str(getattr(rotary, "rope_type", "default")):
        return f"rope type {rotary.rope_type!r} changes with the length"
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, ad in module.adapters.items():
                if ad.variants:
                    return f"adapter {name!r} uses {ad.variants[0].name} (plain LoRA only)"
    for layer in model.model.layers:
        for p, m in _projections(layer).items():
            kind = kind_of(_base(m))
            if kind is None or not kind.plain_linear:
                return f"{p} is a {type(_base(m)).__name__} (a quantized base?), not nn.Linear"
    wrapped = {id(m) for layer in model.model.layers for m in _projections(layer).values()}
    for qual, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.adapters and id(module) not in wrapped:
            return f"an adapter on {qual} (only the attention and MLP projections)"
    return None


class AdapterTable:
    """The factors of adapters `names` for every projection of every layer, two ways:
    - `stacked`: all adapters side by side (A (k n r, in), one B (out, n r) per projection), each
      row keeping its own block by a mask: any mix of adapters in one step;
    - `own[name]`: one adapter's blocks alone (A (k r, in), B (out, r)): a step whose rows all use
      that adapter reads n times fewer factor bytes and needs no mask (one stream, or one
      adapter's traffic).
    Per layer, a dict from projection (or FUSED group) to (A, [B per member]) or None. Every block
    is r = the largest rank wide; smaller ranks are padded with zeros."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.names = list(names)
        ranks = [
            m.adapters[n].r
            for layer in model.model.layers
            for m in _projections(layer).values()
            if isinstance(m, LoraLayer)
            for n in self.names
            if n in m.adapters
        ]
        self.rank = max(ranks, default=0)
        layers = [_projections(layer) for layer in model.model.layers]
        self.stacked = [_layer_factors(per, self.names, self.rank) for per in layers]
        self.own = {
            name: [_layer_factors(per, [name], self.rank) for per in layers] for name in self.names
        }
        self._none = [dict.fromkeys(self.stacked[0]) for _ in layers] if layers else []

    def select(self, rows: list[str], dtype, device) -> tuple[list[dict], torch.Tensor | None]:
        """The factors for a step with these rows' adapters, and the (S, n r) mask (ones over
        each row's own block) when the rows mix adapters (None: no mask needed)."""
        used = set(rows)
        if not used & set(self.names):
            return self._none, None  # base rows only
        if len(used) == 1:
            return self.own[rows[0]], None
        n, r = len(self.names), self.rank
        m = torch.zeros(len(rows), n * r, dtype=dtype, device=device)
        for i, name in enumerate(rows):
            if name in self.names:
                k = self.names.index(name)
                m[i, k * r : (k + 1) * r] = 1
        return self.stacked, m


def _layer_factors(projections: dict[str, nn.Module], names: list[str], r: int) -> dict:
    """{projection or FUSED group: (A (members * n * r, in), B^T (members * n * r, out)) or None}
    for adapters `names` (in that order) of one layer; B carries the adapter's scale. A FUSED
    group's B^T is block-diagonal by member (each member's columns of t feed only its own
    outputs), so the whole update is one `addmm` whatever the group."""
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # zeros where no adapter
    touched: set[str] = set()
    n = len(names)
    for p, m in projections.items():
        w = _base(m).weight
        out_f, in_f = w.shape
        A = torch.zeros(n * r, in_f, dtype=w.dtype, device=w.device)
        B = torch.zeros(out_f, n * r, dtype=w.dtype, device=w.device)
        for k, a in enumerate(names):
            if isinstance(m, LoraLayer) and a in m.adapters:
                ad = m.adapters[a]
                A[k * r : k * r + ad.r] = ad.A.detach().to(w.dtype)
                B[:, k * r : k * r + ad.r] = (ad.B.detach() * ad.scale).to(w.dtype)
                touched.add(p)
        blocks[p] = (A, B)
    return {
        name: (
            torch.cat([blocks[p][0] for p in members]),
            torch.block_diag(*[blocks[p][1] for p in members]).T.contiguous(),
        )
        if touched & set(members)
        else None
        for name, members in layer_groups(projections).items()
    }


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm as one op: it normalises in fp32, rounds, then scales
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(S, d, d) matrices R with x @ R = x * cos + rotate_half(x) * sin (transformers' rotary
    embedding, rotate_half(x) = cat(-x[half:], x[:half])) for each row's cos, sin (S, d): a
    layer then rotates all its query and key heads in one batched matmul, the same for every
    layer of the step."""
    S, d = cos.shape
    half = d // 2
    j = torch.arange(d, device=cos.device)
    partner = torch.where(j < half, j + half, j - half)  # rotate_half reads x[partner] into j
    sign = torch.where(j < half, -1.0, 1.0).to(sin.dtype)
    R = torch.diag_embed(cos)  # (S, d, d)
    R[:, partner, j] = sign * sin
    return R


def _linear(x, linear, w, lora, mask) -> torch.Tensor:
    """The base projection (or FUSED group) `linear(x, w)` plus the rows' LoRA updates; `mask`
    (S, members * n r) keeps each row's own adapter block (None: every row uses `lora`)."""
    y = linear(x, w)
    if lora is None:
        return y
    A, BT = lora
    t = F.linear(x, A)  # (S, members * n r)
    if mask is not None:
        t = t * mask
    return torch.addmm(y, t, BT)


def decode_layer(
    linear,  # FloatWeights.linear | Int4Weights.linear
    h: torch.Tensor,  # (S, hidden): the residual stream
    w: dict,  # the layer's base weights (weights.py)
    lora: dict,  # the layer's factors (AdapterTable)
    norms: tuple,  # (input norm weight, eps, post-attention norm weight, eps)
    masks: tuple,  # (mask, mask of 2 groups, mask of 3 groups), or Nones
    rot: torch.Tensor,  # (S, d, d): each row's rotary embedding (`rotation`)
    k_cache: torch.Tensor,  # (slots, kv heads, max_len, d)
    v_cache: torch.Tensor,
    rows: torch.Tensor,  # (S,) arange: the rows' cache slots
    positions: torch.Tensor,  # (S,)
    attend_mask: torch.Tensor | None,  # (S, 1, 1, L); None: one row, which sees all L
    k_len: int,  # L: the longest row's positions so far + 1
    scaling: float,
    dims: tuple[int, int, int],  # (heads, kv heads, head dim)
) -> torch.Tensor:
    """One decoder layer for one new token per row; writes the rows' keys / values. Only tensors,
    numbers and the `linear` function come in (no modules, no layer index), so one compiled graph
    serves every layer."""
    heads, kv_heads, head_dim = dims
    S, L = h.shape[0], k_len
    mask, mask2, mask3 = masks
    x = _rms(h, norms[0], norms[1])
    qkv = _linear(x, linear, w["qkv"], lora["qkv"], mask3)  # (S, (H + 2 Hkv) d)
    qk_width = (heads + kv_heads) * head_dim
    qk = torch.bmm(qkv[:, :qk_width].reshape(S, heads + kv_heads, head_dim), rot)  # rotary
    q, k = qk[:, :heads], qk[:, heads:]
    v = qkv[:, qk_width:].reshape(S, kv_heads, head_dim)
    k_cache[rows, :, positions] = k
    v_cache[rows, :, positions] = v
    out = F.scaled_dot_product_attention(
        q[:, :, None],
        k_cache[:S, :, :L],
        v_cache[:S, :, :L],
        attn_mask=attend_mask,
        scale=scaling,
        enable_gqa=heads != kv_heads,
    )  # (S, H, 1, d)
    h = h + _linear(out.reshape(S, heads * head_dim), linear, w["o_proj"], lora["o_proj"], mask)
    x = _rms(h, norms[2], norms[3])
    gate, up = _linear(x, linear, w["gate_up"], lora["gate_up"], mask2).chunk(2, -1)
    return h + _linear(F.silu(gate) * up, linear, w["down_proj"], lora["down_proj"], mask)


def decode_layers(linear, h, weights, factors, norms, masks, rot, k_cache, v_cache, *rest):
    """`decode_layer` for every layer in turn (what `--compile` compiles: one graph of them all)."""
    for i, layer_norms in enumerate(norms):
        h = decode_layer(
            linear,
            h,
            weights[i],
            factors[i],
            layer_norms,
            masks,
            rot,
            k_cache[i],
            v_cache[i],
            *rest,
        )
    return h


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


class Decoder:
    """The engine's decoding step: `step(ids, positions, adapters)` -> logits (S, vocab), rows in
    cache-slot order. `refresh()` after adapters are loaded or unloaded. With `compile`, the
    layers run as one `torch.compile`d graph (dynamic batch and length; torch specialises a
    single row, and base-only / one-adapter / mixed steps have graphs of their own)."""

    def __init__(
        self, model: nn.Module, cache: KVSlots, compile: bool = False, weights: str = "float"
    ):
        if weights not in WEIGHTS:
            raise ValueError(f"unknown decode weights {weights!r}; choose {', '.join(WEIGHTS)}")
        self.model, self.cache = model, cache
        self.compiled = compile
        bases = [
            {p: _base(m) for p, m in _projections(layer).items()} for layer in model.model.layers
        ]
        self.weights = WEIGHTS[weights](model, bases)
        cfg = model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.dims = (heads, kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        self.norms = [
            (n1.weight, n1.variance_epsilon, n2.weight, n2.variance_epsilon)
            for n1, n2 in (
                (x.input_layernorm, x.post_attention_layernorm) for x in model.model.layers
            )
        ]
        self._layers = decode_layers
        if compile:
            # one graph per (rows 1 / several) x (base only / one adapter / mixed) x weights kind
            # x the adapters' projection sets: more than torch's default 8 per function
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._layers = torch.compile(decode_layers, dynamic=True)
        self.refresh()

    def refresh(self) -> None:
        names = sorted(
            {n for m in self.model.modules() if isinstance(m, LoraLayer) for n in m.adapters}
        )
        self.table = AdapterTable(self.model, names)

    def warm_up(self) -> None:
        """Compile the graphs now rather than on the first requests: base rows only, rows of one
        adapter, mixed rows; one row and several (torch specialises a single row). Writes only
        position 0 of slots 0 and 1, which a prefill overwrites before use."""
        cases = [["__base__"], ["__base__"] * 2]
        if self.table.names:
            a = self.table.names[0]
            cases += [[a], [a, a], [a, "__base__"]]
        device = self.cache.k[0].device
        for rows in cases:
            if len(rows) <= self.cache.slots:
                zeros = torch.zeros(len(rows), dtype=torch.long, device=device)
                self.step(zeros, zeros, rows)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """One new token for rows 0..S-1 (row i = cache slot i, `ids` (S,) at `positions` (S,)):
        writes their keys / values and returns the logits (S, vocab)."""
        p = self.cache.k[0]
        factors, mask = self.table.select(adapters, p.dtype, p.device)
        masks = (None,) * 3 if mask is None else (mask, mask.repeat(1, 2), mask.repeat(1, 3))
        longest = int(positions.max()) + 1
        attend = None  # one row attends to every position up to its own
        if len(adapters) > 1:
            span = torch.arange(longest, device=positions.device)
            attend = (span[None, :] <= positions[:, None])[:, None, None, :]  # (S, 1, 1, L)
        body = self.model.model
        h = body.embed_tokens(ids)  # (S, hidden)
        cos, sin = body.rotary_emb(h, positions[None])  # (1, S, d)
        rot = rotation(cos[0], sin[0])
        scaling = body.layers[0].self_attn.scaling
        h = self._layers(
            self.weights.linear,
            h,
            self.weights.layers,
            factors,
            self.norms,
            masks,
            rot,
            self.cache.k,
            self.cache.v,
            torch.arange(len(adapters), device=positions.device),
            positions,
            attend,
            longest,
            scaling,
            self.dims,
        )
        return self.weights.head(_rms(h, body.norm.weight, body.norm.variance_epsilon))
