"""Tests of ``xent.torch`` against ``torch.nn.functional.cross_entropy`` computed in float64.

Every test runs on the CPU (xent's f64 reference path) and, where ``torch.cuda.is_available()``,
on CUDA (the Rust kernels on PyTorch's current stream). The whole file is skipped where PyTorch
is absent (CI). With ``XENT_REQUIRE_GPU=1`` a machine without CUDA fails instead of skipping the
CUDA cases (``test_cuda_is_available_when_required``).

The reference (``reference`` below) takes a float64 copy of the logits (the exact values of the
float32 / float16 / bfloat16 tensor), applies Liger's soft cap ``cap·tanh(x/cap)`` in float64,
PyTorch's ``cross_entropy`` (weights, ``ignore_index``, label smoothing, reduction), Liger's z-loss
(``lse_square_scale·lse²`` per scored row, averaged over the scored rows for the mean, never
weighted) and token accuracy (the fraction of scored rows whose ``argmax`` is the label), and
takes the gradient w.r.t. the logits by float64 autograd.
"""

from __future__ import annotations

import math
import os
import threading
import warnings

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import xent  # noqa: E402  (conftest.py made it the installed wheel)
import xent.torch as xt  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
REQUIRE_GPU = os.environ.get("XENT_REQUIRE_GPU") == "1"
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")

F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
LABEL_DTYPES = [torch.int64, torch.int32]

# The modes of a call: fused (gradient written over the logits in the forward), two-phase with
# the gradient written into the logits at backward or into a new tensor, and the default
# (``two_phase=None``: two-phase for float16 and for the sum and none reductions, fused
# otherwise; see ``effective_mode``).
MODES = {
    "default": dict(),
    "fused": dict(two_phase=False),
    "two_phase": dict(two_phase=True, inplace_backward=True),
    "two_phase_copy": dict(two_phase=True, inplace_backward=False),
}
MODE_NAMES = list(MODES)


def effective_mode(mode: str, dtype, reduction: str = "mean") -> str:
    """The mode a call runs in: ``two_phase=None`` picks two-phase for float16 (whose gradients
    are mostly subnormal before a GradScaler scale multiplies them) and for the sum and none
    reductions (whose upstream gradients are rarely 1: a divisor, per-row weights), fused for a
    mean of bfloat16 or float32 logits."""
    if mode == "default":
        two_phase = dtype == torch.float16 or reduction != "mean"
        return "two_phase" if two_phase else "fused"
    return mode


# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------

# Loss of float32 logits: xent accumulates each row's log-sum-exp in f32 (the GPU in base 2 with
# ex2.approx, ~2 ulp) and reduces the rows in f64, so a row's loss carries an absolute error of a
# few f32 ulps of its log-sum-exp (~1e-6 for lse ~ 10): 1e-5 relative leaves a 10x margin.
LOSS_RTOL_F32 = 1e-5
# Loss of 16-bit logits: the logits are exact 16-bit values (the reference upcasts the same
# values) and the loss is accumulated in f32 as for float32 logits; 1e-3 relative only guards
# against accumulating in the 16-bit type (~4e-3 per bf16 addition) or rounding the inputs
# differently, without depending on the 16-bit kernels' reduction order.
LOSS_RTOL_16 = 1e-3
# Absolute floor for per-row losses (reduction="none") that are 0 or close to it (ignored rows
# are exactly 0; a one-class row's loss is 0 up to the f32 rounding of lse - x, ~1e-7).
LOSS_ATOL = 1e-5
# Token accuracy: a ratio of two counts; only the final f32 division rounds.
ACCURACY_RTOL = 1e-6

# Gradient of float32 logits: each element is (p_j - [j = label])·scale with p_j from the f32
# log-sum-exp, i.e. ~1e-6 relative error per element (the lse's absolute error in the exponent):
# 1e-5 relative, plus an absolute floor of 1e-6 of the largest element (~1/n for the mean, the
# label's 1 - p) for elements formed by cancellation (label smoothing's p_j - ε/V).
GRAD_RTOL_F32 = 1e-5
GRAD_ATOL_F32 = 1e-6
# 16-bit gradients are compared in ulps of the dtype, against the float64 reference gradient
# (times the upstream gradient) rounded once, correctly, to the dtype (``round_to``):
# - CPU: xent's CPU path computes the gradient in f64 and rounds it once to the dtype, so a
#   single-rounding result must be bit for bit the same (0 ulp): f64 results of the same formula
#   in another order differ by ~1e-16 relative, which moves a 16-bit rounding only for a value
#   within 1e-16 of a rounding boundary (probability ~1e-13 per element).
# - CUDA: the kernels compute the gradient in f32 (~1e-6 relative error, see above) and round
#   that f32 value once; an f32 value within 1e-6 of the exact one rounds to the correctly
#   rounded 16-bit value or, when the exact value lies within 1e-6 of a rounding boundary, to
#   its neighbour: at most 1 ulp (0 would fail on ~1e-6 * 2^8 of the bf16 elements).
SINGLE_ROUNDING_ULPS = {"cpu": 0, "cuda": 1}
# Elements formed by cancellation on the GPU (label smoothing's p_j·a - w_j·k with p_j ~ ε/V)
# carry the f32 error of their terms, not of their value: on CUDA a 16-bit element may also be
# within this relative error of the float64 reference times the size of those terms (the term
# magnitude comes with the reference as ``grad_terms``). 2^-18 ~ 4e-6 = 4x the f32 error above.
CANCELLATION_RTOL_CUDA = 2.0**-18
# Fused mode with an upstream gradient that is not a power of two: the forward rounds the
# gradient to 16 bits, the backward multiplies that and rounds again (documented in
# xent/torch/function.py). Two round-to-nearest steps are within 0.5·c·ulp(g) + 0.5·ulp(g·c)
# of the exact product, at most 1.5 ulp of the result (2 across a binade edge, where the ulp
# halves), plus 1 ulp on CUDA for the f32 kernel error: 3 ulps.
TWO_ROUNDINGS_ULPS = 3


def _f32(value: float) -> float:
    """xent keeps its options and the upstream gradient in float32: the reference uses those
    values (f32(0.3) = 0.30000001192...)."""
    return float(torch.tensor(value, dtype=torch.float32).item())


def _is_power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(abs(value))
    return value != 0.0 and mantissa == 0.5


# ---------------------------------------------------------------------------------------------
# 16-bit rounding and ulp distances
# ---------------------------------------------------------------------------------------------


def _key(x: torch.Tensor) -> torch.Tensor:
    """Bits of a 16-bit tensor as integers ordered like the values (+0 and -0 both 0), so that
    the difference of two keys is the distance in ulps."""
    bits = x.contiguous().view(torch.int16).to(torch.int32)
    magnitude = bits & 0x7FFF
    return torch.where(bits < 0, -magnitude, magnitude)


def _from_key(key: torch.Tensor, dtype) -> torch.Tensor:
    magnitude = key.abs()
    bits = torch.where(key < 0, magnitude | 0x8000, magnitude)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits)
    return bits.to(torch.int16).view(dtype)


def round_to(x: torch.Tensor, dtype) -> torch.Tensor:
    """``x`` (float64) rounded once to ``dtype``, to nearest, ties to even. ``Tensor.to`` goes
    from float64 to float16 / bfloat16 through float32 (two roundings: ``1 + 2^-8 + 2^-30``
    becomes bfloat16 ``1.0``); this picks the nearest of that result and its two neighbours."""
    if dtype == torch.float32:
        return x.to(torch.float32)  # one correctly rounded conversion
    approx = x.to(dtype)
    key = _key(approx)
    best, best_err = approx, (approx.to(F64) - x).abs()
    for step in (-1, 1):
        candidate = _from_key(key + step, dtype)
        err = (candidate.to(F64) - x).abs()
        even = (_key(candidate).abs() & 1) == 0
        better = (err < best_err) | ((err == best_err) & even)
        best = torch.where(better, candidate, best)
        best_err = torch.where(better, err, best_err)
    return best


def test_round_to_rounds_once():
    """The helper itself: a float64 value just above a 16-bit tie rounds up (``Tensor.to``,
    through float32, rounds it down), exact ties go to even."""
    one = 1.0
    above_bf16_tie = torch.tensor([one + 2**-8 + 2**-30, one + 2**-8, one + 3 * 2**-8], dtype=F64)
    got = round_to(above_bf16_tie, torch.bfloat16).to(F64).tolist()
    assert got == [one + 2**-7, one, one + 2**-6]
    above_f16_tie = torch.tensor([-(one + 2**-11 + 2**-40), 2**-25 * 3], dtype=F64)
    got = round_to(above_f16_tie, torch.float16).to(F64).tolist()
    assert got == [-(one + 2**-10), 2**-23]  # 3·2^-25 is 1.5 subnormal ulps: to even (2 ulps)


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


class Reference:
    """The float64 reference of one call: ``loss`` (scalar, or the target's shape), ``z_loss``,
    ``accuracy``, ``grad`` (the gradient of ``grad_scale · Σ upstream·loss`` w.r.t. the logits,
    in the logits' shape) and ``grad_terms`` (an elementwise bound of the terms the gradient
    sums, for the GPU's cancellation allowance)."""

    def __init__(self, loss, z_loss, accuracy, grad, grad_terms):
        self.loss = loss
        self.z_loss = z_loss
        self.accuracy = accuracy
        self.grad = grad
        self.grad_terms = grad_terms


