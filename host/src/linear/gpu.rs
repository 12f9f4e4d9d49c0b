//! Linear + cross-entropy on the GPU: per chunk of rows, a cuBLASLt GEMM writes the chunk's
//! logits, xent's kernel turns them into their gradient in place, and two GEMMs take the hidden
//! states' and the weight's gradients from it. The core works on raw device addresses (the
//! PyTorch package's tensors, whose scratch PyTorch allocates); [`CrossEntropy::linear_forward_backward`]
//! is the typed API over cudarc buffers, with scratch this crate keeps.
//!
//! Three passes ([`LinearPass`]): `Fused` (loss and gradients in one pass, three GEMMs per chunk),
//! `Forward` (the loss only, one GEMM per chunk; keeps what `Backward` needs) and `Backward` (the
//! gradients of `upstream · loss`, upstream one value or one per row, from a `Forward`'s saved
//! log-sum-exps: the chunk's logits are recomputed, so four GEMMs in all, but nothing of size
//! `[V, D]` is held between the forward and the backward).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::{LinearShape, chunk_rows};
use crate::abi::{COUNT_WORDS, MODE_FORWARD, MODE_FUSED};
use crate::cublaslt::{CublasLt, Gemm, Operand};
use crate::cuda::{CrossEntropy, KernelCall, LossBuffers};
use crate::error::{Error, Result};
use crate::loss::Loss;
use crate::options::{DType, Element, Label, Options, Shape, check_upstream_len};
use crate::plan;
use crate::raw::{LabelType, RawBuffer, RawLoss, check_len};

/// cuBLASLt's workspace: 32 MiB, NVIDIA's advice for Hopper.
pub const GEMM_WORKSPACE_BYTES: usize = 32 << 20;

/// What a linear + cross-entropy call computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearPass {
    /// The loss only (no gradients): one GEMM per chunk. Keeps `counts` and `row_lse` in the
    /// loss buffers for a later [`LinearPass::Backward`].
    Forward,
    /// The loss and the gradients of `grad_scale · loss`, one pass over each chunk.
    Fused,
    /// The gradients of `upstream · loss` (one `f32`, or one per row, on the device) from the
    /// `counts` and `row_lse` a [`LinearPass::Forward`] of the same call wrote; the chunks'
    /// logits are computed again.
    Backward { upstream: RawBuffer },
}

/// The inputs of a raw call: `hidden` `[N, D]`, `weight` `[V, D]` and `bias` `[V]` of `dtype`,
/// labels, and optional class weights (`[f32; V]` on the device; the call's `Options::weight`
/// must then be `None`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawLinearCall {
    pub hidden: RawBuffer,
    pub weight: RawBuffer,
    pub bias: Option<RawBuffer>,
    pub dtype: DType,
    pub labels: RawBuffer,
    pub label_type: LabelType,
    pub shape: LinearShape,
    pub class_weight: Option<RawBuffer>,
}

/// A gradient buffer and its element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawGrad {
    pub buffer: RawBuffer,
    pub dtype: DType,
}

/// The gradients a `Fused` or `Backward` call writes; each is optional (a frozen weight, hidden
/// states that need none). `hidden`: `[N, D]` of the call's dtype, overwritten. `weight`
/// (`[V, D]`) and `bias` (`[V]`): f32 or the call's dtype; added to with `accumulate` (gradient
/// accumulation), overwritten without (no zeroing needed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawLinearGrads {
    pub hidden: Option<RawBuffer>,
    pub weight: Option<RawGrad>,
    pub bias: Option<RawGrad>,
    pub accumulate: bool,
}

/// Device memory a raw call works in, owned by the caller, as [`LinearScratchLens`] sizes it:
/// `logits` (bytes) holds a chunk of `chunk_rows` rows of logits; `gemm_workspace` (bytes) is
/// cuBLASLt's; `labels` (bytes) holds the shifted labels of a causal call; `ones` holds
/// `chunk_rows` elements of the call's dtype, all equal to 1, for the bias gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawLinearScratch {
    pub chunk_rows: usize,
    pub logits: RawBuffer,
    pub gemm_workspace: RawBuffer,
    pub labels: Option<RawBuffer>,
    pub ones: Option<RawBuffer>,
}

