"""An Ollama Modelfile beside an exported GGUF, so `ollama create NAME -f Modelfile` works.

Ollama's TEMPLATE is a Go template, not the model's Jinja chat template, so it is written for the
chat formats recognised here (ChatML, Llama 3), from the same markers the Jinja template uses;
for any other template TEMPLATE is left out and Ollama falls back to the GGUF's own
tokenizer.chat_template. Ollama passes system messages both as .System and inside .Messages, so
the message loop skips them (rendered once). Stop parameters: end-of-turn and EOS tokens.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}'
    "<|im_end|>\n{{ end }}{{ end }}"
    "<|im_start|>assistant\n"
)
LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}'
    "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
FORMATS = {  # marker in the Jinja template -> (Go template, end-of-turn token)
    "<|im_start|>": (CHATML, "<|im_end|>"),
    "<|start_header_id|>": (LLAMA3, "<|eot_id|>"),
}


def gguf_chat_info(path: Path) -> tuple[str | None, list[str]]:
    """(the Jinja chat template, the EOS token's text) stored in a GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    template = reader.get_field("tokenizer.chat_template")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    eos = reader.get_field("tokenizer.ggml.eos_token_id")
    stops = []
    if tokens is not None and eos is not None:
        stops.append(str(tokens.contents(int(eos.contents()))))
    return (str(template.contents()) if template is not None else None), stops


def modelfile(
    model_ref: str,
    chat_template: str | None,
    eos: list[str],
    adapter_ref: str | None = None,
    system: str | None = None,
) -> tuple[str, bool]:
    """(the Modelfile text, whether a TEMPLATE was written)."""
    lines = [f"FROM {model_ref}"]
    if adapter_ref:
        lines.append(f"ADAPTER {adapter_ref}")
    stops = list(eos)
    templated = False
    for marker, (template, end) in FORMATS.items():
        if chat_template and marker in chat_template:
            lines.append(f'TEMPLATE """{template}"""')
            stops.insert(0, end)
            templated = True
            break
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in dict.fromkeys(stops):  # unique, in order
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n", templated
