"""Hugging Face Transformers: xent's loss as a model's ``loss_function``, or its training loss
from the last hidden states with no logits at all.

>>> model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)
>>> model.loss_function = xt.ForCausalLMLoss      # instead of Transformers' own
>>> handle = xt.fuse_linear_cross_entropy(model)   # or: no [N, V] logits while training

``ForCausalLMLoss`` takes the arguments of Transformers' ``ForCausalLMLoss`` (the default loss of
its ``...ForCausalLM`` models) and gives its loss: each position scored against the next label
(xent's ``causal_shift``, with no padded copy of the labels), ``ignore_index``, the mean over the
scored tokens, or their sum divided by ``num_items_in_batch`` (how Transformers' ``Trainer``
averages over gradient-accumulation steps); ``shift_labels`` when the caller shifted the labels
already.

What it saves: Transformers' loss upcasts the logits to float32 (a copy of twice their size)
and its backward makes float32 gradients of that copy and then the logits' own. xent reads the
model's 16-bit logits as they are and, in backward, writes their gradient over them in one pass
(two-phase): no ``[N, V]`` buffer at all. So read ``outputs.logits`` before ``loss.backward()``
if you need them; PyTorch raises its in-place error if autograd saved them for something else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch

from .functional import cross_entropy
from .linear import _may_wait, _scored_rows, linear_cross_entropy


def ForCausalLMLoss(  # noqa: N802  (Transformers' name)
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    *,
    inplace_backward: bool = True,
    **kwargs,
) -> torch.Tensor:
    """Transformers' ``ForCausalLMLoss`` on xent's kernels: ``logits`` ``[..., T, V]`` (any float
    dtype xent takes, rows may be strided), ``labels`` ``[..., T]`` (position ``t`` is scored
    against ``labels[..., t + 1]``, the last position against nothing), or ``shift_labels``
    ``[..., T]`` already shifted (scored as they are). ``vocab_size``, when given, must be the
    logits' last dimension (Transformers views them by it). ``inplace_backward=False`` (through
    ``functools.partial``) writes the gradient into a new tensor instead of over the logits. Other
    keyword arguments are ignored, as Transformers' own ignores those it does not use."""
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ValueError(f"logits {tuple(logits.shape)} do not end in vocab_size {vocab_size}")
    loss = cross_entropy(
        logits, _target(labels, shift_labels, logits.device), ignore_index=ignore_index,
        reduction=_reduction(num_items_in_batch), causal_shift=shift_labels is None, two_phase=True,
        inplace_backward=inplace_backward,
    )
    return _per_item(loss, num_items_in_batch)


def _target(labels, shift_labels, device):
    """The class indices a causal LM loss scores: ``labels`` (to be shifted) or ``shift_labels``."""
    return (labels if shift_labels is None else shift_labels).to(device)


def _reduction(num_items_in_batch):
    return "sum" if num_items_in_batch is not None else "mean"


