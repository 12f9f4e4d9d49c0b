"""Hugging Face Transformers: xent's loss as a model's ``loss_function``.

>>> model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)
>>> model.loss_function = xt.ForCausalLMLoss      # instead of Transformers' own

``ForCausalLMLoss`` takes the arguments of Transformers' ``ForCausalLMLoss`` (the default loss of
its ``...ForCausalLM`` models) and gives its loss: each position scored against the next label
(xent's ``causal_shift``, with no padded copy of the labels), ``ignore_index``, the mean over the
scored tokens, or their sum divided by ``num_items_in_batch`` (how Transformers' ``Trainer``
averages over gradient-accumulation steps); ``shift_labels`` when the caller shifted the labels
already.

What it saves: Transformers' loss upcasts the logits to float32 (a copy of twice their size)
and its backward makes float32 gradients of that copy and then the logits' own. xent reads the
model's 16-bit logits as they are and, in backward, writes their gradient over them in one pass
(two-phase): no ``[N, V]`` buffer at all. So read ``outputs.logits`` before ``loss.backward()``
if you need them; PyTorch raises its in-place error if autograd saved them for something else.
"""

from __future__ import annotations

import torch

from .functional import cross_entropy


def ForCausalLMLoss(  # noqa: N802  (Transformers' name)
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    *,
    inplace_backward: bool = True,
    **kwargs,
) -> torch.Tensor:
    """Transformers' ``ForCausalLMLoss`` on xent's kernels: ``logits`` ``[..., T, V]`` (any float
    dtype xent takes, rows may be strided), ``labels`` ``[..., T]`` (position ``t`` is scored
    against ``labels[..., t + 1]``, the last position against nothing), or ``shift_labels``
    ``[..., T]`` already shifted (scored as they are). ``vocab_size``, when given, must be the
    logits' last dimension (Transformers views them by it). ``inplace_backward=False`` (through
    ``functools.partial``) writes the gradient into a new tensor instead of over the logits. Other
    keyword arguments are ignored, as Transformers' own ignores those it does not use."""
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ValueError(f"logits {tuple(logits.shape)} do not end in vocab_size {vocab_size}")
    target = labels if shift_labels is None else shift_labels
    target = target.to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = cross_entropy(
        logits, target, ignore_index=ignore_index, reduction=reduction,
        causal_shift=shift_labels is None, two_phase=True, inplace_backward=inplace_backward,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
