//! The protocol on the GPU, on raw device memory: step 1
//! is the chunked plan's first kernel over the rank's slice of the vocabulary (its partials and
//! the label's logit where the label is the rank's: [`ShardLayout::words`] f32 values per rank),
//! step 3 the chunked plan's second kernel merging every rank's partials, between the count and
//! finish kernels as in a single-GPU call. The collective between them is the caller's (one
//! all-gather of `words` f32 values per rank; on one GPU, step 1 of each shard can write straight
//! into its place of the gathered buffer).
//!
//! Token accuracy and predicted tokens add a pair per row to each rank's values: step 1 also
//! takes each row's first maximal logit in the shard (`xent_shard_argmax_*`, one more read of the
//! shard), and step 3 merges the ranks' pairs into the row's class over the whole vocabulary
//! (`xent_shard_merge_*`), before the finish kernel counts the rows predicted right.
//!
//! The entropies (`return_entropy`) add three values per row: step 1 also summarises each row
//! of the shard as `(max, Σ 2^(z - max), Σ 2^(z - max)·(z - max))` in log2 units
//! (`xent_shard_entropy_*`, one more read of the shard), and step 3 merges the ranks' summaries
//! into the row's entropy over the whole vocabulary (`xent_shard_entropy_merge_*`). A two-phase
//! backward ([`CrossEntropy::raw_shard_grad_with_entropy`]) then adds the entropies' gradient on
//! each rank's columns from the merged entropy and log-sum-exp, with no collective.
//!
//! Not yet: the smoothing sum's large-magnitude reference (0 here: every rank must take the
//! same).

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::Shard;
use crate::abi::{
    COUNT_WORDS, MODE_FORWARD, MODE_FUSED, PARTIAL_WORDS, RowsParams, SHARD_ENTROPY_WORDS,
    SMEM_ENTROPY_BYTES, SMEM_REDUCTION_BYTES, ShardArgmaxParams, ShardEntropyMergeParams,
    ShardEntropyParams, ShardMergeParams, XentParams,
};
use crate::cuda::{CrossEntropy, KernelCall, LossBuffers};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, XentKind, opt_params, variant};
use crate::options::{DType, Options, Shape};
use crate::plan;
use crate::raw::{LabelType, RawBuffer, RawLoss, check_len, entropy_pair};

/// One rank's call: its shard of the logits (`shape`: the call's rows, `shard.width` classes a
/// row, `row_stride` apart; batch and sequence as the whole call's, for the causal shift), the
/// labels of every row (global class ids), and the class weights of the whole vocabulary
/// (`[f32; vocab]` on the device, `Options::weight` `None`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShardCall {
    pub logits: RawBuffer,
    pub dtype: DType,
    pub labels: RawBuffer,
    pub label_type: LabelType,
    pub shape: Shape,
    pub shard: Shard,
    pub vocab: usize,
    pub weight: Option<RawBuffer>,
}

/// The chunking every rank shares (from the widest shard), and the f32 values each rank
/// contributes to the collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub rows: usize,
    pub threads: u32,
    pub chunk_len: u32,
    pub n_chunks: u32,
    /// Whether each rank also contributes each row's argmax pair (its shard's first maximal
    /// logit and that logit's class): for token accuracy or predicted tokens.
    pub argmax: bool,
    /// Whether each rank also contributes each row's entropy summary (three values): for
    /// `return_entropy`.
    pub entropy: bool,
    /// `rows · n_chunks · PARTIAL_WORDS` partials, then `rows` label logits, then with `argmax`
    /// `rows` pairs (`2 · rows` values), then with `entropy` `rows` summaries (`3 · rows`).
    pub words: usize,
}

/// Whether a call with `opts` needs each row's argmax over the whole vocabulary.
fn wants_argmax(opts: &Options) -> bool {
    opts.return_token_accuracy || opts.return_predicted_tokens
}

/// Threads a block of the argmax merge (`xent_shard_merge_*`: a thread a row).
const MERGE_THREADS: u32 = 256;