def reference(
    logits,
    target,
    weight=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    causal_shift=False,
    grad_scale=1.0,
    upstream=1.0,
) -> Reference:
    """PyTorch's and Liger's cross-entropy of ``logits`` in float64 (see the module doc).
    ``upstream``: a float (multiplies the loss) or a tensor of the loss's shape (reduction
    "none": ``Σ upstream·loss``); used in float32 as xent receives it."""
    x64 = logits.detach().to(F64).clone().requires_grad_()
    target64 = target.detach().to(torch.int64)
    vocab = logits.shape[-1]
    rows_x, rows_t = x64, target64
    if causal_shift:
        seq = logits.shape[-2]
        rows_x = x64.narrow(-2, 0, seq - 1)
        rows_t = target64.narrow(-1, 1, seq - 1)
    scored_shape = rows_t.shape
    y = rows_x.reshape(-1, vocab)
    t = rows_t.reshape(-1)
    as_given = y.detach()
    if softcap is not None:
        cap = _f32(softcap)
        y = cap * torch.tanh(y / cap)
    w64 = None if weight is None else weight.detach().to(F64)
    eps = _f32(label_smoothing)
    s = _f32(lse_square_scale)
    valid = t != ignore_index
    n_valid = int(valid.sum())
    lse = torch.logsumexp(y, dim=-1)
    z_rows = torch.where(valid, s * lse * lse, torch.zeros_like(lse))
    ce_args = dict(weight=w64, ignore_index=ignore_index, label_smoothing=eps)
    hits = (as_given.argmax(dim=-1) == t) & valid

    def per_position(row_values):
        """Scored rows' values laid out as ``target`` (0 at each sequence's last position when
        shifted, which is not scored)."""
        rows = row_values.reshape(scored_shape)
        if causal_shift:
            rows = torch.cat([rows, rows.new_zeros(scored_shape[:-1] + (1,))], dim=-1)
        return rows.reshape(target.shape)

    if reduction == "none":
        # Per row, as Liger returns them: the loss, the z-loss part and the token accuracy.
        loss = per_position(F.cross_entropy(y, t, reduction="none", **ce_args) + z_rows)
        z_loss = per_position(z_rows)
        accuracy = per_position(hits.to(F64))
    else:
        ce = F.cross_entropy(y, t, reduction=reduction, **ce_args)
        if s == 0.0:
            z_loss = torch.zeros((), dtype=F64, device=x64.device)
        elif reduction == "mean":
            z_loss = z_rows.sum() / n_valid
        else:
            z_loss = z_rows.sum()
        loss = ce + z_loss
        accuracy = hits.sum().to(F64) / n_valid

    if isinstance(upstream, torch.Tensor):
        up = upstream.detach().to(torch.float32).to(F64).to(x64.device)
        up_max = float(up.abs().max()) if up.numel() else 0.0
    else:
        up = _f32(upstream)
        up_max = abs(up)
    objective = _f32(grad_scale) * (loss * up).sum()
    if x64.numel():
        (grad,) = torch.autograd.grad(objective, x64)
    else:
        grad = torch.zeros_like(x64)
    # The smoothing's constant term (ε/V)·w_j·ce_scale·upstream, which the GPU subtracts from
    # p_j·a: where both are close their difference keeps their f32 error.
    if w64 is None:
        w_all, total_weight = torch.ones(vocab, dtype=F64, device=x64.device), float(n_valid)
    else:
        w_all, total_weight = w64, float(w64[t[valid]].sum()) if n_valid else 0.0
    ce_scale = abs(_f32(grad_scale)) * up_max
    if reduction == "mean":
        ce_scale = ce_scale / total_weight if total_weight else 0.0
    grad_terms = grad.detach().abs() + 2.0 * (eps / vocab) * ce_scale * w_all
    return Reference(loss.detach(), z_loss.detach(), accuracy, grad.detach(), grad_terms)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_loss(got, expected, dtype, what="loss"):
    assert isinstance(got, torch.Tensor), f"{what} is a {type(got).__name__}, not a tensor"
    assert got.dtype == torch.float32, f"{what} has dtype {got.dtype}"
    assert got.shape == expected.shape, (
        f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    )
    rtol = LOSS_RTOL_F32 if dtype == torch.float32 else LOSS_RTOL_16
    torch.testing.assert_close(
        got.detach().to(F64).cpu(), expected.cpu(), rtol=rtol, atol=LOSS_ATOL, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def check_grad(got, ref: Reference, dtype, device, ulps=None, fused_upstream=None):
    """``got`` (the logits' gradient, in the logits' dtype) against the reference. ``ulps``:
    16-bit ulps allowed (default: one rounding, ``SINGLE_ROUNDING_ULPS``).

    ``fused_upstream``: the power-of-two upstream gradient ``c`` (not 1) that a fused call's
    backward multiplied into a gradient already rounded to 16 bits. The product is then rounded
    once only where both the gradient and the product are normal numbers (function.py's
    contract); where the product is subnormal one more ulp is allowed (the multiplication rounds
    again, by at most 1 subnormal ulp), and where the unscaled gradient was subnormal its
    rounding error (half a subnormal quantum q) was multiplied by c: |got - exact| <= c·q (the
    factor 2 covers the GPU's f32 error)."""
    assert got is not None, "no gradient"
    assert got.dtype == dtype, f"gradient of dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.grad.shape, f"gradient shape {tuple(got.shape)}, expected {tuple(ref.grad.shape)}"
    expected = ref.grad.to(got.device)
    assert not torch.isnan(got).any(), "NaN in the gradient"
    if dtype == torch.float32:
        atol = GRAD_ATOL_F32 * float(expected.abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(got.detach().to(F64), expected, rtol=GRAD_RTOL_F32, atol=atol)
        return
    if ulps is None:
        ulps = SINGLE_ROUNDING_ULPS[device]
    rounded = round_to(expected, dtype)
    distance = (_key(got.detach()) - _key(rounded)).abs()
    allowed = torch.full_like(distance, ulps)
    tiny = torch.finfo(dtype).tiny
    if fused_upstream is not None:
        allowed = allowed + (expected.abs() < tiny).to(allowed.dtype)
    ok = distance <= allowed
    if fused_upstream is not None:
        c = abs(fused_upstream)
        quantum = tiny * torch.finfo(dtype).eps
        unscaled_subnormal = expected.abs() / c < tiny
        ok |= unscaled_subnormal & ((got.detach().to(F64) - expected).abs() <= c * quantum)
    if device == "cuda":
        slack = CANCELLATION_RTOL_CUDA * ref.grad_terms.to(got.device)
        ok |= (got.detach().to(F64) - expected).abs() <= slack
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{bad.shape[0]} of {ok.numel()} gradient elements more than {ulps} ulp(s) from the "
            f"float64 reference rounded to {dtype}; first at {first}: got "
            f"{float(got.detach()[first])!r}, expected {float(rounded[first])!r} "
            f"(exact {float(expected[first])!r}), {int(distance[first])} ulps; "
            f"max distance {int(distance.max())} ulps"
        )


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_inputs(
    device,
    shape,
    *,
    dtype=torch.float32,
    label_dtype=torch.int64,
    ignore_index=-100,
    ignore_every=5,
    causal_shift=False,
    hits=False,
    weight=False,
    logit_scale=1.0,
    seed=0,
):
    """Logits (a leaf of ``shape`` and ``dtype``, not requiring grad), labels (every
    ``ignore_every``-th row, counting from row ``ignore_every - 1``, set to ``ignore_index``),
    and class weights or None. With ``hits``, every other row's label is its argmax (so the
    token accuracy is not ~0)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = shape[-1]
    lead = tuple(shape[:-1])
    logits = (torch.randn(shape, generator=gen, dtype=torch.float32) * logit_scale).to(dtype)
    target = torch.randint(0, vocab, lead, generator=gen, dtype=torch.int64)
    if hits:
        best = logits.to(F64).argmax(dim=-1)
        flat_t = target.reshape(-1, lead[-1] if lead else 1)
        flat_b = best.reshape(flat_t.shape)
        if causal_shift:
            flat_t[:, 1::2] = flat_b[:, 0:-1:2]
        else:
            flat_t[:, ::2] = flat_b[:, ::2]
        target = flat_t.reshape(lead)
    if ignore_every and target.numel():
        flat = target.reshape(-1)
        flat[ignore_every - 1 :: ignore_every] = ignore_index
        target = flat.reshape(lead)
    w = (torch.rand(vocab, generator=gen) + 0.5).to(device) if weight else None
    return logits.to(device), target.to(label_dtype).to(device), w


def run_case(
    device,
    shape=(64, 1003),
    *,
    dtype=torch.float32,
    label_dtype=torch.int64,
    mode="fused",
    weight=False,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    causal_shift=False,
    return_z_loss=False,
    return_token_accuracy=False,
    grad_scale=1.0,
    upstream=1.0,
    logit_scale=1.0,
    seed=0,
):
    """One call of ``xt.cross_entropy`` with backward, checked against the reference: loss,
    extras, the gradient (per the rounding contract of ``mode`` and ``upstream``) and, in
    two-phase mode, that the forward left the logits intact (and the backward too without
    ``inplace_backward``). ``upstream``: a float, or ``"row"`` for a random per-row upstream
    gradient (reduction "none")."""
    logits, target, w = make_inputs(
        device, shape, dtype=dtype, label_dtype=label_dtype, ignore_index=ignore_index,
        causal_shift=causal_shift, hits=return_token_accuracy, weight=weight,
        logit_scale=logit_scale, seed=seed,
    )
    if upstream == "row":
        gen = torch.Generator().manual_seed(seed + 1)
        up = (torch.rand(target.shape, generator=gen) * 2 + 0.25).to(device)
    else:
        up = upstream
    options = dict(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, softcap=softcap, causal_shift=causal_shift,
    )
    ref = reference(logits, target, w, grad_scale=grad_scale, upstream=up, **options)
    runs_as = effective_mode(mode, dtype, reduction)
    original = logits.clone()
    x = logits.requires_grad_()
    out = xt.cross_entropy(
        x, target, w, return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        grad_scale=grad_scale, **options, **MODES[mode],
    )
    if return_z_loss or return_token_accuracy:
        assert isinstance(out, xt.CrossEntropyOutput)
        loss = out.loss
        assert (out.z_loss is not None) == return_z_loss
        assert (out.token_accuracy is not None) == return_token_accuracy
        if return_z_loss:
            check_loss(out.z_loss, ref.z_loss, dtype, "z_loss")
        if return_token_accuracy:
            torch.testing.assert_close(
                out.token_accuracy.to(F64).cpu(), ref.accuracy.cpu(), rtol=ACCURACY_RTOL, atol=0.0
            )
    else:
        assert isinstance(out, torch.Tensor)
        loss = out
    assert loss.device == logits.device
    check_loss(loss, ref.loss, dtype)
    if runs_as != "fused":
        assert torch.equal(x.detach(), original), "a two-phase forward changed the logits"
    if isinstance(up, torch.Tensor):
        (loss * up).sum().backward()
    elif reduction == "none":
        (loss * up).sum().backward()
    else:
        (loss * up).backward()
    # The gradient's rounding contract (xent/torch/function.py): one rounding in two-phase mode,
    # and in fused mode when the upstream gradient is a power of two (1 included: nothing to
    # multiply); otherwise (fused, c = 0.3, 3.0 or per-row values) two roundings.
    if runs_as != "fused":
        check_grad(x.grad, ref, dtype, device)
    elif isinstance(up, torch.Tensor) or not _is_power_of_two(_f32(up)):
        check_grad(x.grad, ref, dtype, device, ulps=TWO_ROUNDINGS_ULPS)
    elif up == 1.0:
        check_grad(x.grad, ref, dtype, device)
    else:
        check_grad(x.grad, ref, dtype, device, fused_upstream=_f32(up))
    if runs_as == "two_phase_copy":
        assert torch.equal(x.detach(), original), (
            "two-phase backward without inplace_backward changed the logits"
        )
    return ref


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def test_cuda_is_available_when_required():
    """On the GPU machine (``XENT_REQUIRE_GPU=1``) the CUDA cases must run, not be skipped."""
    if not REQUIRE_GPU:
        pytest.skip("XENT_REQUIRE_GPU is not 1")
    assert torch.cuda.is_available(), "XENT_REQUIRE_GPU=1 but torch.cuda.is_available() is False"
    assert xent.cuda_device_count() >= 1, "XENT_REQUIRE_GPU=1 but xent's driver sees no CUDA device"


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, label types, modes
# ---------------------------------------------------------------------------------------------

SHAPES = [
    (1, 1000),  # N = 1
    (200, 1000),
    (48, 32003),  # V not a multiple of 8: 16-bit rows start off 16-byte alignment
    (37, 1003),
    (2, 33, 1003),  # [B, T, V]
    (1003,),  # unbatched [C], target []
    (17, 1),  # one class: loss 0, gradient 0
    (9, 5),
]


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=["i64", "i32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_grad_match_reference(device, shape, dtype, label_dtype, mode):
    run_case(device, shape, dtype=dtype, label_dtype=label_dtype, mode=mode)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_3d_logits_per_reduction(device, reduction, dtype, mode):
    run_case(device, (3, 21, 1003), dtype=dtype, mode=mode, reduction=reduction)


# ---------------------------------------------------------------------------------------------
# Options, alone and combined
# ---------------------------------------------------------------------------------------------

OPTION_CASES = {
    "weight": dict(weight=True),
    "ignore_index_-1": dict(ignore_index=-1),
    "ignore_index_in_range": dict(ignore_index=3),
    "reduction_sum": dict(reduction="sum"),
    "reduction_none": dict(reduction="none"),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(lse_square_scale=1e-2, return_z_loss=True),
    "z_loss_sum": dict(lse_square_scale=1e-2, return_z_loss=True, reduction="sum"),
    "softcap": dict(softcap=15.0, logit_scale=4.0),
    "token_accuracy": dict(return_token_accuracy=True),
    "grad_scale": dict(grad_scale=0.3),
    "grad_scale_sum": dict(grad_scale=0.25, reduction="sum"),
    # Combined
    "weight_smoothing": dict(weight=True, label_smoothing=0.2),
    "all_mean": dict(
        weight=True, label_smoothing=0.1, lse_square_scale=1e-3, softcap=20.0, logit_scale=4.0,
        return_z_loss=True, return_token_accuracy=True,
    ),
    "all_sum_ignore_-1": dict(
        weight=True, ignore_index=-1, reduction="sum", label_smoothing=0.05, lse_square_scale=1e-4,
        softcap=30.0, return_z_loss=True, return_token_accuracy=True, grad_scale=0.5,
    ),
    "all_none_causal": dict(
        reduction="none", label_smoothing=0.1, lse_square_scale=1e-3, softcap=10.0, logit_scale=3.0,
        causal_shift=True, return_z_loss=True, return_token_accuracy=True, grad_scale=0.3,
    ),
    "smoothing_z_causal_mean": dict(label_smoothing=0.1, lse_square_scale=1e-2, causal_shift=True),
}


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_reference(device, case, dtype, mode):
    options = dict(OPTION_CASES[case])
    shape = (4, 24, 1003) if options.get("causal_shift") else (96, 1003)
    run_case(device, shape, dtype=dtype, mode=mode, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_options_large_vocab(device, dtype):
    run_case(
        device, (40, 32003), dtype=dtype, mode="two_phase", weight=True, label_smoothing=0.1,
        lse_square_scale=1e-3, softcap=30.0, return_z_loss=True, return_token_accuracy=True,
    )


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_grad_scale_scales_gradient_not_loss(device, mode):
    """``grad_scale`` multiplies the gradient (folded into the kernel, one rounding) and leaves
    the loss as without it."""
    base = dict(dtype=torch.bfloat16, mode=mode, label_smoothing=0.1)
    logits, target, _ = make_inputs(device, (64, 1003), dtype=torch.bfloat16)
    x1 = logits.clone().requires_grad_()
    plain = xt.cross_entropy(x1, target, label_smoothing=0.1, **MODES[mode])
    x = logits.clone().requires_grad_()
    scaled = xt.cross_entropy(x, target, label_smoothing=0.1, grad_scale=0.3, **MODES[mode])
    assert torch.equal(plain.detach(), scaled.detach()), "grad_scale changed the loss"
    ref = run_case(device, (64, 1003), grad_scale=0.3, **base)
    ref1 = reference(logits, target, label_smoothing=0.1)
    # (the reference itself: its gradient is the unscaled one times f32(0.3), up to f64 rounding)
    atol = 1e-12 * float(ref1.grad.abs().max())
    torch.testing.assert_close(ref.grad, ref1.grad * _f32(0.3), rtol=1e-12, atol=atol)


# ---------------------------------------------------------------------------------------------
# Upstream gradients other than 1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1.0, 0.5, 0.3, 3.0, 65536.0])
@pytest.mark.parametrize("options", ["plain", "smoothing_z"])
def test_scalar_upstream(device, options, c, dtype, mode):
    """``(loss * c).backward()``: two-phase rounds ``c·gradient`` once for any ``c``; fused
    rounds once for a power of two (65536: a GradScaler scale) and twice otherwise (``run_case``
    applies the contract)."""
    extra = dict(label_smoothing=0.1, lse_square_scale=1e-2) if options == "smoothing_z" else {}
    run_case(device, (64, 1003), dtype=dtype, mode=mode, upstream=c, **extra)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1.0, 0.5, 0.3])
def test_scalar_upstream_reduction_none(device, c, dtype, mode):
    run_case(device, (64, 1003), dtype=dtype, mode=mode, reduction="none", upstream=c)


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal_shift", [False, True], ids=["flat", "causal"])
def test_per_row_upstream(device, causal_shift, dtype, mode):
    """``(loss * u).sum().backward()`` with reduction "none": row r's gradient times u[r]."""
    shape = (3, 22, 1003) if causal_shift else (64, 1003)
    run_case(device, shape, dtype=dtype, mode=mode, reduction="none", upstream="row",
             causal_shift=causal_shift, label_smoothing=0.1)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_noncontiguous_target_and_other_weight_dtypes(device, mode):
    """A strided target (a column of a wider tensor) and float64 / strided class weights are
    taken as PyTorch takes them (the weights are used in float32)."""
    logits, target, w = make_inputs(device, (48, 1003), dtype=torch.float16, weight=True)
    wide_target = torch.stack([target, torch.zeros_like(target)], dim=1)
    strided_target = wide_target[:, 0]
    assert not strided_target.is_contiguous()
    wide_weight = torch.stack([w, w], dim=1).to(F64)
    strided_weight = wide_weight[:, 0]
    ref = reference(logits, target, w, label_smoothing=0.1)
    x = logits.clone().requires_grad_()
    loss = xt.cross_entropy(x, strided_target, strided_weight, label_smoothing=0.1, **MODES[mode])
    check_loss(loss, ref.loss, torch.float16)
    loss.backward()
    check_grad(x.grad, ref, torch.float16, device)


# ---------------------------------------------------------------------------------------------
# Layouts: strided rows, causal shift
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("lead", [(50,), (3, 11)], ids=["2d", "3d"])
def test_strided_rows(device, lead, offset, dtype, mode):
    """Logits ``leaf[..., offset:offset + V]`` of a wider leaf (row stride V + 16, the first row
    ``offset`` elements in, so 16-bit rows are not 16-byte aligned): the leaf's gradient holds
    the reference in those columns and zeros elsewhere, and the columns outside the view keep
    their values whatever the mode (the fused gradient is written only inside the view)."""
    vocab = 1003
    wide, target, _ = make_inputs(device, lead + (vocab + 16,), dtype=dtype, seed=3)
    target = target.clamp(max=vocab - 1)
    leaf = wide.clone().requires_grad_()
    x = leaf[..., offset : offset + vocab]
    assert not x.is_contiguous() and x.stride()[-2] == vocab + 16
    ref = reference(x, target, label_smoothing=0.1)
    loss = xt.cross_entropy(x, target, label_smoothing=0.1, **MODES[mode])
    check_loss(loss, ref.loss, dtype)
    loss.backward()
    outside = torch.ones(wide.shape, dtype=torch.bool, device=wide.device)
    outside[..., offset : offset + vocab] = False
    assert torch.equal(leaf.detach()[outside], wide[outside]), "columns outside the view were written"
    if mode == "two_phase_copy":  # nothing written, inside the view either
        assert torch.equal(leaf.detach()[..., offset : offset + vocab], wide[..., offset : offset + vocab])
    check_grad(leaf.grad[..., offset : offset + vocab], ref, dtype, device)
    assert torch.count_nonzero(leaf.grad[outside]) == 0


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_causal_shift(device, reduction, dtype, mode):
    """``causal_shift=True`` on [B, T, V] equals the reference on ``logits[:, :-1]`` against
    ``target[:, 1:]``; the last position of each sequence gets zero gradient (and loss)."""
    ref = run_case(device, (3, 17, 1003), dtype=dtype, mode=mode, reduction=reduction, causal_shift=True)
    assert torch.count_nonzero(ref.grad[:, -1]) == 0


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_causal_shift_2d_is_one_sequence(device, mode):
    """On [T, V] logits the sequence is the only leading dimension."""
    run_case(device, (40, 1003), dtype=torch.bfloat16, mode=mode, causal_shift=True)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_causal_shift_strided(device, mode):
    vocab = 1003
    wide, target, _ = make_inputs(device, (2, 13, vocab + 8), dtype=torch.float16, seed=4)
    target = target.clamp(max=vocab - 1)
    leaf = wide.clone().requires_grad_()
    x = leaf[..., :vocab]
    ref = reference(x, target, causal_shift=True)
    loss = xt.cross_entropy(x, target, causal_shift=True, **MODES[mode])
    check_loss(loss, ref.loss, torch.float16)
    loss.backward()
    check_grad(leaf.grad[..., :vocab], ref, torch.float16, device)
    assert torch.count_nonzero(leaf.grad[..., vocab:]) == 0


# ---------------------------------------------------------------------------------------------
# Modes: what each leaves in the logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_two_phase_without_inplace_keeps_logits(device, dtype):
    logits, target, _ = make_inputs(device, (64, 1003), dtype=dtype)
    original = logits.clone()
    x = logits.requires_grad_()
    loss = xt.cross_entropy(x, target, two_phase=True, inplace_backward=False)
    assert torch.equal(x.detach(), original)
    (loss * 0.3).backward()
    assert torch.equal(x.detach(), original)
    assert x.grad.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("mode", ["default", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_what_the_forward_leaves_in_the_logits(device, dtype, mode):
    """Fused mode consumes the logits (the seed's and Liger's behaviour): after the forward they
    hold the gradient of the loss. The default (``two_phase=None``) is fused for float32 and
    bfloat16 and two-phase for float16, whose forward leaves the logits intact."""
    logits, target, _ = make_inputs(device, (64, 1003), dtype=dtype)
    ref = reference(logits, target)
    x = logits.clone().requires_grad_()
    loss = xt.cross_entropy(x, target, **MODES[mode])
    if effective_mode(mode, dtype) == "fused":
        check_grad(x.detach(), ref, dtype, device)
    else:
        assert torch.equal(x.detach(), logits)
    loss.backward()
    check_grad(x.grad, ref, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_and_seed_defaults_follow_the_dtype(device, dtype):
    """``CrossEntropyLoss()`` and the seed's ``CrossEntropyFunction`` take the same per-dtype
    default mode as the functional call."""
    logits, target, _ = make_inputs(device, (2, 16, 1003), dtype=dtype)
    two_phase = effective_mode("default", dtype) == "two_phase"
    for call in (
        lambda x: xt.CrossEntropyLoss(causal_shift=True)(x, target),
        lambda x: xt.CrossEntropyFunction.apply(x, target, -100),
        lambda x: xt.TritonCausalLMLoss(1003)(x, target),
    ):
        ref = reference(logits, target, causal_shift=True)
        x = logits.clone().requires_grad_()
        loss = call(x)
        assert torch.equal(x.detach(), logits) == two_phase
        check_loss(loss, ref.loss, dtype)
        (loss * 0.3).backward()
        ref = reference(logits, target, causal_shift=True, upstream=0.3)
        check_grad(x.grad, ref, dtype, device, ulps=None if two_phase else TWO_ROUNDINGS_ULPS)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_version_counter_guards_saved_logits(device, mode):
    """Logits that another operation saved for its backward (``exp`` saves its output): a mode
    that overwrites them (fused at forward, two-phase in place at backward) bumps their version,
    so that operation's backward raises PyTorch's in-place error instead of using the gradient
    as if it were the logits; the two-phase copy leaves them intact and the gradient is right."""
    logits, target, _ = make_inputs(device, (32, 1003))
    leaf = (logits * 0.5).requires_grad_()
    x = torch.exp(leaf)
    loss = xt.cross_entropy(x, target, **MODES[mode])
    if effective_mode(mode, torch.float32) == "two_phase_copy":
        loss.backward()
        ref = reference(torch.exp(leaf.detach()), target)
        expected = ref.grad * torch.exp(leaf.detach().to(F64))
        torch.testing.assert_close(leaf.grad.to(F64), expected, rtol=1e-5, atol=1e-9)
    else:
        with pytest.raises(RuntimeError, match="inplace"):
            loss.backward()


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("how", ["no_grad", "no_requires_grad", "inference_mode"])
def test_without_grad_logits_unchanged(device, how, dtype, mode):
    logits, target, w = make_inputs(device, (64, 1003), dtype=dtype, weight=True)
    ref = reference(logits, target, w, label_smoothing=0.1)
    original = logits.clone()
    x = logits.requires_grad_(how != "no_requires_grad")
    kwargs = dict(label_smoothing=0.1, **MODES[mode])
    if how == "no_grad":
        with torch.no_grad():
            loss = xt.cross_entropy(x, target, w, **kwargs)
    elif how == "inference_mode":
        with torch.inference_mode():
            loss = xt.cross_entropy(x, target, w, **kwargs)
    else:
        loss = xt.cross_entropy(x, target, w, **kwargs)
    assert not loss.requires_grad
    check_loss(loss, ref.loss, dtype)
    assert torch.equal(x.detach(), original), "the logits changed without grad"


def test_seed_function_without_grad_logits_unchanged(device):
    logits, target, _ = make_inputs(device, (2, 10, 1003), seed=9)
    ref = reference(logits, target, causal_shift=True)
    original = logits.clone()
    with torch.no_grad():
        loss = xt.CrossEntropyFunction.apply(logits.requires_grad_(), target, -100)
    check_loss(loss, ref.loss, torch.float32)
    assert torch.equal(logits.detach(), original)


# ---------------------------------------------------------------------------------------------
# The seed's README, verbatim but for the import and the device
# ---------------------------------------------------------------------------------------------


def test_seed_readme_autograd_function(device, capsys):
    from xent.torch import CrossEntropyFunction

    torch.manual_seed(0)
    device = torch.device(device)

    # Create sample data [batch, seq, vocab_size]
    logits = torch.randn(2, 10, 32000, device=device, requires_grad=True)
    labels = torch.randint(0, 32000, (2, 10), device=device)
    ref = reference(logits, labels, causal_shift=True)

    # Forward pass with ignore_index=-100 (default for masked tokens)
    loss = CrossEntropyFunction.apply(logits, labels, -100)
    print(f"Loss: {loss.item():.4f}")

    # Backward pass
    loss.backward()
    print(f"Gradients computed - shape: {logits.grad.shape}")

    assert logits.grad.shape == torch.Size([2, 10, 32000])
    check_loss(loss, ref.loss, torch.float32)
    check_grad(logits.grad, ref, torch.float32, device.type)
    assert f"Loss: {loss.item():.4f}" in capsys.readouterr().out


def test_seed_readme_causal_lm_module(device):
    from xent.torch import TritonCausalLMLoss

    torch.manual_seed(1)
    device = torch.device(device)
    vocab_size = 32000

    # Initialize the loss function
    loss_fn = TritonCausalLMLoss(vocab_size)

    # Create sample data
    logits = torch.randn(2, 10, vocab_size, device=device, requires_grad=True)
    labels = torch.randint(0, vocab_size, (2, 10), device=device)
    ref = reference(logits, labels, causal_shift=True)

    # Forward and backward pass
    loss = loss_fn(logits, labels)
    print(f"Causal LM loss: {loss.item():.4f}")

    loss.backward()
    print("Backward pass completed")

    check_loss(loss, ref.loss, torch.float32)
    check_grad(logits.grad, ref, torch.float32, device.type)
    with pytest.raises(ValueError):
        loss_fn(torch.randn(2, 10, vocab_size + 1, device=device), labels)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_seed_function_ignore_index_and_dtypes(device, dtype):
    logits, target, _ = make_inputs(device, (3, 16, 1003), dtype=dtype, ignore_index=-1)
    ref = reference(logits, target, ignore_index=-1, causal_shift=True)
    x = logits.requires_grad_()
    loss = xt.CrossEntropyFunction.apply(x, target, -1)
    check_loss(loss, ref.loss, dtype)
    loss.backward()
    check_grad(x.grad, ref, dtype, device)


# ---------------------------------------------------------------------------------------------
# nn.Module
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_torch_positional_arguments(device, reduction):
    """``CrossEntropyLoss(weight, size_average, ignore_index, reduce, reduction,
    label_smoothing)`` as ``torch.nn.CrossEntropyLoss`` takes them, against that module in
    float64."""
    logits, target, w = make_inputs(device, (64, 1003), weight=True, ignore_index=7)
    x64 = logits.to(F64).requires_grad_()
    expected = torch.nn.CrossEntropyLoss(w.to(F64), None, 7, None, reduction, 0.1)(x64, target)
    (expected * 0.5).sum().backward()
    x = logits.clone().requires_grad_()
    module = xt.CrossEntropyLoss(w, None, 7, None, reduction, 0.1)
    loss = module(x, target)
    assert isinstance(loss, torch.Tensor)
    check_loss(loss, expected.detach(), torch.float32)
    (loss * 0.5).sum().backward()
    check_grad(x.grad, Reference(None, None, None, x64.grad, x64.grad.abs()), torch.float32, device)


@pytest.mark.parametrize(
    "size_average,reduce",
    [(None, None), (True, None), (False, None), (None, False), (False, True), (True, False)],
)
def test_module_legacy_reduction_arguments(device, size_average, reduce):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_module = torch.nn.CrossEntropyLoss(None, size_average, -100, reduce)
    module = xt.CrossEntropyLoss(None, size_average, -100, reduce)
    assert module.reduction == torch_module.reduction
    logits, target, _ = make_inputs(device, (16, 103))
    check_loss(module(logits, target), torch_module(logits.to(F64), target), torch.float32)


def test_module_liger_keyword_arguments(device):
    """Liger's keywords; ``CrossEntropyOutput`` with ``.loss``, ``.z_loss``,
    ``.token_accuracy`` when a ``return_*`` flag is set."""
    kwargs = dict(
        ignore_index=-100, lse_square_scale=1e-4, label_smoothing=0.1, reduction="mean", softcap=30.0
    )
    logits, target, _ = make_inputs(device, (64, 1003), dtype=torch.bfloat16, hits=True, logit_scale=5.0)
    ref = reference(logits, target, **kwargs)
    module = xt.CrossEntropyLoss(**kwargs, return_z_loss=True, return_token_accuracy=True)
    x = logits.clone().requires_grad_()
    out = module(x, target)
    assert isinstance(out, xt.CrossEntropyOutput)
    check_loss(out.loss, ref.loss, torch.bfloat16)
    check_loss(out.z_loss, ref.z_loss, torch.bfloat16, "z_loss")
    torch.testing.assert_close(
        out.token_accuracy.to(F64).cpu(), ref.accuracy.cpu(), rtol=ACCURACY_RTOL, atol=0.0
    )
    assert 0.3 < float(out.token_accuracy) < 0.7
    out.loss.backward()
    check_grad(x.grad, ref, torch.bfloat16, device)

    only_z = xt.CrossEntropyLoss(**kwargs, return_z_loss=True)(logits.clone(), target)
    assert isinstance(only_z, xt.CrossEntropyOutput) and only_z.token_accuracy is None
    only_acc = xt.CrossEntropyLoss(return_token_accuracy=True)(logits.clone(), target)
    assert isinstance(only_acc, xt.CrossEntropyOutput) and only_acc.z_loss is None
    plain = xt.CrossEntropyLoss(**kwargs)(logits.clone(), target)
    assert isinstance(plain, torch.Tensor)
    check_loss(plain, ref.loss, torch.bfloat16)


@pytest.mark.parametrize("two_phase", [False, True])
def test_module_modes_and_causal_shift(device, two_phase):
    logits, target, _ = make_inputs(device, (2, 19, 1003), dtype=torch.float16)
    ref = reference(logits, target, causal_shift=True, label_smoothing=0.1, grad_scale=0.5)
    module = xt.CrossEntropyLoss(label_smoothing=0.1, causal_shift=True, grad_scale=0.5, two_phase=two_phase)
    x = logits.clone().requires_grad_()
    loss = module(x, target)
    check_loss(loss, reference(logits, target, causal_shift=True, label_smoothing=0.1).loss, torch.float16)
    loss.backward()
    check_grad(x.grad, ref, torch.float16, device)


def test_module_weight_is_a_buffer_that_follows_to(device):
    logits, target, w = make_inputs(device, (32, 1003), weight=True)
    module = xt.CrossEntropyLoss(w.cpu()).to(device)
    assert module.weight.device.type == device
    assert "weight" in dict(module.named_buffers())
    check_loss(module(logits, target), reference(logits, target, w).loss, torch.float32)


def test_module_rejects_bad_options_at_construction():
    bad = (dict(reduction="avg"), dict(label_smoothing=1.5), dict(lse_square_scale=-1.0), dict(softcap=0.0))
    for kwargs in bad:
        with pytest.raises(ValueError):
            xt.CrossEntropyLoss(**kwargs)


def expected_predicted(logits, target, ignore_index=-100, causal_shift=False):
    """``return_predicted_tokens``' definition: each row's first maximal logit (float64 argmax of
    the logits as given), -1 where the row is not scored."""
    labels = target
    if causal_shift:
        labels = torch.cat([target[..., 1:], torch.full_like(target[..., :1], ignore_index)], dim=-1)
    vocab = logits.shape[-1]
    scored = (labels != ignore_index) & (labels >= 0) & (labels < vocab)
    best = logits.detach().to(F64).argmax(-1).to(labels.device)
    return torch.where(scored, best, torch.full_like(best, -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", ["mean", "none", "softcap_causal", "grad_two_phase", "ignore_7"])
def test_return_predicted_tokens_is_the_scored_rows_argmax(device, dtype, case):
    kwargs = dict(
        mean=dict(),
        none=dict(reduction="none", return_token_accuracy=True),
        softcap_causal=dict(softcap=2.0, causal_shift=True, label_smoothing=0.1),
        grad_two_phase=dict(two_phase=True, lse_square_scale=1e-3, return_z_loss=True),
        ignore_7=dict(ignore_index=7),
    )[case]
    ignore_index = kwargs.get("ignore_index", -100)
    causal = kwargs.get("causal_shift", False)
    logits, target, _ = make_inputs(device, (4, 33, 1003), dtype=dtype, ignore_index=ignore_index,
                                    causal_shift=causal, hits=True, logit_scale=3.0)
    if case == "none":  # a row of equal maxima and a NaN row: the first of them
        logits[0, 0, 5:9] = 50.0
        logits[0, 1, 17] = float("nan")
        logits[0, 1, 30] = float("nan")
    want = expected_predicted(logits, target, ignore_index, causal)
    plain = xt.cross_entropy(logits.clone(), target, **kwargs)
    grad = case in ("mean", "grad_two_phase")
    x = logits.clone().requires_grad_(grad)
    out = xt.cross_entropy(x, target, return_predicted_tokens=True, **kwargs)
    assert isinstance(out, xt.CrossEntropyOutput)
    assert out.predicted_tokens.dtype == torch.int64 and out.predicted_tokens.shape == target.shape
    assert torch.equal(out.predicted_tokens, want), (out.predicted_tokens != want).nonzero()[:5]
    loss = plain.loss if isinstance(plain, xt.CrossEntropyOutput) else plain
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=0, equal_nan=True)  # the same loss
    if grad:
        out.loss.backward()  # the fused call wrote its gradient over x after the argmax was taken
        assert x.grad is not None
    module = xt.CrossEntropyLoss(return_predicted_tokens=True, **{k: v for k, v in kwargs.items()})
    assert torch.equal(module(logits.clone(), target).predicted_tokens, want)


def expected_entropy(logits, target, ignore_index=-100, causal_shift=False, softcap=None):
    """``return_entropy``'s definition in float64: ``-Σ p·ln p`` of each row's softmax (of the
    soft-capped logits), 0 where the row is not scored (as ``expected_predicted`` decides)."""
    x = logits.detach().to(F64).cpu()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    entropy = torch.special.entr(torch.softmax(x, dim=-1)).sum(-1)
    scored = expected_predicted(logits.cpu(), target.cpu(), ignore_index, causal_shift) >= 0
    return torch.where(scored, entropy, torch.zeros_like(entropy))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", ["mean", "none", "softcap_causal", "grad_two_phase", "ignore_7", "peaked"])
def test_return_entropy_is_each_scored_rows_entropy(device, dtype, case):
    """``return_entropy``: each scored row's entropy of the softmax the loss scores (after the
    soft cap), against float64 PyTorch within 2e-5 of ``max(1, H)`` (f32 sums of ``ex2.approx``
    terms; the logits are the call's, rounded to ``dtype``), 0 where not scored, NaN for a NaN
    row, with no gradient; the loss and gradient are those of the call without it, taken after
    the entropy (a fused call writes over the logits); the module's argument too."""
    kwargs = dict(
        mean=dict(),
        none=dict(reduction="none", return_token_accuracy=True),
        softcap_causal=dict(softcap=2.0, causal_shift=True, label_smoothing=0.1),
        grad_two_phase=dict(two_phase=True, lse_square_scale=1e-3, return_z_loss=True),
        ignore_7=dict(ignore_index=7, return_predicted_tokens=True),
        peaked=dict(softcap=30.0),
    )[case]
    ignore_index = kwargs.get("ignore_index", -100)
    causal = kwargs.get("causal_shift", False)
    logits, target, _ = make_inputs(device, (4, 33, 1003), dtype=dtype, ignore_index=ignore_index,
                                    causal_shift=causal, hits=True,
                                    logit_scale=12.0 if case == "peaked" else 3.0)
    if case == "none":  # a NaN row, a row with masked (-inf) logits
        logits[0, 1, 17] = float("nan")
        logits[0, 2, ::3] = float("-inf")
    want = expected_entropy(logits, target, ignore_index, causal, kwargs.get("softcap"))
    plain = xt.cross_entropy(logits.clone(), target, **kwargs)
    grad = case in ("mean", "grad_two_phase", "peaked")
    x = logits.clone().requires_grad_(grad)
    out = xt.cross_entropy(x, target, return_entropy=True, **kwargs)
    assert isinstance(out, xt.CrossEntropyOutput)
    assert out.entropy.dtype == torch.float32 and out.entropy.shape == target.shape
    assert out.entropy.requires_grad == grad  # differentiable where the loss is
    got = out.entropy.detach().cpu().to(F64)
    assert bool((got.isnan() == want.isnan()).all())
    ok = (got - want).abs() <= 2e-5 * want.abs().clamp(min=1.0)
    assert bool((ok | want.isnan()).all()), f"worst error {float((got - want).abs().nan_to_num().max()):.3g}"
    assert float(want.nan_to_num().max()) > 1.0  # not trivially 0
    loss = plain.loss if isinstance(plain, xt.CrossEntropyOutput) else plain
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=0, equal_nan=True)  # the same loss
    if grad:
        out.loss.backward()  # the entropy was read before the backward wrote over x
        g = logits.clone().requires_grad_(True)
        again = xt.cross_entropy(g, target, **dict(dict(two_phase=True), **kwargs))  # its mode
        (again.loss if isinstance(again, xt.CrossEntropyOutput) else again).backward()
        assert torch.equal(x.grad, g.grad)
    module = xt.CrossEntropyLoss(return_entropy=True, **kwargs)
    torch.testing.assert_close(module(logits.clone(), target).entropy, out.entropy.detach(), rtol=0, atol=0,
                               equal_nan=True)


def entropy_and_grad(logits, target, entropy_upstream, ignore_index=-100, causal_shift=False, softcap=None):
    """Each scored row's entropy (as ``expected_entropy``) and the gradient of ``Σ
    entropy_upstream · H`` with respect to ``logits``, both in float64 (on the CPU)."""
    x = logits.detach().to(F64).cpu().requires_grad_()
    y = x if softcap is None else softcap * torch.tanh(x / softcap)
    # `H = lse - Σ p·y` over the finite logits (a -inf logit has no mass: no NaN in the gradient).
    finite = torch.where(y.isinf(), torch.zeros_like(y), y)
    rows = torch.logsumexp(y, dim=-1) - (torch.softmax(y, dim=-1) * finite).sum(-1)
    scored = expected_predicted(logits.cpu(), target.cpu(), ignore_index, causal_shift) >= 0
    entropy = torch.where(scored, rows, torch.zeros_like(rows))
    (grad,) = torch.autograd.grad((entropy * entropy_upstream.detach().cpu().to(F64)).sum(), x)
    return entropy.detach(), grad


def close_to_f64(got, want, dtype, what="gradient"):
    """``got`` (in ``dtype``) against a float64 value: one rounding to ``dtype`` (2^-8 of the value
    in bf16, 2^-11 in f16, f32 arithmetic otherwise) plus 2e-5 of the largest element (the f32
    sums and ``ex2.approx``) and f16's subnormal spacing."""
    got, want = got.detach().to(F64).cpu(), want.to(F64).cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} against {tuple(want.shape)}"
    assert bool(want.isfinite().all()) and bool(got.isfinite().all()), f"{what}: not finite"
    rel = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    allowed = 2 * rel * want.abs() + 2e-5 * float(want.abs().max()) + (2.0**-24 if dtype == torch.float16 else 0.0)
    bad = (got - want).abs() > allowed
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; worst "
        f"error/allowed {float(((got - want).abs() / allowed).max()):.3g}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", ["mean_bonus", "none_rl", "softcap_causal_options", "entropy_only", "not_inplace"])
def test_entropy_gradient_matches_float64(device, dtype, case):
    """A differentiable ``return_entropy``: the gradient of ``upstream·loss + Σ e·H`` (an entropy
    bonus, TRL's GRPO ``entropy_coef``; per-row log-probability weights) against float64
    autograd on the logits rounded to ``dtype``, every option on, in place and not; the entropies
    themselves unchanged; the default mode two-phase; without the entropy term the gradient would
    be off by more than the tolerance (checked)."""
    kwargs = dict(
        mean_bonus=dict(),
        none_rl=dict(reduction="none"),
        softcap_causal_options=dict(softcap=2.0, causal_shift=True, label_smoothing=0.1, lse_square_scale=1e-3),
        entropy_only=dict(),
        not_inplace=dict(reduction="sum", inplace_backward=False),
    )[case]
    causal = kwargs.get("causal_shift", False)
    logits, target, weight = make_inputs(device, (3, 29, 1003), dtype=dtype, causal_shift=causal, hits=True,
                                         weight=case == "softcap_causal_options", logit_scale=3.0)
    logits[0, 2, ::3] = float("-inf")  # masked classes: no mass, no gradient
    gen = torch.Generator().manual_seed(5)
    rows = target.numel()
    e_up = (torch.randn(target.shape, generator=gen) / rows).to(device)
    up = torch.randn(target.shape, generator=gen).to(device) if case == "none_rl" else torch.tensor(0.75)
    x = logits.clone().requires_grad_(True)
    out = xt.cross_entropy(x, target, weight, return_entropy=True, **kwargs)
    assert out.entropy.requires_grad
    objective = (out.entropy * e_up).sum()
    if case != "entropy_only":
        objective = objective + (out.loss * up.to(device)).sum()
    objective.backward()
    if case == "not_inplace":
        assert torch.equal(x.detach(), logits), "the logits are left as they were"
    opts = {k: v for k, v in kwargs.items() if k != "inplace_backward"}
    want_h, want_g = entropy_and_grad(logits, target, e_up, causal_shift=causal, softcap=opts.get("softcap"))
    if case != "entropy_only":
        want_g = want_g + reference(logits, target, weight, upstream=up, **opts).grad.cpu()
    close_to_f64(x.grad, want_g, dtype)
    got_h = out.entropy.detach().cpu().to(F64)
    assert bool(((got_h - want_h).abs() <= 2e-5 * want_h.abs().clamp(min=1.0)).all())
    # The entropy's term is far larger than the tolerance: without it the check would fail.
    _, bonus = entropy_and_grad(logits, target, e_up, causal_shift=causal, softcap=opts.get("softcap"))
    with pytest.raises(AssertionError):
        close_to_f64(x.grad, want_g - bonus, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_gradient_needs_the_two_phase_mode(device):
    """With ``two_phase=False`` (the fused pass, which writes the loss's gradient over the logits
    in the forward) a gradient reaching the entropies raises RuntimeError rather than being
    dropped; detached entropies (a mask, a log) leave the fused gradient as it is."""
    logits, target, _ = make_inputs(device, (4, 1003), logit_scale=3.0)
    x = logits.clone().requires_grad_(True)
    out = xt.cross_entropy(x, target, return_entropy=True, two_phase=False)
    with pytest.raises(RuntimeError, match="two-phase"):
        (out.loss - 0.01 * out.entropy.mean()).backward()
    x = logits.clone().requires_grad_(True)
    out = xt.cross_entropy(x, target, return_entropy=True, two_phase=False)
    (out.loss * (out.entropy.detach() > 1.0).float().mean()).backward()
    assert x.grad is not None and bool(x.grad.isfinite().all())


@cuda_only
def test_entropy_gradient_under_torch_compile():
    """An entropy bonus compiled with ``fullgraph=True``: the custom operators, no graph break,
    the eager call's gradient bit for bit."""
    import torch._dynamo

    torch._dynamo.reset()
    logits, target, _ = make_inputs("cuda", (2, 41, 1003), dtype=torch.bfloat16, causal_shift=True, logit_scale=3.0)

    def step(x):
        out = xt.cross_entropy(x, target, causal_shift=True, softcap=5.0, return_entropy=True)
        return out.loss - 0.05 * out.entropy.mean()

    explanation = torch._dynamo.explain(step)(logits.clone().requires_grad_(True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager_x, compiled_x = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    step(eager_x).backward()
    torch.compile(step, fullgraph=True)(compiled_x).backward()
    assert torch.equal(compiled_x.grad, eager_x.grad)
    plain = logits.clone().requires_grad_(True)
    xt.cross_entropy(plain, target, causal_shift=True, softcap=5.0, two_phase=True).backward()
    assert not torch.equal(plain.grad, eager_x.grad)  # the entropy's term is in both


@cuda_only
def test_return_entropy_under_torch_compile():
    """``return_entropy`` compiled with ``fullgraph=True``: the custom operator ``xent::entropy``,
    no graph break, the eager call's entropies bit for bit."""
    import torch._dynamo

    torch._dynamo.reset()
    logits, target, _ = make_inputs("cuda", (2, 41, 1003), dtype=torch.bfloat16, causal_shift=True, logit_scale=3.0)

    def step(x):
        out = xt.cross_entropy(x, target, causal_shift=True, softcap=5.0, return_entropy=True)
        return out.loss, out.entropy

    explanation = torch._dynamo.explain(step)(logits.clone())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(logits.clone())[1], step(logits.clone())[1])


# ---------------------------------------------------------------------------------------------
# Empty inputs and bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_rows(device, reduction, mode):
    """0 rows: like PyTorch, the mean is NaN, the sum 0, "none" an empty tensor; the gradient
    has the logits' shape."""
    for shape in ((0, 1003), (2, 0, 1003)):
        x = torch.randn(shape, device=device, requires_grad=True)
        target = torch.zeros(shape[:-1], dtype=torch.int64, device=device)
        rows = x.detach().to(F64).reshape(-1, shape[-1])
        expected = F.cross_entropy(rows, target.reshape(-1), reduction=reduction)
        loss = xt.cross_entropy(x, target, reduction=reduction, **MODES[mode])
        check_loss(loss, expected.reshape(target.shape) if reduction == "none" else expected, torch.float32)
        loss.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_bad_inputs(device, requires_grad):
    def logits(*shape, dtype=torch.float32):
        return torch.randn(shape, device=device, dtype=dtype).requires_grad_(requires_grad)

    def labels(*shape, dtype=torch.int64):
        return torch.zeros(shape, dtype=dtype, device=device)

    with pytest.raises(ValueError, match="target"):  # shape mismatch
        xt.cross_entropy(logits(8, 100), labels(9))
    with pytest.raises(ValueError):
        xt.cross_entropy(logits(2, 4, 100), labels(2, 5))
    with pytest.raises(TypeError, match="float64"):
        xt.cross_entropy(logits(8, 100, dtype=F64), labels(8))
    with pytest.raises(TypeError, match="float32"):  # class probabilities are not supported
        xt.cross_entropy(logits(8, 100), labels(8, dtype=torch.float32))
    with pytest.raises(TypeError):
        xt.cross_entropy(logits(8, 100), labels(8, dtype=torch.int16))
    with pytest.raises(ValueError, match="contiguous"):  # the class dimension is strided
        xt.cross_entropy(logits(100, 8).t(), labels(8))
    with pytest.raises(ValueError, match="evenly spaced"):  # a slice of [B, T, V] on T
        xt.cross_entropy(logits(2, 6, 100)[:, :-1], labels(2, 5))
    with pytest.raises(ValueError, match="no classes"):  # vocabulary 0
        xt.cross_entropy(logits(8, 0), labels(8))
    with pytest.raises(ValueError, match="weight"):
        xt.cross_entropy(logits(8, 100), labels(8), torch.ones(99, device=device))
    with pytest.raises(TypeError):
        xt.cross_entropy(logits(8, 100), [0] * 8)
    for options in (
        dict(reduction="avg"),
        dict(label_smoothing=-0.1),
        dict(label_smoothing=1.5),
        dict(lse_square_scale=-1e-4),
        dict(lse_square_scale=float("inf")),
        dict(softcap=0.0),
        dict(softcap=-30.0),
        dict(grad_scale=float("nan")),
        dict(grad_scale=float("inf")),
    ):
        with pytest.raises(ValueError):
            xt.cross_entropy(logits(8, 100), labels(8), **options)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_errors_leave_logits_unchanged(device, mode):
    x = torch.randn(8, 100, device=device, requires_grad=True)
    original = x.detach().clone()
    with pytest.raises(ValueError):
        xt.cross_entropy(x, torch.zeros(9, dtype=torch.int64, device=device), **MODES[mode])
    if device == "cpu":
        with pytest.raises(IndexError):
            xt.cross_entropy(x, torch.full((8,), 100, device=device), **MODES[mode])
    assert torch.equal(x.detach(), original)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("bad_label", [1003, -5])
def test_labels_out_of_range(device, bad_label, requires_grad):
    """CPU: IndexError at once. CUDA: no exception and no wait; the loss becomes NaN and the
    row's gradient 0; with ``check_labels=True`` an IndexError."""
    logits, target, _ = make_inputs(device, (32, 1003))
    target[5] = bad_label
    x = logits.clone().requires_grad_(requires_grad)
    if device == "cpu":
        with pytest.raises(IndexError):
            xt.cross_entropy(x, target)
        with pytest.raises(IndexError):
            xt.cross_entropy(x, target, check_labels=True)
        return
    loss = xt.cross_entropy(x, target)
    if requires_grad:
        loss.backward()
    torch.cuda.synchronize()
    assert torch.isnan(loss).item()
    if requires_grad:
        assert torch.count_nonzero(x.grad[5]) == 0
        assert torch.isfinite(x.grad).all()
    x = logits.clone().requires_grad_(requires_grad)
    with pytest.raises(IndexError):
        xt.cross_entropy(x, target, check_labels=True)
    assert torch.isnan(xt.cross_entropy(logits, target, reduction="sum")).item()


def test_check_labels_passes_good_labels(device):
    logits, target, _ = make_inputs(device, (32, 1003))
    x = logits.clone().requires_grad_()
    loss = xt.cross_entropy(x, target, check_labels=True)
    check_loss(loss, reference(logits, target).loss, torch.float32)


# ---------------------------------------------------------------------------------------------
# torch.compile (every device: the CPU runs it through AOTAutograd with the aot_eager backend,
# CUDA through Inductor)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,options",
    [
        ("fused", {}),
        ("two_phase", {}),
        ("two_phase", dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=30.0)),
    ],
    ids=["fused", "two_phase", "two_phase_options"],
)
def test_torch_compile_matches_eager(device, mode, options):
    """``nn.Linear(D, V)`` then xent's loss, compiled with ``fullgraph=True`` (a graph break in
    the loss fails) and compared with the same model in eager: the loss and the Linear layer's
    gradients, for upstream gradients 1 and 0.3 (an in-place Function can silently get all-zero
    upstream gradients under torch.compile)."""
    import torch._dynamo

    torch._dynamo.reset()
    dims, vocab, rows = 64, 1003, 96
    gen = torch.Generator().manual_seed(11)
    model = torch.nn.Linear(dims, vocab)
    with torch.no_grad():
        model.weight.copy_(torch.randn(vocab, dims, generator=gen) * 0.2)
        model.bias.copy_(torch.randn(vocab, generator=gen) * 0.2)
    model = model.to(device)
    h = torch.randn(rows, dims, generator=gen).to(device)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[3::5] = -100
    target = target.to(device)
    kwargs = dict(MODES[mode], **options)

    def step(h, target):
        return xt.cross_entropy(model(h), target, **kwargs)

    explanation = torch._dynamo.explain(step)(h, target)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")

    def run(fn, c):
        model.zero_grad(set_to_none=True)
        loss = fn(h, target)
        (loss * c).backward()
        return loss.detach().clone(), model.weight.grad.clone(), model.bias.grad.clone()

    for c in (1.0, 0.3):
        eager_loss, eager_w, eager_b = run(step, c)
        comp_loss, comp_w, comp_b = run(compiled, c)
        assert eager_w.abs().max() > 0 and comp_w.abs().max() > 0, "all-zero weight gradient"
        torch.testing.assert_close(comp_loss, eager_loss, rtol=LOSS_RTOL_F32, atol=0.0)
        # The Linear's gradient is a matmul of the logits' gradient: the compiled model may order
        # that f32 matmul differently (~1e-6 relative).
        for got, want in ((comp_w, eager_w), (comp_b, eager_b)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))

    # And the eager model against the float64 reference through the same Linear layer.
    logits = model(h).detach()
    ref = reference(logits, target, **options)
    eager_loss, _, eager_b = run(step, 1.0)
    check_loss(eager_loss, ref.loss, torch.float32)
    torch.testing.assert_close(eager_b.to(F64), ref.grad.sum(0), rtol=1e-4, atol=1e-6)


def _loss_inputs(loss_fn, device, gen, rows, dims=16, vocab=301):
    """Labels (one in seven ignored) and the leaves ``loss_fn`` takes before them: ``[logits]``
    for ``cross_entropy``, ``[hidden, weight]`` for ``linear_cross_entropy``."""
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[2::7] = -100
    if loss_fn == "cross_entropy":
        leaves = [torch.randn(rows, vocab, generator=gen)]
    else:
        leaves = [torch.randn(rows, dims, generator=gen), torch.randn(vocab, dims, generator=gen) * 0.3]
    return target.to(device), [t.to(device) for t in leaves]


@pytest.mark.parametrize(
    "mode,reduction",
    # (The fused mode takes a scalar upstream gradient only.)
    [("fused", "mean"), ("fused", "sum"), ("two_phase", "mean"), ("two_phase", "sum"), ("two_phase", "none")],
)
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "linear_cross_entropy"])
def test_torch_compile_returns_the_loss_and_an_alias_of_it(device, loss_fn, mode, reduction):
    """A compiled function returning the loss and a view of it (``loss, loss.detach()``, as a
    training step returns a value to log): until session 48 AOTAutograd replayed the loss's view
    of the stats on the loss itself and failed (an IndexError for a scalar, a shape error per
    row). Both outputs and the gradient equal eager's."""
    import torch._dynamo

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    rows = 24
    target, leaves = _loss_inputs(loss_fn, device, gen, rows)
    kwargs = dict(reduction=reduction, two_phase=mode == "two_phase")

    def step(*args):
        loss = getattr(xt, loss_fn)(*args[:1] if loss_fn == "cross_entropy" else args, target, **kwargs)
        return loss, loss.detach()

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")

    def run(fn):
        args = [t.clone().requires_grad_(True) for t in leaves]
        loss, logged = fn(*args)
        (loss.sum() * 0.3).backward()
        return loss.detach(), logged, [a.grad for a in args]

    e_loss, e_logged, e_grads = run(step)
    c_loss, c_logged, c_grads = run(compiled)
    assert c_logged.shape == e_logged.shape == (() if reduction != "none" else (rows,))
    torch.testing.assert_close(c_loss, e_loss, rtol=LOSS_RTOL_F32, atol=0.0)
    torch.testing.assert_close(c_logged, e_logged, rtol=LOSS_RTOL_F32, atol=0.0)
    assert torch.equal(c_logged, c_loss)
    for got, want in zip(c_grads, e_grads):
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mode,reduction",
    [("fused", "mean"), ("fused", "sum"), ("two_phase", "mean"), ("two_phase", "sum"), ("two_phase", "none")],
)
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "linear_cross_entropy"])
def test_the_loss_may_be_changed_in_place(device, loss_fn, mode, reduction):
    """``loss += extra`` and ``loss.mul_(s)`` on the returned loss (Transformers' mixture-of-experts
    models add their router loss so): until session 49 the loss was a view of the forward's stats,
    and PyTorch refuses to change a custom Function's view in place. The gradient is the one of
    the loss changed out of place."""
    gen = torch.Generator().manual_seed(6)
    target, leaves = _loss_inputs(loss_fn, device, gen, rows=24)
    extra = torch.randn((), generator=gen).to(device).requires_grad_(True)

    def run(in_place):
        args = [t.clone().requires_grad_(True) for t in leaves]
        loss = getattr(xt, loss_fn)(*args, target, reduction=reduction, two_phase=mode == "two_phase")
        if in_place:
            loss += extra
            loss.mul_(0.7)
        else:
            loss = (loss + extra) * 0.7
        loss.sum().backward()
        return loss.detach(), [a.grad for a in args]

    want_loss, want_grads = run(False)
    got_loss, got_grads = run(True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0.0)
    for got, want in zip(got_grads, want_grads):
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7 * float(want.abs().max()))
    # Without autograd (a view of the stats there, no copy): in place as well.
    with torch.no_grad():
        loss = getattr(xt, loss_fn)(*leaves, target, reduction=reduction, two_phase=mode == "two_phase")
        loss += extra
        loss.mul_(0.7)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0.0)


