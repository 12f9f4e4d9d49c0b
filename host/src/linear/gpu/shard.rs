//! Linear + cross-entropy with the LM head split by vocabulary (a tensor-parallel head: Megatron's
//! column-parallel output layer, verl's `linear_cross_entropy(..., dist_process_group)`): each
//! rank holds the rows `[start, start + V_r)` of the weight and never more than a chunk of its
//! own logits. Per chunk of rows, a GEMM writes the chunk's logits over the rank's classes, step 1
//! of the vocabulary-parallel protocol ([`crate::vocab_parallel`]) summarises them, one
//! all-gather of those summaries (a few values a row a rank) gives every rank the whole
//! vocabulary's, step 3 writes the chunk's loss and its gradient over the logits, and the two
//! gradient GEMMs take `grad_weight` (this rank's rows, complete) and `grad_hidden` (this rank's
//! part: the sum over the ranks is the gradient, the caller's all-reduce, as Megatron's
//! column-parallel linear does in its backward). The labels are counted once for the whole call
//! and the loss finished once, so the mean divides by the whole call's count.
//!
//! A two-phase backward ([`LinearPass::Backward`]) takes the forward's counts and log-sum-exps
//! (the whole vocabulary's) and recomputes each chunk's logits: no collective.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::{
    LinearPass, LinearScratchLens, RawLinearCall, RawLinearGrads, RawLinearScratch, Setup, Work,
    check_entropy_pass, check_scratch, chunk_options, chunk_override, label_bytes, workspace_for,
};
use crate::cublaslt::CublasLt;
use crate::cuda::{CrossEntropy, KernelCall, LossBuffers, backward_kernel};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, XentKind};
use crate::linear::shard_chunk_rows;
use crate::options::{Options, Shape};
use crate::raw::{RawBuffer, RawLoss, check_len};
use crate::vocab_parallel::{Collective, Shard, ShardCall};

/// One rank's part of a linear + cross-entropy call whose LM head is split by vocabulary:
/// `linear` with this rank's rows of the weight (`[V_r, D]`) and of the bias (`[V_r]`),
/// `linear.shape.vocab` = `V_r`, and the class weights of the whole vocabulary (`[f32; vocab]`);
/// the rank's classes are `start..start + V_r` of `vocab`. The hidden states and labels are the
/// whole call's, the same on every rank.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawLinearShardCall {
    pub linear: RawLinearCall,
    pub start: usize,
    pub vocab: usize,
}

/// The scratch of a [`RawLinearShardCall`]: the linear path's (`linear`, where
/// `loss_workspace_len` is 0: the collective's buffers hold the partial sums), and the f32
/// values each rank sends per chunk at most (`gather_words`; the receive buffer holds `world`
/// times as many; 0 for a `Backward` pass, which gathers nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShardScratchLens {
    pub linear: LinearScratchLens,
    pub gather_words: usize,
}

impl RawLinearShardCall {
    fn shard(&self) -> Shard {
        Shard {
            start: self.start,
            width: self.linear.shape.vocab,
        }
    }

    fn validate(&self, opts: &Options) -> Result<()> {
        let call = &self.linear;
        call.shape.validate(
            call.hidden.len,
            call.weight.len,
            call.bias.map(|b| b.len),
            call.labels.len,
        )?;
        let width = call.shape.vocab;
        if width == 0
            || self
                .start
                .checked_add(width)
                .is_none_or(|end| end > self.vocab)
        {
            return Err(Error::InvalidOption(format!(
                "the shard [{}, {}) is not inside the vocabulary [0, {})",
                self.start,
                self.start.saturating_add(width),
                self.vocab
            )));
        }
        if opts.weight.is_some() {
            return Err(Error::InvalidOption(
                "a raw call takes class weights in device memory (RawLinearCall::class_weight), \
                 not in Options::weight"
                    .to_string(),
            ));
        }
        opts.validate(self.vocab)?;
        if let Some(weight) = call.class_weight
            && weight.len != self.vocab
        {
            return Err(Error::InvalidOption(format!(
                "class weights hold {} values, the vocabulary has {} (one weight per class, every \
                 rank the whole vocabulary's)",
                weight.len, self.vocab
            )));
        }
        Ok(())
    }

    /// Rows `first..first + c` of the call as step 1 and 3 take them: the chunk's logits in
    /// `logits`, the (shifted) labels at `labels`.
    fn chunk(&self, logits: u64, labels: u64, first: usize, c: usize) -> ShardCall {
        let call = &self.linear;
        let width = call.shape.vocab;
        ShardCall {
            logits: RawBuffer::new(logits, c * width),
            dtype: call.dtype,
            labels: RawBuffer::new(labels + (first * label_bytes(call.label_type)) as u64, c),
            label_type: call.label_type,
            shape: Shape::flat(c, width),
            shard: self.shard(),
            vocab: self.vocab,
            weight: call.class_weight,
        }
    }
}

/// Row `first` of a per-row output of `bytes`-byte elements (0: none).
fn row_at(base: u64, bytes: u64, first: usize) -> u64 {
    if base == 0 {
        0
    } else {
        base + bytes * first as u64
    }
}

