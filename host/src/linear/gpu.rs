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

mod shard;

pub use shard::{LinearShardScratchLens, RawLinearShardCall};

use super::scheme::{CardRates, Scheme, row_scheme_min_rows, row_scheme_rows};
use super::{LinearShape, chunk_rows, gemm_tn, gemm_workspace_bytes, vocab_block};
use crate::abi::{COUNT_WORDS, MODE_FORWARD, MODE_FUSED};
use crate::cublaslt::{CublasLt, Gemm, Operand};
use crate::cuda::{
    CrossEntropy, KernelCall, LossBuffers, argmax_kernel, backward_kernel, entropy_kernel,
    loss_kernels, main_kernels,
};
use crate::error::{Error, Result};
use crate::loss::Loss;
use crate::options::{DType, Element, Label, Options, Shape, check_upstream_len};
use crate::plan;
use crate::raw::{LabelType, RawBuffer, RawLoss, check_len, entropy_pair};

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
/// states that need none). `hidden`: `[N, D]`, f32 or the call's dtype, overwritten. By chunks
/// of rows each of its rows is written once, but by blocks of the vocabulary (a `Backward` pass,
/// and a `Fused` one of chunks under [`CrossEntropy::linear_row_scheme_rows`]) it is accumulated
/// over the blocks in its own dtype: a 16-bit one rounds once a block, an f32 one (converted by
/// the caller) once at the end. In a `Fused` pass of chunks of at least
/// [`ROW_SCHEME_MIN_ROWS`](super::ROW_SCHEME_MIN_ROWS) rows (or one chunk), which then takes the
/// row scheme, it may be the call's hidden states themselves ([`in_place`](Self::in_place), in
/// their dtype): each chunk's rows are overwritten by their gradient once its last GEMM has read
/// them (the two gradient GEMMs then run one after the other), so a caller that holds the
/// hidden states only for the call (a copy of some rows) needs no `[N, D]` more. `weight`
/// (`[V, D]`) and `bias` (`[V]`): f32 or the call's dtype; added to with `accumulate` (gradient
/// accumulation), overwritten without (no zeroing needed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawLinearGrads {
    pub hidden: Option<RawGrad>,
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
    /// Whether the hidden states' gradient is written over the call's hidden states.
    pub fn in_place(&self, call: &RawLinearCall) -> bool {
        self.hidden
            .is_some_and(|g| g.buffer.ptr == call.hidden.ptr && call.hidden.len > 0)
    }

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
            exact("grad_hidden", hidden.buffer, rows * d)?;
            dtype_ok("grad_hidden", hidden)?;
            if self.in_place(call) && hidden.dtype != call.dtype {
                return Err(Error::InvalidOption(format!(
                    "grads.hidden over the call's hidden states must be of their dtype ({:?}), \
                     not {:?}",
                    call.dtype, hidden.dtype
                )));
            }
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

/// Whether a chunk of `rows` rows takes its weight gradient from xent's own GEMM (`gemm_tn`,
/// compute capability 9.0, bf16 throughout), running `alone` or beside the hidden states' GEMM,
/// on the handle's card: [`gemm_tn::takes_weight_grad`], unless a test set the handle's choice
/// ([`CrossEntropy::set_weight_grad_gemm`]).
fn gemm_tn_for(xent: &CrossEntropy, dtype: DType, grad: DType, rows: usize, alone: bool) -> bool {
    let wanted = xent
        .weight_grad_gemm()
        .unwrap_or_else(|| gemm_tn::takes_weight_grad(rows, alone, xent.rates));
    wanted && bf16_gemms(xent, dtype, grad)
}

/// Whether a chunk's two gradient GEMMs come from xent's one kernel (`gemm_grads`: compute
/// capability 9.0, bf16 throughout): only when `XENT_GEMM_GRADS=1` asks for it (to measure).
fn gemm_grads_for(xent: &CrossEntropy, dtype: DType, grad: DType) -> bool {
    std::env::var("XENT_GEMM_GRADS").as_deref() == Ok("1") && bf16_gemms(xent, dtype, grad)
}