class _LossModel(torch.nn.Module):
    """A Linear LM head then xent's loss: through ``xt.cross_entropy`` on the head's logits, or
    ``xt.linear_cross_entropy`` on the hidden states and the head's weight."""

    def __init__(self, loss_fn, dims, vocab, gen, **kwargs):
        super().__init__()
        self.loss_fn, self.kwargs = loss_fn, kwargs
        self.head = torch.nn.Linear(dims, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(vocab, dims, generator=gen) * 0.2)

    def forward(self, h, target):
        if self.loss_fn == "cross_entropy":
            return xt.cross_entropy(self.head(h), target, **self.kwargs)
        return xt.linear_cross_entropy(h, self.head.weight, target, **self.kwargs)


def _train_steps(model, step, batches):
    """Each batch's loss and the head's weight gradient (copies: a CUDA graph's outputs are
    overwritten by its next replay)."""
    out = []
    for h, target in batches:
        model.zero_grad(set_to_none=True)
        loss = step(h, target)
        (loss.sum() * 0.5).backward()
        out.append((loss.detach().clone(), model.head.weight.grad.clone()))
    return out


def _batches(device, dims, vocab, row_counts, gen):
    batches = []
    for rows in row_counts:
        h = torch.randn(rows, dims, generator=gen)
        target = torch.randint(0, vocab, (rows,), generator=gen)
        target[1::6] = -100
        batches.append((h.to(device), target.to(device)))
    return batches


