"""GGUF export, checked without llama.cpp: files read back with gguf's reader, and loaded back by
transformers' own GGUF reader (an independent implementation of the name map and the q/k
permutation), against lorafit's merged model. tests/export/test_llama_cpp.py runs a real llama.cpp."""

import numpy as np
import pytest
import torch

from lorafit.cli.main import main
from lorafit.export import export
from lorafit.export.gguf_file import permute_rotary
from lorafit.infer.merging import merged_model

gguf = pytest.importorskip("gguf")


def _logits_of_gguf(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 504, 3458, 28, 260, 1345, 30, 2]])


def test_merged_f32_gguf_loads_back_as_the_merged_model(adapter, tmp_path):
    out = tmp_path / "merged.gguf"
    report = export(str(adapter), "gguf", str(out), "f32")
    net, _, _ = merged_model(str(adapter), None, "float32")
    with torch.no_grad():
        want = net(input_ids=IDS).logits
    got = _logits_of_gguf(out, IDS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert report["tensors"] == 2 * 9 + 2  # 9 per block, embedding and final norm (tied head)


def test_the_merge_changed_the_weights_so_the_round_trip_test_can_fail(adapter, tiny_base):
    base = _logits_of_gguf(tiny_base, IDS)
    net, _, _ = merged_model(str(adapter), None, "float32")
    with torch.no_grad():
        assert (net(input_ids=IDS).logits - base).abs().max() > 1e-2


def test_gguf_carries_the_base_tokenizer_template_and_eos(adapter, smollm2_gguf, tmp_path):
    out = tmp_path / "m.gguf"
    export(str(adapter), "gguf", str(out), "f16")
    got, src = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(smollm2_gguf))
    for key in (
        "tokenizer.chat_template",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
    ):
        assert got.get_field(key).contents() == src.get_field(key).contents(), key
    assert (
        got.get_field("tokenizer.ggml.tokens").contents()
        == src.get_field("tokenizer.ggml.tokens").contents()
    )
    assert got.get_field("general.architecture").contents() == "llama"
    assert got.get_field("llama.block_count").contents() == 2  # from the model, not the source
    assert got.get_field("llama.attention.head_count_kv").contents() == 2
    assert got.get_field("general.file_type").contents() == 1  # f16
    kinds = {t.name: t.tensor_type.name for t in got.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == "F16"
    shapes = {t.name: [int(d) for d in t.shape] for t in got.tensors}
    assert shapes["blk.0.attn_k.weight"] == [32, 16]  # ne0 = in features, ne1 = out (2 kv heads)
    assert "output.weight" not in shapes  # tied: llama.cpp reuses token_embd


def test_q8_0_gguf_is_quantized_and_still_close(adapter, tmp_path):
    out = tmp_path / "q.gguf"
    export(str(adapter), "gguf", str(out), "q8_0")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert kinds["blk.1.ffn_down.weight"] == "Q8_0" and kinds["output_norm.weight"] == "F32"
    net, _, _ = merged_model(str(adapter), None, "float32")
    with torch.no_grad():
        want = net(input_ids=IDS).logits
    got = _logits_of_gguf(out, IDS)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 0.1, err  # 8-bit blocks of a tiny random model; a wrong layout gives ~1.4


def _tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(
        [int(d) for d in reversed(t.shape)]
    )


def test_lora_gguf_applied_as_llama_cpp_does_equals_the_merged_gguf(adapter, tiny_base, tmp_path):
    lora, merged = tmp_path / "a.gguf", tmp_path / "m.gguf"
    report = export(str(adapter), "gguf-lora", str(lora))
    export(str(adapter), "gguf", str(merged), "f32")
    r_lora, r_base, r_merged = (gguf.GGUFReader(str(p)) for p in (lora, tiny_base, merged))
    assert r_lora.get_field("general.type").contents() == "adapter"
    assert r_lora.get_field("adapter.type").contents() == "lora"
    alpha = r_lora.get_field("adapter.lora.alpha").contents()
    assert alpha == pytest.approx(8.0) and report["alpha"] == pytest.approx(8.0)
    names = [t.name for t in r_lora.tensors]
    assert len(names) == 2 * 7 * 2
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"):
        A, B = _tensor(r_lora, f"{name}.lora_a"), _tensor(r_lora, f"{name}.lora_b")
        r = A.shape[0]
        applied = _tensor(r_base, name) + (alpha / r) * B @ A  # llama.cpp: W + alpha/r * B A
        torch.testing.assert_close(applied, _tensor(r_merged, name), rtol=1e-5, atol=1e-5)


def test_rslora_and_mixed_ranks_keep_their_scale_in_the_lora_gguf(
    tiny_base, make_adapter, tmp_path
):
    folder = make_adapter(
        tiny_base, tmp_path / "rs", use_rslora=True, rank_pattern={"down_proj": 2}
    )
    lora, merged = tmp_path / "a.gguf", tmp_path / "m.gguf"
    export(str(folder), "gguf-lora", str(lora))
    export(str(folder), "gguf", str(merged), "f32")
    r_lora, r_base, r_merged = (gguf.GGUFReader(str(p)) for p in (lora, tiny_base, merged))
    alpha = r_lora.get_field("adapter.lora.alpha").contents()
    for name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight"):
        A, B = _tensor(r_lora, f"{name}.lora_a"), _tensor(r_lora, f"{name}.lora_b")
        applied = _tensor(r_base, name) + (alpha / A.shape[0]) * B @ A
        torch.testing.assert_close(applied, _tensor(r_merged, name), rtol=1e-5, atol=1e-5)


def test_permute_rotary_is_the_inverse_of_transformers_gguf_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(2 * 8, 5)  # 2 heads of dim 8
    back = LlamaTensorProcessor({})._reverse_permute_weights(permute_rotary(w, 2).numpy(), 2, 2)
    torch.testing.assert_close(torch.from_numpy(back), w)
    assert not torch.equal(permute_rotary(w, 2), w)


def test_modelfile_has_chatml_template_stops_and_the_trained_system_prompt(adapter, tmp_path):
    out = tmp_path / "m.gguf"
    export(str(adapter), "gguf", str(out), "f16")
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./m.gguf\n")
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """Be brief."""' in text
    export(str(adapter), "gguf-lora", str(tmp_path / "a.gguf"))
    text = (tmp_path / "Modelfile").read_text()
    assert "ADAPTER ./a.gguf" in text and text.startswith("FROM /")


def test_dora_is_refused_for_lora_gguf_and_nothing_is_written(tiny_base, make_adapter, tmp_path):
    folder = make_adapter(tiny_base, tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match="--format gguf"):
        export(str(folder), "gguf-lora", str(tmp_path / "a.gguf"))
    assert not list(tmp_path.glob("a.gguf*")) and not (tmp_path / "Modelfile").exists()


def test_an_existing_output_is_kept_without_force(adapter, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    code = main(["export", "--adapter", str(adapter), "--format", "gguf", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--force" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"keep me"


def test_a_failed_write_leaves_no_file(adapter, tmp_path, monkeypatch):
    import lorafit.export.formats as formats

    def broken(model, path, *args, **kwargs):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(formats, "write_model", broken)
    with pytest.raises(OSError):
        export(str(adapter), "gguf", str(tmp_path / "m.gguf"), "f16")
    assert list(tmp_path.iterdir()) == []


def test_a_base_gguf_with_other_contents_is_refused(adapter, tiny_base, tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_base.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ValueError, match="not the base"):
        export(str(adapter), "gguf", str(tmp_path / "m.gguf"), "f16", model=str(other))


def test_cli_export_prints_where_and_how_to_run_it(adapter, tmp_path, capsys):
    out = tmp_path / "a.gguf"
    code = main(["export", "--adapter", str(adapter), "--format", "gguf-lora", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file() and "--lora" in text and "ollama create" in text
