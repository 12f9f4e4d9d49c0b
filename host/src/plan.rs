//! Launch planning: pure functions of (rows, vocab, dtype, device limits), tested without a GPU.
//! Every tuning constant is here, with the reason for its value.

pub use crate::abi::CLUSTER_KEEP;
use crate::abi::{PARTIAL_WORDS, SMALL_KERNEL_ROWS, SMEM_STASH_OFFSET, SPLIT_L2_SLOTS};
use crate::error::{Error, Result};
use crate::options::{DType, Options};

/// Largest tile, in elements, that one block walks per step: the seed's `MAX_FUSED_SIZE` (32768),
/// which also caps a bf16 block at 1024 threads x 4 vectors of 8.
pub const MAX_TILE: usize = 32768;
/// Vectors each thread loads before using the first (`UNROLL` in kernels-gpu/src/xent/mod.rs); blocks
/// are sized so that one such batch per thread covers a chunk.
pub const UNROLL: usize = 8;
/// Threads per block, at least one warp. At most 512: the kernels hold 8 vectors per thread in
/// registers (up to 80 registers, ptxas), and 1024 threads x 80 registers exceed the 64K per SM.
pub const MAX_THREADS: u32 = 512;
pub const MIN_THREADS: u32 = 32;
/// The chunked plan wants at least this many blocks per SM so the GPU is full; below it, chunks
/// are halved (down to `MIN_CHUNK`). Two blocks per SM let one load while the other reduces.
pub const MIN_BLOCKS_PER_SM: usize = 2;
/// Smallest chunk the automatic plan makes: below this a chunk's block is mostly overhead.
pub const MIN_CHUNK: usize = 2048;
/// Elements per block of the scaling kernel, and its threads (8 elements per thread for bf16).
pub const SCALE_TILE: usize = 8192;
pub const SCALE_THREADS: u32 = 256;
/// Blocks per SM of the scaling kernel's grid-stride launch ([`scale_grid`]): 8 x 256 threads
/// fill an SM's 2048 thread slots, so every tile is in flight as with one block per tile.
pub const SCALE_BLOCKS_PER_SM: usize = 8;
/// Threads of the count kernel; its grid is capped at `COUNT_BLOCKS_PER_SM` blocks per SM.
pub const COUNT_THREADS: u32 = 256;
pub const COUNT_BLOCKS_PER_SM: usize = 4;
/// Threads of the count kernel's single block with class weights (it sums them in a fixed
/// order): the most a block can have, so each thread reads the fewest labels.
pub const COUNT_WEIGHT_THREADS: u32 = 1024;
/// Threads of the single block that reduces per-row losses.
pub const FINISH_THREADS: u32 = 1024;
/// Bytes of the row each CTA of the cluster plan keeps in shared memory, at most (while the
/// cluster has room). With the bulk-copy cluster kernel, measured on an H200 (2026-11-28, % of
/// copy bandwidth by CTAs per row): 8192 x 32000 bf16: 1 (62.5 KiB) 81%, 2 79%, 4 70%;
/// 8192 x 128256 bf16: 4 (63 KiB) 83%, 8 82%, 2 73%; 16384 x 151936 bf16: 4 (74 KiB) 84%, 5 79%,
/// 8 80%; 8192 x 128256 f32: 7 (72 KiB) 88%, 8 87%, 4 77%; 4096 x 262144 bf16: 7 (73 KiB) 79%,
/// 8 80%. Chunks up to 80 KiB pick the best or near-best of each.
pub const CLUSTER_CHUNK_BYTES: usize = 80 * 1024;
/// The largest cluster the kernels use: the portable 8. Measured on an H200 (2026-11-28), 16
/// CTAs of 32 KiB ran slower than 8 of 64 KiB at 4096 x 262144 bf16 (72.5% against 78.6% of copy
/// bandwidth) and at 8192 x 128256 f32 (70.7% against 82.6%).
pub const MAX_CLUSTER: u32 = 8;
/// The largest cluster a forced plan may ask for on a device with clusters: 16, the non-portable
/// size Hopper allows (the cluster kernels carry `CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED`;
/// the driver's occupancy query says whether a launch of it fits). The automatic plan stays at
/// [`MAX_CLUSTER`].
pub const MAX_FORCED_CLUSTER: u32 = 16;
/// The most threads a forced cluster plan may ask for per CTA: a block's limit (the kernels'
/// block reductions have room for 32 warps).
pub const MAX_CLUSTER_THREADS: u32 = 1024;
/// CUDA's limit on `gridDim.x`.
pub const MAX_GRID_X: usize = (1 << 31) - 1;

/// What planning needs to know about the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Dynamic shared memory a block may opt in to (bytes).
    pub max_smem_per_block: u32,
    /// Largest thread-block cluster the kernels may use: 1 without clusters (before sm_90).
    pub max_cluster: u32,
}

impl DeviceLimits {
    /// An H100/H200 (132 SMs, 227 KiB per block).
    pub const H100: DeviceLimits = DeviceLimits {
        sm_count: 132,
        max_smem_per_block: 232_448,
        max_cluster: MAX_CLUSTER,
    };
    /// An A100 (108 SMs, 163 KiB per block).
    pub const A100: DeviceLimits = DeviceLimits {
        sm_count: 108,
        max_smem_per_block: 166_912,
        max_cluster: 1,
    };
}

/// Shared memory an A100's SM holds for its CTAs (164 KiB).
pub const A100_SMEM_PER_SM: u32 = 167_936;
/// Shared memory the driver reserves for each CTA on sm_80 and later (1 KiB), beside its own.
pub const SMEM_RESERVED_PER_CTA: u32 = 1024;

/// CTAs of `smem_bytes` of dynamic shared memory each that an A100's SM holds at once, by its
/// shared memory: two of the split plan's 64 KiB chunks, where an H200's 228 KiB hold three.
/// (Its registers and threads an SM are an H100's, so the driver's answer on an H100 or H200
/// covers those.) The `XENT_LIMITS=a100` emulation's resident CTAs; at least 1.
pub fn a100_ctas_per_sm(smem_bytes: u32) -> u32 {
    (A100_SMEM_PER_SM / (smem_bytes + SMEM_RESERVED_PER_CTA)).max(1)
}

/// Which kernels to run: automatic, or forced (for tests and benchmarks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PlanChoice {
    #[default]
    Auto,
    /// One block per row, the row kept in shared memory: one read and one write per element.
    Fused,
    /// Rows split into chunks: partial log-sum-exp per chunk, then combine + gradient (two reads).
    /// `chunk_len` (a positive multiple of 8) or the automatic choice.
    Chunked { chunk_len: Option<usize> },
    /// sm_90: a row split over the CTAs of a thread-block cluster, each keeping its chunk in shared
    /// memory, combined through distributed shared memory: one read and one write per element.
    /// `size` CTAs per row (1 to [`MAX_FORCED_CLUSTER`]; the automatic choice is at most
    /// [`MAX_CLUSTER`]); `threads` per CTA (a multiple of 32,
    /// at most [`MAX_CLUSTER_THREADS`]) or the automatic choice. An automatic size is chosen
    /// for the forced thread count, if any; with a forced size, the automatic thread count is
    /// [`threads_for`] the chunk.
    Cluster {
        size: Option<u32>,
        threads: Option<u32>,
    },
    /// sm_80: a row split over a group of co-resident CTAs (a cooperative launch), each keeping
    /// its chunk in shared memory, combined through global memory: one read and one write per
    /// element for rows longer than one block's shared memory. The automatic plan takes it for
    /// such rows at up to [`SPLIT_AUTO_MAX_CHUNKS`] chunks a row when there are more rows than
    /// resident groups. `chunk_len` (a positive multiple of 8 that fits in shared memory) or the
    /// automatic choice ([`auto_split_chunk_len`]); `threads` per CTA (a multiple of 32, at most
    /// [`MAX_THREADS`]) or the automatic choice, [`threads_for`] the chunk up to the kernels'
    /// bound ([`KernelTraits::split_threads`]: [`SPLIT_MAX_THREADS`], [`SPLIT_OPTION_THREADS`]
    /// or [`SPLIT_CAP_THREADS`], by the variant's kernels).
    Split {
        chunk_len: Option<usize>,
        threads: Option<u32>,
    },
    /// sm_80, the plain loss only, forced: the split plan with each CTA's chunk left in L2 between
    /// its two passes instead of kept in shared memory. A CTA reduces its group's next row before
    /// it writes a row's gradient, so it waits for its group a row behind its own reads, and only
    /// registers limit the resident CTAs. The automatic plan does not take it (see
    /// [`SPLIT_L2_CHUNK_LEN`]: it won only where each SM is asked for more bandwidth than an
    /// A100's). `chunk_len` (a positive multiple of 8) or the automatic choice
    /// ([`auto_split_l2_chunk_len`]).
    SplitL2 { chunk_len: Option<usize> },
}