def _per_item(loss, num_items_in_batch):
    """Transformers' average over gradient-accumulation steps: the sum over ``num_items_in_batch``."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# Keyword arguments of `linear_cross_entropy` that `fuse_linear_cross_entropy` sets itself or
# refuses: the model's call decides the first four, and the return_* ones would change what the
# model's loss is (a tuple instead of a scalar).
_FUSE_SETS = ("ignore_index", "reduction", "causal_shift", "softcap")
_FUSE_REFUSES = ("return_z_loss", "return_token_accuracy", "return_predicted_tokens", "return_entropy")
# Scales that models put on their logits between the head and the loss, as their forward's
# source writes them: (the expression, the object holding the value and its attribute, the factor
# the hidden states take instead). Cohere (1 and 2) multiply by `self.logit_scale`, Granite and
# its mixture-of-experts variants divide by `config.logits_scaling`.
_SCALES = (
    ("logits * self.logit_scale", lambda model: model, "logit_scale", lambda value: value),
    ("logits / self.config.logits_scaling", lambda model: model.config, "logits_scaling", lambda value: 1.0 / value),
)


class _Unscaled:
    """Stands in for a logit scale during a fused call: the model's ``logits * scale`` (or
    ``/ scale``) on the placeholder gives the placeholder back (PyTorch's operator returns
    NotImplemented for this type, so Python asks this object), and ``loss`` scales the hidden
    states instead."""

    def __init__(self, call):
        self.call = call

    def _same(self, other):
        if other is not self.call.placeholder:
            raise TypeError("a fused call's logit scale was applied to something other than its logits")
        return other

    __rmul__ = __rtruediv__ = _same


class FusedHandle:
    """What ``fuse_linear_cross_entropy`` returns: ``remove()`` puts the model's own forward back."""

    def __init__(self, model, forward):
        self._model, self._forward = model, forward

    def remove(self) -> None:
        if self._model is not None and self._model.__dict__.get("forward") is self._forward:
            del self._model.forward
        self._model = None