/// A chunking forced by `XENT_SHARD_CHUNK=LEN[:THREADS]` (for measuring the alternatives; unset:
/// the automatic one).
fn forced_shard_chunk() -> Result<Option<(usize, Option<u32>)>> {
    let Some(value) = std::env::var_os("XENT_SHARD_CHUNK") else {
        return Ok(None);
    };
    let value = value.to_string_lossy().into_owned();
    let bad = || {
        Error::InvalidOption(format!(
            "XENT_SHARD_CHUNK={value:?}: expected LEN or LEN:THREADS"
        ))
    };
    let (len, threads) = match value.split_once(':') {
        Some((len, threads)) => (len, Some(threads)),
        None => (value.as_str(), None),
    };
    let len = len.parse::<usize>().map_err(|_| bad())?;
    let threads = match threads {
        Some(t) => {
            let t = t.parse::<u32>().map_err(|_| bad())?;
            if t == 0 || t % 32 != 0 || t > 512 {
                return Err(bad());
            }
            Some(t)
        }
        None => None,
    };
    Ok(Some((len, threads)))
}

impl ShardLayout {
    /// A call of `rows` rows must be the one the layout was made for.
    fn check_rows(&self, rows: usize) -> Result<()> {
        if rows != self.rows {
            return Err(Error::InvalidOption(format!(
                "the layout is for {} rows, the call has {rows}",
                self.rows
            )));
        }
        Ok(())
    }

    /// A call with `opts` must need the argmax pairs and the entropy summaries if and only if
    /// the layout has them.
    fn check_options(&self, opts: &Options) -> Result<()> {
        if self.argmax != wants_argmax(opts) {
            return Err(Error::InvalidOption(
                "the layout was made for options with a different return_token_accuracy or \
                 return_predicted_tokens"
                    .to_string(),
            ));
        }
        if self.entropy != opts.return_entropy {
            return Err(Error::InvalidOption(
                "the layout was made for options with a different return_entropy".to_string(),
            ));
        }
        Ok(())
    }

    /// A rank's shard must fit the layout's chunks, which cover the widest shard of the even
    /// split ([`Shard::split`]); a wider one would leave columns unread.
    fn check_shard(&self, shard: Shard) -> Result<()> {
        let covered = self.chunk_len as usize * self.n_chunks as usize;
        if shard.width > covered {
            return Err(Error::InvalidOption(format!(
                "a shard of {} classes is wider than the layout covers ({covered}): the layout \
                 is made for the even split of the vocabulary (Megatron's), whose widest shard \
                 is at most that",
                shard.width
            )));
        }
        Ok(())
    }

    fn label_offset(&self) -> usize {
        self.rows * self.n_chunks as usize * PARTIAL_WORDS
    }

    /// Where the argmax pairs start, in f32 values.
    fn pairs_offset(&self) -> usize {
        self.label_offset() + self.rows
    }

    /// Where the entropy summaries start, in f32 values.
    fn entropy_offset(&self) -> usize {
        self.pairs_offset() + if self.argmax { 2 * self.rows } else { 0 }
    }
}

impl ShardCall {
    fn validate(&self, opts: &Options) -> Result<()> {
        let Shard { start, width } = self.shard;
        if width == 0 || start + width > self.vocab || self.shape.vocab != width {
            return Err(Error::InvalidOption(format!(
                "shard [{start}, {}) of {} classes with rows of {}",
                start + width,
                self.vocab,
                self.shape.vocab
            )));
        }
        self.shape.validate(self.logits.len, self.labels.len)?;
        if opts.weight.is_some() {
            return Err(Error::InvalidOption(
                "a shard call takes class weights in device memory (ShardCall::weight)".to_string(),
            ));
        }
        opts.validate(self.vocab)?;
        if let Some(w) = self.weight
            && w.len != self.vocab
        {
            return Err(Error::InvalidOption(format!(
                "class weights hold {} values, the vocabulary has {}",
                w.len, self.vocab
            )));
        }
        Ok(())
    }

    /// The kernel call over the shard, with the whole vocabulary's label range.
    fn kernel_call(&self) -> KernelCall {
        KernelCall {
            dtype: self.dtype,
            label: self.label_type.name(),
            logits: self.logits.ptr,
            labels: self.labels.ptr,
            shape: Shape {
                vocab: self.vocab,
                ..self.shape
            },
            weight: self.weight.map_or(0, |w| w.ptr),
        }
    }
}

