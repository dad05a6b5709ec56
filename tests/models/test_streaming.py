"""models/streaming.py: weights stream into their final form, equal to what transformers loads,
with a peak that stays near the final size; quantized bases come out quantized."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lorafit.models import load_model
from lorafit.models.streaming import SafetensorsFolder
from lorafit.quant import QuantizedLinear, quantized_modules


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_llama_equals_from_pretrained(llama_dir, dtype):
    ours, _ = load_model(str(llama_dir), dtype=dtype, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=getattr(torch, dtype))
    _same_state(ours, ref)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # ties survive
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits)


def test_streamed_bert_classifier_has_the_checkpoint_and_a_fresh_head(bert_dir):
    ours, _ = load_model(str(bert_dir), head="classification", num_labels=3, device="cpu")
    torch.manual_seed(0)
    ref = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=3)
    body = {k: v for k, v in ref.state_dict().items() if not k.startswith("classifier")}
    mine = ours.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in body.items())  # "bert." prefix mapped
    assert ours.classifier.weight.shape == (3, 16) and not ours.classifier.weight.is_meta
    assert ours.classifier.weight.std() > 0  # initialised, not left empty


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_load_keeps_the_head_and_embeddings_in_bf16(llama_dir, scheme):
    model, _ = load_model(str(llama_dir), device="cpu", quantize=scheme)
    quantized = [p for p, _ in quantized_modules(model)]
    assert quantized and all(".layers." in p for p in quantized)
    assert len(quantized) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not isinstance(model.lm_head, QuantizedLinear)
    assert model.lorafit_base["quantize"] == scheme
    ref, _ = load_model(str(llama_dir), device="cpu", dtype="bfloat16")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    a, b = model(ids).logits.float(), ref(ids).logits.float()
    assert ((a - b).norm() / b.norm()).item() < 0.2


def test_truncated_weights_are_named(llama_dir):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsFolder(llama_dir).read(SafetensorsFolder(llama_dir).keys()[-1], None)
    with pytest.raises(ValueError, match="truncated"):
        load_model(str(llama_dir), device="cpu")


PEAK = textwrap.dedent(
    """
    import json, sys
    import psutil, torch
    from lorafit.models import load_model
    from lorafit.models.streaming import SafetensorsFolder
    folder, tiny, dtype, quantize = sys.argv[1:5]
    # Warm up on a tiny model first: what any load costs once (transformers' model code,
    # accelerate, the quantization library) is not the load transient measured here.
    load_model(tiny, dtype=dtype, device="cpu", quantize=quantize, require_tokenizer=False)
    before = psutil.Process().memory_info().rss
    model, _ = load_model(folder, dtype=dtype, device="cpu", quantize=quantize, require_tokenizer=False)
    # VmHWM, not ru_maxrss: the latter survives exec, so a child of a big process (pytest)
    # would report its parent's size.
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    tensors = [*model.parameters(), *model.buffers()]
    def nbytes(t):
        inner = getattr(t, "__tensor_flatten__", None)
        return t.numel() * t.element_size() if inner is None or type(t) is torch.Tensor else 0
    final = sum(nbytes(t) for t in {id(t): t for t in tensors}.values())
    final += sum(m.nbytes() for m in model.modules() if hasattr(m, "nbytes") and callable(m.nbytes))
    src = SafetensorsFolder(__import__("pathlib").Path(folder))
    largest = max(4 * __import__("math").prod(src.shape(k)) for k in src.keys())
    print(json.dumps({"before": before, "peak": peak, "final": final, "largest_fp32": largest}))
    """
)


@pytest.mark.parametrize("dtype,quantize", [("bfloat16", "none"), ("auto", "nf4")])
def test_load_peak_is_the_final_size_plus_one_tensor(tmp_path, llama_dir, dtype, quantize):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")  # fp32: ~144 MB on disk
    script = tmp_path / "peak.py"
    script.write_text(PEAK)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "m"), str(llama_dir), dtype, quantize],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    transient = m["peak"] - m["before"] - m["final"]
    # Loading the whole fp32 checkpoint first (transformers' from_pretrained, then a cast) would
    # add ~144 MB here; streaming adds at most one tensor in flight.
    assert transient <= m["largest_fp32"] + 48e6, m