class _FusedCall:
    """One fused forward: while active, the head returns a placeholder of the logits' shape (a
    zero-stride view of one zero, no memory) and keeps its input; the model's ``loss_function``
    is ``loss`` below, which checks it got that placeholder back untouched and computes the loss
    with ``linear_cross_entropy`` from the kept hidden states and the head's weight and bias."""

    def __init__(self, model, head, softcap, scale, options, skip_ignored):
        self.model, self.head, self.softcap, self.options = model, head, softcap, options
        self.skip_ignored = skip_ignored
        self.scale = scale  # one of _SCALES (its owner, attribute, factor), or None
        self.factor = None
        self.hidden = self.placeholder = None
        self.loss_called = False

    def head_forward(self, hidden):
        self.hidden = hidden
        self.placeholder = hidden.new_zeros(()).expand(*hidden.shape[:-1], self.head.out_features)
        return self.placeholder

    def loss(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
             shift_labels=None, **kwargs):
        sharded = _sharded_by_fsdp(self.head)
        # Looked up here, inside the forward, not in `active`: a head inside the root's FSDP2 unit
        # holds a sharded DTensor weight before the forward and the whole one now.
        split = None if sharded else _split_head(self.head)
        if not sharded:
            for name, tensor in (("weight", self.head.weight), ("input", self.hidden)):
                if _is_dtensor(tensor) and (split is None or name == "input"):
                    raise TypeError(
                        f"the head's {name} is a DTensor of a layout fuse_linear_cross_entropy does not "
                        "take (it takes FSDP2's fully_shard, and a head split over the vocabulary by "
                        "tensor parallelism, ColwiseParallel on a 1-D mesh, fed plain hidden states)"
                    )
        if logits is not self.placeholder:
            raise RuntimeError(
                f"{type(self.model).__name__} changed its logits between lm_head and its loss "
                "(a scale, a cap or another operation xent cannot see), so "
                "fuse_linear_cross_entropy cannot compute its loss; remove() it and use "
                "xt.ForCausalLMLoss as its loss_function instead"
            )
        if vocab_size is not None and vocab_size != self.head.out_features:
            raise ValueError(
                f"vocab_size {vocab_size} is not the head's {self.head.out_features} classes "
                "(Transformers' own loss would fail to view the logits by it)"
            )
        self.loss_called = True
        head = self.head
        if sharded:
            # Gathered again until its post-backward hook (on the unit's inputs, which the hidden
            # states come through) reduce-scatters the gradient and reshards: one all-gather in
            # place of the one before backward that the logits' hook would have made.
            head.unshard()
        if tuple(head.weight.shape) != (head.out_features, head.in_features):
            raise RuntimeError(
                f"the head's weight has shape {tuple(head.weight.shape)} outside its forward, not "
                f"{(head.out_features, head.in_features)}: something gathers it for the head's forward "
                "only (DeepSpeed ZeRO-3 does), which fuse_linear_cross_entropy does not support; "
                "use xt.ForCausalLMLoss as the model's loss_function instead"
            )
        hidden, bias = self.hidden, head.bias
        target, causal = _target(labels, shift_labels, hidden.device), shift_labels is None
        scored, options = None, dict(self.options)
        if self.skip_ignored and _may_wait(hidden):
            # A split head's ranks decide alike: its chunks counted as the widest shard's.
            world = 1 if split is None else torch.distributed.get_world_size(split[0])
            scored = _scored_rows(hidden, target, ignore_index, causal, self.head.out_features,
                                  chunk_bytes=options.get("chunk_bytes"),
                                  needs_grad=torch.is_grad_enabled() and hidden.requires_grad, world=world)
        if scored is not None:  # selected here, so a logit scale multiplies the scored rows only
            hidden, target, _, options["chunk_bytes"], _ = scored
            causal = False
        if split is not None:
            group, start, weight, bias = split
        if self.factor is not None:  # (h·Wᵀ + b)·s = (s·h)·Wᵀ + s·b
            hidden = hidden * self.factor
            bias = None if bias is None else bias * self.factor
        if split is not None:
            from .linear_parallel import vocab_parallel_linear_cross_entropy

            loss = vocab_parallel_linear_cross_entropy(
                hidden, weight, target, bias, group=group, vocab_start=start, vocab_size=head.out_features,
                ignore_index=ignore_index, reduction=_reduction(num_items_in_batch), causal_shift=causal,
                softcap=self.softcap, skip_ignored=False, **options,
            )
            return _per_item(loss, num_items_in_batch)
        loss = linear_cross_entropy(
            hidden, head.weight, target, bias, ignore_index=ignore_index,
            reduction=_reduction(num_items_in_batch), causal_shift=causal, softcap=self.softcap,
            skip_ignored=False, **options,
        )
        return _per_item(loss, num_items_in_batch)

    @contextlib.contextmanager
    def active(self):
        """The head's forward, the model's ``loss_function``, Gemma's logit cap (taken by
        ``loss`` as xent's ``softcap`` instead) and a logit scale (taken by ``loss`` as a factor
        of the hidden states) swapped for the call, and put back after it."""
        model = self.model
        missing = object()
        saved_loss = model.__dict__.get("_loss_function", missing)
        capped = [] if self.softcap is None else [
            c for c in _configs(model.config) if getattr(c, "final_logit_softcapping", None) is not None
        ]
        saved_caps = [c.final_logit_softcapping for c in capped]
        saved_head = self.head.__dict__.get("forward", missing)
        # A head parallelized by `parallelize_module` has hooks that turn its input into a DTensor
        # and redistribute its output: off for the call, so the head keeps the hidden states as
        # they come and returns the placeholder as it is.
        saved_hooks = None
        if _split_head(self.head) is not None:
            saved_hooks = (self.head._forward_pre_hooks, self.head._forward_hooks)
            self.head._forward_pre_hooks, self.head._forward_hooks = type(saved_hooks[0])(), type(saved_hooks[1])()
        if self.scale is not None:
            _, owner_of, name, factor_of = self.scale
            owner = owner_of(model)
            saved_scale = getattr(owner, name)
            self.factor = factor_of(saved_scale)
            # Past the owner's own __setattr__: Transformers' configs validate their fields' types.
            object.__setattr__(owner, name, _Unscaled(self))
        self.head.forward = self.head_forward
        model.loss_function = self.loss
        for config in capped:
            config.final_logit_softcapping = None
        try:
            yield
        finally:
            if self.scale is not None:
                object.__setattr__(owner, name, saved_scale)
            if saved_head is missing:
                del self.head.forward
            else:
                self.head.forward = saved_head
            if saved_hooks is not None:
                self.head._forward_pre_hooks, self.head._forward_hooks = saved_hooks
            if saved_loss is missing:
                del model._loss_function
            else:
                model._loss_function = saved_loss
            for config, cap in zip(capped, saved_caps):
                config.final_logit_softcapping = cap


