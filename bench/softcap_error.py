"""The soft cap's error against a float64 reference, xent beside Liger and PyTorch (issue 13: "no
worse than Liger's"). Prints JSON lines.

Per dtype and cap, on ``[N, V]`` logits drawn so the cap bends them (normal, standard deviation
``cap``: a third of the logits beyond ``cap``, where ``tanh`` flattens), labels uniform with one
row in seven ignored, the mean loss with ``softcap=cap`` forward and backward:

- ``loss_abs_err``: ``|loss - loss_f64|``;
- ``grad_max_err``: ``max |g - g_f64| / max |g_f64|`` over the logits' gradient;
- ``grad_rms_err``: the root mean square of ``g - g_f64``, over the same ``max |g_f64|``.

The reference is ``F.cross_entropy(cap · tanh(x / cap))`` in float64 on the same logits (as given,
in their dtype). Methods: ``xent`` (xt.cross_entropy, fused), ``xent[two_phase]``, ``liger``
(LigerCrossEntropyLoss(softcap=cap), when importable), ``torch`` (the same formula in the
logits' dtype, float32 math for 16-bit inputs as autocast would not do: ``x.float()``).

``--spread S`` draws the logits with standard deviation ``S·cap`` instead (rows ``"spread": S``):
0.1 keeps nearly every 8-logit vector within ``|x| < 0.4·cap``, where the cluster kernels take
their polynomial for ``tanh``.

Usage: ``python3 softcap_error.py [--configs N:V,...] [--caps 30,15] [--spread 1]`` (``run.sh
precision``).
"""

import argparse
import json

import torch
import torch.nn.functional as F

import xent.torch as xt


def reference(x, target, cap):
    x64 = x.detach().double().requires_grad_()
    loss = F.cross_entropy(cap * torch.tanh(x64 / cap), target, ignore_index=-100)
    loss.backward()
    return float(loss), x64.grad


def errors(loss, grad, ref_loss, ref_grad):
    diff = grad.double() - ref_grad
    scale = float(ref_grad.abs().max())
    return {
        "loss_abs_err": abs(float(loss) - ref_loss),
        "grad_max_err": float(diff.abs().max()) / scale,
        "grad_rms_err": float(diff.pow(2).mean().sqrt()) / scale,
    }


def methods(cap):
    out = {
        "xent": lambda x, y: xt.cross_entropy(x, y, softcap=cap),
        "xent[two_phase]": lambda x, y: xt.cross_entropy(x, y, softcap=cap, two_phase=True),
        "torch": lambda x, y: F.cross_entropy(cap * torch.tanh(x.float() / cap), y),
    }
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss(softcap=cap)
        out["liger"] = lambda x, y: liger(x, y)
    except Exception as err:  # noqa: BLE001 (report and go on without the peer)
        print(json.dumps({"skipped": "liger", "why": repr(err)}), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="4096:128256,2048:262144")
    ap.add_argument("--caps", default="30,15")
    ap.add_argument("--spread", type=float, default=1.0)
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(13)
    for config in a.configs.split(","):
        n, v = map(int, config.split(":"))
        for cap in map(float, a.caps.split(",")):
            by_name = methods(cap)
            x32 = torch.randn(n, v, device="cuda", generator=gen) * (cap * a.spread)
            target = torch.randint(0, v, (n,), device="cuda", generator=gen)
            target[::7] = -100
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                x = x32.to(dtype)
                ref_loss, ref_grad = reference(x, target, cap)
                for name, fn in by_name.items():
                    xi = x.clone().requires_grad_()
                    loss = fn(xi, target)
                    loss.backward()
                    row = {"method": name, "n": n, "v": v, "dtype": str(dtype).rpartition(".")[2],
                           "softcap": cap, "spread": a.spread}
                    row.update(errors(loss, xi.grad, ref_loss, ref_grad))
                    print(json.dumps(row), flush=True)
                    del xi, loss
                del ref_grad
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
