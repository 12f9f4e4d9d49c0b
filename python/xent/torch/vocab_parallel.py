"""Vocabulary-parallel cross-entropy over ``torch.distributed``: with the LM head split by
vocabulary, each rank holds logits ``[..., V_r]`` for classes ``[vocab_start, vocab_start + V_r)``
of ``vocab_size``, and the loss and each rank's gradient come from one all-gather
(``torch.distributed.all_gather_into_tensor``) of a few values per row, TransformerEngine's
scheme, run by xent's kernels on PyTorch's current stream.

>>> loss = xt.vocab_parallel_cross_entropy(local_logits, target, vocab_start=rank * V_r,
...                                        vocab_size=V, group=tp_group)

The gradient of ``grad_scale · loss`` is written over the local logits during the forward (as
``xt.cross_entropy``'s fused mode); backward multiplies it by the upstream gradient on the device
only when that is not exactly 1. Every option of ``xt.cross_entropy``: token accuracy and the
predicted tokens are the whole vocabulary's (each rank adds its shard's argmax to the
all-gather, and takes one more read of its shard for it), and so are the entropies
(``return_entropy``: each rank adds three values a row, its shard's ``(max, Σ 2^(z-max),
Σ 2^(z-max)·(z-max))``, one more read of its shard; differentiable in the two-phase mode, which
adds their gradient in its one pass with no collective).

``shard_stats`` and ``shard_loss`` are the two steps apart, for a collective of the caller's own
(or every rank simulated on one GPU, as the tests do).

Under ``torch.compile`` the steps are the custom operators ``torch.ops.xent.shard_stats``,
``shard_loss`` / ``shard_loss_fused`` and ``shard_grad`` (with fakes) and the all-gather a
functional collective, so ``fullgraph=True`` compiles. As for ``xt.cross_entropy``, the compiler
does not let an operator write into a tensor saved for backward: a compiled backward writes the
gradient into a copy of the logits (one more ``[..., V_r]`` buffer while it runs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _xent
from . import _launch, _ops
from .function import loss_of
from .functional import outputs


def _describe(logits, target, vocab_start, vocab_size, causal_shift):
    """Checks one rank's tensors; returns ``(logits, target, shape, shard)`` as the kernels take
    them (``shape``: ``(batch, seq_len, width, row_stride)``)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("input and target must be torch.Tensors")
    if not logits.is_cuda:
        raise ValueError("vocab_parallel_cross_entropy runs on CUDA tensors")
    width = logits.shape[-1]
    if not (0 <= vocab_start and vocab_start + width <= vocab_size and width > 0):
        raise ValueError(
            f"the shard [{vocab_start}, {vocab_start + width}) is not inside [0, {vocab_size})"
        )
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target {tuple(target.shape)} must have the logits' shape without the class dimension"
        )
    logits_c = logits if logits.is_contiguous() else logits.contiguous()
    target_c = target.contiguous()
    rows = target.numel()
    seq_len = logits.shape[-2] if (causal_shift and logits.dim() >= 2) else rows
    batch = rows // seq_len if seq_len else 1
    shape = (batch, seq_len, width, width)
    return logits_c, target_c, shape, (vocab_start, width)


def _args(logits, target, shape, shard, vocab_size, world, weight, opts):
    """The binding's leading arguments; ``world`` ``None`` for step 4, which has no collective."""
    index = logits.device.index
    weight_buf = None if weight is None else (weight.data_ptr(), weight.numel())
    return (
        _launch.device(index),
        _launch._stream(index),
        (logits.data_ptr(), logits.numel()),
        str(logits.dtype).rpartition(".")[2],
        (target.data_ptr(), target.numel()),
        str(target.dtype).rpartition(".")[2],
        shape,
        shard,
        vocab_size,
        *(() if world is None else (world,)),
        weight_buf,
        _launch.checked(opts),
    )