impl CrossEntropy {
    /// The layout of a `world`-rank call of `rows` rows over `vocab` classes of `dtype`: chunks
    /// of about [`plan::SHARD_CHUNK`] elements of the widest shard (every option shares it; an
    /// invalid one is reported here, before any launch).
    pub fn shard_layout(
        &self,
        rows: usize,
        vocab: usize,
        world: usize,
        dtype: DType,
        opts: &Options,
    ) -> Result<ShardLayout> {
        opts.validate_except_weight_values(vocab)?;
        let widest = Shard::split(vocab, world)?[0].width;
        let (chunk_len, n_chunks, threads) = match forced_shard_chunk()? {
            Some((len, threads)) => {
                if len == 0 || !len.is_multiple_of(8) {
                    return Err(Error::InvalidOption(format!(
                        "XENT_SHARD_CHUNK: a chunk of {len} elements is not a positive multiple of 8"
                    )));
                }
                let len = len.min(widest.next_multiple_of(8));
                let threads = threads.unwrap_or_else(|| plan::threads_for(len, dtype));
                (len, widest.div_ceil(len), threads)
            }
            None => plan::shard_chunking(widest, dtype),
        };
        let (argmax, entropy) = (wants_argmax(opts), opts.return_entropy);
        Ok(ShardLayout {
            rows,
            threads,
            chunk_len: chunk_len as u32,
            n_chunks: n_chunks as u32,
            argmax,
            entropy,
            words: rows * n_chunks * PARTIAL_WORDS
                + rows
                + if argmax { 2 * rows } else { 0 }
                + if entropy {
                    SHARD_ENTROPY_WORDS * rows
                } else {
                    0
                },
        })
    }

    /// The rows as the shard kernels see them: the shard's logits and row stride, the labels and
    /// the whole vocabulary (their range).
    fn shard_rows(&self, call: &ShardCall, opts: &Options) -> RowsParams {
        let kernel_call = call.kernel_call();
        let mut rows = self.rows_params(
            kernel_call.logits,
            kernel_call.labels,
            kernel_call.shape,
            opts,
        );
        rows.row_stride = call.shape.row_stride as u64;
        rows
    }

    fn shard_params(
        &self,
        call: &ShardCall,
        opts: &Options,
        layout: &ShardLayout,
        counts: u64,
    ) -> XentParams {
        let kernel_call = call.kernel_call();
        XentParams {
            rows: self.shard_rows(call, opts),
            counts,
            reduction: opts.reduction.code(),
            grad_scale: opts.grad_scale,
            n_chunks: layout.n_chunks,
            chunk_len: layout.chunk_len,
            opts: opt_params(opts, kernel_call.weight, 0),
            slice_start: call.shard.start as u32,
            slice_len: call.shard.width as u32,
            ..XentParams::default()
        }
    }

    pub(crate) fn shard_kernel(&self, call: &ShardCall, opts: &Options, kind: XentKind) -> Kernel {
        Kernel::Xent {
            kind,
            variant: variant(opts, call.weight.is_some(), false),
            dtype: call.dtype,
            label: call.label_type.name(),
        }
    }

    /// Step 1 on one rank: its contribution to the collective (`layout.words` f32 values) into
    /// `send`.
    ///
    /// # Safety
    /// As [`raw_forward`](Self::raw_forward): every address device memory of this context of the
    /// stated length, alive until the work has run.
    pub unsafe fn raw_shard_stats(
        &self,
        stream: &Arc<CudaStream>,
        call: &ShardCall,
        opts: &Options,
        layout: &ShardLayout,
        send: RawBuffer,
    ) -> Result<()> {
        self.check_stream(stream)?;
        call.validate(opts)?;
        check_len("send", send, layout.words)?;
        let rows = call.shape.rows();
        layout.check_rows(rows)?;
        layout.check_options(opts)?;
        layout.check_shard(call.shard)?;
        let label_logits = send.ptr + 4 * layout.label_offset() as u64;
        let kernel = self.shard_kernel(call, opts, XentKind::ChunkPartial);
        let argmax = Kernel::ShardArgmax {
            dtype: call.dtype,
            label: call.label_type.name(),
        };
        let entropy = Kernel::ShardEntropy {
            dtype: call.dtype,
            label: call.label_type.name(),
        };
        self.preload([
            (rows > 0).then_some(kernel),
            (rows > 0 && layout.argmax).then_some(argmax),
            (rows > 0 && layout.entropy).then_some(entropy),
        ])?;
        unsafe {
            cudarc::driver::result::memset_d8_async(label_logits, 0, 4 * rows, stream.cu_stream())?;
        }
        if rows == 0 {
            return Ok(());
        }
        let params = XentParams {
            partials: send.ptr,
            label_logits,
            mode: MODE_FORWARD,
            ..self.shard_params(call, opts, layout, 0)
        };
        self.launch(
            stream,
            kernel,
            &params,
            (rows * layout.n_chunks as usize) as u32,
            layout.threads,
            SMEM_REDUCTION_BYTES,
        )?;
        if layout.argmax {
            let params = ShardArgmaxParams {
                rows: self.shard_rows(call, opts),
                out: send.ptr + 4 * layout.pairs_offset() as u64,
                width: call.shard.width as u32,
                start: call.shard.start as u32,
            };
            self.launch_row_reader(stream, argmax, &params, rows, SMEM_REDUCTION_BYTES)?;
        }
        if layout.entropy {
            let cap = opts.softcap.unwrap_or(0.0);
            let params = ShardEntropyParams {
                rows: self.shard_rows(call, opts),
                out: send.ptr + 4 * layout.entropy_offset() as u64,
                width: call.shard.width as u32,
                softcap: cap,
                inv_softcap: if cap > 0.0 { 1.0 / cap } else { 0.0 },
                _pad: 0,
            };
            self.launch_row_reader(stream, entropy, &params, rows, SMEM_ENTROPY_BYTES)?;
        }
        Ok(())
    }