/// The sizes of a call's scratch: rows per chunk, bytes of logits, of cuBLASLt's workspace and
/// of shifted labels (0: none needed), elements of ones (0: none), and `f32` values of the loss's
/// workspace ([`RawLoss::workspace`]; 0: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearScratchLens {
    pub chunk_rows: usize,
    pub logits_bytes: usize,
    pub gemm_workspace_bytes: usize,
    pub labels_bytes: usize,
    pub ones_len: usize,
    pub loss_workspace_len: usize,
}

/// The options the chunks' kernels run with: `opts`' values without the causal shift (a causal
/// call's labels are shifted once beforehand).
fn chunk_options(opts: &Options) -> Options {
    Options {
        causal_shift: false,
        ..opts.clone()
    }
}

impl RawLinearCall {
    fn validate(&self, opts: &Options) -> Result<()> {
        self.shape.validate(
            self.hidden.len,
            self.weight.len,
            self.bias.map(|b| b.len),
            self.labels.len,
        )?;
        if opts.weight.is_some() {
            return Err(Error::InvalidOption(
                "a raw call takes class weights in device memory (RawLinearCall::class_weight), \
                 not in Options::weight"
                    .to_string(),
            ));
        }
        opts.validate(self.shape.vocab)?;
        if let Some(weight) = self.class_weight
            && weight.len != self.shape.vocab
        {
            return Err(Error::InvalidOption(format!(
                "class weights hold {} values, vocab is {} (one weight per class)",
                weight.len, self.shape.vocab
            )));
        }
        Ok(())
    }
}

impl RawLinearGrads {
    fn validate(&self, call: &RawLinearCall, pass: LinearPass) -> Result<()> {
        let any = self.hidden.is_some() || self.weight.is_some() || self.bias.is_some();
        if pass == LinearPass::Forward && any {
            return Err(Error::InvalidOption(
                "a Forward pass writes no gradients; pass none (Fused or Backward write them)"
                    .to_string(),
            ));
        }
        let (rows, d, v) = (call.shape.rows(), call.shape.hidden, call.shape.vocab);
        let exact = |what: &str, buffer: RawBuffer, needed: usize| {
            if buffer.len == needed {
                Ok(())
            } else {
                Err(Error::BadShape(format!(
                    "{what} holds {} values, the call needs {needed}",
                    buffer.len
                )))
            }
        };
        let dtype_ok = |what: &str, grad: RawGrad| {
            if grad.dtype == DType::F32 || grad.dtype == call.dtype {
                Ok(())
            } else {
                Err(Error::InvalidOption(format!(
                    "{what} must be f32 or the call's dtype ({:?}), not {:?}",
                    call.dtype, grad.dtype
                )))
            }
        };
        if let Some(hidden) = self.hidden {
            exact("grad_hidden", hidden, rows * d)?;
        }
        if let Some(weight) = self.weight {
            exact("grad_weight", weight.buffer, v * d)?;
            dtype_ok("grad_weight", weight)?;
        }
        if let Some(bias) = self.bias {
            if call.bias.is_none() {
                return Err(Error::InvalidOption("grad_bias without a bias".to_string()));
            }
            exact("grad_bias", bias.buffer, v)?;
            dtype_ok("grad_bias", bias)?;
        }
        Ok(())
    }
}

/// A row-major matrix operand, rows contiguous.
fn matrix(ptr: u64, dtype: DType, rows: usize, cols: usize, transposed: bool) -> Operand {
    Operand {
        ptr,
        dtype,
        rows,
        cols,
        ld: cols,
        transposed,
    }
}

