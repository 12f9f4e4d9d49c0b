"""``xent.torch.vocab_parallel`` on CUDA: every rank of a
P-rank call simulated on one GPU through ``shard_stats`` / ``shard_loss`` (the all-gather is a
concatenation), against ``test_torch.reference`` (PyTorch's cross-entropy with Liger's options in
float64) and ``test_torch.entropy_and_grad`` (the entropies and their gradient in float64) over
the whole vocabulary; and the autograd function through a one-rank NCCL group."""

from __future__ import annotations

import contextlib
import os

import pytest

torch = pytest.importorskip("torch")

import xent.torch as xt  # noqa: E402
from test_torch import close_to_f64, entropy_and_grad, reference  # noqa: E402
from xent.torch import _launch  # noqa: E402
from xent.torch import vocab_parallel as vp  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")

CASES = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "options": dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=4.0, grad_scale=0.5),
    "weighted": dict(weighted=True, label_smoothing=0.05),
    "causal": dict(causal_shift=True),
}


def assert_shard_grads(pieces, ref, dtype):
    """The ranks' gradients side by side against the float64 reference: two roundings of the
    logits' dtype, and a floor of 1e-5 of the largest."""
    grad = torch.cat(pieces, dim=-1).double()
    expected = ref.grad.to(grad.device)
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
    err = (grad - expected).abs()
    allowed = 2 * u * expected.abs() + 1e-5 * float(expected.abs().max())
    assert bool((err <= allowed).all()), f"gradient: worst {float((err - allowed).max()):.3g} over"


