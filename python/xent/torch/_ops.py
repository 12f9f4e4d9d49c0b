"""xent's calls as PyTorch custom operators (``torch.ops.xent.*``), each with a fake (meta)
implementation, so that ``torch.compile`` traces through the loss instead of breaking the graph
or falling back, and sees which operator writes into which tensor. Eager calls skip this layer
(``function.py`` calls ``_launch`` directly: the dispatcher costs host time per call).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _xent
from . import _launch


def option_args(opts) -> tuple:
    """The options as the operators take them (scalars; softcap 0 for none)."""
    return (
        opts.ignore_index,
        opts.reduction,
        opts.grad_scale,
        opts.causal_shift,
        opts.label_smoothing,
        opts.lse_square_scale,
        opts.softcap or 0.0,
        opts.return_token_accuracy,
    )


def opts_of(ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale, softcap, accuracy):
    """The options from the operators' scalars (``option_args``' inverse), unchecked."""
    return _launch.Opts(
        ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
        softcap if softcap > 0.0 else None, accuracy,
    )


def _options(*option_values):
    return _launch.checked(opts_of(*option_values))


#: Where a forward's outputs lie in its stats buffer (the extension's layout, as plain ints).
STATS_LOSS, STATS_EXTRAS, STATS_COUNTS, STATS_ROWS = (
    _xent.STATS_LOSS, _xent.STATS_EXTRAS, _xent.STATS_COUNTS, _xent.STATS_ROWS,
)


def stats_len(rows, accuracy: bool):
    """Length of a forward's stats (``_xent.stats_len``), in arithmetic that symbolic sizes
    follow."""
    return STATS_ROWS + rows * (3 if accuracy else 2)


def _forward(logits, target, weight, fused, *option_values) -> Tensor:
    opts = _options(*option_values)
    call = _launch.prepare(logits, target, weight, opts.causal_shift)
    return _launch.forward(call, opts, fused)


@torch.library.custom_op("xent::forward", mutates_args=())
def forward(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
    grad_scale: float, causal_shift: bool, label_smoothing: float, lse_square_scale: float,
    softcap: float, return_token_accuracy: bool,
) -> Tensor:
    """Two-phase forward: the stats (loss, per-row lse, ...); the logits are only read."""
    return _forward(logits, target, weight, False, ignore_index, reduction, grad_scale, causal_shift,
                    label_smoothing, lse_square_scale, softcap, return_token_accuracy)


@torch.library.custom_op("xent::fused_forward", mutates_args=("logits",))
def fused_forward(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
    grad_scale: float, causal_shift: bool, label_smoothing: float, lse_square_scale: float,
    softcap: float, return_token_accuracy: bool,
) -> Tensor:
    """Fused forward: the stats, and the gradient of ``grad_scale * loss`` over the logits."""
    return _forward(logits, target, weight, True, ignore_index, reduction, grad_scale, causal_shift,
                    label_smoothing, lse_square_scale, softcap, return_token_accuracy)


def fake_stats(target, accuracy: bool) -> Tensor:
    """A forward's stats as a fake implementation returns them (every operator's, here and in
    ``linear.py`` and ``vocab_parallel.py``)."""
    return target.new_empty(stats_len(target.numel(), accuracy), dtype=torch.float32)


def fake_predicted(target, want: bool) -> Tensor:
    """The predicted tokens as an operator returns them: ``[rows]`` int64, or empty when not asked
    for (an operator's outputs are tensors)."""
    return target.new_empty(target.numel() if want else 0, dtype=torch.int64)


def _fake_forward(logits, target, weight, ignore_index, reduction, grad_scale, causal_shift,
                  label_smoothing, lse_square_scale, softcap, return_token_accuracy):
    return fake_stats(target, return_token_accuracy)


forward.register_fake(_fake_forward)
fused_forward.register_fake(_fake_forward)


@torch.library.custom_op("xent::entropy", mutates_args=())
def entropy(logits: Tensor, target: Tensor, ignore_index: int, causal_shift: bool, softcap: float) -> Tensor:
    """Each scored row's entropy (``[rows]`` float32, 0 where not scored); the logits are only
    read."""
    opts = _options(ignore_index, "mean", 1.0, causal_shift, 0.0, 0.0, softcap, False)
    return _launch.entropy(_launch.prepare(logits, target, None, causal_shift), opts)


@entropy.register_fake
def _(logits, target, ignore_index, causal_shift, softcap):
    return target.new_empty(target.numel(), dtype=torch.float32)


@torch.library.custom_op("xent::backward", mutates_args=())
def backward(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor, upstream: Tensor,
    ignore_index: int, reduction: str, grad_scale: float, causal_shift: bool,
    label_smoothing: float, lse_square_scale: float, softcap: float, return_token_accuracy: bool,
    entropy: Optional[Tensor] = None, entropy_upstream: Optional[Tensor] = None,
) -> Tensor:
    """Two-phase backward into a new tensor of the logits' layout; with ``entropy_upstream``, the
    gradient of the forward's ``entropy`` too."""
    opts = _options(ignore_index, reduction, grad_scale, causal_shift, label_smoothing,
                    lse_square_scale, softcap, return_token_accuracy)
    call = _launch.prepare(logits, target, weight, opts.causal_shift)
    grad = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)
    _launch.backward(call, opts, stats, upstream, grad, entropy, entropy_upstream)
    return grad


@backward.register_fake
def _(logits, target, weight, stats, upstream, *option_values):
    return torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("xent::scale_grad", mutates_args=("grad",))
def scale_grad(grad: Tensor, target: Tensor, upstream: Tensor) -> None:
    """Scales a fused forward's gradient (written over the logits) by the upstream gradient; the
    device skips it where the factor is exactly 1."""
    call = _launch.prepare(grad, target, None, False)
    _launch.scale_grad(call, upstream)


@scale_grad.register_fake
def _(grad, target, upstream):
    return None