impl CrossEntropy {
    /// The scratch a raw call of `call` and `opts` needs for `pass`, with chunks of logits of at
    /// most `budget_bytes` (`None`: the default of [`chunk_rows`]).
    pub fn raw_linear_scratch_lens(
        &self,
        call: &RawLinearCall,
        opts: &Options,
        pass: LinearPass,
        budget_bytes: Option<usize>,
    ) -> Result<LinearScratchLens> {
        call.validate(opts)?;
        let (rows, v) = (call.shape.rows(), call.shape.vocab);
        let chunk = chunk_rows(rows, v, call.dtype, budget_bytes);
        let loss_workspace_len = match pass {
            LinearPass::Backward { .. } => 0,
            _ => self.chunk_plans(call, opts, chunk)?.2,
        };
        let label_bytes = match call.label_type {
            LabelType::I32 => 4,
            LabelType::I64 => 8,
        };
        Ok(LinearScratchLens {
            chunk_rows: chunk,
            logits_bytes: chunk * v * call.dtype.bytes(),
            gemm_workspace_bytes: GEMM_WORKSPACE_BYTES,
            labels_bytes: if opts.causal_shift {
                rows * label_bytes
            } else {
                0
            },
            ones_len: if call.bias.is_some() && pass != LinearPass::Forward {
                chunk
            } else {
                0
            },
            loss_workspace_len,
        })
    }

    /// The plans of a full chunk and of the last one, and the partial sums the larger needs.
    fn chunk_plans(
        &self,
        call: &RawLinearCall,
        opts: &Options,
        chunk: usize,
    ) -> Result<(plan::LaunchPlan, plan::LaunchPlan, usize)> {
        let (rows, v) = (call.shape.rows(), call.shape.vocab);
        let lopts = chunk_options(opts);
        let weighted = call.class_weight.is_some();
        let plan_of =
            |c: usize| self.plan_variant(&Shape::flat(c, v), call.dtype, &lopts, weighted);
        let full = plan_of(chunk)?;
        let last = match rows % chunk {
            0 => full,
            rest => plan_of(rest)?,
        };
        let partials =
            plan::partials_len(chunk.min(rows), &full).max(plan::partials_len(rows % chunk, &last));
        Ok((full, last, partials))
    }

