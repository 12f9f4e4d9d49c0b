"""Per-token log-probabilities and entropies without logits (what GRPO, RLOO and KTO take from
the policy): a step is the forward and the backward of ``-Σ log p(token)`` over the scored
tokens, with or without each token's entropy beside it (``entropy``: no gradient through it;
``entropy_bonus``: the objective ``-Σ log p - 0.01·Σ H``, GRPO's ``entropy_coef``, its gradient
through the entropies too).

Methods (JSON lines, then a table; CUDA events, median of ``--iters`` steps):

- ``xent_linear[logprobs]``, ``xent_linear[logprobs,entropy]``,
  ``xent_linear[logprobs,entropy_bonus]``: ``xt.linear_cross_entropy(h, W, y,
  reduction="none", return_entropy=...)`` (the scored rows only: ``skip_ignored``).
- ``trl_chunked[logprobs]``, ``trl_chunked[logprobs,entropy]``,
  ``trl_chunked[logprobs,entropy_bonus]``: TRL 1.16's fused LM head
  (``trl.kernels.ChunkedLogProbFunction``, what ``add_fused_lm_head`` runs: cuBLAS tiles of 4096
  tokens x 32768 classes folded by a Triton kernel, the scored rows only), when its wheel is on
  the path. Its backward's DeepSpeed hook (``trl.trainer.utils.maybe_gather_lm_head_ctx``, a null
  context without ZeRO-3) is stubbed where ``trl.trainer.utils`` cannot be imported (its
  dependencies: datasets, pandas, ...).
- ``xent_trl[logprobs,entropy_bonus]``: the same through ``xt.trl.chunked_logprob`` (TRL's
  function's arguments; the weight's gradient accumulated in float32, as TRL's is).
- ``torch[logprobs,entropy]``, ``torch[logprobs,entropy_bonus]``: the logits, ``log_softmax`` in
  float32 and the entropy from it.
- ``xent``, ``xent[entropy,fused]``, ``xent[entropy]``, ``xent[entropy_bonus]``:
  ``xt.cross_entropy`` on materialised logits (N x V bf16), fwd + bwd of the mean: without the
  entropy; with it and ``two_phase=False`` (the entropy kernel's one read of the logits more);
  with it in the default mode (two-phase, so that a gradient can reach it); and with the bonus's
  gradient (the per-element ``opt_`` backward kernel).

Each row also carries ``entropy_err``: the largest error of the method's entropies against
float64 over the first 64 scored rows (on their logits rounded to bf16, as every method's GEMM
rounds them).

    PYTHONPATH=... python3 bench/entropy_bench.py --configs 8192:4096:128256
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import types

import torch

import xent.torch as xt

# The entropy bonus's coefficient (GRPO's ``entropy_coef``): the objective is ``-Σ log p - BONUS·Σ H``.
BONUS = 0.01


def timed(fn, iters, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts), min(ts)


def trl_function():
    """TRL's ``ChunkedLogProbFunction``, or None (with the reason on stderr)."""
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except Exception as ex:
        print("trl_chunked unavailable:", repr(ex)[:300], file=sys.stderr)
        return None
    try:
        importlib.import_module("trl.trainer.utils")
    except Exception as ex:
        print("trl.trainer.utils stubbed (a null gather context):", repr(ex)[:200], file=sys.stderr)
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
    return ChunkedLogProbFunction


