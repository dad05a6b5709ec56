"""Lean compute for the training step: the fused LM loss, lean autograd blocks, precision."""
