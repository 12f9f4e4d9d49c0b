"""Linear layer + cross-entropy without the ``[N, V]`` logits: ``linear_cross_entropy(hidden,
weight, target)`` is ``cross_entropy(hidden @ weight.T + bias, target)``, computed one chunk of
rows at a time (cuBLASLt GEMMs around xent's kernel, on PyTorch's current stream), so that the
logits never exist whole. ``FusedLinearCrossEntropyLoss`` takes the arguments of Liger's
``LigerFusedLinearCrossEntropyLoss`` and can replace it.

Memory: one chunk of logits (``chunk_bytes``; by default an eighth of the whole logits, at least
64 MiB), cuBLASLt's workspace, and the gradients themselves. Modes (``two_phase``):

- fused (default for the mean and sum reductions): the forward computes the loss and every
  gradient (three GEMMs per chunk: the logits, ``grad_hidden = G·W``, ``grad_weight += Gᵀ·h``)
  and keeps the gradients until backward, which multiplies them by the upstream gradient only
  when it is not exactly 1 (decided on the device). Liger's scheme.
- two-phase (forced for ``reduction="none"``, whose per-row upstream cannot be applied to a
  weight gradient already summed over rows, and the default with ``return_entropy``, whose
  gradient is known only at backward): the forward computes the loss only (one GEMM per
  chunk) and keeps per-row statistics; the backward computes the logits again and the gradients
  of ``upstream · loss`` (four GEMMs in all; nothing of size ``[V, D]`` held between the two).

The weight gradient is accumulated over the chunks in the weight's dtype (as Liger's default
does: each chunk's sum rounded once, so ``N / chunk_rows`` roundings in all) or in
``accum_dtype=torch.float32``, converted to the weight's dtype in backward (an f32 ``[V, D]``
buffer more, exact to f32 accumulation). The hidden states' gradient is written once a row by
chunks of rows, but by blocks of the vocabulary it is summed over the blocks: the two-phase
backward sums it in an f32 ``[N, D]`` buffer converted once; so do the fused pass's chunks under
the card's crossover (``_xent.linear_row_scheme_rows``: 192 rows on an H200, 282 on an H100 SXM)
where that buffer is at most half their logits (the default budget's 64 MiB floor up to 4096
features at 1000 rows), else they sum it in the hidden states' dtype (one rounding a block)
unless ``accum_dtype=torch.float32``.

CPU tensors take the unfused path (``F.linear``, then ``xent.torch.cross_entropy`` on the f64
CPU reference). Under ``torch.compile`` the passes are the custom operators
``torch.ops.xent.linear_fused``, ``linear_forward``, ``linear_backward`` and ``linear_scale_grad``
(with fake implementations), so the graph does not break (``fullgraph=True`` compiles). The
compiler does not let an operator write into a tensor saved for backward: where the upstream
gradient must be applied to a fused pass's saved gradients, the compiled backward copies them
first (one more ``[V, D]`` and ``[N, D]`` buffer while it runs); eager calls scale them in place.
"""

from __future__ import annotations

import glob
import os
import site
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _xent
from . import _launch
from . import _ops
from .function import extras_of, loss_of
from .functional import CrossEntropyOutput, cross_entropy, outputs, predicted_tokens, scored_labels

_BLAS_OPEN: set = set()


def _cublaslt_dirs() -> list:
    """Folders where PyTorch's CUDA wheels keep libcublasLt (``nvidia/cu13/lib``,
    ``nvidia/cublas/lib``) beside torch itself and in the site folders."""
    roots = [os.path.dirname(os.path.dirname(torch.__file__))]
    try:
        roots += site.getsitepackages()
    except AttributeError:  # a virtualenv's old site module
        pass
    dirs = []
    for root in dict.fromkeys(roots):
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
    return dirs


def _device(index: int):
    """xent on CUDA device ``index`` with cuBLASLt open (RuntimeError saying what was tried)."""
    handle = _launch.device(index)
    if index not in _BLAS_OPEN:
        _xent.open_cublaslt(handle, _cublaslt_dirs())
        _BLAS_OPEN.add(index)
    return handle


def _buffer(tensor: Optional[torch.Tensor]):
    return None if tensor is None else (tensor.data_ptr(), tensor.numel())


