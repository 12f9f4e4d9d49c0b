"""TRL's fused LM head on xent's kernels: ``chunked_logprob`` takes the arguments of TRL's
``ChunkedLogProbFunction.apply`` (``trl.kernels``, what ``trl.trainer.utils.add_fused_lm_head``
runs for GRPO, RLOO, KTO, DPO and SFT) and returns its five per-token outputs, computed by
``linear_cross_entropy`` without the ``[N, V]`` logits; ``patch_trl()`` makes TRL's fused head
call it.

TRL's logits are ``z = h·Wᵀ + b``, scaled by ``logit_scale``, soft-capped by
``final_logit_softcapping`` and divided by ``temperature``: ``y = cap·tanh(s·z / cap) / T``.
That is xent's soft cap of ``(s/T)·z`` at ``cap/T``, so the hidden states and the bias are
multiplied by ``s/T`` (in their dtype: one more rounding of each 16-bit value where ``s/T`` is
not a power of two) and the cap divided by ``T``.

- ``log_probs``: ``log_softmax(y)`` at each target, ``-loss`` of ``reduction="none"``;
  differentiable.
- ``entropy``: ``return_entropy``; differentiable (GRPO's ``entropy_coef``).
- ``is_top1``: whether the target is the first maximal logit (``return_predicted_tokens``).
- ``mean_logits``: ``mean_j y_j``; without a soft cap ``(s/T)·(h·mean_j W_j + mean_j b_j)`` (a
  matrix-vector product in float32); with one it is refused (NotImplementedError).
- ``log_sum_sq_probs``: ``log Σ p²  = lse(2y) - 2·lse(y)``, from a second forward-only pass over
  the doubled logits (the loss of ``2y`` minus twice the loss of ``y``: the target's logit cancels).

``chunk_size`` is accepted and ignored (xent sizes its own chunks). The weight's and the bias's
gradients are accumulated in float32 over xent's chunks (``accum_dtype``), as TRL accumulates
its own (its note: rounding each chunk's sum to bf16 biases training).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from .linear import linear_cross_entropy

#: TRL's optional outputs, in the order its function returns them after the log-probabilities.
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def chunked_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    chunk_size: Optional[int] = None,
    final_logit_softcapping: Optional[float] = None,
    logit_scale: float = 1.0,
    outputs: tuple = OPTIONAL_OUTPUTS,
    *,
    accum_dtype: Optional[torch.dtype] = torch.float32,
):
    """``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` of ``hidden`` ``[N, D]``
    against ``targets`` ``[N]`` over ``weight`` ``[V, D]`` (and ``bias`` ``[V]``), as TRL's
    ``ChunkedLogProbFunction.apply`` returns them: float32 ``[N]`` tensors (``is_top1`` bool),
    ``None`` for an output not in ``outputs``. See the module's doc."""
    unknown = [name for name in outputs if name not in OPTIONAL_OUTPUTS and name != "log_probs"]
    if unknown:
        raise ValueError(f"unknown outputs {unknown}: expected some of {('log_probs',) + OPTIONAL_OUTPUTS}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if final_logit_softcapping is not None and not final_logit_softcapping > 0.0:
        raise ValueError(f"final_logit_softcapping must be positive or None, got {final_logit_softcapping}")
    if "mean_logits" in outputs and final_logit_softcapping is not None:
        raise NotImplementedError(
            "mean_logits with a soft cap is not supported by xent (the mean of cap·tanh(z / cap) needs every "
            "logit); leave it out of `outputs`"
        )
    factor = logit_scale / temperature
    cap = None if final_logit_softcapping is None else final_logit_softcapping / temperature

    def scaled(c):
        h = hidden if c == 1.0 else hidden * c
        b = bias if bias is None or c == 1.0 else bias * c
        return h, b

    h, b = scaled(factor)
    out = linear_cross_entropy(
        h, weight, targets, b, reduction="none", softcap=cap, accum_dtype=accum_dtype,
        return_entropy="entropy" in outputs, return_predicted_tokens="is_top1" in outputs,
    )
    loss = out.loss if hasattr(out, "loss") else out
    log_probs = -loss
    entropy = out.entropy if "entropy" in outputs else None
    is_top1 = (out.predicted_tokens == targets) if "is_top1" in outputs else None
    log_sum_sq_probs = mean_logits = None
    if "log_sum_sq_probs" in outputs:
        with torch.no_grad():
            h2, b2 = scaled(2.0 * factor)
            doubled = linear_cross_entropy(h2, weight, targets, b2, reduction="none",
                                           softcap=None if cap is None else 2.0 * cap)
            log_sum_sq_probs = doubled - 2.0 * loss.detach()
    if "mean_logits" in outputs:
        with torch.no_grad():
            w_mean = weight.detach().mean(0, dtype=torch.float32)
            mean_logits = hidden.detach().float() @ w_mean
            if bias is not None:
                mean_logits = mean_logits + bias.detach().float().mean()
            mean_logits = mean_logits * factor
    return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1


class ChunkedLogProbFunction:
    """Stands where TRL's ``ChunkedLogProbFunction`` stands: ``apply`` is ``chunked_logprob``."""

    apply = staticmethod(chunked_logprob)


def patch_trl():
    """Makes TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, the models it patched
    before or after) compute with xent: its module's ``_ChunkedLogProbFunction`` becomes
    ``ChunkedLogProbFunction`` above. Returns a function that puts TRL's own back."""
    module = sys.modules.get("trl.trainer.utils")
    if module is None:
        import importlib

        module = importlib.import_module("trl.trainer.utils")
    if not hasattr(module, "_ChunkedLogProbFunction"):
        raise RuntimeError(
            "this TRL has no trl.trainer.utils._ChunkedLogProbFunction (its fused LM head came in TRL 1.16): "
            "nothing to patch"
        )
    previous = module._ChunkedLogProbFunction
    module._ChunkedLogProbFunction = ChunkedLogProbFunction

    def restore():
        module._ChunkedLogProbFunction = previous

    return restore
