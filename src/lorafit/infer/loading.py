"""Loading a base model with an adapter (or a fully fine-tuned model folder) for inference."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lorafit.models import DEFAULT_MODEL, alias_for, load_model
from lorafit.tasks import task_of_folder
from lorafit.tasks.classification import LABELS_FILE, set_label_names
from lorafit.tuner import load_adapter, merge, read_adapter
from lorafit.tuner.peft_format import BASE_FILE


def read_base_identity(adapter: Path) -> dict:
    """The adapter's lorafit_base.json ({} when it has none), checked for shape."""
    path = adapter / BASE_FILE
    if not path.is_file():
        return {}
    try:
        identity = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); delete it or re-save the adapter")
    if not isinstance(identity, dict) or not all(
        isinstance(identity.get(k), (str, type(None))) for k in ("alias", "hub_id", "sha256")
    ):
        raise ValueError(f"{path} must be a JSON object with string fields; re-save the adapter")
    return identity


def run_files(adapter: Path) -> tuple[dict, dict]:
    """(the run config, the run summary) of the run that wrote `adapter` (the adapter folder or
    its run folder holds config.json / summary.json), {} where absent."""
    found = []
    for name in ("config.json", "summary.json"):
        data: dict = {}
        for folder in (adapter, adapter.parent):
            try:
                data = json.loads((folder / name).read_text())
                break
            except (OSError, json.JSONDecodeError):
                continue
        found.append(data if isinstance(data, dict) else {})
    return found[0], found[1]


def trained_system_prompt(adapter: Path) -> str | None:
    """The system prompt the adapter was trained with (data.system_prompt of its run), if any."""
    data = run_files(Path(adapter))[0].get("data")
    prompt = data.get("system_prompt") if isinstance(data, dict) else None
    return prompt if isinstance(prompt, str) and prompt else None


def base_of(adapter: Path, recorded: str | None) -> str:
    """The base model to load for `adapter`: its recorded local folder when it exists here, else
    the packaged alias of the same source (the folder is a cache on another machine)."""
    if recorded and Path(recorded).exists():
        return recorded
    identity = read_base_identity(adapter)
    alias = identity.get("alias") or alias_for(identity.get("hub_id")) or alias_for(recorded)
    if alias:
        return alias
    what = ""
    if identity.get("sha256"):
        source = identity.get("source_file") or "its source file"
        what = f" (trained on {source}, sha256 {identity['sha256'][:12]}...)"
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
    quantize: str = "none",
    quantize_backend: str = "auto",
) -> tuple[nn.Module, object]:
    """(model, tokenizer) ready for inference. The base defaults to the adapter's base model; with
    `merged` the adapter is folded into the weights (no per-token overhead). A fully fine-tuned
    model folder (from a run with train.method=full) may be given as `adapter` too. `quantize`
    loads the base quantized, as a QLoRA run trained it (the adapter then stays unmerged)."""
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
    task = task_of_folder(folder, peft_task_type)
    labels = None
    if folder is not None and (folder / LABELS_FILE).is_file():
        labels = json.loads((folder / LABELS_FILE).read_text())
    net, tokenizer = load_model(
        model or DEFAULT_MODEL,
        task.head,
        len(labels) if labels else None,
        dtype,
        device,
        cache_dir,
        require_tokenizer=require_tokenizer,
        quantize=quantize,
        quantize_backend=quantize_backend,
    )
    if adapter:
        load_adapter(net, adapter)
        if merged and quantize in (None, "none"):
            merge(net, verify=True)
    net.eval()
    if labels:
        set_label_names(net, labels)
    if folder is not None:
        tokenizer = task.read_product_files(folder, tokenizer)
    net.__dict__["lorafit_task"] = task.name
    return net, tokenizer