COMPILE_MODEL_CASES = {
    "fused": dict(two_phase=False, label_smoothing=0.1),
    "two_phase": dict(two_phase=True, lse_square_scale=1e-3, softcap=30.0),
    "none": dict(reduction="none"),
}


@pytest.mark.parametrize("case", list(COMPILE_MODEL_CASES))
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "linear_cross_entropy"])
def test_torch_compile_dynamic_rows_compile_once(device, loss_fn, case):
    """``torch.compile(dynamic=True)`` (batches of varying length, as packing and variable
    sequence lengths give): the first batch's compiled frames serve every row count after it (the operators' fakes size
    their outputs in symbolic arithmetic), and every batch's loss and weight gradient equal
    eager's."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend  # counts frames compiled

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    dims, vocab = 32, 517
    model = _LossModel(loss_fn, dims, vocab, gen, **COMPILE_MODEL_CASES[case]).to(device)
    batches = _batches(device, dims, vocab, (40, 72, 136, 65), gen)
    counter = CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    got = _train_steps(model, compiled, batches[:1])
    first = counter.frame_count
    got += _train_steps(model, compiled, batches[1:])
    want = _train_steps(model, model, batches)
    assert first > 0 and counter.frame_count == first, f"recompiled: {first} frames, then {counter.frame_count}"
    for (c_loss, c_grad), (e_loss, e_grad) in zip(got, want):
        assert float(e_grad.abs().max()) > 0
        torch.testing.assert_close(c_loss, e_loss, rtol=LOSS_RTOL_F32, atol=0.0)
        torch.testing.assert_close(c_grad, e_grad, rtol=1e-4, atol=1e-5 * float(e_grad.abs().max()))


@cuda_only
@pytest.mark.parametrize("case", list(COMPILE_MODEL_CASES))
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "linear_cross_entropy"])
def test_torch_compile_reduce_overhead_replays_cuda_graphs(loss_fn, case):
    """``torch.compile(mode="reduce-overhead")``: Inductor records the step's forward and
    backward as CUDA graphs (nothing in xent's launches may allocate or synchronise during the
    capture) and replays them; five steps of the same shape on new data, then one of another
    shape (a second recording), each equal to eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    dims, vocab = 32, 517
    model = _LossModel(loss_fn, dims, vocab, gen, **COMPILE_MODEL_CASES[case]).cuda()
    batches = _batches("cuda", dims, vocab, (96,) * 5 + (48,), gen)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    got = _train_steps(model, compiled, batches)
    # Recorded (each graph node counts its non-static inputs, the batch's tensors), none skipped
    # (Inductor runs a graph it cannot capture without CUDA graphs, and says so only in its log).
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0, dict(counters["inductor"])
    want = _train_steps(model, model, batches)
    for i, ((c_loss, c_grad), (e_loss, e_grad)) in enumerate(zip(got, want)):
        assert float(e_grad.abs().max()) > 0
        # (The message keeps the mismatch's numbers: session 49's run 6 failed here once, at step
        # 0's gradient, and a bare "step 0" told nothing more.)
        torch.testing.assert_close(c_loss, e_loss, rtol=LOSS_RTOL_F32, atol=0.0, msg=lambda m: f"step {i}: {m}")
        torch.testing.assert_close(c_grad, e_grad, rtol=1e-4, atol=1e-5 * float(e_grad.abs().max()),
                                   msg=lambda m: f"step {i}: {m}")


