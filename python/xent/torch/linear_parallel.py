"""Linear + cross-entropy with the LM head split by vocabulary over ``torch.distributed`` (a
tensor-parallel head: Megatron's column-parallel output layer, verl's
``linear_cross_entropy(..., dist_process_group)``): each rank holds ``weight`` ``[V_r, D]``, the
rows ``[vocab_start, vocab_start + V_r)`` of the whole head, and the same hidden states and
labels; no rank ever holds more than a chunk of its own logits.

>>> loss = xt.vocab_parallel_linear_cross_entropy(hidden, lm_head_shard, target, group=tp_group)

Per chunk of rows (cuBLASLt GEMMs and xent's kernels on PyTorch's current stream): the chunk's
logits over the rank's classes, xent's step 1 of the vocabulary-parallel protocol on them, one
``all_gather_into_tensor`` of a few values per row and rank, step 3 (the loss, and the gradient
written over the chunk's logits), then the two gradient GEMMs. The loss, token accuracy,
predicted tokens and entropies are the whole vocabulary's, the same on every rank. The weight's
(and bias's) gradient is this rank's rows'; the hidden states' gradient is summed over the ranks
by one ``all_reduce`` of ``[N, D]`` (in the hidden states' dtype: each rank's part rounded once,
as Megatron's column-parallel linear reduces it), or left to the caller with
``reduce_input_grad=False``.

The modes are ``xt.linear_cross_entropy``'s: fused (the default for the mean and sum reductions:
the gradients in the forward, three GEMMs a chunk) and two-phase (``reduction="none"``,
``return_entropy``: the forward keeps the whole vocabulary's log-sum-exps, the backward computes
each chunk's logits again, with no collective but the hidden states' all-reduce).

Eager only: under ``torch.compile`` the call is a graph break (the collective runs inside xent's
chunk loop, which the compiler cannot trace).

CPU tensors (a gloo group, say) take the unfused path: each rank's logits ``h @ W_r.T + b_r``
are all-gathered whole and ``xt.cross_entropy`` runs on the f64 CPU reference, the same values in
``O(N·V)`` memory, for tests and small runs; the shards must then be the even split.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _launch
from .function import loss_of
from .functional import outputs
from .linear import (
    _Call, _autocast, _check, _in_weight_dtype, _or_empty, _predicted_buffer, _run, _scale_grad, _stats_buffer,
)


def _all_gather(group):
    """The collective a chunk's summaries take: ``recv`` (``world`` times ``send``) from every
    rank's ``send``, in rank order."""
    import torch.distributed as dist

    def gather(send, recv):
        dist.all_gather_into_tensor(recv, send, group=group)

    return gather


