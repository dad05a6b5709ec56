"""An interactive chat on the terminal with a base model or an adapter."""

from __future__ import annotations

import sys
from typing import TextIO

from torch import nn

from lorafit.tasks.causal_lm import generate


def chat(
    model: nn.Module,
    tokenizer,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> None:
    """/reset clears the history, /exit (or EOF) quits."""
    history: list[dict[str, str]] = []
    stdout.write("chat: type a message, /reset to start over, /exit to quit\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        reply = generate(model, tokenizer, [history], max_new_tokens, temperature, system=system)[0]
        history.append({"role": "assistant", "content": reply})
        stdout.write(f"model> {reply}\n")
