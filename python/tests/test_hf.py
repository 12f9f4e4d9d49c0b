"""``xt.ForCausalLMLoss`` against Transformers' ``ForCausalLMLoss``: its semantics written out
below in PyTorch (every device; Transformers need not be installed), and, where Transformers is
installed, a small ``LlamaForCausalLM`` trained one step with either as its ``loss_function``."""

from __future__ import annotations

import copy
import inspect
import os

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import xent.torch as xt  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def transformers_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None):
    """Transformers' ``ForCausalLMLoss`` and ``fixed_cross_entropy`` (transformers 5.25), in
    float64 here: the labels padded by one ``ignore_index`` and shifted left, the logits
    flattened, the mean, or the sum divided by ``num_items_in_batch``."""
    logits = logits.double()
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.view(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


CASES = {
    "mean": dict(),
    "copy": dict(inplace_backward=False),
    "num_items_tensor": dict(num_items_in_batch="tensor"),
    "num_items_int": dict(num_items_in_batch=41),
    "shift_labels": dict(shift_labels=True),
    "ignore_index": dict(ignore_index=7),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_for_causal_lm_loss(device, dtype, case):
    """The loss and the logits' gradient of Transformers' loss (in float64), for ``[B, T, V]``
    logits with ignored labels; the logits are left as they were until backward."""
    kw = dict(CASES[case])
    gen = torch.Generator().manual_seed(4)
    batch, seq, vocab = 3, 17, 211
    ignore = kw.get("ignore_index", -100)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * 2).to(dtype).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, :4] = ignore  # a prompt, not scored
    inplace = kw.pop("inplace_backward", True)
    if kw.get("num_items_in_batch") == "tensor":
        kw["num_items_in_batch"] = torch.tensor(37)
    if kw.get("shift_labels"):
        kw["shift_labels"] = F.pad(labels, (0, 1), value=ignore)[..., 1:].contiguous()
    leaf = logits.clone().requires_grad_()
    before = leaf.detach().clone()
    loss = xt.ForCausalLMLoss(leaf, labels, vocab, **kw, inplace_backward=inplace, output_attentions=False)
    assert torch.equal(leaf.detach(), before), "the forward changed the logits"
    (loss * 0.5).backward()
    if not inplace:
        assert torch.equal(leaf.detach(), before), "inplace_backward=False changed the logits"

    ref_leaf = logits.detach().double().requires_grad_()
    want = transformers_loss(ref_leaf, labels, vocab, **kw)
    (want * 0.5).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    # The gradient, in the logits' dtype: one rounding of it (bf16: 2^-8 relative).
    grad, ref = leaf.grad.double(), ref_leaf.grad
    unit = 2.0**-8 if dtype == torch.bfloat16 else 1e-5
    assert float(ref.abs().max()) > 0
    assert bool(((grad - ref).abs() <= unit * ref.abs() + 1e-6 * float(ref.abs().max())).all())


def test_rejects_logits_of_another_vocabulary_size():
    logits = torch.randn(2, 5, 11)
    with pytest.raises(ValueError, match="vocab_size"):
        xt.ForCausalLMLoss(logits, torch.zeros(2, 5, dtype=torch.long), vocab_size=12)


