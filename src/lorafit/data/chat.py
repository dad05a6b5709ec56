"""The one chat renderer: the text and tokens a model sees for a conversation, in training,
evaluation, generation and serving alike.

    render_prompt(tokenizer, messages) -> str       what a model continues to answer
    with_system(messages, system_prompt) -> messages
    ChatRenderer(tokenizer).tokenize(messages) -> (token ids, answer spans)   for training

Training finds each answer's first token by rendering the conversation before it with
`ChatRenderer.prompt`, the function behind `render_prompt`; so a generation prompt is, by
construction, the prefix the model learned to continue. Tokenize rendered text with
add_special_tokens=False: the rendering already holds every special token (BOS included).
"""

from __future__ import annotations

from functools import cached_property

from lorafit.data.formats import with_system as with_system  # defined there, used by ShareGPT

# Chat templates often end an assistant turn with a turn-end token rather than
# tokenizer.eos_token (ChatML, Llama 3, Gemma, Phi-3); generation stops on these too, so they
# count as "the end token".
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text a model continues to answer `messages` (the generation prompt of the chat
    template; without one, the same plain layout training uses). Tokenize it with
    add_special_tokens=False."""
    return ChatRenderer(tokenizer).prompt(messages)


class ChatRenderer:
    """How one tokenizer renders and tokenizes conversations. Build one per dataset or batch:
    it tokenizes a probe once to learn the tokenizer's BOS rule."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        # Templates place BOS themselves. Without one, text starts with BOS only if the tokenizer
        # would add one on its own (Llama's does, GPT-2's does not), as in pre-training.
        bos_id = tokenizer.bos_token_id
        adds_bos = bos_id is not None and tokenizer("x")["input_ids"][:1] == [bos_id]
        self.bos = tokenizer.bos_token if adds_bos else ""

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        if self.templated:
            try:
                return tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except (
                Exception
            ) as e:  # jinja2 errors (e.g. "roles must alternate") are not ValueErrors
                raise ValueError(f"the chat template rejected this conversation: {e}") from e
        # No template (a base model): each prompt turn is its text and "\n", each answer its text
        # and the EOS text, so the model learns to stop; the generation prompt adds nothing.
        return self.bos + "".join(
            m["content"] + (tok.eos_token if m["role"] == "assistant" else "\n") for m in messages
        )

    def prompt(self, messages: list[dict]) -> str:
        return self.render(messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        """A plain document ("text" record): BOS rule as above, then the text, then EOS."""
        return self.encode(self.bos + text) + [self.tokenizer.eos_token_id]

    @cached_property
    def end_ids(self) -> set[int]:
        vocab = self.tokenizer.get_vocab()
        return {self.tokenizer.eos_token_id} | {vocab[t] for t in TURN_END_TOKENS if t in vocab}

    def tokenize(self, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
        """(token ids of the conversation through its last assistant turn, the [start, end) span
        of each assistant answer, through its end token).

        The conversation is tokenized once; each answer is located by tokenizing the rendered
        text just before it (the generation prompt) and just after it. A BPE merge across a
        boundary can make those token lists diverge from the full one by a token, so the
        longest common prefix is the boundary rather than len(prompt tokens)."""
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        full = self.render(messages[: turns[-1] + 1], add_generation_prompt=False)
        ids = self.encode(full)
        bounds, prev_end = [], 0
        for k in turns:
            prompt = self.prompt(messages[:k])
            whole = self.render(messages[: k + 1], add_generation_prompt=False)
            if not (
                full.startswith(whole) and whole.startswith(prompt) and len(prompt) >= prev_end
            ):
                raise ValueError(
                    "the chat template does not render earlier turns as a prefix of later ones (it "
                    "rewrites history, e.g. drops past reasoning), so answer tokens cannot be "
                    "located; split the conversation into one record per assistant turn"
                )
            prev_end = len(whole)
            start = _common_prefix(self.encode(prompt), ids)
            bounds.append((start, max(start, _common_prefix(self.encode(whole), ids))))
        out, spans, pos = [], [], 0
        for start, end in bounds:
            out += ids[pos:start]
            answer = ids[start:end]
            stop = next((j for j, t in enumerate(answer) if t in self.end_ids), None)
            if stop is None:  # the template does not end the turn with an end token: add EOS
                answer, tail = answer + [self.tokenizer.eos_token_id], []
            else:  # learn through the end token; template text after it (e.g. "\n") is prompt
                answer, tail = answer[: stop + 1], answer[stop + 1 :]
            spans.append((len(out), len(out) + len(answer)))
            out += answer + tail
            pos = end
        return out + ids[pos:], spans


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
