"""Data-parallel training on several CPU processes (torchrun, gloo), as users launch it: whole
`lorafit train` runs on a tiny Llama, fp32. N processes with their shares of a global batch train
like one process with the whole batch; checkpoints resume on another number of processes; a
killed rank ends the job quickly and leaves a resumable run; only rank 0 writes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.train import checkpoints as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _write_config(tmp_path: Path, chat_setup, name: str, **train) -> Path:
    model, data = chat_setup
    cfg = {
        "model": {"name": str(model)},
        "data": {"train": str(data)},
        "lora": {"r": 4, "lora_dropout": 0.0},
        "train": {
            "output_dir": str(tmp_path / name),
            "batch_size": 8,
            "lr": 1e-2,
            "max_steps": 10,
            "save_every": 5,
            "eval_every": 5,
            "tensorboard": False,
            "precision": "fp32",
            "threads": 1,
            **train,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, *extra: str, nproc: int = 1, timeout: int = 300) -> str:
    cmd = [sys.executable, "-m", "lorafit", "train", str(config), "--no-progress", *extra]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in _rows(run) if key in r}


def _assert_close_runs(
    a: Path, b: Path, steps=None, rel=1e-5, adapter_rel=None, adapter_norm_rel=None
):
    la, lb = _losses(a), _losses(b)
    steps = steps or sorted(la)
    assert steps and all(s in lb for s in steps), (sorted(la), sorted(lb))
    for s in steps:
        assert lb[s] == pytest.approx(la[s], rel=rel), (s, la[s], lb[s])
    va, vb = _losses(a, "val_loss"), _losses(b, "val_loss")
    assert va and all(vb[s] == pytest.approx(v, rel=rel) for s, v in va.items())
    ta = load_file(a / "adapter" / "adapter_model.safetensors")
    tb = load_file(b / "adapter" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        if adapter_norm_rel is not None:  # the tensor as a whole: robust to single elements
            err = float((ta[k] - tb[k]).norm() / (ta[k].norm() or 1.0))
            assert err <= adapter_norm_rel, (k, err)
            continue
        scale = float(ta[k].abs().max()) or 1.0
        assert float((ta[k] - tb[k]).abs().max()) <= (adapter_rel or rel) * scale, k


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(chat_setup, tmp_path_factory):
    """One process x batch 8 and two processes x 4, 10 steps each, with and without accumulation."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = {}
    for accum in (1, 2):
        for nproc, mode in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
            name = f"{mode}{nproc}_a{accum}"
            config = _write_config(tmp, chat_setup, name, grad_accum=accum, distributed=mode)
            out[name] = tmp / name
            out[name + "_log"] = _train(config, nproc=nproc)
    return out


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_exactly_like_one_with_the_global_batch(runs, accum, mode):
    one, two = runs[f"ddp1_a{accum}"], runs[f"{mode}2_a{accum}"]
    _assert_close_runs(one, two)
    assert _rows(one)[0]["loss"] != _rows(one)[-2]["loss"]  # the runs did learn something
    # the progress shows the job's tokens: both runs saw the same examples per step (padding
    # differs with how the rows were packed, so not exactly the same token count)
    t1, t2 = _losses(one, "tokens_per_s"), _losses(two, "tokens_per_s")
    assert t1 and t2


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_only_rank_0_writes_and_the_run_looks_like_a_single_process_one(runs, mode):
    assert _files(runs["ddp1_a1"]) == _files(runs[f"{mode}2_a1"])  # no rank-1 files, no copies
    summary = json.loads((runs[f"{mode}2_a1"] / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["stopped"] == "completed"


def test_fsdp_holds_about_half_of_the_weights_on_each_of_two_ranks(runs):
    import re

    found = re.search(r"this rank holds (\d+)% of the weights", runs["fsdp2_a1_log"])
    assert found, runs["fsdp2_a1_log"][-2000:]
    # the decoder layers (66% of this tiny model) are split in two; the (tied) embedding and
    # head (34%) and the final norm stay whole: 34 + 66 / 2 = 67%
    assert 60 <= int(found.group(1)) <= 72
    assert "this rank holds" not in runs["ddp2_a1_log"]


@pytest.mark.parametrize(
    "start, then, mode", [("ddp2", 1, "ddp"), ("ddp1", 2, "fsdp"), ("fsdp2", 1, "ddp")]
)
def test_a_checkpoint_resumes_on_another_number_of_processes(
    runs, chat_setup, tmp_path, start, then, mode
):
    import shutil

    straight = runs["ddp1_a1"]
    moved = tmp_path / "moved"
    shutil.copytree(runs[f"{start}_a1"], moved)
    config = _write_config(tmp_path, chat_setup, "moved", distributed=mode)
    for product in ("adapter", "best_adapter", "summary.json"):
        path = moved / product
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    output = _train(config, "--resume", str(moved / "checkpoints" / "step-000005"), nproc=then)
    assert "resumed from" in output
    _assert_close_runs(straight, moved, steps=list(range(6, 11)))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_a_killed_rank_ends_the_job_quickly_and_the_run_resumes_bit_exactly(chat_setup, tmp_path):
    steps = dict(max_steps=60, save_every=10, eval_every=20)
    straight = _write_config(tmp_path, chat_setup, "straight", **steps)
    _train(straight, nproc=2)
    config = _write_config(tmp_path, chat_setup, "killed", **steps)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "lorafit", "train", str(config), "--no-progress"]
    job = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and not (tmp_path / "killed/checkpoints/step-000010").exists():
        time.sleep(0.005)
    ranks = {_rank_of(p): p for p in _children(job.pid)}
    assert job.poll() is None and 1 in ranks, "the job ended before a rank could be killed"
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    output = job.communicate(timeout=120)[0]
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert "rank" in output and "1" in output and "SIGKILL" in output, output[-2000:]
    run = tmp_path / "killed"
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert ckpt.list_checkpoints(run) and not leftovers  # whole checkpoints only
    assert not (run / "adapter").exists()

    _train(config, "--resume", nproc=2)
    assert _losses(run) == _losses(tmp_path / "straight")  # bit for bit
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "rank1_extra, train, words",
    [
        (["--set", "train.lr=0.5"], {}, "train.lr: rank 0 0.01, rank 1 0.5"),
        ([], {"batch_size": 5}, "multiple of 2"),
        ([], {"distributed": "fsdp"}, "quantized base"),
    ],
)
def test_ranks_started_with_different_configs_an_uneven_batch_or_fsdp_on_int8_are_refused(
    chat_setup, tmp_path, rank1_extra, train, words
):
    config = _write_config(tmp_path, chat_setup, "bad", **train)
    if train.get("distributed") == "fsdp":
        cfg = yaml.safe_load(config.read_text())
        cfg["model"]["quantize"] = "int8"
        config.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LORAFIT_DIST_TIMEOUT="60")
        extra = rank1_extra if rank == 1 else []
        cmd = [sys.executable, "-m", "lorafit", "train", str(config), "--no-progress", *extra]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    assert all(words in out for out in outputs), outputs
    assert all("Traceback" not in out for out in outputs)
    assert not (tmp_path / "bad").exists()  # nothing written


def test_ddp_trains_on_a_quantized_base_like_one_process(chat_setup, tmp_path):
    runs = {}
    for nproc in (1, 2):
        config = _write_config(tmp_path, chat_setup, f"int8_{nproc}")
        cfg = yaml.safe_load(config.read_text())
        cfg["model"]["quantize"] = "int8"
        config.write_text(yaml.safe_dump(cfg))
        _train(config, nproc=nproc)
        runs[nproc] = tmp_path / f"int8_{nproc}"
    # int8 layers compute in bf16: its rounding differs with how rows are split (each rank pads
    # its own documents for attention), and 10 Adam steps carry it into the adapter, most into
    # single elements whose gradient is near zero (measured: losses 3e-5; the largest element
    # difference 4e-3 of a tensor's largest value with SDPA's math kernel, 6e-2 with bf16
    # `causal_attention`), so the adapters are compared tensor by tensor in norm (measured: at
    # most 5e-3 with the math kernel, 1.5e-2 with `causal_attention`, whose rounding depends more
    # on the padded length); a lost or doubled gradient reduction moves them by their own size
    _assert_close_runs(runs[1], runs[2], rel=1e-3, adapter_norm_rel=3e-2)
