"""The seed's names (``crossentropy-triton``) with the seed's semantics, so its README's examples
run with only the import changed: ``CrossEntropyFunction.apply(logits, labels, ignore_index)`` on
``[B, T, V]`` logits with the causal shift built in (position ``t`` scored against label
``t + 1``), mean over the scored positions, the gradient written into the logits; and
``TritonCausalLMLoss(vocab_size)``. Unlike the seed, nothing is copied (the shift is indexing), the
host never waits for the GPU, and a 16-bit gradient is rounded once.
"""

from __future__ import annotations

import torch

from .functional import cross_entropy


class CrossEntropyFunction:
    """``CrossEntropyFunction.apply(logits, labels, ignore_index=-100)``: the seed's autograd
    Function, as a thin front of xent's."""

    @staticmethod
    def apply(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        return cross_entropy(logits, labels, ignore_index=ignore_index, causal_shift=True)


class TritonCausalLMLoss(torch.nn.Module):
    """``TritonCausalLMLoss(vocab_size)(logits, labels)``: the seed's causal-LM loss module."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} classes, the loss was made for {self.vocab_size}")
        return CrossEntropyFunction.apply(logits, labels, -100)