/// A planned launch of the cross-entropy kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchPlan {
    Fused {
        threads: u32,
        smem_bytes: u32,
    },
    Chunked {
        threads: u32,
        chunk_len: u32,
        n_chunks: u32,
    },
    Cluster {
        threads: u32,
        chunk_len: u32,
        size: u32,
        smem_bytes: u32,
    },
    /// `groups` groups of `n_chunks` CTAs, every CTA resident at once (see
    /// [`PlanChoice::Split`]); `in_l2`: the chunks are left in L2 ([`PlanChoice::SplitL2`]).
    Split {
        threads: u32,
        chunk_len: u32,
        n_chunks: u32,
        groups: u32,
        smem_bytes: u32,
        in_l2: bool,
    },
}

/// The seed's block size: the next power of two of `vocab`, at most [`MAX_TILE`].
pub fn tile_len(vocab: usize) -> usize {
    vocab.next_power_of_two().min(MAX_TILE)
}

/// Threads to walk `len` elements in one batch of `UNROLL` vectors each: rounded up to whole
/// warps (not to a power of two, which left up to half of each batch empty: 62% instead of 81% of
/// copy bandwidth at 16384 x 151936 bf16 on an H200), within [`MIN_THREADS`, `MAX_THREADS`].
pub fn threads_for(len: usize, dtype: DType) -> u32 {
    let per_thread = dtype.vec() * UNROLL;
    let wanted = len.div_ceil(per_thread).min(MAX_THREADS as usize) as u32;
    wanted.next_multiple_of(32).clamp(MIN_THREADS, MAX_THREADS)
}

/// Dynamic shared memory of the fused plan: reduction scratch, 16 bytes of alignment slack, and
/// the row.
pub fn fused_smem_bytes(vocab: usize, dtype: DType) -> Option<u32> {
    let bytes = SMEM_STASH_OFFSET as usize + 16 + vocab.checked_mul(dtype.bytes())?;
    u32::try_from(bytes.next_multiple_of(16)).ok()
}

/// What the planner needs to know of the kernels a call runs (their variant: which loss options
/// they handle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTraits {
    /// Vectors per thread the cluster kernels keep in registers ([`CLUSTER_KEEP`], or 0 for the
    /// per-element option kernels).
    pub keep: u32,
    /// Whether the automatic plan may take the split plan for sm_80's long rows (not where the
    /// variant's split kernels were measured slower than the chunked plan).
    pub split_automatic: bool,
    /// Whether the variant has kernels for [`PlanChoice::SplitL2`] (the plain loss only).
    pub split_l2: bool,
    /// Threads a CTA of the split plan, at most, when the count is automatic
    /// ([`SPLIT_MAX_THREADS`], [`SPLIT_OPTION_THREADS`] or [`SPLIT_CAP_THREADS`]).
    pub split_threads: u32,
    /// Threads per CTA the automatic cluster plan weighs besides [`threads_for`] the chunk, each
    /// where it is fewer: [`CLUSTER_FEW_THREADS`] (and, on request, [`CLUSTER_CAP_FEW_THREADS`]
    /// for the soft cap's 16-bit kernels).
    pub cluster_threads: &'static [u32],
}

impl KernelTraits {
    /// The plain kernels' (and most option variants').
    pub const PLAIN: KernelTraits = KernelTraits {
        keep: CLUSTER_KEEP,
        split_automatic: true,
        split_l2: true,
        split_threads: SPLIT_MAX_THREADS,
        cluster_threads: &[CLUSTER_FEW_THREADS],
    };
}

/// Chooses the kernels and their launch shape, with the cluster size from
/// [`auto_cluster_size`] when it is automatic (no device to ask: see [`plan_with`]).
pub fn plan(
    rows: usize,
    vocab: usize,
    dtype: DType,
    limits: DeviceLimits,
    choice: PlanChoice,
) -> Result<LaunchPlan> {
    plan_with(
        rows,
        vocab,
        dtype,
        limits,
        choice,
        KernelTraits::PLAIN,
        &mut |_| None,
    )
}

