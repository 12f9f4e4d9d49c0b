//! What a call enqueues: the kernels of its plan in order (count, the cross-entropy kernel(s),
//! finish; or one kernel that counts and finishes itself), each with its parameter block.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use super::CrossEntropy;
use crate::abi::{
    ArgmaxParams, COUNT_DONE, COUNT_WORDS, CountParams, EntropyParams, FinishParams, MODE_FUSED,
    RowsParams, SMEM_ENTROPY_BYTES, SMEM_REDUCTION_BYTES, ScaleParams, XentParams,
};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, XentKind, opt_params, variant};
#[cfg(doc)]
use crate::loss::Loss;
use crate::options::{DType, Options, Shape};
use crate::plan::{self, LaunchPlan};

impl CrossEntropy {
    /// Launches the two-phase backward kernel of `call` from a forward's `counts` and `row_lse`
    /// (device addresses), `upstream` = (address, length), the gradient `grad_delta` bytes from
    /// each logit (0: in place; a multiple of 16). Every address has been checked by the caller.
    /// With `slice` = `(start, len, row_stride)` the logits hold columns `[start, start + len)`
    /// of `call.shape.vocab`, `row_stride` elements apart, and only their gradient is written.
    /// With `entropy` = `(entropies, their upstream)` (device addresses of `[f32; rows]` each, the
    /// forward's entropies) the gradient of `Σ_r upstream_r·H_r` is added, by the `opt_` kernel.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_backward(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        counts: u64,
        row_lse: u64,
        upstream: (u64, usize),
        grad_delta: u64,
        slice: Option<(usize, usize, usize)>,
        entropy: Option<(u64, u64)>,
    ) -> Result<()> {
        let (upstream_ptr, upstream_len) = upstream;
        let shape = call.shape;
        opts.validate_except_weight_values(shape.vocab)?;
        let rows = shape.rows();
        crate::options::check_upstream_len(rows, upstream_len)?;
        if !grad_delta.is_multiple_of(16) {
            return Err(Error::InvalidOption(
                "the gradient buffer must start at the same address modulo 16 bytes as the logits"
                    .to_string(),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        // A slice of the vocabulary: its columns only, `row_stride` elements apart in memory.
        let (slice_start, slice_len, _) = slice.unwrap_or((0, 0, 0));
        let (columns, row_shape) = match slice {
            Some((start, len, row_stride)) => {
                if len == 0 || start + len > shape.vocab || row_stride < len {
                    return Err(Error::InvalidOption(format!(
                        "vocabulary slice [{start}, {}) of [0, {}) with rows {row_stride} apart",
                        start + len,
                        shape.vocab
                    )));
                }
                (
                    len,
                    Shape {
                        row_stride,
                        ..shape
                    },
                )
            }
            None => (shape.vocab, shape),
        };
        let (n_tiles, blocks) = plan::tile_grid(rows, columns)?;
        let params = XentParams {
            rows: self.rows_params(call.logits, call.labels, row_shape, opts),
            counts,
            row_loss: 0,
            row_lse,
            partials: 0,
            reduction: opts.reduction.code(),
            grad_scale: opts.grad_scale,
            n_chunks: n_tiles as u32,
            chunk_len: plan::SCALE_TILE as u32,
            mode: MODE_FUSED,
            upstream_per_row: (upstream_len == rows && rows > 1) as u32,
            grad_delta,
            upstream: upstream_ptr,
            opts: opt_params(opts, call.weight, 0),
            slice_start: slice_start as u32,
            slice_len: slice_len as u32,
            entropy: entropy.map_or(0, |e| e.0),
            entropy_upstream: entropy.map_or(0, |e| e.1),
            ..XentParams::default()
        };
        let kernel = backward_kernel(call, opts, entropy.is_some());
        self.preload([Some(kernel)])?;
        self.launch(
            stream,
            kernel,
            &params,
            blocks,
            plan::SCALE_THREADS,
            SMEM_REDUCTION_BYTES,
        )
    }

    pub(crate) fn rows_params(
        &self,
        logits: u64,
        labels: u64,
        shape: Shape,
        opts: &Options,
    ) -> RowsParams {
        RowsParams {
            logits,
            labels,
            n_rows: shape.rows() as u64,
            row_stride: shape.row_stride as u64,
            vocab: shape.vocab as u32,
            seq_len: if opts.causal_shift {
                shape.seq_len as u32
            } else {
                0
            },
            ignore_index: opts.ignore_index,
        }
    }

    /// Enqueues count, the cross-entropy kernel(s) of `launch_plan` in `mode` and finish for
    /// `call`, into `out`. Every address has been checked by the caller against the shape and the
    /// plan (`out.partials` holds [`plan::partials_len`] words, `out.row_correct` one word per row
    /// when `opts.return_token_accuracy`).
    pub(crate) fn launch_loss(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        launch_plan: LaunchPlan,
        out: &LossBuffers,
        mode: u32,
    ) -> Result<()> {
        let rows = call.shape.rows();
        let small = self.small_finish.load(Ordering::Relaxed)
            && plan::self_finish(rows, &launch_plan, opts, call.weight != 0);
        let small_kernel = self.small_kernel(rows, &launch_plan, opts, call.weight != 0, small);
        self.preload(loss_kernels(call, opts, &launch_plan, small, small_kernel))?;
        // The predicted tokens first: the fused modes write the gradient over the logits.
        self.launch_argmax(stream, call, opts, out.predicted)?;
        self.launch_entropy(stream, call, opts, out.entropy)?;
        if !small {
            self.launch_count(stream, call, opts, out.counts)?;
            self.launch_main(stream, call, opts, launch_plan, out, mode, false)?;
            return self.launch_finish(stream, rows, call.weight != 0, opts, out);
        }
        if !out.done_zeroed {
            // SAFETY: `out.counts` holds `COUNT_WORDS` words (checked by the caller).
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    out.counts + 4 * COUNT_DONE as u64,
                    0,
                    4,
                    stream.cu_stream(),
                )
            }?;
        }
        self.launch_main(stream, call, opts, launch_plan, out, mode, true)
    }

    /// Enqueues the count kernel over `call`'s labels (its logits unread) into `counts`, zeroed
    /// first unless the kernel's one block stores every word (few rows, or class weights).
    pub(crate) fn launch_count(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        counts: u64,
    ) -> Result<()> {
        let shape = call.shape;
        let rows = shape.rows();
        let weight = call.weight;
        let rows_params = self.rows_params(call.logits, call.labels, shape, opts);
        // With class weights one block sums them, in a fixed order.
        let (blocks, threads) = if weight != 0 {
            (1, plan::COUNT_WEIGHT_THREADS)
        } else {
            (plan::count_blocks(rows, self.limits), plan::COUNT_THREADS)
        };
        if rows == 0 || blocks > 1 {
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    counts,
                    0,
                    4 * COUNT_WORDS,
                    stream.cu_stream(),
                )
            }?;
        }
        if rows > 0 {
            let params = CountParams {
                rows: rows_params,
                counts,
                weight,
                sum_class_weights: (weight != 0 && opts.label_smoothing != 0.0) as u32,
                _pad: 0,
            };
            self.launch(
                stream,
                Kernel::Count { label: call.label },
                &params,
                blocks,
                threads,
                SMEM_REDUCTION_BYTES,
            )?;
        }
        Ok(())
    }

    /// Enqueues the cross-entropy kernel(s) of `launch_plan` over `call`'s rows, reading the
    /// counts of `out.counts` (which may cover more rows than `call`: a linear layer's chunk);
    /// with `self_finish` (a call that [`plan::self_finish`] allows) the kernel counts and finishes
    /// itself instead.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_main(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        launch_plan: LaunchPlan,
        out: &LossBuffers,
        mode: u32,
        self_finish: bool,
    ) -> Result<()> {
        let shape = call.shape;
        let rows = shape.rows();
        let weight = call.weight;
        let counts = out.counts;
        if rows > 0 {
            let rows_params = self.rows_params(call.logits, call.labels, shape, opts);
            let mut params = XentParams {
                rows: rows_params,
                counts,
                row_loss: out.row_loss,
                row_lse: out.row_lse,
                partials: out.partials,
                reduction: opts.reduction.code(),
                grad_scale: opts.grad_scale,
                n_chunks: 1,
                chunk_len: shape.vocab as u32,
                mode,
                upstream_per_row: 0,
                grad_delta: 0,
                upstream: 0,
                opts: opt_params(opts, weight, out.row_correct),
                self_finish: self_finish as u32,
                loss: out.loss,
                extras: out.extras,
                ..XentParams::default()
            };
            let kernel = |kind| xent_kernel(call, opts, kind);
            match launch_plan {
                LaunchPlan::Fused {
                    threads,
                    smem_bytes,
                } => {
                    self.launch(
                        stream,
                        kernel(XentKind::Fused),
                        &params,
                        rows as u32,
                        threads,
                        smem_bytes,
                    )?;
                }
                LaunchPlan::Chunked {
                    threads,
                    chunk_len,
                    n_chunks,
                } => {
                    params.n_chunks = n_chunks;
                    params.chunk_len = chunk_len;
                    let blocks = (rows * n_chunks as usize) as u32;
                    self.launch(
                        stream,
                        kernel(XentKind::ChunkPartial),
                        &params,
                        blocks,
                        threads,
                        SMEM_REDUCTION_BYTES,
                    )?;
                    self.launch(
                        stream,
                        kernel(XentKind::ChunkGrad),
                        &params,
                        blocks,
                        threads,
                        SMEM_REDUCTION_BYTES,
                    )?;
                }
                LaunchPlan::Cluster {
                    threads,
                    chunk_len,
                    size,
                    smem_bytes,
                } => {
                    params.n_chunks = size;
                    params.chunk_len = chunk_len;
                    let blocks = (rows * size as usize) as u32;
                    // A small call's kernel waits for the one before it in the kernel
                    // (`griddepcontrol.wait`), so its launch need not.
                    let pdl = self_finish && self.pdl.load(Ordering::Relaxed);
                    let small =
                        self.small_kernel(rows, &launch_plan, opts, weight != 0, self_finish);
                    self.launch_cluster(
                        stream,
                        kernel(cluster_kind(small)),
                        &params,
                        (blocks, threads, smem_bytes),
                        size,
                        pdl,
                    )?;
                }
                LaunchPlan::Split {
                    threads,
                    chunk_len,
                    n_chunks,
                    groups,
                    smem_bytes,
                    in_l2,
                } => {
                    params.n_chunks = n_chunks;
                    params.chunk_len = chunk_len;
                    // The groups' counters, after their summaries, start at 0.
                    let summaries = plan::split_slots(in_l2)
                        * crate::abi::PARTIAL_WORDS
                        * n_chunks as usize
                        * groups as usize;
                    // SAFETY: `out.partials` holds `partials_len` words (checked by the caller).
                    unsafe {
                        cudarc::driver::result::memset_d8_async(
                            out.partials + 4 * summaries as u64,
                            0,
                            4 * groups as usize,
                            stream.cu_stream(),
                        )?;
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (groups * n_chunks, 1, 1),
                        block_dim: (threads, 1, 1),
                        shared_mem_bytes: smem_bytes,
                    };
                    let function = self.kernel(kernel(split_kind(in_l2)))?;
                    // SAFETY: as in `launch`; the plan sized the grid to what is resident at once,
                    // and the driver refuses a cooperative launch that is not.
                    unsafe {
                        stream
                            .launch_builder(function)
                            .arg(&params)
                            .launch_cooperative(cfg)
                    }?;
                }
            }
        }
        Ok(())
    }

    /// Enqueues the predicted-tokens kernel over `call`'s logits into `out` (`[i64; rows]`; 0:
    /// nothing to do): before anything writes a gradient over them.
    pub(crate) fn launch_argmax(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        out: u64,
    ) -> Result<()> {
        let rows = call.shape.rows();
        if rows == 0 || out == 0 {
            return Ok(());
        }
        let params = ArgmaxParams {
            rows: self.rows_params(call.logits, call.labels, call.shape, opts),
            out,
        };
        self.launch_row_reader(
            stream,
            argmax_kernel(call),
            &params,
            rows,
            SMEM_REDUCTION_BYTES,
        )
    }

    /// Enqueues a kernel that reads each row of a call's logits once with a block a row
    /// (`xent_argmax_*`, `xent_entropy_*`, and their vocabulary-parallel shard kernels): loaded
    /// first, the grid a block a row capped per SM.
    pub(crate) fn launch_row_reader<P: cudarc::driver::DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        kernel: Kernel,
        params: &P,
        rows: usize,
        smem_bytes: u32,
    ) -> Result<()> {
        self.preload([Some(kernel)])?;
        self.launch(
            stream,
            kernel,
            params,
            plan::argmax_blocks(rows, self.limits),
            plan::ARGMAX_THREADS,
            smem_bytes,
        )
    }

    /// Enqueues the entropy kernel over `call`'s logits into `out` (`[f32; rows]`; 0: nothing to
    /// do): before anything writes a gradient over them.
    pub(crate) fn launch_entropy(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        out: u64,
    ) -> Result<()> {
        let rows = call.shape.rows();
        if rows == 0 || out == 0 {
            return Ok(());
        }
        let cap = opts.softcap.unwrap_or(0.0);
        let params = EntropyParams {
            rows: self.rows_params(call.logits, call.labels, call.shape, opts),
            out,
            softcap: cap,
            inv_softcap: if cap > 0.0 { 1.0 / cap } else { 0.0 },
        };
        self.launch_row_reader(
            stream,
            entropy_kernel(call),
            &params,
            rows,
            SMEM_ENTROPY_BYTES,
        )
    }

    /// Enqueues the finish kernel: the reduced loss of `rows` rows of `out`.
    pub(crate) fn launch_finish(
        &self,
        stream: &Arc<CudaStream>,
        rows: usize,
        weighted: bool,
        opts: &Options,
        out: &LossBuffers,
    ) -> Result<()> {
        let params = FinishParams {
            row_loss: out.row_loss,
            counts: out.counts,
            loss: out.loss,
            n_rows: rows as u64,
            reduction: opts.reduction.code(),
            weighted: weighted as u32,
            row_lse: out.row_lse,
            row_correct: out.row_correct,
            extras: out.extras,
            lse_square_scale: opts.lse_square_scale,
            _pad: 0,
        };
        self.launch(
            stream,
            Kernel::Finish,
            &params,
            1,
            plan::FINISH_THREADS,
            SMEM_REDUCTION_BYTES,
        )
    }

    /// Launches the scaling kernel over `grad` (`dtype`, checked against `shape` by the caller)
    /// with `upstream` = (address, length). Where a factor is exactly 1 the kernel returns without
    /// touching the gradient (see `kernels-gpu/src/scale.rs`).
    pub(crate) fn launch_scale(
        &self,
        stream: &Arc<CudaStream>,
        dtype: DType,
        grad: u64,
        shape: Shape,
        upstream: (u64, usize),
    ) -> Result<()> {
        let rows = shape.rows();
        crate::options::check_upstream_len(rows, upstream.1)?;
        if rows == 0 {
            return Ok(());
        }
        let (n_tiles, blocks) = plan::scale_grid(rows, shape.vocab, self.limits)?;
        let params = ScaleParams {
            grad,
            upstream: upstream.0,
            n_rows: rows as u64,
            row_stride: shape.row_stride as u64,
            vocab: shape.vocab as u32,
            per_row: (upstream.1 == rows && rows > 1) as u32,
            tile_len: plan::SCALE_TILE as u32,
            n_tiles: n_tiles as u32,
        };
        self.preload([Some(Kernel::Scale { dtype })])?;
        self.launch(
            stream,
            Kernel::Scale { dtype },
            &params,
            blocks,
            plan::SCALE_THREADS,
            0,
        )
    }
}

