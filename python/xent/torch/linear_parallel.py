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

Under ``torch.compile`` the passes are the custom operators ``torch.ops.xent.linear_shard_fused``,
``linear_shard_forward`` and ``linear_shard_backward`` (with fake implementations), which take the
group by its name and run the per-chunk all-gather and the hidden states' all-reduce inside, so
the graph does not break at the loss (``fullgraph=True`` compiles). As in
``xt.linear_cross_entropy``, a compiled fused pass's backward copies the saved gradients before
scaling them by an upstream gradient other than 1, and a fused pass's entropies carry no
gradient under the compiler.

CPU tensors (a gloo group, say) take the unfused path: each rank's logits ``h @ W_r.T + b_r``
are all-gathered whole and ``xt.cross_entropy`` runs on the f64 CPU reference, the same values in
``O(N·V)`` memory, for tests and small runs; the shards must then be the even split.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from torch import Tensor

from . import _launch
from . import _ops
from .function import loss_of
from .functional import outputs
from .linear import (
    _Call, _autocast, _check, _fake_entropy, _fake_grads, _forward_pass, _in_weight_dtype, _laid_out, _may_wait,
    _op_call, _or_empty, _run, _scaled_saved_grads, _scored_rows, _upstreams,
)


def _all_gather(group):
    """The collective a chunk's summaries take: ``recv`` (``world`` times ``send``) from every
    rank's ``send``, in rank order."""
    import torch.distributed as dist

    def gather(send, recv):
        dist.all_gather_into_tensor(recv, send, group=group)

    return gather


def _shard_pass(call, opts, fused, want, split, group, accum_dtype, chunk_bytes, want_predicted, want_entropy,
                reduce_input_grad):
    """The loss's pass over the chunks on this rank's shard (``fused``: with the gradients ``want``
    asks for, the hidden states' summed over the ranks where ``reduce_input_grad``); returns the
    stats, the gradients (None where not computed), the predicted tokens and the entropies (each
    None where not asked for). Eager calls and the custom operators below both run it."""
    stats, grads, predicted, entropy = _forward_pass(call, opts, fused, want, accum_dtype, chunk_bytes,
                                                     want_predicted, want_entropy, split=(*split, _all_gather(group)))
    if fused:
        _reduce_input_grad(grads[0], split[3], group, reduce_input_grad)
    return stats, grads, predicted, entropy


def _shard_backward(call, opts, stats, upstream, want, split, group, accum_dtype, chunk_bytes, entropy,
                    entropy_upstream, reduce_input_grad):
    """The two-phase backward on this rank's shard (each chunk's logits again; no collective but
    the hidden states' all-reduce): the gradients ``want`` asks for (None where not)."""
    grads = _run(call, opts, "backward", stats, chunk_bytes, upstream=upstream, grads=want, accum_dtype=accum_dtype,
                 entropy=entropy, entropy_upstream=entropy_upstream, split=(*split, _all_gather(group)))
    _reduce_input_grad(grads[0], split[3], group, reduce_input_grad)
    return grads


# ---------------------------------------------------------------------------------------------
# The passes as PyTorch custom operators (`torch.ops.xent.linear_shard_*`), for `torch.compile`:
# each takes the group by its name (`ProcessGroup.group_name`, which Dynamo reads as a constant)
# and runs its collectives inside, eagerly, where the compiler does not look. The arguments are
# `xent.torch.linear`'s operators' with `vocab_start, vocab_size, group_name` after the shape, then
# `check_widths` (the passes that come first: the default split's width check) and
# `reduce_input_grad` (the passes that compute the hidden states' gradient); their outputs are
# those operators' too (empty tensors where not asked for).
# ---------------------------------------------------------------------------------------------