impl CrossEntropy {
    /// The scratch a [`RawLinearShardCall`] over `world` ranks needs for `pass`, with chunks of
    /// logits of at most `budget_bytes` (`None`: the default of [`shard_chunk_rows`], the same on
    /// every rank).
    pub fn raw_linear_shard_scratch_lens(
        &self,
        call: &RawLinearShardCall,
        world: usize,
        opts: &Options,
        pass: LinearPass,
        budget_bytes: Option<usize>,
    ) -> Result<LinearShardScratchLens> {
        call.validate(opts)?;
        let linear = &call.linear;
        let (rows, width) = (linear.shape.rows(), linear.shape.vocab);
        let chunk = chunk_override(rows).unwrap_or_else(|| {
            shard_chunk_rows(rows, call.vocab, world, linear.dtype, budget_bytes)
        });
        let gather_words = match pass {
            LinearPass::Backward { .. } => 0,
            _ => {
                let lopts = chunk_options(opts);
                self.shard_layout(chunk.min(rows), call.vocab, world, linear.dtype, &lopts)?
                    .words
            }
        };
        let logits = chunk.min(rows.max(1)) * width * linear.dtype.bytes();
        Ok(LinearShardScratchLens {
            linear: LinearScratchLens {
                chunk_rows: chunk,
                logits_bytes: logits,
                gemm_workspace_bytes: workspace_for(logits),
                labels_bytes: if opts.causal_shift {
                    rows * label_bytes(linear.label_type)
                } else {
                    0
                },
                ones_len: if linear.bias.is_some() && pass != LinearPass::Forward {
                    chunk.min(rows).max(1)
                } else {
                    0
                },
                loss_workspace_len: 0,
            },
            gather_words,
        })
    }