/// [`plan`] for kernels of `traits`, given the device's answer to "how many clusters of this
/// launch fit at once" (`active_clusters`, the driver's `cuOccupancyMaxActiveClusters`; `None`
/// when unknown): an automatic cluster size and thread count are then
/// [`cluster_shape_by_residency`], falling back to [`auto_cluster_size`] and [`threads_for`] its
/// chunk when the device does not say.
pub fn plan_with(
    rows: usize,
    vocab: usize,
    dtype: DType,
    limits: DeviceLimits,
    choice: PlanChoice,
    traits: KernelTraits,
    active_clusters: &mut dyn FnMut(&LaunchPlan) -> Option<u32>,
) -> Result<LaunchPlan> {
    let keep = traits.keep;
    if vocab == 0 || vocab > (u32::MAX / 2) as usize {
        return Err(Error::PlanDoesNotFit(format!(
            "vocab {vocab} is outside [1, 2^31)"
        )));
    }
    let smem = fused_smem_bytes(vocab, dtype).filter(|&b| b <= limits.max_smem_per_block);
    let fused = |smem_bytes| {
        check_grid(rows, 1, "blocks")?;
        Ok(LaunchPlan::Fused {
            threads: threads_for(tile_len(vocab), dtype),
            smem_bytes,
        })
    };
    let chunked = |chunk_len: usize| {
        check_chunk_len(chunk_len)?;
        let chunk_len = chunk_len.min(vocab.next_multiple_of(8));
        let n_chunks = vocab.div_ceil(chunk_len);
        check_grid(rows, n_chunks, "chunks")?;
        Ok(LaunchPlan::Chunked {
            threads: threads_for(chunk_len, dtype),
            chunk_len: chunk_len as u32,
            n_chunks: n_chunks as u32,
        })
    };
    // The automatic cluster shape for `threads` per CTA (or the automatic count): by residency,
    // else the fallback size (with `threads`, or `threads_for` its chunk).
    let auto_shape =
        |threads: Option<u32>, active_clusters: &mut dyn FnMut(&LaunchPlan) -> Option<u32>| {
            match cluster_shape_by_residency(
                rows,
                vocab,
                dtype,
                limits,
                traits,
                threads,
                active_clusters,
            ) {
                Some((size, t)) => (size, Some(t)),
                None => {
                    small_call_shape(rows, vocab, dtype, limits, keep, threads, active_clusters)
                        .unwrap_or((auto_cluster_size(rows, vocab, dtype, limits), threads))
                }
            }
        };
    match choice {
        PlanChoice::Fused => match smem {
            Some(bytes) => fused(bytes),
            None => Err(Error::PlanDoesNotFit(format!(
                "a row of {vocab} {} elements does not fit in {} bytes of shared memory",
                dtype.name(),
                limits.max_smem_per_block
            ))),
        },
        PlanChoice::Chunked { chunk_len } => {
            chunked(chunk_len.unwrap_or_else(|| auto_chunk_len(rows, vocab, limits)))
        }
        PlanChoice::Cluster { size, threads } => {
            if limits.max_cluster <= 1 {
                return Err(Error::PlanDoesNotFit(
                    "this device has no thread-block clusters".into(),
                ));
            }
            let (size, threads) = match size {
                Some(size) => (size, threads),
                None => auto_shape(threads, active_clusters),
            };
            cluster_plan(rows, vocab, dtype, limits, size, threads, keep)
        }
        PlanChoice::Split { chunk_len, threads } => {
            let chunk_len = chunk_len.unwrap_or_else(|| auto_split_chunk_len(vocab, dtype));
            split_plan(
                rows,
                vocab,
                dtype,
                limits,
                (threads, traits.split_threads),
                chunk_len,
                false,
                active_clusters,
            )
        }
        PlanChoice::SplitL2 { chunk_len } => {
            if !traits.split_l2 {
                return Err(Error::PlanDoesNotFit(
                    "the split_l2 plan has kernels for the plain loss only (no loss options, \
                     class weights or token accuracy)"
                        .into(),
                ));
            }
            let chunk_len = chunk_len.unwrap_or_else(|| auto_split_l2_chunk_len(vocab));
            split_plan(
                rows,
                vocab,
                dtype,
                limits,
                (None, SPLIT_MAX_THREADS),
                chunk_len,
                true,
                active_clusters,
            )
        }
        PlanChoice::Auto if limits.max_cluster > 1 => {
            let (size, threads) = auto_shape(None, active_clusters);
            cluster_plan(rows, vocab, dtype, limits, size, threads, keep)
                .or_else(|_| chunked(auto_chunk_len(rows, vocab, limits)))
        }
        PlanChoice::Auto => {
            let enough_rows = rows >= limits.sm_count as usize;
            match smem {
                Some(bytes) if enough_rows => fused(bytes),
                // Rows longer than a block's shared memory, or too few to fill the SMs: the split
                // plan reads them once where its kernels are the faster (`traits`), it cuts a row
                // into at most `SPLIT_AUTO_MAX_CHUNKS` and there are rows for every group it can
                // run; else the chunked plan, which reads them twice but cuts few rows finer.
                _ if traits.split_automatic => {
                    // The chunk count is checked before planning, which asks the device.
                    let chunk_len = auto_split_chunk_len(vocab, dtype);
                    (vocab.div_ceil(chunk_len) <= SPLIT_AUTO_MAX_CHUNKS as usize)
                        .then(|| {
                            split_plan(
                                rows,
                                vocab,
                                dtype,
                                limits,
                                (None, traits.split_threads),
                                chunk_len,
                                false,
                                active_clusters,
                            )
                            .ok()
                        })
                        .flatten()
                        .filter(|plan| split_is_full(plan, rows))
                        .map_or_else(|| chunked(auto_chunk_len(rows, vocab, limits)), Ok)
                }
                _ => chunked(auto_chunk_len(rows, vocab, limits)),
            }
        }
    }
}

/// Fails unless `rows x per_row` blocks fit in `gridDim.x`.
fn check_grid(rows: usize, per_row: usize, what: &str) -> Result<()> {
    if grid_fits(rows, per_row) {
        Ok(())
    } else {
        Err(Error::PlanDoesNotFit(format!(
            "{rows} rows x {per_row} {what} exceed the grid limit"
        )))
    }
}

/// Whether `rows x per_row` blocks fit in `gridDim.x`.
fn grid_fits(rows: usize, per_row: usize) -> bool {
    rows.checked_mul(per_row)
        .is_some_and(|blocks| blocks <= MAX_GRID_X)
}

/// Whether a CTA may have `threads` threads with at most `max`: a positive multiple of 32.
fn valid_threads(threads: u32, max: u32) -> bool {
    threads != 0 && threads.is_multiple_of(32) && threads <= max
}

/// Whether a cluster CTA may have `threads` threads: [`valid_threads`] up to
/// [`MAX_CLUSTER_THREADS`].
fn valid_cluster_threads(threads: u32) -> bool {
    valid_threads(threads, MAX_CLUSTER_THREADS)
}

/// The chunk length for `size` CTAs per row, and how many CTAs get elements: rounding the chunk
/// up to whole vectors can leave the last CTAs empty, and only CTAs with elements are launched.
fn cluster_chunk(vocab: usize, size: u32) -> (usize, u32) {
    let chunk_len = vocab.div_ceil(size as usize).next_multiple_of(8);
    (chunk_len, vocab.div_ceil(chunk_len) as u32)
}

/// Why a cluster launch does not fit, without building a message (the automatic plan tries
/// launches that do not fit on every call).
enum Misfit {
    /// The shared-memory part of a chunk of this many elements is over the limit.
    SharedMemory(usize),
    /// This many CTAs per row exceed the grid.
    Grid(u32),
}

/// [`cluster_plan`] for a size and thread count already checked.
fn cluster_launch(
    rows: usize,
    vocab: usize,
    dtype: DType,
    limits: DeviceLimits,
    size: u32,
    threads: Option<u32>,
    keep: u32,
) -> std::result::Result<LaunchPlan, Misfit> {
    let (chunk_len, size) = cluster_chunk(vocab, size);
    let threads = threads.unwrap_or_else(|| threads_for(chunk_len, dtype));
    let smem_bytes = cluster_smem_bytes(chunk_len, dtype, threads, keep)
        .filter(|&b| b <= limits.max_smem_per_block)
        .ok_or(Misfit::SharedMemory(chunk_len))?;
    if !grid_fits(rows, size as usize) {
        return Err(Misfit::Grid(size));
    }
    Ok(LaunchPlan::Cluster {
        threads,
        chunk_len: chunk_len as u32,
        size,
        smem_bytes,
    })
}

/// The cluster plan with `size` CTAs per row and `threads` per CTA (or [`threads_for`] the
/// chunk), if each CTA's shared-memory part of its chunk fits ([`cluster_smem_bytes`]; `keep`
/// vectors per thread stay in registers: [`CLUSTER_KEEP`] for the kernels without loss
/// options, 0 for the others).
pub fn cluster_plan(
    rows: usize,
    vocab: usize,
    dtype: DType,
    limits: DeviceLimits,
    size: u32,
    threads: Option<u32>,
    keep: u32,
) -> Result<LaunchPlan> {
    let most = if limits.max_cluster > 1 {
        MAX_FORCED_CLUSTER.max(limits.max_cluster)
    } else {
        limits.max_cluster
    };
    if size == 0 || size > most {
        return Err(Error::PlanDoesNotFit(format!(
            "cluster size {size} is outside 1..={most}"
        )));
    }
    if let Some(t) = threads
        && !valid_cluster_threads(t)
    {
        return Err(Error::PlanDoesNotFit(format!(
            "{t} threads per CTA: must be a positive multiple of 32, at most {MAX_CLUSTER_THREADS}"
        )));
    }
    cluster_launch(rows, vocab, dtype, limits, size, threads, keep).map_err(|misfit| match misfit {
        Misfit::SharedMemory(chunk_len) => Error::PlanDoesNotFit(format!(
            "a chunk of {chunk_len} {} elements does not fit in {} bytes of shared memory",
            dtype.name(),
            limits.max_smem_per_block
        )),
        Misfit::Grid(size) => {
            Error::PlanDoesNotFit(format!("{rows} rows x {size} CTAs exceed the grid limit"))
        }
    })
}

