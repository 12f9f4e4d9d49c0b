//! Calls on device memory this crate does not own: a framework's tensors (the PyTorch extension
//! in `python/`), given by device address and element count, with the element and label types
//! as values rather than type parameters, and every output buffer (the loss included) owned by
//! the caller. Nothing here allocates, uploads or waits, so a call can be captured in a CUDA graph
//! by the framework that owns the memory.
//!
//! The same kernels, planning and checks as [`CrossEntropy::forward_backward_into`],
//! [`CrossEntropy::forward`], [`CrossEntropy::backward_into`] and [`CrossEntropy::scale_grad`];
//! what differs is who owns the buffers, and that class weights live in device memory
//! ([`RawCall::weight`]) instead of [`Options::weight`].

use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::abi::{COUNT_WORDS, MODE_FORWARD, MODE_FUSED};
use crate::cuda::{CrossEntropy, KernelCall, LossBuffers};
use crate::error::{Error, Result};
use crate::options::{DType, Options, Shape, check_entropy_upstream};
use crate::plan;

/// The type of the labels, as a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelType {
    I32,
    I64,
}

impl LabelType {
    /// The kernels' name suffix ([`crate::Label::NAME`]).
    pub(crate) fn name(self) -> &'static str {
        match self {
            LabelType::I32 => "i32",
            LabelType::I64 => "i64",
        }
    }
}

/// A device buffer by address and length in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawBuffer {
    pub ptr: u64,
    pub len: usize,
}

impl RawBuffer {
    /// A buffer of `len` elements at `ptr`.
    pub fn new(ptr: u64, len: usize) -> RawBuffer {
        RawBuffer { ptr, len }
    }

    /// A cudarc buffer's address (for writing, on `stream`) and length.
    pub fn of<T>(stream: &Arc<CudaStream>, slice: &mut cudarc::driver::CudaSlice<T>) -> RawBuffer {
        use cudarc::driver::DevicePtrMut;
        let len = slice.len();
        RawBuffer::new(slice.device_ptr_mut(stream).0, len)
    }
}

/// The inputs of a call: logits of `dtype` laid out as `shape`, labels, and optional class
/// weights (`[f32; vocab]` on the device; the call's `Options::weight` must then be `None`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawCall {
    pub logits: RawBuffer,
    pub dtype: DType,
    pub labels: RawBuffer,
    pub label_type: LabelType,
    pub shape: Shape,
    pub weight: Option<RawBuffer>,
}

/// The outputs of a forward call, owned by the caller, as [`crate::Loss`] holds them: `loss`
/// `[f32; 1]`, `row_loss` and `row_lse` `[f32; rows]`, `counts` `[u32; COUNT_WORDS]`, `extras`
/// `[f32; 2]` (z-loss part, token accuracy), `row_correct` `[u32; rows]` (token accuracy only),
/// `predicted` `[i64; rows]` (predicted tokens only), `entropy` `[f32; rows]` (entropies only),
/// `workspace` `[f32; workspace_len]` ([`CrossEntropy::raw_workspace_len`]; none when that is 0).
/// A two-phase backward reads `counts` and `row_lse` of the forward that wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawLoss {
    pub loss: RawBuffer,
    pub row_loss: RawBuffer,
    pub row_lse: RawBuffer,
    pub counts: RawBuffer,
    pub extras: RawBuffer,
    pub row_correct: Option<RawBuffer>,
    pub predicted: Option<RawBuffer>,
    pub entropy: Option<RawBuffer>,
    pub workspace: Option<RawBuffer>,
}

/// Fails unless `buffer` holds at least `needed` elements; `what` names it in the error.
pub(crate) fn check_len(what: &str, buffer: RawBuffer, needed: usize) -> Result<()> {
    if buffer.len < needed {
        return Err(Error::InvalidOption(format!(
            "{what} holds {} elements, the call needs {needed}",
            buffer.len
        )));
    }
    Ok(())
}

/// The address of a per-row output the call asked for (`asked`): `buffer`, checked to hold `rows`
/// elements (`what` names it), or the error `missing` without one; 0 when not asked for.
fn asked_buffer(
    asked: bool,
    buffer: Option<RawBuffer>,
    rows: usize,
    missing: &str,
    what: &str,
) -> Result<u64> {
    match (asked, buffer) {
        (false, _) => Ok(0),
        (true, Some(buffer)) => check_len(what, buffer, rows).map(|()| buffer.ptr),
        (true, None) => Err(Error::InvalidOption(missing.to_string())),
    }
}

