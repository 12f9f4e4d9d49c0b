"""xent from PyTorch in a screenful: the loss of a small language-model head, its gradient, and a
check against torch.nn.functional.cross_entropy in float64. Runs the Rust kernels on a CUDA
device, else xent's CPU reference (and says which).

    python3 python/examples/quickstart.py
"""

import torch
import torch.nn.functional as F

import xent.torch as xt

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
print(f"xent on {device} ({'Rust PTX kernels' if device == 'cuda' else 'CPU reference, no GPU found'})")

torch.manual_seed(0)
batch, seq_len, vocab = 4, 256, 32000
logits = torch.randn(batch, seq_len, vocab, device=device, dtype=dtype, requires_grad=True)
labels = torch.randint(0, vocab, (batch, seq_len), device=device)
labels[:, :16] = -100  # e.g. the prompt: not scored

reference_input = logits.detach().double().requires_grad_(True)
reference = F.cross_entropy(
    reference_input[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100,
    label_smoothing=0.1,
)
reference.backward()

# Next-token loss: position t scored against label t + 1, without slicing or copying the logits.
loss = xt.cross_entropy(logits, labels, causal_shift=True, label_smoothing=0.1)
loss.backward()  # the gradient was written into `logits` during the forward; 1 costs nothing more

loss_error = abs(loss.item() - reference.item())
grad_error = (logits.grad.double() - reference_input.grad).abs().max().item()
print(f"loss {loss.item():.6f} (float64 reference {reference.item():.6f}, |error| {loss_error:.1e})")
print(f"max |gradient error| {grad_error:.1e} (gradient values up to {reference_input.grad.abs().max().item():.1e})")
assert loss_error < 1e-3 and grad_error < 1e-5, "xent disagrees with the reference"
print("ok")