/// Whether xent's own sm_90a GEMMs can take a call of `dtype` with a weight gradient of `grad`.
fn bf16_gemms(xent: &CrossEntropy, dtype: DType, grad: DType) -> bool {
    dtype == DType::Bf16 && grad == DType::Bf16 && xent.wgmma_functions().is_ok()
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
        let chunk =
            chunk_override(rows).unwrap_or_else(|| chunk_rows(rows, v, call.dtype, budget_bytes));
        let loss_workspace_len = match pass {
            LinearPass::Backward { .. } => 0,
            _ => self.chunk_plans(call, opts, chunk)?.2,
        };
        let logits = logits_bytes(rows, v, chunk, call.dtype.bytes());
        Ok(LinearScratchLens {
            chunk_rows: chunk,
            logits_bytes: logits,
            gemm_workspace_bytes: workspace_for(logits),
            labels_bytes: if opts.causal_shift {
                rows * label_bytes(call.label_type)
            } else {
                0
            },
            // The row scheme needs a chunk of ones, the blocked backward one per row.
            ones_len: if call.bias.is_some() && pass != LinearPass::Forward {
                rows.max(1)
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
    /// How: the loss by chunks of rows (a GEMM writes a chunk's logits, xent's kernel reads them).
    /// The gradients either in the same pass (`Fused` with chunks of at least
    /// [`linear_row_scheme_rows`](Self::linear_row_scheme_rows), the card's crossover, or in place
    /// from [`ROW_SCHEME_MIN_ROWS`](super::ROW_SCHEME_MIN_ROWS): two GEMMs per chunk, the
    /// weight's gradient accumulated over the chunks), or by blocks of the vocabulary after the
    /// loss (`Backward`, and `Fused` with smaller chunks): per block the logits of every row
    /// again, their gradient from the kept log-sum-exps, the block's weight gradient written once
    /// and the hidden states' gradient accumulated (in `grads.hidden`'s dtype: a 16-bit one
    /// rounds once a block, an f32 one once where the caller converts it), which moves `N·D` per
    /// block instead of `V·D` per chunk.
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
        unsafe {
            self.raw_linear_with_entropy(blas, stream, call, opts, pass, out, None, grads, scratch)
        }
    }

    /// [`raw_linear`](Self::raw_linear); a [`LinearPass::Backward`] with `entropy_upstream`
    /// (`[f32; rows]`) adds the gradient of `Σ_r entropy_upstream[r]·H_r`, `H` the entropies a
    /// forward with `return_entropy` wrote into `out.entropy` (as
    /// [`backward_with_entropy_into`](Self::backward_with_entropy_into) does on logits). Other
    /// passes take no `entropy_upstream`.
    ///
    /// # Safety
    /// As [`raw_linear`](Self::raw_linear), for `entropy_upstream` and `out.entropy` too.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn raw_linear_with_entropy(
        &self,
        blas: &CublasLt,
        stream: &Arc<CudaStream>,
        call: &RawLinearCall,
        opts: &Options,
        pass: LinearPass,
        out: &RawLoss,
        entropy_upstream: Option<RawBuffer>,
        grads: &RawLinearGrads,
        scratch: &RawLinearScratch,
    ) -> Result<()> {
        self.check_stream(stream)?;
        check_entropy_pass(pass, entropy_upstream)?;
        call.validate(opts)?;
        let (rows, v) = (call.shape.rows(), call.shape.vocab);
        let chunk = check_scratch(call, pass, grads, scratch, |chunk| {
            logits_bytes(rows, v, chunk, call.dtype.bytes())
        })?;
        let in_place = grads.in_place(call);
        let scheme = Scheme::of(pass, rows, chunk, self.linear_row_scheme_rows(), in_place);
        // An in-place gradient where the call could not write it so: only a `Fused` pass of the
        // row scheme can (the vocabulary-blocked backward reads every row for every block).
        if in_place && !scheme.row_grads {
            return Err(Error::InvalidOption(format!(
                "grads.hidden may be the call's hidden states only in a Fused pass whose chunks \
                 hold at least {} rows (or every row)",
                row_scheme_min_rows()
            )));
        }
        let block = vocab_block(rows, v, chunk);
        let plans = match pass {
            LinearPass::Backward { .. } => None,
            _ => Some(self.chunk_plans(call, opts, chunk)?),
        };
        let ones_len = if scheme.vocab_backward {
            rows
        } else {
            chunk.min(rows)
        };
        let Setup {
            entropy,
            buffers,
            bias_grad,
            ones,
            whole,
        } = self.linear_setup(
            stream,
            call,
            opts,
            pass,
            (out, entropy_upstream),
            grads,
            scratch,
            (ones_len, plans.map_or(0, |p| p.2), v),
        )?;
        let cu_stream = stream.cu_stream();
        // The row scheme's gradient GEMMs overlap on two streams (one side stream per handle,
        // held for the call), unless `grad_hidden` is written over the hidden states: then the
        // weight's GEMM (their last reader) runs before it on the call's stream.
        let side_guard = self.side_stream(stream, scheme.row_grads && !in_place, grads)?;
        let work = Work::new(
            blas,
            stream,
            call,
            chunk_options(opts),
            whole,
            scratch,
            grads,
            bias_grad,
            ones,
            side_guard.as_ref().and_then(|g| g.as_ref()),
        );

        // Every xent kernel the call launches is loaded before the first is launched, so that one
        // that cannot be loaded fails the call before anything is enqueued (a weight gradient
        // added to halfway, say).
        let chunk_plans = plans.map(|(full, last, _)| (full, last));
        let backward = (scheme.vocab_backward && rows > 0)
            .then(|| backward_kernel(&work.whole, &work.opts, entropy.is_some()));
        self.preload(
            chunk_plans
                .into_iter()
                .flat_map(|(full, last)| {
                    loss_kernels(&work.whole, &work.opts, &full, false, false)
                        .into_iter()
                        .chain(main_kernels(&work.whole, &work.opts, &last, false))
                })
                .chain([backward])
                .chain([(buffers.predicted != 0).then(|| argmax_kernel(&work.whole))])
                .chain([(buffers.entropy != 0).then(|| entropy_kernel(&work.whole))]),
        )?;
        // The loss (and, in the row scheme, the gradients) by chunks of rows.
        if !matches!(pass, LinearPass::Backward { .. }) {
            let (full, last, _) = plans.expect("planned for Forward and Fused");
            self.launch_count(stream, &work.whole, &work.opts, buffers.counts)?;
            for first in (0..rows).step_by(chunk) {
                let c = chunk.min(rows - first);
                let launch = if c == chunk { full } else { last };
                work.row_chunk(self, first, c, launch, &buffers, scheme.row_grads)?;
            }
            self.launch_finish(stream, rows, work.whole.weight != 0, &work.opts, &buffers)?;
        }
        // The gradients by blocks of the vocabulary, from the kept log-sum-exps.
        if scheme.vocab_backward && rows > 0 {
            let upstream = match pass {
                LinearPass::Backward { upstream } => upstream,
                _ => {
                    // The gradient of grad_scale · loss: an upstream of exactly 1.
                    unsafe {
                        cudarc::driver::sys::cuMemsetD32Async(
                            work.one,
                            1.0f32.to_bits(),
                            1,
                            cu_stream,
                        )
                        .result()?;
                    }
                    RawBuffer::new(work.one, 1)
                }
            };
            for v0 in (0..v).step_by(block) {
                let width = block.min(v - v0);
                work.vocab_block(self, v0, width, &buffers, upstream, entropy)?;
            }
        }
        Ok(())
    }

    /// What a linear call (the whole head's or a vocabulary shard's) sets up after its checks
    /// and plans, before anything is launched: a `Backward`'s inputs checked (its row
    /// log-sum-exps, counts, upstream, and the entropies with their upstream), the loss
    /// buffers (a forward's from `out` with `partials_len` f32 values of workspace), the bias
    /// gradient and its ones (`ones_len` of them), the labels (shifted once for a causal call)
    /// and the kernels' view of the call over `vocab` classes; with no rows, the gradients it
    /// overwrites zeroed.
    #[allow(clippy::too_many_arguments)]
    fn linear_setup(
        &self,
        stream: &Arc<CudaStream>,
        call: &RawLinearCall,
        opts: &Options,
        pass: LinearPass,
        (out, entropy_upstream): (&RawLoss, Option<RawBuffer>),
        grads: &RawLinearGrads,
        scratch: &RawLinearScratch,
        (ones_len, partials_len, vocab): (usize, usize, usize),
    ) -> Result<Setup> {
        let rows = call.shape.rows();
        let mut entropy = None;
        let buffers = match pass {
            LinearPass::Backward { upstream } => {
                check_len("row_lse", out.row_lse, rows)?;
                check_len("counts", out.counts, COUNT_WORDS)?;
                check_upstream_len(rows, upstream.len)?;
                entropy = entropy_pair(out.entropy, entropy_upstream, rows)?;
                LossBuffers {
                    loss: 0,
                    row_loss: 0,
                    row_lse: out.row_lse.ptr,
                    counts: out.counts.ptr,
                    extras: 0,
                    row_correct: 0,
                    predicted: 0,
                    entropy: 0,
                    partials: 0,
                    done_zeroed: false,
                }
            }
            _ => out.buffers(rows, opts, partials_len)?,
        };
        let bias_grad = grads.bias.filter(|_| pass != LinearPass::Forward);
        let ones = match (bias_grad, scratch.ones) {
            (None, _) => 0,
            (Some(_), Some(ones)) => {
                check_len("scratch.ones", ones, ones_len)?;
                ones.ptr
            }
            (Some(_), None) => {
                return Err(Error::InvalidOption(
                    "a bias gradient needs scratch.ones".to_string(),
                ));
            }
        };
        let cu_stream = stream.cu_stream();
        let labels = self.shifted_labels(call, opts, scratch, cu_stream)?;
        let whole = KernelCall {
            dtype: call.dtype,
            label: call.label_type.name(),
            logits: 0,
            labels,
            shape: Shape::flat(rows, vocab),
            weight: call.class_weight.map_or(0, |w| w.ptr),
        };
        // Overwritten gradients with no rows: zeros, as the sum over no rows.
        if rows == 0 && pass != LinearPass::Forward {
            unsafe { shard::zero_grads(grads, bias_grad, cu_stream) }?;
        }
        Ok(Setup {
            entropy,
            buffers,
            bias_grad,
            ones,
            whole,
        })
    }

    /// The handle's side stream for the gradient GEMMs, held for the call, where a pass writes
    /// both gradients by chunks of rows (`row_grads`) and overlapping is on; `None` otherwise.
    fn side_stream(
        &self,
        stream: &Arc<CudaStream>,
        row_grads: bool,
        grads: &RawLinearGrads,
    ) -> Result<Option<std::sync::MutexGuard<'_, Option<SideStream>>>> {
        if !(row_grads && grads.weight.is_some() && grads.hidden.is_some() && overlap_enabled()) {
            return Ok(None);
        }
        let mut guard = self.side.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(SideStream::new(stream.context())?);
        }
        Ok(Some(guard))
    }

    /// A causal call's labels shifted once for the whole call: `shifted[r] = labels[r + 1]`, the
    /// last position of each sequence ignored (one strided memset per 32-bit half of a label);
    /// the labels as given otherwise.
    fn shifted_labels(
        &self,
        call: &RawLinearCall,
        opts: &Options,
        scratch: &RawLinearScratch,
        cu_stream: cudarc::driver::sys::CUstream,
    ) -> Result<u64> {
        let shape = call.shape;
        let rows = shape.rows();
        let l_bytes = label_bytes(call.label_type);
        if !opts.causal_shift || rows == 0 {
            return Ok(call.labels.ptr);
        }
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
                let word = u32::from_le_bytes(ignore[4 * half..4 * half + 4].try_into().unwrap());
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
        Ok(shifted.ptr)
    }
}