    /// Step 3 on one rank: from every rank's contributions (`gathered`: `world · layout.words`
    /// values in rank order), the loss into `out` (the same on every rank) and, with `fused`, the
    /// gradient of `grad_scale · loss` w.r.t. this rank's logits written over them.
    ///
    /// # Safety
    /// As [`raw_shard_stats`](Self::raw_shard_stats); with `fused` the logits must be writable.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn raw_shard_backward(
        &self,
        stream: &Arc<CudaStream>,
        call: &ShardCall,
        opts: &Options,
        layout: &ShardLayout,
        world: usize,
        gathered: RawBuffer,
        out: &RawLoss,
        fused: bool,
    ) -> Result<()> {
        self.check_stream(stream)?;
        call.validate(opts)?;
        let rows = call.shape.rows();
        layout.check_rows(rows)?;
        layout.check_options(opts)?;
        layout.check_shard(call.shard)?;
        if world == 0 {
            return Err(Error::InvalidOption("a call of 0 ranks".to_string()));
        }
        check_len("gathered", gathered, world * layout.words)?;
        check_len("counts", out.counts, COUNT_WORDS)?;
        let buffers: LossBuffers = out.buffers(rows, opts, 0)?;
        let kernel_call = call.kernel_call();
        let merge = Kernel::ShardMerge {
            label: kernel_call.label,
        };
        let entropy_merge = Kernel::ShardEntropyMerge {
            label: kernel_call.label,
        };
        // All loaded before the first is launched (see `CrossEntropy::preload`).
        self.preload([
            Some(Kernel::Count {
                label: kernel_call.label,
            }),
            (rows > 0).then(|| self.shard_kernel(call, opts, XentKind::ChunkGrad)),
            (rows > 0 && layout.argmax).then_some(merge),
            (rows > 0 && layout.entropy).then_some(entropy_merge),
            Some(Kernel::Finish),
        ])?;
        self.launch_count(stream, &kernel_call, opts, buffers.counts)?;
        self.shard_rows_backward(stream, call, opts, layout, world, gathered, &buffers, fused)?;
        self.launch_finish(stream, rows, call.weight.is_some(), opts, &buffers)
    }
}