/// Dynamic shared memory of a cluster CTA: the reserved head and the part of its chunk not kept
/// in registers (`keep` vectors of 16 bytes per thread; the scalar head and tail are in
/// registers too).
pub fn cluster_smem_bytes(chunk_len: usize, dtype: DType, threads: u32, keep: u32) -> Option<u32> {
    let in_regs = keep as usize * threads as usize * 16;
    let bytes = SMEM_STASH_OFFSET as usize
        + 16
        + chunk_len
            .checked_mul(dtype.bytes())?
            .saturating_sub(in_regs);
    u32::try_from(bytes.next_multiple_of(16)).ok()
}

/// The automatic cluster size when the device's cluster occupancy is unknown or there are few
/// rows (see [`cluster_shape_by_residency`]): enough CTAs that each keeps at most
/// [`CLUSTER_CHUNK_BYTES`] of the row, doubled while the grid would leave SMs idle (fewer than
/// [`MIN_BLOCKS_PER_SM`] CTAs per SM), at most `max_cluster`.
pub fn auto_cluster_size(rows: usize, vocab: usize, dtype: DType, limits: DeviceLimits) -> u32 {
    let wanted_blocks = MIN_BLOCKS_PER_SM * limits.sm_count as usize;
    let by_bytes = (vocab * dtype.bytes()).div_ceil(CLUSTER_CHUNK_BYTES);
    let mut size = by_bytes.clamp(1, limits.max_cluster as usize) as u32;
    while size < limits.max_cluster && rows.saturating_mul(size as usize) < wanted_blocks {
        size = (size * 2).min(limits.max_cluster);
    }
    size
}

/// Threads per CTA of a small call's cluster plan (the automatic plan's `small_call_shape`).
pub const SMALL_CALL_THREADS: u32 = 128;
/// Rows up to which a small call takes clusters of [`MAX_FORCED_CLUSTER`] (`small_call_shape`).
pub const TINY_CALL_ROWS: usize = 4;
/// Rows for which a small call takes [`SMALL_CALL_THREADS`] threads a CTA at the
/// fallback cluster size (`small_call_shape`).
pub const SMALL_CALL_ROWS: std::ops::RangeInclusive<usize> = 32..=128;

/// The cluster shape of a call with fewer rows than a wave of clusters (where
/// [`cluster_shape_by_residency`] does not answer), with no forced thread count, of a vocabulary
/// whose chunks at [`MAX_CLUSTER`] CTAs take 256 threads ([`threads_for`]: one or two batches of
/// vectors a thread at [`SMALL_CALL_THREADS`]): up to [`TINY_CALL_ROWS`] rows, clusters of
/// [`MAX_FORCED_CLUSTER`] CTAs of [`SMALL_CALL_THREADS`] (where the device says one fits);
/// [`SMALL_CALL_ROWS`] rows, [`MAX_CLUSTER`] CTAs of [`SMALL_CALL_THREADS`]; else `None` (the
/// caller's fallback, [`auto_cluster_size`]: 8 CTAs of 256 threads up to 65 rows of 128256
/// classes, 4 of 512 from 66).
///
/// Measured on an H200 (2026-12-02, session 20, 128256 classes bf16, GPU µs a call in a CUDA graph
/// of 100, `results/h200-2026-12-02-s20-run3-small.txt`), rows 1 / 2 / 4 / 8 / 16 / 32 / 64 /
/// 128: the fallback 9.56 / 9.58 / 9.50 / 9.61 / 11.04 / 12.81 / 17.32 / 31.63; 16 x 128
/// 8.76 / 8.81 / 8.88 / 10.11 / 11.44 / 13.52 / 21.81 / 35.84; 8 x 128 10.19 / 10.18 / 10.10 /
/// 10.20 / 11.20 / 12.37 / 16.08 / 28.87; 16 x 256, 16 x 64 and 8 x 64 slower. Other vocabularies
/// keep the fallback (not measured).
fn small_call_shape(
    rows: usize,
    vocab: usize,
    dtype: DType,
    limits: DeviceLimits,
    keep: u32,
    threads: Option<u32>,
    active_clusters: &mut dyn FnMut(&LaunchPlan) -> Option<u32>,
) -> Option<(u32, Option<u32>)> {
    let size = MAX_CLUSTER.min(limits.max_cluster);
    let (chunk_len, real) = cluster_chunk(vocab, size);
    if threads.is_some()
        || rows == 0
        || real != MAX_CLUSTER
        || threads_for(chunk_len, dtype) != 2 * SMALL_CALL_THREADS
    {
        return None;
    }
    let fits = |size: u32| {
        cluster_launch(
            rows,
            vocab,
            dtype,
            limits,
            size,
            Some(SMALL_CALL_THREADS),
            keep,
        )
        .ok()
    };
    // (`real == MAX_CLUSTER` above: the device has clusters.)
    if rows <= TINY_CALL_ROWS
        && let Some(plan @ LaunchPlan::Cluster { size, .. }) = fits(MAX_FORCED_CLUSTER)
        && active_clusters(&plan).is_some_and(|n| n > 0)
    {
        return Some((size, Some(SMALL_CALL_THREADS)));
    }
    if SMALL_CALL_ROWS.contains(&rows) && fits(size).is_some() {
        return Some((size, Some(SMALL_CALL_THREADS)));
    }
    None
}

/// How far below the most resident bytes a launch may fall and still be chosen for having more
/// CTAs resident (see [`cluster_shape_by_residency`]). Measured on an H200 (2026-11-28), 8192 x
/// 128256 bf16: 6 CTAs of 256 threads per row (30.3 MiB and 744 CTAs resident) ran at 93.0% of
/// copy bandwidth against 88.5-89.5 for 2 of 512 (32.3 MiB, 6% more, in 264 CTAs); sizes 3 to 5
/// at 30.3 MiB in 372-620 CTAs ran at 89.8-93.1.
pub const RESIDENCY_SLACK: f64 = 0.07;

/// Threads per CTA the automatic cluster plan weighs besides [`threads_for`] the chunk (which is
/// 512 for chunks over 32 K elements of 16 bits): fewer threads need fewer registers per CTA, so
/// more CTAs fit an SM once the chunk's first vectors are kept in registers (at 40 registers, 6
/// CTAs of 256 threads against 3 of 512). Measured on an H200 (2026-11-28), same occupancy, 256
/// threads beat 512 (4096 x 262144 bf16, size 8: 84.3 against 80.9% of copy bandwidth; 8192 x
/// 128256 bf16, size 4: 86.7 against 84.6); 768 to 1024 threads lose even at equal occupancy.
pub const CLUSTER_FEW_THREADS: u32 = 256;