def _is_dtensor(tensor) -> bool:
    return torch.distributed.is_available() and isinstance(tensor, torch.distributed.tensor.DTensor)


def _split_head(head):
    """``(group, vocab_start, weight, bias)`` (this rank's rows, as local tensors) of a head split
    over the vocabulary by tensor parallelism (``ColwiseParallel``: a DTensor weight sharded on
    its rows over a 1-D mesh, outside FSDP), else None."""
    weight = head.weight
    if not _is_dtensor(weight) or _sharded_by_fsdp(head):
        return None
    from torch.distributed.tensor import Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        return None
    bias = head.bias
    if bias is not None:
        if not _is_dtensor(bias) or tuple(bias.placements) != (Shard(0),):
            return None
        bias = bias.to_local()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    return mesh.get_group(), int(offset[0]), weight.to_local(), bias


def _sharded_by_fsdp(head) -> bool:
    """Whether the head is an FSDP2 unit of its own whose weight is sharded now: it resharded after
    its forward (its default; the root's units and a group that does not reshard, such as
    Accelerate's ``[norm, lm_head]``, keep the weight whole until the model's forward ends)."""
    if not _is_dtensor(head.weight):
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(head, FSDPModule)


def _configs(config):
    """A model's config, and its text model's where it is a composite (a vision-language model's
    ``text_config``, which holds Gemma 3's ``final_logit_softcapping``)."""
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
    return [config] if text is None or text is config else [config, text]


def _softcap(config):
    caps = {getattr(c, "final_logit_softcapping", None) for c in _configs(config)} - {None}
    if len(caps) > 1:
        raise ValueError(f"the model's configs give two final_logit_softcapping values: {sorted(caps)}")
    return caps.pop() if caps else None


def _forward_source(model):
    """The source of the model's class's forward, or None where it cannot be read."""
    try:
        return inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None


def _caps_its_logits(model, source) -> bool:
    """Whether the model's forward applies its config's ``final_logit_softcapping``: a config may
    hold one that the forward does not read (transformers 5.25's ``Gemma3ForConditionalGeneration``
    leaves its logits uncapped), so the forward's source decides."""
    if _softcap(model.config) is None:
        return False
    if source is None:
        raise ValueError(
            f"{type(model).__name__}'s config has a final_logit_softcapping, and its forward's source "
            "cannot be read to tell whether it applies it"
        )
    return "final_logit_softcapping" in source


def _scale_of(source):
    """The entry of ``_SCALES`` the model's forward applies to its logits, or None (a forward that
    scales them some other way fails the call's placeholder check instead)."""
    found = [scale for scale in _SCALES if source is not None and scale[0] in source]
    if len(found) > 1:
        raise ValueError(f"the model's forward scales its logits twice: {[scale[0] for scale in found]}")
    return found[0] if found else None


def _without_logits(out, placeholder):
    """The model's output with its placeholder logits taken out (``None``, as Liger's does)."""
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, logits=None)
    if isinstance(out, tuple):
        return tuple(None if item is placeholder else item for item in out)
    return out


