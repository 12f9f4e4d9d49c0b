"""The linear path's three GEMMs of one chunk, alone and the two gradient GEMMs side by side, in
PyTorch's cuBLAS (median ms of 20, CUDA events): where a chunked step's time goes.

    python3 gemm_parts.py [--rows 256,512,896] [--d 4096] [--v 128256]
"""
import argparse
import json

import torch


def timed(fn, iters=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="256,512,896")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    a = ap.parse_args()
    dev, bf = "cuda", torch.bfloat16
    w = (torch.randn(a.v, a.d, device=dev) / a.d ** 0.5).to(bf)
    gw = torch.zeros(a.v, a.d, device=dev, dtype=bf)
    side = torch.cuda.Stream()
    for r in map(int, a.rows.split(",")):
        h = torch.randn(r, a.d, device=dev).to(bf)
        g = (torch.randn(r, a.v, device=dev) * 1e-3).to(bf)
        gh = torch.empty(r, a.d, device=dev, dtype=bf)

        def logits():
            torch.mm(h, w.t(), out=g)

        def dgrad():
            torch.mm(g, w, out=gh)

        def wgrad():
            gw.addmm_(g.t(), h)

        def both():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                wgrad()
            dgrad()
            torch.cuda.current_stream().wait_stream(side)

        flops = 2 * r * a.d * a.v
        row = {"rows": r, "d": a.d, "v": a.v}
        for name, fn in (("logits", logits), ("dgrad", dgrad), ("wgrad", wgrad), ("dgrad||wgrad", both)):
            ms = timed(fn)
            row[name + "_ms"] = round(ms, 4)
            row[name + "_tflops"] = round((2 if name == "dgrad||wgrad" else 1) * flops / (ms * 1e-3) / 1e12, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