/// Threads per CTA the automatic cluster plan also weighs for the soft cap's 16-bit kernels
/// (`cap_` and `capacc_`, 64 registers a thread: 4 CTAs of 256 threads an SM by registers, 8 of
/// 128) when `XENT_CAP_FEW_THREADS=1`, so that more, smaller CTAs are resident where a row's
/// chunks of a bigger cluster fit them. Off: measured, it does not pay.
/// Forced shapes on an H100 (2026-12-05, session 44, sm_90, % of copy, two rounds,
/// `bench/results/h100-2026-12-05-s44-run*`): 8192 x 128256 bf16, the soft cap at 8 x 128 forced
/// 95.9 against 90.9 for the automatic 4 x 256 (f16 96.0 / 91.2), with token accuracy 85.7 / 83.3;
/// all five 73.5 / 73.6; 16384 x 151936 bf16 91.4 / 92.5. The automatic plan with it (H100,
/// session 46, `bench/results/h100-2026-12-06-s46-run1-*`): at 8192 x 128256 the residency rule
/// keeps 4 x 256 (30.3 MiB resident against 8 x 128's 26.2), and at 16384 x 151936 it takes 8 x
/// 128 on a tie (26.7 MiB), where the soft cap lost 1.8 points and with token accuracy 2.1.
pub const CLUSTER_CAP_FEW_THREADS: u32 = 128;

/// A cluster launch the automatic plan weighs, with the device's answer to how many of its
/// clusters run at once (`None`: the device did not say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterCandidate {
    pub plan: LaunchPlan,
    pub active_clusters: Option<u32>,
}

impl ClusterCandidate {
    /// Row bytes the device holds on chip at once with this launch: active clusters x CTAs per
    /// cluster x chunk bytes (what it keeps in registers and shared memory from load to store).
    pub fn resident_bytes(&self, dtype: DType) -> Option<u64> {
        let LaunchPlan::Cluster {
            chunk_len, size, ..
        } = self.plan
        else {
            return None;
        };
        let clusters = u64::from(self.active_clusters?);
        Some(clusters * u64::from(size) * u64::from(chunk_len) * dtype.bytes() as u64)
    }

    /// [`Self::resident_bytes`] averaged over the launch's waves for `rows` rows: the last wave
    /// of clusters is partly empty when `rows` is not a multiple of the active clusters (512 rows
    /// in waves of 124 clusters keep 83% of the slots busy; in waves of 132, 97%).
    pub fn mean_resident_bytes(&self, rows: usize, dtype: DType) -> Option<f64> {
        let clusters = self.active_clusters? as usize;
        if clusters == 0 {
            return Some(0.0);
        }
        let waves = rows.div_ceil(clusters).max(1);
        let busy = rows as f64 / (waves * clusters) as f64;
        Some(self.resident_bytes(dtype)? as f64 * busy)
    }

    /// CTAs the device runs at once with this launch.
    pub fn resident_ctas(&self) -> Option<u64> {
        let LaunchPlan::Cluster { size, .. } = self.plan else {
            return None;
        };
        Some(u64::from(self.active_clusters?) * u64::from(size))
    }
}

/// The launches [`cluster_shape_by_residency`] chooses from: every cluster size that fits (one
/// launch per distinct chunk), each with `threads` per CTA if given, else with [`threads_for`]
/// the chunk and with each of the kernels' [`KernelTraits::cluster_threads`] that is fewer, and
/// the device's answer for each.
pub fn cluster_candidates(
    rows: usize,
    vocab: usize,
    dtype: DType,
    limits: DeviceLimits,
    traits: KernelTraits,
    threads: Option<u32>,
    active_clusters: &mut dyn FnMut(&LaunchPlan) -> Option<u32>,
) -> Vec<ClusterCandidate> {
    let mut candidates = Vec::new();
    let query = (rows, vocab, dtype, limits, traits, threads);
    visit_cluster_candidates(query, active_clusters, &mut |c| candidates.push(c));
    candidates
}

/// (rows, vocab, dtype, limits, traits, threads): what [`cluster_candidates`] is asked.
type CandidateQuery = (usize, usize, DType, DeviceLimits, KernelTraits, Option<u32>);

/// Calls `visit` with each of [`cluster_candidates`] in turn, allocating nothing (the automatic
/// plan runs this on every call).
fn visit_cluster_candidates(
    (rows, vocab, dtype, limits, traits, threads): CandidateQuery,
    active_clusters: &mut dyn FnMut(&LaunchPlan) -> Option<u32>,
    visit: &mut dyn FnMut(ClusterCandidate),
) {
    for size in 1..=limits.max_cluster {
        let (chunk_len, real) = cluster_chunk(vocab, size);
        // Rounding the chunk can give the same launch for two requested sizes.
        if real != size {
            continue;
        }
        let (natural, keep) = (threads_for(chunk_len, dtype), traits.keep);
        // A forced count alone, else the chunk's own and each fewer one of the kernels'.
        let (first, fewer) = match threads {
            Some(t) => (t, &[][..]),
            None => (natural, traits.cluster_threads),
        };
        let fewer = fewer.iter().copied().filter(|&t| t < natural);
        for t in std::iter::once(first).chain(fewer) {
            if !valid_cluster_threads(t) {
                continue;
            }
            if let Ok(plan) = cluster_launch(rows, vocab, dtype, limits, size, Some(t), keep) {
                let active_clusters = active_clusters(&plan);
                visit(ClusterCandidate {
                    plan,
                    active_clusters,
                });
            }
        }
    }
}

/// The cluster size and threads per CTA (of [`cluster_candidates`]) that keep the most of the
/// rows on chip across the whole device over the launch
/// ([`ClusterCandidate::mean_resident_bytes`]). Of the launches within [`RESIDENCY_SLACK`] of
/// the most, one of a size other than [`CLUSTER_SIZE_LAST`] if any, then the one with the most
/// CTAs resident (smaller CTAs, so more of them are loading while others reduce), then the
/// smaller cluster, then fewer threads. `None` if the device does not
/// answer for some candidate, or if there are fewer rows than clusters in one wave of some
/// candidate.
///
/// Why: the cluster kernel holds a chunk on chip from its load to its gradient store, so the
/// bytes it can have in flight are the resident bytes; clusters are placed whole within a GPC,
/// which leaves some CTA slots empty (sizes that do not divide the GPC's free slots) in a way
/// only the driver knows. Measured on an H200 (2026-11-28, all of a chunk in shared memory, % of
/// copy bandwidth by size, resident MiB in brackets): 16384 x 151936 bf16: 4: 87.7 (26.8), 7:
/// 83.9 (24.6), 5: 78.3 (20.1); 8192 x 128256 bf16: 6: 84.8 (24.9), 4: 84.4 (22.6), 5: 81.3
/// (23.2); 4096 x 262144 bf16: 5: 81.6 (23.6), 6: 76.3 (19.6), 4: 70.2 (15.0). With 2 vectors per
/// thread in registers (same day, size/threads, MiB, CTAs): 4096 x 262144 bf16: 6/512 (31.0,
/// 372) 91.3, 4/512 (31.0, 248) 89.5-90.0, 8/256 (22.5) 84.8, 4/256 (15.0) 60.4; 16384 x 151936
/// bf16: 7/256 (29.3, 707) 92.8-93.1, 4/512 (26.7, 368) 90.9-91.3; 8192 x 32000 bf16: 1/256
/// (32.2, 528) 90.4, 1/512 (24.2, 396) 89.1; 8192 x 128256 f32: 8/256 (30.3, 496) 95.9-96.3,
/// 4/512 (30.3, 248) 96.6.
pub fn cluster_shape_by_residency(
    rows: usize,
    vocab: usize,
    dtype: DType,
    limits: DeviceLimits,
    traits: KernelTraits,
    threads: Option<u32>,
    active_clusters: &mut dyn FnMut(&LaunchPlan) -> Option<u32>,
) -> Option<(u32, u32)> {
    let query = (rows, vocab, dtype, limits, traits, threads);
    // First pass: the most mean resident bytes, if the device answered for every launch and
    // every launch has at least a wave of rows. With fewer rows than one full wave of clusters,
    // the grid, not the chip, limits what is in flight (the caller's fallback spreads few rows
    // over more CTAs).
    let (mut most, mut known) = (0.0f64, true);
    visit_cluster_candidates(query, active_clusters, &mut |c| match (
        c.active_clusters,
        c.mean_resident_bytes(rows, dtype),
    ) {
        (Some(clusters), Some(bytes)) if clusters as usize <= rows => most = most.max(bytes),
        _ => known = false,
    });
    if !known || most <= 0.0 {
        return None;
    }
    // Second pass: of the launches within the slack, any of a size other than
    // [`CLUSTER_SIZE_LAST`], then the most CTAs resident, then the smaller cluster, then fewer
    // threads.
    let mut best: Option<(bool, std::cmp::Reverse<u64>, u32, u32)> = None;
    visit_cluster_candidates(query, active_clusters, &mut |c| {
        let (LaunchPlan::Cluster { size, threads, .. }, Some(bytes), Some(ctas)) = (
            c.plan,
            c.mean_resident_bytes(rows, dtype),
            c.resident_ctas(),
        ) else {
            return;
        };
        let key = (
            size == CLUSTER_SIZE_LAST,
            std::cmp::Reverse(ctas),
            size,
            threads,
        );
        if bytes >= most * (1.0 - RESIDENCY_SLACK) && best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    });
    best.map(|(_, _, size, threads)| (size, threads))
}

