"""The autograd Function: forward runs the loss (fused: the gradient too, written over the
logits), backward finishes the gradient with the upstream gradient, rounding 16-bit logits once.

Modes (``two_phase``), per call on ``[N, V]`` logits of ``b`` bytes per element:

- fused (the default for a mean over bfloat16 or float32 logits): forward reads each logit once
  and writes its gradient once (``2·b·N·V`` bytes of traffic, no extra memory: the gradient
  takes the logits' place). Backward launches one small kernel that reads the upstream gradient
  on the device: where it is exactly 1 (a plain ``loss.backward()``) it returns without touching
  the gradient; otherwise it multiplies in place (another ``2·b·N·V`` bytes). That product is rounded once
  when the upstream is a power of two (1/2, 1/4: exact in binary) and both the gradient and the
  product are normal numbers; any other upstream multiplies a gradient already rounded to 16
  bits, a second rounding. Fold a scale known at forward time in with ``grad_scale`` instead, or
  use ``two_phase=True``.
- two_phase (the default for float16, whose gradients are mostly subnormal before the loss
  scale of mixed-precision training multiplies them, and for the sum and none reductions, whose
  upstream gradients are divisors and per-row weights): forward only reads the logits
  (``b·N·V`` bytes) and keeps O(N) per-row statistics; backward reads them again and writes the
  gradient of ``upstream · loss``, rounded once for any upstream (``2·b·N·V`` bytes; 1.5x the
  fused traffic in all). With ``inplace_backward`` (default) the gradient goes into the logits'
  memory at backward time; without, into a new tensor (one extra N x V buffer, the logits left
  intact).

Either mode marks the logits as modified (their version counter) when it overwrites them, so an
operation that saved them for its own backward raises PyTorch's in-place error instead of using
overwritten values.
"""

from __future__ import annotations

import torch

from . import _launch, _ops


def loss_of(stats: torch.Tensor, target: torch.Tensor, opts, copy: bool = True) -> torch.Tensor:
    """The loss in a forward's stats: a scalar, or per row (``target``'s shape) for
    ``reduction="none"``; a copy, not a view of the stats.

    A copy because a view of a custom Function's output may not be changed in place: Transformers'
    mixture-of-experts models add their router loss with ``loss += ...`` (a RuntimeError on a
    view), and under torch.compile AOTAutograd replays the views of an output that aliases another,
    so a compiled function returning the loss and a view of it (``loss, loss.detach()``) would
    replay the stats' ``select`` on the 0-dim loss (an IndexError in torch 2.11). The copy is one
    small launch (4 bytes, or 4 a row). ``copy=False`` (a forward without autograd, not compiled)
    returns the view: a plain tensor's view may be changed in place, and the launch costs host
    time (about 10 us a call in session 49's A/B on an H200)."""
    if opts.reduction == "none":
        rows = target.numel()
        loss = stats[_ops.STATS_ROWS : _ops.STATS_ROWS + rows].view(target.shape)
    else:
        loss = stats[_ops.STATS_LOSS]
    if copy:
        loss = loss.clone()
    return loss


def extras_of(stats: torch.Tensor):
    """The z-loss part, the token accuracy and the label counts in a forward's stats."""
    z_loss = stats[_ops.STATS_EXTRAS]
    accuracy = stats[_ops.STATS_EXTRAS + 1]
    counts = stats[_ops.STATS_COUNTS : _ops.STATS_ROWS].view(torch.int32)
    return z_loss, accuracy, counts


