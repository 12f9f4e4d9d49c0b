//! Linear layer + cross-entropy (issue 12): the shape, the chunking of rows under a memory budget,
//! the f64 reference, and the GPU path (cuBLASLt GEMMs around xent's kernel, one chunk of logits
//! at a time), which has not run on a GPU yet.
//!
//! With hidden states `h: [N, D]`, the LM-head weight `W: [V, D]` and an optional bias `b: [V]`,
//! `logits = h·Wᵀ + b` and the loss is xent's of those logits with the same [`Options`]. With
//! `G = d loss / d logits` (`grad_scale` folded in, as xent writes it):
//! `grad_hidden = G·W` (`[N, D]`), `grad_weight = Gᵀ·h` (`[V, D]`), `grad_bias = Σ_rows G`.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::abi::MODE_FUSED;
use crate::cpu::{self, CpuLoss};
use crate::cublaslt::{CublasLt, Gemm, Operand};
use crate::cuda::{CrossEntropy, KernelCall, LossBuffers};
use crate::error::{Error, Result};
use crate::loss::Loss;
use crate::options::{DType, Element, Label, Options, Shape};
use crate::plan;

/// The hidden states as `[batch, seq_len]` rows of `hidden` features, scored against `vocab`
/// classes; rows and labels contiguous (the causal shift works on `[batch, seq_len]` as in
/// [`Shape::batched`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub batch: usize,
    pub seq_len: usize,
    pub hidden: usize,
    pub vocab: usize,
}

impl LinearShape {
    /// `[rows, hidden]` hidden states, one sequence.
    pub fn flat(rows: usize, hidden: usize, vocab: usize) -> LinearShape {
        LinearShape {
            batch: 1,
            seq_len: rows,
            hidden,
            vocab,
        }
    }

    /// Number of rows, `batch * seq_len` (saturating; `validate` rejects an overflow).
    pub fn rows(&self) -> usize {
        self.batch.saturating_mul(self.seq_len)
    }

    /// The logits' shape: `[batch, seq_len, vocab]`, contiguous.
    pub fn logits(&self) -> Shape {
        Shape::batched(self.batch, self.seq_len, self.vocab)
    }

    /// Checks the shape against the buffers' lengths (`bias` `None` without a bias).
    pub fn validate(
        &self,
        hidden_len: usize,
        weight_len: usize,
        bias_len: Option<usize>,
        labels_len: usize,
    ) -> Result<()> {
        if self.hidden == 0 {
            return Err(Error::BadShape("hidden size is 0".into()));
        }
        let rows = self
            .batch
            .checked_mul(self.seq_len)
            .ok_or_else(|| Error::BadShape("batch * seq_len overflows".into()))?;
        let product = |a: usize, b: usize, what: &str| {
            a.checked_mul(b)
                .ok_or_else(|| Error::BadShape(format!("{what} overflows")))
        };
        let need_hidden = product(rows, self.hidden, "rows * hidden")?;
        if hidden_len != need_hidden {
            return Err(Error::BadShape(format!(
                "hidden states hold {hidden_len} values, [{rows}, {}] needs {need_hidden}",
                self.hidden
            )));
        }
        let need_weight = product(self.vocab, self.hidden, "vocab * hidden")?;
        if weight_len != need_weight {
            return Err(Error::BadShape(format!(
                "the weight holds {weight_len} values, [{}, {}] needs {need_weight}",
                self.vocab, self.hidden
            )));
        }
        if let Some(len) = bias_len
            && len != self.vocab
        {
            return Err(Error::BadShape(format!(
                "the bias holds {len} values, it needs one per class ({})",
                self.vocab
            )));
        }
        self.logits().validate(rows * self.vocab, labels_len)
    }
}

/// The default memory budget for one chunk of logits: an eighth of the whole `[N, V]` logits
/// (the target: at most 1/8 of the unfused path's extra memory), and at least
/// [`MIN_CHUNK_BYTES`], so that a chunk keeps the GEMMs large enough to run at speed.
pub const DEFAULT_BUDGET_FRACTION: usize = 8;
/// The smallest default chunk budget: 64 MiB holds 256 rows of a 128256-class bf16 vocabulary
/// (Liger's chunk).
pub const MIN_CHUNK_BYTES: usize = 64 << 20;