impl CrossEntropy {
    /// Step 3's kernels on `call`'s rows, without the count before them and the finish after
    /// (the caller's: a linear call counts its labels once and finishes once, around its chunks):
    /// each row's loss and log-sum-exp into `buffers` (and the argmax and entropy merges where
    /// the layout has them), with `fused` the gradient over the logits, `buffers.counts` the
    /// whole call's.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn shard_rows_backward(
        &self,
        stream: &Arc<CudaStream>,
        call: &ShardCall,
        opts: &Options,
        layout: &ShardLayout,
        world: usize,
        gathered: RawBuffer,
        buffers: &LossBuffers,
        fused: bool,
    ) -> Result<()> {
        let rows = call.shape.rows();
        let kernel_call = call.kernel_call();
        let merge = Kernel::ShardMerge {
            label: kernel_call.label,
        };
        let entropy_merge = Kernel::ShardEntropyMerge {
            label: kernel_call.label,
        };
        if rows > 0 {
            let params = XentParams {
                row_loss: buffers.row_loss,
                row_lse: buffers.row_lse,
                partials: gathered.ptr,
                label_logits: gathered.ptr + 4 * layout.label_offset() as u64,
                rank_stride: 4 * layout.words as u64,
                ranks: world as u32,
                mode: if fused { MODE_FUSED } else { MODE_FORWARD },
                ..self.shard_params(call, opts, layout, buffers.counts)
            };
            self.launch(
                stream,
                self.shard_kernel(call, opts, XentKind::ChunkGrad),
                &params,
                (rows * layout.n_chunks as usize) as u32,
                layout.threads,
                SMEM_REDUCTION_BYTES,
            )?;
        }
        if rows > 0 && layout.argmax {
            // Each row's class over the whole vocabulary, before the finish counts the rows
            // predicted right.
            let params = ShardMergeParams {
                rows: self.shard_rows(call, opts),
                gathered: gathered.ptr,
                rank_stride: 4 * layout.words as u64,
                pairs_offset: 4 * layout.pairs_offset() as u64,
                predicted: buffers.predicted,
                row_correct: buffers.row_correct,
                ranks: world as u32,
                _pad: 0,
            };
            self.launch(
                stream,
                merge,
                &params,
                self.merge_blocks(rows),
                MERGE_THREADS,
                0,
            )?;
        }
        if rows > 0 && layout.entropy {
            // Each row's entropy over the whole vocabulary, from every rank's summary.
            let params = ShardEntropyMergeParams {
                rows: self.shard_rows(call, opts),
                gathered: gathered.ptr,
                rank_stride: 4 * layout.words as u64,
                offset: 4 * layout.entropy_offset() as u64,
                out: buffers.entropy,
                ranks: world as u32,
                _pad: 0,
            };
            let blocks = self.merge_blocks(rows);
            self.launch(stream, entropy_merge, &params, blocks, MERGE_THREADS, 0)?;
        }
        Ok(())
    }

    /// Blocks of a merge kernel over `rows` rows (a thread a row, [`MERGE_THREADS`] a block).
    fn merge_blocks(&self, rows: usize) -> u32 {
        rows.div_ceil(MERGE_THREADS as usize)
            .min(4 * self.limits().sm_count as usize) as u32
    }

    /// Two-phase, step 4 on one rank: the gradient of `upstream · loss` w.r.t. this rank's logits,
    /// written over them, from the forward's `out` (a [`raw_shard_backward`](Self::raw_shard_backward)
    /// with `fused` false, or [`raw_vocab_parallel`](Self::raw_vocab_parallel) with `fused` false:
    /// their `counts` and `row_lse`, the log-sum-exp over the whole vocabulary), `upstream` one
    /// value or one per row on the device. One pass over the shard (a read and a write per
    /// logit), no collective; the gradient is rounded once whatever the upstream.
    ///
    /// # Safety
    /// As [`raw_shard_backward`](Self::raw_shard_backward); the logits must be writable and
    /// `out` the same call's forward outputs, its work ordered before this on `stream`.
    pub unsafe fn raw_shard_grad(
        &self,
        stream: &Arc<CudaStream>,
        call: &ShardCall,
        opts: &Options,
        out: &RawLoss,
        upstream: RawBuffer,
    ) -> Result<()> {
        unsafe { self.raw_shard_grad_with_entropy(stream, call, opts, out, upstream, None) }
    }

    /// [`raw_shard_grad`](Self::raw_shard_grad), with `entropy_upstream` (`[f32; rows]`) the
    /// gradient of `Σ_r entropy_upstream[r]·H_r` w.r.t. this rank's logits added, `H` the
    /// entropies over the whole vocabulary in `out.entropy` (a forward with `return_entropy`), as
    /// [`raw_backward_with_entropy`](Self::raw_backward_with_entropy) adds it on one GPU: the
    /// term needs only the row's log-sum-exp and entropy, which every rank has, so still no
    /// collective. `None`: `raw_shard_grad`.
    ///
    /// # Safety
    /// As [`raw_shard_grad`](Self::raw_shard_grad), for `entropy_upstream` and `out.entropy` too.
    pub unsafe fn raw_shard_grad_with_entropy(
        &self,
        stream: &Arc<CudaStream>,
        call: &ShardCall,
        opts: &Options,
        out: &RawLoss,
        upstream: RawBuffer,
        entropy_upstream: Option<RawBuffer>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        call.validate(opts)?;
        let rows = call.shape.rows();
        let buffers: LossBuffers = out.buffers(rows, opts, 0)?;
        let entropy = entropy_pair(out.entropy, entropy_upstream, rows)?;
        let slice = (call.shard.start, call.shard.width, call.shape.row_stride);
        self.launch_backward(
            stream,
            &call.kernel_call(),
            opts,
            buffers.counts,
            buffers.row_lse,
            (upstream.ptr, upstream.len),
            0,
            Some(slice),
            entropy,
        )
    }
}