def reference_entropy(h, w, rows):
    """float64 entropies of the rows' logits as the bf16 GEMM rounds them."""
    x = (h[rows].double() @ w.double().T).to(torch.bfloat16).double()
    return torch.special.entr(torch.softmax(x, -1)).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="8192:4096:128256,8192:4096:151936")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="every method once a round; each round's rows printed")
    a = ap.parse_args()
    torch.manual_seed(0)
    trl = trl_function()
    rows_out = []
    for cfg in a.configs.split(","):
        n, d, v = map(int, cfg.split(":"))
        w0 = (torch.randn(v, d, device="cuda") / d**0.5).to(torch.bfloat16)
        # Hidden states scaled so the entropies are a trained model's (a few nats), not ln V.
        h0 = (torch.randn(n, d, device="cuda") * 2.5).to(torch.bfloat16)
        y = torch.randint(0, v, (n,), device="cuda")
        y[::7] = -100  # prompt and padding tokens: not scored
        mask = y != -100
        check_rows = mask.nonzero().squeeze(1)[:64]
        want_entropy = reference_entropy(h0, w0, check_rows)

        def xent_linear(entropy, bonus=False):
            def run(h, w):
                out = xt.linear_cross_entropy(h, w, y, reduction="none", return_entropy=entropy)
                loss = out.loss if entropy else out
                objective = loss.sum()
                if bonus:
                    objective = objective - BONUS * out.entropy.sum()
                objective.backward()
                return out.entropy.detach() if entropy else None
            return run

        def trl_chunked(entropy, bonus=False):
            def run(h, w):
                logp, ent, *_ = trl.apply(h[mask], w, None, y[mask], 1.0, 32768, None, 1.0,
                                          ("entropy",) if entropy else ())
                objective = (-logp).sum()
                if bonus:
                    objective = objective - BONUS * ent.sum()
                objective.backward()
                if ent is None:
                    return None
                full = torch.zeros(n, dtype=ent.dtype, device=ent.device)
                full[mask] = ent.detach()
                return full
            return run

        def torch_logprobs(bonus):
            def run(h, w):
                logp_all = torch.log_softmax((h @ w.T).float(), -1)
                logp = logp_all.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1) * mask
                ent = -(logp_all.exp() * logp_all).sum(-1) * mask
                objective = (-logp).sum()
                if bonus:
                    objective = objective - BONUS * ent.sum()
                objective.backward()
                return ent.detach()
            return run

        methods = {
            "xent_linear[logprobs]": xent_linear(False),
            "xent_linear[logprobs,entropy]": xent_linear(True),
            "xent_linear[logprobs,entropy_bonus]": xent_linear(True, bonus=True),
            "torch[logprobs,entropy]": torch_logprobs(False),
            "torch[logprobs,entropy_bonus]": torch_logprobs(True),
        }
        def xent_trl(h, w):
            # `xt.trl.chunked_logprob`: TRL's function's arguments and outputs (the scored rows, as
            # TRL's head passes them), the weight's gradient accumulated in f32 as TRL's is.
            logp, ent, *_ = xt.trl.chunked_logprob(h[mask], w, None, y[mask], 1.0, 32768, None, 1.0, ("entropy",))
            ((-logp).sum() - BONUS * ent.sum()).backward()
            full = torch.zeros(n, dtype=ent.dtype, device=ent.device)
            full[mask] = ent.detach()
            return full

        methods["xent_trl[logprobs,entropy_bonus]"] = xent_trl
        if trl is not None:
            methods["trl_chunked[logprobs]"] = trl_chunked(False)
            methods["trl_chunked[logprobs,entropy]"] = trl_chunked(True)
            methods["trl_chunked[logprobs,entropy_bonus]"] = trl_chunked(True, bonus=True)
        for rnd in range(a.rounds):
            for name, fn in methods.items():
                h = h0.clone().requires_grad_(True)
                w = w0.clone().requires_grad_(True)
                state = {}

                def step():
                    h.grad = w.grad = None
                    state["entropy"] = fn(h, w)

                row = {"method": name, "n": n, "d": d, "v": v, "dtype": "bf16", "scored": int(mask.sum()),
                       "round": rnd}
                try:
                    step()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    med, mn = timed(step, a.iters)
                    row.update(ms_median=round(med, 3), ms_min=round(mn, 3),
                               extra_peak_MiB=round((torch.cuda.max_memory_allocated() - base) / 2**20))
                    if state["entropy"] is not None:
                        got = state["entropy"][check_rows].double()
                        row["entropy_err"] = float((got - want_entropy).abs().max())
                        row["mean_entropy"] = round(float(want_entropy.mean()), 3)
                except Exception as ex:  # a peer that fails still lets the others run
                    row["error"] = repr(ex)[:300]
                print(json.dumps(row), flush=True)
                rows_out.append(row)
                torch.cuda.empty_cache()

        # The cross-entropy kernels on materialised logits, with and without the entropy.
        logits0 = (h0 @ w0.T).contiguous()
        for name, kwargs, bonus in (("xent", {}, False), ("xent[entropy,fused]", dict(two_phase=False), False),
                                    ("xent[entropy]", {}, False), ("xent[entropy_bonus]", {}, True)):
            entropy = name != "xent"

            def step():
                x = logits0.clone().requires_grad_(True)
                out = xt.cross_entropy(x, y, return_entropy=entropy, **kwargs)
                objective = out.loss if entropy else out
                if bonus:
                    objective = objective - BONUS * out.entropy.mean()
                objective.backward()

            clone_ms, _ = timed(lambda: logits0.clone(), a.iters)
            med, mn = timed(step, a.iters)
            row = {"method": name, "n": n, "v": v, "dtype": "bf16",
                   "ms_median": round(med - clone_ms, 3), "ms_min": round(mn - clone_ms, 3),
                   "note": "fwd+bwd on logits, the clone's time subtracted"}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
        logits0 = None
        torch.cuda.empty_cache()

    print("\n| method | n x d x v | ms | extra peak MiB | entropy error |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows_out:
        shape = f"{r['n']} x {r.get('d', '-')} x {r['v']}"
        print(f"| {r['method']} | {shape} | {r.get('ms_median', r.get('error', '?'))} | "
              f"{r.get('extra_peak_MiB', '')} | {r.get('entropy_err', '')} |")


if __name__ == "__main__":
    main()
