"""Buffers as the extension takes them: one description of a tensor or array (address, device,
dtype, shape, strides in elements), and the one set of checks that turns the logits, target and
class weights of a call into xent's layout. PyTorch tensors and NumPy arrays (or any CPU object
with ``__dlpack__``, through NumPy) are described alike, so the checks and their messages are
tested in CI on NumPy arrays, without PyTorch or a GPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple


class Buffer(NamedTuple):
    """A tensor or array as the extension sees it."""

    ptr: int
    #: ``"cpu"`` or ``"cuda"``.
    device: str
    #: CUDA device ordinal, ``None`` on the CPU.
    index: Optional[int]
    #: ``float32``, ``float16``, ``bfloat16``, ``int64``, ``int32``, ... (PyTorch's names).
    dtype: str
    shape: Tuple[int, ...]
    #: In elements.
    strides: Tuple[int, ...]

    def where(self) -> str:
        return "cpu" if self.device == "cpu" else f"cuda:{self.index}"


class Layout(NamedTuple):
    """The logits as xent lays them out: ``[batch, seq_len]`` rows of ``vocab`` classes,
    ``row_stride`` elements apart; ``extent`` elements from the first to one past the last."""

    batch: int
    seq_len: int
    vocab: int
    row_stride: int
    extent: int

    @property
    def rows(self) -> int:
        return self.batch * self.seq_len

    def shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.seq_len, self.vocab, self.row_stride)


def describe_torch(tensor) -> Buffer:
    device = tensor.device
    return Buffer(
        ptr=tensor.data_ptr(),
        device=device.type,
        index=device.index if device.type == "cuda" else None,
        dtype=str(tensor.dtype).rpartition(".")[2],
        shape=tuple(tensor.shape),
        strides=tuple(tensor.stride()),
    )


def describe_numpy(array) -> Buffer:
    interface = array.__array_interface__
    itemsize = array.dtype.itemsize
    strides = interface["strides"]
    if strides is None:  # C-contiguous
        strides, step = [], 1
        for size in reversed(array.shape):
            strides.append(step)
            step *= max(size, 1)
        strides = tuple(reversed(strides))
    else:
        if any(s % itemsize for s in strides):
            raise ValueError(f"array strides {strides} are not multiples of its item size {itemsize}")
        strides = tuple(s // itemsize for s in strides)
    return Buffer(
        ptr=interface["data"][0],
        device="cpu",
        index=None,
        dtype=array.dtype.name,
        shape=tuple(array.shape),
        strides=strides,
    )


LOGIT_DTYPES = ("float32", "float16", "bfloat16")
LABEL_DTYPES = ("int64", "int32")


def same_device(*named: Tuple[str, Optional[Buffer]]) -> None:
    """Raises PyTorch's error when the buffers are not all on one device."""
    places = [(name, b.where()) for name, b in named if b is not None]
    first = places[0][1]
    for name, place in places[1:]:
        if place != first:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{first} ({places[0][0]}) and {place} ({name})!"
            )


def layout(logits: Buffer, target: Buffer, causal_shift: bool) -> Layout:
    """Checks the logits against the target and returns xent's layout of them, or raises the
    error PyTorch would (ValueError for shapes, TypeError for dtypes)."""
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"logits of dtype {logits.dtype} are not supported: expected float32, float16 or bfloat16"
        )
    if target.dtype not in LABEL_DTYPES:
        hint = " (class probabilities as targets are not supported)" if "float" in target.dtype else ""
        raise TypeError(
            f"target of dtype {target.dtype} is not supported: expected int64 or int32 class "
            f"indices{hint}"
        )
    if len(logits.shape) == 0:
        raise ValueError("logits must have at least one dimension (the classes, last)")
    vocab = logits.shape[-1]
    leading = logits.shape[:-1]
    if target.shape != leading:
        raise ValueError(
            f"Expected target of shape {tuple(leading)} (the logits' shape {tuple(logits.shape)} "
            f"without its last, class dimension), got {tuple(target.shape)}"
        )
    rows = math.prod(leading)
    if vocab == 0:
        raise ValueError(f"logits of shape {tuple(logits.shape)} have no classes (last dimension 0)")
    if rows == 0:
        return Layout(batch=1, seq_len=0, vocab=vocab, row_stride=vocab, extent=0)
    if vocab > 1 and logits.strides[-1] != 1:
        raise ValueError(
            f"the last (class) dimension of logits must be contiguous (stride 1), got strides "
            f"{logits.strides}: call .contiguous() or put the classes last"
        )
    # The rows must be evenly spaced: every leading dimension (of size > 1) must step over the
    # next one whole.
    spans = [(size, stride) for size, stride in zip(leading, logits.strides[:-1]) if size != 1]
    row_stride = spans[-1][1] if spans else vocab
    for (size, stride), (inner_size, inner_stride) in zip(spans, spans[1:]):
        if stride != inner_stride * inner_size:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} and strides {logits.strides} do not have "
                "evenly spaced rows (e.g. a slice logits[:, :-1]): pass causal_shift=True on the "
                "whole logits instead of slicing, or call .contiguous()"
            )
    if row_stride < vocab:
        raise ValueError(
            f"rows of logits overlap (row stride {row_stride} < {vocab} classes, strides "
            f"{logits.strides}): call .contiguous()"
        )
    target_strides = [s for size, s in zip(target.shape, target.strides) if size != 1]
    expect = [math.prod(d for d in target.shape[i + 1 :]) for i, d in enumerate(target.shape) if d != 1]
    if target_strides != expect:
        raise ValueError(f"target must be contiguous (strides {target.strides}): call .contiguous()")
    if causal_shift and len(leading) >= 1:
        seq_len = leading[-1]
        batch = rows // seq_len
    else:
        batch, seq_len = 1, rows
    return Layout(
        batch=batch,
        seq_len=seq_len,
        vocab=vocab,
        row_stride=row_stride,
        extent=(rows - 1) * row_stride + vocab,
    )


def check_weight(weight: Buffer, vocab: int) -> None:
    if weight.shape != (vocab,):
        raise ValueError(f"weight must hold one value per class, shape ({vocab},); got {weight.shape}")
    if weight.dtype != "float32":
        raise TypeError(f"weight must be float32 here, got {weight.dtype}")
    if vocab > 1 and weight.strides != (1,):
        raise ValueError(f"weight must be contiguous, got strides {weight.strides}")