def shard_stats(logits, target, *, vocab_start, vocab_size, world, weight=None, opts, predicted=False,
                entropy=False):
    """Step 1 on one rank: the values it contributes to the all-gather (a float32 tensor;
    ``predicted``: the call returns the predicted tokens, which, as token accuracy, add each row's
    argmax in the shard; ``entropy``: the call returns the entropies, which add each row's
    summary of the shard)."""
    logits, target, shape, shard = _describe(logits, target, vocab_start, vocab_size, opts.causal_shift)
    device, stream, *rest = _args(logits, target, shape, shard, vocab_size, world, weight, opts)
    words = _xent.shard_words(device, target.numel(), vocab_size, world, rest[1], _launch.checked(opts), predicted,
                              entropy)
    send = torch.empty(words, dtype=torch.float32, device=logits.device)
    with _launch._on(logits.device.index):
        _xent.shard_stats(device, stream, *rest, (send.data_ptr(), send.numel()), predicted, entropy)
    return send


def _row_buffer(name, tensor, dtype, rows):
    """``(address, length)`` of a per-row output the caller gave (``None``: not asked for)."""
    if tensor is None:
        return None
    if tensor.dtype != dtype or tensor.numel() != rows or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of one value a row")
    return (tensor.data_ptr(), tensor.numel())


def shard_loss(logits, target, gathered, *, vocab_start, vocab_size, world, weight=None, opts, fused,
               predicted=None, entropy=None):
    """Step 3 on one rank: from every rank's values (``gathered``, rank order), the stats buffer
    (see ``xent.torch.function.loss_of``; with ``opts.return_token_accuracy`` it holds the rows
    predicted right, see ``xent.torch.functional.outputs``); with ``fused`` the gradient of
    ``grad_scale · loss`` written over ``logits`` (which must then be contiguous); with
    ``predicted`` (an int64 tensor of ``target``'s size, the same as given to ``shard_stats``) each
    row's class over the whole vocabulary written into it, -1 for a row not scored; with
    ``entropy`` (a float32 tensor of ``target``'s size; ``shard_stats`` given ``entropy=True``)
    each row's entropy over the whole vocabulary, 0 for a row not scored."""
    if fused and not logits.is_contiguous():
        raise ValueError("a fused shard_loss writes the gradient over the logits: they must be contiguous")
    logits, target, shape, shard = _describe(logits, target, vocab_start, vocab_size, opts.causal_shift)
    device, stream, *rest = _args(logits, target, shape, shard, vocab_size, world, weight, opts)
    stats = torch.empty(
        _xent.stats_len(target.numel(), opts.return_token_accuracy), dtype=torch.float32, device=logits.device
    )
    tokens = _row_buffer("predicted", predicted, torch.int64, target.numel())
    entropies = _row_buffer("entropy", entropy, torch.float32, target.numel())
    with _launch._on(logits.device.index):
        _xent.shard_backward(
            device, stream, *rest, (gathered.data_ptr(), gathered.numel()),
            (stats.data_ptr(), stats.numel()), fused, tokens, entropies,
        )
    return stats


def shard_grad(logits, target, stats, upstream, *, vocab_start, vocab_size, weight=None, opts, entropy=None,
               entropy_upstream=None):
    """Two-phase, step 4 on one rank: the gradient of ``upstream · loss`` written over
    ``logits`` (contiguous), from the ``stats`` of a ``shard_loss`` without ``fused``;
    ``upstream`` a float32 tensor of one value, or one per row (``reduction="none"``); with
    ``entropy_upstream`` (one value a row) plus the gradient of ``Σ entropy_upstream · H``, ``H``
    the entropies ``shard_loss`` wrote into ``entropy``."""
    if not logits.is_contiguous():
        raise ValueError("shard_grad writes the gradient over the logits: they must be contiguous")
    if (entropy is None) != (entropy_upstream is None):
        raise ValueError("the entropies' gradient needs both entropy and entropy_upstream")
    logits, target, shape, shard = _describe(logits, target, vocab_start, vocab_size, opts.causal_shift)
    device, stream, *rest = _args(logits, target, shape, shard, vocab_size, None, weight, opts)
    upstream = _launch.upstream_of(upstream)
    entropies = _row_buffer("entropy", entropy, torch.float32, target.numel())
    e_up = None
    if entropy_upstream is not None:
        entropy_upstream = _launch.upstream_of(entropy_upstream)
        e_up = (entropy_upstream.data_ptr(), entropy_upstream.numel())
    with _launch._on(logits.device.index):
        _xent.shard_grad(
            device, stream, *rest, (stats.data_ptr(), stats.numel()),
            (upstream.data_ptr(), upstream.numel()), entropies, e_up,
        )


