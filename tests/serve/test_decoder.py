"""The lean decoding step computes what transformers' forward computes with per-row adapters."""

import pytest
import torch

from helpers import TINY_DECODER, randomize_adapters, tiny_gpt2, tiny_llama
from lorafit import LoraConfig, inject
from lorafit.ops.attention import enable_lorafit_attention
from lorafit.serve.decoder import Decoder, unsupported
from lorafit.serve.kv import Decode, KVSlots, Prefill
from lorafit.tuner import adapter_rows


def _model(tie=False):
    model = tiny_llama(seed=0, tie=tie).eval()
    # two adapters of different ranks, one of them not on every projection
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "alpha")
    inject(model, LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"]), "beta")
    randomize_adapters(model, seed=1, scale=0.5)
    assert enable_lorafit_attention(model)
    return model


def _prefilled(model, lengths, adapters):
    cache = KVSlots(model.config, 4, 32, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    for slot, (n, name) in enumerate(zip(lengths, adapters)):
        ids = torch.randint(0, 96, (1, n), generator=g)
        with torch.no_grad(), adapter_rows([name], model):
            model(
                input_ids=ids,
                position_ids=torch.arange(n)[None],
                lorafit_attention=Prefill(cache, slot),
                use_cache=False,
            )
    return cache


def _reference(model, cache, ids, positions, adapters):
    with torch.no_grad(), adapter_rows(adapters, model):
        return model(
            input_ids=ids[:, None],
            position_ids=positions[:, None],
            lorafit_attention=Decode(cache, positions),
            use_cache=False,
        ).logits[:, -1]


@pytest.mark.parametrize(
    "tie, adapters",
    [
        (False, ["alpha", "__base__", "beta", "alpha"]),  # mixed: stacked factors and a mask
        (True, ["alpha", "__base__", "beta", "alpha"]),
        (False, ["beta"] * 4),  # one adapter: its own factors, no mask
        (False, ["__base__"] * 4),  # no adapter: no LoRA at all
    ],
)
def test_a_step_equals_the_model_forward_with_per_row_adapters(tie, adapters):
    model = _model(tie)
    lengths = [5, 9, 3, 7]
    ref_cache, lean_cache = (_prefilled(model, lengths, adapters) for _ in range(2))
    ids, positions = torch.tensor([3, 17, 40, 95]), torch.tensor(lengths)
    want = _reference(model, ref_cache, ids, positions, adapters)
    got = Decoder(model, lean_cache).step(ids, positions, adapters)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.stack(lean_cache.k), torch.stack(ref_cache.k), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        torch.stack(lean_cache.v), torch.stack(ref_cache.v), atol=1e-4, rtol=1e-4
    )
    # the adapters matter: a base-only step differs on the adapter rows
    base = Decoder(model, _prefilled(model, lengths, ["__base__"] * 4)).step(
        ids, positions, ["__base__"] * 4
    )
    for i in (0, 2):
        assert (adapters[i] == "__base__") == ((base[i] - got[i]).abs().max() < 1e-6)


def test_refresh_follows_adapters_loaded_and_removed():
    from lorafit.tuner import delete_adapter

    model = _model()
    cache = _prefilled(model, [4], ["beta"])
    dec = Decoder(model, cache)
    assert dec.table.names == ["alpha", "beta"] and dec.table.rank == 4
    delete_adapter(model, "alpha")
    dec.refresh()
    assert dec.table.names == ["beta"] and dec.table.rank == 2
    ids, pos = torch.tensor([5]), torch.tensor([4])
    want = _reference(model, _prefilled(model, [4], ["beta"]), ids, pos, ["beta"])
    torch.testing.assert_close(dec.step(ids, pos, ["beta"]), want, atol=1e-5, rtol=1e-5)


def test_compiled_step_equals_the_eager_one():
    model = _model()
    adapters = ["beta", "alpha", "__base__"]
    lengths = [6, 2, 8]
    eager_cache, compiled_cache = (_prefilled(model, lengths, adapters) for _ in range(2))
    eager, compiled = Decoder(model, eager_cache), Decoder(model, compiled_cache, compile=True)
    ids, positions = torch.tensor([1, 2, 3]), torch.tensor(lengths)
    for step in range(3):  # the length grows: the same compiled graph (dynamic shapes)
        want = eager.step(ids, positions + step, adapters)
        got = compiled.step(ids, positions + step, adapters)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        ids = want.argmax(-1)
    torch.testing.assert_close(
        torch.stack(compiled_cache.k), torch.stack(eager_cache.k), atol=1e-5, rtol=1e-5
    )


def test_what_the_lean_step_cannot_run_is_named():
    gpt2 = tiny_gpt2()
    assert "gpt2" in unsupported(gpt2)
    model = tiny_llama()
    inject(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "d")
    assert "DoRA" in unsupported(model) or "dora" in unsupported(model).lower()
    plain = tiny_llama()
    assert unsupported(plain) is None
    inject(plain, LoraConfig(r=4, target_modules=["lm_head"]), "h")
    assert "lm_head" in unsupported(plain)


def test_the_engine_decodes_with_the_lean_step_and_falls_back_with_the_reason():
    from helpers import chat_tokenizer
    from lorafit.serve.engine import Engine

    model = _model()
    engine = Engine(model, chat_tokenizer(), slots=2, max_len=32)
    try:
        assert engine.decoder is not None and engine.lean_blocker is None
        inject(model, LoraConfig(r=2, target_modules=["v_proj"], use_dora=True), "dora")
        engine.adapters_changed()
        assert engine.decoder is None and "dora" in engine.lean_blocker.lower()
    finally:
        engine.close(drain=False)


# ------------------------------------------------------------ 4-bit decode weights (int4) --
def _bases(model):
    from lorafit.serve.decoder import _base, _projections

    return [{p: _base(m) for p, m in _projections(layer).items()} for layer in model.model.layers]


def test_int4_weights_are_each_weight_to_within_half_a_4bit_step():
    """Int4Weights.linear(I) reads back the quantized matrix: every weight within half of its
    32-input group's step (max - min) / 15, plus bf16 rounding of the scale and offset."""
    from lorafit.serve.weights import FUSED, GROUP, Int4Weights

    model = tiny_llama(seed=3)
    weights = Int4Weights(model, _bases(model))
    layer = _bases(model)[1]
    for name in ("qkv", "o_proj", "gate_up", "down_proj"):
        w = torch.cat([layer[p].weight.detach() for p in FUSED.get(name, (name,))])  # (out, in)
        got = weights.linear(torch.eye(w.shape[1]), weights.layers[1][name]).T  # (out, in)
        groups = w.reshape(w.shape[0], -1, GROUP)
        step = (groups.amax(-1) - groups.amin(-1)) / 15  # (out, in / GROUP)
        bound = (step / 2 + 0.01 * groups.abs().amax(-1)).repeat_interleave(GROUP, 1)
        err = (got - w).abs()
        assert (err <= bound).all(), f"{name}: {(err - bound).max()}"
        assert err.max() > 0  # really 4-bit: not the float weights
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = model.lm_head(x)  # the 8-bit head: within 1% of the largest output
    torch.testing.assert_close(weights.head(x), want, atol=0.01 * want.abs().max(), rtol=0)


def _rounded_copy(model):
    """A copy of `model` whose projections and head hold what Int4Weights multiplies by (read
    back through it with identity inputs, biases subtracted)."""
    import copy

    from lorafit.serve.weights import FUSED, Int4Weights

    rounded = copy.deepcopy(model)
    weights = Int4Weights(model, _bases(model))
    with torch.no_grad():
        for i, per in enumerate(_bases(rounded)):
            for name in ("qkv", "o_proj", "gate_up", "down_proj"):
                members = [per[p] for p in FUSED.get(name, (name,))]
                eye = torch.eye(members[0].in_features)
                y = weights.linear(
                    torch.cat([eye, torch.zeros(1, eye.shape[1])]), weights.layers[i][name]
                )
                w = (y[:-1] - y[-1:]).T  # (outs, in): the bias (row of a zero input) taken off
                for m, part in zip(members, w.split([m.out_features for m in members])):
                    m.weight.copy_(part)
        rounded.lm_head.weight.copy_(weights.head(torch.eye(model.config.hidden_size)).T)
    return rounded


def test_int4_step_computes_the_model_with_its_weights_rounded_to_4_bits():
    """The int4 step equals the float step of a copy of the model whose projections (and head)
    hold the 4-bit (8-bit) weights read back, up to bf16 activations; per-row adapters kept."""
    model = _model()
    adapters = ["alpha", "__base__", "beta", "alpha"]
    lengths = [5, 9, 3, 7]
    ids, positions = torch.tensor([3, 17, 40, 95]), torch.tensor(lengths)
    rounded = _rounded_copy(model)
    cache = _prefilled(model, lengths, adapters)
    want = Decoder(rounded, cache).step(ids, positions, adapters)
    int4 = Decoder(model, _prefilled(model, lengths, adapters), weights="int4")
    got = int4.step(ids, positions, adapters)
    torch.testing.assert_close(got, want, atol=0.01 * want.abs().max(), rtol=0)
    exact = Decoder(model, _prefilled(model, lengths, adapters)).step(ids, positions, adapters)
    assert (got - exact).abs().max() > 3 * (got - want).abs().max()  # really the 4-bit weights
    # alone vs in a mixed batch: the same logits for a row, up to the bf16 rounding of the
    # kernel's outputs (its blocking depends on the number of rows)
    alone = Decoder(model, _prefilled(model, lengths, adapters), weights="int4")
    one = alone.step(ids[:1], positions[:1], adapters[:1])  # slot 0 decoded by itself
    torch.testing.assert_close(one[0], got[0], atol=0.005 * got.abs().max(), rtol=0)  # bf16
    base = int4.step(ids, positions + 1, ["__base__"] * 4)  # adapters still matter in int4
    assert (base[0] - int4.step(ids, positions + 1, adapters)[0]).abs().max() > 1e-3


def test_int4_compiled_step_equals_the_eager_one():
    model = _model()
    adapters, lengths = ["beta", "alpha"], [6, 2]
    eager = Decoder(model, _prefilled(model, lengths, adapters), weights="int4")
    compiled = Decoder(model, _prefilled(model, lengths, adapters), compile=True, weights="int4")
    ids, positions = torch.tensor([1, 2]), torch.tensor(lengths)
    for step in range(2):
        want = eager.step(ids, positions + step, adapters)
        torch.testing.assert_close(
            compiled.step(ids, positions + step, adapters), want, atol=1e-3, rtol=1e-3
        )
        ids = want.argmax(-1)


def test_int4_is_refused_where_only_the_float_path_could_decode():
    from helpers import chat_tokenizer
    from lorafit.serve.engine import Engine

    with pytest.raises(ValueError, match="decode-weights int4 needs the lean decoding step.*gpt2"):
        Engine(tiny_gpt2(), chat_tokenizer(), slots=1, max_len=16, weights="int4")
    odd = tiny_llama()
    odd.lm_head = torch.nn.Sequential(odd.lm_head)
    with pytest.raises(ValueError, match="plain linear output head.*Sequential"):
        Decoder(odd, KVSlots(odd.config, 1, 8, torch.float32, "cpu"), weights="int4")
    with pytest.raises(ValueError, match="unknown decode weights 'int3'; choose float, int4"):
        Decoder(tiny_llama(), KVSlots(odd.config, 1, 8, torch.float32, "cpu"), weights="int3")
    model = _model()
    engine = Engine(model, chat_tokenizer(), slots=2, max_len=32, weights="int4")
    try:
        inject(model, LoraConfig(r=2, target_modules=["v_proj"], use_dora=True), "dora")
        with pytest.raises(ValueError, match="int4 needs the lean decoding step.*dora"):
            engine.adapters_changed()
    finally:
        engine.close(drain=False)


@pytest.mark.parametrize("weights", ["float", "int4"])
def test_qwen2_biases_go_with_the_fused_projections(weights):
    """Qwen2's q / k / v have biases: the fused q|k|v matmul adds each one to its own outputs."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_DECODER)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.add_(torch.randn_like(p))  # biases that matter
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"]), "a")
    randomize_adapters(model, seed=1, scale=0.5)
    assert enable_lorafit_attention(model) and unsupported(model) is None
    adapters, lengths = ["a", "__base__"], [5, 8]
    ids, positions = torch.tensor([3, 17]), torch.tensor(lengths)
    reference = model if weights == "float" else _rounded_copy(model)
    cache = _prefilled(model, lengths, adapters)
    want = _reference(reference, cache, ids, positions, adapters)
    got = Decoder(model, _prefilled(model, lengths, adapters), weights=weights).step(
        ids, positions, adapters
    )
    tol = 1e-5 if weights == "float" else 0.01 * want.abs().max()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
