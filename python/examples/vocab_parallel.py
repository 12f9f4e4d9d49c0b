"""Vocabulary-parallel cross-entropy from PyTorch: with a tensor-parallel LM head each rank holds
logits ``[N, V/P]`` for its slice of the vocabulary, and ``xt.vocab_parallel_cross_entropy``
gives every rank the loss and its own columns' gradient from one all-gather of a few values per
row (``torch.distributed``). Here a one-rank NCCL group (this process), then four ranks
simulated on this GPU through the two steps apart (``shard_stats``, then ``shard_loss`` on the
concatenated contributions), both against ``F.cross_entropy`` over the whole vocabulary. CUDA
only (it says so and stops without a GPU). Under ``torchrun`` each rank calls
``vocab_parallel_cross_entropy`` with its own slice and ``vocab_start``. With
``return_entropy`` the entropies are the whole vocabulary's and differentiable (an entropy
bonus, checked here against float64 autograd).

    python3 python/examples/vocab_parallel.py
"""

import os

import torch
import torch.nn.functional as F

import xent.torch as xt
from xent.torch import _launch
from xent.torch import vocab_parallel as vp

if not torch.cuda.is_available():
    print("vocabulary-parallel cross-entropy runs on CUDA tensors: no CUDA device here, nothing to do")
    raise SystemExit(0)

torch.manual_seed(0)
rows, vocab, world = 1024, 32000, 4
logits = torch.randn(rows, vocab, device="cuda") * 2
target = torch.randint(0, vocab, (rows,), device="cuda")
target[::9] = -100
reference = F.cross_entropy(logits.double(), target, label_smoothing=0.1)
print(f"vocabulary-parallel cross-entropy: {rows} rows, vocab {vocab}, label smoothing 0.1")

# 1. The autograd function over a process group (here one rank: the whole vocabulary).
import torch.distributed as dist  # noqa: E402

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
x = logits.clone().requires_grad_()
loss = xt.vocab_parallel_cross_entropy(x, target, vocab_start=0, vocab_size=vocab, label_smoothing=0.1)
loss.backward()
loss = loss.detach()
print(f"one-rank NCCL group: loss {float(loss):.6f} (F.cross_entropy in float64: {float(reference):.6f})")

# An entropy bonus (GRPO's entropy_coef): `loss - beta·mean(H)` over the scored rows' entropies,
# whose gradient the two-phase backward (the default with return_entropy) adds in its one pass.
beta = 0.01
x = logits.clone().requires_grad_()
out = xt.vocab_parallel_cross_entropy(x, target, vocab_start=0, vocab_size=vocab, return_entropy=True)
scored = target != -100
(out.loss - beta * out.entropy[scored].mean()).backward()
want = logits.double().requires_grad_()
p = torch.softmax(want, dim=-1)
entropy = -(p * torch.log_softmax(want, dim=-1)).sum(-1)
(F.cross_entropy(want, target) - beta * entropy[scored].mean()).backward()
entropy_error = float((out.entropy.double() - torch.where(scored, entropy, 0.0)).abs().max())
bonus_error = float((x.grad.double() - want.grad).abs().max())
dist.destroy_process_group()
print(f"entropy bonus: mean entropy {float(entropy[scored].mean()):.4f} nats, max |entropy error| "
      f"{entropy_error:.1e}, max |gradient error| {bonus_error:.1e}")
assert entropy_error <= 2e-5 * float(entropy.abs().max())
assert bonus_error <= 1e-5 * float(want.grad.abs().max()) + 1e-7

# 2. Four ranks on this GPU: each rank's contribution, the "all-gather" (a concatenation), then
#    each rank's loss and gradient of its own columns.
opts = _launch.Opts(-100, "mean", 1.0, False, 0.1, 0.0, None, False)
width = vocab // world
pieces = [logits[:, r * width:(r + 1) * width].contiguous() for r in range(world)]
common = dict(vocab_size=vocab, world=world, opts=opts)
gathered = torch.cat([vp.shard_stats(p, target, vocab_start=r * width, **common) for r, p in enumerate(pieces)])
losses = []
for r, p in enumerate(pieces):
    stats = vp.shard_loss(p, target, gathered, vocab_start=r * width, fused=True, **common)
    losses.append(float(xt.function.loss_of(stats, target, opts)))
grad = torch.cat(pieces, dim=-1)  # the fused steps wrote each rank's gradient over its logits
want = logits.double().requires_grad_()
F.cross_entropy(want, target, label_smoothing=0.1).backward()
error = float((grad.double() - want.grad).abs().max())
print(f"{world} ranks on one GPU: loss {losses[0]:.6f} on every rank: {len(set(losses)) == 1}; "
      f"max |gradient error| {error:.1e}")
assert len(set(losses)) == 1
assert abs(losses[0] - float(reference)) <= 1e-4 * float(reference)
assert abs(float(loss) - float(reference)) <= 1e-4 * float(reference)
assert error <= 1e-5 * float(want.grad.abs().max()) + 1e-7