/// A second stream for the weight gradient's GEMM, which runs beside the hidden states' (the
/// first is bound by memory traffic, the second by tensor cores), with the events that fork it
/// from the call's stream and join it back (capturable: the side stream joins the call's stream
/// before each chunk's logits are overwritten).
pub(crate) struct SideStream {
    ctx: Arc<cudarc::driver::CudaContext>,
    stream: cudarc::driver::sys::CUstream,
    fork: cudarc::driver::sys::CUevent,
    join: cudarc::driver::sys::CUevent,
}

// SAFETY: the handles are the driver's, usable from any thread with their context bound; the
// owner (`CrossEntropy::side`) hands them out under a mutex.
unsafe impl Send for SideStream {}

impl SideStream {
    fn new(ctx: &Arc<cudarc::driver::CudaContext>) -> Result<SideStream> {
        use cudarc::driver::result::{event, stream};
        ctx.bind_to_thread()?;
        let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        Ok(SideStream {
            ctx: ctx.clone(),
            stream: stream::create(stream::StreamKind::NonBlocking)?,
            fork: event::create(flags)?,
            join: event::create(flags)?,
        })
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        use cudarc::driver::result::{event, stream};
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: made by `new` in this context; nothing else holds them.
            unsafe {
                let _ = event::destroy(self.fork);
                let _ = event::destroy(self.join);
                let _ = stream::destroy(self.stream);
            }
        }
    }
}