/// A cross-entropy call as the kernels see it: element and label types, device addresses (the
/// class weights' or 0), the shape.
pub(crate) struct KernelCall {
    pub dtype: DType,
    /// [`Label::NAME`](crate::Label::NAME) of the label type.
    pub label: &'static str,
    pub logits: u64,
    pub labels: u64,
    pub shape: Shape,
    pub weight: u64,
}

/// The device addresses of a call's outputs (see [`Loss`]): `row_correct` and `partials` are 0
/// when the call needs none.
pub(crate) struct LossBuffers {
    pub loss: u64,
    pub row_loss: u64,
    pub row_lse: u64,
    pub counts: u64,
    pub extras: u64,
    pub row_correct: u64,
    /// `[i64; rows]` of predicted tokens (`return_predicted_tokens`; 0: none).
    pub predicted: u64,
    /// `[f32; rows]` of entropies (`return_entropy`; 0: none).
    pub entropy: u64,
    pub partials: u64,
    /// Whether `counts[COUNT_DONE]` is known to be 0 (buffers xent allocated); otherwise a small
    /// call zeroes it first.
    pub done_zeroed: bool,
}

/// The cross-entropy kernel of `kind` for `call` with `opts` (its [`variant`]).
fn xent_kernel(call: &KernelCall, opts: &Options, kind: XentKind) -> Kernel {
    Kernel::Xent {
        kind,
        variant: variant(opts, call.weight != 0, opts.return_token_accuracy),
        dtype: call.dtype,
        label: call.label,
    }
}