    /// Linear layer + cross-entropy on raw device memory: `pass` over `logits = hidden·weightᵀ +
    /// bias`, the loss into `out` (as [`raw_forward`](Self::raw_forward) writes it; a `Backward`
    /// pass reads its `counts` and `row_lse`), the gradients into `grads`, working in `scratch`.
    /// Every option of [`Options`] applies, the causal shift included. Enqueued on `stream`;
    /// nothing allocates, uploads or waits, so a call can be captured in a CUDA graph.
    ///
    /// # Safety
    /// Every address must be device memory of this handle's context holding at least the stated
    /// number of elements of the stated type, the outputs and the scratch overlapping nothing
    /// else, all of it allocated until the enqueued work has run; `scratch.ones` must hold ones.
    /// `stream` must belong to this handle's context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn raw_linear(
        &self,
        blas: &CublasLt,
        stream: &Arc<CudaStream>,
        call: &RawLinearCall,
        opts: &Options,
        pass: LinearPass,
        out: &RawLoss,
        grads: &RawLinearGrads,
        scratch: &RawLinearScratch,
    ) -> Result<()> {
        self.check_stream(stream)?;
        call.validate(opts)?;
        grads.validate(call, pass)?;
        let shape = call.shape;
        let (rows, d, v) = (shape.rows(), shape.hidden, shape.vocab);
        let t_bytes = call.dtype.bytes();
        let l_bytes = match call.label_type {
            LabelType::I32 => 4,
            LabelType::I64 => 8,
        };
        let chunk = scratch.chunk_rows;
        if chunk == 0 {
            return Err(Error::InvalidOption("chunk_rows is 0".to_string()));
        }
        check_len(
            "scratch.logits (bytes)",
            scratch.logits,
            chunk * v * t_bytes,
        )?;
        check_len("scratch.gemm_workspace (bytes)", scratch.gemm_workspace, 1)?;
        let lopts = chunk_options(opts);
        // The main kernel's plans (a full chunk, the last one) and the partial sums they need.
        let plans = match pass {
            LinearPass::Backward { .. } => None,
            _ => Some(self.chunk_plans(call, opts, chunk)?),
        };
        let partials_len = plans.map_or(0, |p| p.2);
        let buffers = match pass {
            LinearPass::Backward { upstream } => {
                check_len("row_lse", out.row_lse, rows)?;
                check_len("counts", out.counts, COUNT_WORDS)?;
                check_upstream_len(rows, upstream.len)?;
                LossBuffers {
                    loss: 0,
                    row_loss: 0,
                    row_lse: out.row_lse.ptr,
                    counts: out.counts.ptr,
                    extras: 0,
                    row_correct: 0,
                    partials: 0,
                }
            }
            _ => out.buffers(rows, opts, partials_len)?,
        };
        let bias_grad = grads.bias.filter(|_| pass != LinearPass::Forward);
        let ones = match (bias_grad, scratch.ones) {
            (None, _) => 0,
            (Some(_), Some(ones)) => {
                check_len("scratch.ones", ones, chunk.min(rows))?;
                ones.ptr
            }
            (Some(_), None) => {
                return Err(Error::InvalidOption(
                    "a bias gradient needs scratch.ones".to_string(),
                ));
            }
        };
        let cu_stream = stream.cu_stream();

        // The causal shift, once for the whole call: shifted[r] = labels[r + 1], and the last
        // position of each sequence ignored (one strided memset per 32-bit half of a label).
        let labels = if opts.causal_shift && rows > 0 {
            let Some(shifted) = scratch.labels else {
                return Err(Error::InvalidOption(
                    "a causal call needs scratch.labels".to_string(),
                ));
            };
            check_len("scratch.labels (bytes)", shifted, rows * l_bytes)?;
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    shifted.ptr,
                    call.labels.ptr + l_bytes as u64,
                    (rows - 1) * l_bytes,
                    cu_stream,
                )?;
                let ignore = opts.ignore_index.to_le_bytes();
                for half in 0..l_bytes / 4 {
                    let word =
                        u32::from_le_bytes(ignore[4 * half..4 * half + 4].try_into().unwrap());
                    cudarc::driver::sys::cuMemsetD2D32Async(
                        shifted.ptr + ((shape.seq_len - 1) * l_bytes + 4 * half) as u64,
                        shape.seq_len * l_bytes,
                        word,
                        1,
                        shape.batch,
                        cu_stream,
                    )
                    .result()?;
                }
            }
            shifted.ptr
        } else {
            call.labels.ptr
        };

        let whole = KernelCall {
            dtype: call.dtype,
            label: call.label_type.name(),
            logits: 0,
            labels,
            shape: Shape::flat(rows, v),
            weight: call.class_weight.map_or(0, |w| w.ptr),
        };
        if !matches!(pass, LinearPass::Backward { .. }) {
            self.launch_count(stream, &whole, &lopts, buffers.counts)?;
        }
        // Overwritten gradients with no rows: zeros, as the sum over no rows.
        if rows == 0 && !grads.accumulate && pass != LinearPass::Forward {
            for grad in [grads.weight, bias_grad].into_iter().flatten() {
                unsafe {
                    cudarc::driver::result::memset_d8_async(
                        grad.buffer.ptr,
                        0,
                        grad.buffer.len * grad.dtype.bytes(),
                        cu_stream,
                    )?;
                }
            }
        }

        let workspace = (scratch.gemm_workspace.ptr, scratch.gemm_workspace.len);
        let logits = scratch.logits.ptr;
        let dtype = call.dtype;
        for first in (0..rows).step_by(chunk) {
            let c = chunk.min(rows - first);
            let hidden_rows = call.hidden.ptr + (first * d * t_bytes) as u64;
            // 1. The chunk's logits: h·Wᵀ (+ bias).
            let gemm = Gemm {
                a: matrix(hidden_rows, dtype, c, d, false),
                b: matrix(call.weight.ptr, dtype, v, d, true),
                out: matrix(logits, dtype, c, v, false),
                alpha: 1.0,
                beta: 0.0,
                bias: call.bias.map_or(0, |b| b.ptr),
            };
            unsafe { blas.matmul(cu_stream, &gemm, workspace) }?;
            // 2. xent's kernel on the chunk: its loss, and (but in Forward) its gradient over the
            //    logits.
            let kernel_call = KernelCall {
                logits,
                labels: labels + (first * l_bytes) as u64,
                shape: Shape::flat(c, v),
                ..whole
            };
            let at = |base: u64| {
                if base == 0 {
                    0
                } else {
                    base + 4 * first as u64
                }
            };
            match pass {
                LinearPass::Forward | LinearPass::Fused => {
                    let (full, last, _) = plans.expect("planned for Forward and Fused");
                    let launch = if c == chunk { full } else { last };
                    let chunk_buffers = LossBuffers {
                        row_loss: at(buffers.row_loss),
                        row_lse: at(buffers.row_lse),
                        row_correct: at(buffers.row_correct),
                        ..buffers
                    };
                    let mode = if pass == LinearPass::Forward {
                        MODE_FORWARD
                    } else {
                        MODE_FUSED
                    };
                    self.launch_main(stream, &kernel_call, &lopts, launch, &chunk_buffers, mode)?;
                }
                LinearPass::Backward { upstream } => {
                    let upstream = if upstream.len == rows && rows > 1 {
                        (upstream.ptr + 4 * first as u64, c)
                    } else {
                        (upstream.ptr, 1)
                    };
                    self.launch_backward(
                        stream,
                        &kernel_call,
                        &lopts,
                        buffers.counts,
                        at(buffers.row_lse),
                        upstream,
                        0,
                    )?;
                }
            }
            if pass == LinearPass::Forward {
                continue;
            }
            // 3. grad_hidden[chunk] = G·W.
            if let Some(grad_hidden) = grads.hidden {
                let gemm = Gemm {
                    a: matrix(logits, dtype, c, v, false),
                    b: matrix(call.weight.ptr, dtype, v, d, false),
                    out: matrix(
                        grad_hidden.ptr + (first * d * t_bytes) as u64,
                        dtype,
                        c,
                        d,
                        false,
                    ),
                    alpha: 1.0,
                    beta: 0.0,
                    bias: 0,
                };
                unsafe { blas.matmul(cu_stream, &gemm, workspace) }?;
            }
            let beta = if grads.accumulate || first > 0 {
                1.0
            } else {
                0.0
            };
            // 4. grad_weight (+)= Gᵀ·h[chunk].
            if let Some(grad_weight) = grads.weight {
                let gemm = Gemm {
                    a: matrix(logits, dtype, c, v, true),
                    b: matrix(hidden_rows, dtype, c, d, false),
                    out: matrix(grad_weight.buffer.ptr, grad_weight.dtype, v, d, false),
                    alpha: 1.0,
                    beta,
                    bias: 0,
                };
                unsafe { blas.matmul(cu_stream, &gemm, workspace) }?;
            }
            // 5. grad_bias (+)= Gᵀ·1.
            if let Some(grad_bias) = bias_grad {
                let gemm = Gemm {
                    a: matrix(logits, dtype, c, v, true),
                    b: matrix(ones, dtype, c, 1, false),
                    out: matrix(grad_bias.buffer.ptr, grad_bias.dtype, v, 1, false),
                    alpha: 1.0,
                    beta,
                    bias: 0,
                };
                unsafe { blas.matmul(cu_stream, &gemm, workspace) }?;
            }
        }
        match pass {
            LinearPass::Backward { .. } => Ok(()),
            _ => self.launch_finish(stream, rows, call.class_weight.is_some(), &lopts, &buffers),
        }
    }
}

