"""GGUF export of a Qwen2-family model (q/k/v biases, llama.cpp's NEOX rotary: no q/k
permutation): a tiny random Qwen2 with SmolLM2's real tokenizer as the GGUF base, an adapter on it,
the merged GGUF read back by transformers' GGUF reader and, when installed, run in llama.cpp."""

import pytest
import torch

from lorafit.export import export
from lorafit.export.gguf_file import write_model
from lorafit.infer.merging import merged_model

gguf = pytest.importorskip("gguf")
IDS = torch.tensor([[1, 504, 3458, 28, 260, 1345, 30, 2]])


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory, smollm2_gguf):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["Qwen2ForCausalLM"],
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)  # biases and norms that matter
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    write_model(model, path, "f32", smollm2_gguf)
    return path


@pytest.fixture
def qwen2_adapter(tmp_path, qwen2_base, make_adapter):
    return make_adapter(qwen2_base, tmp_path / "run")


def _logits_of_gguf(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits, type(model).__name__


def test_qwen2_base_gguf_is_a_qwen2_with_biases(qwen2_base):
    reader = gguf.GGUFReader(str(qwen2_base))
    assert reader.get_field("general.architecture").contents() == "qwen2"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names


def test_merged_qwen2_gguf_loads_back_as_the_merged_model(qwen2_adapter, qwen2_base, tmp_path):
    out = tmp_path / "merged.gguf"
    export(str(qwen2_adapter), "gguf", str(out), "f32")
    net, _, _ = merged_model(str(qwen2_adapter), None, "float32")
    with torch.no_grad():
        want = net(input_ids=IDS).logits
    got, cls = _logits_of_gguf(out)
    assert cls == "Qwen2ForCausalLM"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    base, _ = _logits_of_gguf(qwen2_base)
    assert (want - base).abs().max() > 1e-2  # the merge changed the model: the check can fail


def test_qwen2_lora_gguf_names_the_qwen2_tensors(qwen2_adapter, tmp_path):
    out = tmp_path / "adapter.gguf"
    export(str(qwen2_adapter), "gguf-lora", str(out))
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("general.architecture").contents() == "qwen2"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= names


def test_qwen2_in_llama_cpp_gives_the_merged_models_greedy_tokens(qwen2_adapter, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "merged.gguf"
    export(str(qwen2_adapter), "gguf", str(out), "f32")
    net, _, _ = merged_model(str(qwen2_adapter), None, "float32")
    with torch.no_grad():
        want = net.generate(
            IDS, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(IDS)
        )[0, IDS.shape[1] :].tolist()
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False, logits_all=False)
    got = []
    for token in llm.generate(IDS[0].tolist(), temp=0.0, top_k=1, reset=True):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == want
