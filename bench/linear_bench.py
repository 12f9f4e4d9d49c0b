"""Fused linear + cross-entropy on one GPU (forward + both gradients): xent's methods and the
peers of ``peers_linear.py`` (imported from beside this file when present) in one process, on
the same inputs, measured the same way. Prints one JSON line per (method, config, input) and a
markdown table per config at the end.

Methods (issue 12's names): ``gemm`` (the forward GEMM alone, its rate in ``tflops``),
``xent_linear`` (xent.torch.FusedLinearCrossEntropyLoss at its default chunk budget),
``xent_linear_small`` (Liger's memory: chunks of exactly Liger's rows, 256 at 8192 x 4096 x
128256, with cuBLASLt's workspace at 64 KiB through ``XENT_CHUNK_ROWS`` and
``XENT_GEMM_WORKSPACE``), ``xent_linear[rows=R]`` (the
time-memory curve), ``xent_linear[dft]`` and ``liger_flce[dft]`` (Liger's ``use_token_scaling``,
TRL's DFT loss), ``xent_linear[predicted]`` and ``liger_flce[predicted]`` (Liger's
``return_predicted_tokens``), ``xent_linear[serial]`` (the gradient GEMMs on one stream, not
overlapped), ``xent_unfused`` (``h @ W.T``, xent's cross-entropy on the whole logits, autograd's
two GEMMs), and the peers: ``torch_linear``, ``torch_compile_linear``, ``liger_flce``,
``cce``, ``cce_exact``.

Inputs: ``random`` (a nearly uniform softmax) and ``peaked`` (hidden states scaled so the mean
per-row entropy is about 2.5 nats; recorded as ``entropy``).

Usage: python3 linear_bench.py [--configs N:D:V,...] [--only m1,m2] [--curve R1,R2@W,...]
                                [--profile] [--rounds R] [--energy] [--memory]

``--curve`` entries are budgets of ``R`` rows per chunk (rounded as the library rounds them),
``=R`` for chunks of exactly ``R`` rows (``XENT_CHUNK_ROWS``), either with ``@W`` for cuBLASLt's
workspace at ``W`` bytes (``4M``, ``256K``), then ``:serial`` for the gradient GEMMs on one
stream, ``:algo=I`` for cuBLASLt's ``I``-th heuristic choice (``XENT_GEMM_ALGO``; ``:algo=L/H/W`` one a GEMM:
the logits', ``grad_hidden``'s, ``grad_weight``'s), ``:scheme=S`` for chunks under ``S`` rows
taking the gradients by blocks of the vocabulary (``XENT_ROW_SCHEME_MIN_ROWS``; by default the
card's crossover, printed first: 192 rows on an H200, 282 on an H100 SXM)
and ``:tune`` for the GEMMs autotuned (``XENT_GEMM_TUNE=1``: the fastest of cuBLASLt's first eight choices,
timed on the first call of each shape, as ``xent_linear[tuned]`` and ``xent_linear_small[tuned]``). ``--only``
splits on the commas outside brackets (``xent_linear[rows=256,workspace=4M]`` is one name). ``--profile`` follows each timed method (random input only, first round) with steps under
``torch.profiler`` (five steps back to back, reported a step): its kernels by GPU time (cuBLASLt's
included: CUPTI sees every launch of the process), then the steps' timeline (idle time between kernels, time two kernels overlapped, the
first kernels in order), to see where a method's time over the GEMMs goes. ``--rounds R`` measures
every method R times, interleaved (all methods, then all again), and reports each one's median over
the rounds (``ms_spread``: the range of its round medians): the GPU's clocks drift with power and
heat over a run (the same step took 35.7 and 41.0 ms in session 25's profiles), and a method
measured once is compared with the others at whatever clock it met. ``--energy`` adds, from NVML,
each timed loop's energy a step (``joules_step``), its mean SM clock (``sm_mhz``) and the share of
that time the clock was held by the software power cap (``power_capped``). ``--memory`` follows
each timed method (random input, first round) with one step under PyTorch's allocator history
and prints what was allocated during that step and still held at its peak, largest first, each
with the first frame outside PyTorch that allocated it: where ``extra_peak_MiB`` comes from.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys

import torch

import xent.torch as xt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import peers_linear
except ImportError:  # the peers are optional; xent's rows still run
    peers_linear = None

DEV = "cuda"


class Meter:
    """The GPU's energy counter and SM clock through NVML (the driver's ``libnvidia-ml.so.1``, by
    ctypes: no Python package needed). ``with meter:`` around a timed loop; then ``joules`` (energy
    counter's difference), ``mhz`` (mean of the SM clock sampled every 2 ms by a thread) and
    ``capped`` (share of samples whose clock-event reasons include the software power cap)."""

    SM_CLOCK, POWER_CAP_BIT = 1, 0x4

    def __init__(self, index):
        import ctypes
        self.c = ctypes
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit failed")
        self.handle = ctypes.c_void_p()
        # NVML counts every GPU of the machine, CUDA only the visible ones: find the bench's
        # device by its UUID, else take NVML's device `index`.
        try:
            uuid = f"GPU-{torch.cuda.get_device_properties(0).uuid}".encode()
            found = self.lib.nvmlDeviceGetHandleByUUID(ctypes.c_char_p(uuid), ctypes.byref(self.handle)) == 0
        except Exception:  # an older torch without `uuid`
            found = False
        if not found and self.lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(self.handle)) != 0:
            raise RuntimeError("nvmlDeviceGetHandleByIndex failed")
        self.joules, self.mhz, self.capped = 0.0, 0.0, 0.0
        try:  # the name since r535, then the older one
            self.reasons = self.lib.nvmlDeviceGetCurrentClocksEventReasons
        except AttributeError:
            self.reasons = self.lib.nvmlDeviceGetCurrentClocksThrottleReasons

    def energy_mj(self):
        e = self.c.c_ulonglong()
        self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, self.c.byref(e))
        return e.value

    def sample(self):
        clock, reasons = self.c.c_uint(), self.c.c_ulonglong()
        self.lib.nvmlDeviceGetClockInfo(self.handle, self.SM_CLOCK, self.c.byref(clock))
        self.reasons(self.handle, self.c.byref(reasons))
        return clock.value, bool(reasons.value & self.POWER_CAP_BIT)

    def __enter__(self):
        import threading
        import time
        self.samples, self.stop = [], threading.Event()

        def run():
            while not self.stop.is_set():
                self.samples.append(self.sample())
                time.sleep(0.002)

        self.thread = threading.Thread(target=run, daemon=True)
        self.e0 = self.energy_mj()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.joules = (self.energy_mj() - self.e0) / 1e3
        n = max(len(self.samples), 1)
        self.mhz = sum(c for c, _ in self.samples) / n
        self.capped = sum(1 for _, p in self.samples if p) / n
        return False


def meter_or_none():
    try:
        return Meter(0)
    except Exception as ex:  # no NVML: the rows go without energy and clocks
        print(f"no NVML meter: {ex!r}", file=sys.stderr)
        return None


ITERS = 10


def timed(fn, iters=ITERS, warm=3, meter=None):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    if meter is not None:
        with meter:
            med, mn = timed(fn, iters, 0)
        return med, mn
    ts = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts), min(ts)


def entropy_at(h, w, scale, rows=256):
    with torch.no_grad():
        z = (h[:rows] * scale).float() @ w.float().T
        p = z.log_softmax(-1)
        return float(-(p.exp() * p).sum(-1).mean())


def peaked_scale(h, w, target=2.5):
    lo, hi = 1.0, 64.0
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        if entropy_at(h, w, mid) > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def size_bytes(text):
    """``256K``, ``4M`` or a plain number of bytes."""
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def liger_chunk_rows(n, d, v):
    """Rows of Liger's chunk (``LigerFusedLinearCrossEntropyFunction``'s rule)."""
    rows = math.ceil(n / math.ceil(v / d))
    return 1 << (rows - 1).bit_length()


def xent_methods(v, curve):
    out = {}

    def with_rows(rows, serial=False, workspace=None, exact=False, algo=None, tune=False, gemm_tn=None, sms=None,
                  grads=False, scheme=None):
        loss_fn = xt.FusedLinearCrossEntropyLoss(ignore_index=-100, chunk_bytes=None if rows is None else rows * v * 2)

        def run(h, w, y):
            if serial:  # the two gradient GEMMs one after the other, on one stream
                os.environ["XENT_LINEAR_OVERLAP"] = "0"
            if workspace is not None:  # cuBLASLt's workspace in bytes (default: 4 to 32 MiB)
                os.environ["XENT_GEMM_WORKSPACE"] = str(workspace)
            if exact:  # chunks of exactly `rows` rows, not rounded to whole tiles
                os.environ["XENT_CHUNK_ROWS"] = str(rows)
            if algo is not None:  # cuBLASLt's algo-th heuristic result for every GEMM
                os.environ["XENT_GEMM_ALGO"] = str(algo)
            if tune:  # the fastest of cuBLASLt's candidates, timed on the first call of a shape
                os.environ["XENT_GEMM_TUNE"] = "1"
            if gemm_tn is not None:  # the weight gradient from xent's own GEMM: "1" always, "0" never
                os.environ["XENT_GEMM_TN"] = gemm_tn
            if sms is not None:  # "H,W": the SMs the overlapped grad_hidden / grad_weight GEMMs plan for
                os.environ["XENT_LINEAR_SMS"] = sms
            if grads:  # both gradient GEMMs from xent's one kernel (True, or its splits: 1 or 2)
                os.environ["XENT_GEMM_GRADS"] = "1"
                if grads is not True:
                    os.environ["XENT_GEMM_GRADS_SPLITS"] = str(grads)
            if scheme is not None:  # chunks of fewer rows take the gradients by vocabulary blocks
                os.environ["XENT_ROW_SCHEME_MIN_ROWS"] = str(scheme)
            try:
                loss_fn(w, h, y).backward()
            finally:
                for name in ("XENT_LINEAR_OVERLAP", "XENT_GEMM_WORKSPACE", "XENT_CHUNK_ROWS", "XENT_GEMM_ALGO",
                             "XENT_GEMM_TUNE", "XENT_GEMM_TN", "XENT_LINEAR_SMS", "XENT_GEMM_GRADS",
                             "XENT_GEMM_GRADS_SPLITS", "XENT_ROW_SCHEME_MIN_ROWS"):
                    os.environ.pop(name, None)

        return run

    out["xent_linear"] = with_rows(None)
    out["xent_linear[serial]"] = with_rows(None, serial=True)
    # Liger's memory: Liger's own chunk (next power of two of N / ceil(V / D) rows: 256 at
    # 8192 x 4096 x 128256, 512 at 16384), exactly, with cuBLASLt's workspace at 64 KiB.
    def small(tune, gemm_tn=None, serial=False):
        fns = {}

        def run(h, w, y):
            rows = liger_chunk_rows(h.shape[0], w.shape[1], v)
            fns.setdefault(rows, with_rows(rows, workspace=64 << 10, exact=True, tune=tune,
                                             gemm_tn=gemm_tn, serial=serial))(h, w, y)

        return run

    out["xent_linear_small"] = small(False)
    # The weight gradient from xent's own GEMM: by default where it runs alone (in place) at
    # chunks of at most 256 rows; `[cublas]` never (XENT_GEMM_TN=0), `[gemm_tn]` for every chunk
    # (XENT_GEMM_TN=1), beside the hidden states' GEMM or after it.
    out["xent_linear_small[cublas]"] = small(False, gemm_tn="0")
    out["xent_linear_small[gemm_tn]"] = small(False, gemm_tn="1")
    out["xent_linear_small[gemm_tn,serial]"] = small(False, gemm_tn="1", serial=True)
    out["xent_linear[gemm_tn]"] = with_rows(None, gemm_tn="1")
    # Liger's token scaling (TRL's DFT loss): two-phase with a per-row upstream; beside it
    # `liger_flce[dft]` (below) when Liger is importable.
    dft_fn = xt.FusedLinearCrossEntropyLoss(ignore_index=-100, use_token_scaling=True)

    def xent_dft(h, w, y):
        dft_fn(w, h, y).backward()

    out["xent_linear[dft]"] = xent_dft
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_dft_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, use_token_scaling=True)

        def liger_dft(h, w, y):
            liger_dft_fn(w, h, y).backward()

        out["liger_flce[dft]"] = liger_dft
    except Exception as ex:  # Liger absent or without token scaling: xent's row still runs
        print("liger_flce[dft] unavailable:", repr(ex)[:300], file=sys.stderr)
    # Liger's return_predicted_tokens: each row's argmax from the chunks of logits; beside it
    # `liger_flce[predicted]` when Liger is importable.
    predicted_fn = xt.FusedLinearCrossEntropyLoss(ignore_index=-100, return_predicted_tokens=True)

    def xent_predicted(h, w, y):
        predicted_fn(w, h, y).loss.backward()

    out["xent_linear[predicted]"] = xent_predicted
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_predicted_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, return_predicted_tokens=True)

        def liger_predicted(h, w, y):
            liger_predicted_fn(w, h, y).loss.backward()

        out["liger_flce[predicted]"] = liger_predicted
    except Exception as ex:  # Liger absent or without predicted tokens: xent's row still runs
        print("liger_flce[predicted] unavailable:", repr(ex)[:300], file=sys.stderr)
    out["xent_linear_small[tuned]"] = small(True)
    out["xent_linear[tuned]"] = with_rows(None, tune=True)
    # R or =R (exactly R rows), then @W (a W-byte workspace), :serial, :algo=I, :tune, :tn (xent's
    # weight-gradient GEMM), :scheme=S (chunks under S rows take the vocabulary-blocked backward,
# XENT_ROW_SCHEME_MIN_ROWS), :sms=H/W (the SMs of the overlapped grad_hidden / grad_weight GEMMs),
    # :grads (both gradient GEMMs from xent's one kernel; :grads=S with its hidden-state tiles in S
    # splits of the vocabulary, 1 or 2)
    for entry in curve:
        spec, *flags = entry.split(":")
        rows, _, ws = spec.partition("@")
        exact = rows.startswith("=")
        rows = rows.lstrip("=")
        serial = "serial" in flags
        tune = "tune" in flags
        # algo=I for every GEMM, or algo=L/H/W for the logits', grad_hidden's and grad_weight's
        algo = next((f[5:].replace("/", ",") for f in flags if f.startswith("algo=")), None)
        sms = next((f[4:].replace("/", ",") for f in flags if f.startswith("sms=")), None)
        tn = "tn" in flags
        grads = next((int(f[6:]) if f.startswith("grads=") else True for f in flags
                      if f == "grads" or f.startswith("grads=")), False)
        scheme = next((int(f[7:]) for f in flags if f.startswith("scheme=")), None)
        name = f"xent_linear[rows={'=' if exact else ''}{rows}" + "".join(
            [f",workspace={ws}" if ws else "", ",serial" if serial else "", f",algo={algo}" if algo is not None else "",
             ",tuned" if tune else "", ",gemm_tn" if tn else "", f",sms={sms}" if sms else "",
             (",grads" if grads is True else f",grads={grads}") if grads else "",
             f",scheme={scheme}" if scheme is not None else ""]) + "]"
        out[name] = with_rows(int(rows), serial=serial, workspace=size_bytes(ws) if ws else None, exact=exact,
                              algo=algo, tune=tune, gemm_tn="1" if tn else None, sms=sms, grads=grads, scheme=scheme)

    def xent_unfused(h, w, y):
        xt.cross_entropy(h @ w.T, y, ignore_index=-100).backward()

    out["xent_unfused"] = xent_unfused
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="8192:4096:128256,16384:4096:128256")
    ap.add_argument("--only", default="")
    ap.add_argument("--curve", default="256,512,1024,2048")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--energy", action="store_true")
    ap.add_argument("--memory", action="store_true")
    a = ap.parse_args()
    only = set(filter(None, re.split(r",(?![^\[]*\])", a.only)))
    curve = [r for r in a.curve.split(",") if r]
    meter = meter_or_none() if a.energy else None
    torch.manual_seed(0)
    from xent import _xent
    from xent.torch import linear as xlinear
    print(f"# {torch.cuda.get_device_name()}: fused chunks take the row scheme from "
          f"{_xent.linear_row_scheme_rows(xlinear._device(torch.cuda.current_device()))} rows", flush=True)
    peers = peers_linear.methods() if peers_linear is not None else {}
    for cfg in a.configs.split(","):
        n, d, v = map(int, cfg.split(":"))
        methods = {**xent_methods(v, curve), **peers}
        w0 = (torch.randn(v, d, device=DEV) / math.sqrt(d)).to(torch.bfloat16)
        h0 = torch.randn(n, d, device=DEV).to(torch.bfloat16)
        y = torch.randint(0, v, (n,), device=DEV)
        y[::7] = -100
        rows = []
        med, mn = timed(lambda: h0 @ w0.T)
        row = {"method": "gemm", "n": n, "d": d, "v": v, "dtype": "bf16", "ms_median": round(med, 3),
               "tflops": round(2 * n * d * v / (mn * 1e-3) / 1e12, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        scale = peaked_scale(h0, w0)
        for inp, s in (("random", 1.0), ("peaked", scale)):
            h_base = (h0.float() * s).to(torch.bfloat16)
            ent = entropy_at(h_base, w0, 1.0)
            # Every method once a round, in the same order: with --rounds R each method's time is
            # the median over rounds, so a drift of the GPU's clocks (power, heat) over the run
            # reaches every method alike instead of the ones measured last.
            per_round = []
            for rnd in range(a.rounds):
                for name, fn in methods.items():
                    # --only names the fixed methods; --curve's entries always run
                    if only and name not in only and not name.startswith("xent_linear[rows="):
                        continue
                    h = h_base.clone().requires_grad_(True)
                    w = w0.clone().requires_grad_(True)

                    def step():
                        h.grad = None
                        w.grad = None
                        fn(h, w, y)

                    try:
                        step()
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        med, mn = timed(step, meter=meter)
                        peak = torch.cuda.max_memory_allocated() - base
                        row = {"method": name, "input": inp, "entropy": round(ent, 2), "n": n, "d": d, "v": v,
                               "dtype": "bf16", "ms_median": round(med, 3), "ms_min": round(mn, 3),
                               "tflops": round(6 * n * d * v / (med * 1e-3) / 1e12, 1),
                               "extra_peak_MiB": round(peak / 2**20)}
                        if meter is not None:  # energy a step, mean SM clock, share of it power-capped
                            row.update(joules_step=round(meter.joules / ITERS, 2), sm_mhz=round(meter.mhz),
                                       power_capped=round(meter.capped, 2))
                        if a.rounds > 1:
                            row["round"] = rnd
                    except Exception as ex:  # a peer that fails here still lets the others run
                        row = {"method": name, "input": inp, "n": n, "d": d, "v": v, "error": repr(ex)[:200]}
                    print(json.dumps(row), flush=True)
                    (per_round if a.rounds > 1 else rows).append(row)
                    if a.profile and rnd == 0 and inp == "random" and "ms_median" in row:
                        profile(name, step)
                    if a.memory and rnd == 0 and inp == "random" and "ms_median" in row:
                        memory_at_peak(name, step)
                    torch.cuda.empty_cache()
            if a.rounds > 1:
                rows.extend(over_rounds(per_round))
        table(rows)


def over_rounds(per_round):
    """One row per method from its rows of every round: the median of their medians (and the
    spread, max - min, of those medians), the least minimum and the largest extra peak."""
    out = {}
    for r in per_round:
        out.setdefault(r["method"], []).append(r)
    rows = []
    for name, rs in out.items():
        ok = [r for r in rs if "ms_median" in r]
        if not ok:
            rows.append(rs[0])
            continue
        meds = [r["ms_median"] for r in ok]
        row = {k: v for k, v in ok[0].items() if k != "round"}
        med = statistics.median(meds)
        row.update(ms_median=round(med, 3), ms_min=min(r["ms_min"] for r in ok),
                   ms_spread=round(max(meds) - min(meds), 3), rounds=len(ok),
                   extra_peak_MiB=max(r["extra_peak_MiB"] for r in ok),
                   **{k: statistics.median(r[k] for r in ok) for k in ("joules_step", "sm_mhz", "power_capped")
                      if all(k in r for r in ok)},
                   tflops=round(6 * row["n"] * row["d"] * row["v"] / (med * 1e-3) / 1e12, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


PROFILE_STEPS = 5


def memory_at_peak(name, step, top=8):
    """One step of ``name`` under PyTorch's allocator history (``_record_memory_history``): the
    peak of the bytes it allocated less those it freed, and the allocations made during the step
    and still held at that peak, largest first."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=1 << 20)
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    peak, held = peak_allocations(trace)
    print(f"#### memory {name}: the step's peak {peak / 2**20:.1f} MiB over its start; held then:", flush=True)
    for size, where in held[:top]:
        print(f"  {size / 2**20:9.2f} MiB  {where}", flush=True)
    if len(held) > top:
        print(f"  {sum(sz for sz, _ in held[top:]) / 2**20:9.2f} MiB  in {len(held) - top} smaller allocations",
              flush=True)