/// The cluster size [`cluster_shape_by_residency`] takes only when no other size is within
/// [`RESIDENCY_SLACK`] of the most resident bytes. Measured on an H200 (2026-12-03, every size
/// 4-8 forced at 256, 384 and 512 threads, 8192 x 128256, 4096 x 262144 and 16384 x 151936 bf16
/// and 8192 x 128256 f16, four option sets, `bench/results/h200-2026-12-03-s26-runD-*`): size 5
/// was the best shape in none of the 16 tables, and at 256 threads it ran below size 4 in every
/// table but 4096 x 262144's, whatever the option set (plain 8192 x 128256 bf16: 91.0 / 88.9 /
/// 92.2% of copy at sizes 4 / 5 / 6). The driver's answers (`--explain`, `-s27-run1-*`) left it
/// tied with others: token accuracy's kernels (47 registers) at 8192 x 128256 keep 124 clusters
/// of 4 and of 5 x 256 (30.3 MiB) against 101 of 6, and the tie went to 5 for its CTAs. With
/// this rule (`-s27-run5-*`): 4 x 256, 87.7% of copy in bf16 and 89.1 in f16, against 85.8 and
/// 86.2 for 5 x 256 forced in the same run.
pub const CLUSTER_SIZE_LAST: u32 = 5;

/// Elements per chunk the vocabulary-parallel shard kernels aim at ([`shard_chunking`]).
/// Measured on an H200 (2026-12-01, % of the shard kernels' traffic bound, bf16, shards of
/// 8192 x 151936 / P): chunks of 4096 or 8192 elements 96-97% at P = 4 and 88-90% at P = 8;
/// the chunked plan's one 32768-element tile 76% and 85% (one 512-thread block per SM, and a
/// ragged last chunk); 16384 91% and 79%. 8192 keeps the collective at half of 4096's.
pub const SHARD_CHUNK: usize = 8192;

/// The chunking of a vocabulary shard of `width` columns: `(chunk_len, n_chunks, threads)`, with
/// chunks of about [`SHARD_CHUNK`] elements, as even as whole vectors allow (a multiple of 8).
/// Each chunk adds [`PARTIAL_WORDS`] f32 values per row to the collective.
pub fn shard_chunking(width: usize, dtype: DType) -> (usize, usize, u32) {
    let width = width.max(1);
    let n_chunks = width.div_ceil(SHARD_CHUNK);
    let chunk_len = width.div_ceil(n_chunks).next_multiple_of(8);
    (
        chunk_len,
        width.div_ceil(chunk_len),
        threads_for(chunk_len, dtype),
    )
}

/// Bytes of a row each CTA of the split plan keeps in shared memory, at most: two CTAs fit in an
/// A100's 164 KiB per SM. (Session 17: chunks of half this size, to keep two rows a CTA, lost
/// 15-20 points of copy.)
pub const SPLIT_CHUNK_BYTES: usize = 80 * 1024;
/// Threads per CTA of the split plan, at most, for the plain kernels (the per-row option kernels
/// take [`SPLIT_OPTION_THREADS`], the soft cap's in f32 [`SPLIT_CAP_THREADS`]): the plain kernels
/// take at most 80 registers (`cargo xtask ptx`), so three CTAs of 256 threads fit in an SM's 64 K
/// registers. (Session 17: 384 and 512 threads lost resident CTAs and 1-30 points of copy; session
/// 41: at two CTAs an SM, as many as an A100's shared memory holds, the plain kernels at 384 lost
/// 2.7-5.0 points.)
pub const SPLIT_MAX_THREADS: u32 = 256;
/// Threads per CTA of the split plan, at most, for the per-row option kernels (`coef_`: label
/// smoothing, the z-loss, class weights; `acc_`: token accuracy; `wsm_`: class-weighted
/// smoothing), all capped at 80 registers: two CTAs of 384 threads share an SM's 64 K registers,
/// as many as an A100's shared memory holds of their chunks. Session 41, H100 under an A100's
/// limits on 108 SMs, two rounds, % of copy at 8192 x 128256 bf16, 4096 x 262144 bf16, 16384 x
/// 151936 bf16, 8192 x 128256 f32, against 256 threads: token accuracy 74.7 / 76.0 / 80.8 / 81.2
/// against 73.4 / 72.2 / 75.6 / 76.8, smoothing 79.1 / 80.6 / 84.5 / 86.5 against 79.2 / 77.5 /
/// 81.0 / 82.8, class-weighted smoothing 53.2 / 49.8 / 56.5 / 57.4 against 49.5 / 44.0 / 50.8 / 49.2
/// (uncapped). The plain kernels lost 2.7-5.0 points at 384, so they keep 256. The soft cap's
/// kernels take it in 16 bits since session 42 (`cap_` at 80 registers, two CTAs an SM; `capacc_`
/// uncapped, one), [`SPLIT_CAP_THREADS`] in f32 (`kernels::kernel_traits`).
pub const SPLIT_OPTION_THREADS: u32 = 384;

/// Threads per CTA of the split plan, at most, for the soft cap's kernels in f32 (`cap_`, and
/// `capacc_`: with token accuracy or class-weighted smoothing), whose passes take one vector at a
/// time from the chunk in shared memory (session 42) and are capped at 64 registers: two CTAs of
/// 512 threads fill an SM's 64 K registers, as many as an A100's shared memory holds of their
/// chunks. In 16 bits they take [`SPLIT_OPTION_THREADS`] (`kernels::kernel_traits`).
pub const SPLIT_CAP_THREADS: u32 = 512;

/// The split plan's automatic chunk: the fewest chunks of at most [`SPLIT_CHUNK_BYTES`], even,
/// rounded up to a multiple of [`SPLIT_CHUNK_ALIGN_BYTES`] (a row's only chunk: to 8 elements).
/// The rounding keeps the bound (a multiple of the alignment) and, up to the
/// [`SPLIT_AUTO_MAX_CHUNKS`] the automatic plan takes, the count: with two chunks or more each is
/// over half the bound, and the last loses at most 7 x 255 bytes.
pub fn auto_split_chunk_len(vocab: usize, dtype: DType) -> usize {
    let even = even_chunk_len(vocab, dtype, SPLIT_CHUNK_BYTES);
    even.next_multiple_of(SPLIT_CHUNK_ALIGN_BYTES / dtype.bytes())
        .min(vocab.next_multiple_of(8))
}