/// The predicted-tokens kernel of `call` ([`CrossEntropy::launch_argmax`]).
pub(crate) fn argmax_kernel(call: &KernelCall) -> Kernel {
    Kernel::Argmax {
        dtype: call.dtype,
        label: call.label,
    }
}

/// The entropy kernel of `call` ([`CrossEntropy::launch_entropy`]).
pub(crate) fn entropy_kernel(call: &KernelCall) -> Kernel {
    Kernel::Entropy {
        dtype: call.dtype,
        label: call.label,
    }
}

/// The two-phase backward kernel of `call` with `opts` (it never counts the token accuracy);
/// `entropy`: with the gradient of the entropies, which only the per-element `opt_` kernel adds.
pub(crate) fn backward_kernel(call: &KernelCall, opts: &Options, entropy: bool) -> Kernel {
    Kernel::Xent {
        kind: XentKind::Backward,
        variant: if entropy {
            "opt_"
        } else {
            variant(opts, call.weight != 0, false)
        },
        dtype: call.dtype,
        label: call.label,
    }
}

/// The cluster plan's kernels: the small-call ones for a call that takes them
/// ([`CrossEntropy::small_kernel`]).
fn cluster_kind(small_kernel: bool) -> XentKind {
    if small_kernel {
        XentKind::ClusterSmall
    } else {
        XentKind::Cluster
    }
}

