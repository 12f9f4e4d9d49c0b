"""Linear + cross-entropy without the [N, V] logits: a small language-model head trained for a
few steps twice from the same start, once with xent.torch.FusedLinearCrossEntropyLoss and once
with PyTorch's `h @ W.T` then F.cross_entropy; the losses are printed side by side and must
track each other, then one step of Liger's token scaling (TRL's DFT loss) against PyTorch. On a
CUDA device xent runs cuBLASLt's GEMMs around its Rust kernel in chunks
of rows (here four chunks); on the CPU it computes the same through its CPU reference.

    python3 python/examples/linear.py
"""

import copy

import torch
import torch.nn.functional as F

import xent.torch as xt

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
print(f"xent linear + cross-entropy on {device} "
      f"({'cuBLASLt GEMMs + Rust PTX kernel' if device == 'cuda' else 'CPU reference, no GPU found'})")

torch.manual_seed(0)
batch, seq_len, dim, vocab = 4, 128, 256, 8192
embed = torch.nn.Embedding(vocab, dim).to(device, dtype)
head = torch.nn.Linear(dim, vocab, bias=False).to(device, dtype)
tokens = torch.randint(0, vocab, (batch, seq_len), device=device)
tokens[:, :8] = -100  # e.g. a prompt: not scored

# Chunks of 128 rows of logits (a quarter of the 512 rows), a 1/4 of the unfused memory.
loss_fn = xt.FusedLinearCrossEntropyLoss(causal_shift=True, label_smoothing=0.1,
                                         chunk_bytes=128 * vocab * head.weight.element_size())


def xent_loss(model_embed, model_head):
    hidden = model_embed(tokens.clamp(min=0))
    return loss_fn(model_head.weight, hidden, tokens)


def torch_loss(model_embed, model_head):
    logits = model_head(model_embed(tokens.clamp(min=0))).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1),
                           ignore_index=-100, label_smoothing=0.1)


runs = {}
for name, loss_of in (("xent", xent_loss), ("torch", torch_loss)):
    model_embed, model_head = copy.deepcopy(embed), copy.deepcopy(head)
    params = list(model_embed.parameters()) + list(model_head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_of(model_embed, model_head)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    runs[name] = losses

print("step  xent       torch")
for step, (a, b) in enumerate(zip(runs["xent"], runs["torch"])):
    print(f"{step:4d}  {a:.6f}  {b:.6f}")
gap = max(abs(a - b) for a, b in zip(runs["xent"], runs["torch"]))
assert runs["xent"][-1] < runs["xent"][0], "the loss did not go down"
assert gap < (5e-2 if dtype == torch.bfloat16 else 1e-4), f"xent and torch drift apart: {gap:.2e}"
print(f"largest difference {gap:.1e}; ok")

# Liger's token scaling (TRL's DFT loss): each token's loss times the probability the model gives
# its label, as a constant. One step of it against the same in PyTorch.
dft_fn = xt.FusedLinearCrossEntropyLoss(causal_shift=True, use_token_scaling=True)
hidden = embed(tokens.clamp(min=0)).detach()
h_x = hidden.clone().requires_grad_()
h_t = hidden.clone().requires_grad_()
dft = dft_fn(head.weight, h_x, tokens)
dft.backward()
logits = F.linear(h_t, head.weight.detach()).float()[:, :-1].reshape(-1, vocab)
labels = tokens[:, 1:].reshape(-1)
scored = labels != -100
nll = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
prob = torch.exp(-nll.detach()) * scored  # softmax(logits)[label], 0 where not scored
want = (prob * nll).sum() / scored.sum()
want.backward()
grad_gap = float((h_x.grad.float() - h_t.grad.float()).abs().max() / h_t.grad.float().abs().max())
print(f"token-scaled (DFT) loss: xent {float(dft.detach()):.6f}, torch {float(want.detach()):.6f}; "
      f"largest gradient difference / largest gradient {grad_gap:.1e}")
dft, want = float(dft.detach()), float(want.detach())
assert abs(dft - want) <= (2e-2 if dtype == torch.bfloat16 else 1e-5) * abs(want)
assert grad_gap < (5e-2 if dtype == torch.bfloat16 else 1e-4)
print("ok")

# Liger's return_predicted_tokens: each scored position's argmax, found on the chunks of logits
# (which never exist whole), -1 where nothing is scored (here the last position of each sequence).
out = xt.FusedLinearCrossEntropyLoss(causal_shift=True, return_predicted_tokens=True)(head.weight, hidden, tokens)
want = F.linear(hidden, head.weight.detach()).argmax(-1)
want[:, -1] = -1
want[tokens.roll(-1, dims=1) == -100] = -1
same = float((out.predicted_tokens == want).float().mean())
print(f"predicted tokens: {same:.1%} equal to the argmax of PyTorch's logits")
assert same > 0.9 and bool((out.predicted_tokens[:, -1] == -1).all())
print("ok")

# A fine-tuning batch whose prompts are masked (half of each sequence labelled -100): by default
# (skip_ignored=True) only the scored rows go through the GEMMs; skip_ignored=False takes every
# row. The same loss and gradients, up to the order of the sums. A call under 2^35 products
# rows x D x V takes every row anyway (counting the rows would cost more than they save), so on
# a GPU this part runs at a size where skipping pays: 8 x 1024 tokens, D = 1024, V = 32768.
sft_batch, sft_len, sft_dim, sft_vocab = (8, 1024, 1024, 32768) if device == "cuda" else (4, 128, 256, 8192)
sft_head = torch.randn(sft_vocab, sft_dim, device=device, dtype=dtype) / sft_dim**0.5
sft_hidden = torch.randn(sft_batch, sft_len, sft_dim, device=device, dtype=dtype)
prompt = torch.randint(0, sft_vocab, (sft_batch, sft_len), device=device)
prompt[:, : sft_len // 2] = -100
results = {}
for skip in (True, False):
    h = sft_hidden.clone().requires_grad_()
    fn = xt.FusedLinearCrossEntropyLoss(causal_shift=True, skip_ignored=skip)
    loss = fn(sft_head, h, prompt)
    loss.backward()
    results[skip] = float(loss.detach()), h.grad.float()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn(sft_head, h, prompt).backward()
        end.record()
        end.synchronize()
        print(f"skip_ignored={skip}: {start.elapsed_time(end) / 10:.3f} ms a step (forward + backward)")
(loss_skip, grad_skip), (loss_all, grad_all) = results[True], results[False]
grad_gap = float((grad_skip - grad_all).abs().max() / grad_all.abs().max())
print(f"half the rows masked: loss {loss_skip:.6f} (scored rows only) against {loss_all:.6f} (every row); "
      f"largest gradient difference / largest gradient {grad_gap:.1e}")
assert abs(loss_skip - loss_all) <= (1e-2 if dtype == torch.bfloat16 else 1e-6) * abs(loss_all)
assert grad_gap < (5e-2 if dtype == torch.bfloat16 else 1e-5)
print("ok")

# Reinforcement learning (GRPO, PPO): each completion token's log-probability under the policy
# (-loss of reduction="none", differentiable) and the entropy of its next-token distribution
# (return_entropy: for logging, entropy masks and an entropy bonus), with no logits held.
temperature = 0.7
out = xt.linear_cross_entropy(hidden / temperature, head.weight.detach(), tokens, reduction="none",
                              causal_shift=True, return_entropy=True)
logits = F.linear(hidden, head.weight.detach()).float()[:, :-1] / temperature
want_logp = -F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1), ignore_index=-100,
                             reduction="none").view(batch, seq_len - 1)