def _op_split(vocab_start, vocab_size, group_name, check_widths, weight):
    """``(split, group)`` of an operator's arguments: the group resolved from its name; with
    ``check_widths`` (the default split) the ranks' shards checked to be of one width, as eager
    calls check them before the pass."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    world = dist.get_world_size(group)
    if check_widths:
        _check_equal_widths(weight.shape[0], world, group, weight.device)
    return (vocab_start, vocab_size, dist.get_rank(group), world), group


@torch.library.custom_op("xent::linear_shard_fused", mutates_args=())
def _linear_shard_fused_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ce_weight: Optional[Tensor],
    ignore_index: int, reduction: str, grad_scale: float, causal_shift: bool, label_smoothing: float,
    lse_square_scale: float, softcap: float, return_token_accuracy: bool, batch: int, seq_len: int,
    vocab_start: int, vocab_size: int, group_name: str, check_widths: bool, reduce_input_grad: bool,
    want_hidden: bool, want_weight: bool, want_bias: bool, accum_f32: bool, chunk_bytes: int,
    want_predicted: bool, want_entropy: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused pass on this rank's shard: the stats, the gradients asked for (of
    ``grad_scale * loss``), the predicted tokens and entropies if asked for."""
    opts = _ops.opts_of(ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
                        softcap, return_token_accuracy)
    split, group = _op_split(vocab_start, vocab_size, group_name, check_widths, weight)
    stats, grads, predicted, entropy = _shard_pass(
        _op_call(hidden, weight, target, bias, ce_weight, batch, seq_len), opts, True,
        (want_hidden, want_weight, want_bias), split, group, torch.float32 if accum_f32 else None,
        chunk_bytes or None, want_predicted, want_entropy, reduce_input_grad,
    )
    return (stats, *(_or_empty(g, hidden) for g in grads), _or_empty(predicted, target, torch.int64),
            _or_empty(entropy, target, torch.float32))


@_linear_shard_fused_op.register_fake
def _(hidden, weight, target, bias, ce_weight, ignore_index, reduction, grad_scale, causal_shift,
      label_smoothing, lse_square_scale, softcap, return_token_accuracy, batch, seq_len, vocab_start, vocab_size,
      group_name, check_widths, reduce_input_grad, want_hidden, want_weight, want_bias, accum_f32, chunk_bytes,
      want_predicted, want_entropy):
    grads = _fake_grads(hidden, weight, bias, want_hidden, want_weight, want_bias, accum_f32)
    return (_ops.fake_stats(target, return_token_accuracy), *grads, _ops.fake_predicted(target, want_predicted),
            _fake_entropy(target, want_entropy))


@torch.library.custom_op("xent::linear_shard_forward", mutates_args=())
def _linear_shard_forward_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ce_weight: Optional[Tensor],
    ignore_index: int, reduction: str, grad_scale: float, causal_shift: bool, label_smoothing: float,
    lse_square_scale: float, softcap: float, return_token_accuracy: bool, batch: int, seq_len: int,
    vocab_start: int, vocab_size: int, group_name: str, check_widths: bool, chunk_bytes: int,
    want_predicted: bool, want_entropy: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Two-phase forward on this rank's shard: the stats (with the per-row statistics backward
    needs), the predicted tokens and entropies if asked for."""
    opts = _ops.opts_of(ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
                        softcap, return_token_accuracy)
    split, group = _op_split(vocab_start, vocab_size, group_name, check_widths, weight)
    stats, _, predicted, entropy = _shard_pass(
        _op_call(hidden, weight, target, bias, ce_weight, batch, seq_len), opts, False, (False,) * 3, split, group,
        None, chunk_bytes or None, want_predicted, want_entropy, False,
    )
    return stats, _or_empty(predicted, target, torch.int64), _or_empty(entropy, target, torch.float32)


@_linear_shard_forward_op.register_fake
def _(hidden, weight, target, bias, ce_weight, ignore_index, reduction, grad_scale, causal_shift,
      label_smoothing, lse_square_scale, softcap, return_token_accuracy, batch, seq_len, vocab_start, vocab_size,
      group_name, check_widths, chunk_bytes, want_predicted, want_entropy):
    return (_ops.fake_stats(target, return_token_accuracy), _ops.fake_predicted(target, want_predicted),
            _fake_entropy(target, want_entropy))


@torch.library.custom_op("xent::linear_shard_backward", mutates_args=())
def _linear_shard_backward_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ce_weight: Optional[Tensor],
    stats: Tensor, upstream: Tensor, ignore_index: int, reduction: str, grad_scale: float,
    causal_shift: bool, label_smoothing: float, lse_square_scale: float, softcap: float,
    return_token_accuracy: bool, batch: int, seq_len: int, vocab_start: int, vocab_size: int, group_name: str,
    reduce_input_grad: bool, want_hidden: bool, want_weight: bool, want_bias: bool, accum_f32: bool,
    chunk_bytes: int, entropy: Optional[Tensor] = None, entropy_upstream: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Two-phase backward on this rank's shard: the gradients asked for of ``upstream · loss``
    (plus ``entropy_upstream · entropy`` where given), the hidden states' summed over the ranks
    where ``reduce_input_grad``."""
    opts = _ops.opts_of(ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
                        softcap, return_token_accuracy)
    split, group = _op_split(vocab_start, vocab_size, group_name, False, weight)
    grads = _shard_backward(
        _op_call(hidden, weight, target, bias, ce_weight, batch, seq_len), opts, stats, upstream,
        (want_hidden, want_weight, want_bias), split, group, torch.float32 if accum_f32 else None,
        chunk_bytes or None, entropy, entropy_upstream, reduce_input_grad,
    )
    return tuple(_or_empty(g, hidden) for g in grads)


