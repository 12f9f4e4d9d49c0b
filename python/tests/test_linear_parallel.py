"""``xt.vocab_parallel_linear_cross_entropy`` over several ranks: this file run as one process a
rank (``python test_linear_parallel.py RANK WORLD PORT OUT BACKEND``), each holding its rows of a
head of 1003 classes (uneven shards), against ``xt.linear_cross_entropy`` over the whole head in
the same process: the loss and its outputs the same on every rank, the hidden states' gradient
summed over the ranks (or each rank's part with ``reduce_input_grad=False``; with
``sequence_parallel`` each rank's rows of it), each rank's weight and bias gradient its rows of the
whole one. Three ranks on the CPU (gloo), and one rank a GPU over NCCL on a machine's every GPU
(issue 16's run; one rank on a one-GPU machine). The CUDA path's Python (its autograd Function,
passes, collectives and compiled operators) also runs on three CPU ranks with the kernels replaced
by a stand-in (``run_stand_in_rank``). The CUDA path's other tests are in
``test_vocab_parallel.py`` (a one-rank NCCL group) and ``tests/linear.rs`` (P ranks as threads on
one GPU)."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import pytest

torch = pytest.importorskip("torch") if __name__ != "__main__" else __import__("torch")

WORLD = 3
N, D, V = 40, 16, 1003
CASES = {
    "mean": dict(),
    "options": dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=4.0, grad_scale=0.5, return_z_loss=True,
                    return_token_accuracy=True, return_predicted_tokens=True),
    "weighted bias": dict(weighted=True, bias=True, label_smoothing=0.05),
    "causal": dict(causal_shift=True),
    "none": dict(reduction="none"),
    "entropy bonus": dict(return_entropy=True, softcap=3.0),
    "own reduction": dict(reduce_input_grad=False),
    # Each rank holds its block of rows (dim 0) of the hidden states; the labels are the whole's.
    "sequence parallel": dict(sequence_parallel=True, causal_shift=True, label_smoothing=0.1),
    "sequence parallel none": dict(sequence_parallel=True, reduction="none", return_entropy=True),
}
SP_ROWS = 4  # rows (dim 0) a rank holds with sequence_parallel


# How far the split call may be from the whole head's: on the CPU both are float64 arithmetic on
# the same values (rounding only); on a GPU the split call's chunks run other GEMM shapes and sum
# the hidden states' gradient over the ranks, so their float32 sums round in other orders.
TOLERANCE = {"gloo": dict(rtol=1e-5, atol=1e-6), "nccl": dict(rtol=1e-4, atol=1e-5)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _rank_process(backend: str, rank: int, world: int, port: int, out: str):
    """This rank's process group for the body, which yields the list of mismatches it fills; the
    list (with the body's exception, if it raised) goes to ``out.RANK`` after."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    errors = []
    try:
        yield errors
    except Exception:
        errors.append(traceback.format_exc())
    finally:
        torch.save(errors, f"{out}.{rank}")
        dist.destroy_process_group()


def run_rank(rank: int, world: int, port: int, out: str, backend: str = "gloo") -> None:
    """Every case on this rank; a list of mismatches (empty: all agree) goes to ``out.RANK``.
    ``backend``: ``gloo`` (tensors on the CPU) or ``nccl`` (on GPU ``rank``)."""
    import torch.distributed as dist

    import xent.torch as xt
    from xent.torch.linear_parallel import _even_split

    dev = torch.device("cpu")
    if backend == "nccl":
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
    tol = TOLERANCE[backend]
    with _rank_process(backend, rank, world, port, out) as errors:
        start, width = _even_split(V, world)[rank]
        for name, case in CASES.items():
            case = dict(case)
            weighted, with_bias = case.pop("weighted", False), case.pop("bias", False)
            reduce = case.pop("reduce_input_grad", True)
            sp = case.pop("sequence_parallel", False)
            mine = slice(rank * SP_ROWS, (rank + 1) * SP_ROWS) if sp else slice(None)
            shape = (world * SP_ROWS, 5) if sp else (2, N // 2)
            gen = torch.Generator().manual_seed(7)
            h = torch.randn(*shape, D, generator=gen, dtype=torch.float64).float().to(dev)
            w = (torch.randn(V, D, generator=gen) / D**0.5).float().to(dev)
            b = (torch.randn(V, generator=gen) * 0.1).to(dev) if with_bias else None
            y = torch.randint(0, V, shape, generator=gen)
            y[:, ::7] = -100
            y = y.to(dev)
            cw = (torch.rand(V, generator=gen) + 0.5).to(dev) if weighted else None
            up = (torch.rand(*shape, generator=gen) + 0.25).to(dev) if case.get("reduction") == "none" else None
            results = []
            for split in (True, False):
                hh = (h[mine] if split else h).clone().requires_grad_()
                ww = (w[start:start + width] if split else w).clone().requires_grad_()
                bb = None if b is None else (b[start:start + width] if split else b).clone().requires_grad_()
                if split:
                    out_ = xt.vocab_parallel_linear_cross_entropy(hh, ww, y, bb, ce_weight=cw, reduce_input_grad=reduce,
                                                                 vocab_start=start, vocab_size=V,
                                                                 sequence_parallel=sp, **case)
                else:
                    out_ = xt.linear_cross_entropy(hh, ww, y, bb, ce_weight=cw, **case)
                loss = out_ if isinstance(out_, torch.Tensor) else out_.loss
                total = (loss * up).sum() if up is not None else loss
                if case.get("return_entropy"):
                    total = total - 0.1 * out_.entropy.mean()
                total.backward()
                gw = ww.grad if split else ww.grad[start:start + width]
                gb = None if bb is None else (bb.grad if split else bb.grad[start:start + width])
                results.append((out_, hh.grad, gw, gb))
            (got, gh, gw, gb), (want, wh, ww_, wb) = results
            wh = wh[mine]  # with sequence_parallel, this rank's rows of the gradient
            if not reduce:  # each rank's part: their sum is the gradient
                gh = gh.clone()
                dist.all_reduce(gh)
            fields = [("loss", got, want)] if isinstance(got, torch.Tensor) else [
                (f, getattr(got, f), getattr(want, f))
                for f in ("loss", "z_loss", "token_accuracy", "predicted_tokens", "entropy")
            ]
            fields += [("grad_hidden", gh, wh), ("grad_weight", gw, ww_), ("grad_bias", gb, wb)]
            for field, a, c in fields:
                if (a is None) != (c is None):
                    errors.append(f"{name}: {field} is {a is None} None against {c is None}")
                elif a is not None and not torch.allclose(a.double(), c.double(), **tol):
                    errors.append(f"{name}: {field} differs by {float((a.double() - c.double()).abs().max()):.3g}")
        # What ranks disagree on (one rank has no other to disagree with): uneven shards without
        # vocab_start and vocab_size (the default is for shards of one width), and, with
        # sequence_parallel, ranks holding other numbers of rows. Every rank refuses.
        if world > 1:
            try:
                xt.vocab_parallel_linear_cross_entropy(torch.randn(4, D, device=dev),
                                                       torch.randn(width, D, device=dev),
                                                       torch.zeros(4, dtype=torch.long, device=dev))
                errors.append("uneven shards without vocab_size were not refused")
            except ValueError as ex:
                if "one width" not in str(ex):
                    errors.append(f"the refusal said {ex}")
            try:
                xt.vocab_parallel_linear_cross_entropy(torch.randn(2 + rank, D, device=dev),
                                                       torch.randn(width, D, device=dev),
                                                       torch.zeros(6, dtype=torch.long, device=dev),
                                                       vocab_start=start, vocab_size=V, sequence_parallel=True)
                errors.append("ranks of other row counts were not refused")
            except ValueError as ex:
                if "as many" not in str(ex):
                    errors.append(f"the refusal said {ex}")
        # sequence_parallel with reduce_input_grad=False (the reduce-scatter sums the parts) is
        # refused.
        try:
            xt.vocab_parallel_linear_cross_entropy(torch.randn(2, D, device=dev), torch.randn(width, D, device=dev),
                                                   torch.zeros(6, dtype=torch.long, device=dev), vocab_start=start,
                                                   vocab_size=V, sequence_parallel=True, reduce_input_grad=False)
            errors.append("sequence_parallel with reduce_input_grad=False was not refused")
        except ValueError as ex:
            if "reduce_input_grad" not in str(ex):
                errors.append(f"the refusal said {ex}")
        # Shards other than the even split are refused on the CPU path (every rank's is off by one;
        # with one rank there is no other split). The GPU path takes any shards.
        if backend == "gloo" and world > 1:
            try:
                off = start + 1 if rank < world - 1 else start - 1
                xt.vocab_parallel_linear_cross_entropy(torch.randn(4, D), torch.randn(width, D),
                                                       torch.zeros(4).long(), vocab_start=off, vocab_size=V)
                errors.append("a shard off the even split was not refused")
            except ValueError as ex:
                if "even split" not in str(ex):
                    errors.append(f"the refusal said {ex}")


def test_three_ranks_on_the_cpu_match_the_whole_head(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    run_ranks(tmp_path, WORLD, "gloo")


def test_a_rank_on_every_gpu_matches_the_whole_head(tmp_path):
    """The same over NCCL, one process a GPU (issue 16's run on a machine with several; one rank
    on a one-GPU machine)."""
    import torch.distributed as dist

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("no NCCL in this PyTorch")
    run_ranks(tmp_path, torch.cuda.device_count(), "nccl")


def _stand_in_run(seen):
    """A stand-in for the CUDA path's kernels (``linear._run``) on the CPU, which appends each
    pass's ``(pass_name, shard)`` to ``seen``: the plain loss in float64 of the whole logits (a
    shard's all-gathered over its group, the even split of its vocabulary), written into the
    stats as the kernels write it, and this rank's gradients from its columns (the hidden states'
    its part, which ``_reduce_input_grad`` sums)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    import xent.torch._ops as ops
    import xent.torch.linear as linear
    from xent.torch.linear_parallel import _even_split

    def run(call, opts, pass_name, stats, chunk_bytes, upstream=None, grads=(False, False, False),
            accum_dtype=None, predicted=None, entropy=None, entropy_upstream=None, shard=None, grad_in_place=False):
        seen.append((pass_name, shard))
        h, w = call.hidden.double(), call.weight.double()
        z = h @ w.T + (0.0 if call.bias is None else call.bias.double())
        columns = slice(None)
        if shard is not None:
            shards = _even_split(shard.vocab_size, shard.world)
            assert shards[shard.rank] == (shard.vocab_start, w.shape[0]), (shards, shard)
            widest = max(width for _, width in shards)
            pieces = [torch.empty(h.shape[0], widest, dtype=torch.float64) for _ in shards]
            dist.all_gather(pieces, F.pad(z, (0, widest - w.shape[0])).contiguous(), group=shard.group)
            z = torch.cat([piece[:, :width] for piece, (_, width) in zip(pieces, shards)], -1)
            columns = slice(shard.vocab_start, shard.vocab_start + w.shape[0])
        y = call.target
        keep = y != opts.ignore_index
        count = keep.sum().clamp(min=1)
        rows_loss = torch.where(keep, torch.logsumexp(z, -1) - z.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
        if pass_name != "backward":
            if opts.reduction == "none":
                stats[ops.STATS_ROWS:ops.STATS_ROWS + y.numel()] = rows_loss.float()
            else:
                stats[ops.STATS_LOSS] = float(rows_loss.sum() / (count if opts.reduction == "mean" else 1))
        if not any(grads):
            return None, None, None
        scale = (upstream.double().expand(y.numel()) if pass_name == "backward"
                 else torch.full((y.numel(),), opts.grad_scale, dtype=torch.float64))
        if opts.reduction == "mean":
            scale = scale / count
        g = torch.softmax(z, -1)
        g[keep, y[keep]] -= 1
        g = (g * (scale * keep)[:, None])[:, columns]
        grad_dtype = accum_dtype or call.weight.dtype
        # The hidden states' gradient in the dtype ``_run`` writes it in.
        h_dtype = linear._grad_hidden_dtype(call.hidden.dtype, accum_dtype == torch.float32, pass_name == "backward")
        return ((g @ w).to(h_dtype) if grads[0] else None,
                (g.T @ h).to(grad_dtype) if grads[1] else None,
                g.sum(0).to(grad_dtype) if grads[2] else None)

    return run


def _stand_in_scale_grad(grad, upstream):
    """``linear._scale_grad``'s stand-in on the CPU."""
    grad.mul_(upstream.to(grad.dtype))


def test_the_linear_passes_carry_the_shard_compiled_and_eager(monkeypatch):
    """Since session 57 the split head's passes are the whole head's (``LinearXentFunction`` with
    a ``_Shard``; the custom operators ``xent::linear_*`` with the shard in their last arguments).
    On the CPU, over a one-rank gloo group, with the kernels replaced by a plain-torch stand-in
    (``_stand_in_run``; the kernels are the GPU tests'): eagerly and under ``torch.compile(fullgraph=True)``
    (aot_eager), fused and two-phase, every pass gets the shard (its classes, rank, world, group
    and ``reduce_input_grad``; the whole head none), the ranks' widths are checked by a compiled
    fused or forward pass where the shard asks for it (the default split) and by no other, and the
    loss and gradients equal the plain loss's."""
    import torch.distributed as dist
    import torch._dynamo
    import xent.torch._launch as launch
    import xent.torch.linear as linear
    import xent.torch.linear_parallel as lp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    seen = []  # (pass, shard)
    monkeypatch.setattr(linear, "_run", _stand_in_run(seen))
    monkeypatch.setattr(linear, "_scale_grad", _stand_in_scale_grad)
    width_checks = []
    real_check = lp._check_equal_widths
    monkeypatch.setattr(lp, "_check_equal_widths", lambda *a: width_checks.append(a) or real_check(*a))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        gen = torch.Generator().manual_seed(57)
        n, d, v = 24, 8, 50
        h0 = torch.randn(n, d, generator=gen)
        w0 = torch.randn(v, d, generator=gen) / d**0.5
        y = torch.randint(0, v, (n,), generator=gen)
        y[::5] = -100
        upstream = torch.rand(n, generator=gen) + 0.25
        for reduction, two_phase in (("mean", False), ("mean", True), ("none", True)):
            opts = launch.Opts(-100, reduction, 1.0, False, 0.0, 0.0, None, False)
            for shard in (None, linear._Shard(0, v, 0, 1, None, True, True),
                          linear._Shard(0, v, 0, 1, group, False, False)):
                what = f"{reduction}, two_phase {two_phase}, shard {shard and shard[4:]}"

                def step(h, w):
                    loss, *_ = linear.LinearXentFunction.apply(h, w, y, None, None, opts, (1, n, d, v), two_phase,
                                                               None, None, False, False, shard, False)
                    return loss

                def run(fn):
                    hh, ww = h0.clone().requires_grad_(), w0.clone().requires_grad_()
                    seen.clear()
                    width_checks.clear()
                    loss = fn(hh, ww)
                    (loss * (upstream if reduction == "none" else 0.5)).sum().backward()
                    return (loss.detach(), hh.grad, ww.grad), list(seen), len(width_checks)

                torch._dynamo.reset()
                explanation = torch._dynamo.explain(step)(h0.clone().requires_grad_(), w0.clone().requires_grad_())
                assert explanation.graph_break_count == 0, (what, explanation.break_reasons)
                eager, eager_seen, eager_checks = run(step)
                torch._dynamo.reset()
                comp, comp_seen, comp_checks = run(torch.compile(step, backend="aot_eager", fullgraph=True))
                # The plain loss and its gradients, in float64.
                hh, ww = h0.double().requires_grad_(), w0.double().requires_grad_()
                ref = torch.nn.functional.cross_entropy(hh @ ww.T, y, reduction=reduction)
                (ref * (upstream.double() if reduction == "none" else 0.5)).sum().backward()
                for got in (eager, comp):
                    for name, a, b in zip(("loss", "grad_h", "grad_w"), got, (ref.detach(), hh.grad, ww.grad)):
                        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")
                passes = ["forward", "backward"] if two_phase else ["fused"]
                assert [p for p, _ in eager_seen] == passes, (what, eager_seen)
                assert [p for p, _ in comp_seen] == passes, (what, comp_seen)
                if shard is None:
                    assert all(s is None for _, s in eager_seen + comp_seen), what
                    assert eager_checks == comp_checks == 0, what
                    continue
                assert all(s == shard for _, s in eager_seen), (what, eager_seen)
                # The operators resolve the group by its name; the width check is theirs, once.
                name = (shard.group or dist.group.WORLD).group_name
                for _, s in comp_seen:
                    assert (s.vocab_start, s.vocab_size, s.rank, s.world) == (0, v, 0, 1), (what, s)
                    assert s.group.group_name == name and s.reduce_input_grad == shard.reduce_input_grad, what
                assert eager_checks == 0 and comp_checks == int(shard.check_widths), (what, eager_checks, comp_checks)
    finally:
        dist.destroy_process_group()


SI_V = 1002  # the stand-in ranks' vocabulary: shards of one width at 3 ranks, so the default's check passes
SI_CASES = {  # (reduction, two_phase, bias, reduce_input_grad, named group, check_widths)
    "fused mean": ("mean", False, False, True, False, True),
    "fused sum, bias, own reduction, named group": ("sum", False, True, False, True, False),
    "two-phase per row": ("none", True, False, True, False, True),
    "two-phase mean, bias, own reduction": ("mean", True, True, False, True, True),
}


def run_stand_in_rank(rank: int, world: int, port: int, out: str) -> None:
    """The CUDA path's Python on the CPU over gloo: ``LinearXentFunction`` with this rank's
    ``_Shard``, its passes, the hidden states' all-reduce and, compiled (aot_eager), the custom
    operators that resolve the group by its name and check the ranks' widths, with only the
    kernels (``_run``, ``_scale_grad``) replaced by the stand-ins above. Against the whole head's
    ``F.cross_entropy`` in float64; mismatches go to ``out.RANK``."""
    import torch.distributed as dist
    import torch.nn.functional as F

    import xent.torch._launch as launch
    import xent.torch.linear as linear
    from xent.torch.linear_parallel import _even_split

    with _rank_process("gloo", rank, world, port, out) as errors:
        start, width = _even_split(SI_V, world)[rank]
        seen = []
        linear._run = _stand_in_run(seen)
        linear._scale_grad = _stand_in_scale_grad
        named = dist.new_group(list(range(world)))
        gen = torch.Generator().manual_seed(11)
        n, d = 30, 8
        h = torch.randn(n, d, generator=gen)
        w = torch.randn(SI_V, d, generator=gen) / d**0.5
        b = torch.randn(SI_V, generator=gen) * 0.1
        y = torch.randint(0, SI_V, (n,), generator=gen)
        y[::4] = -100
        up = torch.rand(n, generator=gen) + 0.25
        for name, (reduction, two_phase, with_bias, reduce, use_named, check) in SI_CASES.items():
            opts = launch.Opts(-100, reduction, 1.0, False, 0.0, 0.0, None, False)
            shard = linear._Shard(start, SI_V, rank, world, named if use_named else None, check, reduce)
            bias = b[start:start + width] if with_bias else None

            def step(hh, ww, bb):
                loss, *_ = linear.LinearXentFunction.apply(hh, ww, y, bb, None, opts, (1, n, d, SI_V), two_phase,
                                                           None, None, False, False, shard, False)
                return loss

            # The whole head's loss and gradients in float64, once for both modes.
            rh, rw = h.double().requires_grad_(), w.double().requires_grad_()
            rb = b.double().requires_grad_() if with_bias else None
            ref = F.cross_entropy(F.linear(rh, rw, rb), y, reduction=reduction)
            (ref * (up.double() if reduction == "none" else 0.5)).sum().backward()
            for mode in ("eager", "compiled"):
                torch._dynamo.reset()
                fn = step if mode == "eager" else torch.compile(step, backend="aot_eager", fullgraph=True)
                hh = h.clone().requires_grad_()
                ww = w[start:start + width].clone().requires_grad_()
                bb = None if bias is None else bias.clone().requires_grad_()
                loss = fn(hh, ww, bb)
                (loss * (up if reduction == "none" else 0.5)).sum().backward()
                gh = hh.grad
                if not reduce:  # each rank's part: their sum is the gradient
                    gh = gh.clone()
                    dist.all_reduce(gh)
                wanted = [("loss", loss, ref), ("grad_hidden", gh, rh.grad),
                          ("grad_weight", ww.grad, rw.grad[start:start + width])]
                if with_bias:
                    wanted.append(("grad_bias", bb.grad, rb.grad[start:start + width]))
                for field, got, want in wanted:
                    if not torch.allclose(got.double(), want.detach(), rtol=1e-5, atol=1e-6):
                        err = float((got.double() - want.detach()).abs().max())
                        errors.append(f"{name}, {mode}: {field} differs by {err:.3g}")
                for _, given in seen:  # every pass got this rank's shard
                    if (given.vocab_start, given.vocab_size, given.rank, given.world) != (start, SI_V, rank, world):
                        errors.append(f"{name}, {mode}: a pass got the shard {given}")
                seen.clear()


def test_the_cuda_path_python_on_three_cpu_ranks(tmp_path):
    """``run_stand_in_rank`` on three ranks (gloo): the split head's autograd Function, passes and
    (compiled) custom operators with the kernels replaced by a stand-in, so that the hidden
    states' all-reduce, ``reduce_input_grad=False``, a named group and the compiled width check
    run over several ranks, which only issue 16's machines otherwise give."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    run_ranks(tmp_path, WORLD, "stand-in")


def run_ranks(tmp_path, world: int, backend: str) -> None:
    """This file as ``world`` processes over ``backend``; fails with every rank's mismatches."""
    import subprocess

    port = _free_port()
    import xent  # the children import the xent this process imported

    site = os.path.dirname(os.path.dirname(os.path.abspath(xent.__file__)))
    # NVLink multicast stays off on the shared machines (issue 16).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]),
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    out = str(tmp_path / "errors")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rank), str(world), str(port), out,
                               backend],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the ranks did not finish in 300 s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{log[-3000:]}"
        errors = torch.load(f"{out}.{rank}")
        assert not errors, f"rank {rank}:\n" + "\n".join(errors)


if __name__ == "__main__":
    if sys.argv[5:6] == ["stand-in"]:
        run_stand_in_rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        run_rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:6])
