"""ReLoRA: restarts merge the update and keep the model's function, the final adapter holds the
whole (higher-rank) update and loads in PEFT, resuming across a restart is bit-identical, and the
runs it cannot do exactly are refused by name."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorafit.train.optim import restart_factor
from lorafit.train.config import ReloraOptions
from lorafit.train.relora import Relora, keep_largest
from lorafit.train.trainer import Trainer, train
from lorafit.tuner.peft_format import read_adapter
from lorafit.tuner.state import lora_layers

R = 2
RELORA = "train.relora={every: 5, warmup_steps: 2}"


def _cfg(make_cfg, out, *extra):
    return make_cfg(
        out, "train.max_steps=20", f"lora.r={R}", "train.fused_kernels=false", RELORA, *extra
    )


def _base_weights(model_folder):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_folder, torch_dtype=torch.float32)
    return {n: p.detach().clone() for n, p in base.named_parameters()}


def test_the_saved_update_has_rank_above_r_and_is_the_trained_model(make_cfg, chat_setup, tmp_path):
    model_folder, _ = chat_setup
    trainer = Trainer(_cfg(make_cfg, tmp_path / "run"), progress=False, log=lambda _: None)
    trainer.setup()
    trainer.fit()
    result = trainer.save()
    config, tensors = read_adapter(result.adapter_dir)
    assert config.r == 4 * R and config.lora_alpha == 4 * R  # 3 restarts + the live adapter
    assert not config.use_rslora
    # the trained model (merged base + live adapter) == original base + the saved adapter
    w0 = _base_weights(model_folder)
    ranks = []
    for path, layer in lora_layers(trainer.model):
        key = f"base_model.model.{path}"
        A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        assert A.shape[0] == 4 * R and B.shape[1] == 4 * R
        saved = w0[f"{path}.weight"] + B @ A  # scale 1: alpha = r
        relora = next(c for c in trainer.callbacks if isinstance(c, Relora))
        merged = relora.masters.get(path, layer.base_layer.weight.detach().float())
        live = merged + layer.delta_weight("default")
        assert torch.allclose(saved, live, atol=1e-6, rtol=1e-5), path
        s = torch.linalg.svdvals(saved - w0[f"{path}.weight"])
        ranks.append(int((s > 1e-4 * s[0]).sum()))
    assert min(ranks) > R  # the restarts trained a higher-rank update than one adapter can hold


def test_the_adapter_loads_in_peft_with_the_same_outputs(make_cfg, chat_setup, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lorafit.infer.loading import load_for_inference

    model_folder, _ = chat_setup
    result = train(_cfg(make_cfg, tmp_path / "run"), progress=False)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    base = AutoModelForCausalLM.from_pretrained(model_folder, torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    ours, _ = load_for_inference(adapter=str(result.adapter_dir))
    with torch.no_grad():
        a, b = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    base_logits = AutoModelForCausalLM.from_pretrained(model_folder)(input_ids=ids).logits
    assert not torch.allclose(a, base_logits, atol=1e-3)  # the adapter does change the model


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_a_restart_keeps_the_function_resets_the_factors_and_the_moments(
    make_cfg, tmp_path, precision, tolerance
):
    cfg = _cfg(
        make_cfg,
        tmp_path / "run",
        "train.max_steps=4",
        "train.relora={every: 100}",
        f"train.precision={precision}",
    )
    trainer = Trainer(cfg, progress=False, log=lambda _: None)
    trainer.setup()
    trainer.fit()  # 4 steps: a trained adapter and Adam moments, no restart yet
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    model = trainer.model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = dict(lora_layers(model))
    old_a = {p: lay.adapters["default"].A.detach().clone() for p, lay in layers.items()}
    relora = next(c for c in trainer.callbacks if isinstance(c, Relora))
    relora.restart(trainer)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    # B = 0 again: merged, not lost (bf16: the base's copy is rounded, its fp32 master is not)
    assert torch.allclose(before, after, atol=tolerance * before.abs().max())
    if precision == "bf16":
        assert relora.masters and all(
            lay.base_layer.weight.dtype == torch.bfloat16 for lay in layers.values()
        )
    for path, layer in layers.items():
        ad = layer.adapters["default"]
        assert torch.count_nonzero(ad.B) == 0 and not torch.equal(ad.A, old_a[path])
        for p in (ad.A, ad.B):
            for key in ("exp_avg", "exp_avg_sq"):
                m = trainer.optimizer.state[p][key]
                assert torch.count_nonzero(m) <= max(1, int(0.001 * m.numel()) + 1)


def test_losses_stay_continuous_across_restarts(make_cfg, tmp_path):
    run = tmp_path / "run"
    result = train(_cfg(make_cfg, run, "train.eval_every=5"), progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # the jagged schedule: right after each restart the lr starts again at 1/(W+1) of the decay
    for k in (5, 10, 15):
        assert lr[k] < 0.5 * lr[k - 1] and lr[k + 1] > lr[k]
    losses = result.losses
    for k in (5, 10, 15):  # the first steps after a restart do not jump away from before it
        window = losses[k - 2 : k]
        assert max(losses[k : k + 2]) < max(window) * 1.05 + 0.05


def test_resume_across_a_restart_boundary_is_bit_identical(make_cfg, tmp_path):
    first_dir, again_dir = tmp_path / "first", tmp_path / "again"
    extra = ("train.save_every=3", "train.keep_last=10")
    first = train(_cfg(make_cfg, first_dir, *extra), progress=False)
    shutil.copytree(first_dir / "checkpoints", again_dir / "checkpoints")
    (again_dir / "config.json").write_text((first_dir / "config.json").read_text())
    # step 3: before the restart at 5; step 9: after one restart and before the next
    for step in (3, 9):
        run = again_dir
        for name in ("adapter", "best_adapter", "summary.json", "metrics.jsonl"):
            path = run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        checkpoint = run / "checkpoints" / f"step-{step:06d}"
        again = train(_cfg(make_cfg, run, *extra), resume=str(checkpoint), progress=False)
        assert again.losses == first.losses[step:], step
        a = load_file(first.adapter_dir / "adapter_model.safetensors")
        b = load_file(again.adapter_dir / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        shutil.rmtree(run / "checkpoints")
        shutil.copytree(first_dir / "checkpoints", run / "checkpoints")
    state = torch.load(
        first_dir / "checkpoints" / "step-000009" / "trainer_state.pt", weights_only=True
    )
    assert state["callbacks"]["relora"]["restarts"] == 1  # the delta rides in the trainer state


def test_changing_relora_on_resume_is_refused(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(_cfg(make_cfg, run, "train.max_steps=6"), progress=False)
    with pytest.raises(ValueError, match="train.relora changed"):
        train(_cfg(make_cfg, run, "train.relora={every: 4}"), resume=True, progress=False)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["model.quantize=nf4"], "cannot merge into a nf4-quantized base"),
        (["model.dtype=bfloat16"], "would round the updates away"),
        (["lora.use_dora=true"], "DoRA is not supported"),
        (["lora.init_lora_weights=pissa"], "init_lora_weights 'pissa'"),
        (["train.method=full"], "needs train.method: lora"),
        (["train.distributed=fsdp"], "not supported with train.distributed: fsdp"),
        (["train.relora={every: 5, warmup_steps: 5}"], "warmup_steps must be in [0, every=5)"),
        (["train.relora={every: 5, resett: zero}"], "did you mean 'reset'"),
        (["train.relora={warmup_steps: 2}"], "needs every: K"),
        (["train.relora={every: 5, reset: drop}"], "reset must be prune or zero"),
    ],
)
def test_runs_relora_cannot_do_exactly_are_refused(make_cfg, tmp_path, extra, expected):
    with pytest.raises(ValueError) as err:
        _cfg(make_cfg, tmp_path / "run", *extra)
    assert expected in str(err.value)


def test_magnitude_pruning_and_the_jagged_factor():
    t = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 0.0, 1.0, -0.7, 0.3, 0.05])
    kept = keep_largest(t, 0.8)  # the largest 20%: -3 and 2
    assert kept.tolist() == [False, True, False, True] + [False] * 6
    assert keep_largest(t, 0.99).sum() == 1  # ceil: at least one element stays
    opts = ReloraOptions(every=10, warmup_steps=4)
    assert [restart_factor(s, opts) for s in (0, 9)] == [1.0, 1.0]
    assert [restart_factor(s, opts) for s in (10, 11, 13, 14, 19, 20)] == [
        0.2, 0.4, 0.8, 1.0, 1.0, 0.2,
    ]  # fmt: skip
    assert restart_factor(10, None) == 1.0