def tiny_llama(device, seed):
    """A one-layer ``LlamaForCausalLM`` of 251 classes (Transformers installed, else the test
    skips), and a batch of 2 x 23 tokens whose first 5 labels are ignored (a prompt)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=251, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 251, (2, 23), generator=gen).to(device)
    labels = input_ids.clone()
    labels[:, :5] = -100
    return model, input_ids, labels


@pytest.mark.parametrize("device", DEVICES)
def test_a_transformers_model_trains_with_it_as_its_loss_function(device):
    """A small ``LlamaForCausalLM`` (Transformers installed): ``model(input_ids, labels=...)``'s
    loss and every parameter's gradient with ``model.loss_function = xt.ForCausalLMLoss`` equal
    those with Transformers' own, with and without ``num_items_in_batch``."""
    model, input_ids, labels = tiny_llama(device, seed=1)

    def step(extra):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, labels=labels, **extra)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []

    def xent_loss(*args, **kwargs):
        calls.append(kwargs.get("num_items_in_batch"))
        return xt.ForCausalLMLoss(*args, **kwargs)

    for extra in ({}, {"num_items_in_batch": torch.tensor(30, device=device)}):
        default = model.loss_function
        want_loss, want_grads = step(extra)
        model.loss_function = xent_loss
        try:
            got_loss, got_grads = step(extra)
        finally:
            model.loss_function = default
        assert len(calls) == 1 and (calls.pop() is None) == (not extra), "the model did not call it"
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, want in want_grads.items():
            torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()),
                                       msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_transformers_model_does_not_break_its_graph_at_the_loss(device):
    """``torch.compile`` of a small ``LlamaForCausalLM`` whose ``loss_function`` is xent's:
    Dynamo finds no graph break in the whole forward, loss included, and the compiled model's
    loss and head gradient equal Transformers' own loss in eager."""
    import torch._dynamo

    model, input_ids, labels = tiny_llama(device, seed=2)
    items = torch.tensor(30, device=device)

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(input_ids=input_ids, labels=labels, num_items_in_batch=items).loss
        loss.backward()
        return loss.detach(), model.lm_head.weight.grad.clone()

    want_loss, want_grad = run(model)
    model.loss_function = xt.ForCausalLMLoss
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=input_ids, labels=labels, num_items_in_batch=items)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    backend = "inductor" if device == "cuda" else "aot_eager"
    got_loss, got_grad = run(torch.compile(model, backend=backend))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5 * float(want_grad.abs().max()))


# Tiny configs of causal LMs `fuse_linear_cross_entropy` is checked on: the plain decoder
# (Llama), others of the same form (Qwen 2 and 3, Mistral, Phi-3), Phi-2's form (a bias in its
# head, which the fused loss takes as linear_cross_entropy's `bias`), Cohere and Granite (a
# logit scale after the head, taken as a factor of the hidden states), Gemma 2 (its
# `final_logit_softcapping` taken as xent's `softcap`) and Mixtral (a mixture of experts whose
# router loss the model adds to the loss).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(pad_token_id=0)),
    "phi_head_bias": ("PhiForCausalLM", "PhiConfig", {}),
    "cohere_logit_scale": ("CohereForCausalLM", "CohereConfig", dict(logit_scale=0.5)),
    "granite_logits_scaling": ("GraniteForCausalLM", "GraniteConfig", dict(logits_scaling=4.0)),
    "gemma2_softcap": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=16, final_logit_softcapping=3.0)),
    "mixtral_router_loss": ("MixtralForCausalLM", "MixtralConfig",
                            dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)),
}


def tiny_model(architecture, device, vocab=251, hidden=32, **extra):
    """A one-layer causal LM of ``ARCHITECTURES`` in float32, training, its seed fixed."""
    transformers = pytest.importorskip("transformers")
    model_name, config_name, config_extra = ARCHITECTURES[architecture]
    config = getattr(transformers, config_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, **config_extra, **extra,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).to(device).train()


