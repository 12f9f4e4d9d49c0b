"""Tests of ``xent.torch.linear_cross_entropy`` / ``FusedLinearCrossEntropyLoss``.

The reference: the logits ``h·Wᵀ + b`` computed in float64 from the inputs' exact values,
``test_torch.reference`` on them (PyTorch's cross-entropy with Liger's options, float64
autograd), and the gradients of the hidden states, the weight and the bias from the logits'
gradient ``G`` by float64 matrix products: ``G·W``, ``Gᵀ·h``, ``Σ_rows G``.

Tolerances (GPU): the forward GEMM rounds each logit to the inputs' dtype (relative ``u``: 2^-8
for bfloat16, 2^-11 for float16, 2^-24 for float32, cuBLASLt accumulating in f32), which moves
each softmax probability by about ``p·|z|·u``; the kernel rounds ``G`` once more, and the gradient
GEMMs round their outputs (and, for a 16-bit weight gradient, once per chunk). So each gradient
element is allowed ``K·u·(1 + max|z|)`` times the sum of the absolute values of the terms it
sums (``|G|·|W|``, ``|G|ᵀ·|h|``, ``Σ|G|``), with ``K = 8``; the loss ``K·u·(1 + max|z|)·(1 +
|loss|)``. Measured errors sit well inside these (see the README's tolerance table).
"""

from __future__ import annotations

import os
import warnings

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import xent.torch as xt  # noqa: E402
from xent.torch.functional import scored_labels  # noqa: E402
from test_torch import reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
F64 = torch.float64
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
K = 8.0

OPTION_CASES = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "all": dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=4.0, grad_scale=0.5,
                return_z_loss=True, return_token_accuracy=True),
    "weighted": dict(weighted=True, label_smoothing=0.05),
    "causal": dict(causal_shift=True, label_smoothing=0.1),
    "ignore_7": dict(ignore_index=7),
}


def inputs(device, lead=(67,), d=64, v=1003, dtype=torch.bfloat16, bias=False, weighted=False,
           ignore_index=-100, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, d, generator=gen) * scale).to(dtype).to(device)
    w = (torch.randn(v, d, generator=gen) / d**0.5).to(dtype).to(device)
    b = (torch.randn(v, generator=gen) * 0.1).to(dtype).to(device) if bias else None
    y = torch.randint(0, v, lead, generator=gen)
    flat = y.reshape(-1)
    flat[3::5] = ignore_index
    cw = (torch.rand(v, generator=gen) + 0.5).to(device) if weighted else None
    return h, w, b, flat.reshape(lead).to(device), cw


class LinearReference:
    def __init__(self, h, w, b, y, cw, upstream=1.0, **opts):
        self.h64, self.w64 = h.detach().to(F64), w.detach().to(F64)
        self.b64 = None if b is None else b.detach().to(F64)
        logits = self.h64 @ self.w64.T
        if self.b64 is not None:
            logits = logits + self.b64
        self.zmax = float(logits.abs().max()) if logits.numel() else 0.0
        keep = {k: v for k, v in opts.items() if k not in ("return_z_loss", "return_token_accuracy")}
        self.ref = reference(logits, y, cw, upstream=upstream, **keep)
        g = self.ref.grad.reshape(-1, w.shape[0])
        hf = self.h64.reshape(-1, w.shape[1])
        self.grad_h = (g @ self.w64).reshape(h.shape)
        self.grad_w = g.T @ hf
        self.grad_b = g.sum(0)
        ga = g.abs()
        self.terms_h = (ga @ self.w64.abs()).reshape(h.shape)
        self.terms_w = ga.T @ hf.abs()
        self.terms_b = ga.sum(0)


def close(got, want, terms, dtype, zmax, what, extra=None):
    """``extra``: an absolute allowance added to the rounding's (the entropies' f32 error)."""
    assert got is not None, f"{what}: no gradient"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got.detach().to(F64).cpu() - want.cpu()).abs()
    allowed = K * UNIT[dtype] * (1.0 + zmax) * terms.cpu() + 1e-12
    if extra is not None:
        allowed = allowed + extra.cpu()
    bad = err > allowed
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {err.numel()} elements outside the tolerance; worst "
        f"error/allowed {float((err / allowed).max()):.3g}"
    )


def check_loss(got, want, dtype, zmax, what="loss"):
    got = got.detach().to(F64).cpu()
    want = want.to(F64).cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} against {tuple(want.shape)}"
    tol = K * UNIT[dtype] * (1.0 + zmax) * (1.0 + want.abs()) + 1e-6
    assert bool(((got - want).abs() <= tol).all()), f"{what}: {got} against {want}"


def run(device, case, dtype=torch.bfloat16, bias=False, lead=(67,), chunk_bytes=None,
        two_phase=None, upstream=1.0, accum_dtype=None, v=1003, d=64, skip_ignored=True):
    opts = dict(OPTION_CASES[case])
    weighted = opts.pop("weighted", False)
    if opts.get("causal_shift") and len(lead) == 1:
        lead = (3, 23)
    h, w, b, y, cw = inputs(device, lead, d, v, dtype, bias, weighted,
                            ignore_index=opts.get("ignore_index", -100))
    h.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    out = xt.linear_cross_entropy(h, w, y, b, ce_weight=cw, chunk_bytes=chunk_bytes, two_phase=two_phase,
                                  accum_dtype=accum_dtype, skip_ignored=skip_ignored, **opts)
    loss = out.loss if isinstance(out, xt.CrossEntropyOutput) else out
    if isinstance(upstream, torch.Tensor):
        (loss * upstream.to(loss.device)).sum().backward()
    else:
        (loss * upstream).sum().backward()
    ref = LinearReference(h, w, b, y, cw, upstream=upstream, **opts)
    check_loss(loss, ref.ref.loss, dtype, ref.zmax)
    if isinstance(out, xt.CrossEntropyOutput):
        if opts.get("return_z_loss"):
            check_loss(out.z_loss, ref.ref.z_loss, dtype, ref.zmax, "z_loss")
        if opts.get("return_token_accuracy"):
            # A logit within rounding of the row's maximum may change the argmax: allow one row.
            rows = float((y != opts.get("ignore_index", -100)).sum())
            assert abs(float(out.token_accuracy) - float(ref.ref.accuracy)) <= 1.0 / rows + 1e-6
    close(h.grad, ref.grad_h, ref.terms_h, dtype, ref.zmax, "grad_hidden")
    close(w.grad, ref.grad_w, ref.terms_w, dtype, ref.zmax, "grad_weight")
    if b is not None:
        close(b.grad, ref.grad_b, ref.terms_b, dtype, ref.zmax, "grad_bias")
    assert w.grad.dtype == w.dtype and h.grad.dtype == h.dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("skip", [True, False], ids=["scored_rows", "every_row"])
def test_options_match_reference(device, dtype, case, bias, skip):
    # chunks of 16 rows: five chunks, the last one shorter (four with the scored rows alone: a
    # fifth of the rows is ignored)
    run(device, case, dtype, bias, chunk_bytes=16 * 1003 * torch.tensor([], dtype=dtype).element_size(),
        skip_ignored=skip)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("two_phase", [False, True], ids=["fused", "two_phase"])