/// The backward's entropy addresses (the forward's `entropies`, their upstream) where
/// `entropy_upstream` is given: both checked to hold `rows` values; an error naming
/// `return_entropy` without the forward's entropies. Every backward with entropies (typed, raw,
/// linear) checks them here.
pub(crate) fn entropy_pair(
    entropies: Option<RawBuffer>,
    entropy_upstream: Option<RawBuffer>,
    rows: usize,
) -> Result<Option<(u64, u64)>> {
    let Some(upstream) = entropy_upstream else {
        return Ok(None);
    };
    check_entropy_upstream(rows, upstream.len)?;
    let entropies = entropies.ok_or_else(|| {
        Error::InvalidOption(
            "the entropies' gradient needs the entropies of the forward call (made with \
             return_entropy)"
                .to_string(),
        )
    })?;
    check_len("entropy", entropies, rows)?;
    Ok(Some((entropies.ptr, upstream.ptr)))
}

impl RawCall {
    /// Checks the shape against the buffers, the options' values, and the weights' place: the
    /// errors are those of the typed API.
    fn validate(&self, opts: &Options) -> Result<()> {
        self.shape.validate(self.logits.len, self.labels.len)?;
        if opts.weight.is_some() {
            return Err(Error::InvalidOption(
                "a raw call takes class weights in device memory (RawCall::weight), not in \
                 Options::weight"
                    .to_string(),
            ));
        }
        opts.validate(self.shape.vocab)?;
        if let Some(weight) = self.weight
            && weight.len != self.shape.vocab
        {
            return Err(Error::InvalidOption(format!(
                "weight holds {} values, vocab is {} (one weight per class)",
                weight.len, self.shape.vocab
            )));
        }
        Ok(())
    }

    fn kernel_call(&self) -> KernelCall {
        KernelCall {
            dtype: self.dtype,
            label: self.label_type.name(),
            logits: self.logits.ptr,
            labels: self.labels.ptr,
            shape: self.shape,
            weight: self.weight.map_or(0, |w| w.ptr),
        }
    }
}

impl RawLoss {
    /// Checks every buffer's length for `rows` rows (and `workspace_len`), and returns their
    /// addresses.
    pub(crate) fn buffers(
        &self,
        rows: usize,
        opts: &Options,
        workspace_len: usize,
    ) -> Result<LossBuffers> {
        check_len("loss", self.loss, 1)?;
        check_len("row_loss", self.row_loss, rows)?;
        check_len("row_lse", self.row_lse, rows)?;
        check_len("counts", self.counts, COUNT_WORDS)?;
        check_len("extras", self.extras, 2)?;
        let row_correct = asked_buffer(
            opts.return_token_accuracy,
            self.row_correct,
            rows,
            "return_token_accuracy needs a row_correct buffer",
            "row_correct",
        )?;
        let predicted = asked_buffer(
            opts.return_predicted_tokens,
            self.predicted,
            rows,
            "return_predicted_tokens needs a predicted buffer ([i64; rows])",
            "predicted",
        )?;
        let entropy = asked_buffer(
            opts.return_entropy,
            self.entropy,
            rows,
            "return_entropy needs an entropy buffer ([f32; rows])",
            "entropy",
        )?;
        let partials = match (workspace_len, self.workspace) {
            (0, _) => 0,
            (needed, Some(buffer)) => {
                check_len("workspace", buffer, needed)?;
                buffer.ptr
            }
            (needed, None) => {
                return Err(Error::InvalidOption(format!(
                    "this call needs a workspace of {needed} f32 values (raw_workspace_len)"
                )));
            }
        };
        Ok(LossBuffers {
            loss: self.loss.ptr,
            row_loss: self.row_loss.ptr,
            row_lse: self.row_lse.ptr,
            counts: self.counts.ptr,
            extras: self.extras.ptr,
            row_correct,
            predicted,
            entropy,
            partials,
            // The caller's counts: a small call zeroes the done counter first.
            done_zeroed: false,
        })
    }
}

impl CrossEntropy {
    /// `f32` values of the workspace a [`raw_forward`](Self::raw_forward) of this shape, dtype
    /// and options needs (0: none). Plans the call as the call itself will.
    pub fn raw_workspace_len(
        &self,
        shape: &Shape,
        dtype: DType,
        opts: &Options,
        weighted: bool,
    ) -> Result<usize> {
        let launch = self.plan_variant(shape, dtype, opts, weighted)?;
        Ok(plan::partials_len(shape.rows(), &launch))
    }

    /// The loss of `call` into `out` on `stream`: with `fused`, the gradient of
    /// `grad_scale · loss` is written over the logits in the same pass (as
    /// [`forward_backward_into`](Self::forward_backward_into)); without, the logits are only read
    /// and `out.row_lse` is kept for [`raw_backward`](Self::raw_backward) (as
    /// [`forward`](Self::forward)). Enqueued; returns without waiting. A label out of range makes
    /// the loss NaN and counts in `counts[COUNT_BAD]`.
    ///
    /// # Safety
    /// Every address in `call` and `out` must be device memory of this handle's context holding
    /// at least the stated number of elements of the stated type (`u32` for `counts` and
    /// `row_correct`, `f32` for the others), none of the outputs overlapping another buffer, and
    /// all of it must stay allocated until the enqueued work has run; with `fused` the logits
    /// must be writable. `stream` must belong to this handle's context.
    pub unsafe fn raw_forward(
        &self,
        stream: &Arc<CudaStream>,
        call: &RawCall,
        opts: &Options,
        out: &RawLoss,
        fused: bool,
    ) -> Result<()> {
        self.check_stream(stream)?;
        call.validate(opts)?;
        let launch = self.plan_variant(&call.shape, call.dtype, opts, call.weight.is_some())?;
        let workspace_len = plan::partials_len(call.shape.rows(), &launch);
        let buffers = out.buffers(call.shape.rows(), opts, workspace_len)?;
        let mode = if fused { MODE_FUSED } else { MODE_FORWARD };
        self.launch_loss(stream, &call.kernel_call(), opts, launch, &buffers, mode)
    }