/// Rows per chunk of logits for `rows` rows of `vocab` classes of `dtype` under `budget_bytes`
/// (`None`: the default, [`DEFAULT_BUDGET_FRACTION`] of the whole logits but at least
/// [`MIN_CHUNK_BYTES`]): the most rows whose logits fit, at least 1 and at most `rows`, rounded
/// down to a multiple of 8 when more than 8 fit (tensor-core tiles).
pub fn chunk_rows(rows: usize, vocab: usize, dtype: DType, budget_bytes: Option<usize>) -> usize {
    let row_bytes = vocab.saturating_mul(dtype.bytes()).max(1);
    let budget = budget_bytes.unwrap_or_else(|| {
        (rows.saturating_mul(row_bytes) / DEFAULT_BUDGET_FRACTION).max(MIN_CHUNK_BYTES)
    });
    let fit = (budget / row_bytes).max(1);
    let fit = if fit > 8 { fit / 8 * 8 } else { fit };
    fit.min(rows.max(1))
}

/// The results of the reference: the loss (as [`cpu::forward_backward`] reports it) and the
/// gradients, unrounded.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuLinear {
    pub loss: CpuLoss,
    /// `[N, D]`.
    pub grad_hidden: Vec<f64>,
    /// `[V, D]`.
    pub grad_weight: Vec<f64>,
    /// `[V]`, with a bias.
    pub grad_bias: Option<Vec<f64>>,
}

/// The f64 reference of linear + cross-entropy: logits `h·Wᵀ + b` in f64 (not rounded to `T`),
/// xent's CPU reference on them (every option, the causal shift), then the gradients of the
/// hidden states, the weight and the bias. O(N·V·D): for tests and small shapes.
pub fn cpu_forward_backward<T: Element, L: Label>(
    hidden: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    labels: &[L],
    shape: LinearShape,
    opts: &Options,
) -> Result<CpuLinear> {
    shape.validate(
        hidden.len(),
        weight.len(),
        bias.map(<[T]>::len),
        labels.len(),
    )?;
    let (rows, d, v) = (shape.rows(), shape.hidden, shape.vocab);
    let h = |r: usize, k: usize| hidden[r * d + k].to_f64();
    let w = |j: usize, k: usize| weight[j * d + k].to_f64();
    let mut logits = vec![0.0f64; rows * v];
    for r in 0..rows {
        for j in 0..v {
            let dot: f64 = (0..d).map(|k| h(r, k) * w(j, k)).sum();
            logits[r * v + j] = dot + bias.map_or(0.0, |b| b[j].to_f64());
        }
    }
    // The gradient of the logits, written over them (f64: not rounded).
    let loss = cpu::forward_backward_upstream(&mut logits, labels, shape.logits(), opts, &[1.0])?;
    let g = &logits;
    let mut grad_hidden = vec![0.0f64; rows * d];
    let mut grad_weight = vec![0.0f64; v * d];
    for r in 0..rows {
        for j in 0..v {
            let gij = g[r * v + j];
            if gij == 0.0 {
                continue;
            }
            for k in 0..d {
                grad_hidden[r * d + k] += gij * w(j, k);
                grad_weight[j * d + k] += gij * h(r, k);
            }
        }
    }
    let grad_bias = bias.map(|_| {
        (0..v)
            .map(|j| (0..rows).map(|r| g[r * v + j]).sum())
            .collect()
    });
    Ok(CpuLinear {
        loss,
        grad_hidden,
        grad_weight,
        grad_bias,
    })
}

/// Device memory a linear + cross-entropy call works in, kept between calls (grown when a call
/// needs more): the chunk of logits, cuBLASLt's workspace, the shifted labels of a causal call
/// and a vector of ones (the bias gradient's GEMM).
pub struct LinearScratch {
    stream: Arc<CudaStream>,
    budget: Option<usize>,
    logits: Option<CudaSlice<u8>>,
    workspace: CudaSlice<u8>,
    labels: Option<CudaSlice<u8>>,
    ones: Option<CudaSlice<u8>>,
}