    /// Linear layer + cross-entropy over this rank's shard of the LM head, as
    /// [`raw_linear_with_entropy`](Self::raw_linear_with_entropy) over the whole head: `pass`
    /// over `logits = hidden·weight_rᵀ + bias_r` by chunks of `scratch.chunk_rows` rows, with
    /// `comm`'s all-gather of each chunk's summaries (`gather`: `send` of the lens'
    /// `gather_words` and `recv` of `world` times as many f32 values). The loss, per-row outputs,
    /// token accuracy, predicted tokens and entropies in `out` are the whole vocabulary's and the
    /// same on every rank. `grads.weight` and `grads.bias` are this rank's rows' (complete);
    /// `grads.hidden` is this rank's part of the hidden states' gradient: their sum over the
    /// ranks is the gradient (the caller's all-reduce). Every option of [`Options`] applies, the
    /// causal shift included. A `Backward` pass (from a `Forward` of the same call: its `counts`,
    /// `row_lse` and entropies) recomputes the chunks' logits and calls no collective (`comm`
    /// unused). Enqueued on `stream`, the collective included; nothing allocates or waits.
    ///
    /// # Safety
    /// As [`raw_linear`](Self::raw_linear), for `gather` too; every rank of `comm` makes the same
    /// call (rows, options and chunking), in the same order as its other collectives.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn raw_linear_vocab_parallel(
        &self,
        blas: &CublasLt,
        stream: &Arc<CudaStream>,
        comm: &dyn Collective,
        call: &RawLinearShardCall,
        opts: &Options,
        pass: LinearPass,
        out: &RawLoss,
        entropy_upstream: Option<RawBuffer>,
        grads: &RawLinearGrads,
        scratch: &RawLinearScratch,
        (send, recv): (RawBuffer, RawBuffer),
    ) -> Result<()> {
        self.check_stream(stream)?;
        let backward = matches!(pass, LinearPass::Backward { .. });
        check_entropy_pass(pass, entropy_upstream)?;
        call.validate(opts)?;
        let linear = &call.linear;
        if grads.in_place(linear) {
            return Err(Error::InvalidOption(
                "a vocabulary-split call writes the hidden states' gradient beside them, not over \
                 them (grads.hidden is the call's hidden states)"
                    .to_string(),
            ));
        }
        let (rows, width) = (linear.shape.rows(), linear.shape.vocab);
        let world = comm.world();
        let chunk = check_scratch(linear, pass, grads, scratch, |chunk| {
            chunk.min(rows.max(1)) * width * linear.dtype.bytes()
        })?;
        let lopts = chunk_options(opts);
        // The layouts of a full chunk and of the last, shorter one (the same on every rank).
        let layouts = if backward {
            None
        } else {
            let layout_of =
                |c: usize| self.shard_layout(c, call.vocab, world, linear.dtype, &lopts);
            let full = layout_of(chunk.min(rows))?;
            let last = match rows % chunk {
                0 => full,
                rest => layout_of(rest)?,
            };
            check_len("send", send, full.words)?;
            check_len("recv", recv, world * full.words)?;
            Some((full, last))
        };
        let Setup {
            entropy,
            buffers,
            bias_grad,
            ones,
            whole,
        } = self.linear_setup(
            stream,
            linear,
            opts,
            pass,
            (out, entropy_upstream),
            grads,
            scratch,
            (chunk.min(rows), 0, call.vocab),
        )?;
        let labels = whole.labels;
        let side_guard = self.side_stream(stream, pass != LinearPass::Forward, grads)?;
        let work = Work::new(
            blas,
            stream,
            linear,
            lopts,
            whole,
            scratch,
            grads,
            bias_grad,
            ones,
            side_guard.as_ref().and_then(|g| g.as_ref()),
        );
        // Every kernel the call launches, loaded before the first is launched.
        let label = work.whole.label;
        let layout = layouts.map(|(full, _)| full);
        let one_chunk = call.chunk(0, labels, 0, chunk.min(rows));
        self.preload([
            (!backward).then_some(Kernel::Count { label }),
            (!backward).then(|| self.shard_kernel(&one_chunk, &work.opts, XentKind::ChunkPartial)),
            (!backward).then(|| self.shard_kernel(&one_chunk, &work.opts, XentKind::ChunkGrad)),
            layout.filter(|l| l.argmax).map(|_| Kernel::ShardArgmax {
                dtype: linear.dtype,
                label,
            }),
            layout
                .filter(|l| l.argmax)
                .map(|_| Kernel::ShardMerge { label }),
            layout.filter(|l| l.entropy).map(|_| Kernel::ShardEntropy {
                dtype: linear.dtype,
                label,
            }),
            layout
                .filter(|l| l.entropy)
                .map(|_| Kernel::ShardEntropyMerge { label }),
            (!backward).then_some(Kernel::Finish),
            (backward && rows > 0)
                .then(|| backward_kernel(&work.whole, &work.opts, entropy.is_some())),
        ])?;
        match (pass, layouts) {
            (LinearPass::Backward { upstream }, _) => {
                for first in (0..rows).step_by(chunk) {
                    let c = chunk.min(rows - first);
                    let hidden_rows = work.chunk_logits(first, c)?;
                    let kernel_call = KernelCall {
                        logits: work.logits,
                        labels: labels + (first * label_bytes(linear.label_type)) as u64,
                        shape: Shape::flat(c, call.vocab),
                        ..work.whole
                    };
                    let upstream = if upstream.len == rows && rows > 1 {
                        (row_at(upstream.ptr, 4, first), c)
                    } else {
                        (upstream.ptr, 1)
                    };
                    let entropy =
                        entropy.map(|(h, up)| (row_at(h, 4, first), row_at(up, 4, first)));
                    self.launch_backward(
                        stream,
                        &kernel_call,
                        &work.opts,
                        out.counts.ptr,
                        row_at(out.row_lse.ptr, 4, first),
                        upstream,
                        0,
                        Some((call.start, width, width)),
                        entropy,
                    )?;
                    work.chunk_grads(self, first, c, hidden_rows)?;
                }
            }
            (_, Some((full, last))) => {
                let fused = pass == LinearPass::Fused;
                self.launch_count(stream, &work.whole, &work.opts, buffers.counts)?;
                for first in (0..rows).step_by(chunk) {
                    let c = chunk.min(rows - first);
                    let layout = if c == full.rows { full } else { last };
                    let hidden_rows = work.chunk_logits(first, c)?;
                    let shard_call = call.chunk(work.logits, labels, first, c);
                    let send = RawBuffer::new(send.ptr, layout.words);
                    unsafe {
                        self.raw_shard_stats(stream, &shard_call, &work.opts, &layout, send)?;
                        comm.all_gather_f32(send.ptr, recv.ptr, layout.words, stream)?;
                    }
                    let chunk_buffers = LossBuffers {
                        row_loss: row_at(buffers.row_loss, 4, first),
                        row_lse: row_at(buffers.row_lse, 4, first),
                        row_correct: row_at(buffers.row_correct, 4, first),
                        predicted: row_at(buffers.predicted, 8, first),
                        entropy: row_at(buffers.entropy, 4, first),
                        ..buffers
                    };
                    self.shard_rows_backward(
                        stream,
                        &shard_call,
                        &work.opts,
                        &layout,
                        world,
                        RawBuffer::new(recv.ptr, world * layout.words),
                        &chunk_buffers,
                        fused,
                    )?;
                    if fused {
                        work.chunk_grads(self, first, c, hidden_rows)?;
                    }
                }
                self.launch_finish(stream, rows, work.whole.weight != 0, &work.opts, &buffers)?;
            }
            _ => unreachable!("a Forward or Fused pass has its layouts"),
        }
        Ok(())
    }
}

/// A call with no rows writes zeros into the gradients it overwrites (the sum over no rows).
///
/// # Safety
/// The gradients' buffers are device memory of their stated lengths.
pub(super) unsafe fn zero_grads(
    grads: &RawLinearGrads,
    bias_grad: Option<super::RawGrad>,
    cu_stream: cudarc::driver::sys::CUstream,
) -> Result<()> {
    if grads.accumulate {
        return Ok(());
    }
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
    Ok(())
}