def fuse_linear_cross_entropy(model, *, in_eval: bool = False, skip_ignored: bool = True, **options) -> FusedHandle:
    """Make a Transformers causal LM compute its loss with ``linear_cross_entropy`` from its last
    hidden states and its head's weight, so a training step never holds its ``[B, T, V]``
    logits (Liger's ``apply_liger_kernel_to_*`` with ``fused_linear_cross_entropy``, for any
    model that ends in ``logits = lm_head(hidden)`` and ``loss_function(logits, labels, ...)``).

    It patches this model object (its ``forward``; the class and other instances are untouched;
    for a PEFT model, its base model) and returns a handle whose ``remove()`` undoes it. A call
    fuses when it passes ``labels`` and the model is training (or ``in_eval=True``); it then
    returns ``loss`` as Transformers' own loss would (``labels`` shifted or ``shift_labels``, ``ignore_index``, the mean, or the
    sum over ``num_items_in_batch``) and ``logits=None``. Other calls (generation, evaluation)
    run the model as it was. Gemma's ``final_logit_softcapping`` (of the config or its text
    config) becomes xent's ``softcap`` where the model's forward applies it, and Cohere's and
    Granite's logit scales a factor of the hidden states.
    ``skip_ignored`` (the default): only the rows scored (labels not ``ignore_index``, a prompt's
    or padding's) go through the head's GEMMs, so a fine-tuning batch whose prompts are masked
    costs that much less. Counting them waits for the GPU once a step (``nonzero``); the scored
    rows are copied (so a batch that would drop less than 1/16 of its rows keeps them all);
    under ``torch.compile`` or CUDA graph capture, and in a batch of fewer than 2^35 products
    ``rows·D·V``, every row is computed without counting (the same loss).
    ``options`` go to ``linear_cross_entropy`` (``chunk_bytes``, ``accum_dtype``,
    ``label_smoothing``, ``lse_square_scale``, ``ce_weight``, ``use_token_scaling``, ...).

    Wrapped by DDP or FSDP2's ``fully_shard`` before or after the patch: where the head is a
    unit of its own that resharded after its forward, the loss gathers its weight again
    (``unshard()``) and the unit's post-backward hook reduce-scatters the gradient as usual.

    A head split over the vocabulary by tensor parallelism (``parallelize_module(model.lm_head,
    mesh, ColwiseParallel())`` on a 1-D mesh: its weight a DTensor sharded on its rows) takes
    ``vocab_parallel_linear_cross_entropy`` with the mesh's group: each rank's rows, no rank
    holding more than a chunk of its logits, the hidden states' gradient summed over the ranks
    (its ``options`` go there, so ``use_token_scaling`` is not taken).

    Refused: a head that is not an ``nn.Linear`` or whose weight is a DTensor of another layout
    (outside FSDP), and, at the call, a model whose forward changes the logits before its loss
    some other way or does not call its ``loss_function``, and a head whose weight is gathered
    for its own forward only (DeepSpeed ZeRO-3): each with an error, never a wrong loss."""
    for name in _FUSE_SETS + _FUSE_REFUSES:
        if name in options:
            raise TypeError(f"fuse_linear_cross_entropy sets or refuses {name!r}: the model's call decides it")
    inspect.signature(linear_cross_entropy).bind(None, None, None, **options)
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()  # PEFT's wrapper: its forward calls the base model's
    settable = getattr(type(model), "loss_function", None)
    if not isinstance(settable, property) or settable.fset is None:
        raise TypeError(
            f"{type(model).__name__} is not a Transformers model whose loss_function can be set "
            "(transformers 4.49 or later)"
        )
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__}'s output embeddings are {type(head).__name__}, not nn.Linear")
    if "forward" in model.__dict__:
        raise RuntimeError(f"{type(model).__name__}'s forward is patched already (remove() the handle first)")
    original = model.forward
    labels_of = inspect.signature(original)
    source = _forward_source(model)
    capping = _caps_its_logits(model, source)
    scale = _scale_of(source)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None and args:
            labels = labels_of.bind_partial(*args, **kwargs).arguments.get("labels")
        if labels is None or not (model.training or in_eval):
            return original(*args, **kwargs)
        call = _FusedCall(model, head, _softcap(model.config) if capping else None, scale, options, skip_ignored)
        with call.active():
            out = original(*args, **kwargs)
        if not call.loss_called:
            raise RuntimeError(
                f"{type(model).__name__}'s forward did not call its loss_function, so "
                "fuse_linear_cross_entropy cannot compute its loss"
            )
        return _without_logits(out, call.placeholder)

    model.forward = forward
    return FusedHandle(model, forward)