# ---------------------------------------------------------------------------------------------
# CUDA only: device mismatch, CUDA graphs, streams, large cases
# ---------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_cuda_tensors_on_two_devices(requires_grad):
    x = torch.randn(8, 100, device="cuda", requires_grad=requires_grad)
    with pytest.raises(RuntimeError) as err:
        xt.cross_entropy(x, torch.zeros(8, dtype=torch.int64))
    assert "cuda:0" in str(err.value) and "cpu" in str(err.value)
    with pytest.raises(RuntimeError) as err:
        on_cpu = x.detach().cpu().requires_grad_(requires_grad)
        xt.cross_entropy(on_cpu, torch.zeros(8, dtype=torch.int64, device="cuda"))
    assert "cuda:0" in str(err.value) and "cpu" in str(err.value)
    with pytest.raises(RuntimeError) as err:
        xt.cross_entropy(x, torch.zeros(8, dtype=torch.int64, device="cuda"), torch.ones(100))
    assert "cuda:0" in str(err.value) and "cpu" in str(err.value)


@cuda_only
@pytest.mark.parametrize("mode", ["fused", "two_phase"])
def test_cuda_graph_capture_matches_eager(mode):
    """Forward + backward of xent's loss captured in a CUDA graph (warmed up on a side stream
    first, as PyTorch's docs say), replayed with new data copied into the static inputs: the
    loss and gradient are those of an eager call on the same data, bit for bit (the kernels and
    their fixed-order reductions are deterministic)."""
    rows, vocab, dtype = 96, 32003, torch.bfloat16
    kwargs = dict(label_smoothing=0.1, **MODES[mode])
    data = [make_inputs("cuda", (rows, vocab), dtype=dtype, seed=20 + i)[:2] for i in range(4)]
    static_x = torch.zeros(rows, vocab, device="cuda", dtype=dtype, requires_grad=True)
    static_t = torch.zeros(rows, dtype=torch.int64, device="cuda")

    def load(i):
        with torch.no_grad():
            static_x.copy_(data[i][0])
            static_t.copy_(data[i][1])

    def step():
        loss = xt.cross_entropy(static_x, static_t, **kwargs)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            load(0)
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)

    static_x.grad = None
    load(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    static_grad = static_x.grad

    for i in (1, 2, 3, 1):
        load(i)
        graph.replay()
        x = data[i][0].clone().requires_grad_()
        loss = xt.cross_entropy(x, data[i][1], **kwargs)
        loss.backward()
        torch.cuda.synchronize()
        assert torch.equal(static_loss, loss.detach()), f"replay {i}: {static_loss.item()} != {loss.item()}"
        assert torch.equal(static_grad, x.grad), f"replay {i}: gradients differ"
        check_loss(static_loss, reference(data[i][0], data[i][1], label_smoothing=0.1).loss, dtype)


@cuda_only
@pytest.mark.parametrize("mode", ["fused", "two_phase"])
@pytest.mark.parametrize("how", ["threads", "interleaved"])
def test_two_streams(how, mode):
    """Independent calls on two CUDA streams at once (from two threads, or interleaved from one
    thread) give the results of each call run alone on the default stream, bit for bit."""
    kwargs = dict(MODES[mode], lse_square_scale=1e-3)
    jobs = [make_inputs("cuda", (256, 32003), dtype=torch.bfloat16, seed=40 + i)[:2] for i in range(6)]

    def one(logits, target):
        x = logits.clone().requires_grad_()
        loss = xt.cross_entropy(x, target, **kwargs)
        (loss * 0.5).backward()
        return loss.detach().clone(), x.grad.clone()

    alone = [one(*job) for job in jobs]
    torch.cuda.synchronize()

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    results = [None] * len(jobs)
    if how == "threads":
        errors = []

        def worker(k):
            try:
                with torch.cuda.stream(streams[k]):
                    for i in range(k, len(jobs), 2):
                        results[i] = one(*jobs[i])
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
    else:
        for i, job in enumerate(jobs):
            with torch.cuda.stream(streams[i % 2]):
                results[i] = one(*job)
    torch.cuda.synchronize()
    for i, ((loss, grad), (loss_alone, grad_alone)) in enumerate(zip(results, alone)):
        assert torch.equal(loss, loss_alone), f"job {i}: loss {loss.item()} != {loss_alone.item()}"
        assert torch.equal(grad, grad_alone), f"job {i}: gradients differ"


@cuda_only
@pytest.mark.parametrize(
    "shape,dtype,mode",
    [
        ((512, 128256), torch.bfloat16, "fused"),
        ((512, 128256), torch.bfloat16, "two_phase_copy"),
        ((4096, 32003), torch.float16, "two_phase"),
    ],
    ids=["bf16_128k_fused", "bf16_128k_two_phase_copy", "f16_4096x32003_two_phase"],
)
def test_cuda_large(shape, dtype, mode):
    run_case("cuda", shape, dtype=dtype, mode=mode, label_smoothing=0.1, lse_square_scale=1e-4)
    run_case("cuda", shape, dtype=dtype, mode=mode, seed=1, upstream=0.5)
