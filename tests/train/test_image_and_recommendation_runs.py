"""Whole runs of the two non-text tasks on tiny models: an image adapter that learns, loads for
inference, merges and resumes exactly; a recommender pretrained from nothing (train.method: full)
and adapted with LoRA on its embedding tables; a linear probe (train.method: head)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_interactions, write_pattern_idx, write_tiny_cnn
from lorafit.infer import evaluate_run, load_for_inference
from lorafit.infer.merging import merge_to_folder
from lorafit.tasks import get_task
from lorafit.train.config import load_run_config
from lorafit.train.trainer import train

POINTWISE = ".*(_expand_conv|_project_conv|_conv_head|_conv_stem)"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    return write_tiny_cnn(root / "cnn"), write_pattern_idx(root / "data", "train", 96)


def image_cfg(images, out, *extra):
    cnn, data = images
    return load_run_config(
        None,
        [
            f"model.name={cnn}",
            "model.task=image-classification",
            f"data.train={data}",
            "data.image_size=16",
            "data.val_fraction=0.25",
            f"lora.target_modules={POINTWISE}",
            "lora.r=4",
            "lora.lora_alpha=8",
            f"train.output_dir={out}",
            "train.batch_size=8",
            "train.lr=3e-2",
            "train.max_steps=48",
            "train.eval_every=24",
            "train.save_every=24",
            "train.precision=fp32",
            "train.tensorboard=false",
            *extra,
        ],
    )


def test_image_adapter_learns_loads_and_merges(images, tmp_path):
    cfg = image_cfg(images, tmp_path / "run")
    result = train(cfg, progress=False)
    assert result.final["val_accuracy"] > 0.6  # 4 balanced classes: chance is 0.25
    adapter = result.adapter_dir
    for name in ("adapter_config.json", "labels.json", "image_preprocessing.json"):
        assert (adapter / name).is_file()
    assert json.loads((adapter / "image_preprocessing.json").read_text())["size"] == 16
    assert not any("running" in k for k in load_file(adapter / "adapter_model.safetensors"))
    metrics = evaluate_run(cfg, report=str(tmp_path / "report"))
    assert metrics["accuracy"] == pytest.approx(result.final["val_accuracy"])
    assert (tmp_path / "report" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    matrix = json.loads((tmp_path / "report" / "confusion_matrix.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == 24
    model, processor = load_for_inference(None, str(adapter))
    assert processor.size == 16 and model.lorafit_task == "image-classification"
    x = torch.randn(3, 3, 16, 16)
    merge_to_folder(str(adapter), str(tmp_path / "merged"))
    merged, _ = load_for_inference(None, str(tmp_path / "merged"))  # a whole model folder
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_image_run_resumes_to_the_same_adapter(images, tmp_path):
    cfg = image_cfg(images, tmp_path / "run", "train.eval_every=0")
    first = train(cfg, progress=False)
    want = load_file(first.adapter_dir / "adapter_model.safetensors")
    for name in ("adapter", "summary.json", "loss.png", "checkpoints/step-000048"):
        path = tmp_path / "run" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = train(cfg, resume=True, progress=False)
    got = load_file(again.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_linear_probe_trains_only_the_head(images, tmp_path):
    result = train(image_cfg(images, tmp_path / "run", "train.method=head"), progress=False)
    assert result.trainable_params == 32 * 4 + 4  # the head of the 32-channel tiny CNN
    probe = load_file(result.adapter_dir / "model.safetensors")
    base = load_file(images[0] / "model.safetensors")
    assert all(torch.equal(probe[k], base[k]) for k in base if not k.startswith("classifier"))


def test_recommender_pretrained_in_full_then_adapted_with_lora(tmp_path):
    early = write_interactions(tmp_path / "early.csv", n=400, seed=0)
    later = write_interactions(tmp_path / "later.csv", n=200, seed=1)
    later_val = write_interactions(tmp_path / "later_val.csv", n=60, seed=2)
    pre = train(
        load_run_config(
            None,
            [
                "model.name=new",
                "model.task=recommendation",
                "model.init={dim: 8}",
                f"data.train={early}",
                f"data.history=[{later}, {later_val}]",
                "data.val_fraction=0.1",
                "train.method=full",
                f"train.output_dir={tmp_path / 'pre'}",
                "train.batch_size=32",
                "train.lr=2e-2",
                "train.max_steps=60",
                "train.eval_every=30",
                "train.save_every=0",
                "train.tensorboard=false",
            ],
        ),
        progress=False,
    )
    assert pre.final["val_rmse"] < 1.2  # ratings are 1.5 / 4.5 by parity: mean guess is 1.5 off
    config = json.loads((pre.adapter_dir / "config.json").read_text())
    assert len(config["users"]) == 12 and len(config["items"]) == 20  # history ids have rows
    adapt_cfg = load_run_config(
        None,
        [
            f"model.name={pre.adapter_dir}",
            "model.task=recommendation",
            f"data.train={later}",
            f"data.validation={later_val}",
            f"data.history=[{early}]",
            "lora.target_modules=[user_embedding, item_embedding]",
            "lora.r=2",
            f"train.output_dir={tmp_path / 'lora'}",
            "train.batch_size=32",
            "train.lr=1e-2",
            "train.max_steps=20",
            "train.eval_every=10",
            "train.save_every=0",
            "train.tensorboard=false",
        ],
    )
    lora = train(adapt_cfg, progress=False)
    assert lora.trainable_params == 2 * (12 + 20) + 2 * 8 * 2
    assert set(lora.final) >= {"val_rmse", "val_recall@10", "val_ndcg@10"}
    again = evaluate_run(adapt_cfg)  # the merged adapter: equal up to rounding (ranks may tie)
    assert again == pytest.approx(
        {k.removeprefix("val_"): v for k, v in lora.final.items()}, abs=0.01
    )
    model, vocab = load_for_inference(None, str(lora.adapter_dir))
    (top,) = get_task("recommendation").infer(model, vocab, ["u3"], top_k=5)
    assert len(top.split()) == 5


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.task=causal-lm"], "cannot be built as AutoModelForCausalLM"),
        (["model.name=new"], "model.name: new builds a fresh model, which trains in full"),
        (["train.method=full", "model.name=new"], "not available for task image-classification"),
        (["lora.target_modules=.*_depthwise_conv"], "depthwise"),
    ],
)
def test_bad_image_runs_fail_in_one_line_and_write_no_run(
    images, tmp_path, capsys, overrides, message
):
    from lorafit.cli.main import main

    cnn, data = images
    sets = [
        f"model.name={cnn}",
        "model.task=image-classification",
        f"data.train={data}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=1",
        *overrides,
    ]
    assert main(["train", *sum((["--set", s] for s in sets), [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run" / "adapter").exists()