def _dtype(tensor: torch.Tensor) -> str:
    return _dtype_name(tensor.dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    """The extension's name of a dtype (``bfloat16``, ``float32``, ...)."""
    return str(dtype).rpartition(".")[2]


class _Shard(NamedTuple):
    """This rank's part of a head split by vocabulary (``xent.torch.linear_parallel``): classes
    ``[vocab_start, vocab_start + V_r)`` of ``vocab_size``, rank ``rank`` of the ``world`` ranks
    of ``group``. ``check_widths`` (the default split, compiled): the operators check the ranks'
    shards to be of one width before their pass, as eager calls do before the call;
    ``reduce_input_grad``: the hidden states' gradient summed over the ranks (one ``all_reduce``)."""

    vocab_start: int
    vocab_size: int
    rank: int
    world: int
    group: object
    check_widths: bool
    reduce_input_grad: bool


class _Call:
    """A checked call on CUDA tensors: 2-D contiguous hidden states, weight, bias, flat labels,
    float32 class weights, and the shape ``(batch, seq_len, hidden, vocab)``."""

    def __init__(self, hidden, weight, target, bias, ce_weight, shape):
        self.hidden, self.weight, self.target, self.bias = hidden, weight, target, bias
        self.ce_weight, self.shape = ce_weight, shape

    def inputs(self):
        return (
            _buffer(self.hidden),
            _buffer(self.weight),
            _buffer(self.bias),
            _dtype(self.hidden),
            _buffer(self.target),
            _dtype(self.target),
            self.shape,
            _buffer(self.ce_weight),
        )


def _run(call: _Call, opts, pass_name, stats, chunk_bytes, upstream=None, grads=(False, False, False),
         accum_dtype=None, predicted=None, entropy=None, entropy_upstream=None, shard=None, grad_in_place=False):
    """Enqueues one pass; returns the gradients it wrote (hidden, weight, bias; None where not
    asked for). With ``predicted`` (``[rows]`` int64; a forward or fused pass) each scored row's
    first maximal logit's class goes there too, and with ``entropy`` (``[rows]`` float32) its
    entropy. A backward pass with ``entropy_upstream`` (``[rows]`` float32) adds the gradient of
    the forward's ``entropy`` times it. ``shard`` (a ``_Shard``): the head is split by vocabulary,
    each chunk's summaries all-gathered over the shard's group; the hidden states' gradient is
    then this rank's part (``_reduce_input_grad`` sums it). ``grad_in_place``: the hidden states
    are the caller's own (a copy), so a fused pass of the whole head whose chunks take the row
    scheme writes their gradient over them (``RawLinearGrads::in_place``: the gradient GEMMs of
    a chunk one after the other) instead of into ``[N, D]`` more. The scratch comes from
    PyTorch's allocator and goes back to its cache after."""
    device = call.hidden.device
    index = device.index
    handle = _device(index)
    checked = _launch.checked(opts)
    inputs = call.inputs()
    split = None if shard is None else (shard.vocab_start, shard.vocab_size, shard.world)
    chunk_rows, logits_bytes, gemm_bytes, labels_bytes, ones_len, workspace_len, gather_words = (
        _xent.linear_scratch(handle, *inputs, checked, pass_name, chunk_bytes, split,
                             (predicted is not None, entropy is not None))
    )
    want_h, want_w, want_b = grads
    rows = call.hidden.shape[0]
    # In place from the floor (``_rows_budget`` decided it so); else by rows from the card's
    # crossover, and by blocks of the vocabulary below it (``Scheme::of``).
    in_place = grad_in_place and pass_name == "fused" and shard is None and _row_scheme(chunk_rows, rows)
    by_rows = in_place or _row_scheme(chunk_rows, rows, _xent.linear_row_scheme_rows(handle))
    grad_dtype = accum_dtype or call.weight.dtype
    h_dtype = _grad_hidden_dtype(call.hidden.dtype, accum_dtype == torch.float32, pass_name == "backward")
    rounded_h = None  # the dtype an f32 sum of the hidden states' gradient is converted to
    if want_h and pass_name == "fused" and h_dtype != torch.float32 and not by_rows:
        # By blocks of the vocabulary: the sum in f32, where its buffer is no more than half the
        # chunks' logits.
        width = call.weight.shape[0] if shard is None else -(-shard.vocab_size // shard.world)
        if _f32_sum_fits(rows, call.hidden.shape[1], width, call.hidden.dtype, chunk_bytes):
            rounded_h, h_dtype = h_dtype, torch.float32
    u8 = dict(dtype=torch.uint8, device=device)
    logits = torch.empty(max(logits_bytes, 1), **u8)
    gemm = torch.empty(gemm_bytes, **u8)
    labels = torch.empty(labels_bytes, **u8) if labels_bytes else None
    ones = torch.ones(ones_len, dtype=call.hidden.dtype, device=device) if ones_len else None
    workspace = torch.empty(workspace_len, dtype=torch.float32, device=device) if workspace_len else None
    grad_h = (call.hidden.detach() if in_place else torch.empty(call.hidden.shape, dtype=h_dtype, device=device)
              ) if want_h else None
    grad_w = torch.empty(call.weight.shape, dtype=grad_dtype, device=device) if want_w else None
    grad_b = torch.empty(call.bias.shape, dtype=grad_dtype, device=device) if want_b else None

    def typed(tensor):
        return None if tensor is None else (_buffer(tensor), _dtype(tensor))

    gather = None
    if shard is not None:
        import torch.distributed as dist

        world = shard.world
        send = torch.empty(max(gather_words, 1), dtype=torch.float32, device=device)
        recv = torch.empty(max(world * gather_words, 1), dtype=torch.float32, device=device)

        def gather_chunk(count):
            # A chunk's summaries: `count` words from every rank, in rank order.
            dist.all_gather_into_tensor(recv[: world * count], send[:count], group=shard.group)

        gather = (shard.rank, gather_chunk, _buffer(send), _buffer(recv))
    with _launch._on(index):
        _xent.linear(
            handle, _launch._stream(index), *inputs, checked, pass_name, _buffer(upstream),
            _buffer(stats), _buffer(workspace), (typed(grad_h), typed(grad_w), typed(grad_b), False),
            (chunk_rows, _buffer(logits), _buffer(gemm), _buffer(labels), _buffer(ones)),
            _buffer(predicted), _buffer(entropy), _buffer(entropy_upstream), split, gather,
        )
    if rounded_h is not None:
        # The chunks' scratch goes back to the allocator first (stream-ordered: the conversion
        # runs after the call), so the conversion's output takes its place, not more.
        del logits, gemm
        grad_h = grad_h.to(rounded_h)
    return grad_h, grad_w, grad_b


def _f32_sum_fits(rows, features, width, dtype, chunk_bytes):
    """Whether a fused pass whose chunks take the gradients by blocks of the vocabulary (``width``
    classes a chunk's row, a shard's by the even split) sums the hidden states' gradient over
    them in an f32 ``[rows, features]`` buffer (converted once to ``dtype`` at the end) rather
    than in ``dtype`` (one rounding a block): where the buffer is no more than half the chunks'
    logits (``chunk_bytes`` or the default budget's). It is a gradient, beside the chunks as the
    gradients are, not taken out of them: that made the blocks smaller and the pass 6-12% slower
    on an H100 at 1000-1535 x 4096 x 256000 bf16, where beside them it costs no time (session
    62). At the default budget these passes come from its 64 MiB floor (an eighth of the logits
    under the card's crossover): 1000 x 4096 x 256000 bf16 holds 16 MiB more beside 60 MiB of
    logits."""
    total = _xent.linear_chunks_budget(rows, width, _dtype_name(dtype), chunk_bytes)
    return 2 * 4 * rows * features <= _xent.linear_logits_within(total)


def _grad_hidden_dtype(hidden_dtype, accum_f32, backward):
    """The dtype a pass returns the hidden states' gradient in: f32 where it may be summed over
    blocks of the vocabulary (the two-phase backward always is; a fused pass is in chunks under
    the card's crossover), so that a 16-bit one rounds once, when backward converts it (measured on an H100,
    33 blocks: 1.6-3.0% of the largest value in bfloat16 against 0.0002-0.007% in f32), and for
    a fused pass only with ``accum_dtype=torch.float32`` (the operators' fakes cannot know its
    chunks); else the hidden states' dtype. A fused pass of such chunks without it sums in f32
    anyway where ``_f32_sum_fits``, and converts before it returns."""
    return torch.float32 if accum_f32 or backward else hidden_dtype


def _row_scheme(chunk_rows, rows, from_rows=None) -> bool:
    """Whether a fused pass of ``rows`` rows by chunks of ``chunk_rows`` takes the row scheme
    (``Scheme::of`` in Rust) where it does from ``from_rows`` rows a chunk (a card's
    ``_xent.linear_row_scheme_rows``), or, with None, may (``_xent.linear_row_scheme_min_rows()``,
    192): the fewest rows a chunk of the only scheme that can write the hidden states' gradient
    over them, which such a pass takes from there on any card."""
    if from_rows is None:
        from_rows = _xent.linear_row_scheme_min_rows()
    return chunk_rows >= from_rows or chunk_rows >= rows


def _scale_grad(grad: torch.Tensor, upstream: torch.Tensor) -> None:
    """Multiplies a fused pass's gradient by the upstream gradient in place, on the device (where
    the factor is exactly 1 the kernel returns without touching it)."""
    if grad.numel() == 0:  # a call with no rows: nothing to scale
        return
    index = upstream.device.index
    handle = _device(index)
    rows = grad.shape[0]
    shape = (1, rows, grad.numel() // rows, grad.numel() // rows)
    with _launch._on(index):
        handle.scale_grad(_launch._stream(index), _buffer(grad), _dtype(grad), shape, _buffer(upstream))


def _forward_pass(call: _Call, opts, fused, want, accum_dtype, chunk_bytes, want_predicted, want_entropy,
                  shard=None, grad_in_place=False):
    """The loss's pass over the chunks (``fused``: with the gradients ``want`` asks for, the hidden
    states' summed over the ranks of a ``shard`` that asks for it, and with ``grad_in_place``
    written over the hidden states where ``_run`` can); returns the stats, the gradients (None
    where not computed), the predicted tokens and the entropies (each None where not asked for).
    Eager calls and the custom operators both run it."""
    stats = _stats_buffer(call.target, opts.return_token_accuracy)
    predicted = _predicted_buffer(call.target) if want_predicted else None
    entropy = torch.empty(call.target.numel(), dtype=torch.float32, device=call.target.device) if want_entropy else None
    if fused:
        grads = _run(call, opts, "fused", stats, chunk_bytes, grads=want, accum_dtype=accum_dtype,
                     predicted=predicted, entropy=entropy, shard=shard, grad_in_place=grad_in_place)
        _reduce_input_grad(grads[0], shard)
    else:
        _run(call, opts, "forward", stats, chunk_bytes, predicted=predicted, entropy=entropy, shard=shard)
        grads = (None, None, None)
    return stats, grads, predicted, entropy


def _backward_pass(call: _Call, opts, stats, upstream, want, accum_dtype, chunk_bytes, entropy, entropy_upstream,
                   shard=None):
    """The two-phase backward (each chunk's logits again; on a ``shard`` no collective but the
    hidden states' all-reduce, where it asks for one): the gradients ``want`` asks for (None
    where not)."""
    grads = _run(call, opts, "backward", stats, chunk_bytes, upstream=upstream, grads=want,
                 accum_dtype=accum_dtype, entropy=entropy, entropy_upstream=entropy_upstream, shard=shard)
    _reduce_input_grad(grads[0], shard)
    return grads


def _reduce_input_grad(grad_hidden, shard):
    """A shard's part of the hidden states' gradient summed over its ranks, in place (where the
    shard asks for it)."""
    if grad_hidden is None or shard is None or not shard.reduce_input_grad or shard.world == 1:
        return
    import torch.distributed as dist

    dist.all_reduce(grad_hidden, group=shard.group)


# ---------------------------------------------------------------------------------------------
# The passes as PyTorch custom operators (`torch.ops.xent.linear_*`), with fake implementations,
# so that `torch.compile` traces through `linear_cross_entropy` and
# `vocab_parallel_linear_cross_entropy` (no graph break: `fullgraph=True` compiles) and sees what
# each pass writes. Eager calls go through `_forward_pass` and `_backward_pass` directly. A
# gradient not asked for, and the predicted tokens and entropies when not asked for, come back as
# empty tensors (an operator's outputs are tensors). The last five arguments are a vocabulary
# shard's (`_shard_args`): `vocab_start, vocab_size, group_name` (empty: the whole head; the
# group by its name, `ProcessGroup.group_name`, which Dynamo reads as a constant),
# `check_widths` and `reduce_input_grad`; the operators run the shard's collectives inside,
# eagerly, where the compiler does not look.
# ---------------------------------------------------------------------------------------------


def _op_call(hidden, weight, target, bias, ce_weight, batch, seq_len):
    return _Call(hidden, weight, target, bias, ce_weight, (batch, seq_len, hidden.shape[1], weight.shape[0]))


def _op_shard(vocab_start, vocab_size, group_name, check_widths, reduce_input_grad, weight) -> Optional[_Shard]:
    """An operator's shard (None for the whole head: no group name): the group resolved from its
    name; with ``check_widths`` the ranks' shards checked to be of one width first."""
    if not group_name:
        return None
    from .linear_parallel import _resolved_shard

    return _resolved_shard(vocab_start, vocab_size, group_name, check_widths, reduce_input_grad, weight)


def _shard_args(shard: Optional[_Shard]) -> tuple:
    """The operators' last five arguments for ``shard`` (its defaults for the whole head); read
    under ``torch.compile`` only."""
    if shard is None:
        return ()
    return (shard.vocab_start, shard.vocab_size, _group_name(shard.group), shard.check_widths,
            shard.reduce_input_grad)


def _group_name(group) -> str:
    """The name the operators take a group by (None: the default group)."""
    import torch.distributed as dist

    return (group if group is not None else dist.group.WORLD).group_name


def _or_empty(tensor: Optional[torch.Tensor], like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype) if tensor is None else tensor


def _fake_grads(hidden, weight, bias, want_hidden, want_weight, want_bias, accum_f32, backward):
    """The gradients a pass returns (``backward``: the two-phase backward's), as the fake
    implementations make them."""
    grad_dtype = torch.float32 if accum_f32 else weight.dtype
    return (
        hidden.new_empty(hidden.shape, dtype=_grad_hidden_dtype(hidden.dtype, accum_f32, backward)) if want_hidden
        else hidden.new_empty(0),
        weight.new_empty(weight.shape, dtype=grad_dtype) if want_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape, dtype=grad_dtype) if want_bias and bias is not None else hidden.new_empty(0),
    )


@torch.library.custom_op("xent::linear_fused", mutates_args=())
def _linear_fused_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ce_weight: Optional[Tensor],
    ignore_index: int, reduction: str, grad_scale: float, causal_shift: bool, label_smoothing: float,
    lse_square_scale: float, softcap: float, return_token_accuracy: bool, batch: int, seq_len: int,
    want_hidden: bool, want_weight: bool, want_bias: bool, accum_f32: bool, chunk_bytes: int,
    want_predicted: bool, want_entropy: bool, vocab_start: int = 0, vocab_size: int = 0, group_name: str = "",
    check_widths: bool = False, reduce_input_grad: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused pass: the stats, the gradients asked for (of ``grad_scale * loss``; a shard's hidden
    states' summed over the ranks where ``reduce_input_grad``), and the predicted tokens and
    entropies if asked for."""
    opts = _ops.opts_of(ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
                        softcap, return_token_accuracy)
    shard = _op_shard(vocab_start, vocab_size, group_name, check_widths, reduce_input_grad, weight)
    stats, grads, predicted, entropy = _forward_pass(
        _op_call(hidden, weight, target, bias, ce_weight, batch, seq_len), opts, True,
        (want_hidden, want_weight, want_bias), torch.float32 if accum_f32 else None, chunk_bytes or None,
        want_predicted, want_entropy, shard,
    )
    return (stats, *(_or_empty(g, hidden) for g in grads), _or_empty(predicted, target, torch.int64),
            _or_empty(entropy, target, torch.float32))


@_linear_fused_op.register_fake
def _(hidden, weight, target, bias, ce_weight, ignore_index, reduction, grad_scale, causal_shift,
      label_smoothing, lse_square_scale, softcap, return_token_accuracy, batch, seq_len, want_hidden,
      want_weight, want_bias, accum_f32, chunk_bytes, want_predicted, want_entropy, vocab_start=0, vocab_size=0,
      group_name="", check_widths=False, reduce_input_grad=False):
    grads = _fake_grads(hidden, weight, bias, want_hidden, want_weight, want_bias, accum_f32, False)
    return (_ops.fake_stats(target, return_token_accuracy), *grads, _ops.fake_predicted(target, want_predicted),
            _fake_entropy(target, want_entropy))


@torch.library.custom_op("xent::linear_forward", mutates_args=())
def _linear_forward_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ce_weight: Optional[Tensor],
    ignore_index: int, reduction: str, grad_scale: float, causal_shift: bool, label_smoothing: float,
    lse_square_scale: float, softcap: float, return_token_accuracy: bool, batch: int, seq_len: int,
    chunk_bytes: int, want_predicted: bool, want_entropy: bool, vocab_start: int = 0, vocab_size: int = 0,
    group_name: str = "", check_widths: bool = False, reduce_input_grad: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Two-phase forward: the stats (with the per-row statistics backward needs), and the
    predicted tokens and entropies if asked for (``reduce_input_grad`` does not apply: no
    gradient)."""
    opts = _ops.opts_of(ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
                        softcap, return_token_accuracy)
    shard = _op_shard(vocab_start, vocab_size, group_name, check_widths, reduce_input_grad, weight)
    stats, _, predicted, entropy = _forward_pass(
        _op_call(hidden, weight, target, bias, ce_weight, batch, seq_len), opts, False, (False, False, False),
        None, chunk_bytes or None, want_predicted, want_entropy, shard,
    )
    return stats, _or_empty(predicted, target, torch.int64), _or_empty(entropy, target, torch.float32)


@_linear_forward_op.register_fake
def _(hidden, weight, target, bias, ce_weight, ignore_index, reduction, grad_scale, causal_shift,
      label_smoothing, lse_square_scale, softcap, return_token_accuracy, batch, seq_len, chunk_bytes,
      want_predicted, want_entropy, vocab_start=0, vocab_size=0, group_name="", check_widths=False,
      reduce_input_grad=False):
    return (_ops.fake_stats(target, return_token_accuracy), _ops.fake_predicted(target, want_predicted),
            _fake_entropy(target, want_entropy))


@torch.library.custom_op("xent::linear_backward", mutates_args=())
def _linear_backward_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ce_weight: Optional[Tensor],
    stats: Tensor, upstream: Tensor, ignore_index: int, reduction: str, grad_scale: float,
    causal_shift: bool, label_smoothing: float, lse_square_scale: float, softcap: float,
    return_token_accuracy: bool, batch: int, seq_len: int, want_hidden: bool, want_weight: bool,
    want_bias: bool, accum_f32: bool, chunk_bytes: int, entropy: Optional[Tensor] = None,
    entropy_upstream: Optional[Tensor] = None, vocab_start: int = 0, vocab_size: int = 0, group_name: str = "",
    check_widths: bool = False, reduce_input_grad: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Two-phase backward: the logits again, chunk by chunk, and the gradients asked for of
    ``upstream · loss`` (plus ``entropy_upstream · entropy``, the forward's entropies, where
    given; a shard's hidden states' summed over the ranks where ``reduce_input_grad``)."""
    opts = _ops.opts_of(ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
                        softcap, return_token_accuracy)
    shard = _op_shard(vocab_start, vocab_size, group_name, check_widths, reduce_input_grad, weight)
    grads = _backward_pass(_op_call(hidden, weight, target, bias, ce_weight, batch, seq_len), opts, stats, upstream,
                           (want_hidden, want_weight, want_bias), torch.float32 if accum_f32 else None,
                           chunk_bytes or None, entropy, entropy_upstream, shard)
    return tuple(_or_empty(g, hidden) for g in grads)


@_linear_backward_op.register_fake
def _(hidden, weight, target, bias, ce_weight, stats, upstream, ignore_index, reduction, grad_scale,
      causal_shift, label_smoothing, lse_square_scale, softcap, return_token_accuracy, batch, seq_len,
      want_hidden, want_weight, want_bias, accum_f32, chunk_bytes, entropy=None, entropy_upstream=None,
      vocab_start=0, vocab_size=0, group_name="", check_widths=False, reduce_input_grad=False):
    return _fake_grads(hidden, weight, bias, want_hidden, want_weight, want_bias, accum_f32, True)


@torch.library.custom_op("xent::linear_scale_grad", mutates_args=("grad",))
def _linear_scale_grad_op(grad: Tensor, upstream: Tensor) -> None:
    """A fused pass's gradient times the upstream gradient, in place."""
    _scale_grad(grad, upstream)


@_linear_scale_grad_op.register_fake
def _(grad, upstream):
    return None


def _stats_buffer(target, accuracy):
    return torch.empty(_xent.stats_len(target.numel(), accuracy), dtype=torch.float32, device=target.device)


def _fake_entropy(target, want: bool) -> Tensor:
    """The entropies as an operator returns them: ``[rows]`` float32, or empty when not asked for."""
    return target.new_empty(target.numel() if want else 0, dtype=torch.float32)


def _predicted_buffer(target):
    """Where the GPU path writes the predicted tokens: ``[rows]`` int64 (-1 where not scored)."""
    return torch.empty(target.numel(), dtype=torch.int64, device=target.device)


class LinearXentFunction(torch.autograd.Function):
    """``apply(hidden, weight, target, bias, ce_weight, opts, shape, two_phase, accum_dtype,
    chunk_bytes, want_predicted, want_entropy, shard, grad_in_place)`` -> ``(loss, stats,
    predicted, entropy)``
    on checked CUDA tensors (see ``linear_cross_entropy``); ``predicted`` is ``[rows]`` int64, the
    predicted tokens, where ``want_predicted``, and ``entropy`` ``[rows]`` float32, the entropies,
    where ``want_entropy`` (else empty). ``shard``: None for the whole head, or a ``_Shard``, this
    rank's part of a head split by vocabulary (``vocab_parallel_linear_cross_entropy``). Under
    ``torch.compile`` the passes are the custom operators above."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ce_weight, opts, shape, two_phase, accum_dtype,
                chunk_bytes, want_predicted, want_entropy, shard, grad_in_place=False):
        ctx.set_materialize_grads(False)
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[3])
        fused = any(want) and not two_phase
        compiling = torch.compiler.is_compiling()
        if compiling:
            values = (*_ops.option_args(opts), shape[0], shape[1])
            ctx.shard_args = _shard_args(shard)
            if fused:
                stats, *grads, predicted, entropy = _linear_fused_op(
                    hidden, weight, target, bias, ce_weight, *values, *want, accum_dtype == torch.float32,
                    chunk_bytes or 0, want_predicted, want_entropy, *ctx.shard_args,
                )
                grads = [g if w else None for g, w in zip(grads, want)]
            else:
                stats, predicted, entropy = _linear_forward_op(
                    hidden, weight, target, bias, ce_weight, *values, chunk_bytes or 0, want_predicted,
                    want_entropy, *ctx.shard_args,
                )
        else:
            call = _Call(hidden, weight, target, bias, ce_weight, shape)
            stats, grads, predicted, entropy = _forward_pass(call, opts, fused, want, accum_dtype, chunk_bytes,
                                                             want_predicted, want_entropy, shard, grad_in_place)
            predicted = _or_empty(predicted, target, torch.int64)
            entropy = _or_empty(entropy, target, torch.float32)
        if fused:
            ctx.save_for_backward(*grads)
        elif any(want):
            ctx.save_for_backward(hidden, weight, target, bias, ce_weight, stats, entropy if want_entropy else None)
        ctx.fused, ctx.want, ctx.opts, ctx.shape, ctx.shard = fused, want, opts, shape, shard
        ctx.accum_dtype, ctx.chunk_bytes, ctx.weight_dtype = accum_dtype, chunk_bytes, weight.dtype
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(stats, predicted)
        # As `XentFunction`: under torch.compile a fused pass's entropies carry no gradient.
        ctx.entropy_grad = want_entropy and (not fused or not compiling)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return loss_of(stats, target, opts), stats, predicted, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_predicted, grad_entropy):
        nones = (None,) * 10
        name = "linear_cross_entropy" if ctx.shard is None else "vocab_parallel_linear_cross_entropy"
        upstreams = _upstreams(ctx, grad_loss, grad_entropy, name)
        if upstreams is None:
            return (None, None, None, None) + nones
        upstream, entropy_upstream = upstreams
        if ctx.fused:
            grads = _scaled_saved_grads(ctx, upstream)
        else:
            hidden, weight, target, bias, ce_weight, stats, entropy = ctx.saved_tensors
            entropy = entropy if entropy_upstream is not None else None  # its gradient, where one came
            if torch.compiler.is_compiling():
                values = (*_ops.option_args(ctx.opts), ctx.shape[0], ctx.shape[1])
                # The widths were checked by the forward's operator.
                shard_args = (*ctx.shard_args[:3], False, *ctx.shard_args[4:]) if ctx.shard_args else ()
                out = _linear_backward_op(hidden, weight, target, bias, ce_weight, stats, upstream, *values,
                                          *ctx.want, ctx.accum_dtype == torch.float32, ctx.chunk_bytes or 0,
                                          entropy, entropy_upstream, *shard_args)
                grads = [g if w else None for g, w in zip(out, ctx.want)]
            else:
                call = _Call(hidden, weight, target, bias, ce_weight, ctx.shape)
                grads = _backward_pass(call, ctx.opts, stats, upstream, ctx.want, ctx.accum_dtype, ctx.chunk_bytes,
                                       entropy, entropy_upstream, ctx.shard)
        grad_h, grad_w, grad_b = _in_own_dtypes(grads, ctx.hidden_dtype, ctx.weight_dtype)
        return grad_h, grad_w, None, grad_b, *nones


def _upstreams(ctx, grad_loss, grad_entropy, name):
    """A linear autograd function's backward: ``(upstream, entropy_upstream)`` (``[1]`` or
    ``[rows]`` float32; the second None where no gradient reached the entropies), or None where
    there is nothing to compute. RuntimeError where the entropies' gradient reaches a fused pass
    (``name``: the function to call otherwise)."""
    if not ctx.entropy_grad:
        grad_entropy = None
    if (grad_loss is None and grad_entropy is None) or not any(ctx.want):
        return None
    if grad_entropy is not None and ctx.fused:
        raise RuntimeError(
            "xent: the entropy's gradient needs the two-phase mode (the fused pass computed the "
            f"gradients in the forward): call {name} with two_phase=True or None, or detach the "
            "entropy"
        )
    if grad_loss is None:  # only the entropy is differentiated: the loss's upstream is 0
        upstream = torch.zeros(1, dtype=torch.float32, device=grad_entropy.device)
    else:
        upstream = _launch.upstream_of(grad_loss)
    return upstream, None if grad_entropy is None else _launch.upstream_of(grad_entropy)


def _scaled_saved_grads(ctx, upstream):
    """A fused pass's saved gradients times the upstream gradient, on the device (where it is
    not exactly 1); in place eagerly, through the operator under ``torch.compile``."""
    grads = list(ctx.saved_tensors)
    scale = _linear_scale_grad_op if torch.compiler.is_compiling() else _scale_grad
    for grad in grads:
        if grad is not None:
            scale(grad, upstream)
    return grads


def _in_own_dtypes(grads, hidden_dtype, weight_dtype):
    """``(hidden, weight, bias)`` gradients with the hidden states' in their dtype and the weight's
    and bias's in the weight's (an f32 accumulator converted once)."""
    def cast(grad, dtype):
        return grad if grad is None or grad.dtype == dtype else grad.to(dtype)

    grad_h, grad_w, grad_b = grads
    return cast(grad_h, hidden_dtype), cast(grad_w, weight_dtype), cast(grad_b, weight_dtype)


def _check(hidden, weight, target, bias, ce_weight, causal_shift):
    """PyTorch's kinds of errors for bad tensors; returns them as the kernels take them and the
    shape ``(batch, seq_len, hidden, vocab)``."""
    for name, value in (("input", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in (("bias", bias), ("ce_weight", ce_weight)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"input of dtype {hidden.dtype} is not supported: expected float32, float16 or bfloat16")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(
            f"input ({hidden.dtype}), weight ({weight.dtype}) and bias "
            f"({None if bias is None else bias.dtype}) must have one dtype"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target of dtype {target.dtype} is not supported: expected int64 or int32 class indices")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"input {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected [..., D] and [V, D]"
        )
    vocab, d = weight.shape
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target {tuple(target.shape)} must have input's shape without its last dimension "
            f"({tuple(hidden.shape[:-1])})"
        )
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] = [{vocab}]")
    if ce_weight is not None and tuple(ce_weight.shape) != (vocab,):
        raise ValueError(f"ce_weight {tuple(ce_weight.shape)} must hold one weight per class ({vocab})")
    devices = {t.device for t in (hidden, weight, target, bias, ce_weight) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"every tensor must be on one device, got {sorted(map(str, devices))}")
    if causal_shift and hidden.dim() < 2:
        raise ValueError("causal_shift needs input of shape [..., seq_len, D]")
    rows = target.numel()
    seq_len = hidden.shape[-2] if causal_shift else rows
    batch = rows // seq_len if seq_len else 0
    if ce_weight is not None:
        ce_weight = ce_weight.detach().to(torch.float32).contiguous()
    return (
        hidden.reshape(rows, d).contiguous(),
        weight.contiguous(),
        target.reshape(rows).contiguous(),
        None if bias is None else bias.contiguous(),
        ce_weight,
        (batch, seq_len, d, vocab),
    )


def _autocast(input, weight, bias):
    """Under ``torch.autocast`` for the hidden states' device, the hidden states, weight and bias
    in autocast's dtype, as ``F.linear`` would take them (floating point other than float64; Liger's
    and Cut Cross-Entropy's losses do the same): an f32 master weight beside bf16 activations
    works, and the casts carry each gradient back in its tensor's own dtype. Otherwise as given."""
    if not isinstance(input, torch.Tensor) or not torch.is_autocast_enabled(input.device.type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        castable = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if castable and t.dtype != dtype else t

    return cast(input), cast(weight), cast(bias)


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
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
    check_labels: bool = False,
    use_token_scaling: bool = False,
    return_predicted_tokens: bool = False,
    skip_ignored: bool = True,
    return_entropy: bool = False,
):
    """Cross-entropy of ``input @ weight.T + bias`` against ``target`` without materialising the
    logits: ``input`` ``[..., D]`` hidden states, ``weight`` ``[V, D]`` (the LM head), ``bias``
    ``[V]``, all float32, float16 or bfloat16 of one dtype; ``target`` ``input.shape[:-1]`` class
    indices. Returns what ``xent.torch.cross_entropy`` returns for those logits (every option
    means the same; ``ce_weight`` is its ``weight``), differentiable in ``input``, ``weight`` and
    ``bias``.

    - Under ``torch.autocast``, ``input``, ``weight`` and ``bias`` are cast to autocast's dtype
      first, as ``F.linear`` would cast them (an f32 master weight beside bf16 activations, say;
      the gradients reach each tensor in its own dtype). Pass ``accum_dtype=torch.float32`` to
      sum an f32 master weight's gradient over the chunks in f32.
    - ``accum_dtype``: the weight and bias gradients' accumulator, and the hidden states' over
      blocks of the vocabulary in a fused pass (None: their own dtypes, but the hidden states'
      summed in f32 where its buffer is at most half the chunks' logits; ``torch.float32``: exact
      to f32, one [V, D] and one [N, D] f32 buffer more while they live). The two-phase backward
      always sums the hidden states' gradient in f32.
    - ``two_phase``: None picks fused for the mean and sum reductions, two-phase for none and
      with ``return_entropy`` (see the module's doc for each mode's cost).
    - ``chunk_bytes``: the memory of one chunk of logits (None: an eighth of the whole logits,
      at least 64 MiB); smaller saves memory and costs time.
    - ``return_predicted_tokens``: Liger's: also return each scored row's first maximal logit's
      class (``predicted_tokens`` of the ``CrossEntropyOutput``: int64, ``target``'s shape, -1
      for a row not scored), found on each chunk of logits before its gradient overwrites it (a
      read of the chunk more: 0.76 ms of kernel time in a 42 ms step at 8192 x 4096 x 128256).
    - ``use_token_scaling``: Liger's token scaling (TRL's ``loss_type="dft"``): each row's loss,
      z-loss part and gradient times the probability the row gives its label, ``softmax(x)[y]``
      of the (soft-capped) logits, taken as a constant (no gradient through it; 0 for rows not
      scored). The mean still divides by the scored rows (by the sum of their labels' class
      weights for the cross-entropy part with ``ce_weight``). Runs two-phase with a per-row
      upstream (four GEMMs a chunk, as ``reduction="none"``); class weights with the z-loss
      under the mean are refused (their two parts need different denominators).
    - ``return_entropy``: each scored row's entropy ``-Σ p·ln p`` over the softmax the loss
      scores (after the soft cap), in nats, as ``entropy`` of the ``CrossEntropyOutput``
      (float32, ``target``'s shape, 0 for a row not scored). Read from each chunk of logits
      before its gradient overwrites it, as the predicted tokens are: a read of the chunk more.
      Differentiable (an entropy bonus, as TRL's GRPO ``entropy_coef`` adds to its loss): the
      two-phase backward adds ``entropy_upstream·p·(lse - H - y)`` to each chunk's gradient
      before its GEMMs, so ``two_phase=None`` picks two-phase with it; with ``two_phase=False``
      (the fused pass, for entropies only logged or used as masks) a gradient reaching them
      raises RuntimeError.
    - ``skip_ignored`` (the default): only the scored rows (label not ``ignore_index`` after the
      causal shift: a fine-tuning batch's masked prompt and padding) go through the GEMMs, where
      that drops at least 1/16 of the rows; the results are laid out as the call's rows (0 for a
      row not scored, -1 for its predicted token) and equal those of every row up to the order
      of the sums. Counting the rows waits for the GPU once a call (``nonzero``), and the scored
      rows of ``input`` are copied: the copy (and a fused pass's gradient of it) comes out of
      the call's memory budget (``chunk_bytes`` or the default), so the chunks over the scored
      rows are smaller; where that would leave them less than half of it, a fused pass writes
      the gradient over the copy (its two gradient GEMMs then do not overlap; at Liger's 256-row
      chunks of a 128256-class, 4096-wide head, say), and otherwise every row is computed.
      Every row is computed, without counting, under ``torch.compile`` or CUDA graph capture (a
      count of rows would be a dynamic shape) and in calls of fewer than 2^35 products
      ``rows·D·V`` (where the wait costs more than the rows save). ``False``: every row, no
      wait.
    """
    opts = _launch.Opts(
        ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
        softcap, return_token_accuracy,
    )
    if not torch.compiler.is_compiling():
        # Bad option values raise here, before anything runs. Under torch.compile the operators
        # check them when they run: traced, this cached check of an extension type made Dynamo
        # warn twice.
        _launch.checked(opts)
    input, weight, bias = _autocast(input, weight, bias)
    if accum_dtype not in (None, torch.float32, weight.dtype):
        raise ValueError(f"accum_dtype must be None, torch.float32 or the weight's dtype, got {accum_dtype}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    common = dict(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, softcap=softcap, causal_shift=causal_shift,
        return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        return_predicted_tokens=return_predicted_tokens, grad_scale=grad_scale,
        check_labels=check_labels, return_entropy=return_entropy,
    )
    if skip_ignored and isinstance(input, torch.Tensor) and _may_wait(input):
        # Validated first, so errors name the call's own shapes.
        hidden, _, target_c, _, _, shape = _check(input, weight, target, bias, ce_weight, causal_shift)
        needs_grad = torch.is_grad_enabled() and input.requires_grad
        # A fused pass computes the gradients in the forward and keeps no hidden states for a
        # backward, so it may write the copy's gradient over the copy (``_rows_budget``).
        fused = not use_token_scaling and not _two_phase(two_phase, reduction, return_entropy)
        scored = _scored_rows(hidden, target_c.view(target.shape), ignore_index, causal_shift, shape[3],
                              chunk_bytes=chunk_bytes, needs_grad=needs_grad, fused=fused)
        if scored is not None:
            rows, labels, keep, rows_chunk_bytes, in_place = scored
            out = _every_row(
                rows, weight, labels, bias, ce_weight, opts._replace(causal_shift=False),
                dict(common, causal_shift=False), use_token_scaling, accum_dtype, two_phase, rows_chunk_bytes,
                grad_in_place=in_place,
            )
            return _laid_out(out, keep, target, reduction)
    return _every_row(input, weight, target, bias, ce_weight, opts, common, use_token_scaling, accum_dtype,
                      two_phase, chunk_bytes)


def _two_phase(two_phase, reduction, return_entropy) -> bool:
    """Whether a call runs two-phase: where asked, and where the backward takes an upstream it
    cannot know now (per row, or the entropies')."""
    if two_phase is None:
        two_phase = reduction == "none" or return_entropy
    return bool(two_phase) or reduction == "none"


def _every_row(input, weight, target, bias, ce_weight, opts, common, use_token_scaling, accum_dtype, two_phase,
               chunk_bytes, grad_in_place=False):
    """``linear_cross_entropy`` over every row of ``input`` (``common``: its keyword options);
    ``grad_in_place``: ``input`` is the call's own (a copy of the scored rows), so a fused pass
    may write its gradient over it (``_run``)."""
    if use_token_scaling:
        return _token_scaled(input, weight, target, bias, ce_weight, opts, common, accum_dtype, chunk_bytes)
    causal_shift = common["causal_shift"]
    if not isinstance(input, torch.Tensor) or not input.is_cuda:
        # The unfused path, on the CPU reference: the same values, O(N·V) memory.
        _check(input, weight, target, bias, ce_weight, causal_shift)
        logits = torch.nn.functional.linear(input, weight, bias)
        return cross_entropy(logits, target, ce_weight, **common)
    hidden, weight_c, target_c, bias_c, ce_weight_c, shape = _check(
        input, weight, target, bias, ce_weight, causal_shift
    )
    reduction, return_entropy = common["reduction"], common["return_entropy"]
    return_predicted_tokens = common["return_predicted_tokens"]
    loss, stats, predicted, entropy = LinearXentFunction.apply(
        hidden, weight_c, target_c, bias_c, ce_weight_c, opts, shape, _two_phase(two_phase, reduction, return_entropy),
        accum_dtype, chunk_bytes, return_predicted_tokens, return_entropy, None, grad_in_place,
    )
    if reduction == "none":
        loss = loss.view(target.shape)
    return outputs(
        loss, stats, target, reduction, common["lse_square_scale"], common["return_z_loss"],
        common["return_token_accuracy"], common["check_labels"],
        predicted.view(target.shape) if return_predicted_tokens else None,
        entropy.view(target.shape) if return_entropy else None,
    )


def _may_wait(tensor) -> bool:
    """Whether a call may wait for the GPU to count its rows: not while ``torch.compile`` traces it
    (a count of rows would be a dynamic shape) nor while a CUDA graph is captured."""
    if torch.compiler.is_compiling():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


# `_scored_rows`'s rows are copied: worth it where that drops at least this share of them.
_SKIP_AT_LEAST = 1 / 16

# A call of fewer products than this (rows x D x V, about 0.3 ms of the three GEMMs on an H100)
# takes every row without counting them: the wait for the GPU and the copies cost more than the
# rows could save (a step of 512 x 256 x 8192 took 0.98 ms with half its rows skipped against 0.60
# ms with every row, H100, session 51).
_SKIP_MIN_PRODUCTS = 1 << 35


def _scored_rows(hidden, target, ignore_index, causal, vocab, chunk_bytes=None, needs_grad=False, world=1,
                 fused=False):
    """For the loss of ``hidden`` ``[..., D]`` against ``target`` (``hidden.shape[:-1]``, shifted
    by one within each sequence where ``causal``: a sequence's last row scores nothing) over
    ``vocab`` classes split over ``world`` ranks (chunks of logits as wide as the even split's
    widest shard, as ``linear::shard_chunk_rows`` sizes them on every rank, so that every rank
    decides alike) under the call's ``chunk_bytes``: the scored rows alone (label not ``ignore_index``),
    as ``(hidden rows [K, D] (a copy), their labels [K], their indices among the flattened rows,
    the chunk budget of a call on them, whether its gradient may be written over the copy)``,
    where that leaves out at least ``_SKIP_AT_LEAST`` of the rows and ``_rows_budget`` finds room
    for the copy (``needs_grad``: and its gradient; ``fused``: the call is a fused pass of the
    whole head); else None (every row). Counting them waits for the GPU; a call under
    ``_SKIP_MIN_PRODUCTS`` is not counted (None)."""
    if target.numel() * hidden.shape[-1] * vocab < _SKIP_MIN_PRODUCTS:
        return None
    flat = scored_labels(target, ignore_index, causal).reshape(-1)
    keep = (flat != ignore_index).nonzero().squeeze(1)
    if keep.numel() > (1 - _SKIP_AT_LEAST) * flat.numel():
        return None
    budget = _rows_budget(flat.numel(), keep.numel(), hidden.shape[-1], -(-vocab // world), hidden.dtype,
                          chunk_bytes, needs_grad, fused)
    if budget is None:
        return None
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep), flat.index_select(0, keep), keep, *budget


def _rows_budget(rows, scored, features, vocab, dtype, chunk_bytes, needs_grad, fused=False):
    """``(chunk budget, in place)`` of a call on ``scored`` of a call's ``rows`` rows of
    ``features`` hidden features, such that it takes no more memory than the call's chunks would
    over every row (``chunk_bytes`` and cuBLASLt's workspace for them, or the default budget of
    ``rows`` rows), or None where that leaves less than half the logits of every row's budget
    (the smaller chunks would cost more than the rows left out save). Beside its chunks the call
    holds the copy of the scored rows (with their labels and indices); a fused pass (``fused``
    and ``needs_grad``: the gradients in the forward, no hidden states kept for a backward) also
    the copy's gradient, less the whole ``[rows, features]`` gradient that a call over every row
    holds too. A two-phase call holds the copy beside its forward's chunks. Where that leaves no
    room, a fused pass may write the copy's gradient over the copy (``in place``, where its chunks
    may take the row scheme: ``_xent.linear_row_scheme_min_rows()`` rows or all of them, which an
    in-place pass takes on any card), which costs nothing but the overlap of its two gradient
    GEMMs. 8192 x 4096 x 128256 bf16 with one row in
    seven ignored, fused: at the default budget chunks of 784 scored rows beside the copy and its
    gradient (250 MiB in all); at Liger's 256 rows in place (28 chunks of 256 for 7021 rows)."""
    name = _dtype_name(dtype)
    total = _xent.linear_chunks_budget(rows, vocab, name, chunk_bytes)
    whole = _xent.linear_logits_within(total)
    row_bytes = features * dtype.itemsize
    copy = scored * row_bytes + 16 * scored  # the rows, their int64 labels and indices
    fused = fused and needs_grad
    held = copy + (scored * row_bytes - rows * row_bytes if fused else 0)
    left = _xent.linear_logits_within(max(total - max(held, 0), 0))
    if 2 * left >= whole:
        return left, False
    # In place (a fused pass's backward then holds the copy's gradient beside the whole one).
    if fused and scored * row_bytes <= total:
        left = _xent.linear_logits_within(total - max(copy - rows * row_bytes, 0))
        chunk = _xent.linear_chunk_rows(scored, vocab, name, left)
        if 2 * left >= whole and _row_scheme(chunk, scored):
            return left, True
    return None


def _laid_out(out, keep, target, reduction):
    """A call's results on the rows ``keep`` of ``target`` laid out as ``target``'s rows: the
    per-row values (the loss, z-loss and token accuracy under ``reduction="none"``, the
    predicted tokens and entropies always) scattered into rows of 0 (-1 for a predicted token)."""
    rows = target.numel()

    def spread(values, fill):
        if values is None:
            return None
        full = torch.full((rows,), fill, dtype=values.dtype, device=values.device)
        return full.index_copy(0, keep, values.reshape(-1)).view(target.shape)

    per_row = reduction == "none"
    if not isinstance(out, CrossEntropyOutput):
        return spread(out, 0) if per_row else out
    return CrossEntropyOutput(
        loss=spread(out.loss, 0) if per_row else out.loss,
        z_loss=spread(out.z_loss, 0) if per_row else out.z_loss,
        token_accuracy=spread(out.token_accuracy, 0) if per_row else out.token_accuracy,
        predicted_tokens=spread(out.predicted_tokens, -1),
        entropy=spread(out.entropy, 0),
    )


# Rows of hidden states a step of `_label_logits` multiplies (a gathered [rows, D] of the weight
# in f32 and the hidden states' rows in f32: 16 MiB each at D = 4096).
_LABEL_ROWS_BYTES = 16 << 20


def _label_logits(hidden, weight, bias, labels):
    """``hidden[i] · weight[labels[i]] + bias[labels[i]]`` in f32, rounded to the logits' dtype
    as the forward GEMM rounds them; a few rows at a time, so no ``[N, D]`` temporary."""
    rows, d = hidden.shape
    out = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    step = max(1, _LABEL_ROWS_BYTES // (4 * max(d, 1)))
    for start in range(0, rows, step):
        idx = labels[start:start + step]
        x = (hidden[start:start + step].float() * weight[idx].float()).sum(-1)
        if bias is not None:
            x = x + bias[idx].float()
        out[start:start + step] = x.to(hidden.dtype).float()
    return out


def _token_scaled(input, weight, target, bias, ce_weight, opts, common, accum_dtype, chunk_bytes):
    """``linear_cross_entropy(..., use_token_scaling=True)``: the rows' losses (reduction
    "none", two-phase, so the backward takes a per-row upstream), each times its label's
    probability (detached), then reduced as Liger reduces them."""
    reduction, ignore_index = common["reduction"], common["ignore_index"]
    lse_square_scale, softcap = common["lse_square_scale"], common["softcap"]
    causal_shift = common["causal_shift"]
    if ce_weight is not None and lse_square_scale != 0.0 and reduction == "mean":
        raise NotImplementedError(
            "use_token_scaling with ce_weight and lse_square_scale under reduction='mean' is not "
            "supported: the cross-entropy part divides by the labels' class weights and the "
            "z-loss part by the scored rows; use reduction='sum' or 'none' and divide yourself"
        )
    per_row = dict(common, reduction="none", return_z_loss=False, return_predicted_tokens=False)
    hidden, weight_c, target_c, bias_c, ce_weight_c, shape = _check(
        input, weight, target, bias, ce_weight, causal_shift
    )
    vocab = shape[3]
    labels = scored_labels(target_c.view(target.shape), ignore_index, causal_shift).reshape(-1)
    scored = labels != ignore_index
    index = labels.clamp(0, max(vocab - 1, 0))
    accuracy = predicted = entropy = None
    if not input.is_cuda:
        logits = torch.nn.functional.linear(input, weight, bias)
        if common["return_predicted_tokens"]:
            predicted = predicted_tokens(logits, target, ignore_index, causal_shift)
        out = cross_entropy(logits, target, ce_weight, **per_row)
        rows_loss = out.loss if isinstance(out, CrossEntropyOutput) else out
        accuracy = out.token_accuracy if isinstance(out, CrossEntropyOutput) else None
        entropy = out.entropy if isinstance(out, CrossEntropyOutput) else None
        x = logits.detach().reshape(-1, vocab).to(torch.float64)
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        lse = torch.logsumexp(x, dim=-1) if vocab else x.new_zeros(x.shape[0])
        label_x = x.gather(1, index.view(-1, 1)).view(-1) if vocab else lse
    else:
        rows_loss, stats, predicted, entropy = LinearXentFunction.apply(
            hidden, weight_c, target_c, bias_c, ce_weight_c, opts._replace(reduction="none"), shape, True,
            accum_dtype, chunk_bytes, common["return_predicted_tokens"], common["return_entropy"], None, False,
        )
        predicted = predicted.view(target.shape) if common["return_predicted_tokens"] else None
        entropy = entropy.view(target.shape) if common["return_entropy"] else None
        rows_loss = rows_loss.view(target.shape)
        rows = target.numel()
        lse = stats[_ops.STATS_ROWS + rows:_ops.STATS_ROWS + 2 * rows].detach()
        if common["return_token_accuracy"]:
            hits = stats[_ops.STATS_ROWS + 2 * rows:_ops.STATS_ROWS + 3 * rows]
            accuracy = hits.view(torch.int32).to(torch.float32).view(target.shape)
        if common["check_labels"]:
            _launch.check_labels(extras_of(stats)[2])
        with torch.no_grad():
            label_x = _label_logits(hidden, weight_c, bias_c, index)
            if softcap is not None:
                label_x = softcap * torch.tanh(label_x / softcap)
    with torch.no_grad():
        scale = torch.where(scored, torch.exp(label_x - lse), torch.zeros_like(lse)).to(torch.float32)
        z_rows = torch.where(scored, lse_square_scale * lse * lse, torch.zeros_like(lse)).to(torch.float32)
        scale, z_rows = scale.view(target.shape), z_rows.view(target.shape)
    scaled = rows_loss * scale
    z_scaled = z_rows * scale
    count = scored.sum().to(torch.float32)
    if reduction == "none":
        loss, z_loss = scaled, z_scaled
    elif reduction == "sum":
        loss, z_loss = scaled.sum(), z_scaled.sum()
    else:
        if ce_weight is None:
            denominator = count
        else:
            denominator = ce_weight_c[index].masked_fill(~scored, 0.0).sum()
        loss, z_loss = scaled.sum() / denominator, z_scaled.sum() / count
    if reduction != "none" and accuracy is not None:
        accuracy = accuracy.sum() / count
    if common["return_z_loss"] or common["return_token_accuracy"] or predicted is not None or entropy is not None:
        return CrossEntropyOutput(
            loss=loss,
            z_loss=z_loss if common["return_z_loss"] else None,
            token_accuracy=accuracy if common["return_token_accuracy"] else None,
            predicted_tokens=predicted,
            entropy=entropy,
        )
    return loss


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Liger's ``LigerFusedLinearCrossEntropyLoss`` (its arguments, defaults and return types),
    computed by ``linear_cross_entropy``: ``forward(lin_weight, _input, target, bias=None)``
    (every argument of Liger's). Beyond Liger's:
    ``causal_shift``, ``grad_scale``, ``two_phase``, ``chunk_bytes``, ``skip_ignored``,
    ``return_entropy``."""

    def __init__(
        self,
        ce_weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: Optional[float] = None,
        return_z_loss: bool = False,
        accum_dtype: Optional[torch.dtype] = None,
        use_token_scaling: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
        *,
        causal_shift: bool = False,
        grad_scale: float = 1.0,
        two_phase: Optional[bool] = None,
        chunk_bytes: Optional[int] = None,
        skip_ignored: bool = True,
        return_entropy: bool = False,
    ):
        super().__init__()
        _launch.checked(_launch.Opts(
            ignore_index, reduction, grad_scale, causal_shift, label_smoothing, lse_square_scale,
            softcap, return_token_accuracy,
        ))
        self.ce_weight = ce_weight
        self.options = dict(
            ignore_index=ignore_index, lse_square_scale=lse_square_scale,
            label_smoothing=label_smoothing, reduction=reduction, softcap=softcap,
            return_z_loss=return_z_loss, accum_dtype=accum_dtype,
            return_token_accuracy=return_token_accuracy, causal_shift=causal_shift,
            grad_scale=grad_scale, two_phase=two_phase, chunk_bytes=chunk_bytes,
            use_token_scaling=use_token_scaling, return_predicted_tokens=return_predicted_tokens,
            skip_ignored=skip_ignored, return_entropy=return_entropy,
        )

    def forward(self, lin_weight, _input, target, bias=None):
        return linear_cross_entropy(_input, lin_weight, target, bias, ce_weight=self.ce_weight, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