def split(vocab, world):
    base, extra = divmod(vocab, world)
    starts, start = [], 0
    for r in range(world):
        width = base + (1 if r < extra else 0)
        starts.append((start, width))
        start += width
    return starts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_ranks_on_one_gpu_match_the_whole_vocabulary(case, world, dtype):
    kw = dict(CASES[case])
    weighted = kw.pop("weighted", False)
    vocab = 1003
    gen = torch.Generator().manual_seed(world)
    lead = (3, 11) if kw.get("causal_shift") else (41,)
    logits = (torch.randn(*lead, vocab, generator=gen) * 2).to(dtype).cuda()
    target = torch.randint(0, vocab, lead, generator=gen).cuda()
    target.view(-1)[4::5] = -100
    weight = (torch.rand(vocab, generator=gen) + 0.5).cuda() if weighted else None
    opts = _launch.Opts(
        -100, kw.get("reduction", "mean"), kw.get("grad_scale", 1.0), kw.get("causal_shift", False),
        kw.get("label_smoothing", 0.0), kw.get("lse_square_scale", 0.0), kw.get("softcap"), False,
    )
    shards = split(vocab, world)
    # Copies: a fused shard_loss writes the gradient over its piece (and a one-rank piece would
    # be `logits` itself, which the reference reads below).
    pieces = [logits[..., s:s + w].clone() for s, w in shards]
    common = dict(vocab_size=vocab, world=world, weight=weight, opts=opts)
    sends = [vp.shard_stats(p, target, vocab_start=s, **common) for p, (s, _) in zip(pieces, shards)]
    gathered = torch.cat(sends)
    losses = []
    for p, (s, _) in zip(pieces, shards):
        stats = vp.shard_loss(p, target, gathered, vocab_start=s, fused=True, **common)
        losses.append(xt.function.loss_of(stats, target, opts))
    assert all(torch.equal(losses[0], l) for l in losses), "the ranks' losses differ"
    ref = reference(logits, target, weight, **{k: v for k, v in kw.items()})
    got = float(losses[0])
    want = float(ref.loss)
    assert abs(got - want) <= 1e-4 * (1 + abs(want)), f"loss {got} against {want}"
    assert_shard_grads(pieces, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("case", ["none", "mean", "options"])
def test_two_phase_ranks_on_one_gpu_match_the_whole_vocabulary(case, world, dtype):
    """shard_loss without fused leaves the logits alone; shard_grad then writes the gradient of
    upstream · loss (per row with reduction "none")."""
    kw = {"none": dict(reduction="none"), "mean": dict(), "options": dict(CASES["options"])}[case]
    vocab = 1003
    gen = torch.Generator().manual_seed(17 + world)
    logits = (torch.randn(41, vocab, generator=gen) * 2).to(dtype).cuda()
    target = torch.randint(0, vocab, (41,), generator=gen).cuda()
    target[4::5] = -100
    reduction = kw.get("reduction", "mean")
    upstream = (torch.rand(41, generator=gen) + 0.25).cuda() if reduction == "none" else torch.tensor(0.75).cuda()
    opts = _launch.Opts(
        -100, reduction, kw.get("grad_scale", 1.0), False,
        kw.get("label_smoothing", 0.0), kw.get("lse_square_scale", 0.0), kw.get("softcap"), False,
    )
    shards = split(vocab, world)
    pieces = [logits[..., s:s + w].clone() for s, w in shards]
    common = dict(vocab_size=vocab, world=world, opts=opts)
    gathered = torch.cat([vp.shard_stats(p, target, vocab_start=s, **common) for p, (s, _) in zip(pieces, shards)])
    stats = [vp.shard_loss(p, target, gathered, vocab_start=s, fused=False, **common) for p, (s, _) in zip(pieces, shards)]
    assert torch.equal(torch.cat(pieces, dim=-1), logits), "the forward wrote over the logits"
    for p, (s, _), st in zip(pieces, shards, stats):
        vp.shard_grad(p, target, st, upstream, vocab_start=s, vocab_size=vocab, opts=opts)
    ref = reference(logits, target, upstream=upstream if reduction == "none" else 0.75, **kw)
    got = xt.function.loss_of(stats[0], target, opts).double()
    assert torch.allclose(got, ref.loss.to(got.device), rtol=1e-4, atol=1e-4), f"loss {got} against {ref.loss}"
    assert_shard_grads(pieces, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_token_accuracy_and_predicted_tokens_are_the_whole_vocabularys(causal, world, dtype):
    """Each rank adds its shard's argmax to the all-gather: every rank's token accuracy and
    predicted tokens are ``torch.argmax`` over the whole rows (-1 for a row not scored)."""
    vocab = 1003
    gen = torch.Generator().manual_seed(29 + world)
    lead = (3, 11) if causal else (41,)
    logits = (torch.randn(*lead, vocab, generator=gen) * 2).to(dtype).cuda()
    target = torch.randint(0, vocab, lead, generator=gen).cuda()
    target.view(-1)[4::5] = -100
    labels = xt.functional.scored_labels(target, -100, causal).reshape(-1)
    scored = (labels >= 0) & (labels < vocab)
    rows = logits.view(-1, vocab)
    # A third of the scored rows predicted right, in whichever shard their label falls.
    for r in range(0, rows.shape[0], 3):
        if bool(scored[r]):
            rows[r, labels[r]] = rows[r].max() + 1
    want_tokens = torch.where(scored, rows.argmax(-1), torch.full_like(labels, -1))
    want_accuracy = float((want_tokens == labels)[scored].double().mean())
    assert 0.0 < want_accuracy < 1.0
    opts = _launch.Opts(-100, "mean", 1.0, causal, 0.0, 0.0, None, True)
    shards = split(vocab, world)
    pieces = [logits[..., s:s + w].clone() for s, w in shards]
    common = dict(vocab_size=vocab, world=world, opts=opts)
    gathered = torch.cat(
        [vp.shard_stats(p, target, vocab_start=s, predicted=True, **common) for p, (s, _) in zip(pieces, shards)]
    )
    for q, (p, (s, _)) in enumerate(zip(pieces, shards)):
        tokens = torch.full((target.numel(),), -7, dtype=torch.int64, device="cuda")
        stats = vp.shard_loss(p, target, gathered, vocab_start=s, fused=True, predicted=tokens, **common)
        out = xt.functional.outputs(
            xt.function.loss_of(stats, target, opts), stats, target, "mean", 0.0, False, True, False,
            tokens.view(target.shape),
        )
        assert torch.equal(out.predicted_tokens.view(-1), want_tokens), f"rank {q}: predicted tokens"
        got = float(out.token_accuracy)
        assert abs(got - want_accuracy) <= 1e-6, f"rank {q}: accuracy {got} against {want_accuracy}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", ["mean", "options", "causal"])
def test_entropies_and_their_gradient_are_the_whole_vocabularys(case, world, dtype):
    """Each rank adds its shard's entropy summary to the all-gather: every rank's entropies are
    the whole rows' (the same bits on every rank, fused or not, a row half -inf included), and
    ``shard_grad`` adds the gradient of ``Σ e·H`` (a per-row upstream of both signs) to the
    loss's, against float64 autograd; without that term the gradient would be out of tolerance."""
    kw = {"mean": dict(), "options": dict(CASES["options"]), "causal": dict(causal_shift=True)}[case]
    causal = kw.get("causal_shift", False)
    vocab = 1003
    gen = torch.Generator().manual_seed(43 + world)
    lead = (3, 11) if causal else (41,)
    logits = (torch.randn(*lead, vocab, generator=gen) * 2).to(dtype)
    target = torch.randint(0, vocab, lead, generator=gen)
    target.view(-1)[4::5] = -100
    if not kw.get("label_smoothing"):  # (smoothing's loss is infinite with a -inf logit)
        labels = xt.functional.scored_labels(target, -100, causal).reshape(-1)
        row = logits.view(-1, vocab)[1]
        half = slice(vocab // 2, vocab) if 0 <= int(labels[1]) < vocab // 2 else slice(0, vocab // 2)
        row[half] = float("-inf")
    logits, target = logits.cuda(), target.cuda()
    rows = target.numel()
    e_up = (((torch.arange(rows) % 5) - 2).float() * 0.3).cuda()
    opts = _launch.Opts(
        -100, "mean", kw.get("grad_scale", 1.0), causal, kw.get("label_smoothing", 0.0),
        kw.get("lse_square_scale", 0.0), kw.get("softcap"), False,
    )
    shards = split(vocab, world)
    pieces = [logits[..., s:s + w].clone() for s, w in shards]
    common = dict(vocab_size=vocab, world=world, opts=opts)
    gathered = torch.cat(
        [vp.shard_stats(p, target, vocab_start=s, entropy=True, **common) for p, (s, _) in zip(pieces, shards)]
    )
    want_h, want_h_grad = entropy_and_grad(logits, target, e_up.view(lead), causal_shift=causal, softcap=kw.get("softcap"))
    stats, entropies = [], []
    for fused in (True, False):
        for q, (p, (s, w)) in enumerate(zip(pieces, shards)):
            piece = p.clone() if fused else p  # the fused pass writes over its logits
            entropy = torch.full((rows,), -7.0, device="cuda")
            st = vp.shard_loss(piece, target, gathered, vocab_start=s, fused=fused, entropy=entropy, **common)
            if not fused:
                stats.append(st)
            entropies.append(entropy)
    for q, entropy in enumerate(entropies):
        assert torch.equal(entropy, entropies[0]), f"entropies {q} differ from the first rank's"
    got_h = entropies[0].view(lead).double().cpu()
    assert torch.allclose(got_h, want_h, rtol=2e-5, atol=2e-5), f"entropies: worst {float((got_h - want_h).abs().max())}"
    assert torch.equal(torch.cat(pieces, dim=-1), logits), "the two-phase forward wrote over the logits"
    upstream = torch.tensor(0.75, device="cuda")
    for p, (s, _), st in zip(pieces, shards, stats):
        vp.shard_grad(p, target, st, upstream, vocab_start=s, vocab_size=vocab, opts=opts,
                      entropy=entropies[0], entropy_upstream=e_up)
    ref = reference(logits, target, upstream=0.75, **kw)
    got = torch.cat(pieces, dim=-1)
    close_to_f64(got, ref.grad.cpu() + want_h_grad, dtype)
    with pytest.raises(AssertionError):
        close_to_f64(got, ref.grad.cpu(), dtype)


def test_reduction_none_needs_two_phase():
    logits = torch.randn(4, 10, device="cuda")
    target = torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="two_phase"):
        xt.vocab_parallel_cross_entropy(
            logits, target, vocab_start=0, vocab_size=10, reduction="none", two_phase=False
        )


@contextlib.contextmanager
def _one_rank_nccl(port: int):
    """A one-rank NCCL process group (the default group) for the body, destroyed after; skips
    where PyTorch has no NCCL. NVLink multicast stays off (issue 16)."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("no NCCL in this PyTorch")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_autograd_function_through_a_one_rank_nccl_group():
    with _one_rank_nccl(29517):
        vocab = 2000
        logits = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        target = torch.randint(0, vocab, (64,), device="cuda")
        # The reference from a copy: the forward writes the gradient over the logits.
        ref = reference(logits.detach().clone(), target, upstream=0.5)
        loss = xt.vocab_parallel_cross_entropy(logits, target, vocab_start=0, vocab_size=vocab)
        (loss * 0.5).backward()
        assert abs(float(loss.detach()) - float(ref.loss)) <= 1e-4 * float(ref.loss)
        err = (logits.grad.double() - ref.grad.cuda()).abs().max()
        assert float(err) <= 4 * 2.0**-8 * float(ref.grad.abs().max())

        # Token accuracy and the predicted tokens, as xt.cross_entropy returns them.
        logits = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        want_tokens = logits.detach().argmax(-1)
        target[::2] = want_tokens[::2]
        want_accuracy = float((want_tokens == target).double().mean())
        out = xt.vocab_parallel_cross_entropy(
            logits, target, vocab_start=0, vocab_size=vocab, return_token_accuracy=True,
            return_predicted_tokens=True,
        )
        out.loss.backward()
        assert torch.equal(out.predicted_tokens, want_tokens)
        assert abs(float(out.token_accuracy) - want_accuracy) <= 1e-6

        # Two-phase with a per-row upstream gradient (reduction "none").
        logits = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        upstream = torch.rand(64, device="cuda") + 0.25
        ref = reference(logits.detach().clone(), target, reduction="none", upstream=upstream)
        loss = xt.vocab_parallel_cross_entropy(
            logits, target, vocab_start=0, vocab_size=vocab, reduction="none", two_phase=True
        )
        loss.backward(upstream)
        assert torch.allclose(loss.double(), ref.loss.cuda(), rtol=1e-4, atol=1e-4)
        err = (logits.grad.double() - ref.grad.cuda()).abs().max()
        assert float(err) <= 4 * 2.0**-8 * float(ref.grad.abs().max())

        # An entropy bonus (the default mode is two-phase with return_entropy): the gradient of
        # `loss - β·mean(H)` against float64, the entropies against it too.
        logits = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        beta = 0.1
        e_up = torch.full((64,), -beta / 64, device="cuda")
        ref = reference(logits.detach().clone(), target)
        want_h, want_h_grad = entropy_and_grad(logits, target, e_up)
        out = xt.vocab_parallel_cross_entropy(logits, target, vocab_start=0, vocab_size=vocab, return_entropy=True)
        (out.loss - beta * out.entropy.mean()).backward()
        assert torch.allclose(out.entropy.double().cpu(), want_h, rtol=2e-5, atol=2e-5)
        close_to_f64(logits.grad, ref.grad.cpu() + want_h_grad, torch.bfloat16)
        # The fused mode logs the entropies; a gradient reaching them raises.
        logits = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        want_h = entropy_and_grad(logits, target, e_up)[0]  # before the forward writes its gradient
        out = xt.vocab_parallel_cross_entropy(
            logits, target, vocab_start=0, vocab_size=vocab, return_entropy=True, two_phase=False
        )
        assert torch.allclose(out.entropy.double().cpu(), want_h, rtol=2e-5, atol=2e-5)
        with pytest.raises(RuntimeError, match="two-phase"):
            (out.loss - beta * out.entropy.mean()).backward()


def test_torch_compile_through_a_one_rank_nccl_group():
    """``torch.compile(fullgraph=True)`` of an LM head and ``vocab_parallel_cross_entropy`` (the
    steps are the custom operators ``torch.ops.xent.shard_*``, the all-gather a functional
    collective): no graph break, and the loss, the token accuracy and the head's gradient equal
    eager's, fused (smoothing, soft cap, token accuracy, upstream 0.5), two-phase per row (a
    per-row upstream) and with an entropy bonus (two-phase, the entropies differentiable)."""
    import torch._dynamo

    with _one_rank_nccl(29518):
        vocab, dims, rows = 2000, 64, 96
        gen = torch.Generator().manual_seed(3)
        head = torch.nn.Linear(dims, vocab, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.randn(vocab, dims, generator=gen) * 0.3)
        head = head.cuda()
        h = torch.randn(rows, dims, generator=gen).cuda()
        target = torch.randint(0, vocab, (rows,), generator=gen).cuda()
        target[::7] = -100
        upstream = (torch.rand(rows, generator=gen) + 0.25).cuda()
        cases = {
            "fused": dict(label_smoothing=0.1, softcap=30.0, return_token_accuracy=True),
            "two_phase": dict(two_phase=True, reduction="none"),
            "entropy_bonus": dict(return_entropy=True, softcap=30.0),
        }
        for name, kwargs in cases.items():

            def step(h):
                out = xt.vocab_parallel_cross_entropy(head(h), target, vocab_start=0, vocab_size=vocab, **kwargs)
                if name == "entropy_bonus":
                    return out.loss - 0.1 * out.entropy.mean(), out.entropy.detach()
                # Per row: the loss and a detached alias of it, as a step returns a value to log.
                return (out.loss, out.token_accuracy) if name == "fused" else (out, out.detach())

            torch._dynamo.reset()
            explanation = torch._dynamo.explain(step)(h)
            assert explanation.graph_break_count == 0, explanation.break_reasons
            compiled = torch.compile(step, fullgraph=True)

            def run(fn):
                head.zero_grad(set_to_none=True)
                loss, extra = fn(h)
                (loss * (upstream if name == "two_phase" else 0.5)).sum().backward()
                return loss.detach().clone(), extra.detach().clone(), head.weight.grad.clone()

            e_loss, e_extra, e_grad = run(step)
            c_loss, c_extra, c_grad = run(compiled)
            assert float(e_grad.abs().max()) > 0, name
            torch.testing.assert_close(c_loss, e_loss, rtol=1e-6, atol=0.0, msg=name)
            torch.testing.assert_close(c_extra, e_extra, rtol=1e-6, atol=0.0, msg=name)
            torch.testing.assert_close(c_grad, e_grad, rtol=1e-4, atol=1e-5 * float(e_grad.abs().max()), msg=name)
            if name == "entropy_bonus":
                continue  # (eager's entropy bonus against float64: the test above)
            # And eager against the float64 reference through the same head.
            kw = {k: v for k, v in kwargs.items() if k not in ("two_phase", "return_token_accuracy")}
            ref = reference(head(h).detach(), target, **kw)
            torch.testing.assert_close(e_loss.double().cpu(), ref.loss.reshape(e_loss.shape).cpu(), rtol=1e-5, atol=1e-6)


LINEAR_CASES = {
    "mean": dict(),
    "options": dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=4.0, grad_scale=0.5,
                    return_token_accuracy=True, return_predicted_tokens=True),
    "weighted bias": dict(weighted=True, bias=True, label_smoothing=0.05),
    "causal": dict(causal_shift=True),
    "none": dict(reduction="none"),
    "entropy bonus": dict(return_entropy=True, softcap=3.0),
}


def test_vocab_parallel_linear_through_a_one_rank_nccl_group(monkeypatch):
    """``xt.vocab_parallel_linear_cross_entropy`` on a one-rank group (the collective through
    NCCL, the head whole) against ``xt.linear_cross_entropy`` over the same head: the same loss,
    outputs and gradients to a few units of bfloat16, fused and two-phase, in chunks and whole;
    with the ranks' shard beside the one-rank split, and the refusals. With ``skip_ignored`` the
    scored rows alone reach the split head's pass."""
    import xent.torch.linear as linear

    rows_seen = []
    real = linear.LinearXentFunction.apply

    def spy(hidden, *args):
        if any(isinstance(a, linear._Shard) for a in args):  # the split head's pass
            rows_seen.append(hidden.shape[0])
        return real(hidden, *args)

    monkeypatch.setattr(linear.LinearXentFunction, "apply", spy)

    with _one_rank_nccl(29519):
        gen = torch.Generator().manual_seed(5)
        n, d, v = 150, 64, 1003
        for name, case in LINEAR_CASES.items():
            case = dict(case)
            weighted, with_bias = case.pop("weighted", False), case.pop("bias", False)
            h = (torch.randn(2, n // 2, d, generator=gen)).to(torch.bfloat16).cuda()
            w = (torch.randn(v, d, generator=gen) / d**0.5).to(torch.bfloat16).cuda()
            b = (torch.randn(v, generator=gen) * 0.1).to(torch.bfloat16).cuda() if with_bias else None
            y = torch.randint(0, v, (2, n // 2), generator=gen).cuda()
            y[:, ::7] = -100
            cw = (torch.rand(v, generator=gen) + 0.5).cuda() if weighted else None
            upstream = torch.rand(2, n // 2, device="cuda") + 0.25 if case.get("reduction") == "none" else None
            labels = y[:, 1:] if case.get("causal_shift") else y
            scored = int((labels != -100).sum())
            # skip_ignored (the tests' threshold is 0, so the scored rows alone reach the split
            # head's pass where its budget holds their copy: at the default, and in chunks of
            # about 54 rows at 64 rows' logits) and every row: without it, and where the copy
            # (18 KiB) leaves less than half of 16 rows' logits (32 KiB) or none of 4 rows'.
            # Below 192 rows a chunk the gradients come by blocks of classes (the vocabulary-blocked
            # backward), whose 16-bit grad_hidden is rounded once a block, each time by up to half
            # a unit of the running sum: at most 3, 18 and 42 blocks here at 64, 16 and 4 rows'
            # logits (``linear::vocab_block``), one rounding at the default (one chunk).
            for chunk_bytes, skip, want_rows, roundings in ((None, True, scored, 1), (64 * v * 2, True, scored, 3),
                                                            (16 * v * 2, True, n, 18), (4 * v * 2, True, n, 42),
                                                            (None, False, n, 1)):
                results = []
                for fn in ("whole", "split"):
                    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                    bb = b.clone().requires_grad_() if b is not None else None
                    kw = dict(case, ce_weight=cw, chunk_bytes=chunk_bytes, skip_ignored=skip)
                    if fn == "whole":
                        out = xt.linear_cross_entropy(hh, ww, y, bb, **kw)
                    else:
                        out = xt.vocab_parallel_linear_cross_entropy(hh, ww, y, bb, **kw)
                    loss = out if isinstance(out, torch.Tensor) else out.loss
                    total = (loss * upstream).sum() if upstream is not None else loss
                    if case.get("return_entropy"):
                        total = total - 0.1 * out.entropy.mean()
                    total.backward()
                    results.append((out, hh.grad, ww.grad, None if bb is None else bb.grad))
                (whole, *whole_grads), (split_out, *split_grads) = results
                what = f"{name}, chunk_bytes {chunk_bytes}, skip_ignored {skip}"
                assert rows_seen[-1] == want_rows, f"{what}: {rows_seen}"
                if isinstance(whole, torch.Tensor):
                    assert torch.allclose(split_out, whole, rtol=1e-5, atol=1e-5), what
                else:
                    for field in ("loss", "z_loss", "token_accuracy", "entropy"):
                        a, c = getattr(split_out, field), getattr(whole, field)
                        if c is not None:
                            assert torch.allclose(a.float(), c.float(), rtol=1e-5, atol=1e-5), f"{what}: {field}"
                    if whole.predicted_tokens is not None:
                        assert torch.equal(split_out.predicted_tokens, whole.predicted_tokens), what
                for got, want in zip(split_grads, whole_grads):
                    if want is None:
                        continue
                    err = float((got.double() - want.double()).abs().max())
                    bound = (4 * 2.0**-8 + roundings * 2.0**-9) * float(want.double().abs().max())
                    assert err <= bound, f"{what}: gradient off by {err}"
        # The explicit shard of a one-rank group is the default's; a shard outside the vocabulary
        # and class weights of the shard's size are refused.
        h = torch.randn(8, d, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
        y = torch.randint(0, v, (8,), device="cuda")
        a = xt.vocab_parallel_linear_cross_entropy(h, w, y)
        c = xt.vocab_parallel_linear_cross_entropy(h, w, y, vocab_start=0, vocab_size=v)
        assert torch.equal(a, c)
        with pytest.raises(ValueError, match="not inside"):
            xt.vocab_parallel_linear_cross_entropy(h, w, y, vocab_start=1, vocab_size=v)
        with pytest.raises(ValueError, match="ce_weight"):
            xt.vocab_parallel_linear_cross_entropy(h, w, y, vocab_size=2 * v, ce_weight=torch.ones(v))
        with pytest.raises(ValueError, match="two_phase"):
            xt.vocab_parallel_linear_cross_entropy(h, w, y, reduction="none", two_phase=False)
        # The fused mode's entropies are logged only: a gradient reaching them raises.
        hh = h.clone().requires_grad_()
        out = xt.vocab_parallel_linear_cross_entropy(hh, w, y, return_entropy=True, two_phase=False)
        with pytest.raises(RuntimeError, match="two-phase"):
            (out.loss - out.entropy.mean()).backward()


def test_vocab_parallel_linear_compiled_through_a_one_rank_nccl_group():
    """``torch.compile(fullgraph=True)`` of ``xt.vocab_parallel_linear_cross_entropy`` (the passes
    are the linear path's custom operators ``torch.ops.xent.linear_*``, whose last arguments name
    the shard and take the group by its name):
    no graph break, and the loss, outputs and gradients equal eager's, fused (options, an
    upstream of 0.5), two-phase per row and with an entropy bonus; the default split's width check
    runs inside the operator."""
    import torch._dynamo

    with _one_rank_nccl(29520):
        gen = torch.Generator().manual_seed(8)
        n, d, v = 96, 64, 1003
        h = torch.randn(n, d, generator=gen).to(torch.bfloat16).cuda()
        w = (torch.randn(v, d, generator=gen) / d**0.5).to(torch.bfloat16).cuda()
        b = (torch.randn(v, generator=gen) * 0.1).to(torch.bfloat16).cuda()
        y = torch.randint(0, v, (n,), generator=gen).cuda()
        y[::7] = -100
        upstream = torch.rand(n, device="cuda") + 0.25
        cases = {
            "fused": dict(label_smoothing=0.1, softcap=4.0, return_token_accuracy=True, chunk_bytes=16 * v * 2),
            "two_phase": dict(reduction="none", vocab_start=0, vocab_size=v),
            "entropy_bonus": dict(return_entropy=True, softcap=3.0),
        }
        for name, kwargs in cases.items():

            def step(h, w, b):
                # Every row (a compiled call does not count them; eager would skip the ignored).
                out = xt.vocab_parallel_linear_cross_entropy(h, w, y, b, skip_ignored=False, **kwargs)
                if name == "entropy_bonus":
                    return out.loss - 0.1 * out.entropy.mean(), out.entropy.detach()
                if name == "fused":
                    return out.loss, out.token_accuracy
                return out, out.detach()

            torch._dynamo.reset()
            explanation = torch._dynamo.explain(step)(h, w, b)
            assert explanation.graph_break_count == 0, explanation.break_reasons
            compiled = torch.compile(step, fullgraph=True)

            def run(fn):
                hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
                loss, extra = fn(hh, ww, bb)
                (loss * (upstream if name == "two_phase" else 0.5)).sum().backward()
                return [t.detach().clone() for t in (loss, extra, hh.grad, ww.grad, bb.grad)]

            eager, comp = run(step), run(compiled)
            assert float(eager[3].abs().max()) > 0, name
            for what, c, e in zip(("loss", "extra", "grad_h", "grad_w", "grad_b"), comp, eager):
                torch.testing.assert_close(c, e, rtol=1e-6, atol=0.0, msg=f"{name}: {what}")
