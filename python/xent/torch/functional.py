"""``xent.torch.cross_entropy``: PyTorch's ``torch.nn.functional.cross_entropy`` and Liger's
options in one call, computed by xent's Rust kernels on CUDA tensors (the f64 CPU reference on
CPU tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _launch, _ops
from .function import XentFunction, extras_of, loss_of


def _forward_only(input, target, weight, opts):
    """The loss without a gradient (the logits are only read): (loss, stats)."""
    if torch.compiler.is_compiling():
        stats = _ops.forward(input, target, weight, *_ops.option_args(opts))
    else:
        call = _launch.prepare(input, target, weight, opts.causal_shift)
        stats = _launch.forward(call, _launch.checked(opts), fused=False)
    return loss_of(stats, target, opts, copy=torch.compiler.is_compiling()), stats


def scored_labels(target, ignore_index, causal_shift):
    """Each row's label as the loss scores it (``target`` shifted left within each sequence under
    ``causal_shift``, the last position ``ignore_index``), in ``target``'s shape."""
    if causal_shift:
        pad = torch.full_like(target[..., :1], ignore_index)
        target = torch.cat([target[..., 1:], pad], dim=-1)
    return target


def _scored(target, ignore_index, causal_shift, vocab):
    """Whether each row is scored: its label (after the causal shift) neither ``ignore_index`` nor
    out of ``[0, vocab)``; ``target``'s shape."""
    labels = scored_labels(target, ignore_index, causal_shift)
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def predicted_tokens(logits, target, ignore_index, causal_shift):
    """Liger's ``return_predicted_tokens``: each scored row's first maximal logit's class
    (``torch.argmax`` of ``logits`` as given, before any soft cap, as token accuracy takes it),
    -1 for a row not scored (its label ``ignore_index`` or out of range, or the last position
    under ``causal_shift``); int64, ``target``'s shape. Read before a fused loss writes its
    gradient over the logits."""
    vocab = logits.shape[-1]
    if vocab == 0:
        return torch.full(target.shape, -1, dtype=torch.int64, device=target.device)
    scored = _scored(target, ignore_index, causal_shift, vocab)
    argmax = logits.detach().argmax(-1).view(target.shape).to(device=target.device)
    return torch.where(scored, argmax, torch.full_like(argmax, -1))


def row_entropy(logits, target, ignore_index, causal_shift, softcap):
    """Each scored row's entropy, ``-Σ p·ln p`` over the softmax of its logits (soft-capped by
    ``softcap``: the distribution the loss scores), in nats; 0 for a row not scored (as
    ``predicted_tokens`` decides); float32, ``target``'s shape, no gradient (``XentFunction``
    gives one). On CUDA xent's
    kernel (one read of the logits), on the CPU in float64. Read before a fused loss writes its
    gradient over the logits."""
    if logits.is_cuda:
        if torch.compiler.is_compiling():
            flat = _ops.entropy(logits, target, ignore_index, causal_shift, softcap or 0.0)
        else:
            opts = _launch.checked(_launch.Opts(ignore_index, causal_shift=causal_shift, softcap=softcap))
            flat = _launch.entropy(_launch.prepare(logits, target, None, causal_shift), opts)
        return flat.view(target.shape)
    vocab = logits.shape[-1]
    x = logits.detach().to(torch.float64)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    entropy = torch.special.entr(torch.softmax(x, dim=-1)).sum(-1) if vocab else x.new_zeros(x.shape[:-1])
    scored = _scored(target, ignore_index, causal_shift, vocab)
    entropy = entropy.reshape(target.shape).to(torch.float32)
    return torch.where(scored, entropy, torch.zeros_like(entropy))


