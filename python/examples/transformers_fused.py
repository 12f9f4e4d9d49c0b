"""A Transformers causal LM trained without its logits: a small ``LlamaForCausalLM`` trained for a
few steps twice from the same start, once with its own loss and once after
``xt.fuse_linear_cross_entropy(model)``, which computes the training loss from the last hidden
states and the head's weight (xent's linear + cross-entropy, chunk by chunk), so the step never
holds the ``[B, T, V]`` logits. The losses are printed side by side and must track each other;
on a CUDA device each step's peak memory too. Needs ``transformers`` (4.49 or later).

    python3 python/examples/transformers_fused.py
"""

import copy
import sys

import torch

import xent.torch as xt

try:
    import transformers
except ImportError:
    print("transformers is not installed: this example needs it (pip install transformers)")
    sys.exit(0)

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
print(f"xt.fuse_linear_cross_entropy on {device}, transformers {transformers.__version__} "
      f"({'cuBLASLt GEMMs + Rust PTX kernel' if device == 'cuda' else 'CPU reference, no GPU found'})")

config = transformers.LlamaConfig(
    vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512,
)
torch.manual_seed(0)
own = transformers.LlamaForCausalLM(config).to(device, dtype).train()
fused = copy.deepcopy(own)
batch, seq_len = 4, 256
# Chunks of 256 rows of logits, a quarter of the batch's (the default is an eighth of the
# logits but at least 64 MiB, more than this small batch's logits); options go to
# linear_cross_entropy. handle.remove() undoes the patch.
handle = xt.fuse_linear_cross_entropy(fused, chunk_bytes=seq_len * config.vocab_size * (torch.finfo(dtype).bits // 8))

input_ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
labels = input_ids.clone()
labels[:, :16] = -100  # e.g. a prompt: not scored
logits_mib = batch * seq_len * config.vocab_size * torch.finfo(dtype).bits / 8 / 2**20


def train(model, steps=5):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, peaks = [], []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        out = model(input_ids=input_ids, labels=labels)
        out.loss.backward()
        if device == "cuda":
            peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return losses, peaks, out


own_losses, own_peaks, _ = train(own)
fused_losses, fused_peaks, out = train(fused)
assert out.logits is None, "a fused training step returns no logits"

print(f"{'step':>4} {'own loss':>10} {'fused loss':>11}" + ("  step peak MiB (own / fused)" if device == "cuda" else ""))
for step, (a, b) in enumerate(zip(own_losses, fused_losses)):
    line = f"{step:>4} {a:>10.5f} {b:>11.5f}"
    if device == "cuda":
        line += f"  {own_peaks[step]:8.1f} / {fused_peaks[step]:.1f}"
    print(line)
if device == "cuda":
    print(f"(the logits alone: {logits_mib:.1f} MiB in {str(dtype).removeprefix('torch.')})")
tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
worst = max(abs(a - b) / abs(a) for a, b in zip(own_losses, fused_losses))
assert worst < tolerance, f"the losses drifted apart: relative difference {worst:.2e}"
print(f"the losses track each other (largest relative difference {worst:.1e}, allowed {tolerance:g})")

fused.eval()  # evaluation runs the model as it was: logits, its own loss
with torch.no_grad():
    evaluated = fused(input_ids=input_ids, labels=labels)
assert evaluated.logits is not None and evaluated.logits.shape == (batch, seq_len, config.vocab_size)
print("eval mode: logits", tuple(evaluated.logits.shape), f"loss {float(evaluated.loss):.5f}")