@_linear_shard_backward_op.register_fake
def _(hidden, weight, target, bias, ce_weight, stats, upstream, ignore_index, reduction, grad_scale,
      causal_shift, label_smoothing, lse_square_scale, softcap, return_token_accuracy, batch, seq_len,
      vocab_start, vocab_size, group_name, reduce_input_grad, want_hidden, want_weight, want_bias, accum_f32,
      chunk_bytes, entropy=None, entropy_upstream=None):
    return _fake_grads(hidden, weight, bias, want_hidden, want_weight, want_bias, accum_f32)


class _LinearVocabParallel(torch.autograd.Function):
    """``apply(hidden, weight, target, bias, ce_weight, opts, shape, split, group, check_widths,
    two_phase, accum_dtype, chunk_bytes, want_predicted, want_entropy, reduce_input_grad)`` ->
    ``(loss, stats, predicted, entropy)`` (see ``xent.torch.linear.LinearXentFunction``);
    ``split`` is ``(vocab_start, vocab_size, rank, world)``; ``check_widths`` (the default split,
    compiled): the operators check the ranks' shards to be of one width (``_check_equal_widths``)
    before their pass. Under ``torch.compile`` the passes
    are the custom operators above."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ce_weight, opts, shape, split, group, check_widths, two_phase,
                accum_dtype, chunk_bytes, want_predicted, want_entropy, reduce_input_grad):
        ctx.set_materialize_grads(False)
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        fused = any(want) and not two_phase
        compiling = torch.compiler.is_compiling()
        if compiling:
            ctx.group_name = _group_name(group)
            values = (*_ops.option_args(opts), shape[0], shape[1], split[0], split[1], ctx.group_name, check_widths)
            if fused:
                stats, *grads, predicted, entropy = _linear_shard_fused_op(
                    hidden, weight, target, bias, ce_weight, *values, reduce_input_grad, *want,
                    accum_dtype == torch.float32, chunk_bytes or 0, want_predicted, want_entropy,
                )
                grads = [g if w else None for g, w in zip(grads, want)]
            else:
                stats, predicted, entropy = _linear_shard_forward_op(
                    hidden, weight, target, bias, ce_weight, *values, chunk_bytes or 0, want_predicted, want_entropy,
                )
        else:
            call = _Call(hidden, weight, target, bias, ce_weight, shape)
            stats, grads, predicted, entropy = _shard_pass(call, opts, fused, want, split, group, accum_dtype,
                                                           chunk_bytes, want_predicted, want_entropy, reduce_input_grad)
            predicted = _or_empty(predicted, target, torch.int64)
            entropy = _or_empty(entropy, target, torch.float32)
        if fused:
            ctx.save_for_backward(*grads)
        elif any(want):
            ctx.save_for_backward(hidden, weight, target, bias, ce_weight, stats, entropy if want_entropy else None)
        ctx.group, ctx.split, ctx.reduce_input_grad = group, split, reduce_input_grad
        ctx.fused, ctx.want, ctx.opts, ctx.shape = fused, want, opts, shape
        ctx.accum_dtype, ctx.chunk_bytes, ctx.weight_dtype = accum_dtype, chunk_bytes, weight.dtype
        ctx.mark_non_differentiable(stats, predicted)
        # As `LinearXentFunction`: under torch.compile a fused pass's entropies carry no gradient.
        ctx.entropy_grad = want_entropy and (not fused or not compiling)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return loss_of(stats, target, opts), stats, predicted, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_predicted, grad_entropy):
        nones = (None,) * 12
        upstreams = _upstreams(ctx, grad_loss, grad_entropy, "vocab_parallel_linear_cross_entropy")
        if upstreams is None:
            return (None, None, None, None) + nones
        upstream, entropy_upstream = upstreams
        compiling = torch.compiler.is_compiling()
        if ctx.fused:
            grads = _scaled_saved_grads(ctx, upstream)
        else:
            hidden, weight, target, bias, ce_weight, stats, entropy = ctx.saved_tensors
            entropy = entropy if entropy_upstream is not None else None
            if compiling:
                values = (*_ops.option_args(ctx.opts), ctx.shape[0], ctx.shape[1], ctx.split[0], ctx.split[1],
                          ctx.group_name, ctx.reduce_input_grad)
                out = _linear_shard_backward_op(
                    hidden, weight, target, bias, ce_weight, stats, upstream, *values, *ctx.want,
                    ctx.accum_dtype == torch.float32, ctx.chunk_bytes or 0, entropy, entropy_upstream,
                )
                grads = [g if w else None for g, w in zip(out, ctx.want)]
            else:
                call = _Call(hidden, weight, target, bias, ce_weight, ctx.shape)
                grads = _shard_backward(call, ctx.opts, stats, upstream, ctx.want, ctx.split, ctx.group,
                                        ctx.accum_dtype, ctx.chunk_bytes, entropy, entropy_upstream,
                                        ctx.reduce_input_grad)
        grad_h, grad_w, grad_b = _in_weight_dtype(grads, ctx.weight_dtype)
        return grad_h, grad_w, None, grad_b, *nones


def _group_name(group) -> str:
    """The name the operators take a group by (None: the default group)."""
    import torch.distributed as dist

    return (group if group is not None else dist.group.WORLD).group_name


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


# (group, world, width) whose ranks were found to hold shards of one width: the default split is
# checked once per group and width (a head's shards keep their widths from call to call).
_EQUAL_WIDTHS: set = set()


def _ranks_sizes(size, world, group, device):
    """Every rank's ``size``, in rank order (``world`` ranks): one small all-gather and a wait."""
    import torch.distributed as dist

    mine = torch.tensor([size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def _check_equal_widths(width, world, group, device):
    """The default ``vocab_start`` and ``vocab_size`` assume every rank's shard is ``width`` wide
    (Megatron pads its vocabulary so); ranks of other widths would disagree on the vocabulary and
    on their collectives' sizes (a hang), so every rank raises ValueError instead. Checked once
    per group and width: a head's shards keep their widths from call to call."""
    key = (id(group), world, width)
    if world == 1 or key in _EQUAL_WIDTHS:
        return
    widths = _ranks_sizes(width, world, group, device)
    if len(set(widths)) > 1:
        raise ValueError(
            f"the ranks' head shards are {widths} classes wide: pass vocab_start and vocab_size (the "
            "defaults are for shards of one width)"
        )
    _EQUAL_WIDTHS.add(key)


def _check_equal_rows(rows, world, group, device):
    """``sequence_parallel``: the all-gather of the hidden states takes as many rows from every
    rank, so ranks of other counts raise ValueError, every one. Checked on every call: a batch's
    rows change from step to step, and a rank whose count matched an earlier agreement would skip
    the check the others make."""
    if world == 1:
        return
    counts = _ranks_sizes(rows, world, group, device)
    if len(set(counts)) > 1:
        raise ValueError(f"sequence_parallel: the ranks hold {counts} rows of hidden states; they must hold as many")


class _GatherRows(torch.autograd.Function):
    """Every rank's rows ``[R, ...]`` stacked in rank order, ``[world·R, ...]``; the backward sums
    the gradient over the ranks and keeps this rank's rows (a reduce-scatter): Megatron's
    ``gather_from_sequence_parallel_region``. Eager; compiled calls take the functional
    collective of the same meaning (``all_gather_tensor_autograd``)."""

    @staticmethod
    def forward(ctx, x, world, group):
        import torch.distributed as dist

        ctx.world, ctx.group = world, group
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None, None


def _gather_rows(input, world, group):
    """``_GatherRows`` eagerly, the functional collective under ``torch.compile``."""
    if not torch.compiler.is_compiling():
        return _GatherRows.apply(input, world, group)
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_gather_tensor_autograd(input.contiguous(), 0, group if group is not None else dist.group.WORLD)


def _reduce_input_grad(grad_hidden, world, group, wanted):
    """The hidden states' gradient summed over the ``world`` ranks of ``group``, in place (where
    ``wanted``)."""
    if grad_hidden is None or not wanted or world == 1:
        return
    import torch.distributed as dist

    dist.all_reduce(grad_hidden, group=group)


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
    skip_ignored: bool = True,
    sequence_parallel: bool = False,
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
    - ``sequence_parallel``: ``input`` is this rank's block of rows ``[R, ..., D]`` (dim 0; as many
      on every rank), all-gathered in rank order before the head (``[world·R, ..., D]``, whose
      labels ``target`` gives, the same on every rank); the backward reduce-scatters their
      gradient, so each rank gets its rows of the sum over the ranks (Megatron's sequence
      parallelism: ``gather_from_sequence_parallel_region`` before the output layer). Eager calls
      check that every rank holds as many rows (one small all-gather and a wait a call).
    - ``skip_ignored`` (the default): only the scored rows through the GEMMs, as
      ``xt.linear_cross_entropy`` (where at least 1/16 of the rows are ignored, in calls of at
      least 2^35 products ``rows·D·vocab_size``, eager only); every rank selects the same rows
      from its labels, which must be the same on every rank (as they must be anyway; ranks
      selecting different rows would wait at the collective for each other).
    - ``two_phase``, ``chunk_bytes`` (of the rank's logits), ``accum_dtype``: as
      ``xt.linear_cross_entropy``. ``return_entropy`` picks two-phase, where the entropies are
      differentiable (an entropy bonus); in the fused mode a gradient reaching them raises.
    """
    import torch.distributed as dist

    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if sequence_parallel:
        if not reduce_input_grad:
            raise ValueError(
                "sequence_parallel reduce-scatters the hidden states' gradient (a sum over the ranks): "
                "reduce_input_grad=False does not apply"
            )
        if not isinstance(input, torch.Tensor) or input.dim() < 2:
            raise ValueError("sequence_parallel: input must be this rank's rows [R, ..., D]")
        if not torch.compiler.is_compiling():
            _check_equal_rows(input.shape[0], world, group, input.device)
        if world > 1:
            input = _gather_rows(input, world, group)
        reduce_input_grad = False  # the gather's backward sums the ranks' parts
    opts = _launch.Opts(
        ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale, softcap,
        return_token_accuracy,
    )
    if not torch.compiler.is_compiling():  # as in `linear_cross_entropy`: the operators check them
        _launch.checked(opts)  # bad option values raise here, before anything runs
    input, weight, bias = _autocast(input, weight, bias)
    if accum_dtype not in (None, torch.float32, weight.dtype):
        raise ValueError(f"accum_dtype must be None, torch.float32 or the weight's dtype, got {accum_dtype}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    hidden, weight_c, target_c, bias_c, _, shape = _check(input, weight, target, bias, None, causal_shift)
    width = weight_c.shape[0]
    # The default split: every rank's shard checked to be of one width, before anything else can
    # raise on one rank alone (the others would wait at a collective); under torch.compile by the
    # operators when they run.
    check_widths = vocab_start is None or vocab_size is None
    if check_widths and not torch.compiler.is_compiling():
        _check_equal_widths(width, world, group, hidden.device)
        check_widths = False
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
    common = dict(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, softcap=softcap, causal_shift=causal_shift,
        return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        return_predicted_tokens=return_predicted_tokens, grad_scale=grad_scale, return_entropy=return_entropy,
    )
    if skip_ignored and hidden.is_cuda and _may_wait(hidden):
        # The threshold counts the whole vocabulary, so that every rank decides alike.
        scored = _scored_rows(hidden, target_c.view(target.shape), ignore_index, causal_shift, vocab_size)
        if scored is not None:
            rows, labels, keep = scored
            out = vocab_parallel_linear_cross_entropy(
                rows, weight_c, labels, bias_c, **dict(common, causal_shift=False), group=group,
                vocab_start=vocab_start, vocab_size=vocab_size, ce_weight=ce_weight, accum_dtype=accum_dtype,
                two_phase=two_phase, chunk_bytes=chunk_bytes, reduce_input_grad=reduce_input_grad,
                skip_ignored=False,
            )
            return _laid_out(out, keep, target, reduction)
    if not hidden.is_cuda:
        return _unfused(input, weight, target, bias, ce_weight, (vocab_start, vocab_size, rank, world), group,
                        reduce_input_grad, common)
    loss, stats, predicted, entropy = _LinearVocabParallel.apply(
        hidden, weight_c, target_c, bias_c, ce_weight, opts, shape, (vocab_start, vocab_size, rank, world), group,
        check_widths, two_phase, accum_dtype, chunk_bytes, return_predicted_tokens, return_entropy, reduce_input_grad,
    )
    if reduction == "none":
        loss = loss.view(target.shape)
    return outputs(
        loss, stats, target, reduction, lse_square_scale, return_z_loss, return_token_accuracy, False,
        predicted.view(target.shape) if return_predicted_tokens else None,
        entropy.view(target.shape) if return_entropy else None,
    )
