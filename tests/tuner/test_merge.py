import pytest
import torch

from helpers import (
    conv_net,
    model_input,
    outputs,
    randomize_adapters,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from lorafit import (
    LoraConfig,
    LoraLayer,
    MergeError,
    TrainedCopy,
    inject,
    merge,
    merge_and_unload,
    unmerge,
)

CASES = {
    "llama": (tiny_llama, dict(target_modules="all-linear")),
    "llama-dora-emb": (
        tiny_llama,
        dict(target_modules=["q_proj", "embed_tokens", "down_proj"], use_dora=True),
    ),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "wte"])),
    "gpt2-dora": (
        tiny_gpt2,
        dict(target_modules=["c_attn", "c_fc"], use_dora=True, use_rslora=True),
    ),
    "bert": (tiny_bert, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "conv": (conv_net, dict(target_modules=["conv", "conv1d"], use_dora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_unmerged_and_round_trip(case):
    make, kw = CASES[case]
    model = make()
    kind = "conv" if case == "conv" else case.split("-")[0]
    x = model_input(kind)
    inject(model, LoraConfig(r=4, lora_alpha=8, **kw))
    randomize_adapters(model)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = outputs(model, x)
    merge(model, verify=True)
    merge(model)  # idempotent
    torch.testing.assert_close(outputs(model, x), adapted, atol=1e-5, rtol=1e-5)
    unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state0[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs(model, x), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama", "bert", "gpt2"])
def test_merge_and_unload_returns_plain_model(case):
    make, kw = CASES[case]
    model = make()
    cls = type(model)
    x = model_input(case)
    inject(model, LoraConfig(r=4, lora_alpha=8, **kw))
    randomize_adapters(model)
    adapted = outputs(model, x)
    plain = merge_and_unload(model)
    assert type(plain) is cls
    assert not any(isinstance(m, (LoraLayer, TrainedCopy)) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, x), adapted, atol=1e-5, rtol=1e-5)
    fresh = make()
    assert set(plain.state_dict()) == set(fresh.state_dict())


def test_merge_embedding_of_tied_model_unties_head():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = model_input("llama")
    inject(model, LoraConfig(r=4, target_modules=["embed_tokens"]))
    randomize_adapters(model)
    adapted = outputs(model, x)
    W0 = model.lm_head.weight.detach().clone()
    merge(model, verify=True)
    torch.testing.assert_close(outputs(model, x), adapted, atol=1e-5, rtol=1e-5)
    embedding = model.model.embed_tokens.base_layer.weight
    assert model.lm_head.weight is not embedding and model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, W0)  # the head keeps W0; only the embedding moved
    assert not torch.allclose(embedding, W0)


def test_nan_adapter_refused_and_nothing_merged(llama):
    inject(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(llama)
    with torch.no_grad():
        llama.model.layers[1].self_attn.v_proj.adapters["default"].B[0, 0] = float("inf")
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(MergeError, match="NaN/inf"):
        merge(llama)
    for k, v in llama.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m.merged for m in llama.modules() if isinstance(m, LoraLayer))


def test_verify_catches_a_wrong_merge(llama, monkeypatch):
    inject(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(llama)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    real = LoraLayer.delta_weight_of
    monkeypatch.setattr(
        LoraLayer, "delta_weight_of", lambda self, ad: 2 * real(self, ad)
    )  # a broken merge
    with pytest.raises(MergeError, match="differs"):
        merge(llama, verify=True)
    monkeypatch.setattr(LoraLayer, "delta_weight_of", real)
    for k, v in llama.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