/// Whether the row scheme overlaps its two gradient GEMMs on two streams: yes unless
/// `XENT_LINEAR_OVERLAP=0` (for measuring what the overlap gains).
fn overlap_enabled() -> bool {
    std::env::var_os("XENT_LINEAR_OVERLAP").is_none_or(|v| v != "0")
}

/// Bytes at the start of the GEMM workspace that a call keeps for itself (an upstream of 1).
const GEMM_HEADER_BYTES: usize = 256;

/// cuBLASLt's workspace with chunks of `logits` bytes: [`gemm_workspace_bytes`], unless
/// `XENT_GEMM_WORKSPACE` gives the bytes (at least the call's own [`GEMM_HEADER_BYTES`]), for
/// measuring what a smaller one costs (256-row chunks fit Liger's memory with at most 0.4 MiB).
fn workspace_for(logits: usize) -> usize {
    match std::env::var("XENT_GEMM_WORKSPACE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(bytes) => bytes.max(GEMM_HEADER_BYTES),
        None => gemm_workspace_bytes(logits),
    }
}

/// `XENT_CHUNK_ROWS=R` makes every chunk `R` rows (at most `rows`), whatever the budget, for
/// measuring chunkings that [`chunk_rows`]'s rounding to whole tiles would not pick.
fn chunk_override(rows: usize) -> Option<usize> {
    let r = std::env::var("XENT_CHUNK_ROWS")
        .ok()?
        .parse::<usize>()
        .ok()?;
    (r > 0).then(|| r.min(rows.max(1)))
}

impl CrossEntropy {
    /// This handle's card: its dense 16-bit tensor-core rate and memory bandwidth, from the
    /// device's attributes (`None` where its architecture's rate is not known here).
    pub fn card_rates(&self) -> Option<CardRates> {
        self.rates
    }

    /// The rows from which a `Fused` call's chunks take the row scheme on this handle's card
    /// (fewer take the gradients by blocks of the vocabulary): [`row_scheme_rows`] of
    /// [`card_rates`](Self::card_rates), 192 on an H200 and 282 on an H100 SXM. An in-place
    /// hidden-state gradient takes the row scheme from [`row_scheme_min_rows`] (192).
    pub fn linear_row_scheme_rows(&self) -> usize {
        row_scheme_rows(self.rates)
    }
}

/// What [`CrossEntropy::linear_setup`] gives a linear call: the backward's entropies and their
/// upstream (where asked for), the loss buffers, the bias gradient a pass writes and its ones,
/// and the kernels' view of the whole call.
struct Setup {
    entropy: Option<(u64, u64)>,
    buffers: LossBuffers,
    bias_grad: Option<RawGrad>,
    ones: u64,
    whole: KernelCall,
}

/// Refuses an upstream for the entropies outside a `Backward` pass.
fn check_entropy_pass(pass: LinearPass, entropy_upstream: Option<RawBuffer>) -> Result<()> {
    if entropy_upstream.is_some() && !matches!(pass, LinearPass::Backward { .. }) {
        return Err(Error::InvalidOption(
            "the entropies' gradient needs the backward pass (their upstream is known only then)"
                .to_string(),
        ));
    }
    Ok(())
}

/// The checks a linear call (the whole head's or a vocabulary shard's) makes of its gradients
/// and scratch once its inputs are valid: the gradients `pass` writes, a chunk of at least one
/// row, the chunks' logits (`logits_len(chunk)` bytes) and cuBLASLt's workspace. Returns the
/// chunk's rows.
fn check_scratch(
    call: &RawLinearCall,
    pass: LinearPass,
    grads: &RawLinearGrads,
    scratch: &RawLinearScratch,
    logits_len: impl Fn(usize) -> usize,
) -> Result<usize> {
    grads.validate(call, pass)?;
    let chunk = scratch.chunk_rows;
    if chunk == 0 {
        return Err(Error::InvalidOption("chunk_rows is 0".to_string()));
    }
    check_len("scratch.logits (bytes)", scratch.logits, logits_len(chunk))?;
    check_len(
        "scratch.gemm_workspace (bytes)",
        scratch.gemm_workspace,
        GEMM_HEADER_BYTES + 1,
    )?;
    Ok(chunk)
}

fn label_bytes(label_type: LabelType) -> usize {
    match label_type {
        LabelType::I32 => 4,
        LabelType::I64 => 8,
    }
}