@dataclass
class CrossEntropyOutput:
    """What a call returns when ``return_z_loss``, ``return_token_accuracy``,
    ``return_predicted_tokens`` or ``return_entropy`` is set (Liger's ``CrossEntropyOutput``, and
    ``entropy``): device tensors, none of them synchronised; scalars, or per row (``target``'s
    shape: each row's z-loss part, and 1.0 where its argmax is its label) with
    ``reduction="none"``; the predicted tokens (int64, -1 where not scored) and the entropies
    (float32 nats, 0 where not scored; differentiable where the loss is) are per row whatever
    the reduction."""

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor] = None
    token_accuracy: Optional[torch.Tensor] = None
    predicted_tokens: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    causal_shift: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    grad_scale: float = 1.0,
    two_phase: Optional[bool] = None,
    inplace_backward: bool = True,
    check_labels: bool = False,
    return_entropy: bool = False,
):
    """Cross-entropy of ``input`` (``[..., V]`` logits: float32, float16 or bfloat16; rows may be
    strided, the class dimension must be contiguous) against ``target`` (``[...]`` class indices,
    int64 or int32). Returns the loss as a float32 device tensor (a scalar, or ``target``'s shape
    for ``reduction="none"``), or a ``CrossEntropyOutput`` with ``return_z_loss`` /
    ``return_token_accuracy``. Nothing waits for the GPU.

    - ``weight``, ``ignore_index``, ``reduction``, ``label_smoothing``: PyTorch's.
    - ``lse_square_scale`` (z-loss), ``softcap``, ``return_z_loss``, ``return_token_accuracy``,
      ``return_predicted_tokens``: Liger's. The predicted tokens (``predicted_tokens``) are
      ``input.argmax(-1)``, taken before the loss (which may write its gradient over ``input``):
      one more read of the logits.
    - ``return_entropy``: each scored row's entropy ``-Σ p·ln p`` of the softmax the loss scores
      (after the soft cap), in nats, as ``entropy`` (float32, ``target``'s shape, 0 where not
      scored), taken before the loss: one more read of the logits (xent's kernel on CUDA). It is
      differentiable (an entropy bonus, ``loss - β·entropy.mean()``, as TRL's GRPO
      ``entropy_coef`` adds): the two-phase backward adds its gradient ``p·(lse - H - y)`` in its
      one pass over the logits, in float32 before the one rounding, so with ``return_entropy``
      ``two_phase=None`` picks two-phase. With ``two_phase=False`` (the fused path, for an entropy
      that is only logged or masked) a gradient reaching the entropy raises RuntimeError.
    - ``causal_shift``: position ``t`` of each sequence (the last leading dimension) is scored
      against ``target`` at ``t + 1``, the last position ignored; no slice or copy needed.
    - ``grad_scale``: multiplies the gradient (not the loss), folded into the kernel: a scale
      known now (1/accumulation steps) costs nothing and rounds 16-bit gradients once.
    - ``two_phase``: see ``xent.torch.function`` for what each mode costs and how it rounds.
      ``None`` (default) picks the mode that rounds a 16-bit gradient once for the upstream
      gradient such a call usually gets: fused for a mean of bfloat16 or float32 logits (a plain
      ``loss.backward()``: upstream 1), which writes the gradient over ``input`` during the
      forward when ``input`` requires grad, so ``input``'s values are consumed (the seed's and
      Liger's behaviour); two-phase for float16, whose training multiplies the loss by a
      GradScaler scale (a gradient rounded to float16 before that scale would lose its small
      values to float16's subnormal range), and for the sum and none reductions, which are
      divided or weighted afterwards (``loss.sum() / num_items``, per-token weights). Without
      grad the logits are only read.
    - ``inplace_backward`` (two-phase only): the gradient takes the logits' memory at backward.
    - ``check_labels``: wait for the call and raise IndexError if a target is neither
      ``ignore_index`` nor in ``[0, V)``. Without it such a row gets zero gradient and makes the
      loss NaN (on the CPU the call raises at once).
    """
    opts = _launch.Opts(
        ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
        softcap, return_token_accuracy,
    )
    if not torch.compiler.is_compiling():
        _launch.checked(opts)  # bad option values raise here, before anything runs
    predicted = entropy = None
    tensors = isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
    if return_predicted_tokens and tensors:
        predicted = predicted_tokens(input, target, ignore_index, causal_shift)
    differentiable = torch.is_grad_enabled() and isinstance(input, torch.Tensor) and input.requires_grad
    if return_entropy and tensors and not differentiable:
        entropy = row_entropy(input, target, ignore_index, causal_shift, softcap)
    if differentiable:
        if two_phase is None:
            two_phase = input.dtype == torch.float16 or reduction != "mean" or return_entropy
        loss, stats, entropy = XentFunction.apply(input, target, weight, opts, two_phase, inplace_backward,
                                                  return_entropy and tensors)
        if not (return_entropy and tensors):
            entropy = None
    else:
        loss, stats = _forward_only(input, target, weight, opts)
    return outputs(
        loss, stats, target, reduction, lse_square_scale, return_z_loss, return_token_accuracy,
        check_labels, predicted, entropy,
    )


def outputs(loss, stats, target, reduction, lse_square_scale, return_z_loss, return_token_accuracy,
            check_labels, predicted=None, entropy=None):
    """What a call returns from its loss and stats: the loss, or a ``CrossEntropyOutput`` (with
    ``predicted``, the predicted tokens, and ``entropy``, the entropies, too); with
    ``check_labels``, after waiting for the call and raising IndexError for a bad target."""
    extra = predicted is not None or entropy is not None
    if not (check_labels or return_z_loss or return_token_accuracy or extra):
        return loss
    z_loss, accuracy, counts = extras_of(stats)
    if reduction == "none":  # per row, as Liger returns them
        rows = target.numel()
        row_lse = stats[_ops.STATS_ROWS + rows : _ops.STATS_ROWS + 2 * rows]
        z_loss = (lse_square_scale * row_lse * row_lse).view(target.shape)  # 0 where not scored
        if return_token_accuracy:
            row_correct = stats[_ops.STATS_ROWS + 2 * rows : _ops.STATS_ROWS + 3 * rows]
            accuracy = row_correct.view(torch.int32).to(torch.float32).view(target.shape)
    if check_labels:
        _launch.check_labels(counts)
    if return_z_loss or return_token_accuracy or extra:
        return CrossEntropyOutput(
            loss=loss,
            z_loss=z_loss if return_z_loss else None,
            token_accuracy=accuracy if return_token_accuracy else None,
            predicted_tokens=predicted,
            entropy=entropy,
        )
    return loss
