"""``xent.torch.trl``: TRL's fused LM head (``ChunkedLogProbFunction.apply``'s arguments and five
outputs) on xent's kernels, against float64 PyTorch on TRL's definition (``y = cap·tanh(s·z /
cap) / T`` of ``z = h·Wᵀ + b``), against TRL 1.16's own function where its wheel is on the path,
and ``patch_trl`` on a stand-in of ``trl.trainer.utils``.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import pytest

torch = pytest.importorskip("torch")

import xent.torch as xt  # noqa: E402
from test_linear import K, UNIT  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
F64 = torch.float64

CASES = {
    "plain": dict(temperature=1.0),
    "temperature_bias": dict(temperature=0.7, bias=True),
    "gemma_cap": dict(temperature=0.9, cap=30.0, logit_scale=1.0),
    "scaled": dict(temperature=2.0, logit_scale=0.5, bias=True, cap=8.0),
}


def inputs(device, dtype, bias, n=96, d=64, v=1003, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=gen) * 2.0).to(dtype).to(device)
    w = (torch.randn(v, d, generator=gen) / d**0.5).to(dtype).to(device)
    b = (torch.randn(v, generator=gen) * 0.1).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    t[::5] = (h.float().cpu() @ w.float().cpu().T).argmax(-1)[::5]  # some targets are the argmax
    return h, w, b, t.to(device)


def expected(h, w, b, t, temperature, cap=None, logit_scale=1.0):
    """TRL's five outputs in float64 (as differentiable tensors of ``h``, ``w``, ``b``'s float64
    leaves), and the leaves."""
    leaves = [x.detach().to(F64).cpu().requires_grad_(True) if x is not None else None for x in (h, w, b)]
    h64, w64, b64 = leaves
    z = h64 @ w64.T
    if b64 is not None:
        z = z + b64
    y = z * logit_scale
    if cap is not None:
        y = cap * torch.tanh(y / cap)
    y = y / temperature
    log_p = torch.log_softmax(y, -1)
    t64 = t.cpu()
    logp = log_p.gather(1, t64.view(-1, 1)).view(-1)
    lse = torch.logsumexp(y, -1)
    entropy = lse - (torch.softmax(y, -1) * y).sum(-1)
    log_sum_sq = torch.logsumexp(2 * log_p, -1)
    mean = y.mean(-1)
    top1 = y.argmax(-1) == t64
    return (logp, entropy, log_sum_sq, mean, top1), leaves, float(z.detach().abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_logprob_matches_trls_definition(device, dtype, case):
    """Every output against float64 on TRL's definition (within the linear path's tolerance, ``8
    units of the dtype x (1 + max|z|)``; ``is_top1`` on at least 95% of the rows: the top two
    logits of a row may be within rounding), and the gradients of GRPO's ``-Σ advantage·log p - 0.01·Σ H`` (f32: 1e-4 of the
    largest; bf16: 3e-2)."""
    opts = dict(CASES[case])
    bias = opts.pop("bias", False)
    temperature, cap, scale = opts["temperature"], opts.get("cap"), opts.get("logit_scale", 1.0)
    h, w, b, t = inputs(device, dtype, bias)
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (h, w, b)]
    outputs = ("entropy", "log_sum_sq_probs", "is_top1") + (() if cap is not None else ("mean_logits",))
    got = xt.trl.chunked_logprob(*leaves[:3], t, temperature, 32768, cap, scale, outputs)
    want, want_leaves, zmax = expected(h, w, b, t, temperature, cap, scale)
    tol = K * UNIT[dtype] * (1.0 + zmax / temperature)
    for name, g, e in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"), got[:4], want[:4]):
        if name == "mean_logits" and cap is not None:
            assert g is None
            continue
        assert g.dtype == torch.float32 and g.shape == t.shape, name
        err = (g.detach().to(F64).cpu() - e.detach()).abs()
        assert bool((err <= tol * (1.0 + e.detach().abs())).all()), f"{name}: worst error {float(err.max()):.3g}"
    top1 = got[4].cpu()
    assert top1.dtype == torch.bool and bool(top1.any())
    assert bool((top1 == want[4]).float().mean() >= 0.95)
    advantages = torch.randn(t.shape, generator=torch.Generator().manual_seed(3))
    objective = -(got[0] * advantages.to(device)).sum() - 0.01 * got[1].sum()
    objective.backward()
    (-(want[0] * advantages.to(F64)).sum() - 0.01 * want[1].sum()).backward()
    rel = 1e-4 if dtype == torch.float32 else 3e-2
    for name, g, e in zip(("hidden", "weight", "bias"), leaves, want_leaves):
        if g is None:
            continue
        assert g.grad.dtype == g.dtype, name
        err = float((g.grad.to(F64).cpu() - e.grad).abs().max())
        assert err <= rel * float(e.grad.abs().max()), f"grad {name}: {err:.3g} of {float(e.grad.abs().max()):.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_logprob_outputs_and_refusals(device):
    """Only the outputs asked for (``None`` for the others, as TRL returns them); unknown output
    names, a non-positive temperature or cap, and ``mean_logits`` with a soft cap are refused."""
    h, w, b, t = inputs(device, torch.float32, True, n=8)
    logp, entropy, sq, mean, top1 = xt.trl.chunked_logprob(h, w, b, t, 1.0, 4096, None, 1.0, ())
    assert logp.shape == t.shape and entropy is None and sq is None and mean is None and top1 is None
    with pytest.raises(ValueError, match="unknown outputs"):
        xt.trl.chunked_logprob(h, w, b, t, 1.0, 4096, None, 1.0, ("entropies",))
    with pytest.raises(ValueError, match="temperature"):
        xt.trl.chunked_logprob(h, w, b, t, 0.0, 4096)
    with pytest.raises(ValueError, match="softcapping"):
        xt.trl.chunked_logprob(h, w, b, t, 1.0, 4096, -1.0)
    with pytest.raises(NotImplementedError, match="mean_logits"):
        xt.trl.chunked_logprob(h, w, b, t, 1.0, 4096, 30.0, 1.0, ("mean_logits",))


def trl_function():
    """TRL's own ``ChunkedLogProbFunction`` (its backward's DeepSpeed context stubbed where
    ``trl.trainer.utils`` cannot be imported), or a skip."""
    module = pytest.importorskip("trl.kernels.chunked_logprob")
    try:
        importlib.import_module("trl.trainer.utils")
    except Exception:
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
    return module.ChunkedLogProbFunction


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_logprob_matches_trl_itself(device, case):
    """Against TRL 1.16's own function (float32, where its wheel is on the path): the five outputs
    and the gradients of GRPO's objective with an entropy bonus."""
    theirs_fn = trl_function()
    opts = dict(CASES[case])
    bias = opts.pop("bias", False)
    temperature, cap, scale = opts["temperature"], opts.get("cap"), opts.get("logit_scale", 1.0)
    h, w, b, t = inputs(device, torch.float32, bias)
    outputs = ("entropy", "log_sum_sq_probs", "is_top1") + (() if cap is not None else ("mean_logits",))
    results = []
    for fn in (xt.trl.chunked_logprob, theirs_fn.apply):
        leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (h, w, b)]
        out = fn(*leaves[:3], t, temperature, 32768, cap, scale, outputs)
        advantages = torch.linspace(-1.0, 1.0, t.numel(), device=device)
        (-(out[0] * advantages).sum() - 0.01 * out[1].sum()).backward()
        results.append((out, [x.grad if x is not None else None for x in leaves]))
    (ours, our_grads), (theirs, their_grads) = results
    for name, a, e in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"), ours[:4], theirs[:4]):
        if e is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert bool((ours[4] == theirs[4]).float().mean() >= 0.95)
    for name, a, e in zip(("hidden", "weight", "bias"), our_grads, their_grads):
        if e is None:
            continue
        scale_ = float(e.abs().max())
        assert float((a - e).abs().max()) <= 1e-4 * scale_, f"grad {name}"


def test_patch_trl_replaces_the_fused_heads_function(monkeypatch):
    """``patch_trl`` puts ``xent.torch.trl.ChunkedLogProbFunction`` where TRL's fused head looks it up
    (``trl.trainer.utils._ChunkedLogProbFunction``, read at each call) and gives back a restore;
    a TRL without the fused head is refused."""
    module = types.ModuleType("trl.trainer.utils")
    sentinel = object()
    module._ChunkedLogProbFunction = sentinel
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", module)
    restore = xt.trl.patch_trl()
    assert module._ChunkedLogProbFunction is xt.trl.ChunkedLogProbFunction
    assert xt.trl.ChunkedLogProbFunction.apply is xt.trl.chunked_logprob
    restore()
    assert module._ChunkedLogProbFunction is sentinel
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", types.ModuleType("trl.trainer.utils"))
    with pytest.raises(RuntimeError, match="1.16"):
        xt.trl.patch_trl()