/// Bytes the split plan's automatic chunk is a multiple of where it can be, so that every chunk of
/// a row whose own start is so aligned starts on a 256-byte boundary. On an H100 under an A100's
/// limits on 108 SMs (session 40, `bench/results/h100-2026-12-05-s40-run4-*`, two rounds, the same
/// chunk counts), 256-byte chunks gained 1.3 to 2.1 points of copy over the even chunks to 8
/// elements: 4096 x 262144 bf16 (7 chunks, 37456 -> 37504 elements) 84.0 -> 86.1, 16384 x 151936
/// bf16 (4, 37984 -> 38016) 87.9 -> 89.2, 8192 x 128256 f32 (7, 18328 -> 18368) 86.3 -> 88.2, where
/// 128-byte chunks (18336) took 87.5. On the H200 under the same limits
/// (`h200-2026-12-05-s40-run5-*`, the chunks of this rule against session 39's even ones) 71.2
/// against 69.5, 75.7 against 74.3, 75.5 against 74.2 at those shapes, and 75.4 / 76.1 against 74.6
/// / 75.2 at 8192 x 128256 bf16 / f16 (32128 against 32064 elements, both in one run). The sm_90
/// cluster kernels moved by -0.2 to +0.75 with their chunks' alignment (one round,
/// `h100-2026-12-05-s40-run2-sm90-aligned-v.txt`), so only the split plan rounds.
pub const SPLIT_CHUNK_ALIGN_BYTES: usize = 256;

/// Elements of a row each CTA of the split_l2 plan reads: 16 KiB in 16 bits (one batch of
/// [`UNROLL`] vectors for each of 128 threads, so six CTAs an SM at its 80 registers), 32 KiB in
/// f32 (256 threads, three). Its L2 holds two chunks a resident CTA (the one reduced, the one whose
/// gradient is written): about 20 MiB on an A100's 108 SMs, half its L2. On the H200 under an
/// A100's limits on 108 SMs (session 39, `bench/results/h200-2026-12-05-s39-run1-*`, two rounds),
/// chunks of this length beat even 32 KiB chunks (16032 elements in 16 bits, 8016 in f32) at every
/// shape measured: 70.8 / 73.5 / 69.6 / 70.6 / 76.3% of copy against 68.2 / 69.1 / 66.5 / 68.0 /
/// 74.3 at 8192 x 128256 bf16, 4096 x 262144 bf16, 16384 x 151936 bf16, 8192 x 128256 f16 and f32;
/// the split plan ran at 74.7 / 69.5 / 74.3 / 74.9 / 74.2 in the same run, so session 39 made
/// split_l2 the automatic plan where the split plan cuts a row into 6-8 chunks. On an H100 under
/// the same limits (session 40, `bench/results/h100-2026-12-05-s40-run3-*`) the order reversed:
/// split_l2 78.2 (4096 x 262144 bf16) and 77.8 (8192 x 128256 f32) against the split plan's 84.5
/// and 86.6 (on the H200 split_l2 still won there with the 256-byte chunks, 73.6 against 71.2 and
/// 77.0 against 75.5). The emulation on 108 of the H200's SMs asks each SM for 44 GB/s (4.8 TB/s /
/// 108), on the H100's 31, where an A100 80 GB asks 19 (2.0 TB/s / 108) and the other sm_80 and
/// sm_89 GPUs less: split_l2 won only on the emulation that asks each SM for the most, further
/// from an A100 than the H100's, so it is a forced plan only.
pub const SPLIT_L2_CHUNK_LEN: usize = 8192;

/// Dynamic shared memory of a split_l2 CTA of `threads`: the reduction's scratch, then one batch of
/// [`UNROLL`] 16-byte vectors a thread, where the staged variant of the kernel copies its group's
/// next row (`bench/experiments/split-l2-staged.patch`, 10-23 points of copy slower in session 39;
/// main's kernel reads into registers and leaves it unused). At up to 256 threads that is 32 KiB:
/// three such CTAs, as many as main's kernel's 80 registers allow, fit in an A100's SM.
pub fn split_l2_smem_bytes(threads: u32) -> u32 {
    SMEM_STASH_OFFSET + threads * (UNROLL * 16) as u32
}

/// The split_l2 plan's automatic chunk: [`SPLIT_L2_CHUNK_LEN`] elements (the last chunk of a row
/// takes what is left), or the whole row to a multiple of 8.
pub fn auto_split_l2_chunk_len(vocab: usize) -> usize {
    SPLIT_L2_CHUNK_LEN.min(vocab.next_multiple_of(8))
}

/// The fewest chunks of `vocab` of at most `bytes`, even to a multiple of 8 elements.
fn even_chunk_len(vocab: usize, dtype: DType, bytes: usize) -> usize {
    let n_chunks = (vocab * dtype.bytes()).div_ceil(bytes).max(1);
    vocab.div_ceil(n_chunks).next_multiple_of(8)
}

/// A forced chunk length must be a positive multiple of 8 (whole 16-byte vectors of 16-bit
/// elements).
fn check_chunk_len(chunk_len: usize) -> Result<()> {
    if chunk_len == 0 || !chunk_len.is_multiple_of(8) {
        return Err(Error::PlanDoesNotFit(format!(
            "chunk_len {chunk_len} must be a positive multiple of 8"
        )));
    }
    Ok(())
}

/// The split plan of `rows` rows of `vocab` with chunks of `chunk_len` (`in_l2`: the chunks left in
/// L2, no stash in shared memory) and `threads` per CTA (forced, or automatic: [`threads_for`] the
/// chunk, up to the kernels' bound): `groups` as many groups of CTAs as are resident at once
/// (`resident`, the device's answer for the launch with one group; without one, one CTA per SM),
/// at most one per row.
#[allow(clippy::too_many_arguments)]
fn split_plan(
    rows: usize,
    vocab: usize,
    dtype: DType,
    limits: DeviceLimits,
    (threads, max_threads): (Option<u32>, u32),
    chunk_len: usize,
    in_l2: bool,
    resident: &mut dyn FnMut(&LaunchPlan) -> Option<u32>,
) -> Result<LaunchPlan> {
    if limits.max_cluster > 1 {
        let name = if in_l2 { "split_l2" } else { "split" };
        return Err(Error::PlanDoesNotFit(format!(
            "the {name} plan is the sm_80 kernels' (this device runs the cluster plan)"
        )));
    }
    check_chunk_len(chunk_len)?;
    let chunk_len = chunk_len.min(vocab.next_multiple_of(8));
    let threads = match threads {
        Some(t) if !valid_threads(t, MAX_THREADS) => {
            return Err(Error::PlanDoesNotFit(format!(
                "{t} threads per CTA: the split plan takes a multiple of 32 up to {MAX_THREADS}"
            )));
        }
        Some(t) => t,
        None => threads_for(chunk_len, dtype).min(max_threads),
    };
    let stash = if in_l2 {
        Some(split_l2_smem_bytes(threads))
    } else {
        fused_smem_bytes(chunk_len, dtype)
    };
    let smem_bytes = stash
        .filter(|&b| b <= limits.max_smem_per_block)
        .ok_or_else(|| {
            Error::PlanDoesNotFit(format!(
                "a chunk of {chunk_len} {} elements does not fit in {} bytes of shared memory",
                dtype.name(),
                limits.max_smem_per_block
            ))
        })?;
    let n_chunks = vocab.div_ceil(chunk_len) as u32;
    let with_groups = |groups: usize| LaunchPlan::Split {
        threads,
        chunk_len: chunk_len as u32,
        n_chunks,
        groups: groups as u32,
        smem_bytes,
        in_l2,
    };
    let ctas = resident(&with_groups(1)).unwrap_or(limits.sm_count) as usize;
    let groups = (ctas / n_chunks as usize).min(rows.max(1));
    if groups == 0 {
        return Err(Error::PlanDoesNotFit(format!(
            "{n_chunks} CTAs a row, {ctas} resident at once"
        )));
    }
    check_grid(groups, n_chunks as usize, "CTAs")?;
    Ok(with_groups(groups))
}

