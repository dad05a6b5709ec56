"""`lorafit plan`: the memory estimate against a measured run, how it moves with the settings, the
fitting search, --memory parsing, and the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig

from lorafit.cli.main import build_parser, main
from lorafit.train import plan
from lorafit.train.config import load_run_config
from lorafit.train.plan import estimate_memory, fit_to_memory, parse_size, plan_run

GiB, MiB = 2**30, 2**20


def llama_config(**overrides) -> LlamaConfig:
    """A mid-size Llama shape (no weights are ever made from it)."""
    shape = dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**shape, **overrides})


def config_folder(tmp_path, **overrides):
    """A model folder with a config.json and a stand-in weights file: enough for an estimate
    without a probe (which would load the weights)."""
    from safetensors.torch import save_file

    folder = tmp_path / "shape"
    llama_config(**overrides).save_pretrained(folder)
    save_file({"unused": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "text, expected",
    [("4GB", 4 * GiB), ("4G", 4 * GiB), ("4096MB", 4 * GiB), ("3.5GiB", int(3.5 * GiB)),
     ("512 mib", 512 * MiB), ("2048", 2048), ("1.5t", int(1.5 * 2**40))],
)  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4 gigs", "", "GB", "-1GB", "0", "4GBB", "4 iB"])
def test_parse_size_refuses_with_one_line_naming_the_value(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    message = str(info.value)
    assert repr(text) in message and "4GB, 4G, 4096MB or 3.5GiB" in message
    assert "\n" not in message


def test_weights_are_counted_from_the_config_alone():
    from transformers import LlamaForCausalLM

    for tie in (False, True):
        cfg = llama_config(num_hidden_layers=2, tie_word_embeddings=tie)
        est = estimate_memory(cfg, runtime_bytes=0)
        with torch.device("meta"):
            real = LlamaForCausalLM(cfg)
        real.tie_weights()
        assert sum(est.weights.values()) == 2 * sum(p.numel() for p in real.parameters())  # bf16
    # LoRA r on all seven projections: r (in + out) each, four fp32 copies (params, grads, AdamW).
    h, i, kv, r = 1024, 2816, 256, 8
    per_layer = r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))  # q, o; k, v; gate, up, down
    est = estimate_memory(llama_config(num_hidden_layers=2), lora_r=r, runtime_bytes=0)
    assert est.adapter_params == est.adapter_grads == 4 * 2 * per_layer
    assert est.optimizer == 2 * est.adapter_params


def test_the_estimate_moves_the_right_way():
    cfg = llama_config()
    base = estimate_memory(cfg, seq_len=512, runtime_bytes=0)
    longer = estimate_memory(cfg, seq_len=1024, runtime_bytes=0)
    ckpt = estimate_memory(cfg, seq_len=512, gradient_checkpointing=True, runtime_bytes=0)
    assert 1.9 < longer.activations / base.activations < 2.1
    assert ckpt.activations < base.activations / 3.5
    # where the step, not the float32 load, is the peak, checkpointing lowers it
    at_4k = [estimate_memory(cfg, seq_len=4096, gradient_checkpointing=c) for c in (False, True)]
    assert at_4k[1].total < at_4k[0].total
    assert ckpt.activations == base.activations_other and base.activations == ckpt.activations_other
    nf4 = estimate_memory(cfg, quantize="nf4", runtime_bytes=0)
    int8 = estimate_memory(cfg, quantize="int8", runtime_bytes=0)
    bf16_linear = base.weights["bf16 linear"]
    assert 3.7 < bf16_linear / nf4.weights["nf4 linear"] < 4.0  # 4.13 bits per weight
    assert 1.9 < bf16_linear / int8.weights["int8 linear"] < 2.0
    assert nf4.total < int8.total < base.total
    small_chunk = estimate_memory(cfg, loss_chunk=64, runtime_bytes=0)
    assert small_chunk.loss < base.loss / 2.5
    assert estimate_memory(cfg, runtime_bytes=123).total == base.total + 123
    # An unquantized base loads in float32 (model.dtype auto), then bf16 training casts it.
    assert base.loading > sum(base.weights.values()) * 1.9
    as_bf16 = estimate_memory(cfg, load_dtype=torch.bfloat16, runtime_bytes=0)
    assert as_bf16.loading < base.loading and as_bf16.total <= base.total


def test_the_swiglu_output_is_counted_where_down_proj_keeps_it():
    """recompute_mlp drops the SwiGLU output only where down_proj runs as LoRA's one op: a
    quantized base and full fine-tuning keep it whatever the setting (the caller passes False
    for LoRA dropout and ReLoRA's fp32 frozen weights)."""
    cfg = llama_config()
    kw = {"seq_len": 512, "runtime_bytes": 0}
    lean, kept = (estimate_memory(cfg, recompute_mlp=r, **kw) for r in (True, False))
    assert kept.activations > lean.activations
    for other in ({"quantize": "nf4"}, {"method": "full"}):
        a, b = (estimate_memory(cfg, recompute_mlp=r, **other, **kw) for r in (True, False))
        assert a.activations == b.activations, other
    eager = estimate_memory(cfg, fused_kernels=False, **kw)
    assert eager.loss > lean.loss  # the eager loss's fp32 copies of each chunk's logits


def test_quantized_bytes_are_what_quantize_model_stores():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao")
    from transformers import LlamaForCausalLM

    from lorafit.quant import quantize_model, quantized_modules

    cfg = llama_config(num_hidden_layers=1, hidden_size=256, intermediate_size=512, vocab_size=64)
    for scheme in ("nf4", "int8"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        quantize_model(model, scheme, keep={"lm_head"})
        stored = sum(m.nbytes() for _, m in quantized_modules(model))
        estimated = estimate_memory(cfg, quantize=scheme, runtime_bytes=0).weights[
            f"{scheme} linear"
        ]
        assert abs(estimated - stored) / stored < 0.02, scheme


MEASURE = """
import json, sys
import psutil, transformers
from lorafit.train import train
from lorafit.train.config import load_run_config
cfg = load_run_config(None, sys.argv[1:])
config = transformers.AutoConfig.from_pretrained(cfg.model.name)
transformers.AutoModelForCausalLM._model_mapping[type(config)]  # the model's code, imported
base = psutil.Process().memory_info().rss
train(cfg, progress=False, log=lambda line: None)
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report pytest's own size.
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"base": base, "peak": peak}))
"""


@pytest.mark.parametrize("extra", [[], ["train.gradient_checkpointing=true"]])
def test_the_estimate_is_near_a_measured_training_run(make_cfg, chat_setup, tmp_path, extra):
    """A real `train` run in a fresh process: its peak RSS against the estimate. The runtime is
    most of a tiny model's peak, so the part above it is checked too, more loosely."""
    model, data = chat_setup
    sets = [f"model.name={model}", f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
            "train.batch_size=4", "lora.r=4", "train.max_steps=3", "train.eval_every=0",
            "train.save_every=0", "train.tensorboard=false", "data.max_length=128", *extra]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *sets], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = make_cfg(tmp_path / "run", *sets[3:])
    hf_config, kw, _, _ = plan._inputs(cfg)
    est = estimate_memory(hf_config, **{**kw, "runtime_bytes": measured["base"]})
    assert abs(est.total - measured["peak"]) / measured["peak"] < 0.15
    above, measured_above = est.total - est.runtime, measured["peak"] - measured["base"]
    assert 0.5 < above / measured_above < 2.0


def test_fit_proposes_the_cheapest_changes_first(tmp_path):
    folder = config_folder(tmp_path)
    make = lambda *sets: load_run_config(  # noqa: E731
        None, [f"model.name={folder}", "train.precision=bf16", "model.device=cpu", *sets]
    )
    total = lambda *sets: plan_run(make(*sets), probe=False).estimate.total  # noqa: E731
    # A short run: loading peaks. model.dtype auto already streams a bf16 LoRA run into bf16;
    # an explicit float32 loads float32 before bf16 training casts it.
    short = ("train.batch_size=1", "data.max_length=128")
    fp32 = (*short, "model.dtype=float32")
    now, as_bf16 = total(*fp32), total(*short, "model.dtype=bfloat16")
    assert as_bf16 < now and total(*short) == as_bf16
    assert fit_to_memory(make(*fp32), now + MiB)[0] == []  # fits as it is
    sets, est = fit_to_memory(make(*fp32), as_bf16 + MiB)
    assert sets == ["model.dtype=bfloat16"] and est.total == as_bf16  # free: proposed first
    # A long one: activations peak; the bf16 load would not help, so it is not proposed.
    long = ("train.batch_size=8", "data.max_length=1024")
    ckpt = total(*long, "train.gradient_checkpointing=true")
    sets, _ = fit_to_memory(make(*long), ckpt + MiB)
    assert sets == ["train.gradient_checkpointing=true"]
    pytest.importorskip("bitsandbytes")
    nf4 = total(*long, "train.gradient_checkpointing=true", "model.quantize=nf4")
    sets, est = fit_to_memory(make(*long), nf4 + MiB)
    assert sets == ["train.gradient_checkpointing=true", "model.quantize=nf4"]
    assert est.total <= nf4 + MiB
    with pytest.raises(ValueError, match=r"nothing tried fits the run in 100 MiB: the least is"):
        fit_to_memory(make(*long), 100 * MiB)


def test_a_smaller_batch_keeps_the_examples_per_step(tmp_path):
    folder = config_folder(tmp_path, num_hidden_layers=2)
    cfg = load_run_config(
        None, [f"model.name={folder}", "model.dtype=bfloat16", "train.batch_size=8",
               "train.grad_accum=2", "train.gradient_checkpointing=true", "train.loss_chunk=16",
               "model.quantize=nf4", "train.precision=bf16"],
    )  # fmt: skip
    pytest.importorskip("bitsandbytes")
    full = plan_run(cfg, probe=False).estimate.total
    sets, est = fit_to_memory(cfg, full - 100 * MiB)
    batch = int(next(s for s in sets if s.startswith("train.batch_size=")).split("=")[1])
    accum = int(next(s for s in sets if s.startswith("train.grad_accum=")).split("=")[1])
    assert batch < 8 and batch * accum == 16 and est.total <= full - 100 * MiB


def test_plan_run_probes_a_tiny_model(make_cfg, tmp_path):
    result = plan_run(make_cfg(tmp_path / "run", "data.max_length=64"), probe=True)
    assert result.step_time_s > 0 and result.probe_peak > result.estimate.runtime
    assert "2 timed steps" in result.probe_note
    assert json.loads(json.dumps(result.to_dict(), default=str))["total"] == result.estimate.total


def write_config(tmp_path, chat_setup, body: str = ""):
    model, data = chat_setup
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  name: {model}\ndata:\n  train: {data}\n{body}")
    return path


def test_cli_plan_json(tmp_path, chat_setup, capsys):
    config = write_config(tmp_path, chat_setup)
    assert main(["plan", str(config), "--no-probe", "--json", "--set", "train.batch_size=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    labels = [row["label"] for row in out["rows"]]
    assert out["total"] == out["rows"][-1]["bytes"] > 0 and labels[-1] == "total estimated peak"
    assert any(label.startswith("weights: ") for label in labels)
    assert out["settings"]["batch_size"] == "2" and out["probe_note"] == "not run (--no-probe)"
    assert main(["plan", str(config), "--no-probe", "--memory", "1TB"]) == 0
    text = capsys.readouterr().out
    assert "total estimated peak" in text and "fits in 1024.00 GiB" in text


def test_cli_plan_errors_are_one_line(tmp_path, chat_setup, capsys):
    config = write_config(tmp_path, chat_setup, "train:\n  learning_rate: 0.1\n")
    assert main(["plan", str(config), "--no-probe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown option train.learning_rate" in err
    good = write_config(tmp_path, chat_setup)
    assert main(["plan", str(good), "--no-probe", "--memory", "4 gigs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit plan: error: --memory '4 gigs'") and "\n" not in err
    assert main(["plan", str(good), "--no-probe", "--memory", "10MB"]) == 2
    captured = capsys.readouterr()
    assert "total estimated peak" in captured.out  # the table, then the one-line error
    assert "nothing tried fits" in captured.err and captured.err.strip().count("\n") == 0


def test_cli_plan_documents_its_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--help"])
    assert "--memory" in capsys.readouterr().out
    parser = build_parser()._subparsers._group_actions[0].choices["plan"]
    assert all(a.help for a in parser._actions if a.dest != "help")
