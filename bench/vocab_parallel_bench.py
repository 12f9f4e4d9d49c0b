"""Vocabulary-parallel cross-entropy benchmarks (issues 15 and 16). Prints JSON lines.

One GPU (``python3 vocab_parallel_bench.py``): for each world size P, one rank's kernels on its
shard ``[N, V/P]`` (step 1 and step 3, fused gradient; no collective), timed between CUDA events,
with ``pct_of_bound`` against the traffic of two reads and one write per logit at the copy
bandwidth measured in the same run. Method ``xent_vocab_parallel``; with ``--entropy`` also
``xent_vocab_parallel[entropy]`` (the entropies too: step 1's summary kernel reads the shard once
more, so its bound is three reads and one write per logit).

Several GPUs (``torchrun --nproc_per_node=P vocab_parallel_bench.py --distributed``; NVLink
multicast off: ``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1``):
per rank, forward + backward of the mean loss with the vocabulary split over the ranks:
``xent_vocab_parallel`` (xent.torch.vocab_parallel_cross_entropy, one all-gather),
``megatron_style`` (PyTorch: three all-reduces, the f32 softmax kept for backward),
``liger_vocab_parallel`` (LigerVocabParallelCrossEntropy, when importable), and ``xent`` with
``world`` 1 (rank 0, the whole vocabulary on one GPU); with ``--entropy`` also an entropy bonus,
``loss - 0.01·mean(H)`` over the scored rows: ``xent_vocab_parallel[entropy_bonus]``
(``return_entropy``, two-phase) against ``megatron_style[entropy_bonus]`` (the loss above plus
verl's ``vocab_parallel_entropy`` in PyTorch: a max and two differentiable all-reduces). Rank 0
prints the lines.

Linear + cross-entropy with the head split over the ranks (``torchrun ... --linear D``): per
rank, forward + backward from hidden states ``[N, D]`` and the rank's rows of the head:
``xent_vocab_parallel_linear`` (xent.torch.vocab_parallel_linear_cross_entropy: no rank holds
more than a chunk of its logits) against ``megatron_style_linear`` (``h @ W_rᵀ``, then
``megatron_style``, the hidden states' gradient all-reduced), and ``xent_linear`` with ``world``
1 (the whole head on rank 0); ``--entropy`` adds the entropy bonus of each; ``--as-worlds 2,4,8``
on one rank also times one rank's share of a P-rank call alone (rows with ``as_world``).

Usage: [--configs N:V,...] [--worlds 1,2,4,8] [--distributed] [--chunkings auto,LEN[:THREADS],...]
[--entropy] [--linear D [--as-worlds P,...]]
"""

import argparse
import json
import os
import statistics

import torch

import xent.torch as xt
from xent.torch import _launch
from xent.torch import vocab_parallel as vp

DEFAULT_CONFIGS = "8192:128256,16384:128256,8192:151936,16384:151936,8192:262144,16384:262144"