/// cuBLASLt's workspace: 32 MiB, NVIDIA's advice for Hopper.
pub const GEMM_WORKSPACE_BYTES: usize = 32 << 20;

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
        })
    }

    /// `slot` holding at least `bytes` (allocated anew when smaller), and its address.
    fn reserve(
        stream: &Arc<CudaStream>,
        slot: &mut Option<CudaSlice<u8>>,
        bytes: usize,
    ) -> Result<u64> {
        if slot.as_ref().is_none_or(|s| s.len() < bytes) {
            *slot = Some(stream.alloc_zeros(bytes.max(1))?);
        }
        let buffer = slot.as_mut().expect("reserved above");
        Ok(buffer.device_ptr_mut(stream).0)
    }
}

/// The options the chunks' kernels run with: `opts`' values without the class weights (the
/// kernels read them from device memory) and without the causal shift (a causal call's labels
/// are shifted once beforehand).
fn chunk_options(opts: &Options) -> Options {
    Options {
        ignore_index: opts.ignore_index,
        reduction: opts.reduction,
        grad_scale: opts.grad_scale,
        causal_shift: false,
        plan: opts.plan,
        label_smoothing: opts.label_smoothing,
        lse_square_scale: opts.lse_square_scale,
        softcap: opts.softcap,
        weight: None,
        return_token_accuracy: opts.return_token_accuracy,
    }
}

