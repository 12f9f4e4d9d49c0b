"""Tensors to the extension: one place that checks a call's tensors, picks the device path (the
Rust kernels on PyTorch's current CUDA stream, or the f64 CPU reference for CPU tensors) and
enqueues it. Nothing here synchronises with the GPU or copies the logits.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

import torch

from .. import _tensors, _xent

_DEVICES: dict = {}


def device(index: int) -> "_xent.Device":
    """xent's kernels on CUDA device ``index``, loaded once per process."""
    handle = _DEVICES.get(index)
    if handle is None:
        handle = _DEVICES[index] = _xent.Device(index)
    return handle


class Opts(NamedTuple):
    """A call's options as plain Python values (what ``torch.compile`` traces and the custom
    operators take); ``checked`` makes the extension's validated ``Options`` of them."""

    ignore_index: int = -100
    reduction: str = "mean"
    grad_scale: float = 1.0
    causal_shift: bool = False
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: Optional[float] = None
    return_token_accuracy: bool = False


@functools.lru_cache(maxsize=256)
def checked(opts: Opts) -> "_xent.Options":
    """The extension's options for ``opts``, checked (ValueError naming the option); remembered,
    since a training loop makes the same ones at every step."""
    return _xent.Options(**opts._asdict())


class Call(NamedTuple):
    """A checked call: the logits as given, the target and class weights as the kernels read
    them (contiguous; weights float32), and xent's layout of the logits."""

    logits: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor]
    layout: _tensors.Layout
    dtype: str
    label_type: str

    def logits_buffer(self, tensor: Optional[torch.Tensor] = None):
        return ((self.logits if tensor is None else tensor).data_ptr(), self.layout.extent)

    def args(self):
        """(logits, dtype, labels, label type, shape, weight) as the extension takes them."""
        weight = None if self.weight is None else (self.weight.data_ptr(), self.weight.numel())
        return (
            self.logits_buffer(),
            self.dtype,
            (self.target.data_ptr(), self.layout.rows),
            self.label_type,
            self.layout.shape(),
            weight,
        )


