"""xent for PyTorch: cross-entropy computed by xent's Rust kernels on PyTorch's tensors and
current stream (CPU tensors take the f64 CPU reference).

>>> import torch, xent.torch as xt
>>> loss = xt.cross_entropy(logits, target)            # like torch.nn.functional.cross_entropy
>>> loss_fn = xt.CrossEntropyLoss(label_smoothing=0.1)  # like torch.nn / Liger's module
>>> loss = xt.linear_cross_entropy(hidden, lm_head.weight, target)  # no [N, V] logits
>>> model.loss_function = xt.ForCausalLMLoss            # a Transformers model's loss
>>> xt.fuse_linear_cross_entropy(model)                 # ... from its hidden states, no logits
>>> xt.trl.patch_trl()                                  # TRL's fused LM head on xent's kernels
>>> loss = xt.vocab_parallel_linear_cross_entropy(hidden, head_shard, target, group=tp)  # TP head
"""

from .function import XentFunction  # imports _ops: torch.ops.xent.* for torch.compile
from .functional import CrossEntropyOutput, cross_entropy
from .hf import FusedHandle, ForCausalLMLoss, fuse_linear_cross_entropy
from .linear import FusedLinearCrossEntropyLoss, linear_cross_entropy
from .linear_parallel import vocab_parallel_linear_cross_entropy
from .module import CrossEntropyLoss
from .seed import CrossEntropyFunction, TritonCausalLMLoss
from . import trl  # noqa: E402  (TRL's fused head: xent.torch.trl.chunked_logprob, patch_trl)
from .vocab_parallel import vocab_parallel_cross_entropy

__all__ = [
    "CrossEntropyFunction",
    "CrossEntropyLoss",
    "CrossEntropyOutput",
    "ForCausalLMLoss",
    "FusedHandle",
    "FusedLinearCrossEntropyLoss",
    "TritonCausalLMLoss",
    "XentFunction",
    "cross_entropy",
    "fuse_linear_cross_entropy",
    "linear_cross_entropy",
    "trl",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]