def timed(fn, iters=10, warm=3, reps=1):
    """Median ms per call of ``fn`` between CUDA events, ``reps`` calls per pair of events (so
    the host queues the next call while the GPU runs one: GPU time, not Python's)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copy_bandwidth():
    """Read + write bytes per second of a 4 GiB device copy."""
    src = torch.empty(1 << 30, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def one_gpu(configs, worlds, chunkings, entropies=(False,)):
    bandwidth = copy_bandwidth()
    opts = _launch.Opts()
    cases = ((n, v, w, c, e) for n, v in configs for w in worlds for c in chunkings for e in entropies)
    for n, v, world, chunking, entropic in cases:
        if chunking == "auto":
            os.environ.pop("XENT_SHARD_CHUNK", None)
        else:
            os.environ["XENT_SHARD_CHUNK"] = chunking
        width = -(-v // world)
        logits = torch.randn(n, width, device="cuda", dtype=torch.bfloat16)
        target = torch.randint(0, v, (n,), device="cuda")
        target[::7] = -100
        common = dict(vocab_size=v, world=world, opts=opts)
        words = vp.shard_stats(logits, target, vocab_start=0, entropy=entropic, **common).numel()
        gathered = torch.zeros(world * words, dtype=torch.float32, device="cuda")
        entropy = torch.empty(n, dtype=torch.float32, device="cuda") if entropic else None

        def step():
            send = vp.shard_stats(logits, target, vocab_start=0, entropy=entropic, **common)
            gathered[:words].copy_(send)  # the rank's own place; the others' stay empty rows
            vp.shard_loss(logits, target, gathered, vocab_start=0, fused=True, entropy=entropy, **common)

        ms = timed(step, reps=10)
        # Two reads and one write of 2 bytes per logit (three reads with the entropies' summary),
        # at the measured read + write rate.
        bound_s = (8 if entropic else 6) * n * width / bandwidth
        print(json.dumps({
            "method": "xent_vocab_parallel[entropy]" if entropic else "xent_vocab_parallel", "world": world,
            "n": n, "v": v, "dtype": "bf16",
            "ms_median": round(ms, 4), "pct_of_bound": round(100 * bound_s / (ms * 1e-3), 1),
            "collective": "none: one rank's kernels", "copy_GBps": round(bandwidth / 1e9),
            **({} if chunking == "auto" else {"chunking": chunking}),
        }), flush=True)


class _MegatronStyle(torch.autograd.Function):
    """Megatron-core's vocab_parallel_cross_entropy in plain PyTorch: three all-reduces (max,
    target logit, sum of exponentials), the f32 softmax of the shard kept for backward."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        import torch.distributed as dist

        x = logits.float()
        m = x.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        x = x - m.unsqueeze(-1)
        width = x.shape[-1]
        local = target - vocab_start
        mine = (local >= 0) & (local < width) & (target != -100)
        index = local.clamp(0, width - 1).unsqueeze(-1)
        picked = torch.where(mine, x.gather(-1, index).squeeze(-1), 0.0)
        dist.all_reduce(picked, group=group)
        e = x.exp()
        s = e.sum(-1)
        dist.all_reduce(s, group=group)
        valid = target != -100
        loss = ((torch.log(s) - picked) * valid).sum() / valid.sum()
        e.div_(s.unsqueeze(-1))  # the softmax, kept
        ctx.save_for_backward(e, index, mine, valid)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, mine, valid = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, index, -mine.float().unsqueeze(-1))
        grad.mul_((valid.float() * (grad_loss / valid.sum())).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None


def megatron_style(logits, target, group, vocab_start):
    return _MegatronStyle.apply(logits, target, vocab_start, group)


def verl_style_entropy(logits, group):
    """Each row's entropy over the whole vocabulary, differentiable, as verl's
    ``vocab_parallel_entropy`` computes it in PyTorch: the shard's f32 logits, a max all-reduce,
    then ``Σ exp`` and ``Σ exp·z`` all-reduced (differentiable all-reduces)."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    z = logits.float()
    m = z.detach().max(dim=-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = (z - m.unsqueeze(-1)).exp()
    s = dist_nn.all_reduce(e.sum(-1), group=group or dist.group.WORLD)
    t = dist_nn.all_reduce((e * z).sum(-1), group=group or dist.group.WORLD)
    return torch.log(s) + m - t / s


def distributed(configs, entropic=False):
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    try:
        from liger_kernel.transformers import LigerVocabParallelCrossEntropy
        liger = LigerVocabParallelCrossEntropy()
    except Exception:  # the peer is optional
        liger = None
    for n, v in configs:
        base, extra = divmod(v, world)
        width = base + (1 if rank < extra else 0)
        start = rank * base + min(rank, extra)
        torch.manual_seed(0)
        full = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
        target = torch.randint(0, v, (n,), device="cuda")
        target[::7] = -100
        shard = full[:, start:start + width].contiguous()
        del full
        methods = {
            "xent_vocab_parallel": lambda x: xt.vocab_parallel_cross_entropy(
                x, target, vocab_start=start, vocab_size=v),
            "megatron_style": lambda x: megatron_style(x, target, None, start),
        }
        if liger is not None:
            def liger_loss(x):
                per_token = liger(x.unsqueeze(1), target.unsqueeze(1))
                valid = target != -100
                return (per_token.squeeze(1) * valid).sum() / valid.sum()
            methods["liger_vocab_parallel"] = liger_loss
        if entropic:
            beta, valid = 0.01, target != -100

            def xent_bonus(x):
                out = xt.vocab_parallel_cross_entropy(x, target, vocab_start=start, vocab_size=v, return_entropy=True)
                return out.loss - beta * out.entropy[valid].mean()

            def megatron_bonus(x):
                return megatron_style(x, target, None, start) - beta * verl_style_entropy(x, None)[valid].mean()

            methods["xent_vocab_parallel[entropy_bonus]"] = xent_bonus
            methods["megatron_style[entropy_bonus]"] = megatron_bonus
        for name, fn in methods.items():
            x = shard.clone().requires_grad_(True)

            def step():
                x.grad = None
                fn(x).backward()

            try:
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                ms = timed(step)
                peak = torch.cuda.max_memory_allocated() - base_mem
                row = {"method": name, "world": world, "n": n, "v": v, "dtype": "bf16",
                       "ms_median": round(ms, 3), "extra_peak_MiB": round(peak / 2**20)}
            except Exception as ex:
                row = {"method": name, "world": world, "n": n, "v": v, "error": repr(ex)[:200]}
            if rank == 0:
                print(json.dumps(row), flush=True)
        if rank == 0:
            whole = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)

            def whole_step():
                whole.grad = None  # as the other methods' steps: no accumulation pass
                xt.cross_entropy(whole, target).backward()

            ms = timed(whole_step)
            print(json.dumps({"method": "xent", "world": 1, "n": n, "v": v, "dtype": "bf16",
                              "ms_median": round(ms, 3)}), flush=True)
        dist.barrier()
    dist.destroy_process_group()


def linear_methods(target, start, v, entropic):
    """The linear + cross-entropy methods of one rank's shard ``w`` ``[V_r, D]`` of the head."""
    import torch.distributed as dist

    def megatron_linear(hh, ww):
        return megatron_style(hh @ ww.t(), target, None, start)

    # Every row through the GEMMs, as the peer takes them (by default xent takes the scored rows
    # alone: 6/7 of them here).
    methods = {
        "xent_vocab_parallel_linear": lambda hh, ww: xt.vocab_parallel_linear_cross_entropy(
            hh, ww, target, vocab_start=start, vocab_size=v, skip_ignored=False),
        "megatron_style_linear": megatron_linear,
    }
    if entropic:
        beta, valid = 0.01, target != -100

        def xent_bonus(hh, ww):
            out = xt.vocab_parallel_linear_cross_entropy(hh, ww, target, vocab_start=start, vocab_size=v,
                                                         return_entropy=True, skip_ignored=False)
            return out.loss - beta * out.entropy[valid].mean()

        def megatron_bonus(hh, ww):
            logits = hh @ ww.t()
            entropy = verl_style_entropy(logits, None)
            return megatron_style(logits, target, None, start) - beta * entropy[valid].mean()

        methods["xent_vocab_parallel_linear[entropy_bonus]"] = xent_bonus
        methods["megatron_style_linear[entropy_bonus]"] = megatron_bonus
    # Megatron's column-parallel layer all-reduces the hidden states' gradient in its backward;
    # xent does it inside its call (reduce_input_grad).
    reduce_after = {name: name.startswith("megatron") and dist.get_world_size() > 1 for name in methods}
    return methods, reduce_after


def distributed_linear(configs, d, entropic=False, as_worlds=(None,)):
    """Linear + cross-entropy with the head split over the ranks (``--linear D``): per rank,
    forward + backward (the hidden states' and the shard's gradients) of the mean loss from
    hidden states ``[N, D]`` and the shard ``[V_r, D]``: ``xent_vocab_parallel_linear`` against
    ``megatron_style_linear`` (the shard's logits by ``h @ W_rᵀ``, then ``megatron_style``, the
    hidden states' gradient all-reduced after), and ``xent_linear`` with ``world`` 1 (rank 0, the
    whole head). ``as_worlds`` (one rank only): one rank's share of a P-rank call timed alone (a
    call over V/P classes: the same GEMMs, kernels and summaries as a rank of a P-rank call,
    without the collectives; for time only), rows with ``as_world`` P."""
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    for n, v in configs:
        for as_world in as_worlds:
            parts = as_world or world
            base, extra = divmod(v, parts)
            r = rank if as_world is None else 0
            width = base + (1 if r < extra else 0)
            start = r * base + min(r, extra)
            # One rank's share alone: a call over its V/P classes (the same GEMMs, kernels and
            # summaries as a rank of a P-rank call, without the collectives).
            vocab = v if as_world is None else width
            start = start if as_world is None else 0
            # The hidden states and labels first, from one seed: the same on every rank whatever
            # its shard's width (an uneven split draws a different number of weights).
            gen = torch.Generator().manual_seed(0)
            h0 = torch.randn(n, d, generator=gen).to(torch.bfloat16).cuda()
            target = torch.randint(0, vocab, (n,), generator=gen).cuda()
            target[::7] = -100
            w0 = (torch.randn(width, d, generator=gen) / d**0.5).to(torch.bfloat16).cuda()
            methods, reduce_after = linear_methods(target, start, vocab, entropic)
            for name, fn in methods.items():
                h = h0.clone().requires_grad_(True)
                w = w0.clone().requires_grad_(True)

                def step():
                    h.grad = w.grad = None
                    fn(h, w).backward()
                    if reduce_after[name]:
                        dist.all_reduce(h.grad)

                try:
                    step()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base_mem = torch.cuda.memory_allocated()
                    ms = timed(step)
                    peak = torch.cuda.max_memory_allocated() - base_mem
                    row = {"method": name, "world": world, "n": n, "d": d, "v": v, "dtype": "bf16",
                           "ms_median": round(ms, 3), "extra_peak_MiB": round(peak / 2**20),
                           "tflops_per_rank": round(6 * n * d * width / (ms * 1e-3) / 1e12, 1)}
                    if as_world is not None:
                        row["as_world"] = as_world
                except Exception as ex:
                    row = {"method": name, "world": world, "n": n, "v": v, "error": repr(ex)[:200]}
                if rank == 0:
                    print(json.dumps(row), flush=True)
            del h0, w0
        if rank == 0:
            gen = torch.Generator().manual_seed(0)
            h = torch.randn(n, d, generator=gen).to(torch.bfloat16).cuda().requires_grad_(True)
            w = (torch.randn(v, d, generator=gen) / d**0.5).to(torch.bfloat16).cuda().requires_grad_(True)
            target = torch.randint(0, v, (n,), generator=gen).cuda()
            target[::7] = -100

            def whole_step():
                h.grad = w.grad = None
                xt.linear_cross_entropy(h, w, target, skip_ignored=False).backward()

            whole_step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            ms = timed(whole_step)
            peak = torch.cuda.max_memory_allocated() - base_mem
            print(json.dumps({"method": "xent_linear", "world": 1, "n": n, "d": d, "v": v, "dtype": "bf16",
                              "ms_median": round(ms, 3), "extra_peak_MiB": round(peak / 2**20),
                              "tflops_per_rank": round(6 * n * d * v / (ms * 1e-3) / 1e12, 1)}), flush=True)
            del h, w
        dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--worlds", default="1,2,4,8")
    ap.add_argument("--distributed", action="store_true")
    ap.add_argument("--chunkings", default="auto",
                    help="one GPU: shard chunkings to compare, 'auto' or XENT_SHARD_CHUNK values")
    ap.add_argument("--entropy", action="store_true",
                    help="also the entropies (one GPU) and an entropy bonus (distributed)")
    ap.add_argument("--linear", type=int, default=0, metavar="D",
                    help="distributed: linear + cross-entropy from hidden states of D features")
    ap.add_argument("--as-worlds", default="",
                    help="with --linear on one rank: also one rank's share of P-rank calls, e.g. 2,4,8")
    a = ap.parse_args()
    configs = [tuple(map(int, c.split(":"))) for c in a.configs.split(",")]
    if a.linear:
        as_worlds = [None] + [int(p) for p in a.as_worlds.split(",") if p]
        distributed_linear(configs, a.linear, a.entropy, as_worlds)
    elif a.distributed:
        distributed(configs, a.entropy)
    else:
        entropies = (False, True) if a.entropy else (False,)
        one_gpu(configs, [int(w) for w in a.worlds.split(",")], a.chunkings.split(","), entropies)


if __name__ == "__main__":
    main()