def peak_allocations(trace):
    """``(peak, held)`` of an allocator trace (``_snapshot()["device_traces"][device]``): the most
    the bytes allocated less those freed reached (frees of blocks from before the trace count),
    and ``[(bytes, where)]`` of the trace's own allocations live at that moment, largest first
    (``where``: the first frame outside torch's own files). A block counts as freed when its free
    is requested, as ``torch.cuda.memory_allocated`` counts it."""
    live, net, peak, at_peak = {}, 0, 0, []
    for event in trace:
        action, addr, size = event.get("action"), event.get("addr"), event.get("size", 0)
        if action == "alloc":
            live[addr] = (size, _first_own_frame(event.get("frames", ())))
            net += size
            if net > peak:
                peak, at_peak = net, list(live.values())
        elif action == "free_requested":
            live.pop(addr, None)
            net -= size
    return peak, sorted(at_peak, key=lambda held: -held[0])


def _first_own_frame(frames):
    """``file:line function`` of the first frame outside torch's own files, or ``?``."""
    for frame in frames:
        filename = frame.get("filename", "")
        if "/torch/" not in filename and not filename.startswith("<"):
            return f"{os.path.basename(filename)}:{frame.get('line', '?')} {frame.get('name', '?')}"
    return "?"


def profile(name, step):
    """``PROFILE_STEPS`` steps of ``name`` back to back under torch.profiler (so at the clocks a
    timed loop meets, not those of one step after an idle moment, which ran 15% faster in session
    25): its GPU kernels by time a step, then the timeline."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for item in prof.key_averages():
        us = getattr(item, "self_device_time_total", None)
        if us is None:
            us = getattr(item, "self_cuda_time_total", 0)
        if us > 0:
            kernels[item.key] = [item.count / PROFILE_STEPS, us / PROFILE_STEPS]
    total = sum(us for _, us in kernels.values())
    print(f"#### profile {name}: {total / 1e3:.3f} ms of GPU kernels a step ({PROFILE_STEPS} steps back to back)")
    print("| kernel | calls a step | ms a step | share |")
    print("| --- | --- | --- | --- |")
    for kname, (calls, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:14]:
        print(f"| {kname[:110]} | {calls:g} | {us / 1e3:.3f} | {100 * us / max(total, 1e-9):.1f}% |")
    timeline(prof, PROFILE_STEPS)
    sys.stdout.flush()


def timeline(prof, steps):
    """Where the steps' GPU time went between kernels, a step: the span from the first kernel's
    start to the last one's end, the time some kernel ran (the union of their intervals), the idle
    rest, and the time two kernels ran at once; then the last step's first kernels in order
    (start, length; the last ``1/steps`` of the kernels)."""
    spans = []
    for ev in prof.events():
        if "cuda" not in str(getattr(ev, "device_type", "")).lower():
            continue
        tr = ev.time_range
        if tr.end > tr.start:
            spans.append((tr.start, tr.end, ev.name))
    if not spans:
        return
    spans.sort()
    busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, e, _ in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = max(e for _, e, _ in spans) - spans[0][0]
    summed = sum(e - s for s, e, _ in spans)
    k = 1e3 * steps
    print(f"timeline a step: span {span / k:.3f} ms, busy {busy / k:.3f}, idle {(span - busy) / k:.3f}, "
          f"overlapped {(summed - busy) / k:.3f} (kernels' sum {summed / k:.3f})")
    last = spans[len(spans) - len(spans) // steps:]
    t0 = last[0][0]
    for s, e, name in last[:16]:
        print(f"  {(s - t0) / 1e3:8.3f} +{(e - s) / 1e3:.3f}  {name[:70]}")


def table(rows):
    """Markdown: one row per method, ms and extra MiB for each input, and ratios to Liger and to
    xent_unfused."""
    gemm = next((r for r in rows if r["method"] == "gemm"), None)
    by = {}
    for r in rows:
        if "input" in r and "ms_median" in r:
            by.setdefault(r["method"], {})[r["input"]] = r
    n, d, v = rows[0]["n"], rows[0]["d"], rows[0]["v"]
    print(f"\n### N x D x V = {n} x {d} x {v} bf16 (fwd + both gradients)")
    if gemm:
        print(f"forward GEMM alone: {gemm['ms_median']} ms, {gemm['tflops']} TFLOP/s; "
              f"three-GEMM bound {3 * gemm['ms_median']:.1f} ms")
    print("| method | random ms | peaked ms | extra peak MiB | TFLOP/s (6NDV) | vs liger_flce | vs xent_unfused |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, per in by.items():
        r, p = per.get("random"), per.get("peaked")
        ms = [x["ms_median"] for x in (r, p) if x]
        liger = by.get("liger_flce", {})
        unf = by.get("xent_unfused", {})

        def ratio(other):
            got = [other[k]["ms_median"] / per[k]["ms_median"] for k in per if k in other]
            return " / ".join(f"{x:.2f}x" for x in got) if got else "-"

        print(f"| {name} | {r['ms_median'] if r else '-'} | {p['ms_median'] if p else '-'} | "
              f"{max(x['extra_peak_MiB'] for x in (r, p) if x)} | {max(x['tflops'] for x in (r, p) if x)} | "
              f"{ratio(liger)} | {ratio(unf)} |")
    del ms
    sys.stdout.flush()


if __name__ == "__main__":
    main()
