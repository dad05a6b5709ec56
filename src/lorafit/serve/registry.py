"""What a server serves: the base model, its adapters (loaded, unloaded, least recently used
ones evicted), how a request's `model` maps to one of them, and how its prompt is rendered.

Adapters given at start (NAME=DIR) are trusted paths; adapters loaded over HTTP must lie inside
the --adapter-dir root (after resolving `..` and symlinks) and are refused with 404 otherwise,
without saying what exists. Every adapter is read by the safetensors-only loader of
`tuner.peft_format` (nothing is unpickled) and checked before the model changes.
"""

from __future__ import annotations

import time
from pathlib import Path

from lorafit.data.chat import render_prompt
from lorafit.data.formats import with_system
from lorafit.infer.loading import trained_system_prompt
from lorafit.serve.engine import Engine
from lorafit.tuner import delete_adapter, load_adapter, read_adapter
from lorafit.tuner.rows import BASE


class AdapterError(Exception):
    """A refused adapter operation, with the HTTP status it maps to."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Registry:
    def __init__(
        self,
        engine: Engine,
        base_name: str,
        adapter_dir: str | None = None,
        max_adapters: int = 8,
        max_rank: int = 64,
    ):
        self.engine, self.model, self.tokenizer = engine, engine.model, engine.tokenizer
        self.base_name = base_name
        self.root = Path(adapter_dir).resolve() if adapter_dir else None
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.adapters: dict[str, dict] = {}  # name -> {"path", "system", "used", "created"}

    # ------------------------------------------------------------------------ requests --
    def resolve(self, name: str) -> str:
        """The adapter a request's `model` names (BASE for the base model); marks it used."""
        if name == self.base_name:
            return BASE
        info = self.adapters.get(name)
        if info is None:
            raise AdapterError(404, f"model {name!r} is not served here; GET /v1/models lists them")
        info["used"] = time.monotonic()
        return name

    def render(self, name: str, messages: list[dict]) -> list[int]:
        """Token ids of the chat prompt, as training rendered it (the adapter's trained system
        prompt first when the request has none)."""
        info = self.adapters.get(name) or {}
        text = render_prompt(self.tokenizer, with_system(messages, info.get("system")))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # BOS is in the text

    def tokenize(self, text: str) -> list[int]:
        """A raw completion prompt, with the tokenizer's own special tokens (BOS where it adds
        one), as vLLM and llama-server tokenize /v1/completions prompts."""
        return self.tokenizer(text)["input_ids"]

    def models(self) -> list[dict]:
        base = {"id": self.base_name, "object": "model", "created": 0, "owned_by": "lorafit"}
        return [base] + [
            {
                "id": name,
                "object": "model",
                "created": int(info["created"]),
                "owned_by": "lorafit",
                "parent": self.base_name,
            }
            for name, info in self.adapters.items()
        ]

    # -------------------------------------------------------------- adapter load / unload --
    def contained(self, path: str) -> Path:
        """`path` resolved inside the adapter root; 404 for anything else."""
        missing = AdapterError(404, f"no adapter {path!r} under the server's adapter directory")
        if self.root is None:
            raise AdapterError(
                403, "this server loads no adapters at run time (start it with --adapter-dir)"
            )
        try:
            folder = (self.root / path).resolve()
        except (OSError, RuntimeError, ValueError):
            raise missing from None
        if not folder.is_relative_to(self.root) or folder == self.root or not folder.is_dir():
            raise missing
        return folder

    def load(self, name: str, path: str, trusted: bool = False) -> dict:
        """Load the adapter at `path` as `name` (engine thread only: it changes the model)."""
        if name == self.base_name or name == BASE:
            raise AdapterError(400, f"{name!r} is the base model's name")
        if name in self.adapters:
            raise AdapterError(409, f"an adapter named {name!r} is loaded; DELETE it first")
        folder = Path(path).resolve() if trusted else self.contained(path)
        try:
            config, _ = read_adapter(folder)
        except (ValueError, OSError) as exc:
            raise AdapterError(400, f"adapter {name!r}: {exc}") from None
        rank = max([config.r, *config.rank_pattern.values()])
        if rank > self.max_rank:
            raise AdapterError(
                400, f"adapter {name!r} has rank {rank}; this server takes up to {self.max_rank}"
            )
        if len(self.adapters) >= self.max_adapters:
            self._evict()
        try:
            load_adapter(self.model, folder, name, activate=False)
        except (ValueError, KeyError, OSError) as exc:
            raise AdapterError(400, f"adapter {name!r} does not fit this base: {exc}") from None
        try:
            self.engine.adapters_changed()
        except ValueError as exc:  # e.g. a DoRA adapter where only the lean step can decode
            delete_adapter(self.model, name)
            self.engine.adapters_changed()
            raise AdapterError(400, f"adapter {name!r}: {exc}") from None
        now = time.monotonic()
        self.adapters[name] = {
            "path": folder,
            "system": trained_system_prompt(folder),
            "used": now,
            "created": time.time(),
        }
        return {"id": name, "object": "model", "parent": self.base_name, "rank": rank}

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterError(404, f"model {name!r} is not a loaded adapter")
        busy = self.engine.adapters_in_use().get(name, 0)
        if busy:
            raise AdapterError(
                409,
                f"adapter {name!r} is used by {busy} running request(s); retry when they finish",
            )
        delete_adapter(self.model, name)
        self.engine.adapters_changed()
        del self.adapters[name]

    def _evict(self) -> None:
        """Unload the least recently used adapter that no request is using."""
        in_use = self.engine.adapters_in_use()
        idle = [n for n in self.adapters if not in_use.get(n)]
        if not idle:
            raise AdapterError(
                429, f"all {self.max_adapters} adapter places are in use; retry shortly"
            )
        self.unload(min(idle, key=lambda n: self.adapters[n]["used"]))
