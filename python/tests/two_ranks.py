"""Two ranks on the CPU (gloo) training a tiny Llama with ``xt.fuse_linear_cross_entropy`` under
DistributedDataParallel and FSDP2 in the layouts trainers use (``test_hf.py`` runs this file as
two processes and compares with one process). Run as ``python two_ranks.py RANK WORLD PORT OUT``:
each layout's loss and gradients (gathered whole) of each of two steps, or the layout's error, go
to ``OUT.RANK``."""

from __future__ import annotations

import datetime
import sys
import traceback

import torch

# name: (tied embeddings, patched after wrapping, the layout). FSDP2 units: each decoder layer,
# then the layout's own, then the root. "tail" is Accelerate's (1.16) `[final norm, lm_head]` unit,
# which keeps its weights after forward; the others reshard after forward (FSDP2's default), so
# the head's weight is a sharded DTensor again when the loss runs.
LAYOUTS = {
    "ddp": (False, False, "ddp"),
    "fsdp_root": (False, False, ()),
    "fsdp_root_patched_after": (False, True, ()),
    "fsdp_head": (False, False, (("lm_head",), True)),
    "fsdp_head_patched_after": (False, True, (("lm_head",), True)),
    "fsdp_tail": (False, False, (("model.norm", "lm_head"), False)),
    "fsdp_tail_resharded": (False, False, (("model.norm", "lm_head"), True)),
    "fsdp_tied_tail": (True, False, (("model.norm", "model.embed_tokens", "lm_head"), False)),
    "fsdp_tied_tail_resharded": (True, False, (("model.norm", "model.embed_tokens", "lm_head"), True)),
    # The head split over the vocabulary by tensor parallelism (ColwiseParallel: its weight a
    # DTensor sharded on its rows): both ranks take the same batch, as tensor parallelism does.
    "tp_head": (False, False, "tp_head"),
}
# Under FSDP2's mixed precision (bf16 compute, f32 gradient reduction): the fused step against the
# model's own loss in the same layout (name + "_own"), not against one float32 process.
MIXED = {"fsdp_head_bf16": (("lm_head",), True), "fsdp_tail_bf16": (("model.norm", "lm_head"), False)}
STEPS = 2


def tiny_llama(tied: bool):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=251, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 251, (2, 23), generator=torch.Generator().manual_seed(100 + 10 * rank + step))


def step_of(model, wrapped, ids):
    """One training step: the loss and every parameter's gradient (whole, where sharded). Each
    sequence's first 8 labels are ignored (a prompt), so the fused loss takes the scored rows
    alone (``skip_ignored``)."""
    model.zero_grad(set_to_none=True)
    labels = ids.clone()
    labels[:, :8] = -100
    out = wrapped(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is not None and hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        grads[name] = None if grad is None else grad.detach().clone()
    return out.logits is None, float(out.loss.detach()), grads


def reference(tied: bool, world: int):
    """Per step: each rank's loss, and the gradients averaged over the ranks (as DDP and FSDP
    reduce them), from one process with the model's own loss."""
    model = tiny_llama(tied)
    steps = []
    for step in range(STEPS):
        losses, mean = [], {}
        for rank in range(world):
            _, loss, grads = step_of(model, model, batch(rank, step))
            losses.append(loss)
            for name, grad in grads.items():
                mean[name] = mean.get(name, 0) + grad / world
        steps.append((losses, mean))
    return steps


def _wrap(model, layout, mesh, **fsdp):
    from torch.distributed.fsdp import fully_shard

    if layout == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if layout == "tp_head":
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        parallelize_module(model.lm_head, mesh, ColwiseParallel())
        return model
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **fsdp)
    if layout:
        names, reshard = layout
        modules = [model.get_submodule(name) for name in names]
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, reshard_after_forward=reshard, **fsdp)
    return fully_shard(model, mesh=mesh, **fsdp)


def main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import xent.torch as xt
    import xent.torch.linear

    # The tiny model is far below the size under which skip_ignored takes every row: its masked
    # rows are skipped as a large model's are (the tests' conftest does the same in-process).
    xent.torch.linear._SKIP_MIN_PRODUCTS = 0
    # A layout that fails on one rank times its peer's collectives out instead of hanging.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, (tied, patched_after, layout) in LAYOUTS.items():
        try:
            model = tiny_llama(tied)
            if not patched_after:
                xt.fuse_linear_cross_entropy(model)
            wrapped = _wrap(model, layout, mesh)
            if patched_after:
                xt.fuse_linear_cross_entropy(model)
            data_rank = 0 if layout == "tp_head" else rank
            results[name] = [step_of(model, wrapped, batch(data_rank, step)) for step in range(STEPS)]
        except Exception:
            results[name] = traceback.format_exc()
        dist.barrier()
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for name, layout in MIXED.items():
        for fused, key in ((True, name), (False, name + "_own")):
            try:
                model = tiny_llama(False)
                if fused:
                    xt.fuse_linear_cross_entropy(model)
                wrapped = _wrap(model, layout, mesh, mp_policy=policy)
                results[key] = [step_of(model, wrapped, batch(rank, step)) for step in range(STEPS)]
            except Exception:
                results[key] = traceback.format_exc()
            dist.barrier()
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