/// Device memory a typed linear + cross-entropy call works in, kept between calls (grown when a
/// call needs more): the chunk of logits, cuBLASLt's workspace, the shifted labels of a causal
/// call and a vector of ones (the bias gradient's GEMM).
pub struct LinearScratch {
    stream: Arc<CudaStream>,
    budget: Option<usize>,
    logits: Option<CudaSlice<u8>>,
    workspace: CudaSlice<u8>,
    labels: Option<CudaSlice<u8>>,
    ones: Option<CudaSlice<u8>>,
    /// The element type and length of the ones in `ones`.
    ones_of: Option<(DType, usize)>,
}

impl LinearScratch {
    /// Scratch on `stream` for chunks of logits of at most `budget_bytes` (`None`: the default of
    /// [`chunk_rows`]).
    pub fn new(stream: &Arc<CudaStream>, budget_bytes: Option<usize>) -> Result<LinearScratch> {
        Ok(LinearScratch {
            stream: stream.clone(),
            budget: budget_bytes,
            logits: None,
            workspace: stream.alloc_zeros(GEMM_WORKSPACE_BYTES)?,
            labels: None,
            ones: None,
            ones_of: None,
        })
    }

    /// `slot` holding at least `bytes` (allocated anew when smaller), as a raw buffer of bytes.
    fn reserve(
        stream: &Arc<CudaStream>,
        slot: &mut Option<CudaSlice<u8>>,
        bytes: usize,
    ) -> Result<RawBuffer> {
        if slot.as_ref().is_none_or(|s| s.len() < bytes) {
            *slot = Some(stream.alloc_zeros(bytes.max(1))?);
        }
        let buffer = slot.as_mut().expect("reserved above");
        let len = buffer.len();
        Ok(RawBuffer::new(buffer.device_ptr_mut(stream).0, len))
    }