# The steps as PyTorch custom operators, for ``torch.compile`` (eager calls skip them): each
# takes the options as ``_ops.option_args`` gives them after ``vocab_start, vocab_size, world``.


def _step_kw(vocab_start, vocab_size, world, weight, option_values):
    kw = dict(vocab_start=vocab_start, vocab_size=vocab_size, weight=weight,
              opts=_ops.opts_of(*option_values))
    if world is not None:
        kw["world"] = world
    return kw


@torch.library.custom_op("xent::shard_stats", mutates_args=())
def _shard_stats_op(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], predicting: bool, entropic: bool,
    vocab_start: int, vocab_size: int, world: int, ignore_index: int, reduction: str, grad_scale: float,
    causal_shift: bool, label_smoothing: float, lse_square_scale: float, softcap: float,
    return_token_accuracy: bool,
) -> Tensor:
    """Step 1: this rank's values for the all-gather."""
    option_values = (ignore_index, reduction, grad_scale, causal_shift, label_smoothing,
                     lse_square_scale, softcap, return_token_accuracy)
    kw = _step_kw(vocab_start, vocab_size, world, weight, option_values)
    return shard_stats(logits, target, predicted=predicting, entropy=entropic, **kw)


@_shard_stats_op.register_fake
def _(logits, target, weight, predicting, entropic, vocab_start, vocab_size, world, *option_values):
    # A row's words depend on the shard chunking of the widest shard, not on the rows
    # (`ShardLayout::words`): ask the extension for one row's, in plain ints.
    index = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    opts = _launch.checked(_ops.opts_of(*option_values))
    per_row = _xent.shard_words(_launch.device(index), 1, vocab_size, world,
                                str(logits.dtype).rpartition(".")[2], opts, predicting, entropic)
    return logits.new_empty(target.numel() * per_row, dtype=torch.float32)


def _loss_step(logits, target, gathered, fused, predicting, entropic, kw):
    """Step 3 as the autograd function runs it, eagerly or as an operator: (stats, the predicted
    tokens, the entropies; each empty when not asked for)."""
    predicted = torch.empty(target.numel() if predicting else 0, dtype=torch.int64, device=logits.device)
    entropy = torch.empty(target.numel() if entropic else 0, dtype=torch.float32, device=logits.device)
    stats = shard_loss(logits, target, gathered, fused=fused, predicted=predicted if predicting else None,
                       entropy=entropy if entropic else None, **kw)
    return stats, predicted, entropy


