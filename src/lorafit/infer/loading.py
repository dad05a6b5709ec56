"""Loading a base model with an adapter (or a fully fine-tuned model folder) for inference."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lorafit.models import alias_for, load_model
from lorafit.tasks import Task, get_task, task_names
from lorafit.tuner import load_adapter, merge, read_adapter
from lorafit.tuner.peft_format import BASE_FILE

LABELS_FILE = "labels.json"  # label names of a classification adapter or model, in head order


def task_of(folder: Path | None, peft_task_type: str | None) -> Task:
    """The task an adapter or model folder was trained for."""
    if folder is not None and (folder / LABELS_FILE).is_file():
        return get_task("classification")
    for name in task_names():
        task = get_task(name)
        if peft_task_type and task.peft_task_type == peft_task_type:
            return task
    return get_task("causal-lm")


def base_of(adapter: Path, recorded: str | None) -> str:
    """The base model to load for `adapter`: its recorded local folder when it exists here, else
    the packaged alias of the same source (the folder is a cache on another machine)."""
    if recorded and Path(recorded).exists():
        return recorded
    identity = {}
    if (adapter / BASE_FILE).is_file():
        identity = json.loads((adapter / BASE_FILE).read_text())
    alias = identity.get("alias") or alias_for(identity.get("hub_id")) or alias_for(recorded)
    if alias:
        return alias
    what = (
        f" (trained on {identity['source_file']}, sha256 {identity['sha256'][:12]}...)"
        if (identity.get("sha256"))
        else ""
    )
    raise FileNotFoundError(
        f"the base model of {adapter} is {recorded!r}{what}, which is not on this machine; "
        "pass --model with a local copy of it"
    )


def load_for_inference(
    model: str | None = None,
    adapter: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | None = None,
    merged: bool = True,
    require_tokenizer: bool = True,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) ready for inference. The base defaults to the adapter's base model; with
    `merged` the adapter is folded into the weights (no per-token overhead). A fully fine-tuned
    model folder (from a run with train.method=full) may be given as `adapter` too."""
    folder = Path(adapter) if adapter else None
    peft_task_type = None
    if (
        folder is not None
        and (folder / "config.json").is_file()
        and not (folder / "adapter_config.json").exists()
    ):
        model, adapter = str(folder), None  # a whole model, not an adapter
    elif adapter is not None:
        config, _ = read_adapter(adapter)
        peft_task_type = config.task_type
        if model is None:
            model = base_of(folder, config.base_model_name_or_path)
    task = task_of(folder, peft_task_type)
    labels = None
    if folder is not None and (folder / LABELS_FILE).is_file():
        labels = json.loads((folder / LABELS_FILE).read_text())
    net, tokenizer = load_model(
        model or "smollm2",
        task.head,
        len(labels) if labels else None,
        dtype,
        device,
        cache_dir,
        require_tokenizer=require_tokenizer,
    )
    if adapter:
        load_adapter(net, adapter)
        if merged:
            merge(net, verify=True)
    net.eval()
    if labels:
        net.config.id2label = dict(enumerate(labels))
        net.config.label2id = {name: i for i, name in enumerate(labels)}
    net.__dict__["lorafit_task"] = task.name
    return net, tokenizer