class _LinearVocabParallel(torch.autograd.Function):
    """``apply(hidden, weight, target, bias, ce_weight, opts, shape, split, group, two_phase,
    accum_dtype, chunk_bytes, want_predicted, want_entropy, reduce_input_grad)`` ->
    ``(loss, stats, predicted, entropy)`` (see ``xent.torch.linear.LinearXentFunction``);
    ``split`` is ``(vocab_start, vocab_size, rank, world)``."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ce_weight, opts, shape, split, group, two_phase, accum_dtype,
                chunk_bytes, want_predicted, want_entropy, reduce_input_grad):
        ctx.set_materialize_grads(False)
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        fused = any(want) and not two_phase
        call = _Call(hidden, weight, target, bias, ce_weight, shape)
        run_split = (*split, _all_gather(group))
        stats = _stats_buffer(target, opts.return_token_accuracy)
        predicted = _predicted_buffer(target) if want_predicted else None
        entropy = torch.empty(target.numel(), dtype=torch.float32, device=target.device) if want_entropy else None
        pass_name = "fused" if fused else "forward"
        grads = _run(call, opts, pass_name, stats, chunk_bytes, grads=want if fused else (False,) * 3,
                     accum_dtype=accum_dtype, predicted=predicted, entropy=entropy, split=run_split)
        ctx.group, ctx.split, ctx.reduce_input_grad = group, split, reduce_input_grad
        if fused:
            _reduce_input_grad(ctx, grads[0])
            ctx.save_for_backward(*grads)
        elif any(want):
            ctx.save_for_backward(hidden, weight, target, bias, ce_weight, stats, entropy if want_entropy else None)
        predicted = _or_empty(predicted, target, torch.int64)
        entropy = _or_empty(entropy, target, torch.float32)
        ctx.fused, ctx.want, ctx.opts, ctx.shape = fused, want, opts, shape
        ctx.accum_dtype, ctx.chunk_bytes, ctx.weight_dtype = accum_dtype, chunk_bytes, weight.dtype
        ctx.mark_non_differentiable(stats, predicted)
        ctx.want_entropy = want_entropy
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return loss_of(stats, target, opts), stats, predicted, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_predicted, grad_entropy):
        nones = (None,) * 11
        if not ctx.want_entropy:
            grad_entropy = None
        if (grad_loss is None and grad_entropy is None) or not any(ctx.want):
            return (None, None, None, None) + nones
        if grad_entropy is not None and ctx.fused:
            raise RuntimeError(
                "xent: the entropy's gradient needs the two-phase mode (the fused pass computed the "
                "gradients in the forward): call vocab_parallel_linear_cross_entropy with "
                "two_phase=True or None, or detach the entropy"
            )
        if grad_loss is None:  # only the entropy is differentiated: the loss's upstream is 0
            upstream = torch.zeros(1, dtype=torch.float32, device=grad_entropy.device)
        else:
            upstream = _launch.upstream_of(grad_loss)
        if ctx.fused:
            grads = list(ctx.saved_tensors)
            for grad in grads:
                if grad is not None:  # scaled on the device where the upstream is not 1
                    _scale_grad(grad, upstream)
        else:
            hidden, weight, target, bias, ce_weight, stats, entropy = ctx.saved_tensors
            entropy_upstream = None if grad_entropy is None else _launch.upstream_of(grad_entropy)
            entropy = entropy if entropy_upstream is not None else None
            call = _Call(hidden, weight, target, bias, ce_weight, ctx.shape)
            grads = list(_run(call, ctx.opts, "backward", stats, ctx.chunk_bytes, upstream=upstream, grads=ctx.want,
                              accum_dtype=ctx.accum_dtype, entropy=entropy, entropy_upstream=entropy_upstream,
                              split=(*ctx.split, _all_gather(ctx.group))))
            _reduce_input_grad(ctx, grads[0])
        grad_h, grad_w, grad_b = _in_weight_dtype(grads, ctx.weight_dtype)
        return grad_h, grad_w, None, grad_b, *nones


class _InputGradSum(torch.autograd.Function):
    """The identity, whose backward sums the gradient over the ranks of ``group`` (Megatron's
    ``copy_to_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherColumns(torch.autograd.Function):
    """Every rank's logits ``[rows, V_q]`` side by side, ``[rows, V]`` (the even split's widths;
    padded to the widest for the all-gather); the backward takes this rank's columns of the
    gradient (every rank computes the same loss from the same whole logits)."""

    @staticmethod
    def forward(ctx, local, widths, rank, group):
        import torch.distributed as dist

        widest = max(widths)
        padded = torch.nn.functional.pad(local, (0, widest - local.shape[-1])).contiguous()
        pieces = [torch.empty_like(padded) for _ in widths]
        dist.all_gather(pieces, padded, group=group)
        ctx.start, ctx.width = sum(widths[:rank]), widths[rank]
        return torch.cat([p[:, :w] for p, w in zip(pieces, widths)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.start:ctx.start + ctx.width], None, None, None


def _even_split(vocab, world):
    """Megatron's split (``xent::vocab_parallel::Shard::split``): ``(start, width)`` per rank."""
    base, extra = divmod(vocab, world)
    return [(r * base + min(r, extra), base + (1 if r < extra else 0)) for r in range(world)]


def _unfused(hidden, weight, target, bias, ce_weight, split, group, reduce_input_grad, common):
    """The CPU path: every rank's logits gathered whole, then ``xt.cross_entropy``."""
    from .functional import cross_entropy

    vocab_start, vocab_size, rank, world = split
    shards = _even_split(vocab_size, world)
    if shards[rank] != (vocab_start, weight.shape[0]):
        raise ValueError(
            f"on CPU tensors the shards must be the even split of the vocabulary: rank {rank}'s is "
            f"[{shards[rank][0]}, {sum(shards[rank])}), not [{vocab_start}, {vocab_start + weight.shape[0]})"
        )
    if reduce_input_grad and world > 1:
        hidden = _InputGradSum.apply(hidden, group)
    local = torch.nn.functional.linear(hidden, weight, bias)
    lead = local.shape[:-1]
    whole = _GatherColumns.apply(local.reshape(-1, local.shape[-1]), [w for _, w in shards], rank, group)
    return cross_entropy(whole.reshape(*lead, vocab_size), target, ce_weight, **common)


# (group, world, width) whose ranks were found to hold shards of one width: the default split
# is checked once per group and width (one small all-gather and a wait).
_EQUAL_WIDTHS: set = set()


def _check_equal_widths(width, world, group, device):
    """The default ``vocab_start`` and ``vocab_size`` assume every rank's shard is ``width`` wide
    (Megatron pads its vocabulary so); ranks of other widths would disagree on the vocabulary and
    on their collectives' sizes, so every rank raises ValueError instead."""
    import torch.distributed as dist

    key = (id(group), world, width)
    if world == 1 or key in _EQUAL_WIDTHS:
        return
    mine = torch.tensor([width], dtype=torch.int64, device=device)
    widths = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(widths, mine, group=group)
    widths = [int(w) for w in widths]
    if len(set(widths)) > 1:
        raise ValueError(
            f"the ranks' head shards are {widths} classes wide: pass vocab_start and vocab_size (the "
            "defaults are for shards of one width)"
        )
    _EQUAL_WIDTHS.add(key)


def _reduce_input_grad(ctx, grad_hidden):
    """The hidden states' gradient summed over the ranks, in place (where asked for)."""
    if grad_hidden is None or not ctx.reduce_input_grad or ctx.split[3] == 1:
        return
    import torch.distributed as dist

    dist.all_reduce(grad_hidden, group=ctx.group)


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    ce_weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    causal_shift: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    grad_scale: float = 1.0,
    accum_dtype: Optional[torch.dtype] = None,
    two_phase: Optional[bool] = None,
    chunk_bytes: Optional[int] = None,
    return_predicted_tokens: bool = False,
    return_entropy: bool = False,
    reduce_input_grad: bool = True,
):
    """Cross-entropy of ``input @ W.T + b`` over the whole vocabulary, the LM head ``W`` split by
    vocabulary over the ranks of ``group`` (None: the default group): ``weight`` ``[V_r, D]`` and
    ``bias`` ``[V_r]`` are this rank's rows, classes ``[vocab_start, vocab_start + V_r)`` of
    ``vocab_size``; ``input`` ``[..., D]`` and ``target`` ``input.shape[:-1]`` (global class ids)
    are the same on every rank, and so is ``ce_weight`` (``[vocab_size]``). Returns what
    ``xt.linear_cross_entropy`` over the whole head returns (the same on every rank), every option
    meaning the same; differentiable in ``input``, ``weight`` and ``bias``.

    - ``vocab_start``, ``vocab_size``: None for shards of one width (Megatron's, its vocabulary
      padded to a multiple of the ranks): ``rank · V_r`` and ``world · V_r``, checked once per group
      and width (an all-gather of the widths; ranks of several widths raise ValueError). Uneven
      shards pass both; they must be the even split of ``vocab_size``
      (``xent::vocab_parallel::Shard::split``: the first ``vocab_size % world`` ranks take one
      class more), or fit its widest shard.
    - ``reduce_input_grad``: the hidden states' gradient summed over the ranks (one
      ``all_reduce`` of ``[N, D]``, the default); False leaves each rank its own part, for a caller
      whose layer reduces it already (Megatron's ``copy_to_tensor_model_parallel_region``).
    - ``two_phase``, ``chunk_bytes`` (of the rank's logits), ``accum_dtype``: as
      ``xt.linear_cross_entropy``. ``return_entropy`` picks two-phase, where the entropies are
      differentiable (an entropy bonus); in the fused mode a gradient reaching them raises.
    """
    import torch.distributed as dist

    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    opts = _launch.Opts(
        ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale, softcap,
        return_token_accuracy,
    )
    _launch.checked(opts)  # bad option values raise here, before anything runs
    input, weight, bias = _autocast(input, weight, bias)
    if accum_dtype not in (None, torch.float32, weight.dtype):
        raise ValueError(f"accum_dtype must be None, torch.float32 or the weight's dtype, got {accum_dtype}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    hidden, weight_c, target_c, bias_c, _, shape = _check(input, weight, target, bias, None, causal_shift)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    width = weight_c.shape[0]
    if vocab_start is None or vocab_size is None:
        _check_equal_widths(width, world, group, hidden.device)
    vocab_start = rank * width if vocab_start is None else vocab_start
    vocab_size = world * width if vocab_size is None else vocab_size
    if not (0 <= vocab_start and vocab_start + width <= vocab_size):
        raise ValueError(f"the shard [{vocab_start}, {vocab_start + width}) is not inside [0, {vocab_size})")
    if ce_weight is not None:
        if not isinstance(ce_weight, torch.Tensor) or tuple(ce_weight.shape) != (vocab_size,):
            raise ValueError(f"ce_weight must hold one weight per class of the whole vocabulary ({vocab_size})")
        ce_weight = ce_weight.detach().to(device=hidden.device, dtype=torch.float32).contiguous()
    if two_phase is None:
        two_phase = reduction == "none" or return_entropy
    if reduction == "none" and not two_phase:
        raise ValueError("reduction='none' needs two_phase=True (a per-row upstream cannot reach a summed gradient)")
    if not hidden.is_cuda:
        common = dict(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale, softcap=softcap, causal_shift=causal_shift,
            return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
            return_predicted_tokens=return_predicted_tokens, grad_scale=grad_scale, return_entropy=return_entropy,
        )
        return _unfused(input, weight, target, bias, ce_weight, (vocab_start, vocab_size, rank, world), group,
                        reduce_input_grad, common)
    loss, stats, predicted, entropy = _LinearVocabParallel.apply(
        hidden, weight_c, target_c, bias_c, ce_weight, opts, shape, (vocab_start, vocab_size, rank, world), group,
        two_phase, accum_dtype, chunk_bytes, return_predicted_tokens, return_entropy, reduce_input_grad,
    )
    if reduction == "none":
        loss = loss.view(target.shape)
    return outputs(
        loss, stats, target, reduction, lse_square_scale, return_z_loss, return_token_accuracy, False,
        predicted.view(target.shape) if return_predicted_tokens else None,
        entropy.view(target.shape) if return_entropy else None,
    )
