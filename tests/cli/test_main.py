import json

import pytest
import torch

from helpers import write_chat_data, write_tiny_chat_model
from lorafit.cli.main import build_parser, main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, data = write_tiny_chat_model(root / "model"), write_chat_data(root / "data.jsonl")
    config = root / "run.yaml"
    config.write_text(
        f"model:\n  name: {model}\ndata:\n  train: {data}\nlora:\n  r: 4\n"
        f"train:\n  output_dir: {root / 'run'}\n  max_steps: 6\n  batch_size: 4\n  lr: 0.01\n"
        "  eval_every: 0\n  tensorboard: false\n"
    )
    assert main(["train", str(config), "--no-progress"]) == 0
    return root, config


@pytest.mark.parametrize(
    "command",
    ["train", "tune", "eval", "generate", "merge", "inspect", "plan", "quickstart", "serve"],
)
def test_every_command_documents_its_options(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.dest} has no help"
    if command == "train":  # every config option, with its default and docstring
        assert (
            "lora_plus_ratio" in text
            and "gradient_checkpointing" in text
            and "default 0.0002" in text
        )


def test_inspect(trained, capsys):
    root, _ = trained
    assert main(["inspect", str(root / "run" / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["r"] == 4 and info["variant"] == "LoRA" and info["parameters"] > 0
    assert "q_proj" in info["target_names"] and info["base_model"].endswith("model")


def test_merge_writes_plain_model_equal_to_adapter(trained, capsys):
    from transformers import AutoModelForCausalLM

    from lorafit.infer import load_for_inference

    root, _ = trained
    out = root / "merged"
    assert main(["merge", "--adapter", str(root / "run" / "adapter"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ref, _ = load_for_inference(adapter=str(root / "run" / "adapter"), merged=False)
    base = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain(ids).logits, base(ids).logits, atol=1e-4)  # adapter applied
    assert main(["merge", "--adapter", str(root / "run" / "adapter"), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_generate_and_eval(trained, capsys):
    root, config = trained
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(root / "run" / "adapter"),
                "--prompt",
                "name a colour",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert "### name a colour" in capsys.readouterr().out
    assert main(["eval", str(config)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["loss"] > 0 and 0 <= metrics["token_accuracy"] <= 1


def test_chat_reads_until_exit(trained):
    import io

    from lorafit.infer import chat, load_for_inference

    root, _ = trained
    model, tok = load_for_inference(adapter=str(root / "run" / "adapter"))
    out = io.StringIO()
    chat(
        model,
        tok,
        stdin=io.StringIO("hello\n/reset\nname a colour\n/exit\n"),
        stdout=out,
        max_new_tokens=3,
    )
    assert out.getvalue().count("model> ") == 2


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown option train.learning_rate" in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--set", "data.train=" + str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_merge_of_a_base_without_tokenizer_writes_the_weights(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from helpers import write_random_adapter

    model = write_tiny_chat_model(tmp_path / "model")
    adapter = write_random_adapter(model, tmp_path / "adapter")
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name in (
            "vocab.json",
            "merges.txt",
        ):
            f.unlink()
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()
    assert "weights only" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_merge_on_a_full_disk_is_one_line_and_leaves_the_old_output(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    from helpers import write_random_adapter

    model = write_tiny_chat_model(tmp_path / "model")
    adapter = write_random_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")

    def full_disk(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    code = main(["merge", "--adapter", str(adapter), "--out", str(out), "--force"])
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]  # (progress bars aside)
    assert code == 2 and line.startswith("lorafit merge: error: ") and "Traceback" not in err, err
    assert (
        f"cannot write {out}" in line
        and "No space left on device" in line
        and "No space left on device" in err
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the previous output is intact


def test_train_into_a_read_only_place_is_one_line(tmp_path, capsys):
    model, data = write_tiny_chat_model(tmp_path / "model"), write_chat_data(tmp_path / "d.jsonl")
    code = main(
        [
            "train",
            "--set",
            f"model.name={model}",
            "--set",
            f"data.train={data}",
            "--set",
            "train.output_dir=/sys/lorafit-test/run",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert code == 2 and line.startswith("lorafit train: error: ") and "Traceback" not in err, err
    assert "/sys/lorafit-test" in line


def test_generate_uses_the_adapter(tmp_path, capsys):
    from helpers import write_random_adapter
    from lorafit.infer import generate, load_for_inference

    model = write_tiny_chat_model(tmp_path / "model")
    adapter = write_random_adapter(model, tmp_path / "adapter")
    args = ["--prompt", "name a colour", "--max-new-tokens", "6"]
    assert main(["generate", "--adapter", str(adapter), *args]) == 0
    tuned = capsys.readouterr().out
    assert main(["generate", "--model", str(model), *args]) == 0
    base = capsys.readouterr().out
    net, tok = load_for_inference(adapter=str(adapter))
    expected = generate(net, tok, ["name a colour"], max_new_tokens=6)[0]
    assert tuned == f"### name a colour\n{expected}\n\n" and tuned != base


def test_a_command_prints_nothing_but_its_own_output():
    """No library's import-time notice (torchao's "Failed to load ..." lines, torch's pytree
    warnings) reaches the user's terminal: a fresh process's --help writes nothing to stderr."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "export", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "--format" in proc.stdout
    assert proc.stderr == ""
