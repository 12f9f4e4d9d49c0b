"""xent on host arrays: NumPy arrays (or any CPU object with ``__dlpack__``) through xent's f64
CPU reference, with the GPU path's argument checks and modes. float32 and float16 logits (and
bfloat16 through ``ml_dtypes``), int64 or int32 targets.

>>> import numpy as np, xent.numpy
>>> logits = np.random.randn(4, 10).astype(np.float32)
>>> out = xent.numpy.cross_entropy(logits, np.array([1, -100, 3, 9]))
>>> out.loss  # and `logits` now holds d(loss)/d(logits)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from . import _tensors, _xent


class Result(NamedTuple):
    """What a call returns: the loss (a float, or the per-row losses for ``reduction="none"``),
    the z-loss part (0 without it), the token accuracy (``None`` unless asked for), per-row
    log-sum-exp, the number of scored rows, and with ``return_entropy`` each row's entropy
    (float32, ``target``'s shape, 0 where not scored; else ``None``)."""

    loss: object
    z_loss: float
    token_accuracy: Optional[float]
    row_lse: np.ndarray
    n_valid: int
    entropy: Optional[np.ndarray] = None


def _array(x, name: str, writable: bool = False) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__dlpack__"):
            x = np.from_dlpack(x)
        else:
            x = np.asarray(x)
    if writable and not x.flags.writeable:
        raise ValueError(f"{name} must be writable (the gradient is written into it)")
    return x


class _Call(NamedTuple):
    logits: np.ndarray
    target: np.ndarray
    weight: Optional[np.ndarray]
    logits_buf: _tensors.Buffer
    layout: _tensors.Layout
    options: _xent.Options


def _prepare(logits, target, weight, options, writable) -> _Call:
    logits = _array(logits, "logits", writable)
    target = _array(target, "target")
    if not target.flags.c_contiguous:
        target = target.copy(order="C")
    logits_buf = _tensors.describe_numpy(logits)
    target_buf = _tensors.describe_numpy(target)
    layout = _tensors.layout(logits_buf, target_buf, options.causal_shift)
    if weight is not None:
        weight = np.ascontiguousarray(_array(weight, "weight"), dtype=np.float32)
        _tensors.check_weight(_tensors.describe_numpy(weight), layout.vocab)
    return _Call(logits, target, weight, logits_buf, layout, options)


def _options(**kwargs) -> _xent.Options:
    return _xent.Options(**kwargs)


def _run(call: _Call, mode: str, stats: Optional[np.ndarray] = None, upstream=None, grad=None,
         entropy_upstream=None, entropy: Optional[np.ndarray] = None):
    layout = call.layout
    accuracy = call.options.return_token_accuracy
    if stats is None:
        stats = np.zeros(_xent.stats_len(layout.rows, accuracy), np.float32)
    weight = None if call.weight is None else (call.weight.ctypes.data, call.weight.size)
    _xent.cpu_call(
        (call.logits_buf.ptr, layout.extent),
        call.logits_buf.dtype,
        (call.target.ctypes.data, call.target.size),
        call.target.dtype.name,
        layout.shape(),
        weight,
        call.options,
        (stats.ctypes.data, stats.size),
        mode,
        upstream,
        grad,
        entropy_upstream,
        None if entropy is None else (entropy.ctypes.data, entropy.size),
    )
    return stats


def _result(call: _Call, stats: np.ndarray, reduction: str, accuracy: bool, entropy=None) -> Result:
    rows = call.layout.rows
    base = _xent.STATS_ROWS
    row_loss = stats[base : base + rows]
    counts = stats[_xent.STATS_COUNTS : _xent.STATS_ROWS].view(np.uint32)
    loss = row_loss.reshape(call.target.shape).copy() if reduction == "none" else float(stats[0])
    return Result(
        loss=loss,
        z_loss=float(stats[_xent.STATS_EXTRAS]),
        token_accuracy=float(stats[_xent.STATS_EXTRAS + 1]) if accuracy else None,
        row_lse=stats[base + rows : base + 2 * rows].reshape(call.target.shape).copy(),
        n_valid=int(counts[_xent.COUNT_VALID]),
        entropy=None if entropy is None else entropy.reshape(call.target.shape),
    )


def cross_entropy(
    logits,
    target,
    *,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    causal_shift: bool = False,
    grad_scale: float = 1.0,
    return_token_accuracy: bool = False,
    return_entropy: bool = False,
) -> Result:
    """Loss of ``logits`` (``[..., V]``, float32/float16/bfloat16) against ``target`` (``[...]``
    class indices), with the gradient of ``grad_scale * loss`` written into ``logits`` in place.
    Options as in ``torch.nn.functional.cross_entropy`` and Liger; see ``xent.torch``. With
    ``return_entropy`` each scored row's entropy ``-Σ p·ln p`` of the (soft-capped) softmax,
    taken before the gradient overwrites the logits."""
    options = _options(
        ignore_index=ignore_index,
        reduction=reduction,
        grad_scale=grad_scale,
        causal_shift=causal_shift,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
        return_token_accuracy=return_token_accuracy,
    )
    call = _prepare(logits, target, weight, options, writable=True)
    entropy = np.zeros(call.layout.rows, np.float32) if return_entropy else None
    stats = _run(call, "fused", entropy=entropy)
    return _result(call, stats, reduction, return_token_accuracy, entropy)


def forward(logits, target, *, weight=None, return_entropy: bool = False, **options) -> Result:
    """The loss only (two-phase mode's first half): ``logits`` are read, not written. Takes the
    options of ``cross_entropy``."""
    call = _prepare(logits, target, weight, _options(**options), writable=False)
    entropy = np.zeros(call.layout.rows, np.float32) if return_entropy else None
    stats = _run(call, "forward", entropy=entropy)
    return _result(call, stats, call.options.reduction, call.options.return_token_accuracy, entropy)


def backward(logits, target, upstream=1.0, *, weight=None, out=None, entropy_upstream=None, **options) -> np.ndarray:
    """Two-phase mode's second half: the gradient of ``upstream * loss`` (``upstream`` a scalar,
    or one value per row for ``reduction="none"``), rounded once to the logits' dtype, written
    into ``out`` (a new array when ``None``; ``out=logits`` for in place) and returned. With
    ``entropy_upstream`` (one value per row) plus the gradient of ``Σ entropy_upstream · H`` of
    the rows' entropies ``H`` (an entropy bonus), computed again from the logits."""
    call = _prepare(logits, target, weight, _options(**options), writable=out is logits)
    upstream = np.ascontiguousarray(np.asarray(upstream, dtype=np.float32).reshape(-1))
    bonus = None  # the entropies' upstream, alive until the call returns
    if entropy_upstream is not None:
        bonus = np.ascontiguousarray(np.asarray(entropy_upstream, dtype=np.float32).reshape(-1))
    if out is None:
        # The logits' layout (row strides included), so the gradient lands where they lie.
        storage = np.empty(call.layout.extent, call.logits.dtype)
        out = np.lib.stride_tricks.as_strided(storage, call.logits.shape, call.logits.strides)
    else:
        out = _array(out, "out", writable=True)
        if out.shape != call.logits.shape or out.dtype != call.logits.dtype:
            raise ValueError(
                f"out must have the logits' shape {call.logits.shape} and dtype {call.logits.dtype}, "
                f"got {out.shape} {out.dtype}"
            )
        if out is not call.logits and _tensors.describe_numpy(out).strides != call.logits_buf.strides:
            raise ValueError("out must have the logits' strides")
    out_buf = _tensors.describe_numpy(out)
    _run(
        call,
        "backward",
        upstream=(upstream.ctypes.data, upstream.size),
        grad=(out_buf.ptr, call.layout.extent),
        entropy_upstream=None if bonus is None else (bonus.ctypes.data, bonus.size),
    )
    return out


def scale_grad(grad, upstream, *, causal_shift: bool = False) -> None:
    """Scales a gradient (``[..., V]``) in place by ``upstream`` (a scalar or one value per row),
    as the seed's ``element_mul``."""
    grad = _array(grad, "grad", writable=True)
    buf = _tensors.describe_numpy(grad)
    rows_shape = grad.shape[:-1]
    fake_target = _tensors.Buffer(0, "cpu", None, "int64", rows_shape, tuple(
        int(np.prod(rows_shape[i + 1 :])) for i in range(len(rows_shape))
    ))
    layout = _tensors.layout(buf, fake_target, causal_shift)
    upstream = np.ascontiguousarray(np.asarray(upstream, dtype=np.float32).reshape(-1))
    _xent.cpu_scale_grad(
        (buf.ptr, layout.extent), buf.dtype, layout.shape(), (upstream.ctypes.data, upstream.size)
    )
