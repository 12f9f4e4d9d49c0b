"""``xent.torch.CrossEntropyLoss``: a drop-in for ``torch.nn.CrossEntropyLoss`` and Liger's
``LigerCrossEntropyLoss`` (their arguments, defaults and return types), computed by xent."""

from __future__ import annotations

from typing import Optional

import torch

from . import _launch
from .functional import cross_entropy


def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    """PyTorch's deprecated ``size_average`` / ``reduce`` pair, as PyTorch maps it."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


class CrossEntropyLoss(torch.nn.Module):
    """``CrossEntropyLoss(weight=None, size_average=None, ignore_index=-100, reduce=None,
    reduction="mean", label_smoothing=0.0, *, lse_square_scale=0.0, softcap=None,
    return_z_loss=False, return_token_accuracy=False, return_predicted_tokens=False,
    causal_shift=False, grad_scale=1.0, two_phase=None, return_entropy=False)``: PyTorch's
    positional arguments in PyTorch's order, Liger's by keyword.

    ``forward(input, target)`` returns the loss, or Liger's ``CrossEntropyOutput`` when
    ``return_z_loss``, ``return_token_accuracy``, ``return_predicted_tokens`` or
    ``return_entropy`` is set. Class indices only (no class
    probabilities as targets); the class dimension is the last (``[N, C]``, ``[..., C]`` or an
    unbatched ``[C]``).
    """

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        lse_square_scale: float = 0.0,
        softcap: Optional[float] = None,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
        causal_shift: bool = False,
        grad_scale: float = 1.0,
        two_phase: Optional[bool] = None,
        inplace_backward: bool = True,
        return_entropy: bool = False,
    ):
        super().__init__()
        reduction = _legacy_reduction(size_average, reduce, reduction)
        # Checks every option now (ValueError), as Liger's asserts do.
        self.options = _launch.checked(_launch.Opts(
            ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
            softcap, return_token_accuracy,
        ))
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.causal_shift = causal_shift
        self.grad_scale = grad_scale
        self.two_phase = two_phase
        self.inplace_backward = inplace_backward
        self.return_entropy = return_entropy

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            causal_shift=self.causal_shift,
            return_z_loss=self.return_z_loss,
            return_token_accuracy=self.return_token_accuracy,
            return_predicted_tokens=self.return_predicted_tokens,
            grad_scale=self.grad_scale,
            two_phase=self.two_phase,
            inplace_backward=self.inplace_backward,
            return_entropy=self.return_entropy,
        )

    def extra_repr(self) -> str:
        return repr(self.options)