    /// The raw scratch for `lens`, allocating what is missing; ones of `dtype` are uploaded when
    /// first needed at this length (the only upload: calls after it are capturable).
    fn raw(&mut self, lens: &LinearScratchLens, dtype: DType) -> Result<RawLinearScratch> {
        let stream = self.stream.clone();
        let logits = Self::reserve(&stream, &mut self.logits, lens.logits_bytes)?;
        let labels = match lens.labels_bytes {
            0 => None,
            bytes => Some(Self::reserve(&stream, &mut self.labels, bytes)?),
        };
        let ones = match lens.ones_len {
            0 => None,
            len => {
                if self.ones_of.is_none_or(|(t, l)| t != dtype || l < len) {
                    let bytes: Vec<u8> = match dtype {
                        DType::F32 => one_bytes(1.0f32),
                        DType::F16 => one_bytes(half::f16::ONE),
                        DType::Bf16 => one_bytes(half::bf16::ONE),
                    }
                    .into_iter()
                    .cycle()
                    .take(len * dtype.bytes())
                    .collect();
                    self.ones = Some(stream.clone_htod(&bytes)?);
                    self.ones_of = Some((dtype, len));
                }
                let ones = self.ones.as_mut().expect("made above");
                Some(RawBuffer::new(ones.device_ptr_mut(&stream).0, len))
            }
        };
        let workspace = self.workspace.device_ptr_mut(&stream).0;
        Ok(RawLinearScratch {
            chunk_rows: lens.chunk_rows,
            logits,
            gemm_workspace: RawBuffer::new(workspace, GEMM_WORKSPACE_BYTES),
            labels,
            ones,
        })
    }
}