def _shard_loss_operator(name: str, fused: bool):
    """Step 3 as the operator ``xent::{name}``: (stats, predicted tokens, entropies; each of the
    last two an empty tensor when not asked for); with ``fused`` the gradient of
    ``grad_scale · loss`` written over the logits (an operator of its own, as it alone writes
    into them)."""

    def step(
        logits: Tensor, target: Tensor, weight: Optional[Tensor], gathered: Tensor, predicting: bool,
        entropic: bool, vocab_start: int, vocab_size: int, world: int, ignore_index: int, reduction: str,
        grad_scale: float, causal_shift: bool, label_smoothing: float, lse_square_scale: float,
        softcap: float, return_token_accuracy: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        option_values = (ignore_index, reduction, grad_scale, causal_shift, label_smoothing,
                         lse_square_scale, softcap, return_token_accuracy)
        kw = _step_kw(vocab_start, vocab_size, world, weight, option_values)
        return _loss_step(logits, target, gathered, fused, predicting, entropic, kw)

    def fake(logits, target, weight, gathered, predicting, entropic, *option_args):
        entropy = target.new_empty(target.numel() if entropic else 0, dtype=torch.float32)
        return _ops.fake_stats(target, option_args[-1]), _ops.fake_predicted(target, predicting), entropy

    op = torch.library.custom_op(f"xent::{name}", step, mutates_args=("logits",) if fused else ())
    op.register_fake(fake)
    return op


_shard_loss_op = _shard_loss_operator("shard_loss", fused=False)
_shard_loss_fused_op = _shard_loss_operator("shard_loss_fused", fused=True)


@torch.library.custom_op("xent::shard_grad", mutates_args=())
def _shard_grad_op(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor, upstream: Tensor,
    vocab_start: int, vocab_size: int, ignore_index: int, reduction: str, grad_scale: float,
    causal_shift: bool, label_smoothing: float, lse_square_scale: float, softcap: float,
    return_token_accuracy: bool, entropy: Optional[Tensor] = None, entropy_upstream: Optional[Tensor] = None,
) -> Tensor:
    """Two-phase step 4 into a new tensor (a copy of the logits the kernel writes over: an
    operator may not write into its input, a tensor saved for backward); with
    ``entropy_upstream``, the gradient of the forward's ``entropy`` too."""
    option_values = (ignore_index, reduction, grad_scale, causal_shift, label_smoothing,
                     lse_square_scale, softcap, return_token_accuracy)
    grad = logits.clone(memory_format=torch.contiguous_format)
    shard_grad(grad, target, stats, upstream, entropy=entropy, entropy_upstream=entropy_upstream,
               **_step_kw(vocab_start, vocab_size, None, weight, option_values))
    return grad


@_shard_grad_op.register_fake
def _(logits, target, weight, stats, upstream, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _all_gather(send, world, group):
    """Every rank's values in rank order, as the compiler traces it (functional collectives)."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_gather_tensor(send, 0, group if group is not None else dist.group.WORLD)


class _VocabParallel(torch.autograd.Function):
    """``apply(logits, target, weight, opts, vocab_start, vocab_size, group, two_phase, predicting,
    want_entropy)`` -> ``(loss, stats, predicted, entropy)``: the loss, differentiable, and with
    ``want_entropy`` each row's entropy over the whole vocabulary, differentiable in the two-phase
    mode (the backward adds its gradient in the same pass); a fused forward has written the
    loss's gradient over the logits, so a gradient reaching its entropies raises."""

    @staticmethod
    def forward(ctx, logits, target, weight, opts, vocab_start, vocab_size, group, two_phase, predicting,
                want_entropy=False):
        ctx.set_materialize_grads(False)
        import torch.distributed as dist

        world = dist.get_world_size(group)
        fused = ctx.needs_input_grad[0] and not two_phase
        if torch.compiler.is_compiling():
            args = (vocab_start, vocab_size, world, *_ops.option_args(opts))
            send = _shard_stats_op(logits, target, weight, predicting, want_entropy, *args)
            gathered = _all_gather(send, world, group)
            op = _shard_loss_fused_op if fused else _shard_loss_op
            stats, predicted, entropy = op(logits, target, weight, gathered, predicting, want_entropy, *args)
        else:
            kw = dict(vocab_start=vocab_start, vocab_size=vocab_size, world=world, weight=weight, opts=opts)
            send = shard_stats(logits, target, predicted=predicting, entropy=want_entropy, **kw)
            gathered = torch.empty(world * send.numel(), dtype=torch.float32, device=send.device)
            dist.all_gather_into_tensor(gathered, send, group=group)
            stats, predicted, entropy = _loss_step(logits, target, gathered, fused, predicting, want_entropy, kw)
            if fused:
                torch.autograd.graph.increment_version(logits)
        if fused:
            ctx.save_for_backward(logits.detach(), target)
        elif ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits.detach(), target, weight, stats, entropy if want_entropy else None)
        ctx.kw = dict(vocab_start=vocab_start, vocab_size=vocab_size, opts=opts)
        ctx.two_phase = two_phase
        ctx.mark_non_differentiable(stats, predicted)
        # As in `XentFunction`: under torch.compile a fused call's entropies carry no gradient.
        ctx.entropy_grad = want_entropy and (two_phase or not torch.compiler.is_compiling())
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return loss_of(stats, target, opts), stats, predicted, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_predicted, grad_entropy):
        nones = (None,) * 9
        if not ctx.entropy_grad:
            grad_entropy = None
        if (grad_loss is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
            return (None,) + nones
        if grad_entropy is not None and not ctx.two_phase:
            raise RuntimeError(
                "xent: the entropy's gradient needs the two-phase mode (the fused forward wrote the "
                "loss's gradient over the logits): call vocab_parallel_cross_entropy with "
                "two_phase=True or None, or detach the entropy"
            )
        compiling = torch.compiler.is_compiling()
        if grad_loss is None:  # only the entropy is differentiated: the loss's upstream is 0
            upstream = torch.zeros(1, dtype=torch.float32, device=grad_entropy.device)
        else:
            upstream = _launch.upstream_of(grad_loss)
        if ctx.two_phase:
            logits, target, weight, stats, entropy = ctx.saved_tensors
            entropy_upstream = None if grad_entropy is None else _launch.upstream_of(grad_entropy)
            if entropy_upstream is None:
                entropy = None
            if compiling:
                kw = ctx.kw
                args = (kw["vocab_start"], kw["vocab_size"], *_ops.option_args(kw["opts"]))
                grad = _shard_grad_op(logits, target, weight, stats, upstream, *args, entropy, entropy_upstream)
                return (grad,) + nones
            shard_grad(logits, target, stats, upstream, weight=weight, entropy=entropy,
                       entropy_upstream=entropy_upstream, **ctx.kw)
            torch.autograd.graph.increment_version(logits)
            return (logits,) + nones
        grad, target = ctx.saved_tensors
        if compiling:
            _ops.scale_grad(grad, target, upstream)
            return (grad,) + nones
        index = grad.device.index
        rows = grad.numel() // grad.shape[-1]
        with _launch._on(index):
            _launch.device(index).scale_grad(
                _launch._stream(index), (grad.data_ptr(), grad.numel()),
                str(grad.dtype).rpartition(".")[2], (1, rows, grad.shape[-1], grad.shape[-1]),
                (upstream.data_ptr(), upstream.numel()),
            )
        return (grad,) + nones


def vocab_parallel_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group=None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    causal_shift: bool = False,
    grad_scale: float = 1.0,
    two_phase: Optional[bool] = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    return_entropy: bool = False,
):
    """The cross-entropy of logits split by vocabulary over the ranks of ``group``: ``input``
    ``[..., V_r]`` (this rank's classes ``[vocab_start, vocab_start + V_r)`` of ``vocab_size``,
    contiguous), ``target`` ``[...]`` global class ids, ``weight`` ``[vocab_size]`` on every rank.
    Returns the loss (the same on every rank), as ``xt.cross_entropy`` does: with
    ``return_z_loss``, ``return_token_accuracy``, ``return_predicted_tokens`` or
    ``return_entropy`` a ``CrossEntropyOutput``, whose token accuracy, predicted tokens and
    entropies are the whole vocabulary's (``torch.argmax`` and the softmax's entropy of the whole
    rows, the same on every rank).

    With ``two_phase=False`` the gradient of ``grad_scale · loss`` is written over ``input`` in the
    forward (one pass); with ``two_phase=True`` the forward leaves ``input`` alone and the backward
    writes the gradient of ``upstream · loss`` over it (a second pass, the upstream gradient
    rounded in once); ``reduction="none"`` needs it. The default, ``None``, is two-phase with
    ``return_entropy`` or ``reduction="none"`` and fused otherwise. The entropies are
    differentiable in the two-phase mode (an entropy bonus, ``loss - β·entropy.mean()``: their
    gradient ``p·(lse - H - y)`` is added in the backward's one pass, with no collective); with
    ``two_phase=False`` (entropies only logged) a gradient reaching them raises RuntimeError."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if two_phase is None:
        two_phase = return_entropy or reduction == "none"
    if isinstance(input, torch.Tensor) and input.requires_grad and not input.is_contiguous():
        raise ValueError("input must be contiguous: its gradient is written over it")
    if reduction == "none" and not two_phase:
        raise ValueError(
            "reduction='none' needs two_phase=True: the fused mode writes the gradient in the "
            "forward, before the per-row upstream gradient is known"
        )
    opts = _launch.Opts(
        ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale, softcap,
        return_token_accuracy,
    )
    if not torch.compiler.is_compiling():
        _launch.checked(opts)  # bad option values raise here, before anything runs
    if weight is not None:
        weight = weight.detach().to(torch.float32).contiguous()
    loss, stats, predicted, entropy = _VocabParallel.apply(
        input, target, weight, opts, vocab_start, vocab_size, group, two_phase, return_predicted_tokens,
        return_entropy,
    )
    return outputs(
        loss, stats, target, reduction, lse_square_scale, return_z_loss, return_token_accuracy, False,
        predicted.view(target.shape) if return_predicted_tokens else None,
        entropy.view(target.shape) if return_entropy else None,
    )