/// The cross-entropy kernels that [`CrossEntropy::launch_main`] launches for `launch_plan`
/// (`small_kernel`: the call takes the small-call kernels, [`CrossEntropy::small_kernel`]).
pub(crate) fn main_kernels(
    call: &KernelCall,
    opts: &Options,
    launch_plan: &LaunchPlan,
    small_kernel: bool,
) -> [Option<Kernel>; 2] {
    let kernel = |kind| Some(xent_kernel(call, opts, kind));
    match launch_plan {
        LaunchPlan::Fused { .. } => [kernel(XentKind::Fused), None],
        LaunchPlan::Chunked { .. } => [kernel(XentKind::ChunkPartial), kernel(XentKind::ChunkGrad)],
        LaunchPlan::Cluster { .. } => [kernel(cluster_kind(small_kernel)), None],
        LaunchPlan::Split { in_l2, .. } => [kernel(split_kind(*in_l2)), None],
    }
}

/// The kernel kind of a split plan (`in_l2`: the chunks left in L2).
pub(crate) fn split_kind(in_l2: bool) -> XentKind {
    if in_l2 {
        XentKind::SplitL2
    } else {
        XentKind::Split
    }
}

/// Every kernel [`CrossEntropy::launch_loss`] launches for `launch_plan`: count and finish
/// unless the call is `small` (it counts and finishes in its one kernel), and
/// [`main_kernels`].
pub(crate) fn loss_kernels(
    call: &KernelCall,
    opts: &Options,
    launch_plan: &LaunchPlan,
    small: bool,
    small_kernel: bool,
) -> [Option<Kernel>; 4] {
    let [first, second] = main_kernels(call, opts, launch_plan, small_kernel);
    [
        (!small).then_some(Kernel::Count { label: call.label }),
        first,
        second,
        (!small).then_some(Kernel::Finish),
    ]
}
