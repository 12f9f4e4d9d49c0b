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

The passes are the whole head's (``xent.torch.linear``'s autograd Function, passes and custom
operators) with the rank's shard (``_Shard``) added. Under ``torch.compile`` they are the custom
operators ``torch.ops.xent.linear_fused``, ``linear_forward`` and ``linear_backward``, whose last
arguments name the shard and take the group by its name; they run the per-chunk all-gather and
the hidden states' all-reduce inside, so the graph does not break at the loss (``fullgraph=True``
compiles). As in
``xt.linear_cross_entropy``, a compiled fused pass's backward copies the saved gradients before
scaling them by an upstream gradient other than 1, and a fused pass's entropies carry no
gradient under the compiler.

CPU tensors (a gloo group, say) take the unfused path: each rank's logits ``h @ W_r.T + b_r``
are all-gathered whole and ``xt.cross_entropy`` runs on the f64 CPU reference, the same values in
``O(N·V)`` memory, for tests and small runs; the shards must then be the even split.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _launch
from .functional import outputs
from .linear import LinearXentFunction, _Shard, _autocast, _check, _laid_out, _may_wait, _scored_rows


def _resolved_shard(vocab_start, vocab_size, group_name, check_widths, reduce_input_grad, weight) -> _Shard:
    """The shard a custom operator's arguments name (``xent.torch.linear._op_shard``): the group
    resolved from its name; with ``check_widths`` (the default split) the ranks' shards checked to
    be of one width, as eager calls check them before the pass."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    world = dist.get_world_size(group)
    if check_widths:
        _check_equal_widths(weight.shape[0], world, group, weight.device)
    return _Shard(vocab_start, vocab_size, dist.get_rank(group), world, group, False, reduce_input_grad)


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
        # So does the room for the scored rows' copy: counted against the widest shard's chunks
        # (``linear::shard_chunk_rows``: every rank chunks its rows by it).
        scored = _scored_rows(hidden, target_c.view(target.shape), ignore_index, causal_shift, vocab_size,
                              chunk_bytes=chunk_bytes, needs_grad=torch.is_grad_enabled() and input.requires_grad,
                              world=world)
        if scored is not None:
            rows, labels, keep, chunk_bytes, _ = scored
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
    shard = _Shard(vocab_start, vocab_size, rank, world, group, check_widths, reduce_input_grad)
    loss, stats, predicted, entropy = LinearXentFunction.apply(
        hidden, weight_c, target_c, bias_c, ce_weight, opts, shape, two_phase, accum_dtype, chunk_bytes,
        return_predicted_tokens, return_entropy, shard, False,
    )
    if reduction == "none":
        loss = loss.view(target.shape)
    return outputs(
        loss, stats, target, reduction, lse_square_scale, return_z_loss, return_token_accuracy, False,
        predicted.view(target.shape) if return_predicted_tokens else None,
        entropy.view(target.shape) if return_entropy else None,
    )