/// Chunks a row at most where the automatic plan takes the split plan. On an H200 under an A100's
/// limits (2026-12-02, session 18, each CTA copying its next row behind its gradient) the split
/// plan beat the chunked plan by 7.8-8.5 points of copy at four chunks a row (8192 x 128256 in
/// 16-bit, 16384 x 151936 bf16) and by 5.1 and 8.0 at seven (4096 x 262144 bf16, 8192 x 128256
/// f32); more chunks were not measured.
pub const SPLIT_AUTO_MAX_CHUNKS: u32 = 8;

/// Whether a split plan runs as many groups as are resident, not fewer for lack of rows: the
/// automatic plan takes it only then (and at most [`SPLIT_AUTO_MAX_CHUNKS`] chunks a row, checked
/// before it plans).
fn split_is_full(plan: &LaunchPlan, rows: usize) -> bool {
    matches!(*plan, LaunchPlan::Split { groups, .. } if (groups as usize) < rows)
}

/// The chunk length of the automatic chunked plan: one tile, halved while the grid would leave
/// SMs idle (fewer than [`MIN_BLOCKS_PER_SM`] blocks per SM), but not below [`MIN_CHUNK`].
pub fn auto_chunk_len(rows: usize, vocab: usize, limits: DeviceLimits) -> usize {
    let wanted_blocks = MIN_BLOCKS_PER_SM * limits.sm_count as usize;
    let mut chunk = tile_len(vocab).next_multiple_of(8);
    while chunk > MIN_CHUNK && rows.saturating_mul(vocab.div_ceil(chunk)) < wanted_blocks {
        chunk /= 2;
    }
    chunk
}

/// Grid of the count kernel: enough blocks to cover the rows, capped per SM.
pub fn count_blocks(rows: usize, limits: DeviceLimits) -> u32 {
    let cap = COUNT_BLOCKS_PER_SM * limits.sm_count.max(1) as usize;
    rows.div_ceil(COUNT_THREADS as usize).clamp(1, cap) as u32
}

/// Threads per block of the predicted-tokens kernel (`xent_argmax_*`).
pub const ARGMAX_THREADS: u32 = 512;
/// Blocks per SM of the predicted-tokens kernel at most (four of 512 threads fill an SM); each
/// block takes rows `b, b + grid, ...`.
pub const ARGMAX_BLOCKS_PER_SM: usize = 4;

/// Grid of the predicted-tokens kernel: a block a row, capped per SM.
pub fn argmax_blocks(rows: usize, limits: DeviceLimits) -> u32 {
    let cap = ARGMAX_BLOCKS_PER_SM * limits.sm_count.max(1) as usize;
    rows.clamp(1, cap) as u32
}

/// Tiles per row of the scaling kernel.
pub fn scale_tiles(vocab: usize) -> usize {
    vocab.div_ceil(SCALE_TILE)
}

/// `f32` words of the `partials` buffer a call over `rows` rows with `launch` needs: one chunk
/// summary per chunk of the chunked plan, none for the others.
pub fn partials_len(rows: usize, launch: &LaunchPlan) -> usize {
    match *launch {
        LaunchPlan::Chunked { n_chunks, .. } => PARTIAL_WORDS * rows * n_chunks as usize,
        // Two summaries per CTA (split_l2: `SPLIT_L2_SLOTS`), then a counter per group.
        LaunchPlan::Split {
            n_chunks,
            groups,
            in_l2,
            ..
        } => (split_slots(in_l2) * PARTIAL_WORDS * n_chunks as usize + 1) * groups as usize,
        _ => 0,
    }
}

/// Summary slots a split plan's CTA has in `partials` (before the groups' counters).
pub fn split_slots(in_l2: bool) -> usize {
    if in_l2 { SPLIT_L2_SLOTS } else { 2 }
}

/// The scaling kernel's grid: (tiles per row, blocks). Its blocks loop over the tiles, so the grid
/// is capped at `SCALE_BLOCKS_PER_SM` blocks per SM: an upstream of exactly 1, which each block
/// checks before touching memory, then costs one small launch instead of one block per tile.
pub fn scale_grid(rows: usize, vocab: usize, limits: DeviceLimits) -> Result<(usize, u32)> {
    let n_tiles = scale_tiles(vocab);
    let tiles = rows
        .checked_mul(n_tiles)
        .ok_or_else(|| Error::BadShape("rows * tiles overflows".into()))?;
    let cap = (limits.sm_count as usize * SCALE_BLOCKS_PER_SM).max(1);
    Ok((n_tiles, tiles.min(cap) as u32))
}

/// The grid of a kernel that takes rows in tiles of `SCALE_TILE` (two-phase backward):
/// (tiles per row, blocks), or `PlanDoesNotFit` past the grid limit.
pub fn tile_grid(rows: usize, vocab: usize) -> Result<(usize, u32)> {
    let n_tiles = scale_tiles(vocab);
    check_grid(rows, n_tiles, "tiles")?;
    Ok((n_tiles, (rows * n_tiles) as u32))
}

/// Whether a call of `rows` rows under `plan` takes one launch instead of three (count, the
/// cross-entropy kernel, finish): each CTA counts the labels itself and the last to finish
/// reduces the loss (`XentParams::self_finish`). Fused and cluster plans, with at most as many
/// rows as a block has threads (each thread then takes at most one row, as in the count and
/// finish kernels, so the loss has the same bits), and not label smoothing with class weights
/// (its `Σ_j weight[j]` is the count kernel's).
pub fn self_finish(rows: usize, plan: &LaunchPlan, opts: &Options, weighted: bool) -> bool {
    let threads = match *plan {
        LaunchPlan::Fused { threads, .. } | LaunchPlan::Cluster { threads, .. } => threads,
        LaunchPlan::Chunked { .. } | LaunchPlan::Split { .. } => return false,
    };
    rows > 0 && rows <= threads as usize && !(weighted && opts.label_smoothing != 0.0)
}

/// Whether a call that [`self_finish`] allows may take the cluster plan's small-call kernels
/// (`xent_cluster_small_*`, ordered for latency: the labels' count overlaps the chunk's loads):
/// a cluster plan, at most [`SMALL_KERNEL_ROWS`] rows, and no loss option that changes the
/// kernel (the plain variant). The same bits as the cluster kernel.
pub fn small_kernel(rows: usize, plan: &LaunchPlan, opts: &Options, weighted: bool) -> bool {
    matches!(plan, LaunchPlan::Cluster { .. })
        && rows <= SMALL_KERNEL_ROWS
        && self_finish(rows, plan, opts, weighted)
        && crate::kernels::variant(opts, weighted, opts.return_token_accuracy).is_empty()
}