/// The bytes of one element.
fn one_bytes<T: Element>(one: T) -> Vec<u8> {
    // SAFETY: an element type is plain data of its size.
    unsafe { std::slice::from_raw_parts((&one as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// The gradients a typed linear + cross-entropy call writes: `grad_hidden` (`[N, D]` of `T`,
/// overwritten), `grad_weight` (`[V, D]`, added to) and `grad_bias` (`[V]`, added to; with a bias
/// only), the last two of `G`: f32, or `T` itself.
pub type LinearGrads<'a, T, G> = (
    &'a mut CudaSlice<T>,
    &'a mut CudaSlice<G>,
    Option<&'a mut CudaSlice<G>>,
);

impl CrossEntropy {
    /// Linear layer + cross-entropy on the GPU: the loss of `logits = hidden·weightᵀ + bias`
    /// (`hidden` `[N, D]`, `weight` `[V, D]`, `bias` `[V]`, all of `T`) into `out`, and the
    /// gradients of `grad_scale · loss`: `grad_hidden` (`[N, D]` of `T`, overwritten),
    /// `grad_weight` (`[V, D]`) and `grad_bias` (`[V]`), both of f32 or `T` and added to
    /// (gradient accumulation; with `T` each chunk's sum is rounded to `T` once, so f32 is the
    /// more exact). The logits exist one chunk of rows at a time ([`chunk_rows`] under the
    /// scratch's budget). Every option of [`Options`] applies, the causal shift included.
    /// Enqueued on `stream`; nothing waits.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward_backward<T: Element, L: Label, G: Element>(
        &self,
        blas: &CublasLt,
        stream: &Arc<CudaStream>,
        (hidden, weight, bias): (
            &impl DevicePtr<T>,
            &impl DevicePtr<T>,
            Option<&CudaSlice<T>>,
        ),
        labels: &impl DevicePtr<L>,
        shape: LinearShape,
        opts: &Options,
        (grad_hidden, grad_weight, grad_bias): LinearGrads<'_, T, G>,
        scratch: &mut LinearScratch,
        out: &mut Loss,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let rows = shape.rows();
        if out.rows != rows {
            return Err(Error::InvalidOption(format!(
                "the Loss buffers hold {} rows, the shape has {rows}",
                out.rows
            )));
        }
        if bias.is_some() != grad_bias.is_some() {
            return Err(Error::BadShape(
                "grad_bias must be given exactly when there is a bias".to_string(),
            ));
        }
        let label_type = match L::NAME {
            "i32" => LabelType::I32,
            _ => LabelType::I64,
        };
        let (hidden_ptr, _h) = hidden.device_ptr(stream);
        let (weight_ptr, _w) = weight.device_ptr(stream);
        let (labels_ptr, _l) = labels.device_ptr(stream);
        let mut call = RawLinearCall {
            hidden: RawBuffer::new(hidden_ptr, hidden.len()),
            weight: RawBuffer::new(weight_ptr, weight.len()),
            bias: bias.map(|b| RawBuffer::new(b.device_ptr(stream).0, b.len())),
            dtype: T::DTYPE,
            labels: RawBuffer::new(labels_ptr, labels.len()),
            label_type,
            shape,
            class_weight: None,
        };
        // Class weights travel in the Loss's device buffer.
        let raw_opts = Options {
            weight: None,
            ..opts.clone()
        };
        let lens =
            self.raw_linear_scratch_lens(&call, &raw_opts, LinearPass::Fused, scratch.budget)?;
        opts.validate(shape.vocab)?;
        out.prepare(stream, opts)?;
        out.reserve_partials(stream, lens.loss_workspace_len)?;
        if opts.weight.is_some() {
            let w = out.weight.as_mut().expect("prepared above");
            call.class_weight = Some(RawBuffer::of(stream, w));
        }
        let raw_scratch = scratch.raw(&lens, T::DTYPE)?;
        let grad_of = |slice: &mut CudaSlice<G>| RawGrad {
            buffer: RawBuffer::of(stream, slice),
            dtype: G::DTYPE,
        };
        let grads = RawLinearGrads {
            hidden: Some(RawBuffer::of(stream, grad_hidden)),
            weight: Some(grad_of(grad_weight)),
            bias: grad_bias.map(grad_of),
            accumulate: true,
        };
        let raw_out = out.raw(stream);
        // SAFETY: every address comes from a live cudarc buffer of the stated length and type on
        // this stream's context; the scratch's ones were uploaded for this dtype.
        unsafe {
            self.raw_linear(
                blas,
                stream,
                &call,
                &raw_opts,
                LinearPass::Fused,
                &raw_out,
                &grads,
                &raw_scratch,
            )
        }
    }
}