want_entropy = torch.special.entr(torch.softmax(logits, -1)).sum(-1)
scored = tokens[:, 1:] != -100
logp_gap = float((-out.loss[:, :-1] - want_logp)[scored].abs().max())
entropy_gap = float((out.entropy[:, :-1] - want_entropy)[scored].abs().max())
print(f"per-token log-probs and entropies (mean entropy {float(out.entropy[:, :-1][scored].mean()):.4f} nats): "
      f"largest differences from PyTorch {logp_gap:.1e} and {entropy_gap:.1e}")
assert logp_gap < (5e-2 if dtype == torch.bfloat16 else 1e-4) and entropy_gap < (5e-2 if dtype == torch.bfloat16 else 1e-4)
assert bool((out.entropy[:, -1] == 0).all()) and bool((out.entropy[:, :7] == 0).all())
print("ok")

# GRPO's loss with an entropy bonus (TRL's entropy_coef): -Σ advantage·log p - β·Σ H over the
# completion tokens, differentiated through both (the entropies' gradient joins the loss's in
# the two-phase backward), against PyTorch on float32 logits.
beta = 0.01
advantages = torch.randn(batch, seq_len, device=device)
h = hidden.detach().clone().requires_grad_(True)
out = xt.linear_cross_entropy(h / temperature, head.weight.detach(), tokens, reduction="none",
                              causal_shift=True, return_entropy=True)
(-(-out.loss * advantages).sum() - beta * out.entropy.sum()).backward()
h_ref = hidden.detach().float().clone().requires_grad_(True)
logp_all = torch.log_softmax(F.linear(h_ref, head.weight.detach().float())[:, :-1] / temperature, -1)
logp = logp_all.gather(-1, tokens[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
entropy = -(logp_all.exp() * logp_all).sum(-1) * scored
(-(logp * advantages[:, :-1]).sum() - beta * entropy.sum()).backward()
bonus_gap = float((h.grad.float() - h_ref.grad).abs().max() / h_ref.grad.abs().max())
print(f"policy gradient with an entropy bonus: largest hidden-state gradient difference / largest {bonus_gap:.1e}")
assert bonus_gap < (5e-2 if dtype == torch.bfloat16 else 1e-4)
print("ok")
