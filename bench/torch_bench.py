"""xent's PyTorch package in the combined benchmark: fwd+bwd of mean cross-entropy through
``xent.torch.cross_entropy`` on the configs of the Rust benchmark and ``peers.py``, measured as
``peers.py`` measures its peers (same inputs: logits ``randn * 2``, one label in seven ignored;
CUDA events, median of 10 after 3 warm-ups; extra peak memory beyond the logits), so that
``table.py`` puts ``xent_torch`` beside ``xent`` (the Rust benchmark) and the peers.

Methods: ``xent_torch`` (the default: fused mode, two-phase for float16),
``xent_torch[two_phase]``, and a Transformers model's loss: ``transformers_causal_lm`` (its
``ForCausalLMLoss`` written out: float32 upcast, shifted labels) against
``xent_torch[transformers]`` (``xt.ForCausalLMLoss``, the same labels). Each row also carries ``ms_steady``: ms per call over 10 calls issued
back to back (the host ahead of the GPU, as in training), beside peers.py's single timed call,
which also counts the host time before the call's first kernel reaches an idle GPU.

Then the host time per call, the GPU work made negligible (small logits, no synchronisation in the
loop, so the loop runs as fast as the host issues calls): ``xent_torch`` against
``torch.nn.functional.cross_entropy``, fwd+bwd and forward alone. These lines carry
``host_method`` (not ``method``), so table.py leaves them out of the throughput table.

Usage: python3 torch_bench.py [--configs N:V:dtype,...] [--host-iters 2000]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import xent.torch as xt

DEFAULT_CONFIGS = "8192:32000:bf16,8192:128256:bf16,4096:262144:bf16,16384:151936:bf16,8192:128256:f32"
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def timed(fn, iters=10, warmup=3):
    """Median and min ms of ``fn`` by CUDA events (as peers.py)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def extra_peak_bytes(fn):
    """Bytes of CUDA memory ``fn`` allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def steady_ms(fn, calls=10):
    """ms per call of ``calls`` back-to-back calls between two CUDA events: the host runs ahead
    of the GPU as in a training step, so host time before a call's first kernel is hidden."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def copy_bandwidth_gbps():
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    _, best = timed(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (4 << 30) / (best * 1e-3) / 1e9


def transformers_causal_lm_loss(x, y):
    """Transformers' ``ForCausalLMLoss`` (transformers 5.25) written out, ``[N, V]`` taken as one
    sequence: the logits upcast to float32, the labels padded by one ignored label and shifted
    left, the mean over the scored rows."""
    labels = F.pad(y, (0, 1), value=-100)[..., 1:].contiguous()
    return F.cross_entropy(x.float().view(-1, x.shape[-1]), labels.view(-1), ignore_index=-100)


METHODS = {
    "xent_torch": lambda x, y: xt.cross_entropy(x, y).backward(),
    "xent_torch[two_phase]": lambda x, y: xt.cross_entropy(x, y, two_phase=True).backward(),
    # A Transformers model's loss: its own, and xent's as the model's `loss_function` (the same
    # shifted labels, two-phase).
    "transformers_causal_lm": lambda x, y: transformers_causal_lm_loss(x, y).backward(),
    "xent_torch[transformers]": lambda x, y: xt.ForCausalLMLoss(x, y, x.shape[-1]).backward(),
}


def throughput(configs, bandwidth):
    torch.manual_seed(0)
    for n, v, dtype_name in configs:
        base = (torch.randn(n + 1, v, device="cuda") * 2).to(DTYPES[dtype_name])
        labels = torch.randint(0, v, (n + 1,), device="cuda")
        labels[::7] = -100
        for name, method in METHODS.items():
            x = base[1:].clone().requires_grad_(True)
            y = labels[1:].clone()

            def step():
                x.grad = None
                method(x, y)

            try:
                extra = extra_peak_bytes(step)
                median, best = timed(step)
                steady = steady_ms(step)
                gbps = 2 * base.element_size() * n * v / (median * 1e-3) / 1e9
                row = {
                    "method": name, "n": n, "v": v, "dtype": dtype_name,
                    "ms_median": round(median, 3), "ms_min": round(best, 3),
                    "ms_steady": round(steady, 3),
                    "eff_GBps": round(gbps), "pct_of_copy": round(100 * gbps / bandwidth, 1),
                    "extra_peak_MiB": round(extra / 2**20),
                }
            except Exception as err:  # a failure on a shape is a result too
                row = {"method": name, "n": n, "v": v, "dtype": dtype_name, "error": repr(err)[:300]}
            print(json.dumps(row), flush=True)
            del x
            torch.cuda.empty_cache()


def host_time(iters, n=8, v=32000):
    """Microseconds of host time per call, for xent_torch and F.cross_entropy (bf16 logits)."""
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, v, (n,), device="cuda")
    x = logits.clone().requires_grad_(True)
    cases = {
        ("xent_torch", "fwd+bwd"): lambda: xt.cross_entropy(x, target).backward(),
        ("torch", "fwd+bwd"): lambda: F.cross_entropy(x, target).backward(),
        ("xent_torch", "fwd"): lambda: xt.cross_entropy(logits, target),
        ("torch", "fwd"): lambda: F.cross_entropy(logits, target),
    }
    try:  # another autograd Function written in Python, for scale
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        cases[("liger", "fwd+bwd")] = lambda: liger(x, target).backward()
    except ImportError:
        pass
    for (name, what), call in cases.items():
        for _ in range(50):
            call()
        torch.cuda.synchronize()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(iters):
                x.grad = None
                call()
            samples.append((time.perf_counter() - start) / iters * 1e6)
            torch.cuda.synchronize()
        print(json.dumps({
            "host_method": name, "what": what, "n": n, "v": v, "dtype": "bf16",
            "host_us_median": round(statistics.median(samples), 2), "host_us_min": round(min(samples), 2),
        }), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--host-iters", type=int, default=2000)
    args = parser.parse_args()
    configs = []
    for item in args.configs.split(","):
        n, v, dt = item.split(":")
        configs.append((int(n), int(v), dt))
    bandwidth = copy_bandwidth_gbps()
    print(json.dumps({"copy_GBps": round(bandwidth), "source": "torch_bench.py"}), flush=True)
    throughput(configs, bandwidth)
    host_time(args.host_iters)


if __name__ == "__main__":
    main()