    /// Each scored row's entropy (of the soft-capped logits with `opts.softcap`; the labels,
    /// `ignore_index` and the causal shift say which rows are scored) into `out` (`[f32; rows]`,
    /// 0 for a row not scored), reading the logits once: what `return_entropy` adds to a
    /// forward, on its own (before a fused forward, which writes over the logits). Enqueued.
    ///
    /// # Safety
    /// As [`raw_forward`](Self::raw_forward) for `call`; `out` must hold `rows` `f32`.
    pub unsafe fn raw_entropy(
        &self,
        stream: &Arc<CudaStream>,
        call: &RawCall,
        opts: &Options,
        out: RawBuffer,
    ) -> Result<()> {
        self.check_stream(stream)?;
        call.validate(opts)?;
        check_len("entropy", out, call.shape.rows())?;
        self.launch_entropy(stream, &call.kernel_call(), opts, out.ptr)
    }

    /// Two-phase backward: the gradient of `upstream · loss` (`upstream` one `f32`, or one per
    /// row) written into `grad` (the logits' own address for in place, or another buffer of the
    /// same layout at the same address modulo 16 bytes), from the `counts` and `row_lse` that a
    /// [`raw_forward`](Self::raw_forward) without `fused` wrote for the same call and options
    /// (`grad_scale` may differ). Reads and writes each element once.
    ///
    /// # Safety
    /// As [`raw_forward`](Self::raw_forward); `grad` must hold the shape's elements of `call`'s
    /// dtype, and `forward` must be the outputs of that forward call, already enqueued.
    pub unsafe fn raw_backward(
        &self,
        stream: &Arc<CudaStream>,
        call: &RawCall,
        opts: &Options,
        forward: &RawLoss,
        upstream: RawBuffer,
        grad: RawBuffer,
    ) -> Result<()> {
        unsafe { self.raw_backward_with_entropy(stream, call, opts, forward, upstream, None, grad) }
    }

    /// [`raw_backward`](Self::raw_backward), with `entropy_upstream` (`[f32; rows]`) the gradient
    /// of `Σ_r entropy_upstream[r]·H_r` added, `H` the entropies in `forward.entropy` (a forward
    /// with `return_entropy`), as
    /// [`backward_with_entropy_into`](Self::backward_with_entropy_into) computes it; `None`:
    /// `raw_backward`.
    ///
    /// # Safety
    /// As [`raw_backward`](Self::raw_backward), for `entropy_upstream` and `forward.entropy` too.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn raw_backward_with_entropy(
        &self,
        stream: &Arc<CudaStream>,
        call: &RawCall,
        opts: &Options,
        forward: &RawLoss,
        upstream: RawBuffer,
        entropy_upstream: Option<RawBuffer>,
        grad: RawBuffer,
    ) -> Result<()> {
        self.check_stream(stream)?;
        call.validate(opts)?;
        call.shape.validate(grad.len, call.labels.len)?;
        let rows = call.shape.rows();
        check_len("row_lse", forward.row_lse, rows)?;
        check_len("counts", forward.counts, COUNT_WORDS)?;
        let entropy = entropy_pair(forward.entropy, entropy_upstream, rows)?;
        let delta = grad.ptr.wrapping_sub(call.logits.ptr);
        self.launch_backward(
            stream,
            &call.kernel_call(),
            opts,
            forward.counts.ptr,
            forward.row_lse.ptr,
            (upstream.ptr, upstream.len),
            delta,
            None,
            entropy,
        )
    }

    /// Scales a gradient of `dtype` laid out as `shape` in place by `upstream` (one `f32`, or one
    /// per row), as [`scale_grad`](Self::scale_grad): rows whose factor is exactly 1 are not
    /// touched, decided on the device.
    ///
    /// # Safety
    /// As [`raw_forward`](Self::raw_forward), for `grad` (writable) and `upstream`.
    pub unsafe fn raw_scale_grad(
        &self,
        stream: &Arc<CudaStream>,
        grad: RawBuffer,
        dtype: DType,
        shape: Shape,
        upstream: RawBuffer,
    ) -> Result<()> {
        self.check_stream(stream)?;
        shape.validate(grad.len, shape.rows())?;
        self.launch_scale(stream, dtype, grad.ptr, shape, (upstream.ptr, upstream.len))
    }
}