class XentFunction(torch.autograd.Function):
    """``XentFunction.apply(logits, target, weight, opts, two_phase, inplace_backward,
    want_entropy)`` (``opts``: an ``_launch.Opts``) -> ``(loss, stats, entropy)``: the loss
    (differentiable), the forward's stats buffer it was copied from (see ``outputs`` for the rest
    of it) and, with ``want_entropy``, each row's entropy (``target``'s shape, float32; else an
    empty tensor), differentiable too: a two-phase backward adds its gradient (the entropy's
    upstream, one value a row) in the same pass over the logits; a fused one cannot (the logits
    are gone) and raises."""

    @staticmethod
    def forward(ctx, logits, target, weight, opts, two_phase, inplace_backward, want_entropy=False):
        ctx.set_materialize_grads(False)  # no zero tensors made for the stats' gradient
        if want_entropy:  # read before a fused forward writes the gradient over the logits
            from .functional import row_entropy

            entropy = row_entropy(logits, target, opts.ignore_index, opts.causal_shift, opts.softcap)
        else:
            entropy = logits.new_empty(0, dtype=torch.float32)
        if torch.compiler.is_compiling():
            op = _ops.forward if two_phase else _ops.fused_forward
            stats = op(logits, target, weight, *_ops.option_args(opts))
        else:
            call = _launch.prepare(logits, target, weight, opts.causal_shift)
            stats = _launch.forward(call, _launch.checked(opts), fused=not two_phase)
            if not two_phase:
                torch.autograd.graph.increment_version(logits)
            # What the checks found, for the backward (the tensors travel as saved tensors).
            ctx.checked = (call.layout, call.dtype, call.label_type)
            target, weight = call.target, call.weight
        # Saved detached (a tensor of its own over the same memory and version counter), so that
        # the gradient returned from it can be taken by AccumulateGrad as it is: the input itself
        # (a leaf the user holds) would be copied, an N x V allocation and pass.
        if two_phase:
            ctx.save_for_backward(logits.detach(), target, weight, stats, entropy if want_entropy else None)
        else:  # the gradient is in the logits already: nothing else is needed
            ctx.save_for_backward(logits.detach(), target)
        ctx.opts = opts
        ctx.two_phase = two_phase
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(stats)
        # Under torch.compile the backward is traced, every output's gradient a tensor: a fused
        # call's entropies carry none there (an unused output's zeros would raise below).
        ctx.entropy_grad = want_entropy and (two_phase or not torch.compiler.is_compiling())
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return loss_of(stats, target, opts), stats, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, grad_entropy):
        nones = (None,) * 6
        if not ctx.entropy_grad:
            grad_entropy = None
        if (grad_loss is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
            return (None, *nones)
        if grad_entropy is not None and not ctx.two_phase:
            raise RuntimeError(
                "xent: the entropy's gradient needs the two-phase mode (the fused forward wrote the "
                "loss's gradient over the logits): call cross_entropy with two_phase=True or None, "
                "or detach the entropy"
            )
        opts = ctx.opts
        if grad_loss is None:  # only the entropy is differentiated: the loss's upstream is 0
            upstream = torch.zeros(1, dtype=torch.float32, device=grad_entropy.device)
        else:
            upstream = _launch.upstream_of(grad_loss)
        if not ctx.two_phase:
            logits, target = ctx.saved_tensors
            if torch.compiler.is_compiling():
                _ops.scale_grad(logits, target, upstream)
            else:
                _launch.scale_grad(_launch.Call(logits, target, None, *ctx.checked), upstream)
            return (logits, *nones)
        logits, target, weight, stats, entropy = ctx.saved_tensors
        entropy_upstream = None if grad_entropy is None else _launch.upstream_of(grad_entropy)
        if entropy_upstream is None:
            entropy = None
        if torch.compiler.is_compiling():
            grad = _ops.backward(logits, target, weight, stats, upstream, *_ops.option_args(opts), entropy,
                                 entropy_upstream)
            return (grad, *nones)
        call = _launch.Call(logits, target, weight, *ctx.checked)
        if ctx.inplace_backward:
            _launch.backward(call, _launch.checked(opts), stats, upstream, logits, entropy, entropy_upstream)
            torch.autograd.graph.increment_version(logits)
            grad = logits
        else:
            grad = _launch.grad_buffer(call)
            _launch.backward(call, _launch.checked(opts), stats, upstream, grad, entropy, entropy_upstream)
        return (grad, *nones)