/// Bytes of logits scratch: a chunk of rows, or a block of the vocabulary for every row.
fn logits_bytes(rows: usize, vocab: usize, chunk: usize, t_bytes: usize) -> usize {
    (chunk.min(rows.max(1)) * vocab).max(rows * vocab_block(rows, vocab, chunk)) * t_bytes
}

/// What the chunks and blocks of one call share.
struct Work<'a> {
    blas: &'a CublasLt,
    stream: &'a Arc<CudaStream>,
    call: &'a RawLinearCall,
    opts: Options,
    whole: KernelCall,
    logits: u64,
    one: u64,
    gemm: (u64, usize),
    grads: &'a RawLinearGrads,
    bias_grad: Option<RawGrad>,
    ones: u64,
    /// The side stream of the overlapped gradient GEMMs, when they overlap.
    side: Option<&'a SideStream>,
    /// The SMs each overlapped gradient GEMM plans for.
    sms: GradSms,
}

/// The SMs the two gradient GEMMs of a chunk plan for when they overlap on two streams (0: the
/// whole device): from `XENT_LINEAR_SMS=H,W` (`grad_hidden`'s, `grad_weight`'s), else 0 and 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GradSms {
    hidden: u32,
    weight: u32,
}

impl GradSms {
    fn from_env() -> GradSms {
        std::env::var("XENT_LINEAR_SMS").map_or(GradSms::default(), |text| GradSms::parse(&text))
    }

    /// `H,W`; a part that is missing or not a number is 0 (the whole device).
    fn parse(text: &str) -> GradSms {
        let mut parts = text
            .split(',')
            .map(|p| p.trim().parse::<u32>().unwrap_or(0));
        GradSms {
            hidden: parts.next().unwrap_or(0),
            weight: parts.next().unwrap_or(0),
        }
    }
}

impl<'a> Work<'a> {
    /// A call's work: `scratch`'s logits and workspace (its first bytes hold the upstream 1 of a
    /// fused call's blocked backward), and with `side` the gradient GEMMs overlapped on it.
    #[allow(clippy::too_many_arguments)]
    fn new(
        blas: &'a CublasLt,
        stream: &'a Arc<CudaStream>,
        call: &'a RawLinearCall,
        opts: Options,
        whole: KernelCall,
        scratch: &RawLinearScratch,
        grads: &'a RawLinearGrads,
        bias_grad: Option<RawGrad>,
        ones: u64,
        side: Option<&'a SideStream>,
    ) -> Work<'a> {
        Work {
            side,
            blas,
            stream,
            call,
            opts,
            whole,
            logits: scratch.logits.ptr,
            one: scratch.gemm_workspace.ptr,
            gemm: (
                scratch.gemm_workspace.ptr + GEMM_HEADER_BYTES as u64,
                scratch.gemm_workspace.len - GEMM_HEADER_BYTES,
            ),
            grads,
            bias_grad,
            ones,
            sms: if side.is_some() {
                GradSms::from_env()
            } else {
                GradSms::default()
            },
        }
    }
}