def model_step(model, **inputs):
    """One forward and backward: the output, the loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(got, want):
    (_, got_loss, got_grads), (_, want_loss, want_grads) = got, want
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, ref in want_grads.items():
        torch.testing.assert_close(got_grads[name], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=name)


def check_fused_step(model, **inputs):
    """A training step of ``model`` with its own loss, then fused: no logits, the same loss and
    gradients. Returns the fused step and the handle."""
    want = model_step(model, **inputs)
    handle = xt.fuse_linear_cross_entropy(model)
    got = model_step(model, **inputs)
    assert got[0].logits is None, "the fused step returned logits"
    assert_same_step(got, want)
    return want, got, handle


FUSE_CASES = {
    "labels": lambda labels, device: dict(labels=labels),
    "num_items_in_batch": lambda labels, device: dict(labels=labels, num_items_in_batch=torch.tensor(30, device=device)),
    "shift_labels": lambda labels, device: dict(
        labels=labels, shift_labels=F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("case", list(FUSE_CASES))
def test_fused_model_trains_as_its_own_loss_does(device, architecture, case):
    """``fuse_linear_cross_entropy(model)``: a training step's loss and every parameter's
    gradient equal those of the model's own forward and loss; its output holds no logits; and
    ``remove()`` gives back the model's own forward (its logits again)."""
    model = tiny_model(architecture, device)
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 251, (2, 23), generator=gen).to(device)
    labels = input_ids.clone()
    labels[:, :5] = -100
    inputs = dict(input_ids=input_ids, **FUSE_CASES[case](labels, device))
    config, scale = model.config.to_dict(), getattr(model, "logit_scale", None)
    want, got, handle = check_fused_step(model, **inputs)
    assert want[0].logits.shape == (2, 23, 251)
    # What the call swapped (a soft cap, a logit scale) is back.
    assert model.config.to_dict() == config and getattr(model, "logit_scale", None) == scale
    if architecture == "mixtral_router_loss":
        assert got[0].aux_loss is not None
        torch.testing.assert_close(got[0].aux_loss, want[0].aux_loss)
    handle.remove()
    assert model_step(model, **inputs)[0].logits.shape == (2, 23, 251)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_keeps_its_logits_where_it_does_not_train(device):
    """In eval mode, or without labels, the fused model runs as it was (logits, its own loss);
    ``in_eval=True`` fuses in eval mode too; positional labels count as labels; with
    ``return_dict=False`` the tuple holds None where the logits were."""
    model = tiny_model("llama", device)
    input_ids = torch.randint(0, 251, (2, 9), generator=torch.Generator().manual_seed(6)).to(device)
    xt.fuse_linear_cross_entropy(model)
    assert model(input_ids=input_ids).logits.shape == (2, 9, 251)
    model.eval()
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (2, 9, 251) and out.loss is not None
    model.train()
    fused = model(input_ids, None, None, None, None, input_ids)  # labels sixth, as in the signature
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, out.loss, rtol=1e-5, atol=1e-6)
    as_tuple = model(input_ids=input_ids, labels=input_ids, return_dict=False)  # logits' place: None
    assert isinstance(as_tuple, tuple) and as_tuple[1] is None
    torch.testing.assert_close(as_tuple[0], out.loss, rtol=1e-5, atol=1e-6)
    # Trainer passes num_items_in_batch when the forward's signature has **kwargs: it still has.
    assert "kwargs" in inspect.signature(model.forward).parameters

    other = tiny_model("llama", device)
    xt.fuse_linear_cross_entropy(other, in_eval=True)
    other.eval()
    evaluated = other(input_ids=input_ids, labels=input_ids)
    assert evaluated.logits is None
    torch.testing.assert_close(evaluated.loss, out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_passes_options_to_linear_cross_entropy(device):
    """``options`` reach ``linear_cross_entropy``: label smoothing and the z-loss give the loss of
    ``xt.ForCausalLMLoss``'s formula with the same options on the model's own logits."""
    model = tiny_model("llama", device)
    input_ids = torch.randint(0, 251, (2, 11), generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    want = xt.cross_entropy(logits, input_ids, label_smoothing=0.1, lse_square_scale=1e-3, causal_shift=True)
    xt.fuse_linear_cross_entropy(model, label_smoothing=0.1, lse_square_scale=1e-3, chunk_bytes=4096)
    got = model(input_ids=input_ids, labels=input_ids).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(FUSE_CASES))
def test_fused_step_computes_only_the_scored_rows(device, case, monkeypatch):
    """A fine-tuning batch (prompts and padding labelled -100): the fused step sends only the
    scored rows through the head (``skip_ignored``, the default) and, with ``skip_ignored=False``,
    every row; both give the model's own loss and gradients. A batch that would drop under 1/16 of
    its rows keeps them all. With every label ignored the loss is the model's own too (NaN for the
    mean, 0 for a sum) and the step still reaches every gradient."""
    import xent.torch.hf as hf

    model = tiny_model("llama", device)
    input_ids = torch.randint(0, 251, (2, 23), generator=torch.Generator().manual_seed(21)).to(device)
    labels = input_ids.clone()
    labels[0, :9] = -100  # a prompt
    labels[1, :15] = -100
    labels[1, 20:] = -100  # padding
    inputs = dict(input_ids=input_ids, **FUSE_CASES[case](labels, device))
    scored = int((inputs["shift_labels"] if case == "shift_labels" else labels[:, 1:]).ne(-100).sum())
    want = model_step(model, **inputs)
    rows = []
    real = hf.linear_cross_entropy
    monkeypatch.setattr(hf, "linear_cross_entropy", lambda h, *a, **k: rows.append(tuple(h.shape)) or real(h, *a, **k))
    for skip, shape in ((True, (scored, 32)), (False, (2, 23, 32))):
        rows.clear()
        handle = xt.fuse_linear_cross_entropy(model, skip_ignored=skip)
        assert_same_step(model_step(model, **inputs), want)
        assert rows == [shape], f"skip_ignored={skip}"
        handle.remove()
    if case != "shift_labels":
        # A batch that would drop under 1/16 of its rows (2 of 46: each sequence's last) keeps them all.
        rows.clear()
        handle = xt.fuse_linear_cross_entropy(model)
        model_step(model, **dict(inputs, labels=input_ids))
        assert rows == [(2, 23, 32)]
        handle.remove()

    none = {k: (torch.full_like(v, -100) if k in ("labels", "shift_labels") else v) for k, v in inputs.items()}
    _, want_loss, want_grads = model_step(model, **none)
    handle = xt.fuse_linear_cross_entropy(model)
    _, got_loss, got_grads = model_step(model, **none)
    handle.remove()
    torch.testing.assert_close(got_loss, want_loss, equal_nan=True)
    assert got_grads.keys() == want_grads.keys()


def test_fuse_refuses_what_it_cannot_compute():
    """Errors, never a wrong loss: options the model's call decides or that change the loss's
    type, unknown options, a module that is not a Transformers model, a second patch, a model
    whose head's output is changed before its loss in a way xent does not know (a hook here), a
    ``vocab_size`` that is not the head's, a head whose weight is gathered for its forward only
    (DeepSpeed ZeRO-3's, outside that forward), and one whose forward computes its loss without
    its ``loss_function``."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model("llama", "cpu")
    input_ids = torch.randint(0, 251, (2, 9), generator=torch.Generator().manual_seed(8))
    for bad in (dict(reduction="sum"), dict(softcap=3.0), dict(return_z_loss=True), dict(return_entropy=True)):
        with pytest.raises(TypeError, match="sets or refuses"):
            xt.fuse_linear_cross_entropy(model, **bad)
    with pytest.raises(TypeError):
        xt.fuse_linear_cross_entropy(model, chunk_rows=4)
    with pytest.raises(TypeError, match="not a Transformers model"):
        xt.fuse_linear_cross_entropy(torch.nn.Linear(2, 3))
    handle = xt.fuse_linear_cross_entropy(model)
    with pytest.raises(RuntimeError, match="patched already"):
        xt.fuse_linear_cross_entropy(model)

    hook = model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(RuntimeError, match="changed its logits"):
        model(input_ids=input_ids, labels=input_ids)
    hook.remove()
    assert "forward" not in model.lm_head.__dict__ and "_loss_function" not in model.__dict__
    assert model(input_ids=input_ids, labels=input_ids).logits is None  # works again
    model.config.vocab_size = 250  # the head has 251 classes
    with pytest.raises(ValueError, match="vocab_size 250"):
        model(input_ids=input_ids, labels=input_ids)
    model.config.vocab_size = 251
    weight = model.lm_head.weight.data
    model.lm_head.weight.data = torch.empty(0)  # DeepSpeed ZeRO-3's head outside its forward
    with pytest.raises(RuntimeError, match=r"weight has shape \(0,\) outside its forward"):
        model(input_ids=input_ids, labels=input_ids)
    model.lm_head.weight.data = weight
    handle.remove()


    class InlineLoss(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            return out

    inline = InlineLoss(model.config).train()
    xt.fuse_linear_cross_entropy(inline)
    with pytest.raises(RuntimeError, match="did not call its loss_function"):
        inline(input_ids=input_ids, labels=input_ids)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_fused_model_step_holds_no_logits():
    """On the GPU, a fused training step's peak memory stays far under the logits it avoids: a
    model of 32000 classes over 2 x 1024 tokens, whose own step holds float32 logits (262 MB)
    and their gradient; the fused step with 16 MiB chunks must add under a quarter of that."""
    model = tiny_model("llama", "cuda", vocab=32000, hidden=64)
    input_ids = torch.randint(0, 32000, (2, 1024), generator=torch.Generator().manual_seed(9)).cuda()

    def peak(step):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, loss.detach()

    own, own_loss = peak(lambda: model(input_ids=input_ids, labels=input_ids).loss)
    xt.fuse_linear_cross_entropy(model, chunk_bytes=16 << 20)
    fused, fused_loss = peak(lambda: model(input_ids=input_ids, labels=input_ids).loss)
    logits_bytes = 2 * 1024 * 32000 * 4
    assert own >= logits_bytes, (own, logits_bytes)
    assert fused < logits_bytes / 4, (fused, own)
    torch.testing.assert_close(fused_loss, own_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
# Graph breaks allowed: none for the plain form and the soft cap; Cohere's and Granite's scale
# stand-in breaks once (Dynamo does not trace its swap; torch 2.11).
@pytest.mark.parametrize("architecture,breaks", [("llama", 0), ("gemma2_softcap", 0), ("cohere_logit_scale", 1)])
def test_compiled_fused_model_does_not_break_its_graph(device, architecture, breaks):
    """``torch.compile`` of a fused model: no graph break in the forward (patching included; one
    where a logit scale is swapped), and the compiled step's loss and head gradient equal the
    model's own in eager."""
    import torch._dynamo

    model = tiny_model(architecture, device)
    input_ids = torch.randint(0, 251, (2, 23), generator=torch.Generator().manual_seed(10)).to(device)
    inputs = dict(input_ids=input_ids, labels=input_ids, num_items_in_batch=torch.tensor(30, device=device))
    _, want_loss, _ = model_step(model, **inputs)
    ref = model.lm_head.weight.grad.clone()  # (tied to the embeddings in Gemma 2 and Cohere)
    xt.fuse_linear_cross_entropy(model)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count <= breaks, explanation.break_reasons
    torch._dynamo.reset()
    backend = "inductor" if device == "cuda" else "aot_eager"
    out, got_loss, _ = model_step(torch.compile(model, backend=backend), **inputs)
    assert out.logits is None
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lm_head.weight.grad, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2", "fsdp2_head"])
def test_fused_model_under_ddp_and_fsdp(device, wrapper):
    """A fused model wrapped by ``DistributedDataParallel``, or sharded by FSDP2's ``fully_shard``
    (each decoder layer and the root; ``fsdp2_head``: the head too, in a unit of its own that
    frees its gathered weight after forward), in a one-rank group (gloo on the CPU, NCCL on CUDA):
    the loss and the head's gradient equal the model's own, unwrapped. ``test_fused_model_trains_on_two_ranks``
    has two ranks."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    model = tiny_model("llama", device)
    input_ids = torch.randint(0, 251, (2, 23), generator=torch.Generator().manual_seed(11)).to(device)
    _, want_loss, want_grads = model_step(model, input_ids=input_ids, labels=input_ids)
    model.zero_grad(set_to_none=True)
    port = 29531 + ["ddp", "fsdp2", "fsdp2_head"].index(wrapper) + 3 * (device == "cuda")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        xt.fuse_linear_cross_entropy(model)
        if wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # The mesh's device given: FSDP2's default mesh is CUDA's wherever CUDA exists.
            mesh = init_device_mesh(device, (1,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            if wrapper == "fsdp2_head":
                fully_shard(model.lm_head, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        out = wrapped(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        assert out.logits is None
        torch.testing.assert_close(out.loss.detach(), want_loss, rtol=1e-5, atol=1e-6)
        grad = model.lm_head.weight.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        ref = want_grads["lm_head.weight"]
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory):
    """``two_ranks.py`` run as two processes (gloo on the CPU): each rank's steps per layout."""
    import socket
    import subprocess
    import sys

    pytest.importorskip("transformers")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "two_ranks.py")
    out = str(tmp_path_factory.mktemp("two_ranks") / "steps")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The children import the xent this process imported (conftest.py may have moved it).
    import xent

    site = os.path.dirname(os.path.dirname(os.path.abspath(xent.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, script, str(rank), "2", str(port), out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("two_ranks.py did not finish in 600 s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{log[-3000:]}"
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("layout", [
    "ddp", "fsdp_root", "fsdp_root_patched_after", "fsdp_head", "fsdp_head_patched_after", "fsdp_tail",
    "fsdp_tail_resharded", "fsdp_tied_tail", "fsdp_tied_tail_resharded",
])
def test_fused_model_trains_on_two_ranks(two_rank_steps, layout):
    """A fused Llama trained on two ranks (two processes, gloo on the CPU) for two steps under
    DDP or FSDP2 in the layouts trainers use: the head in the root unit, a unit of its own that
    reshards after forward (its weight a sharded DTensor when the loss runs), Accelerate's
    ``[norm, lm_head]`` unit (with the embeddings where they are tied), patched before or after
    wrapping. Each rank's loss equals the model's own on its batch and every gradient the mean of
    the ranks' own, gathered whole."""
    import two_ranks

    tied = two_ranks.LAYOUTS[layout][0]
    want = two_ranks.reference(tied, 2)
    for rank, results in enumerate(two_rank_steps):
        got = results[layout]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        for step, ((no_logits, loss, grads), (want_losses, want_grads)) in enumerate(zip(got, want)):
            assert no_logits, f"rank {rank} step {step} returned logits"
            assert loss == pytest.approx(want_losses[rank], rel=1e-5), f"rank {rank} step {step}"
            assert grads.keys() == want_grads.keys()
            for name, ref in want_grads.items():
                assert grads[name] is not None, f"rank {rank} step {step}: no gradient for {name}"
                torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()),
                                           msg=f"rank {rank} step {step}: {name}")


@pytest.mark.parametrize("layout", ["fsdp_head_bf16", "fsdp_tail_bf16"])
def test_fused_model_trains_on_two_ranks_in_mixed_precision(two_rank_steps, layout):
    """As above under FSDP2's ``MixedPrecisionPolicy`` (bf16 parameters in forward and backward,
    gradients reduced in float32), the head in a unit of its own or Accelerate's tail: the loss
    and every gradient against the model's own loss in the same layout, to bf16's precision."""
    for rank, results in enumerate(two_rank_steps):
        got, want = results[layout], results[layout + "_own"]
        for steps in (got, want):
            assert not isinstance(steps, str), f"rank {rank} failed:\n{steps}"
        for step, ((no_logits, loss, grads), (_, want_loss, want_grads)) in enumerate(zip(got, want)):
            assert no_logits, f"rank {rank} step {step} returned logits"
            assert loss == pytest.approx(want_loss, rel=2e-3), f"rank {rank} step {step}"
            for name, ref in want_grads.items():
                torch.testing.assert_close(grads[name], ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()),
                                           msg=f"rank {rank} step {step}: {name}")


def test_fused_model_with_a_tensor_parallel_head(two_rank_steps):
    """A head split over the vocabulary by tensor parallelism (``ColwiseParallel`` over both
    ranks, its weight a DTensor sharded on its rows; both ranks take the same batch) computes its
    loss with ``vocab_parallel_linear_cross_entropy``: on each rank the loss and every gradient
    (the head's gathered whole) equal one process's with the model's own loss, and no logits."""
    import two_ranks

    want = two_ranks.reference(False, 1)
    for rank, results in enumerate(two_rank_steps):
        got = results["tp_head"]
        assert not isinstance(got, str), f"rank {rank}: {got}"
        for step, ((no_logits, loss, grads), (want_losses, want_grads)) in enumerate(zip(got, want)):
            assert no_logits, f"rank {rank} step {step} returned logits"
            assert loss == pytest.approx(want_losses[0], rel=2e-3), f"rank {rank} step {step}"
            for name, ref in want_grads.items():
                torch.testing.assert_close(grads[name], ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()),
                                           msg=f"rank {rank} step {step}: {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_with_gradient_checkpointing(device):
    """Transformers' gradient checkpointing (the decoder layers recomputed in backward) beside
    the fused loss: the loss and every gradient equal the checkpointed model's own."""
    model = tiny_model("llama", device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, 251, (2, 23), generator=torch.Generator().manual_seed(12)).to(device)
    check_fused_step(model, input_ids=input_ids, labels=input_ids)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_peft_model_trains_as_its_own_loss_does(device):
    """A PEFT model (LoRA on the attention's projections; ``peft`` installed, else the test
    skips): ``fuse_linear_cross_entropy`` patches its base model, and the loss and the adapters'
    gradients equal the PEFT model's own."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("llama", device), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ).train()
    torch.manual_seed(13)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at the start: the adapters' A would get no gradient
            torch.nn.init.normal_(param)
    input_ids = torch.randint(0, 251, (2, 23), generator=torch.Generator().manual_seed(13)).to(device)
    _, got, handle = check_fused_step(model, input_ids=input_ids, labels=input_ids)
    assert len(got[2]) == 4, sorted(got[2])  # the adapters' A and B only
    handle.remove()
    assert model_step(model, input_ids=input_ids, labels=input_ids)[0].logits is not None


@pytest.mark.parametrize("device", DEVICES)
def test_fused_vision_language_model_caps_its_logits_as_its_forward_does(device):
    """A vision-language model (a tiny ``Gemma3ForConditionalGeneration``, text tokens only) whose
    text config holds a ``final_logit_softcapping``: the fused loss and gradients equal the
    model's own, capped or not as its forward does it (transformers 5.25's forward leaves the
    logits uncapped; a soft cap taken from the config alone would change the loss)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma3Config(
        text_config=dict(vocab_size=262, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                         final_logit_softcapping=3.0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=261, boi_token_index=259, eoi_token_index=260,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).to(device).train()
    input_ids = torch.randint(0, 250, (2, 23), generator=torch.Generator().manual_seed(14)).to(device)
    check_fused_step(model, input_ids=input_ids, labels=input_ids)
    assert model.config.get_text_config().final_logit_softcapping == 3.0


def _precision_flags():
    """PyTorch's process-wide float32 matmul settings (TF32 or IEEE)."""
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


def _set_precision_flags(flags):
    matmul, cuda_tf32, cudnn_tf32 = flags
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_with_gradient_accumulation_trains_as_unfused(device, tmp_path):
    """Transformers' ``Trainer`` (``accelerate`` installed, else the test skips), two optimizer
    steps of two accumulated batches of two: with the fused model it still passes
    ``num_items_in_batch`` (the patched forward keeps the model's signature), logs the same
    losses and ends at the same weights as with the model's own loss."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    base = tiny_model("llama", "cpu")
    gen = torch.Generator().manual_seed(3)
    data = []
    for i in range(8):  # prompts of different lengths: the batches score different counts
        input_ids = torch.randint(0, 251, (19,), generator=gen)
        labels = input_ids.clone()
        labels[: 2 + i] = -100
        data.append({"input_ids": input_ids, "labels": labels})

    def train(fuse):
        model = copy.deepcopy(base)
        if fuse:
            xt.fuse_linear_cross_entropy(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"fused{fuse}"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=device == "cpu",
            save_strategy="no", seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    saved = _precision_flags()
    try:
        own, own_losses = train(False)
        fused, fused_losses = train(True)
    finally:  # Trainer may change them for the whole process: the tests after this one need them
        _set_precision_flags(saved)
    assert len(own_losses) == 2
    assert fused_losses == pytest.approx(own_losses, rel=1e-5)
    for (name, want), got in zip(own.named_parameters(), fused.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_under_autocast(device):
    """A float32 model trained under ``torch.autocast`` to bfloat16 (as ``Trainer(bf16=True)``
    runs one): the fused head casts the hidden states and the weight as ``F.linear`` would, and
    the loss and gradients (float32, the parameters' dtype) equal the model's own under autocast,
    to bf16's rounding (on CUDA also chunks of the logits against one GEMM)."""
    model = tiny_model("llama", device)
    input_ids = torch.randint(0, 251, (2, 23), generator=torch.Generator().manual_seed(15)).to(device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(input_ids=input_ids, labels=input_ids)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        return out, out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    _, want_loss, want_grads = step()
    xt.fuse_linear_cross_entropy(model)
    out, got_loss, got_grads = step()
    assert out.logits is None
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5 if device == "cpu" else 1e-4, atol=1e-6)
    # The logits' gradient is rounded to bf16 once either way, from other f32 (or f64) values:
    # an element may differ by one bf16 unit (2^-8 relative) before the bf16 GEMMs.
    for name, ref in want_grads.items():
        assert got_grads[name].dtype == torch.float32
        torch.testing.assert_close(got_grads[name], ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()), msg=name)
