"""Writing GGUF files for llama.cpp / Ollama with the `gguf` package: a merged model, or a LoRA
adapter in llama.cpp's adapter format (applied on the base GGUF at load time, several per base).

What makes a GGUF load and behave like the trained model in llama.cpp:
- tensor names from gguf's own name map (HF `model.layers.3.self_attn.q_proj` -> `blk.3.attn_q`);
- q and k projections permuted to llama.cpp's rotary layout (as its converter does; transformers
  reverses the same permutation when it reads a GGUF). For an adapter only B's rows (the output
  features) move;
- the tokenizer, chat template and EOS/stop tokens of the trained model: copied key by key from
  the base's GGUF, the file the base was loaded from (lorafit's default base is one), so
  tokenization is byte-identical to what the base shipped with; the shape keys (llama.*) come
  from the model's config;
- 1-D tensors (norms) kept in F32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

# file type ids (llama.cpp's LLAMA_FTYPE) and the tensor type of 2-D weights for each dtype
DTYPES = {"f32": (0, "F32"), "f16": (1, "F16"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0")}
ARCHITECTURES = {
    "LlamaForCausalLM": "LLAMA",
    "MistralForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2",
}
# llama.cpp's rotary for LLAMA is the interleaved one (q/k rows permuted, as its converter does);
# QWEN2 runs NEOX-style rotate-half rotary, transformers' own layout (rows kept)
PERMUTED_ROTARY = {"LLAMA"}
# Keys not copied from the base GGUF: they describe the file (rewritten) or its old tensors.
_FILE_KEYS = ("GGUF.", "general.file_type", "general.quantization_version", "general.alignment")


def architecture(model: nn.Module) -> str:
    """The gguf MODEL_ARCH name for `model`, or a ValueError saying what is supported."""
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(
        f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not {names[0]}; "
        "export --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py"
    )


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_blocks: int):  # built once per (arch, depth), not once per tensor
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), n_blocks)


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's (rotate-half) q/k output rows in llama.cpp's interleaved order (its converter's
    `permute`); `w` is (out, ...) with out = n_head * head_dim."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _rotary_heads(hf_name: str, config, arch: str) -> int | None:
    """The head count to permute `hf_name`'s rows by (q: attention heads, k: key/value heads);
    None for other tensors and for architectures whose llama.cpp rotary is transformers' own."""
    if arch not in PERMUTED_ROTARY:
        return None
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):  # biases too, as llama.cpp's converter
        return config.num_attention_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def gguf_name(hf_name: str, arch: str, n_blocks: int) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`; KeyError when unmapped."""
    name = _name_map(arch, n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(hf_name)
    return name


def _source_fields(source: Path) -> Iterator[tuple[str, object, list]]:
    """(key, value, types) of every metadata field of `source` worth copying."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if key.startswith(_FILE_KEYS):
            continue
        yield key, field.contents(), list(field.types)


def copy_metadata(
    writer,
    source: Path,
    prefixes: tuple[str, ...] = ("general.", "tokenizer."),
    skip: tuple[str, ...] = (),
) -> int:
    """Copy `source`'s metadata fields under `prefixes` (the tokenizer, chat template, special
    tokens, names and license) into `writer`; returns how many were copied."""
    import gguf

    count = 0
    for key, value, types in _source_fields(source):
        if key in ("general.architecture", *skip) or not key.startswith(prefixes):
            continue  # the writer writes the architecture itself
        if isinstance(value, list) and not value:
            continue  # gguf cannot write an empty array (and it says nothing)
        sub = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, types[0], sub_type=sub)
        count += 1
    return count


def rope_theta(cfg) -> float:
    """The rotary base of a Llama-family config; ValueError for scaled rotary embeddings, which
    llama.cpp needs extra tensors for."""
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(
            f"GGUF export handles plain rotary embeddings, not {kind!r} scaling; export --format "
            "hf and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def add_hyperparameters(writer, cfg) -> None:
    """The architecture's shape keys (llama.*), from the model's own config."""
    heads = cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _as_numpy(t: torch.Tensor, qtype: str) -> tuple[np.ndarray, object]:
    """(data, GGMLQuantizationType) of a weight in `qtype` (1-D tensors stay F32)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    f32 = t.detach().to(torch.float32).contiguous().numpy()
    kind = Q.F32 if t.dim() == 1 else getattr(Q, qtype)
    if kind == Q.Q8_0 and f32.shape[-1] % 32:
        # q8_0 needs rows of whole 32-value blocks; llama.cpp's converter falls back the same way
        kind = Q.F16
    return gguf.quants.quantize(f32, kind), kind


def write_model(
    model: nn.Module, out: Path, dtype: str, source: Path, name: str | None = None
) -> dict:
    """Write `model` (a merged, plain Llama- or Qwen2-family causal LM) as one GGUF at `out`, with the
    metadata of the base GGUF `source`. Returns what was written."""
    import gguf

    arch = architecture(model)
    cfg = model.config
    rope_theta(cfg)  # refuse before writing anything
    ftype, qtype = DTYPES[dtype]
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
    copied = copy_metadata(writer, source, skip=("general.finetune",) if name else ())
    add_hyperparameters(writer, cfg)
    writer.add_file_type(ftype)
    if qtype == "Q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if name:
        writer.add_string("general.finetune", name)
    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False)
    count = 0
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the embedding as the output head when output.weight is absent
        heads = _rotary_heads(hf_name, cfg, arch)
        if heads is not None:
            tensor = permute_rotary(tensor, heads)
        data, kind = _as_numpy(tensor, qtype)
        writer.add_tensor(gguf_name(hf_name, arch, cfg.num_hidden_layers), data, raw_dtype=kind)
        count += 1
    _finish(writer)
    return {"tensors": count, "metadata_keys_copied": copied, "dtype": dtype}


def write_lora(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config,
    alpha: float,
    out: Path,
    source: Path,
) -> dict:
    """Write LoRA factors {hf weight name: (A (r, in), B (out, r))} as llama.cpp's adapter GGUF.
    llama.cpp scales each update by alpha / r (adapter.lora.alpha), so `alpha` must be the one
    that gives the trained scale."""
    import gguf

    arch = ARCHITECTURES.get((getattr(config, "architectures", None) or [""])[0], "LLAMA")
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    names = ("general.name", "general.basename", "general.size_label")  # which base it fits
    copy_metadata(writer, source, prefixes=names)
    writer.add_file_type(DTYPES["f32"][0])
    for hf_name, (A, B) in pairs.items():
        heads = _rotary_heads(hf_name, config, arch)
        if heads is not None:
            B = permute_rotary(B, heads)  # the output features move, the input ones do not
        base = gguf_name(hf_name, arch, config.num_hidden_layers)
        writer.add_tensor(f"{base}.lora_a", A.detach().float().contiguous().numpy())
        writer.add_tensor(f"{base}.lora_b", B.detach().float().contiguous().numpy())
    _finish(writer)
    return {"tensors": 2 * len(pairs), "alpha": float(alpha)}


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