impl Work<'_> {
    fn matmul(&self, gemm: Gemm) -> Result<()> {
        // SAFETY: the operands were checked against the call's shape by the caller.
        unsafe { self.blas.matmul(self.stream.cu_stream(), &gemm, self.gemm) }
    }

    /// `gemm` on `stream`: with a side stream, in half of the workspace (`which`: 0 or 1), so that
    /// two GEMMs can run at once; without, in all of it.
    fn matmul_half(
        &self,
        stream: cudarc::driver::sys::CUstream,
        which: usize,
        gemm: Gemm,
        sms: u32,
    ) -> Result<()> {
        let workspace = self.workspace_half(which);
        // SAFETY: as `matmul`; the halves do not overlap.
        unsafe { self.blas.matmul_on_sms(stream, &gemm, workspace, sms) }
    }

    /// The workspace of a GEMM on stream `which` (0: the call's, 1: the side stream): with a
    /// side stream, half of cuBLASLt's workspace each (256-byte aligned); without, all of it.
    fn workspace_half(&self, which: usize) -> (u64, usize) {
        match self.side {
            Some(_) => {
                let half = self.gemm.1 / 2 / 256 * 256;
                (self.gemm.0 + (which * half) as u64, half)
            }
            None => self.gemm,
        }
    }

    fn t_bytes(&self) -> usize {
        self.call.dtype.bytes()
    }

    /// Rows `first..first + c`: their logits, xent's kernel on them (the loss, and with `grads`
    /// their gradient, which two GEMMs then take into the hidden states' and the weight's).
    fn row_chunk(
        &self,
        xent: &CrossEntropy,
        first: usize,
        c: usize,
        launch: plan::LaunchPlan,
        buffers: &LossBuffers,
        grads: bool,
    ) -> Result<()> {
        let v = self.call.shape.vocab;
        let hidden_rows = self.chunk_logits(first, c)?;
        let kernel_call = KernelCall {
            logits: self.logits,
            labels: self.whole.labels + (first * label_bytes(self.call.label_type)) as u64,
            shape: Shape::flat(c, v),
            ..self.whole
        };
        // Row `first` of a per-row output of `bytes`-byte elements (0: none).
        let at = |base: u64, bytes: u64| {
            if base == 0 {
                0
            } else {
                base + bytes * first as u64
            }
        };
        let chunk_buffers = LossBuffers {
            row_loss: at(buffers.row_loss, 4),
            row_lse: at(buffers.row_lse, 4),
            row_correct: at(buffers.row_correct, 4),
            predicted: at(buffers.predicted, 8),
            entropy: at(buffers.entropy, 4),
            ..*buffers
        };
        // The predicted tokens from the chunk's logits, before its gradient overwrites them.
        xent.launch_argmax(
            self.stream,
            &kernel_call,
            &self.opts,
            chunk_buffers.predicted,
        )?;
        // The entropies likewise.
        xent.launch_entropy(self.stream, &kernel_call, &self.opts, chunk_buffers.entropy)?;
        let mode = if grads { MODE_FUSED } else { MODE_FORWARD };
        xent.launch_main(
            self.stream,
            &kernel_call,
            &self.opts,
            launch,
            &chunk_buffers,
            mode,
            false,
        )?;
        if grads {
            self.chunk_grads(xent, first, c, hidden_rows)?;
        }
        Ok(())
    }

    /// Rows `first..first + c` of the logits, `h[chunk]·Wᵀ + b`, into the chunk's scratch; returns
    /// the address of the chunk's hidden states.
    pub(super) fn chunk_logits(&self, first: usize, c: usize) -> Result<u64> {
        let (d, v) = (self.call.shape.hidden, self.call.shape.vocab);
        let dtype = self.call.dtype;
        let hidden_rows = self.call.hidden.ptr + (first * d * self.t_bytes()) as u64;
        self.matmul(Gemm {
            a: matrix(hidden_rows, dtype, c, d, false),
            b: matrix(self.call.weight.ptr, dtype, v, d, true),
            out: matrix(self.logits, dtype, c, v, false),
            alpha: 1.0,
            beta: 0.0,
            bias: self.call.bias.map_or(0, |b| b.ptr),
        })?;
        Ok(hidden_rows)
    }

    /// The gradient GEMMs of rows `first..first + c`, from their gradient in the chunk's scratch
    /// (`hidden_rows`: their hidden states): `grad_hidden[chunk] = G·W`, `grad_weight (+)= Gᵀ·h`
    /// and `grad_bias (+)= Gᵀ·1`, on two streams where they overlap.
    pub(super) fn chunk_grads(
        &self,
        xent: &CrossEntropy,
        first: usize,
        c: usize,
        hidden_rows: u64,
    ) -> Result<()> {
        let (d, v) = (self.call.shape.hidden, self.call.shape.vocab);
        let dtype = self.call.dtype;
        let main = self.stream.cu_stream();
        if self.both_grads_in_one(xent, first, c, hidden_rows)? {
            return Ok(());
        }
        // The weight's (and bias's) gradient GEMMs go to the side stream when there is one: it
        // waits for the chunk's gradient, and the call's stream waits for it before the next
        // chunk's logits overwrite that gradient.
        let (weight_stream, which) = match self.side {
            Some(side) => unsafe {
                cudarc::driver::result::event::record(side.fork, main)?;
                cudarc::driver::result::stream::wait_event(
                    side.stream,
                    side.fork,
                    cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )?;
                (side.stream, 1)
            },
            None => (main, 0),
        };
        let beta = self.chunk_beta(first);
        // grad_weight (+)= Gᵀ·h[chunk]: cuBLASLt, or xent's own GEMM where it runs alone at short
        // chunks or is asked for (see `gemm_tn_for`).
        if let Some(grad_weight) = self.grads.weight {
            let (g, h, out) = (
                gemm_tn::Matrix::dense(self.logits, c, v),
                gemm_tn::Matrix::dense(hidden_rows, c, d),
                gemm_tn::Matrix::dense(grad_weight.buffer.ptr, v, d),
            );
            // Its tile counter: the first word of the weight stream's part of cuBLASLt's
            // workspace (unused by this GEMM), zeroed in stream order.
            let (counter, room) = self.workspace_half(which);
            if gemm_tn_for(xent, dtype, grad_weight.dtype, c, self.side.is_none())
                && gemm_tn::fits(&g, &h, &out)
                && room >= 4
            {
                // SAFETY: the chunk's gradient, its hidden states and the weight's gradient were
                // checked against the call's shape; the weight stream orders them as cuBLASLt's
                // GEMM would be, and the counter is that stream's alone.
                unsafe {
                    cudarc::driver::result::memset_d8_async(counter, 0, 4, weight_stream)?;
                    xent.gemm_tn_bf16_raw(
                        weight_stream,
                        g,
                        h,
                        out,
                        (1.0, beta),
                        counter,
                        self.sms.weight,
                    )
                }?;
            } else {
                self.matmul_half(
                    weight_stream,
                    which,
                    Gemm {
                        a: matrix(self.logits, dtype, c, v, true),
                        b: matrix(hidden_rows, dtype, c, d, false),
                        out: matrix(grad_weight.buffer.ptr, grad_weight.dtype, v, d, false),
                        alpha: 1.0,
                        beta,
                        bias: 0,
                    },
                    self.sms.weight,
                )?;
            }
        }
        // grad_bias (+)= Gᵀ·1.
        if let Some(gemm) = self.bias_grad_gemm(c, beta) {
            self.matmul_half(weight_stream, which, gemm, 0)?;
        }
        // grad_hidden[chunk] = G·W.
        if let Some(grad_hidden) = self.grads.hidden {
            self.matmul_half(
                main,
                0,
                Gemm {
                    a: matrix(self.logits, dtype, c, v, false),
                    b: matrix(self.call.weight.ptr, dtype, v, d, false),
                    out: matrix(
                        grad_hidden.buffer.ptr + (first * d * grad_hidden.dtype.bytes()) as u64,
                        grad_hidden.dtype,
                        c,
                        d,
                        false,
                    ),
                    alpha: 1.0,
                    beta: 0.0,
                    bias: 0,
                },
                self.sms.hidden,
            )?;
        }
        if let Some(side) = self.side {
            unsafe {
                cudarc::driver::result::event::record(side.join, side.stream)?;
                cudarc::driver::result::stream::wait_event(
                    main,
                    side.join,
                    cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )?;
            }
        }
        Ok(())
    }

    /// Both gradient GEMMs of rows `first..first + c` as one launch of xent's own kernel
    /// (`gemm_grads`, on the call's stream), where [`gemm_grads_for`] says so and the operands
    /// fit it (the bias's gradient, if any, after it on the same stream). False: nothing was
    /// enqueued, the caller takes the two-GEMM path.
    fn both_grads_in_one(
        &self,
        xent: &CrossEntropy,
        first: usize,
        c: usize,
        hidden_rows: u64,
    ) -> Result<bool> {
        let (d, v) = (self.call.shape.hidden, self.call.shape.vocab);
        let (Some(grad_weight), Some(grad_hidden)) = (self.grads.weight, self.grads.hidden) else {
            return Ok(false);
        };
        if self.grads.in_place(self.call) {
            return Ok(false); // one kernel reading rows while writing them
        }
        if grad_hidden.dtype != self.call.dtype {
            return Ok(false); // the kernel writes `grad_hidden` in the call's dtype
        }
        if !gemm_grads_for(xent, self.call.dtype, grad_weight.dtype) {
            return Ok(false);
        }
        let ops = gemm_tn::GradOperands {
            g: gemm_tn::Matrix::dense(self.logits, c, v),
            h: gemm_tn::Matrix::dense(hidden_rows, c, d),
            w: gemm_tn::Matrix::dense(self.call.weight.ptr, v, d),
            grad_weight: gemm_tn::Matrix::dense(grad_weight.buffer.ptr, v, d),
            grad_hidden: grad_hidden.buffer.ptr + (first * d * self.t_bytes()) as u64,
        };
        // The kernel's scratch is cuBLASLt's workspace, unused until the bias's GEMM after it;
        // splits of 2 where it holds their partial sums.
        let (scratch, room) = self.gemm;
        let sms = xent.limits().sm_count as usize;
        let wanted = std::env::var("XENT_GEMM_GRADS_SPLITS")
            .ok()
            .and_then(|text| text.parse::<u32>().ok())
            .filter(|&s| gemm_tn::splits_fit(s, v))
            .unwrap_or_else(|| gemm_tn::grads_splits(c, v, d, sms));
        // Whole tiles where the workspace cannot hold the split's partial sums.
        let (splits, (zeroed, needed)) = match gemm_tn::grads_scratch_bytes(c, d, wanted) {
            (_, bytes) if bytes > room => (1, gemm_tn::grads_scratch_bytes(c, d, 1)),
            sizes => (wanted, sizes),
        };
        if !ops.fit() || needed > room || !scratch.is_multiple_of(256) {
            return Ok(false);
        }
        let beta = self.chunk_beta(first);
        let main = self.stream.cu_stream();
        // SAFETY: every operand was checked against the call's shape; the call's stream orders
        // the chunk's gradient before and the next chunk's logits after, and the scratch's
        // counter and flags are zeroed in stream order.
        unsafe {
            cudarc::driver::result::memset_d8_async(scratch, 0, zeroed, main)?;
            xent.gemm_grads_bf16_raw(main, ops, beta, (scratch, splits), 0)?;
        }
        if let Some(gemm) = self.bias_grad_gemm(c, beta) {
            self.matmul(gemm)?;
        }
        Ok(true)
    }

    /// `beta` of the weight's (and bias's) gradient GEMMs of the chunk at row `first`: 1 (added
    /// to) when the call accumulates or after the first chunk, else 0 (written).
    fn chunk_beta(&self, first: usize) -> f32 {
        if self.grads.accumulate || first > 0 {
            1.0
        } else {
            0.0
        }
    }

    /// `grad_bias (+)= Gᵀ·1` over the chunk's `c` rows, when the call has a bias.
    fn bias_grad_gemm(&self, c: usize, beta: f32) -> Option<Gemm> {
        let (dtype, v) = (self.call.dtype, self.call.shape.vocab);
        self.bias_grad.map(|grad_bias| Gemm {
            a: matrix(self.logits, dtype, c, v, true),
            b: matrix(self.ones, dtype, c, 1, false),
            out: matrix(grad_bias.buffer.ptr, grad_bias.dtype, v, 1, false),
            alpha: 1.0,
            beta,
            bias: 0,
        })
    }

    /// Classes `v0..v0 + width` for every row: their logits, their gradient from the kept
    /// log-sum-exps times `upstream`, the block's weight (and bias) gradient written once, and
    /// the hidden states' gradient accumulated over the blocks.
    fn vocab_block(
        &self,
        xent: &CrossEntropy,
        v0: usize,
        width: usize,
        buffers: &LossBuffers,
        upstream: RawBuffer,
        entropy: Option<(u64, u64)>,
    ) -> Result<()> {
        let shape = self.call.shape;
        let (rows, d) = (shape.rows(), shape.hidden);
        let (dtype, t_bytes) = (self.call.dtype, self.t_bytes());
        let weight_rows = self.call.weight.ptr + (v0 * d * t_bytes) as u64;
        self.matmul(Gemm {
            a: matrix(self.call.hidden.ptr, dtype, rows, d, false),
            b: matrix(weight_rows, dtype, width, d, true),
            out: matrix(self.logits, dtype, rows, width, false),
            alpha: 1.0,
            beta: 0.0,
            bias: self.call.bias.map_or(0, |b| b.ptr + (v0 * t_bytes) as u64),
        })?;
        let kernel_call = KernelCall {
            logits: self.logits,
            ..self.whole
        };
        let upstream = (upstream.ptr, upstream.len);
        xent.launch_backward(
            self.stream,
            &kernel_call,
            &self.opts,
            buffers.counts,
            buffers.row_lse,
            upstream,
            0,
            Some((v0, width, width)),
            entropy,
        )?;
        let beta = if self.grads.accumulate { 1.0 } else { 0.0 };
        // grad_weight[block] (+)= Gᵀ·h, all rows at once.
        if let Some(grad_weight) = self.grads.weight {
            let at = grad_weight.buffer.ptr + (v0 * d * grad_weight.dtype.bytes()) as u64;
            self.matmul(Gemm {
                a: matrix(self.logits, dtype, rows, width, true),
                b: matrix(self.call.hidden.ptr, dtype, rows, d, false),
                out: matrix(at, grad_weight.dtype, width, d, false),
                alpha: 1.0,
                beta,
                bias: 0,
            })?;
        }
        if let Some(grad_bias) = self.bias_grad {
            let at = grad_bias.buffer.ptr + (v0 * grad_bias.dtype.bytes()) as u64;
            self.matmul(Gemm {
                a: matrix(self.logits, dtype, rows, width, true),
                b: matrix(self.ones, dtype, rows, 1, false),
                out: matrix(at, grad_bias.dtype, width, 1, false),
                alpha: 1.0,
                beta,
                bias: 0,
            })?;
        }
        // grad_hidden (+)= G·W[block].
        if let Some(grad_hidden) = self.grads.hidden {
            self.matmul(Gemm {
                a: matrix(self.logits, dtype, rows, width, false),
                b: matrix(weight_rows, dtype, width, d, false),
                out: matrix(grad_hidden.buffer.ptr, grad_hidden.dtype, rows, d, false),
                alpha: 1.0,
                beta: if v0 == 0 { 0.0 } else { 1.0 },
                bias: 0,
            })?;
        }
        Ok(())
    }
}