@pytest.mark.parametrize("upstream", [1.0, 0.5, 3.0])
def test_scalar_upstream(device, two_phase, upstream):
    run(device, "all", torch.bfloat16, True, two_phase=two_phase, upstream=upstream)


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_upstream_of_reduction_none(device):
    upstream = torch.linspace(-1.0, 2.0, 67)
    run(device, "none", torch.bfloat16, True, upstream=upstream, chunk_bytes=8 * 1003 * 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accum", [None, torch.float32], ids=["weight_dtype", "f32"])
def test_accum_dtype(device, accum):
    run(device, "mean", torch.bfloat16, True, accum_dtype=accum, chunk_bytes=8 * 1003 * 2)


@cuda_only
def test_grad_hidden_is_summed_over_vocabulary_blocks_in_f32(monkeypatch):
    """By blocks of the vocabulary (126 blocks of 8 classes at 4 rows' logits over 512 rows) the
    hidden states' gradient is a sum over the blocks: the two-phase backward, and a fused pass
    with ``accum_dtype=torch.float32``, sum it in an f32 buffer converted once, so they are
    nearer the float64 reference than a fused pass's sum in bfloat16 (one rounding a block; 4
    rows' logits leave no room for the f32 buffer, ``_f32_sum_fits``); all come back in
    bfloat16."""
    import xent.torch.linear as linear

    h, w, _, y, _ = inputs("cuda", (8, 64), d=64, v=1003, dtype=torch.bfloat16)
    seen = []
    real = linear._run

    def spy(call, opts, pass_name, *args, **kwargs):
        grads = real(call, opts, pass_name, *args, **kwargs)
        if grads[0] is not None:
            seen.append(grads[0].dtype)
        return grads

    monkeypatch.setattr(linear, "_run", spy)
    errors = {}
    cases = (("fused", None), ("fused", torch.float32), ("two-phase", None))
    for mode, accum in cases:
        hh = h.detach().clone().requires_grad_(True)
        loss = xt.linear_cross_entropy(hh, w, y, two_phase=mode == "two-phase", chunk_bytes=4 * 1003 * 2,
                                       accum_dtype=accum)
        loss.backward()
        assert hh.grad.dtype == torch.bfloat16
        ref = LinearReference(hh, w, None, y, None)
        errors[mode, accum] = float((hh.grad.to(F64) - ref.grad_h.to(hh.device)).abs().max())
        if (mode, accum) != ("fused", None):
            close(hh.grad, ref.grad_h, ref.terms_h, torch.bfloat16, ref.zmax, f"grad_hidden ({mode}, {accum})")
    assert seen == [torch.bfloat16, torch.float32, torch.float32], seen
    bf16_sum = errors["fused", None]
    assert errors["fused", torch.float32] < bf16_sum and errors["two-phase", None] < bf16_sum, errors


def test_row_scheme_threshold_follows_the_library(monkeypatch):
    """The package decides as ``Scheme::of`` does which chunks take the row scheme: from a card's
    crossover (``_xent.linear_row_scheme_rows``) or every row, and may from 192 rows (where an
    in-place gradient takes it), ``XENT_ROW_SCHEME_MIN_ROWS`` included (a knob for measuring the
    two schemes, which sets both)."""
    import xent.torch.linear as linear
    from xent import _xent

    monkeypatch.delenv("XENT_ROW_SCHEME_MIN_ROWS", raising=False)
    assert _xent.linear_row_scheme_min_rows() == _xent.LINEAR_ROW_SCHEME_MIN_ROWS == 192
    assert linear._row_scheme(192, 8192) and not linear._row_scheme(191, 8192) and linear._row_scheme(100, 100)
    # An H100 SXM's crossover: 256-row chunks by blocks there, but they may take rows in place.
    assert not linear._row_scheme(256, 8192, 282) and linear._row_scheme(288, 8192, 282)
    assert linear._row_scheme(256, 256, 282) and linear._row_scheme(256, 8192)
    monkeypatch.setenv("XENT_ROW_SCHEME_MIN_ROWS", "512")
    assert _xent.linear_row_scheme_min_rows() == 512
    assert not linear._row_scheme(256, 8192) and linear._row_scheme(512, 8192) and linear._row_scheme(300, 300)
    for bad in ("0", "x", ""):
        monkeypatch.setenv("XENT_ROW_SCHEME_MIN_ROWS", bad)
        assert _xent.linear_row_scheme_min_rows() == 192


@cuda_only
def test_the_cards_row_scheme_crossover(monkeypatch):
    """The card's crossover of the two gradient schemes lies within the library's bounds (192 to
    448 rows: the H200's, and where an H100 took the row scheme faster), and the knob sets it."""
    import xent.torch.linear as linear
    from xent import _xent

    monkeypatch.delenv("XENT_ROW_SCHEME_MIN_ROWS", raising=False)
    handle = linear._device(torch.cuda.current_device())
    rows = _xent.linear_row_scheme_rows(handle)
    print(f"{torch.cuda.get_device_name()}: the row scheme from {rows} rows a chunk")
    assert 192 <= rows <= 448, rows
    monkeypatch.setenv("XENT_ROW_SCHEME_MIN_ROWS", "100")
    assert _xent.linear_row_scheme_rows(handle) == 100


@cuda_only
def test_fused_blocks_sum_grad_hidden_in_f32_within_the_budget(monkeypatch):
    """A fused pass whose chunks take the gradients by blocks of the vocabulary (under 192 rows)
    sums the hidden states' gradient in an f32 buffer where the buffer is at most half the
    chunks' logits (``_f32_sum_fits``), converted once to bfloat16: nearer the float64 reference
    than the sum in bfloat16 (the same call with the buffer refused), and as near as one rounding
    allows. 512 x 64 x 1003 at 160 rows' logits (313 KiB) beside the 128 KiB buffer: chunks of 128
    rows, blocks of 192 classes."""
    import xent.torch.linear as linear

    h, w, _, y, _ = inputs("cuda", (8, 64), d=64, v=1003, dtype=torch.bfloat16)
    budget = 160 * 1003 * 2
    assert linear._f32_sum_fits(512, 64, 1003, torch.bfloat16, budget)
    assert not linear._f32_sum_fits(512, 64, 1003, torch.bfloat16, 128 * 1003 * 2)
    seen = []
    real = linear._xent.linear

    def spy(*args):
        seen.append(args[15][0][1])  # the hidden states' gradient's dtype, as the call got it
        return real(*args)

    monkeypatch.setattr(linear._xent, "linear", spy)
    errors = {}
    for f32_sum in (True, False):
        if not f32_sum:
            monkeypatch.setattr(linear, "_f32_sum_fits", lambda *args: False)
        hh = h.detach().clone().requires_grad_(True)
        loss = xt.linear_cross_entropy(hh, w, y, chunk_bytes=budget)
        loss.backward()
        assert hh.grad.dtype == torch.bfloat16
        ref = LinearReference(hh, w, None, y, None)
        check_loss(loss, ref.ref.loss, torch.bfloat16, ref.zmax)
        errors[f32_sum] = float((hh.grad.to(F64) - ref.grad_h.to(hh.device)).abs().max())
        if f32_sum:
            close(hh.grad, ref.grad_h, ref.terms_h, torch.bfloat16, ref.zmax, "grad_hidden (f32 sum)")
    assert seen == ["float32", "bfloat16"], seen
    assert errors[True] < errors[False], errors


@pytest.mark.parametrize("device", DEVICES)
def test_module_is_liger_shaped(device):
    h, w, b, y, _ = inputs(device, bias=True)
    loss_fn = xt.FusedLinearCrossEntropyLoss(label_smoothing=0.1, return_z_loss=True, lse_square_scale=1e-4)
    out = loss_fn(w, h, y, b)  # Liger's argument order: weight first
    assert isinstance(out, xt.CrossEntropyOutput) and out.z_loss is not None
    direct = xt.linear_cross_entropy(h, w, y, b, label_smoothing=0.1, lse_square_scale=1e-4)
    assert torch.equal(out.loss, direct)
    assert "label_smoothing=0.1" in repr(loss_fn)
    with pytest.raises(ValueError):
        xt.FusedLinearCrossEntropyLoss(reduction="avg")


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_gives_the_loss(device):
    h, w, b, y, _ = inputs(device, bias=True)
    with torch.no_grad():
        loss = xt.linear_cross_entropy(h, w, y, b)
    ref = LinearReference(h, w, b, y, None)
    check_loss(loss, ref.ref.loss, torch.bfloat16, ref.zmax)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_rows(device, reduction):
    """A call with no rows (every row of a batch dropped, as ``fuse_linear_cross_entropy`` drops
    ignored ones): PyTorch's loss (NaN for the mean, 0 for the sum), and zero gradients of the
    weight and bias, from backward too (its scaling once divided by the rows: an error)."""
    h, w, b, y, _ = inputs(device, bias=True)
    h, w, b = (t.detach().requires_grad_(True) for t in (h[:0], w, b))
    loss = xt.linear_cross_entropy(h, w, y[:0], b, reduction=reduction)
    want = F.cross_entropy(F.linear(h.float(), w.float(), b.float()), y[:0], reduction=reduction)
    torch.testing.assert_close(loss.float(), want, equal_nan=True)
    loss.backward()
    assert h.grad.shape == h.shape
    for grad in (w.grad, b.grad):
        assert grad is not None and not grad.any()


def rows_reaching_the_gemms(monkeypatch, device):
    """A list that collects the rows of each call's hidden states where the GEMMs take them (the
    CUDA path's autograd Function, the CPU path's ``F.linear``)."""
    import xent.torch.linear as linear

    rows = []
    if device == "cuda":
        real = linear.LinearXentFunction.apply

        def spy(hidden, *args):
            rows.append(hidden.shape[0])
            return real(hidden, *args)

        monkeypatch.setattr(linear.LinearXentFunction, "apply", spy)
    else:
        real_linear = F.linear

        def spy_linear(hidden, *args):
            rows.append(hidden.reshape(-1, hidden.shape[-1]).shape[0])
            return real_linear(hidden, *args)

        monkeypatch.setattr(torch.nn.functional, "linear", spy_linear)
    return rows


SKIP_CASES = {
    "mean": dict(),
    "sum": dict(reduction="sum", return_z_loss=True, lse_square_scale=1e-3),
    "none": dict(reduction="none", return_z_loss=True, lse_square_scale=1e-3, return_token_accuracy=True),
    "causal": dict(causal_shift=True, label_smoothing=0.1, softcap=4.0, return_token_accuracy=True),
    "weighted": dict(weighted=True, label_smoothing=0.05, grad_scale=0.5),
    "ignore_7": dict(ignore_index=7, two_phase=True, accum_dtype=torch.float32),
    "token_scaling": dict(use_token_scaling=True, reduction="none", causal_shift=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_skip_ignored_computes_only_the_scored_rows(device, dtype, case, monkeypatch):
    """``skip_ignored`` (the default): only the scored rows reach the GEMMs, and every result is
    laid out as the call's rows, equal to those of ``skip_ignored=False`` (which takes every row)
    up to the order of the sums: the loss, z-loss and token accuracy (per row under
    ``reduction="none"``: 0 where not scored), the predicted tokens (-1 where not scored) and the
    three gradients. A call that would drop under 1/16 of its rows takes them all."""
    opts = dict(SKIP_CASES[case])
    weighted = opts.pop("weighted", False)
    ignore_index = opts.get("ignore_index", -100)
    h, w, b, y, cw = inputs(device, (3, 29), dtype=dtype, bias=True, weighted=weighted, ignore_index=ignore_index)
    y[0, :11] = ignore_index  # a prompt, beside every fifth label
    labels = y[..., 1:] if opts.get("causal_shift") else y
    scored = int((labels != ignore_index).sum())
    rows = rows_reaching_the_gemms(monkeypatch, device)
    results = {}
    for skip in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
        out = xt.linear_cross_entropy(*leaves[:2], y, leaves[2], ce_weight=cw, return_predicted_tokens=True,
                                      skip_ignored=skip, **opts)
        ((out.loss * torch.linspace(0.5, 2.0, out.loss.numel(), device=device).view(out.loss.shape)).sum()
         ).backward()
        results[skip] = out, [t.grad for t in leaves]
    assert rows == [scored, h.shape[0] * h.shape[1]], rows
    (got, got_grads), (want, want_grads) = results[True], results[False]
    # The GEMMs over other rows may round a logit otherwise (another algorithm), so a row's
    # argmax may move within a tie: one row's prediction and accuracy may differ.
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for what in ("loss", "z_loss", "token_accuracy"):
        a, c = getattr(got, what), getattr(want, what)
        assert (a is None) == (c is None), what
        if a is None:
            continue
        assert a.shape == c.shape, what
        if what == "token_accuracy":
            assert float((a - c).abs().sum()) <= 1.0 / (scored if a.dim() == 0 else 1) + 1e-6, what
        else:
            torch.testing.assert_close(a, c, **tol, msg=what)
    if opts.get("reduction") == "none":
        unscored = scored_labels(y, ignore_index, opts.get("causal_shift", False)) == ignore_index
        assert bool((got.loss[unscored] == 0).all())
    assert got.predicted_tokens.shape == y.shape
    assert torch.equal(got.predicted_tokens >= 0, want.predicted_tokens >= 0)
    assert int((got.predicted_tokens != want.predicted_tokens).sum()) <= 1
    assert int((got.predicted_tokens >= 0).sum()) == scored
    for what, a, c in zip(("grad_hidden", "grad_weight", "grad_bias"), got_grads, want_grads):
        assert a.dtype == c.dtype and a.shape == c.shape, what
        assert float(c.abs().max()) > 0, what
        torch.testing.assert_close(a.float(), c.float(), **tol, msg=what)

    # Under 1/16 of the rows left out (each sequence's last under the causal shift, or one row):
    # every row goes through.
    rows.clear()
    few = torch.randint(0, w.shape[0], y.shape, generator=torch.Generator().manual_seed(3)).to(device)
    few[1, 4] = ignore_index
    xt.linear_cross_entropy(h, w, few, b, ce_weight=cw, **opts)
    assert rows == [h.shape[0] * h.shape[1]], rows


@pytest.mark.parametrize("device", DEVICES)
def test_skip_ignored_takes_every_row_of_a_small_call(device, monkeypatch):
    """Under ``_SKIP_MIN_PRODUCTS`` products ``rows·D·V`` (the shipped value; the other tests set
    it to 0) a call computes every row without counting them, and from that size on it skips."""
    import conftest
    import xent.torch.linear as linear

    monkeypatch.setattr(linear, "_SKIP_MIN_PRODUCTS", conftest.SKIP_MIN_PRODUCTS)
    assert linear._SKIP_MIN_PRODUCTS == 1 << 35
    h, w, b, y, _ = inputs(device, (3, 29), bias=True)
    y[0, :11] = -100
    rows = rows_reaching_the_gemms(monkeypatch, device)
    xt.linear_cross_entropy(h, w, y, b)
    assert rows == [87]
    # The same call as if it were at the threshold: skipped.
    monkeypatch.setattr(linear, "_SKIP_MIN_PRODUCTS", 87 * 64 * 1003)
    rows.clear()
    xt.linear_cross_entropy(h, w, y, b)
    assert rows == [int((y != -100).sum())]


def test_skip_ignored_keeps_the_copy_within_the_calls_budget():
    """The scored rows' copy (with their labels and indices) comes out of the memory the call's
    chunks would have over every row (``chunk_bytes`` and cuBLASLt's workspace, or the default
    eighth of the logits), and in a fused pass the copy's gradient too, less the whole gradient a
    call over every row holds anyway; where that leaves under half of its logits, a fused pass
    writes the copy's gradient over the copy (chunks of the row scheme only), and otherwise
    every row is taken."""
    import xent.torch.linear as linear
    from xent import _xent

    n, k, d, v = 8192, 7021, 4096, 128256  # one row in seven ignored, as linear_bench.py's labels
    bf16 = torch.bfloat16
    total = _xent.linear_chunks_budget(n, v, "bfloat16")
    assert total == n * v * 2 // 8
    copy = k * d * 2 + 16 * k
    held = copy + k * d * 2 - n * d * 2  # 45.7 MiB
    budget, in_place = linear._rows_budget(n, k, d, v, bf16, None, True, True)
    assert (budget, in_place) == (_xent.linear_logits_within(total - held), False)
    assert _xent.linear_chunks_budget(k, v, "bfloat16", budget) + held <= total
    assert _xent.linear_chunk_rows(k, v, "bfloat16", budget) == 784
    # Two-phase, or without a gradient: the copy beside the chunks.
    for needs_grad, fused in ((True, False), (False, True)):
        got = linear._rows_budget(n, k, d, v, bf16, None, needs_grad, fused)
        assert got == (_xent.linear_logits_within(total - copy), False)
    # An explicit budget: its logits and their workspace.
    given = 600 * v * 2
    got = linear._rows_budget(n, k, d, v, bf16, given, True, True)
    assert got == (_xent.linear_logits_within(_xent.linear_chunks_budget(n, v, "bfloat16", given) - held), False)
    # Liger's memory (256 rows): no room beside the copy. A fused pass writes its gradient over
    # the copy and keeps the whole budget (the copy is less than the whole gradient): 28 chunks of
    # 256 rows for 7021; a two-phase pass takes every row.
    liger = 256 * v * 2
    budget, in_place = linear._rows_budget(n, k, d, v, bf16, liger, True, True)
    assert in_place and budget == _xent.linear_logits_within(_xent.linear_chunks_budget(n, v, "bfloat16", liger))
    assert _xent.linear_chunk_rows(k, v, "bfloat16", budget) == 256
    assert linear._rows_budget(n, k, d, v, bf16, liger, True, False) is None
    # So for a small vocabulary beside wide rows (32000 x 4096), but a fused pass's chunks at the
    # default budget (the 64 MiB floor) take the row scheme in place: 896 rows.
    assert linear._rows_budget(n, k, d, 32000, bf16, None, True, False) is None
    budget, in_place = linear._rows_budget(n, k, d, 32000, bf16, None, True, True)
    assert in_place and _xent.linear_chunk_rows(k, 32000, "bfloat16", budget) == 896
    # In place only where the chunks take the row scheme (at least 192 rows, or every row).
    assert linear._rows_budget(n, k, d, v, bf16, 100 * v * 2, True, True) is None
    # Half the rows scored, fused: the copy and its gradient take what the whole gradient would,
    # so the chunks keep every row's budget, more than the default of the scored rows alone.
    half, in_place = linear._rows_budget(n, n // 2, d, v, bf16, None, True, True)
    assert not in_place and half == _xent.linear_logits_within(total - 16 * (n // 2))
    assert half > _xent.linear_chunks_budget(n // 2, v, "bfloat16")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_skip_ignored_writes_a_fused_gradient_over_its_copy(dtype, monkeypatch):
    """Where the copy of the scored rows and its gradient do not fit the budget beside the chunks
    (2048 features, a budget of the call's 87 rows of logits), a fused pass writes the gradient
    over the copy (one chunk of the 60 scored rows; the gradient GEMMs one after the other): the
    loss and the three gradients equal those of every row (``skip_ignored=False``, written beside
    the hidden states), for three option sets."""
    import xent.torch.linear as linear

    h, w, b, y, _ = inputs("cuda", (3, 29), d=2048, dtype=dtype, bias=True)
    y[0, :11] = -100
    budget = 87 * w.shape[0] * w.element_size()
    seen = []
    real = linear._run

    def spy(call, opts, pass_name, *args, **kwargs):
        grads = real(call, opts, pass_name, *args, **kwargs)
        if grads[0] is not None:
            seen.append((pass_name, grads[0].data_ptr() == call.hidden.data_ptr()))
        return grads

    monkeypatch.setattr(linear, "_run", spy)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for case in ({}, dict(reduction="sum", label_smoothing=0.1, lse_square_scale=1e-3),
                 dict(causal_shift=True, softcap=4.0, grad_scale=0.5)):
        results = {}
        for skip in (True, False):
            seen.clear()
            leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
            loss = xt.linear_cross_entropy(*leaves[:2], y, leaves[2], chunk_bytes=budget, skip_ignored=skip, **case)
            (loss * 0.7).backward()
            assert seen == [("fused", skip)], (case, skip, seen)
            results[skip] = loss.detach(), [t.grad for t in leaves]
        (got, got_grads), (want, want_grads) = results[True], results[False]
        torch.testing.assert_close(got, want, **tol, msg=f"{case}: loss")
        for what, a, c in zip(("grad_hidden", "grad_weight", "grad_bias"), got_grads, want_grads):
            assert float(c.abs().max()) > 0, what
            torch.testing.assert_close(a.float(), c.float(), **tol, msg=f"{case}: {what}")


@pytest.mark.parametrize("device", DEVICES)
def test_skip_ignored_takes_every_row_where_the_copy_does_not_fit_the_budget(device, monkeypatch):
    """A ``chunk_bytes`` of two rows of logits has no room for a copy of the scored rows (each
    of 64 features): every row goes through, with and without a gradient; at the default budget
    the scored rows alone."""
    h, w, b, y, _ = inputs(device, (3, 29), bias=True)
    y[0, :11] = -100
    scored = int((y != -100).sum())
    rows = rows_reaching_the_gemms(monkeypatch, device)
    two_rows = 2 * w.shape[0] * w.element_size()
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    xt.linear_cross_entropy(*leaves[:2], y, leaves[2], chunk_bytes=two_rows).backward()
    with torch.no_grad():
        xt.linear_cross_entropy(h, w, y, b, chunk_bytes=two_rows)
    xt.linear_cross_entropy(*leaves[:2], y, leaves[2]).backward()
    assert rows == [87, 87, scored], rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_skip_ignored_with_every_label_ignored(device, reduction, monkeypatch):
    """Every label ignored: no rows reach the GEMMs; the loss is PyTorch's (NaN for the mean, 0
    for the sum, zeros per row), and the gradients are zero."""
    h, w, b, y, _ = inputs(device, (2, 13), bias=True)
    y = torch.full_like(y, -100)
    rows = rows_reaching_the_gemms(monkeypatch, device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    loss = xt.linear_cross_entropy(*leaves[:2], y, leaves[2], reduction=reduction, return_predicted_tokens=True)
    assert rows == [0]
    want = F.cross_entropy(F.linear(h.float(), w.float(), b.float()).view(-1, w.shape[0]), y.view(-1),
                           reduction=reduction)
    torch.testing.assert_close(loss.loss.float(), want.view(loss.loss.shape), equal_nan=True)
    assert bool((loss.predicted_tokens == -1).all()) and loss.predicted_tokens.shape == y.shape
    loss.loss.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and not leaf.grad.any()


@cuda_only
def test_skip_ignored_is_off_under_cuda_graph_capture():
    """Capturing a call in a CUDA graph cannot wait to count its rows: every row is computed, and
    the replayed loss is that of ``skip_ignored=False`` outside the graph."""
    h, w, b, y, _ = inputs("cuda", (3, 29), bias=True)
    want = xt.linear_cross_entropy(h, w, y, b, skip_ignored=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        xt.linear_cross_entropy(h, w, y, b)  # warm-up outside capture (cuBLASLt's handle, the kernels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        loss = xt.linear_cross_entropy(h, w, y, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, want)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_weight_and_3d_input(device):
    h, w, b, y, _ = inputs(device, lead=(2, 33))
    h.requires_grad_(True)
    loss = xt.linear_cross_entropy(h, w, y, chunk_bytes=10 * 1003 * 2)
    loss.backward()
    assert w.grad is None and h.grad.shape == h.shape
    ref = LinearReference(h, w, None, y, None)
    close(h.grad, ref.grad_h, ref.terms_h, torch.bfloat16, ref.zmax, "grad_hidden")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    h, w, b, y, _ = inputs(device, bias=True)
    with pytest.raises(TypeError):
        xt.linear_cross_entropy(h.float(), w, y)
    with pytest.raises(ValueError):
        xt.linear_cross_entropy(h, w[:, :-1], y)
    with pytest.raises(ValueError):
        xt.linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError):
        xt.linear_cross_entropy(h, w, y, b[:-1])
    with pytest.raises(TypeError):
        xt.linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError):
        xt.linear_cross_entropy(h, w, y, accum_dtype=torch.float16)
    with pytest.raises(ValueError):
        xt.linear_cross_entropy(h, w, y, label_smoothing=2.0)
    with pytest.raises(ValueError):
        xt.linear_cross_entropy(h[0], w, y[0], causal_shift=True)  # no sequence dimension


# The issue's grid, on the GPU against PyTorch in float32 (TF32 off): D in {2048, 4096},
# V in {32000, 128256, 256000}, N in {1, 1000, 8192}, bf16 and f32, plain and every option.
GRID = [(n, d, v) for d in (2048, 4096) for v in (32000, 128256, 256000) for n in (1, 1000, 8192)]


def torch_f32(h, w, y, opts):
    """PyTorch in float32: logits, options, autograd; and the sums of the absolute values of the
    terms each gradient element sums (``|G|·|W|``, ``|G|ᵀ·|h|``), which bound the error of
    either side's f32 sums."""
    hf = h.detach().float().requires_grad_(True)
    wf = w.detach().float().requires_grad_(True)
    z = hf @ wf.T
    z.retain_grad()
    zc = z
    cap = opts.get("softcap")
    if cap is not None:
        zc = cap * torch.tanh(z / cap)
    eps = opts.get("label_smoothing", 0.0)
    ce = F.cross_entropy(zc, y, ignore_index=-100, label_smoothing=eps)
    s = opts.get("lse_square_scale", 0.0)
    if s:
        valid = y != -100
        lse = torch.logsumexp(zc, -1)
        ce = ce + s * (lse[valid] ** 2).mean()
    ce.backward()
    # |G| plus the label smoothing's constant ε/V per scored row, which G_j = p_j·(...) - ε/V
    # cancels where p_j is near ε/V (the GPU's error is relative to the parts, not to G_j).
    valid = (y != -100).float()
    g = z.grad.abs() + (2 * eps / w.shape[0] / max(float(valid.sum()), 1.0)) * valid[:, None]
    terms_h = g @ wf.detach().abs()
    terms_w = g.T @ hf.detach().abs()
    return ce.detach(), hf.grad, wf.grad, terms_h, terms_w


@cuda_only
@pytest.mark.skipif(os.environ.get("XENT_LINEAR_GRID", "1") == "0", reason="XENT_LINEAR_GRID=0")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("case", ["plain", "options"])
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "x".join(map(str, s)))
def test_issue_grid_against_torch_f32(shape, case, dtype):
    n, d, v = shape
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(n + d + v)
    h = (torch.randn(n, d, device="cuda", generator=gen)).to(dtype)
    w = (torch.randn(v, d, device="cuda", generator=gen) / d**0.5).to(dtype)
    y = torch.randint(0, v, (n,), device="cuda", generator=gen)
    y[1::7] = -100
    opts = {} if case == "plain" else dict(label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0)
    want_loss, want_h, want_w, terms_h, terms_w = torch_f32(h, w, y, opts)
    hx = h.clone().requires_grad_(True)
    wx = w.clone().requires_grad_(True)
    loss = xt.linear_cross_entropy(hx, wx, y, **opts)
    loss.backward()
    # Per element, times the sum of its terms' magnitudes (a near-uniform softmax's gradients
    # cancel: the result is far below its terms): the error of a logit, which moves the
    # probabilities by as much relatively, is its rounding to bf16 (u·|z|) plus the f32 sums of
    # D products on both sides (4·sqrt(D) f32 units of Σ_k |h_k·w_jk|, the typical size of a
    # sum's error; zterm is the largest such sum).
    zmax = 6.0
    zterm = float((h.float().abs() @ w.float().abs().T).max())
    u32 = UNIT[torch.float32]
    tol = K * (UNIT[dtype] * (1 + zmax) + 4 * d**0.5 * u32 * zterm)
    lt = float((loss.detach().float() - want_loss).abs())
    assert lt <= tol * (1 + float(want_loss.abs())), f"loss {float(loss)} against {float(want_loss)}"
    for what, got, want, terms in (("grad_hidden", hx.grad, want_h, terms_h),
                                   ("grad_weight", wx.grad, want_w, terms_w)):
        assert not bool(got.isnan().any()), f"{what}: NaN"
        err = (got.float() - want).abs()
        ratio = float((err / (tol * terms + 1e-30)).max())
        assert ratio <= 1.0, f"{what}: worst error / allowed {ratio:.3g} (tolerance {tol:.3g} of the terms)"


@cuda_only
def test_torch_compile_gives_eager_results_without_dynamo_warnings():
    h, w, b, y, _ = inputs("cuda", bias=True)

    def step(h, w, b):
        return xt.linear_cross_entropy(h, w, y, b, label_smoothing=0.1, skip_ignored=False)

    compiled = torch.compile(step)
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn in (step, compiled, compiled):  # the second compiled call reuses the compiled graph
            hx, wx, bx = (t.clone().requires_grad_(True) for t in (h, w, b))
            loss = fn(hx, wx, bx)
            loss.backward()
            results.append((loss.detach(), hx.grad, wx.grad, bx.grad))
    # Dynamo traced the option check, and warned of its cache and of the extension's Options type
    # (until session 27).
    dynamo = [str(w.message) for w in caught if "lru_cache" in str(w.message) or "Options" in str(w.message)]
    assert not dynamo, dynamo
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


COMPILE_CASES = {
    # The fused pass (mean), its gradients scaled by the upstream in backward.
    "fused": dict(label_smoothing=0.1, lse_square_scale=1e-3),
    # Two-phase, class weights, an f32 weight-gradient accumulator, the causal shift.
    "two_phase": dict(two_phase=True, weighted=True, accum_dtype=torch.float32, causal_shift=True, softcap=20.0),
    # Per-row losses: two-phase with a per-row upstream.
    "none": dict(reduction="none", label_smoothing=0.05),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_torch_compile_fullgraph_matches_eager(device, case):
    """``linear_cross_entropy`` compiled with ``fullgraph=True`` (a graph break fails: until
    session 47 the CUDA call was one): no graph break, and the loss, z-loss, token accuracy,
    predicted tokens, entropies and the three gradients equal eager's with ``skip_ignored=False``, for
    upstream gradients 1 and 0.3 (compiled, the default ``skip_ignored`` computes every row). CUDA
    through Inductor (the custom operators ``torch.ops.xent.linear_*``), the CPU's unfused path
    through AOTAutograd with the aot_eager backend."""
    import torch._dynamo

    torch._dynamo.reset()
    options = dict(COMPILE_CASES[case])
    weighted = options.pop("weighted", False)
    h, w, b, y, cw = inputs(device, lead=(3, 29), bias=True, weighted=weighted)
    kwargs = dict(options, ce_weight=cw, return_z_loss=True, return_token_accuracy=True,
                  return_predicted_tokens=True, return_entropy=True)

    def step(h, w, b, **more):
        out = xt.linear_cross_entropy(h, w, y, b, **kwargs, **more)
        return out.loss, out.z_loss, out.token_accuracy, out.predicted_tokens, out.entropy

    def eager(h, w, b):
        return step(h, w, b, skip_ignored=False)

    def leaves():
        return tuple(t.clone().requires_grad_(True) for t in (h, w, b))

    explanation = torch._dynamo.explain(step)(*leaves())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")

    def run(fn, c):
        hx, wx, bx = leaves()
        loss, z_loss, accuracy, predicted, entropy = fn(hx, wx, bx)
        (loss.sum() * c).backward()
        return [t.detach() for t in (loss, z_loss, accuracy, predicted, entropy)], (hx.grad, wx.grad, bx.grad)

    for c in (1.0, 0.3):
        (e_loss, e_z, e_acc, e_pred, e_ent), e_grads = run(eager, c)
        (c_loss, c_z, c_acc, c_pred, c_ent), c_grads = run(compiled, c)
        assert torch.equal(c_loss, e_loss), (case, c)
        assert torch.equal(c_pred, e_pred)
        assert torch.equal(c_ent, e_ent) and float(e_ent.max()) > 0
        assert int((e_pred >= 0).sum()) > 0
        # The z-loss and accuracy are torch arithmetic on the stats, which Inductor may fuse.
        torch.testing.assert_close(c_z, e_z, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(c_acc, e_acc, rtol=1e-6, atol=0.0)
        for what, got, want in zip(("grad_hidden", "grad_weight", "grad_bias"), c_grads, e_grads):
            assert got is not None and got.dtype == want.dtype, what
            assert float(want.abs().max()) > 0, f"{what}: all zero"
            assert torch.equal(got, want), f"{case}, upstream {c}: {what} differs"


def token_scaled_reference(h, w, b, y, cw, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                           lse_square_scale=0.0, softcap=None, causal_shift=False, grad_scale=1.0, **_):
    """Liger's token scaling in float64 (its ``fused_linear_cross_entropy_forward``): each scored
    row's loss and z-loss part times ``softmax(x)[y]`` (detached) of its soft-capped logits; the
    mean divides the cross-entropy part by the scored rows (their labels' class weights with
    ``cw``) and the z-loss part by the scored rows. Returns (loss, z_loss, grad of the logits
    [rows, V], zmax)."""
    h64, w64 = h.detach().to(F64).cpu(), w.detach().to(F64).cpu()
    full = h64 @ w64.T
    if b is not None:
        full = full + b.detach().to(F64).cpu()
    zmax = float(full.abs().max()) if full.numel() else 0.0
    leaf = full.clone().requires_grad_()
    x, t = leaf, y.detach().cpu().to(torch.int64)
    if causal_shift:
        x, t = x[..., :-1, :], t[..., 1:]
    x, t = x.reshape(-1, w.shape[0]), t.reshape(-1)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    valid = t != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    cw64 = None if cw is None else cw.detach().to(F64).cpu()
    ce = F.cross_entropy(x, t, weight=cw64, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         reduction="none")
    z = torch.where(valid, lse_square_scale * lse * lse, torch.zeros_like(lse))
    label_x = x.detach().gather(1, t.clamp(min=0).view(-1, 1)).view(-1)
    scale = torch.where(valid, torch.exp(label_x - lse.detach()), torch.zeros_like(lse))
    if reduction == "none":
        loss, z_loss = scale * (ce + z), scale * z
        if causal_shift:  # laid out as the target: 0 at each sequence's last position
            pad = loss.new_zeros(y.shape[:-1] + (1,))
            loss = torch.cat([loss.view(y.shape[:-1] + (-1,)), pad], dim=-1)
            z_loss = torch.cat([z_loss.view(y.shape[:-1] + (-1,)), pad.detach()], dim=-1)
        loss, z_loss = loss.reshape(y.shape), z_loss.reshape(y.shape)
    elif reduction == "sum":
        loss, z_loss = (scale * (ce + z)).sum(), (scale * z).sum()
    else:
        n = valid.sum().to(F64)
        denominator = n if cw64 is None else cw64[t[valid]].sum()
        loss, z_loss = (scale * ce).sum() / denominator + (scale * z).sum() / n, (scale * z).sum() / n
    (grad,) = torch.autograd.grad(grad_scale * loss.sum(), leaf)
    return loss.detach(), z_loss.detach(), grad.reshape(-1, w.shape[0]), zmax


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["mean", "sum", "none", "all", "weighted", "causal", "ignore_7"])
def test_token_scaling_matches_liger_definition(device, dtype, case):
    opts = dict(OPTION_CASES[case])
    weighted = opts.pop("weighted", False)
    lead = (3, 23) if opts.get("causal_shift") else (67,)
    h, w, b, y, cw = inputs(device, lead, 64, 1003, dtype, True, weighted,
                            ignore_index=opts.get("ignore_index", -100), scale=3.0)
    for t in (h, w, b):
        t.requires_grad_(True)
    out = xt.linear_cross_entropy(h, w, y, b, ce_weight=cw, use_token_scaling=True,
                                  chunk_bytes=16 * 1003 * h.element_size(), **opts)
    loss = out.loss if isinstance(out, xt.CrossEntropyOutput) else out
    loss.sum().backward()
    want, want_z, g, zmax = token_scaled_reference(h, w, b, y, cw, **opts)
    check_loss(loss, want, dtype, zmax)
    if opts.get("return_z_loss"):
        check_loss(out.z_loss, want_z, dtype, zmax, "z_loss")
    if opts.get("return_token_accuracy"):
        assert out.token_accuracy is not None and 0.0 <= float(out.token_accuracy) <= 1.0
    # The scale is not 1: the scaled loss differs from the unscaled one.
    plain = xt.linear_cross_entropy(h.detach(), w.detach(), y, b.detach(), ce_weight=cw, **opts)
    plain = plain.loss if isinstance(plain, xt.CrossEntropyOutput) else plain
    assert float((plain.detach().to(F64).cpu() - want).abs().max()) > 1e-3
    w64, h64 = w.detach().to(F64).cpu(), h.detach().to(F64).cpu().reshape(-1, w.shape[1])
    ga = g.abs()
    close(h.grad, (g @ w64).reshape(h.shape), (ga @ w64.abs()).reshape(h.shape), dtype, zmax, "grad_hidden")
    close(w.grad, g.T @ h64, ga.T @ h64.abs(), dtype, zmax, "grad_weight")
    close(b.grad, g.sum(0), ga.sum(0), dtype, zmax, "grad_bias")


@pytest.mark.parametrize("device", DEVICES)
def test_token_scaling_refuses_class_weights_with_z_loss_under_the_mean(device):
    h, w, b, y, cw = inputs(device, weighted=True)
    with pytest.raises(NotImplementedError, match="use_token_scaling"):
        xt.linear_cross_entropy(h, w, y, ce_weight=cw, lse_square_scale=1e-3, use_token_scaling=True)
    loss_fn = xt.FusedLinearCrossEntropyLoss(use_token_scaling=True)
    direct = xt.linear_cross_entropy(h, w, y, use_token_scaling=True)
    assert torch.equal(loss_fn(w, h, y), direct)


@cuda_only
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, softcap=30.0),
                                  dict(reduction="sum", lse_square_scale=1e-4)],
                         ids=["mean", "smoothing_softcap", "sum_z"])
def test_token_scaling_matches_liger_itself(opts):
    """Against Liger's own ``use_token_scaling`` where Liger is installed (the GPU runs carry its
    wheel), in float32."""
    liger = pytest.importorskip("liger_kernel.transformers")
    h, w, b, y, _ = inputs("cuda", (512,), 256, 32000, torch.float32, True, scale=3.0)
    results = []
    for make in (lambda: xt.FusedLinearCrossEntropyLoss(use_token_scaling=True, **opts),
                 lambda: liger.LigerFusedLinearCrossEntropyLoss(use_token_scaling=True, **opts)):
        hh, ww, bb = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
        loss = make()(ww, hh, y, bb)
        loss.backward()
        results.append((loss.detach(), hh.grad, ww.grad, bb.grad))
    (xl, *xg), (ll, *lg) = results
    assert abs(float(xl) - float(ll)) <= 1e-4 * abs(float(ll)) + 1e-6, f"loss {float(xl)} against Liger's {float(ll)}"
    for what, got, want in zip(("grad_hidden", "grad_weight", "grad_bias"), xg, lg):
        err = float((got - want).abs().max())
        assert err <= 1e-4 * float(want.abs().max()) + 1e-9, f"{what}: max error {err:.3g} against Liger's"


def linear_predicted(h, w, b, y, ignore_index=-100, causal_shift=False):
    """The predicted tokens of ``h·Wᵀ + b``: the float64 logits' first maximum per scored row (-1
    elsewhere), and the logits (for rows whose two largest logits lie within rounding)."""
    logits = h.detach().to(F64) @ w.detach().to(F64).T
    if b is not None:
        logits = logits + b.detach().to(F64)
    labels = y
    if causal_shift:
        labels = torch.cat([y[..., 1:], torch.full_like(y[..., :1], ignore_index)], dim=-1)
    scored = (labels != ignore_index) & (labels >= 0) & (labels < w.shape[0])
    best = logits.argmax(-1)
    return torch.where(scored, best, torch.full_like(best, -1)), logits


def check_predicted(got, h, w, b, y, dtype, ignore_index=-100, causal_shift=False):
    """``got`` is a maximal logit of each scored row up to the GEMM's rounding of the logits
    (``2·u·(1 + max|z|)``: each logit rounded to the inputs' dtype once), and -1 exactly where
    the row is not scored; most rows match the float64 argmax exactly."""
    want, logits = linear_predicted(h, w, b, y, ignore_index, causal_shift)
    assert got.dtype == torch.int64 and got.shape == y.shape
    assert torch.equal(got == -1, want == -1)
    scored = want != -1
    top = logits.max(-1).values
    picked = logits.gather(-1, got.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    tol = 2 * UNIT[dtype] * (1 + float(logits.abs().max()))
    gap = (top - picked)[scored]
    assert float(gap.max()) <= tol if gap.numel() else True, f"a predicted logit {float(gap.max()):.3g} below the maximum"
    # The first maximum of the logits rounded as the GEMM rounds them: ties after rounding go to
    # the first, as there; a logit rounded the other way (f32 sums against float64's) moves a few.
    rounded = logits.to(dtype).to(F64).argmax(-1)
    assert float((got == rounded)[scored].float().mean()) >= 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["mean", "none", "causal", "ignore_7", "token_scaling", "no_grad"])
def test_return_predicted_tokens_is_the_scored_rows_argmax(device, dtype, case):
    kwargs = dict(
        mean=dict(),
        none=dict(reduction="none", return_token_accuracy=True),
        causal=dict(causal_shift=True, softcap=4.0),
        ignore_7=dict(ignore_index=7, return_z_loss=True, lse_square_scale=1e-4),
        token_scaling=dict(use_token_scaling=True),
        no_grad=dict(),
    )[case]
    ignore_index = kwargs.get("ignore_index", -100)
    causal = kwargs.get("causal_shift", False)
    h, w, b, y, _ = inputs(device, (3, 41), dtype=dtype, bias=True, ignore_index=ignore_index, scale=2.0)
    grad = case != "no_grad"
    hh, ww, bb = (t.detach().clone().requires_grad_(grad) for t in (h, w, b))
    # Small chunks, so that several chunks each take their rows' predictions.
    out = xt.linear_cross_entropy(hh, ww, y, bb, return_predicted_tokens=True, chunk_bytes=40 * 1003 * 4, **kwargs)
    assert isinstance(out, xt.CrossEntropyOutput)
    check_predicted(out.predicted_tokens, h, w, b, y, dtype, ignore_index, causal)
    plain = xt.linear_cross_entropy(h, w, y, b, chunk_bytes=40 * 1003 * 4, **kwargs)
    loss = plain.loss if isinstance(plain, xt.CrossEntropyOutput) else plain
    assert torch.equal(out.loss, loss), "the option changes the loss"
    if grad:
        out.loss.sum().backward()
        assert hh.grad is not None and ww.grad is not None
    module = xt.FusedLinearCrossEntropyLoss(return_predicted_tokens=True, ignore_index=ignore_index)
    check_predicted(module(w, h, y, b).predicted_tokens, h, w, b, y, dtype, ignore_index)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["mean", "none", "causal", "ignore_7", "token_scaling", "no_grad", "every_row"])
def test_return_entropy_is_the_scored_rows_entropy(device, dtype, case):
    """``return_entropy``: each scored row's entropy of the softmax of ``h·Wᵀ + b`` (soft-capped
    where asked), read from the chunks of logits, against float64 PyTorch on the logits rounded to
    the inputs' dtype as the GEMM rounds them (within 2e-5 of ``max(1, H)``, plus 2e-3 in 16 bits
    for a logit the GEMM's f32 sums round the other way), 0 where not scored, no gradient; the
    loss is the call's without it. With the scored rows alone (``skip_ignored``, the default) and
    every row."""
    from test_torch import expected_entropy

    kwargs = dict(
        mean=dict(),
        none=dict(reduction="none", return_token_accuracy=True, two_phase=True),
        causal=dict(causal_shift=True, softcap=4.0),
        ignore_7=dict(ignore_index=7, return_z_loss=True, lse_square_scale=1e-4, return_predicted_tokens=True),
        token_scaling=dict(use_token_scaling=True),
        no_grad=dict(),
        every_row=dict(skip_ignored=False, causal_shift=True),
    )[case]
    ignore_index = kwargs.get("ignore_index", -100)
    causal = kwargs.get("causal_shift", False)
    h, w, b, y, _ = inputs(device, (3, 41), dtype=dtype, bias=True, ignore_index=ignore_index, scale=2.0)
    grad = case != "no_grad"
    hh, ww, bb = (t.detach().clone().requires_grad_(grad) for t in (h, w, b))
    # Small chunks, so that several chunks each take their rows' entropies.
    out = xt.linear_cross_entropy(hh, ww, y, bb, return_entropy=True, chunk_bytes=40 * 1003 * 4, **kwargs)
    assert isinstance(out, xt.CrossEntropyOutput)
    assert out.entropy.dtype == torch.float32 and out.entropy.shape == y.shape
    assert out.entropy.requires_grad == grad  # differentiable where the loss is
    logits = (h.detach().to(F64) @ w.detach().to(F64).T + b.detach().to(F64)).to(dtype)
    want = expected_entropy(logits, y, ignore_index, causal, kwargs.get("softcap"))
    got = out.entropy.detach().cpu().to(F64)
    atol = 0.0 if dtype == torch.float32 else 2e-3
    err = (got - want).abs() - 2e-5 * want.abs().clamp(min=1.0)
    assert float(err.max()) <= atol, f"worst error {float((got - want).abs().max()):.3g}"
    assert torch.equal(got == 0, want == 0) and float(want.max()) > 1.0
    plain = xt.linear_cross_entropy(h, w, y, b, chunk_bytes=40 * 1003 * 4, **kwargs)
    loss = plain.loss if isinstance(plain, xt.CrossEntropyOutput) else plain
    assert torch.equal(out.loss, loss), "the option changes the loss"
    if grad:
        out.loss.sum().backward()
        assert hh.grad is not None and ww.grad is not None
    module = xt.FusedLinearCrossEntropyLoss(return_entropy=True, ignore_index=ignore_index)
    torch.testing.assert_close(module(w, h, y, b).entropy, xt.linear_cross_entropy(h, w, y, b, ignore_index=ignore_index,
                               return_entropy=True).entropy, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["rl_none", "bonus_mean", "options", "entropy_only", "every_row", "token_scaling"])
def test_entropy_gradient_matches_float64(device, dtype, case):
    """A differentiable ``return_entropy`` through the linear head: the gradients of the hidden
    states, weight and bias of ``upstream·loss + Σ e·H`` (GRPO's per-token log-probabilities
    weighted by advantages plus an entropy bonus, ``reduction="none"``; a mean loss with
    ``-β·mean(H)``; every option; the entropy alone; every row; token scaling) against float64
    autograd through ``h·Wᵀ + b``, within the tolerance of the other linear gradients plus the
    entropies' own f32 error (``4e-5·max(1, H)`` times ``|e|·p``, through the GEMMs); small
    chunks, so several chunks and vocabulary blocks each add their part. Without the entropy's
    term the f32 check would fail (checked)."""
    from test_torch import entropy_and_grad

    kwargs = dict(
        rl_none=dict(reduction="none", causal_shift=True),
        bonus_mean=dict(),
        options=dict(softcap=4.0, label_smoothing=0.1, lse_square_scale=1e-3, causal_shift=True),
        entropy_only=dict(reduction="sum"),
        every_row=dict(skip_ignored=False, reduction="none"),
        token_scaling=dict(use_token_scaling=True),
    )[case]
    causal = kwargs.get("causal_shift", False)
    h, w, b, y, _ = inputs(device, (3, 41), dtype=dtype, bias=True, scale=2.0)
    hh, ww, bb = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    gen = torch.Generator().manual_seed(9)
    e_up = (torch.randn(y.shape, generator=gen) * 10 / y.numel()).to(device)
    per_row = kwargs.get("reduction") == "none"
    up = torch.randn(y.shape, generator=gen).to(device) if per_row else torch.tensor(0.75)
    out = xt.linear_cross_entropy(hh, ww, y, bb, return_entropy=True, chunk_bytes=40 * 1003 * 4, **kwargs)
    assert out.entropy.requires_grad
    objective = (out.entropy * e_up).sum()
    if case != "entropy_only":
        objective = objective + (out.loss * up.to(device)).sum()
    objective.backward()
    h64, w64, b64 = (t.detach().to(F64) for t in (h, w, b))
    logits = h64 @ w64.T + b64
    _, g_entropy = entropy_and_grad(logits.to(dtype), y, e_up, causal_shift=causal, softcap=kwargs.get("softcap"))
    g = g_entropy.to(logits.device)
    if case == "token_scaling":  # the loss's part through PyTorch's autograd on our own loss of the logits
        x = logits.to(dtype).to(F64).requires_grad_(True)
        scale = torch.exp(-xt.cross_entropy(x.detach().float(), y, reduction="none")).to(F64).view(y.shape)
        rows = xt.cross_entropy(x.float(), y, reduction="none").to(F64)
        loss = (rows * scale).sum() / (y != -100).sum()
        (g_loss,) = torch.autograd.grad(loss * 0.75, x)
        g = g + g_loss
    elif case != "entropy_only":
        opts = {k: v for k, v in kwargs.items() if k != "skip_ignored"}
        g = g + reference(logits.to(dtype), y, upstream=up, **opts).grad.to(logits.device)
    g2 = g.reshape(-1, w.shape[0])
    hf = h64.reshape(-1, w.shape[1])
    want = dict(hidden=(g2 @ w64).reshape(h.shape), weight=g2.T @ hf, bias=g2.sum(0))
    terms = dict(hidden=(g2.abs() @ w64.abs()).reshape(h.shape), weight=g2.abs().T @ hf.abs(), bias=g2.abs().sum(0))
    zmax = float(logits.abs().max())
    # The GPU's entropies are within 2e-5·max(1, H) of float64 (f32 sums), and the gradient's term
    # `e·p·(lse - H - y)` carries that error times `|e|·p`: twice that, through the GEMMs.
    y64 = logits.to(dtype).to(F64)
    if kwargs.get("softcap"):
        y64 = kwargs["softcap"] * torch.tanh(y64 / kwargs["softcap"])
    p = torch.softmax(y64, dim=-1)
    h_err = 4e-5 * torch.special.entr(p).sum(-1).clamp(min=1.0)
    e2 = ((e_up.to(F64).abs() * h_err).unsqueeze(-1) * p).reshape(-1, w.shape[0])
    extra = dict(hidden=(e2 @ w64.abs()).reshape(h.shape), weight=e2.T @ hf.abs(), bias=e2.sum(0))
    for name, got in (("hidden", hh.grad), ("weight", ww.grad), ("bias", bb.grad)):
        close(got, want[name], terms[name], dtype, zmax, f"grad_{name}", extra[name])
    if dtype == torch.float32:  # 16 bits' tolerance (8 units of the logits' magnitude) hides it at times
        g2 = (g - g_entropy.to(g.device)).reshape(-1, w.shape[0])
        with pytest.raises(AssertionError):
            close(hh.grad, (g2 @ w64).reshape(h.shape), terms["hidden"], dtype, zmax, "grad_hidden without H",
                  extra["hidden"])


@cuda_only
def test_return_predicted_tokens_matches_liger_itself():
    """Against Liger's own ``return_predicted_tokens`` where Liger is installed (float32)."""
    liger = pytest.importorskip("liger_kernel.transformers")
    h, w, b, y, _ = inputs("cuda", (512,), 256, 32000, torch.float32, True, scale=3.0)
    ours = xt.FusedLinearCrossEntropyLoss(return_predicted_tokens=True)(w, h, y, b)
    theirs = liger.LigerFusedLinearCrossEntropyLoss(return_predicted_tokens=True)(w, h, y, b)
    assert torch.equal(ours.predicted_tokens.view(-1), theirs.predicted_tokens.view(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", ["mixed", "f32"])
def test_autocast_casts_input_weight_and_bias_as_f_linear_does(device, dtypes):
    """Under ``torch.autocast(dtype=torch.bfloat16)``: bf16 hidden states beside an f32 master
    weight and bias (``mixed``: refused as two dtypes before session 48), or all three f32, give
    the loss and gradients of the same call on bf16 copies outside autocast (what ``F.linear``
    would have cast them to), each gradient in its own tensor's dtype."""
    h, w, b, y, _ = inputs(device, lead=(2, 37), bias=True, dtype=torch.float32)
    h_dtype = torch.bfloat16 if dtypes == "mixed" else torch.float32
    leaves = [h.to(h_dtype).requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = xt.linear_cross_entropy(*leaves[:2], y, leaves[2], label_smoothing=0.1)
    (loss * 0.5).backward()
    bf16 = [t.detach().to(torch.bfloat16).requires_grad_() for t in leaves]
    want = xt.linear_cross_entropy(*bf16[:2], y, bf16[2], label_smoothing=0.1)
    (want * 0.5).backward()
    assert torch.equal(loss, want)
    for got, ref, leaf in zip((t.grad for t in leaves), (t.grad for t in bf16), leaves):
        assert got.dtype == leaf.dtype
        assert float(ref.abs().max()) > 0
        assert torch.equal(got, ref.to(leaf.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_per_token_log_probs_for_policy_gradients(device):
    """Per-token log-probabilities as policy-gradient losses (GRPO, PPO, DPO) take them, without
    the logits: ``-linear_cross_entropy(hidden / temperature, weight, input_ids,
    reduction="none", causal_shift=True)`` is ``log_softmax(logits / temperature)`` at each next
    token (0 where not scored: the last position, padding), and an advantage-weighted mean of it
    has the gradient of that written in PyTorch in float64, in the hidden states and the head."""
    gen = torch.Generator().manual_seed(21)
    batch, seq, d, vocab, temperature = 3, 29, 48, 701, 0.7
    hidden = torch.randn(batch, seq, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) * 0.3
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    input_ids[1, 20:] = -100  # padding of a shorter completion
    advantages = torch.randn(batch, seq - 1, generator=gen)

    def objective(token_logp, mask):
        return -(token_logp * advantages.to(token_logp) * mask).sum() / mask.sum()

    h = hidden.clone().to(device).requires_grad_(True)
    w = weight.clone().to(device).requires_grad_(True)
    target = input_ids.to(device)
    logp = -xt.linear_cross_entropy(h / temperature, w, target, reduction="none", causal_shift=True)
    assert logp.shape == (batch, seq) and bool((logp[:, -1] == 0).all()) and bool((logp[1, 19:] == 0).all())
    mask = (target[:, 1:] != -100).to(logp.dtype)
    objective(logp[:, :-1], mask).backward()

    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    labels = input_ids[:, 1:]
    all_logp = torch.log_softmax((h64 @ w64.T)[:, :-1] / temperature, dim=-1)
    want = all_logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask64 = (labels != -100).double()
    objective(want * mask64, mask64).backward()

    torch.testing.assert_close(logp[:, :-1].double().cpu() * mask64, want.detach() * mask64, rtol=1e-5, atol=1e-5)
    for got, ref, name in ((h.grad, h64.grad, "hidden"), (w.grad, w64.grad, "weight")):
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=name)
