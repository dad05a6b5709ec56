"""Inference: loading an adapter (or a fine-tuned model) for use, chat, evaluation of a run."""

from lorafit.infer.chat import chat
from lorafit.infer.evaluate import evaluate_run, prompts_and_references
from lorafit.infer.loading import load_for_inference
from lorafit.tasks.causal_lm import generate
from lorafit.tasks.classification import classify

__all__ = [
    "chat",
    "classify",
    "evaluate_run",
    "generate",
    "load_for_inference",
    "prompts_and_references",
]
