"""Tests of ``xent.numpy`` and ``xent.Options`` against an independent float64 NumPy reference.

Runs without a GPU and without PyTorch: only NumPy, pytest and the installed wheel (bfloat16 cases
run only where ``ml_dtypes`` imports). The reference below implements PyTorch's and Liger's
semantics directly and never calls xent.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest


import xent  # noqa: E402  (conftest.py made it the installed wheel)
import xent.numpy as xn  # noqa: E402

F64 = np.float64


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


def _f32(x):
    """xent keeps its options and upstream factors in float32: the reference uses those values."""
    return float(np.float32(x))


def reference(
    logits,
    target,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    causal_shift=False,
    grad_scale=1.0,
    return_token_accuracy=False,
    upstream=1.0,
):
    """Loss and gradient in float64, as PyTorch's ``cross_entropy`` (weights, smoothing) and
    Liger's (z-loss, soft cap, token accuracy) define them. The gradient is that of
    ``upstream * grad_scale * loss``, ``upstream`` a scalar or one value per row."""
    x = np.asarray(logits).astype(F64)
    vocab = x.shape[-1]
    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    x = x.reshape(rows, vocab)
    t = np.asarray(target).astype(np.int64)
    if causal_shift and t.ndim >= 1:
        labels = np.full(t.shape, ignore_index, dtype=np.int64)
        labels[..., :-1] = t[..., 1:]
    else:
        labels = t.copy()
    labels = labels.reshape(rows)

    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise IndexError(f"label {labels[bad][0]} out of range")

    eps = _f32(label_smoothing)
    s = _f32(lse_square_scale)
    g = _f32(grad_scale)
    w = np.ones(vocab) if weight is None else np.asarray(weight, dtype=np.float32).astype(F64)
    W = w.sum()

    if softcap is not None:
        c = _f32(softcap)
        th = np.tanh(x / c)
        y = c * th
        dy = 1.0 - th * th
    else:
        y = x
        dy = np.ones_like(x)

    m = y.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(y - m).sum(axis=1, keepdims=True)))[:, 0]
    p = np.exp(y - lse[:, None])
    k = np.where(valid, labels, 0)
    ar = np.arange(rows)
    yk = y[ar, k]
    wk = w[k]

    ce = (1.0 - eps) * wk * (lse - yk) + (eps / vocab) * (W * lse - (w[None, :] * y).sum(axis=1))
    z = s * lse * lse
    ce = np.where(valid, ce, 0.0)
    z = np.where(valid, z, 0.0)
    row_lse = np.where(valid, lse, 0.0)
    n_valid = int(valid.sum())
    total_weight = wk[valid].sum()

    with np.errstate(divide="ignore", invalid="ignore"):
        if reduction == "mean":
            ce_loss = ce.sum() / total_weight if n_valid else math.nan
            z_loss = 0.0 if s == 0 else (z.sum() / n_valid if n_valid else math.nan)
            ce_scale = g / total_weight if n_valid else 0.0
            z_scale = g / n_valid if n_valid else 0.0
        else:
            ce_loss = ce.sum()
            z_loss = z.sum()
            ce_scale = z_scale = g

    onehot = np.zeros_like(x)
    onehot[ar[valid], k[valid]] = 1.0
    grad = ((1.0 - eps) * wk[:, None] * (p - onehot) + (eps / vocab) * (W * p - w[None, :])) * ce_scale
    grad = grad + 2.0 * s * lse[:, None] * p * z_scale
    grad = grad * dy
    up = np.asarray(upstream, dtype=np.float32).astype(F64).reshape(-1)
    if up.size == 1:
        grad = grad * up[0]
    else:
        assert up.size == rows
        grad = grad * up[:, None]
    grad = np.where(valid[:, None], grad, 0.0)

    if reduction == "none":
        loss = (ce + z).reshape(lead)
    else:
        loss = ce_loss + z_loss

    accuracy = None
    if return_token_accuracy:
        hits = (np.argmax(x, axis=1) == labels) & valid
        accuracy = hits.sum() / n_valid if n_valid else math.nan

    return dict(
        loss=loss,
        z_loss=z_loss,
        token_accuracy=accuracy,
        row_lse=row_lse.reshape(lead),
        n_valid=n_valid,
        grad=grad.reshape(lead + (vocab,)),
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

DTYPES = ["float32", "float16", "bfloat16"]
LABEL_DTYPES = [np.int64, np.int32]
REDUCTIONS = ["mean", "sum", "none"]


def np_dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_logits(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(np_dtype(dtype))


def make_target(rng, shape, vocab, label_dtype=np.int64, ignore_index=-100, p_ignore=0.2):
    t = rng.integers(0, vocab, size=shape)
    if ignore_index is not None:
        # Never let a real label collide with a class-valued ignore_index by chance.
        if 0 <= ignore_index < vocab:
            t = np.where(t == ignore_index, (ignore_index + 1) % vocab, t)
        t = np.where(rng.random(shape) < p_ignore, ignore_index, t)
    return np.asarray(t, dtype=label_dtype)


def _ordered(a):
    """Floating-point values as integers in the same order, adjacent floats one apart."""
    a = np.ascontiguousarray(a)
    if a.dtype.itemsize == 2:
        bits = a.view(np.uint16).astype(np.int64)
        sign, mag = bits & 0x8000, bits & 0x7FFF
    elif a.dtype.itemsize == 4:
        bits = a.view(np.uint32).astype(np.int64)
        sign, mag = bits & 0x80000000, bits & 0x7FFFFFFF
    else:
        raise AssertionError(a.dtype)
    return np.where(sign != 0, -mag, mag)


def assert_ulps(got, expected, ulps=1):
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    dist = np.abs(_ordered(got) - _ordered(expected))
    if dist.size and dist.max() > ulps:
        i = np.unravel_index(np.argmax(dist), dist.shape)
        raise AssertionError(
            f"{int((dist > ulps).sum())} of {dist.size} values more than {ulps} ulp apart; worst at "
            f"{i}: got {got[i]!r}, expected {expected[i]!r} ({int(dist[i])} ulps)"
        )


# (significand bits, smallest normal exponent) of the 16-bit types.
_FORMATS = {"float16": (11, -14), "bfloat16": (8, -126)}


def round_to(x, dtype):
    """float64 values rounded once, to nearest with ties to even, to a 16-bit dtype (written
    here rather than trusting a conversion routine: some go through float32 first)."""
    dtype = np.dtype(dtype)
    x = np.asarray(x, dtype=F64)
    if dtype == np.float32:
        return x.astype(np.float32)
    bits, emin = _FORMATS[dtype.name]
    _, e = np.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    ulp_exp = np.maximum(e - bits, emin - bits + 1)
    rounded = np.ldexp(np.rint(np.ldexp(x, -ulp_exp)), ulp_exp)  # exact scalings, one rounding
    out = rounded.astype(dtype)
    assert np.array_equal(out.astype(F64), rounded)  # representable: the cast was exact
    return out


def assert_grad(got, ref64, dtype):
    """float32: rtol 1e-5 / atol 1e-6 against float64; 16-bit: within 1 ulp of the float64
    reference rounded to the dtype."""
    dtype = np.dtype(dtype)
    assert got.dtype == dtype
    assert got.shape == ref64.shape
    if dtype == np.float32:
        np.testing.assert_allclose(got.astype(F64), ref64, rtol=1e-5, atol=1e-6)
    else:
        assert_ulps(np.asarray(got), round_to(ref64, dtype))


def assert_close(got, expected):
    np.testing.assert_allclose(np.asarray(got, dtype=F64), np.asarray(expected, dtype=F64), rtol=1e-5, atol=1e-6)


def assert_result(res, ref, reduction):
    if reduction == "none":
        assert isinstance(res.loss, np.ndarray)
        assert res.loss.shape == ref["loss"].shape
    else:
        assert isinstance(res.loss, float)
    assert_close(res.loss, ref["loss"])
    assert_close(res.z_loss, ref["z_loss"])
    if ref["token_accuracy"] is None:
        assert res.token_accuracy is None
    else:
        assert_close(res.token_accuracy, ref["token_accuracy"])
    assert res.row_lse.shape == ref["row_lse"].shape
    assert_close(res.row_lse, ref["row_lse"])
    assert res.n_valid == ref["n_valid"]


def ce_kwargs(opts, reduction):
    kw = dict(opts)
    kw["reduction"] = reduction
    return kw


# Each option alone, and all together. `weight` is filled in per vocabulary.
OPTION_SETS = {
    "plain": {},
    "ignore_index": {"ignore_index": 3},
    "label_smoothing": {"label_smoothing": 0.1},
    "label_smoothing_1": {"label_smoothing": 1.0},
    "z_loss": {"lse_square_scale": 0.05},
    "softcap": {"softcap": 2.5},
    "weight": {"weight": True},
    "token_accuracy": {"return_token_accuracy": True},
    "grad_scale": {"grad_scale": -0.75},
    "all": {
        "ignore_index": -1,
        "label_smoothing": 0.2,
        "lse_square_scale": 0.03,
        "softcap": 4.0,
        "weight": True,
        "return_token_accuracy": True,
        "grad_scale": 2.5,
    },
}


def options_for(name, rng, vocab):
    opts = dict(OPTION_SETS[name])
    if opts.get("weight"):
        opts["weight"] = rng.uniform(0.25, 2.0, vocab).astype(np.float32)
    return opts


def ignore_of(opts):
    return opts.get("ignore_index", -100)


# --------------------------------------------------------------------------------------------
# Against the reference: every dtype, label dtype, reduction and option set
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=["i64", "i32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_reference(dtype, label_dtype, reduction, option_set):
    rng = np.random.default_rng(1234)
    rows, vocab = 13, 37  # vocab not a multiple of 8
    opts = options_for(option_set, rng, vocab)
    logits = make_logits(rng, (rows, vocab), dtype)
    target = make_target(rng, (rows,), vocab, label_dtype, ignore_index=ignore_of(opts))
    original = logits.copy()
    ref = reference(original, target, reduction=reduction, **opts)

    # forward: loss only, logits untouched.
    fwd = xn.forward(logits, target, **ce_kwargs(opts, reduction))
    np.testing.assert_array_equal(logits.view(np.uint8), original.view(np.uint8))
    assert_result(fwd, ref, reduction)

    # cross_entropy: the same loss, the gradient written in place.
    res = xn.cross_entropy(logits, target, **ce_kwargs(opts, reduction))
    assert_result(res, ref, reduction)
    assert_grad(logits, ref["grad"], np_dtype(dtype))
    # The target is not modified.
    assert target.dtype == label_dtype


def entropy_reference(logits, target, ignore_index=-100, softcap=None, causal_shift=False):
    """Each scored row's entropy ``-Σ p·ln p`` of the (soft-capped) softmax in float64, 0 where
    not scored; ``target``'s shape."""
    x = np.asarray(logits).astype(F64)
    x = x.reshape(-1, x.shape[-1])
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    z = x - x.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    h = -(p * (z - np.log(np.exp(z).sum(-1, keepdims=True)))).sum(-1)
    t = np.asarray(target).astype(np.int64)
    if causal_shift:
        labels = np.full(t.shape, ignore_index, dtype=np.int64)
        labels[..., :-1] = t[..., 1:]
    else:
        labels = t
    return np.where(labels.reshape(-1) != ignore_index, h, 0.0).reshape(t.shape)


