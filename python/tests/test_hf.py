"""``xt.ForCausalLMLoss`` against Transformers' ``ForCausalLMLoss``: its semantics written out
below in PyTorch (every device; Transformers need not be installed), and, where Transformers is
installed, a small ``LlamaForCausalLM`` trained one step with either as its ``loss_function``."""

from __future__ import annotations

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