impl CrossEntropy {
    /// Linear layer + cross-entropy on the GPU: the loss of `logits = hidden·weightᵀ + bias`
    /// (`hidden` `[N, D]`, `weight` `[V, D]`, `bias` `[V]`, all of `T`) into `out`, and the
    /// gradients of `grad_scale · loss`: `grad_hidden` (`[N, D]` of `T`, overwritten),
    /// `grad_weight` (`[V, D]` f32) and `grad_bias` (`[V]` f32), both added to (gradient
    /// accumulation). The logits exist one chunk of rows at a time ([`chunk_rows`] under the
    /// scratch's budget): per chunk, a cuBLASLt GEMM writes them, xent's kernel turns them into
    /// their gradient in place, two GEMMs take the hidden states' and the weight's gradients
    /// from it. Every option of [`Options`] applies, the causal shift included. Enqueued on
    /// `stream`; nothing waits.
    ///
    /// Not yet run on a GPU (session 5 had no device time left): `tests/linear.rs` checks it
    /// against the f64 reference first thing.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward_backward<T: Element, L: Label>(
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
        (grad_hidden, grad_weight, grad_bias): LinearGrads<'_, T>,
        scratch: &mut LinearScratch,
        out: &mut Loss,
    ) -> Result<()> {
        self.check_stream(stream)?;
        shape.validate(
            hidden.len(),
            weight.len(),
            bias.map(|b| b.len()),
            labels.len(),
        )?;
        shape.validate(grad_hidden.len(), grad_weight.len(), None, labels.len())?;
        match (bias.is_some(), grad_bias.as_ref().map(|g| g.len())) {
            (true, Some(len)) if len == shape.vocab => {}
            (false, None) => {}
            _ => {
                return Err(Error::BadShape(
                    "grad_bias must hold one value per class exactly when there is a bias"
                        .to_string(),
                ));
            }
        }
        opts.validate_except_weight_values(shape.vocab)?;
        let rows = shape.rows();
        if out.rows != rows {
            return Err(Error::InvalidOption(format!(
                "the Loss buffers hold {} rows, the shape has {rows}",
                out.rows
            )));
        }
        let (v, d) = (shape.vocab, shape.hidden);
        let (t_bytes, l_bytes) = (T::DTYPE.bytes(), std::mem::size_of::<L>());
        let lopts = chunk_options(opts);
        let weighted = opts.weight.is_some();
        out.prepare(stream, opts)?;

        let cu_stream = stream.cu_stream();
        let (hidden_ptr, _h) = hidden.device_ptr(stream);
        let (weight_ptr, _w) = weight.device_ptr(stream);
        let bias_ptr = bias.map_or(0, |b| b.device_ptr(stream).0);
        let (labels_ptr, _l) = labels.device_ptr(stream);
        let (grad_hidden_ptr, _gh) = grad_hidden.device_ptr_mut(stream);
        let (grad_weight_ptr, _gw) = grad_weight.device_ptr_mut(stream);
        let grad_bias_ptr = grad_bias.map_or(0, |g| g.device_ptr_mut(stream).0);

        // The causal shift, once for the whole call: shifted[r] = labels[r + 1], and the last
        // position of each sequence ignored (one strided memset per 32-bit half of a label).
        let labels_ptr = if opts.causal_shift && rows > 0 {
            let shifted =
                LinearScratch::reserve(&scratch.stream, &mut scratch.labels, rows * l_bytes)?;
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    shifted,
                    labels_ptr + l_bytes as u64,
                    (rows - 1) * l_bytes,
                    cu_stream,
                )?;
                let ignore = opts.ignore_index.to_le_bytes();
                for half in 0..l_bytes / 4 {
                    let word =
                        u32::from_le_bytes(ignore[4 * half..4 * half + 4].try_into().unwrap());
                    cudarc::driver::sys::cuMemsetD2D32Async(
                        shifted + ((shape.seq_len - 1) * l_bytes + 4 * half) as u64,
                        shape.seq_len * l_bytes,
                        word,
                        1,
                        shape.batch,
                        cu_stream,
                    )
                    .result()?;
                }
            }
            shifted
        } else {
            labels_ptr
        };

        // Every chunk's plan, and the partial sums the largest needs (the last chunk may be
        // smaller, and a chunked plan takes more chunks per row for fewer rows).
        let chunk = chunk_rows(rows, v, T::DTYPE, scratch.budget);
        let plan_of = |c: usize| self.plan_variant(&Shape::flat(c, v), T::DTYPE, &lopts, weighted);
        let full = plan_of(chunk)?;
        let last = match rows % chunk {
            0 => full,
            rest => plan_of(rest)?,
        };
        let partials_len =
            plan::partials_len(chunk, &full).max(plan::partials_len(rows % chunk, &last));
        out.reserve_partials(stream, partials_len)?;
        let partials = match out.partials.as_mut() {
            Some(p) if partials_len > 0 => p.device_ptr_mut(stream).0,
            _ => 0,
        };
        let (counts, _c) = out.counts.device_ptr_mut(stream);
        let (row_loss, _rl) = out.row_loss.device_ptr_mut(stream);
        let (row_lse, _rs) = out.row_lse.device_ptr_mut(stream);
        let (loss, _lo) = out.loss.device_ptr_mut(stream);
        let (extras, _e) = out.extras.device_ptr_mut(stream);
        let weight_dev = match (weighted, out.weight.as_mut()) {
            (true, Some(w)) => w.device_ptr_mut(stream).0,
            _ => 0,
        };
        let row_correct = match (opts.return_token_accuracy, out.row_correct.as_mut()) {
            (true, Some(c)) => c.device_ptr_mut(stream).0,
            _ => 0,
        };
        let whole = KernelCall {
            dtype: T::DTYPE,
            label: L::NAME,
            logits: 0,
            labels: labels_ptr,
            shape: Shape::flat(rows, v),
            weight: weight_dev,
        };
        self.launch_count(stream, &whole, &lopts, counts)?;

        let logits =
            LinearScratch::reserve(&scratch.stream, &mut scratch.logits, chunk * v * t_bytes)?;
        // A vector of ones for the bias gradient's GEMM, made when the scratch first needs one
        // this long (the only upload; calls after it are capturable).
        let ones = if grad_bias_ptr != 0 {
            if scratch
                .ones
                .as_ref()
                .is_none_or(|o| o.len() < chunk * t_bytes)
            {
                let one = T::from_f64(1.0);
                // SAFETY: an element type is plain data of `t_bytes` bytes.
                let one =
                    unsafe { std::slice::from_raw_parts((&one as *const T).cast::<u8>(), t_bytes) };
                let bytes: Vec<u8> = one.iter().copied().cycle().take(chunk * t_bytes).collect();
                scratch.ones = Some(stream.clone_htod(&bytes)?);
            }
            let ones = scratch.ones.as_mut().expect("made above");
            ones.device_ptr_mut(stream).0
        } else {
            0
        };
        let (workspace, _ws) = scratch.workspace.device_ptr_mut(stream);
        let workspace = (workspace, GEMM_WORKSPACE_BYTES);
        let matrix = |ptr: u64, dtype, rows, cols, transposed| Operand {
            ptr,
            dtype,
            rows,
            cols,
            ld: cols,
            transposed,
        };
        for first in (0..rows).step_by(chunk) {
            let c = chunk.min(rows - first);
            let hidden_rows = hidden_ptr + (first * d * t_bytes) as u64;
            // 1. The chunk's logits: h·Wᵀ (+ bias).
            let gemm = Gemm {
                a: matrix(hidden_rows, T::DTYPE, c, d, false),
                b: matrix(weight_ptr, T::DTYPE, v, d, true),
                out: matrix(logits, T::DTYPE, c, v, false),
                alpha: 1.0,
                beta: 0.0,
                bias: bias_ptr,
            };
            unsafe { blas.matmul(cu_stream, &gemm, workspace) }?;
            // 2. xent's kernel: the loss of the chunk's rows, their gradient over the logits.
            let call = KernelCall {
                logits,
                labels: labels_ptr + (first * l_bytes) as u64,
                shape: Shape::flat(c, v),
                ..whole
            };
            let launch = if c == chunk { full } else { last };
            let at = |base: u64| base + 4 * first as u64;
            let buffers = LossBuffers {
                loss,
                row_loss: at(row_loss),
                row_lse: at(row_lse),
                counts,
                extras,
                row_correct: if row_correct != 0 { at(row_correct) } else { 0 },
                partials,
            };
            self.launch_main(stream, &call, &lopts, launch, &buffers, MODE_FUSED)?;
            // 3. grad_hidden[chunk] = G·W.
            let gemm = Gemm {
                a: matrix(logits, T::DTYPE, c, v, false),
                b: matrix(weight_ptr, T::DTYPE, v, d, false),
                out: matrix(
                    grad_hidden_ptr + (first * d * t_bytes) as u64,
                    T::DTYPE,
                    c,
                    d,
                    false,
                ),
                alpha: 1.0,
                beta: 0.0,
                bias: 0,
            };
            unsafe { blas.matmul(cu_stream, &gemm, workspace) }?;
            // 4. grad_weight += Gᵀ·h[chunk].
            let gemm = Gemm {
                a: matrix(logits, T::DTYPE, c, v, true),
                b: matrix(hidden_rows, T::DTYPE, c, d, false),
                out: matrix(grad_weight_ptr, DType::F32, v, d, false),
                alpha: 1.0,
                beta: 1.0,
                bias: 0,
            };
            unsafe { blas.matmul(cu_stream, &gemm, workspace) }?;
            // 5. grad_bias += Gᵀ·1.
            if grad_bias_ptr != 0 {
                let gemm = Gemm {
                    a: matrix(logits, T::DTYPE, c, v, true),
                    b: matrix(ones, T::DTYPE, c, 1, false),
                    out: matrix(grad_bias_ptr, DType::F32, v, 1, false),
                    alpha: 1.0,
                    beta: 1.0,
                    bias: 0,
                };
                unsafe { blas.matmul(cu_stream, &gemm, workspace) }?;
            }
        }
        let buffers = LossBuffers {
            loss,
            row_loss,
            row_lse,
            counts,
            extras,
            row_correct,
            partials: 0,
        };
        self.launch_finish(stream, rows, weighted, &lopts, &buffers)
    }
}

/// The gradients a linear + cross-entropy call writes: `grad_hidden` (`[N, D]` of `T`,
/// overwritten), `grad_weight` (`[V, D]` f32, added to), `grad_bias` (`[V]` f32, added to; with a
/// bias only).
pub type LinearGrads<'a, T> = (
    &'a mut CudaSlice<T>,
    &'a mut CudaSlice<f32>,
    Option<&'a mut CudaSlice<f32>>,
);