def _meta(tensor) -> tuple:
    """What the checks of a tensor depend on (not its address): hashable, cheap to read."""
    return (tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


def _buffer(meta) -> _tensors.Buffer:
    shape, strides, dtype, device_ = meta
    return _tensors.Buffer(
        ptr=0,
        device=device_.type,
        index=device_.index if device_.type == "cuda" else None,
        dtype=str(dtype).rpartition(".")[2],
        shape=tuple(shape),
        strides=tuple(strides),
    )


@functools.lru_cache(maxsize=1024)
def _check(logits_meta, target_meta, weight_meta, causal_shift: bool):
    """The checks of a call's tensors, by their metadata (a training loop repeats it, so it is
    remembered; an error is raised anew each time): (layout, logits dtype, label type, whether
    the target must be made contiguous, whether the weights must be made float32 contiguous)."""
    logits_buf = _buffer(logits_meta)
    target_buf = _buffer(target_meta)
    weight_buf = None if weight_meta is None else _buffer(weight_meta)
    _tensors.same_device(("input", logits_buf), ("target", target_buf), ("weight", weight_buf))
    contiguous, step = [], 1
    for size in reversed(target_buf.shape):
        contiguous.insert(0, step)
        step *= max(size, 1)
    contiguous = tuple(contiguous)
    target_copy = any(
        size != 1 and stride != want
        for size, stride, want in zip(target_buf.shape, target_buf.strides, contiguous)
    )
    if target_copy:
        target_buf = target_buf._replace(strides=contiguous)
    layout = _tensors.layout(logits_buf, target_buf, causal_shift)
    weight_copy = False
    if weight_buf is not None:
        weight_copy = weight_buf.dtype != "float32" or (
            layout.vocab > 1 and weight_buf.strides != (1,)
        )
        _tensors.check_weight(weight_buf._replace(dtype="float32", strides=(1,)), layout.vocab)
    return layout, logits_buf.dtype, target_buf.dtype, target_copy, weight_copy


def prepare(logits, target, weight, causal_shift: bool) -> Call:
    """Checks the tensors of a call (PyTorch's kinds of errors) and returns it."""
    for name, value in (("input", logits), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    weight_meta = None if weight is None else _meta(weight)
    layout, dtype, label_type, target_copy, weight_copy = _check(
        _meta(logits), _meta(target), weight_meta, causal_shift
    )
    if target_copy:
        target = target.contiguous()
    if weight_copy:
        weight = weight.to(torch.float32).contiguous()
    return Call(logits, target, weight, layout, dtype, label_type)


def _stream(index: int) -> int:
    """PyTorch's current CUDA stream of device ``index``, as a raw handle."""
    return torch._C._cuda_getCurrentRawStream(index)


def _on(index: int):
    """PyTorch's device guard when the call's device is not the current one (so the driver's
    current context is PyTorch's again afterwards)."""
    if index == torch._C._cuda_getDevice():
        return contextlib.nullcontext()
    return torch.cuda.device(index)


def upstream_of(grad_output: torch.Tensor) -> torch.Tensor:
    """An upstream gradient as the kernels read it: float32 and contiguous (read flat)."""
    if grad_output.dtype != torch.float32 or not grad_output.is_contiguous():
        grad_output = grad_output.detach().to(torch.float32).contiguous()
    return grad_output


def forward(call: Call, opts: "_xent.Options", fused: bool) -> torch.Tensor:
    """Enqueues the loss of ``call`` and returns its stats (see ``STATS_*``); with ``fused``, the
    gradient of ``grad_scale * loss`` is written over the logits in the same pass."""
    logits = call.logits
    layout = call.layout
    accuracy = opts.return_token_accuracy
    stats = torch.empty(_xent.stats_len(layout.rows, accuracy), dtype=torch.float32, device=logits.device)
    if logits.is_cuda:
        index = logits.device.index
        handle = device(index)
        args = (_stream(index), *call.args(), opts, (stats.data_ptr(), stats.numel()))
        with _on(index):
            words = handle.forward(*args, None, fused)
            if words:  # the plan needs scratch memory (the chunked plan's partial sums)
                scratch = torch.empty(words, dtype=torch.float32, device=logits.device)
                handle.forward(*args, (scratch.data_ptr(), words), fused)
    else:
        stats.zero_()
        mode = "fused" if fused else "forward"
        _xent.cpu_call(*call.args(), opts, (stats.data_ptr(), stats.numel()), mode)
    return stats


def entropy(call: Call, opts: "_xent.Options") -> torch.Tensor:
    """Enqueues each scored row's entropy (the soft-capped logits' with ``opts``' soft cap) and
    returns it: float32, one a row (flat), 0 where not scored. CUDA only: one read of the
    logits."""
    logits = call.logits
    out = torch.empty(call.layout.rows, dtype=torch.float32, device=logits.device)
    index = logits.device.index
    logits_, dtype, labels, label_type, shape, _ = call.args()
    with _on(index):
        device(index).entropy(_stream(index), logits_, dtype, labels, label_type, shape, opts,
                              (out.data_ptr(), out.numel()))
    return out


def backward(call: Call, opts, stats: torch.Tensor, upstream: torch.Tensor, grad: torch.Tensor,
             entropy: Optional[torch.Tensor] = None, entropy_upstream: Optional[torch.Tensor] = None) -> None:
    """Two-phase backward: the gradient of ``upstream * loss`` written into ``grad`` (the logits
    themselves, or a buffer from ``grad_buffer``), from a forward's stats; with
    ``entropy_upstream`` (``[rows]`` float32, contiguous) plus the gradient of
    ``Σ entropy_upstream · H``, ``H`` the forward's entropies in ``entropy`` (``[rows]`` float32;
    the CPU computes them again)."""
    grad_buffer_ = call.logits_buffer(grad)
    upstream_buffer = (upstream.data_ptr(), upstream.numel())
    ent_up = None if entropy_upstream is None else (entropy_upstream.data_ptr(), entropy_upstream.numel())
    if call.logits.is_cuda:
        ent = None if entropy is None or ent_up is None else (entropy.data_ptr(), entropy.numel())
        index = call.logits.device.index
        with _on(index):
            device(index).backward(
                _stream(index), *call.args(), opts, (stats.data_ptr(), stats.numel()), upstream_buffer, grad_buffer_,
                ent, ent_up,
            )
    else:
        _xent.cpu_call(
            *call.args(), opts, (stats.data_ptr(), stats.numel()), "backward", upstream_buffer, grad_buffer_, ent_up
        )


def scale_grad(call: Call, upstream: torch.Tensor) -> None:
    """Scales the gradient that a fused forward wrote over the logits by ``upstream``; the GPU
    skips it where the factor is exactly 1, without the host looking."""
    args = (call.logits_buffer(), call.dtype, call.layout.shape(), (upstream.data_ptr(), upstream.numel()))
    if call.logits.is_cuda:
        index = call.logits.device.index
        with _on(index):
            device(index).scale_grad(_stream(index), *args)
    else:
        _xent.cpu_scale_grad(*args)


def grad_buffer(call: Call) -> torch.Tensor:
    """An uninitialised tensor of the logits' shape, strides and dtype, at the same address modulo
    16 bytes (the kernels' vectors line up with the logits'), holding only the logits' extent."""
    logits = call.logits
    itemsize = logits.element_size()
    base = torch.empty(call.layout.extent + 16 // itemsize, dtype=logits.dtype, device=logits.device)
    shift = ((logits.data_ptr() - base.data_ptr()) % 16) // itemsize
    return base.as_strided(logits.shape, logits.stride(), shift)


def check_labels(counts: torch.Tensor) -> None:
    """Waits for the call whose label ``counts`` these are and raises IndexError if a target was
    neither ``ignore_index`` nor a class (the one synchronising check, on request)."""
    bad = int(counts[_xent.COUNT_BAD].item())
    if bad:
        raise IndexError(
            f"{bad} target(s) out of range: neither ignore_index nor a class index in [0, n_classes)"
        )