/// Device memory a typed linear + cross-entropy call works in, kept between calls (grown when a
/// call needs more): the chunk of logits, cuBLASLt's workspace, the shifted labels of a causal
/// call and a vector of ones (the bias gradient's GEMM).
pub struct LinearScratch {
    stream: Arc<CudaStream>,
    budget: Option<usize>,
    logits: Option<CudaSlice<u8>>,
    workspace: Option<CudaSlice<u8>>,
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
            workspace: None,
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
        let workspace = Self::reserve(&stream, &mut self.workspace, lens.gemm_workspace_bytes)?;
        Ok(RawLinearScratch {
            chunk_rows: lens.chunk_rows,
            logits,
            gemm_workspace: workspace,
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

/// The gradients a typed linear + cross-entropy call writes: `grad_hidden` (`[N, D]` of `H`,
/// overwritten), `grad_weight` (`[V, D]`, added to) and `grad_bias` (`[V]`, added to; with a bias
/// only), the last two of `G`; `H` and `G` each f32, or the call's element type itself.
pub type LinearGrads<'a, H, G> = (
    &'a mut CudaSlice<H>,
    &'a mut CudaSlice<G>,
    Option<&'a mut CudaSlice<G>>,
);

impl CrossEntropy {
    /// Linear layer + cross-entropy on the GPU: the loss of `logits = hidden·weightᵀ + bias`
    /// (`hidden` `[N, D]`, `weight` `[V, D]`, `bias` `[V]`, all of `T`) into `out`, and the
    /// gradients of `grad_scale · loss`: `grad_hidden` (`[N, D]` of f32 or `T`, overwritten),
    /// `grad_weight` (`[V, D]`) and `grad_bias` (`[V]`), both of f32 or `T` and added to
    /// (gradient accumulation; with `T` each chunk's sum is rounded to `T` once, so f32 is the
    /// more exact). The logits exist one chunk of rows at a time ([`chunk_rows`] under the
    /// scratch's budget); chunks under [`linear_row_scheme_rows`](Self::linear_row_scheme_rows)
    /// take the gradients by blocks of the vocabulary, where `grad_hidden` is a sum over the
    /// blocks: in f32 it rounds once (where the caller converts it), in `T` once a block. Every
    /// option of [`Options`] applies, the causal shift included.
    /// Enqueued on `stream`; nothing waits.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward_backward<T: Element, L: Label, G: Element, H: Element>(
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
        (grad_hidden, grad_weight, grad_bias): LinearGrads<'_, H, G>,
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
            hidden: Some(RawGrad {
                buffer: RawBuffer::of(stream, grad_hidden),
                dtype: H::DTYPE,
            }),
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

#[cfg(test)]
mod tests {
    use super::GradSms;

    #[test]
    fn grad_sms_reads_both_counts_and_takes_zero_for_what_is_missing_or_bad() {
        let sms = |hidden, weight| GradSms { hidden, weight };
        assert_eq!(GradSms::parse("88,44"), sms(88, 44));
        assert_eq!(GradSms::parse(" 66 , 66 "), sms(66, 66));
        assert_eq!(GradSms::parse("100"), sms(100, 0));
        assert_eq!(GradSms::parse("x,32"), sms(0, 32));
        assert_eq!(GradSms::parse(""), sms(0, 0));
    }
}
