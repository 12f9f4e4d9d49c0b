"""Linear + cross-entropy with a tensor-parallel LM head: each rank holds the rows of the head for
its slice of the vocabulary (Megatron's column-parallel output layer), and
``xt.vocab_parallel_linear_cross_entropy`` gives every rank the loss over the whole vocabulary,
its rows' weight gradient and the hidden states' gradient, without any rank holding more than a
chunk of its own logits (one all-gather of a few values a row per chunk, one all-reduce of the
hidden states' gradient). Checked against ``xt.linear_cross_entropy`` over the whole head, then
an entropy bonus (RL, verl's ``linear_cross_entropy`` with a process group) the same way.

    python3 python/examples/vocab_parallel_linear.py                  # one rank (this process)
    torchrun --nproc_per_node=2 python/examples/vocab_parallel_linear.py   # two GPUs, two ranks

CUDA only (it says so and stops without a GPU).
"""

import os

import torch
import torch.distributed as dist

import xent.torch as xt

if not torch.cuda.is_available():
    print("the vocabulary-parallel linear loss runs on CUDA tensors: no CUDA device here, nothing to do")
    raise SystemExit(0)

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
if "RANK" in os.environ:  # under torchrun
    dist.init_process_group("nccl")
else:
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29534", rank=0, world_size=1)
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(rank % torch.cuda.device_count())

# The same hidden states, labels and whole head on every rank (one seed); each rank keeps its rows.
gen = torch.Generator().manual_seed(0)
rows, d, vocab = 2048, 1024, 32768
hidden = torch.randn(rows, d, generator=gen).to(torch.bfloat16).cuda()
head = (torch.randn(vocab, d, generator=gen) / d**0.5).to(torch.bfloat16).cuda()
target = torch.randint(0, vocab, (rows,), generator=gen).cuda()
target[::9] = -100
width = vocab // world
shard = head[rank * width:(rank + 1) * width].clone()
if rank == 0:
    print(f"vocabulary-parallel linear + cross-entropy: {rows} rows, D {d}, vocab {vocab} over {world} "
          f"rank(s) ({width} classes each), bf16, label smoothing 0.1, z-loss 1e-4")

kw = dict(label_smoothing=0.1, lse_square_scale=1e-4, return_token_accuracy=True)
results = {}
for name in ("split", "whole"):
    h = hidden.clone().requires_grad_()
    w = (shard if name == "split" else head).clone().requires_grad_()
    if name == "split":
        out = xt.vocab_parallel_linear_cross_entropy(h, w, target, **kw)
    else:
        out = xt.linear_cross_entropy(h, w, target, **kw)
    out.loss.backward()
    w_grad = w.grad if name == "split" else w.grad[rank * width:(rank + 1) * width]
    results[name] = (out, h.grad, w_grad)
(split, split_h, split_w), (whole, whole_h, whole_w) = results["split"], results["whole"]
loss_error = abs(float(split.loss) - float(whole.loss))
h_error = float((split_h.double() - whole_h.double()).abs().max() / whole_h.double().abs().max())
w_error = float((split_w.double() - whole_w.double()).abs().max() / whole_w.double().abs().max())
print(f"rank {rank}: loss {float(split.loss):.6f} (whole head {float(whole.loss):.6f}), token accuracy "
      f"{float(split.token_accuracy):.4f}; gradients against the whole head's, relative to the largest: "
      f"hidden {h_error:.1e}, weight rows {w_error:.1e}")
assert loss_error <= 1e-5 * float(whole.loss)
assert abs(float(split.token_accuracy) - float(whole.token_accuracy)) <= 2 / rows  # an argmax tie may round apart
assert h_error <= 4 * 2.0**-8 and w_error <= 4 * 2.0**-8

# An entropy bonus: `loss - beta·mean(H)` over the scored rows, H the whole vocabulary's
# entropies, differentiable (the two-phase mode, the default with return_entropy).
beta = 0.01
scored = target != -100
grads = []
for name in ("split", "whole"):
    h = hidden.clone().requires_grad_()
    w = (shard if name == "split" else head).clone().requires_grad_()
    fn = xt.vocab_parallel_linear_cross_entropy if name == "split" else xt.linear_cross_entropy
    out = fn(h, w, target, return_entropy=True)
    (out.loss - beta * out.entropy[scored].mean()).backward()
    grads.append((out.entropy, h.grad))
(split_e, split_h), (whole_e, whole_h) = grads
e_error = float((split_e - whole_e).abs().max())
h_error = float((split_h.double() - whole_h.double()).abs().max() / whole_h.double().abs().max())
print(f"rank {rank}: entropy bonus, mean entropy {float(split_e[scored].mean()):.4f} nats, max |entropy "
      f"difference| {e_error:.1e}, hidden gradient {h_error:.1e} of the largest")
assert e_error <= 1e-5 * float(whole_e.abs().max())
assert h_error <= 4 * 2.0**-8
dist.destroy_process_group()