/// The one collective of a vocabulary-parallel call: an all-gather of f32 values, in rank order.
/// NCCL's communicator ([`crate::nccl::Comm`]) is one; a framework's (PyTorch's
/// `all_gather_into_tensor`) can be another.
pub trait Collective {
    /// Ranks in the communicator.
    fn world(&self) -> usize;
    /// This rank.
    fn rank(&self) -> usize;
    /// Gathers `count` f32 values from `send` on every rank into `recv` (`world · count`, rank
    /// order), enqueued on `stream`.
    ///
    /// # Safety
    /// `send` and `recv` device memory of the stream's device of `count` and `world · count`
    /// f32 values, alive until the collective has run.
    unsafe fn all_gather_f32(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<()>;
}

impl Collective for crate::nccl::Comm<'_> {
    fn world(&self) -> usize {
        self.world
    }

    fn rank(&self) -> usize {
        self.rank
    }

    unsafe fn all_gather_f32(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        // SAFETY: as the caller promised.
        unsafe { crate::nccl::Comm::all_gather_f32(self, send, recv, count, stream.cu_stream()) }
    }
}

impl CrossEntropy {
    /// A vocabulary-parallel call on one rank: step 1 into `send` (`layout.words` values), the
    /// all-gather into `recv` (`world · layout.words`), step 3 (see
    /// [`raw_shard_backward`](Self::raw_shard_backward)). Everything on `stream`, no host wait.
    ///
    /// # Safety
    /// As [`raw_shard_backward`](Self::raw_shard_backward), for `send` and `recv` too.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn raw_vocab_parallel(
        &self,
        stream: &Arc<CudaStream>,
        comm: &dyn Collective,
        call: &ShardCall,
        opts: &Options,
        layout: &ShardLayout,
        (send, recv): (RawBuffer, RawBuffer),
        out: &RawLoss,
        fused: bool,
    ) -> Result<()> {
        let world = comm.world();
        check_len("recv", recv, world * layout.words)?;
        unsafe {
            self.raw_shard_stats(stream, call, opts, layout, send)?;
            comm.all_gather_f32(send.ptr, recv.ptr, layout.words, stream)?;
            self.raw_shard_backward(stream, call, opts, layout, world, recv, out, fused)
        }
    }

    /// Every rank of a vocabulary-parallel call on this one GPU (tests, and users without NCCL):
    /// each shard's step 1 writes straight into its place of `gathered` (`calls.len() ·
    /// layout.words` values), then each shard's step 3 reads all of it into its `outs` entry.
    ///
    /// # Safety
    /// As [`raw_shard_backward`](Self::raw_shard_backward), for every call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn raw_shards_in_process(
        &self,
        stream: &Arc<CudaStream>,
        calls: &[ShardCall],
        opts: &Options,
        layout: &ShardLayout,
        gathered: RawBuffer,
        outs: &[RawLoss],
        fused: bool,
    ) -> Result<()> {
        let world = calls.len();
        if outs.len() != world {
            return Err(Error::InvalidOption(format!(
                "{world} shards and {} outputs",
                outs.len()
            )));
        }
        check_len("gathered", gathered, world * layout.words)?;
        for (q, call) in calls.iter().enumerate() {
            let send = RawBuffer::new(gathered.ptr + (4 * q * layout.words) as u64, layout.words);
            unsafe { self.raw_shard_stats(stream, call, opts, layout, send)? };
        }
        for (call, out) in calls.iter().zip(outs) {
            unsafe {
                self.raw_shard_backward(stream, call, opts, layout, world, gathered, out, fused)?
            };
        }
        Ok(())
    }
}
