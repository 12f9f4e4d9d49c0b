"""A Transformers model's training step with each loss: a ``LlamaForCausalLM`` of Llama 3 8B's
layer and head shapes (D = 4096, V = 128256; ``--layers`` decoder layers, 1 by default, so the
head and loss are a large share of the step), bf16, ``--batch`` x ``--seq`` tokens, forward and
backward of the whole model. Methods, each on the same model and tokens:

- ``transformers``: the model's own ``ForCausalLMLoss`` (float32 copy of the logits);
- ``xent_loss_function``: ``model.loss_function = xt.ForCausalLMLoss`` (the logits as the
  model makes them, their gradient written over them);
- ``xent_fused``: ``xt.fuse_linear_cross_entropy(model)`` (no logits: the loss from the last
  hidden states and the head's weight, chunk by chunk, only the scored rows), ``xent_fused[all
  rows]`` with ``skip_ignored=False`` (every row through the head, the ignored ones too), and
  ``xent_fused[64MiB]`` with chunks of 64 MiB of logits (about Liger's memory);
- ``liger_flce``: Liger's ``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True)`` with
  its other kernels off (it patches the class, so it runs last); a row with ``error`` if that
  Liger does not fit this Transformers.

The labels of each sequence's first ``--prompt`` tokens are -100 (16 by default; a fraction
below 1 takes that share of the sequence: a fine-tuning batch whose prompts are masked).

Each row: ``ms_median`` of 10 steps after 3 (CUDA events), ``extra_peak_MiB`` (peak memory of a
step above the model, its gradients and the tokens), ``loss`` (the same for every method, to the
GEMMs' rounding), ``scored`` (the labels scored). Usage: python3 hf_bench.py [--layers 1]
[--batch 2] [--seq 4096] [--prompt 16]
"""

import argparse
import json
import traceback

import torch
from torch_bench import extra_peak_bytes, timed  # (bench/, the script's folder)

import xent.torch as xt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--prompt", type=float, default=16)
    args = parser.parse_args()

    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(8192, args.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).train()
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).cuda()
    labels = input_ids.clone()
    labels[:, :int(args.prompt if args.prompt >= 1 else args.prompt * args.seq)] = -100
    base = dict(n=args.batch * args.seq, d=config.hidden_size, v=config.vocab_size, layers=args.layers,
                dtype="bf16", transformers=transformers.__version__, gpu=torch.cuda.get_device_name(),
                scored=int(labels[:, 1:].ne(-100).sum()))

    def step():
        model.zero_grad(set_to_none=False)  # the gradients' buffers stay: they are not the loss's
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        return loss

    def measure(method):
        loss = step()  # the gradients' buffers exist from here on
        extra = extra_peak_bytes(step)
        ms, ms_min = timed(step)
        row = dict(method=method, **base, ms_median=round(ms, 3), ms_min=round(ms_min, 3),
                   extra_peak_MiB=round(extra / 2**20), loss=round(float(loss.detach()), 6))
        print(json.dumps(row), flush=True)

    measure("transformers")
    model.loss_function = xt.ForCausalLMLoss
    measure("xent_loss_function")
    del model._loss_function
    handle = xt.fuse_linear_cross_entropy(model)
    measure("xent_fused")
    handle.remove()
    handle = xt.fuse_linear_cross_entropy(model, skip_ignored=False)
    measure("xent_fused[all rows]")
    handle.remove()
    # At about Liger's memory: chunks of 64 MiB of logits (Liger's are 256 rows, 63 MiB here).
    handle = xt.fuse_linear_cross_entropy(model, chunk_bytes=64 << 20)
    measure("xent_fused[64MiB]")
    handle.remove()
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=False, swiglu=False)
        measure("liger_flce")
    except Exception as error:  # noqa: BLE001 (a peer that does not fit this Transformers)
        print(json.dumps(dict(method="liger_flce", **base, error=f"{type(error).__name__}: {error}")))
        traceback.print_exc()


if __name__ == "__main__":
    main()