@pytest.mark.parametrize("option_set", ["plain", "softcap", "all"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_return_entropy_and_its_gradient(dtype, option_set):
    """``return_entropy`` in ``cross_entropy`` and ``forward`` (each scored row's entropy, before
    the gradient overwrites the logits; the loss unchanged), and ``backward``'s
    ``entropy_upstream``: the gradient of ``upstream·loss + Σ e·H`` is the loss's plus a central
    finite difference of the entropies (float64 on the logits as stored)."""
    rng = np.random.default_rng(11)
    rows, vocab = 9, 37
    opts = options_for(option_set, rng, vocab)
    logits = make_logits(rng, (rows, vocab), dtype)
    target = make_target(rng, (rows,), vocab, np.int64, ignore_index=ignore_of(opts))
    want = entropy_reference(logits, target, ignore_of(opts), opts.get("softcap"))
    assert want.max() > 1.0
    fwd = xn.forward(logits, target, return_entropy=True, **opts)
    np.testing.assert_allclose(fwd.entropy.astype(F64), want, rtol=1e-6, atol=1e-6)
    assert xn.forward(logits, target, **opts).entropy is None
    work = logits.copy()
    res = xn.cross_entropy(work, target, return_entropy=True, **opts)
    np.testing.assert_allclose(res.entropy.astype(F64), want, rtol=1e-6, atol=1e-6)
    assert_close(res.loss, fwd.loss)
    e = rng.uniform(-2.0, 2.0, rows)
    grad = xn.backward(logits, target, 0.5, entropy_upstream=e, **opts)
    loss_grad = xn.backward(logits, target, 0.5, **opts)
    x = logits.astype(F64)
    step = 1e-6
    bonus = np.zeros_like(x)
    for r in range(rows):
        for j in range(vocab):
            up, down = x.copy(), x.copy()
            up[r, j] += step
            down[r, j] -= step
            h_up = entropy_reference(up, target, ignore_of(opts), opts.get("softcap"))
            h_down = entropy_reference(down, target, ignore_of(opts), opts.get("softcap"))
            bonus[r, j] = (e * (h_up - h_down)).sum() / (2 * step)
    assert np.abs(bonus).max() > 1e-2  # the term is there to be found
    if dtype == "float32":
        assert_grad(grad, loss_grad.astype(F64) + bonus, np_dtype(dtype))
    else:  # the same sum, rounded to 16 bits instead of 32 (the f32 case checks the sum)
        in_f32 = xn.backward(logits.astype(np.float32), target, 0.5, entropy_upstream=e, **opts)
        assert_ulps(np.asarray(grad), round_to(in_f32.astype(F64), np_dtype(dtype)))
    with pytest.raises(ValueError, match="entropies' upstream"):
        xn.backward(logits, target, 0.5, entropy_upstream=e[:-1], **opts)


@pytest.mark.parametrize("option_set", ["plain", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backward_matches_reference(dtype, reduction, option_set):
    rng = np.random.default_rng(7)
    rows, vocab = 11, 29
    opts = options_for(option_set, rng, vocab)
    logits = make_logits(rng, (rows, vocab), dtype)
    target = make_target(rng, (rows,), vocab, ignore_index=ignore_of(opts))
    original = logits.copy()
    ref = reference(original, target, reduction=reduction, **opts)
    grad = xn.backward(logits, target, **ce_kwargs(opts, reduction))
    np.testing.assert_array_equal(logits, original)
    assert grad is not logits
    assert_grad(grad, ref["grad"], np_dtype(dtype))


# --------------------------------------------------------------------------------------------
# Causal shift
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option_set", ["plain", "label_smoothing", "weight", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=["i64", "i32"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_causal_shift_3d(dtype, label_dtype, reduction, option_set):
    rng = np.random.default_rng(99)
    batch, seq, vocab = 3, 6, 19
    opts = options_for(option_set, rng, vocab)
    logits = make_logits(rng, (batch, seq, vocab), dtype)
    target = make_target(rng, (batch, seq), vocab, label_dtype, ignore_index=ignore_of(opts))
    # Position 0 of each sequence is never a label under the shift: a value out of range there
    # must not matter (it would not exist after an explicit shift).
    target[:, 0] = vocab + 5
    original = logits.copy()
    ref = reference(original, target, reduction=reduction, causal_shift=True, **opts)

    fwd = xn.forward(logits, target, causal_shift=True, **ce_kwargs(opts, reduction))
    np.testing.assert_array_equal(logits, original)
    assert_result(fwd, ref, reduction)

    res = xn.cross_entropy(logits, target, causal_shift=True, **ce_kwargs(opts, reduction))
    assert_result(res, ref, reduction)
    assert_grad(logits, ref["grad"], np_dtype(dtype))
    # The last position of each sequence is not scored.
    assert np.all(logits[:, -1, :] == 0)
    assert np.all(res.row_lse[:, -1] == 0)
    if reduction == "none":
        assert np.all(res.loss[:, -1] == 0)


def test_reference_causal_shift_is_explicit_shift():
    """The reference's shift is PyTorch's usual `logits[:, :-1]` against `target[:, 1:]`."""
    rng = np.random.default_rng(3)
    logits = make_logits(rng, (2, 5, 7), "float32")
    target = make_target(rng, (2, 5), 7)
    shifted = reference(logits, target, causal_shift=True, reduction="sum")
    explicit = reference(logits[:, :-1], target[:, 1:], reduction="sum")
    assert shifted["loss"] == pytest.approx(explicit["loss"], rel=1e-12)
    np.testing.assert_allclose(shifted["grad"][:, :-1], explicit["grad"], rtol=1e-12, atol=0)


def test_round_to_matches_numpy_float16():
    x = np.random.default_rng(2).standard_normal(10000) * np.logspace(-9, 4, 10000)
    np.testing.assert_array_equal(round_to(x, np.float16), x.astype(np.float16))


@pytest.mark.parametrize("option_set", ["plain", "label_smoothing", "z_loss", "softcap", "weight", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_gradient_is_derivative_of_loss(reduction, option_set):
    """Self-check of the reference: central differences of its loss give its gradient."""
    rng = np.random.default_rng(4)
    rows, vocab = 4, 6
    opts = options_for(option_set, rng, vocab)
    opts.pop("return_token_accuracy", None)
    x = rng.standard_normal((rows, vocab)) * 2
    target = make_target(rng, (rows,), vocab, ignore_index=ignore_of(opts), p_ignore=0.3)
    target[0] = 1  # at least one scored row
    upstream = rng.uniform(0.5, 1.5, rows).astype(np.float32) if reduction == "none" else 1.0
    grad_scale = _f32(opts.get("grad_scale", 1.0))

    def loss(v):
        out = reference(v, target, reduction=reduction, upstream=upstream, **opts)["loss"]
        if reduction == "none":
            return float((np.asarray(out) * np.asarray(upstream, F64)).sum())
        return float(out)

    grad = reference(x, target, reduction=reduction, upstream=upstream, **opts)["grad"]
    h = 1e-6
    numeric = np.zeros_like(x)
    for i in range(rows):
        for j in range(vocab):
            e = np.zeros_like(x)
            e[i, j] = h
            numeric[i, j] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(grad, grad_scale * numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_causal_shift_2d_is_one_sequence(reduction):
    rng = np.random.default_rng(5)
    rows, vocab = 9, 13
    logits = make_logits(rng, (rows, vocab), "float32")
    target = make_target(rng, (rows,), vocab)
    ref = reference(logits, target, reduction=reduction, causal_shift=True)
    res = xn.cross_entropy(logits, target, reduction=reduction, causal_shift=True)
    assert_result(res, ref, reduction)
    assert_grad(logits, ref["grad"], np.float32)
    assert np.all(logits[-1] == 0)


def test_causal_shift_all_but_last_ignored_sequences():
    """Sequences of length 1: every row is the last of its sequence, nothing is scored."""
    rng = np.random.default_rng(6)
    logits = make_logits(rng, (4, 1, 10), "float32")
    target = make_target(rng, (4, 1), 10, p_ignore=0.0)
    res = xn.cross_entropy(logits, target, causal_shift=True, reduction="sum")
    assert res.n_valid == 0
    assert res.loss == 0.0
    assert np.all(logits == 0)


# --------------------------------------------------------------------------------------------
# Strided rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("option_set", ["plain", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_strided_rows(dtype, reduction, option_set, offset):
    rng = np.random.default_rng(11)
    rows, vocab, pad = 10, 21, 5
    opts = options_for(option_set, rng, vocab)
    big = make_logits(rng, (rows, vocab + pad), dtype)
    big_original = big.copy()
    cols = slice(offset, offset + vocab)
    logits = big[:, cols]
    assert not logits.flags.c_contiguous
    target = make_target(rng, (rows,), vocab, ignore_index=ignore_of(opts))
    ref = reference(big_original[:, cols], target, reduction=reduction, **opts)

    fwd = xn.forward(logits, target, **ce_kwargs(opts, reduction))
    assert_result(fwd, ref, reduction)
    np.testing.assert_array_equal(big, big_original)

    res = xn.cross_entropy(logits, target, **ce_kwargs(opts, reduction))
    assert_result(res, ref, reduction)
    assert_grad(big[:, cols], ref["grad"], np_dtype(dtype))
    # The padding between rows is not touched.
    np.testing.assert_array_equal(big[:, :offset], big_original[:, :offset])
    np.testing.assert_array_equal(big[:, offset + vocab :], big_original[:, offset + vocab :])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_strided_rows_3d_causal(dtype):
    rng = np.random.default_rng(12)
    batch, seq, vocab, pad = 2, 5, 17, 3
    opts = options_for("all", rng, vocab)
    big = make_logits(rng, (batch, seq, vocab + pad), dtype)
    big_original = big.copy()
    target = make_target(rng, (batch, seq), vocab, ignore_index=ignore_of(opts))
    ref = reference(big_original[..., :vocab], target, causal_shift=True, **opts)
    res = xn.cross_entropy(big[..., :vocab], target, causal_shift=True, **opts)
    assert_result(res, ref, "mean")
    assert_grad(big[..., :vocab], ref["grad"], np_dtype(dtype))
    np.testing.assert_array_equal(big[..., vocab:], big_original[..., vocab:])


def run_isolated(tmp_path, code):
    """Runs ``code`` in a fresh interpreter that imports the same ``xent``, so that a crash in
    the extension (a write out of bounds) fails one test instead of killing the session."""
    env = dict(os.environ)
    site = os.path.dirname(os.path.dirname(os.path.abspath(xent.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([site] + [p for p in sys.path if p and os.path.isdir(p)])
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 0, (
        f"the call exited with status {proc.returncode}"
        f"{' (signal ' + str(-proc.returncode) + ')' if proc.returncode < 0 else ''}: "
        f"{proc.stderr[-2000:]}"
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backward_strided_rows_new_out(dtype, tmp_path):
    """``backward(out=None)`` on logits whose rows are strided: a new array of the logits' shape
    holding the gradient (run in a subprocess: a wrong layout of the new array writes past it)."""
    rng = np.random.default_rng(13)
    rows, vocab, pad = 8, 19, 5
    big = make_logits(rng, (rows, vocab + pad), dtype)
    target = make_target(rng, (rows,), vocab)
    np.save(tmp_path / "big.npy", big)
    np.save(tmp_path / "target.npy", target)
    ref = reference(big[:, :vocab], target, reduction="sum", upstream=0.5)
    run_isolated(
        tmp_path,
        "import numpy as np, xent.numpy as xn\n"
        "big = np.load('big.npy'); target = np.load('target.npy')\n"
        f"grad = xn.backward(big[:, :{vocab}], target, 0.5, reduction='sum')\n"
        "np.save('grad.npy', np.ascontiguousarray(grad))\n"
        "np.save('big_after.npy', big)\n",
    )
    np.testing.assert_array_equal(np.load(tmp_path / "big_after.npy"), big)
    assert_grad(np.load(tmp_path / "grad.npy"), ref["grad"], np_dtype(dtype))


@pytest.mark.parametrize("out", ["logits", "buffer"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backward_strided_rows(dtype, out):
    rng = np.random.default_rng(13)
    rows, vocab, pad = 8, 19, 5
    big = make_logits(rng, (rows, vocab + pad), dtype)
    big_original = big.copy()
    logits = big[:, :vocab]
    target = make_target(rng, (rows,), vocab)
    ref = reference(big_original[:, :vocab], target, reduction="sum", upstream=0.5)
    if out == "logits":
        grad = xn.backward(logits, target, 0.5, reduction="sum", out=logits)
        assert grad is logits
        assert_grad(big[:, :vocab], ref["grad"], np_dtype(dtype))
        np.testing.assert_array_equal(big[:, vocab:], big_original[:, vocab:])
    else:
        out_big = np.full_like(big, 7)
        grad = xn.backward(logits, target, 0.5, reduction="sum", out=out_big[:, :vocab])
        np.testing.assert_array_equal(big, big_original)
        assert_grad(out_big[:, :vocab], ref["grad"], np_dtype(dtype))
        # Only the elements of `out` are written: the rest of the array it is a view of is not.
        np.testing.assert_array_equal(out_big[:, vocab:], np.full_like(big[:, vocab:], 7))


# --------------------------------------------------------------------------------------------
# Small and empty inputs, all rows ignored
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_single_row(dtype, reduction):
    rng = np.random.default_rng(17)
    vocab = 11
    opts = options_for("all", rng, vocab)
    logits = make_logits(rng, (1, vocab), dtype)
    target = np.array([4], dtype=np.int64)
    ref = reference(logits, target, reduction=reduction, **opts)
    res = xn.cross_entropy(logits, target, **ce_kwargs(opts, reduction))
    assert_result(res, ref, reduction)
    assert_grad(logits, ref["grad"], np_dtype(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched_row(reduction):
    """Logits [V] with a 0-d target, as PyTorch's unbatched input."""
    rng = np.random.default_rng(18)
    logits = make_logits(rng, (9,), "float32")
    target = np.array(2, dtype=np.int64)
    ref = reference(logits, target, reduction=reduction)
    res = xn.cross_entropy(logits, target, reduction=reduction)
    assert_result(res, ref, reduction)
    assert_grad(logits, ref["grad"], np.float32)


@pytest.mark.parametrize("vocab", [1, 2, 3])
def test_tiny_vocab(vocab):
    rng = np.random.default_rng(19)
    logits = make_logits(rng, (5, vocab), "float32")
    target = make_target(rng, (5,), vocab)
    ref = reference(logits, target, label_smoothing=0.3, lse_square_scale=0.1)
    res = xn.cross_entropy(logits, target, label_smoothing=0.3, lse_square_scale=0.1)
    assert_result(res, ref, "mean")
    assert_grad(logits, ref["grad"], np.float32)


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7), (0, 3, 7)], ids=["0x7", "2x0x7", "0x3x7"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_empty(dtype, reduction, shape):
    logits = np.zeros(shape, dtype=np_dtype(dtype))
    target = np.zeros(shape[:-1], dtype=np.int64)
    causal = len(shape) == 3
    for fn in (xn.forward, xn.cross_entropy):
        res = fn(logits, target, reduction=reduction, causal_shift=causal, lse_square_scale=0.1,
                 return_token_accuracy=True)
        assert res.n_valid == 0
        if reduction == "mean":
            assert math.isnan(res.loss)  # PyTorch: the mean of no elements
        elif reduction == "sum":
            assert res.loss == 0.0
        else:
            assert isinstance(res.loss, np.ndarray) and res.loss.shape == shape[:-1]
        assert res.row_lse.shape == shape[:-1]
        assert math.isnan(res.token_accuracy)
    grad = xn.backward(logits, target, reduction=reduction, causal_shift=causal)
    assert grad.shape == shape and grad.dtype == logits.dtype
    xn.scale_grad(logits, 2.0)
    assert logits.shape == shape


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(reduction):
    rng = np.random.default_rng(23)
    logits = make_logits(rng, (4, 10), "float32")
    target = np.full((4,), -100, dtype=np.int64)
    ref = reference(logits, target, reduction=reduction, return_token_accuracy=True)
    res = xn.cross_entropy(logits, target, reduction=reduction, return_token_accuracy=True)
    assert res.n_valid == 0
    if reduction == "mean":
        assert math.isnan(res.loss) and math.isnan(ref["loss"])
    else:
        assert_close(res.loss, ref["loss"])
        assert np.all(np.asarray(res.loss) == 0)
    assert math.isnan(res.token_accuracy)
    assert np.all(logits == 0)
    assert np.all(res.row_lse == 0)


# --------------------------------------------------------------------------------------------
# Two-phase mode and upstream gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option_set", ["plain", "z_loss", "softcap", "weight", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_two_phase_equals_fused(dtype, reduction, option_set):
    rng = np.random.default_rng(29)
    batch, seq, vocab = 2, 7, 23
    opts = options_for(option_set, rng, vocab)
    logits = make_logits(rng, (batch, seq, vocab), dtype)
    target = make_target(rng, (batch, seq), vocab, ignore_index=ignore_of(opts))
    kw = dict(ce_kwargs(opts, reduction), causal_shift=True)

    fused_logits = logits.copy()
    fused = xn.cross_entropy(fused_logits, target, **kw)

    fwd = xn.forward(logits, target, **kw)
    if reduction == "none":
        np.testing.assert_array_equal(fwd.loss, fused.loss)
    else:
        assert fwd.loss == fused.loss or (math.isnan(fwd.loss) and math.isnan(fused.loss))
    assert fwd.z_loss == fused.z_loss
    assert fwd.token_accuracy == fused.token_accuracy
    np.testing.assert_array_equal(fwd.row_lse, fused.row_lse)
    assert fwd.n_valid == fused.n_valid

    # Into a new array, into a given one, and in place: all equal to the fused gradient.
    grad_new = xn.backward(logits, target, **kw)
    np.testing.assert_array_equal(grad_new, fused_logits)
    buffer = np.empty_like(logits)
    returned = xn.backward(logits, target, 1.0, out=buffer, **kw)
    assert returned is buffer
    np.testing.assert_array_equal(buffer, fused_logits)
    returned = xn.backward(logits, target, 1.0, out=logits, **kw)
    assert returned is logits
    np.testing.assert_array_equal(logits, fused_logits)


@pytest.mark.parametrize("option_set", ["plain", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backward_scalar_upstream(dtype, reduction, option_set):
    rng = np.random.default_rng(31)
    rows, vocab = 12, 27
    opts = options_for(option_set, rng, vocab)
    logits = make_logits(rng, (rows, vocab), dtype)
    target = make_target(rng, (rows,), vocab, ignore_index=ignore_of(opts))
    upstream = 0.37
    ref = reference(logits, target, reduction=reduction, upstream=upstream, **opts)
    grad = xn.backward(logits, target, upstream, **ce_kwargs(opts, reduction))
    assert_grad(grad, ref["grad"], np_dtype(dtype))
    # A 0-d or 1-element array works as the scalar.
    grad = xn.backward(logits, target, np.array([upstream], np.float32), **ce_kwargs(opts, reduction))
    assert_grad(grad, ref["grad"], np_dtype(dtype))


@pytest.mark.parametrize("option_set", ["plain", "all"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backward_per_row_upstream(dtype, causal, option_set):
    rng = np.random.default_rng(37)
    batch, seq, vocab = 3, 4, 15
    opts = options_for(option_set, rng, vocab)
    logits = make_logits(rng, (batch, seq, vocab), dtype)
    target = make_target(rng, (batch, seq), vocab, ignore_index=ignore_of(opts))
    upstream = rng.uniform(-2.0, 2.0, (batch, seq)).astype(np.float32)
    ref = reference(logits, target, reduction="none", causal_shift=causal, upstream=upstream, **opts)
    # One value per row, shaped like the target or flat.
    for up in (upstream, upstream.reshape(-1)):
        grad = xn.backward(logits, target, up, reduction="none", causal_shift=causal, **opts)
        assert_grad(grad, ref["grad"], np_dtype(dtype))
    inplace = logits.copy()
    xn.backward(inplace, target, upstream, reduction="none", causal_shift=causal, out=inplace, **opts)
    assert_grad(inplace, ref["grad"], np_dtype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backward_zero_upstream(dtype):
    rng = np.random.default_rng(41)
    logits = make_logits(rng, (5, 9), dtype)
    target = make_target(rng, (5,), 9)
    grad = xn.backward(logits, target, 0.0)
    assert np.all(grad == 0)


# --------------------------------------------------------------------------------------------
# scale_grad
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grad(dtype, per_row, strided):
    rng = np.random.default_rng(43)
    batch, seq, vocab, pad = 2, 3, 13, 4
    dt = np_dtype(dtype)
    big = make_logits(rng, (batch, seq, vocab + (pad if strided else 0)), dtype, scale=0.1)
    big_original = big.copy()
    grad = big[..., :vocab]
    upstream = (
        rng.uniform(-3.0, 3.0, (batch, seq)).astype(np.float32) if per_row else np.float32(-1.7)
    )
    up = np.asarray(upstream, np.float32).astype(F64)
    if per_row:
        up = up[..., None]
    # One rounding of the exact product (float32 and 16-bit products are exact in float64).
    expected = round_to(big_original[..., :vocab].astype(F64) * up, dt)
    assert xn.scale_grad(grad, upstream) is None
    np.testing.assert_array_equal(big[..., :vocab].view(np.uint8), expected.view(np.uint8))
    np.testing.assert_array_equal(big[..., vocab:], big_original[..., vocab:])


@pytest.mark.parametrize("x,upstream", [(-0.03372, -1.7), (0.06256, -1.7), (0.01808, -1.7)])
def test_scale_grad_float16_rounds_once(x, upstream):
    """The exact product lies a hair past a float16 midpoint: rounding it to float32 first lands
    on the midpoint and then ties to even, the wrong way. One rounding to nearest is expected."""
    grad = np.array([[x]], np.float16)
    exact = float(grad[0, 0]) * float(np.float32(upstream))
    expected = round_to(exact, np.float16)
    assert np.float16(np.float32(exact)) != expected  # the double rounding differs here
    xn.scale_grad(grad, np.float32(upstream))
    assert grad[0, 0] == expected, (
        f"{x} * {upstream} = {exact!r}: got {grad[0, 0]!r}, expected {expected!r}"
    )


def test_scale_grad_flat_upstream_and_causal_flag():
    rng = np.random.default_rng(47)
    grad = make_logits(rng, (2, 3, 5), "float32")
    original = grad.copy()
    upstream = np.arange(6, dtype=np.float32)
    xn.scale_grad(grad, upstream, causal_shift=True)
    np.testing.assert_array_equal(grad, original * upstream.reshape(2, 3, 1))


# --------------------------------------------------------------------------------------------
# xent.Options
# --------------------------------------------------------------------------------------------


def test_options_defaults():
    o = xent.Options()
    assert o.ignore_index == -100
    assert o.reduction == "mean"
    assert o.grad_scale == 1.0
    assert o.causal_shift is False
    assert o.label_smoothing == 0.0
    assert o.lse_square_scale == 0.0
    assert o.softcap is None
    assert o.return_token_accuracy is False
    assert "reduction" in repr(o) and "mean" in repr(o)


def test_options_values():
    o = xent.Options(
        ignore_index=-1,
        reduction="sum",
        grad_scale=0.5,
        causal_shift=True,
        label_smoothing=0.1,
        lse_square_scale=1e-4,
        softcap=30.0,
        return_token_accuracy=True,
    )
    assert o.ignore_index == -1
    assert o.reduction == "sum"
    assert o.grad_scale == 0.5
    assert o.causal_shift is True
    assert o.label_smoothing == pytest.approx(0.1, rel=1e-6)
    assert o.lse_square_scale == pytest.approx(1e-4, rel=1e-6)
    assert o.softcap == 30.0
    assert o.return_token_accuracy is True
    r = repr(o)
    assert "sum" in r and "True" in r and "30" in r
    assert xent.Options(reduction="none").reduction == "none"
    # Edges that are valid.
    xent.Options(label_smoothing=0.0)
    xent.Options(label_smoothing=1.0)
    xent.Options(grad_scale=0.0)
    xent.Options(grad_scale=-3.0)
    xent.Options(lse_square_scale=0.0)
    xent.Options(softcap=1e-3)


def test_options_keyword_only():
    with pytest.raises(TypeError):
        xent.Options(-100)


INVALID_OPTIONS = [
    ({"reduction": "avg"}, "reduction"),
    ({"reduction": "MEAN"}, "reduction"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"label_smoothing": float("nan")}, "label_smoothing"),
    ({"softcap": 0.0}, "softcap"),
    ({"softcap": -1.0}, "softcap"),
    ({"softcap": float("inf")}, "softcap"),
    ({"softcap": float("nan")}, "softcap"),
    ({"lse_square_scale": -1.0}, "lse_square_scale"),
    ({"lse_square_scale": float("inf")}, "lse_square_scale"),
    ({"grad_scale": float("nan")}, "grad_scale"),
    ({"grad_scale": float("inf")}, "grad_scale"),
]
INVALID_IDS = [f"{k}={v}" for (d, _) in INVALID_OPTIONS for k, v in d.items()]


@pytest.mark.parametrize("kwargs,word", INVALID_OPTIONS, ids=INVALID_IDS)
def test_options_invalid(kwargs, word):
    with pytest.raises(ValueError, match=word):
        xent.Options(**kwargs)


@pytest.mark.parametrize("fn", ["cross_entropy", "forward", "backward"])
@pytest.mark.parametrize("kwargs,word", INVALID_OPTIONS, ids=INVALID_IDS)
def test_calls_reject_invalid_options(fn, kwargs, word):
    logits = np.zeros((3, 5), np.float32)
    original = logits.copy()
    target = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=word):
        getattr(xn, fn)(logits, target, **kwargs)
    np.testing.assert_array_equal(logits, original)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------

ALL_FNS = ["cross_entropy", "forward", "backward"]


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize(
    "logits_shape,target_shape",
    [((4, 5), (3,)), ((4, 5), (4, 1)), ((2, 3, 5), (6,)), ((2, 3, 5), (3, 2)), ((4, 5), (5,))],
)
def test_target_shape_mismatch(fn, logits_shape, target_shape):
    logits = np.zeros(logits_shape, np.float32)
    target = np.zeros(target_shape, np.int64)
    with pytest.raises(ValueError, match="shape"):
        getattr(xn, fn)(logits, target)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("target_dtype", [np.float32, np.float64, np.int16, np.int8, np.uint8, np.uint32])
def test_bad_target_dtype(fn, target_dtype):
    logits = np.zeros((3, 5), np.float32)
    target = np.zeros((3,), target_dtype)
    with pytest.raises(TypeError, match="target"):
        getattr(xn, fn)(logits, target)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("logits_dtype", [np.float64, np.int32, np.int64, np.complex64])
def test_bad_logits_dtype(fn, logits_dtype):
    logits = np.zeros((3, 5), logits_dtype)
    target = np.zeros((3,), np.int64)
    with pytest.raises(TypeError, match="not supported"):
        getattr(xn, fn)(logits, target)


def test_scale_grad_bad_dtype():
    with pytest.raises(TypeError, match="not supported"):
        xn.scale_grad(np.zeros((3, 5), np.float64), 2.0)


@pytest.mark.parametrize("fn", ALL_FNS)
def test_last_dim_not_contiguous(fn):
    logits = np.zeros((5, 4), np.float32).T  # [4, 5], class stride 4
    target = np.zeros((4,), np.int64)
    with pytest.raises(ValueError, match="contiguous"):
        getattr(xn, fn)(logits, target)


def test_last_dim_every_other():
    logits = np.zeros((4, 10), np.float32)[:, ::2]
    target = np.zeros((4,), np.int64)
    with pytest.raises(ValueError, match="contiguous"):
        xn.cross_entropy(logits, target)


def test_scale_grad_last_dim_not_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        xn.scale_grad(np.zeros((5, 4), np.float32).T, 2.0)


@pytest.mark.parametrize("fn", ALL_FNS)
def test_unevenly_spaced_rows(fn):
    logits = np.zeros((2, 4, 5), np.float32)[:, :-1]
    target = np.zeros((2, 3), np.int64)
    with pytest.raises(ValueError, match="evenly spaced"):
        getattr(xn, fn)(logits, target)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize(
    "label,ignore_index",
    [(5, -100), (6, -100), (-1, -100), (-100, -1), (2**31 - 1, -100)],
)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=["i64", "i32"])
def test_label_out_of_range(fn, label, ignore_index, label_dtype):
    rng = np.random.default_rng(53)
    logits = make_logits(rng, (4, 5), "float32")
    original = logits.copy()
    target = np.array([0, 1, label, 2], dtype=label_dtype)
    with pytest.raises(IndexError, match="range"):
        getattr(xn, fn)(logits, target, ignore_index=ignore_index)
    # Nothing was written.
    np.testing.assert_array_equal(logits, original)
    with pytest.raises(IndexError):
        reference(logits, target, ignore_index=ignore_index)


def test_label_out_of_range_under_causal_shift():
    logits = np.zeros((2, 3, 5), np.float32)
    target = np.array([[0, 1, 2], [0, 9, 2]], dtype=np.int64)  # 9 is the label of row (1, 0)
    with pytest.raises(IndexError, match="range"):
        xn.cross_entropy(logits, target, causal_shift=True)
    # Position 0 is never a label under the shift.
    target = np.array([[0, 1, 2], [9, 1, 2]], dtype=np.int64)
    res = xn.cross_entropy(logits, target, causal_shift=True, reduction="sum")
    assert res.n_valid == 4


def test_ignore_index_outside_vocab_is_ignored():
    rng = np.random.default_rng(59)
    logits = make_logits(rng, (4, 5), "float32")
    target = np.array([0, 1000, 3, 1000], dtype=np.int64)
    ref = reference(logits, target, ignore_index=1000)
    res = xn.cross_entropy(logits, target, ignore_index=1000)
    assert_result(res, ref, "mean")
    assert_grad(logits, ref["grad"], np.float32)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("length", [4, 6, 0])
def test_weight_wrong_length(fn, length):
    logits = np.zeros((3, 5), np.float32)
    target = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="weight"):
        getattr(xn, fn)(logits, target, weight=np.ones(length, np.float32))


def test_weight_2d():
    logits = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="weight"):
        xn.cross_entropy(logits, np.array([0, 1, 2]), weight=np.ones((1, 5), np.float32))


def test_weight_not_finite():
    logits = np.zeros((3, 5), np.float32)
    original = logits.copy()
    weight = np.ones(5, np.float32)
    weight[2] = np.inf
    with pytest.raises(ValueError, match="weight"):
        xn.cross_entropy(logits, np.array([0, 1, 2]), weight=weight)
    np.testing.assert_array_equal(logits, original)


def test_weight_float64_is_accepted():
    rng = np.random.default_rng(61)
    logits = make_logits(rng, (6, 7), "float32")
    target = make_target(rng, (6,), 7)
    weight = rng.uniform(0.5, 1.5, 7)  # float64: converted to float32
    ref = reference(logits, target, weight=weight.astype(np.float32))
    res = xn.cross_entropy(logits, target, weight=weight)
    assert_result(res, ref, "mean")
    assert_grad(logits, ref["grad"], np.float32)


@pytest.mark.parametrize("length", [2, 5, 7])
def test_upstream_wrong_length(length):
    logits = np.zeros((2, 3, 5), np.float32)
    target = np.zeros((2, 3), np.int64)
    with pytest.raises(ValueError, match="upstream"):
        xn.backward(logits, target, np.ones(length, np.float32), reduction="none")
    with pytest.raises(ValueError, match="upstream"):
        xn.scale_grad(logits, np.ones(length, np.float32))


def test_upstream_wrong_length_in_place_leaves_logits():
    logits = np.ones((2, 5), np.float32)
    with pytest.raises(ValueError, match="upstream"):
        xn.backward(logits, np.zeros(2, np.int64), np.ones(3, np.float32), out=logits)
    assert np.all(logits == 1)


def test_read_only_logits():
    logits = np.zeros((3, 5), np.float32)
    logits.flags.writeable = False
    target = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="writable"):
        xn.cross_entropy(logits, target)
    with pytest.raises(ValueError, match="writable"):
        xn.backward(logits, target, out=logits)
    with pytest.raises(ValueError, match="writable"):
        xn.scale_grad(logits, 2.0)
    # Reading them is fine.
    ref = reference(logits, target)
    assert_result(xn.forward(logits, target), ref, "mean")
    assert_grad(xn.backward(logits, target), ref["grad"], np.float32)


def test_backward_bad_out():
    logits = np.zeros((3, 5), np.float32)
    target = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="shape"):
        xn.backward(logits, target, out=np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        xn.backward(logits, target, out=np.zeros((3, 5), np.float16))
    with pytest.raises(ValueError, match="strides"):
        xn.backward(logits, target, out=np.zeros((3, 8), np.float32)[:, :5])
    read_only = np.zeros((3, 5), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        xn.backward(logits, target, out=read_only)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (2, 3, 0)])
def test_vocab_zero(fn, shape):
    logits = np.zeros(shape, np.float32)
    target = np.zeros(shape[:-1], np.int64)
    with pytest.raises(ValueError, match="classes"):
        getattr(xn, fn)(logits, target)


def test_zero_dim_logits():
    with pytest.raises(ValueError, match="dimension"):
        xn.cross_entropy(np.zeros((), np.float32), np.zeros((), np.int64))


# --------------------------------------------------------------------------------------------
# Inputs that are not NumPy arrays
# --------------------------------------------------------------------------------------------


def test_target_as_list_and_non_contiguous():
    rng = np.random.default_rng(67)
    logits = make_logits(rng, (4, 6), "float32")
    target = [1, -100, 5, 0]
    ref = reference(logits, np.array(target))
    res = xn.forward(logits, target)
    assert_result(res, ref, "mean")
    # A non-contiguous target is made contiguous.
    wide = np.array([[1, 9], [-100, 9], [5, 9], [0, 9]], dtype=np.int64)[:, 0]
    res = xn.cross_entropy(logits, wide)
    assert_result(res, ref, "mean")
    assert_grad(logits, ref["grad"], np.float32)


def test_dlpack_input():
    rng = np.random.default_rng(71)
    logits = make_logits(rng, (4, 6), "float32")
    target = make_target(rng, (4,), 6)

    class Wrapper:
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, *args, **kwargs):
            return self.a.__dlpack__(*args, **kwargs)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    ref = reference(logits, target)
    res = xn.cross_entropy(Wrapper(logits), target)
    assert_result(res, ref, "mean")
    assert_grad(logits, ref["grad"], np.float32)


def test_docstring_example():
    logits = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    target = np.array([1, -100, 3, 9])
    ref = reference(logits.copy(), target)
    out = xn.cross_entropy(logits, target)
    assert out.loss == pytest.approx(ref["loss"], rel=1e-5)
    assert out.n_valid == 3
    assert_grad(logits, ref["grad"], np.float32)
