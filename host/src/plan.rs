//! Launch planning: pure functions of (rows, vocab, dtype, device limits), tested without a GPU.
//! Every tuning constant is here, with the reason for its value.

use crate::abi::SMEM_REDUCTION_BYTES;
use crate::error::{Error, Result};
use crate::options::DType;

/// Largest tile, in elements, that one block walks per step: the seed's `MAX_FUSED_SIZE` (32768),
/// which also caps a bf16 block at 1024 threads x 4 vectors of 8.
pub const MAX_TILE: usize = 32768;
/// Vectors each thread loads before using the first (`UNROLL` in kernels-gpu/src/xent.rs).
pub const UNROLL: usize = 4;
/// Threads per block: at most the hardware's 1024, at least one warp.
pub const MAX_THREADS: u32 = 1024;
pub const MIN_THREADS: u32 = 32;
/// The chunked plan wants at least this many blocks per SM so the GPU is full; below it, chunks
/// are halved (down to `MIN_CHUNK`). Two blocks per SM let one load while the other reduces.
pub const MIN_BLOCKS_PER_SM: usize = 2;
/// Smallest chunk the automatic plan makes: below this a chunk's block is mostly overhead.
pub const MIN_CHUNK: usize = 2048;
/// Elements per block of the scaling kernel, and its threads (8 elements per thread for bf16).
pub const SCALE_TILE: usize = 8192;
pub const SCALE_THREADS: u32 = 256;
/// Threads of the count kernel; its grid is capped at `COUNT_BLOCKS_PER_SM` blocks per SM.
pub const COUNT_THREADS: u32 = 256;
pub const COUNT_BLOCKS_PER_SM: usize = 4;
/// Threads of the single block that reduces per-row losses.
pub const FINISH_THREADS: u32 = 1024;
/// CUDA's limit on `gridDim.x`.
pub const MAX_GRID_X: usize = (1 << 31) - 1;

/// What planning needs to know about the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Dynamic shared memory a block may opt in to (bytes).
    pub max_smem_per_block: u32,
}

impl DeviceLimits {
    /// An H100/H200 (132 SMs, 227 KiB per block).
    pub const H100: DeviceLimits = DeviceLimits {
        sm_count: 132,
        max_smem_per_block: 232_448,
    };
    /// An A100 (108 SMs, 163 KiB per block).
    pub const A100: DeviceLimits = DeviceLimits {
        sm_count: 108,
        max_smem_per_block: 166_912,
    };
}

/// Which kernels to run: automatic, or forced (for tests and benchmarks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlanChoice {
    #[default]
    Auto,
    /// One block per row, the row kept in shared memory: one read and one write per element.
    Fused,
    /// Rows split into chunks: partial log-sum-exp per chunk, then combine + gradient (two reads).
    /// `chunk_len` (a positive multiple of 8) or the automatic choice.
    Chunked { chunk_len: Option<usize> },
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
}

/// The seed's block size: the next power of two of `vocab`, at most [`MAX_TILE`].
pub fn tile_len(vocab: usize) -> usize {
    vocab.next_power_of_two().min(MAX_TILE)
}

/// Threads to walk `len` elements with `UNROLL` vectors per thread per step.
pub fn threads_for(len: usize, dtype: DType) -> u32 {
    let per_thread = dtype.vec() * UNROLL;
    let wanted = len.div_ceil(per_thread).min(MAX_THREADS as usize) as u32;
    wanted.next_power_of_two().clamp(MIN_THREADS, MAX_THREADS)
}

/// Dynamic shared memory of the fused plan: reduction scratch, 16 bytes of alignment slack, and
/// the row.
pub fn fused_smem_bytes(vocab: usize, dtype: DType) -> Option<u32> {
    let bytes = SMEM_REDUCTION_BYTES as usize + 16 + vocab.checked_mul(dtype.bytes())?;
    u32::try_from(bytes.next_multiple_of(16)).ok()
}

/// Chooses the kernels and their launch shape.
pub fn plan(
    rows: usize,
    vocab: usize,
    dtype: DType,
    limits: DeviceLimits,
    choice: PlanChoice,
) -> Result<LaunchPlan> {
    if vocab == 0 || vocab > (u32::MAX / 2) as usize {
        return Err(Error::PlanDoesNotFit(format!(
            "vocab {vocab} is outside [1, 2^31)"
        )));
    }
    let smem = fused_smem_bytes(vocab, dtype).filter(|&b| b <= limits.max_smem_per_block);
    let fused = |smem_bytes| {
        if rows > MAX_GRID_X {
            return Err(Error::PlanDoesNotFit(format!(
                "{rows} rows exceed the grid limit"
            )));
        }
        Ok(LaunchPlan::Fused {
            threads: threads_for(tile_len(vocab), dtype),
            smem_bytes,
        })
    };
    let chunked = |chunk_len: usize| {
        if chunk_len == 0 || !chunk_len.is_multiple_of(8) {
            return Err(Error::PlanDoesNotFit(format!(
                "chunk_len {chunk_len} must be a positive multiple of 8"
            )));
        }
        let chunk_len = chunk_len.min(vocab.next_multiple_of(8));
        let n_chunks = vocab.div_ceil(chunk_len);
        if rows
            .checked_mul(n_chunks)
            .is_none_or(|blocks| blocks > MAX_GRID_X)
        {
            return Err(Error::PlanDoesNotFit(format!(
                "{rows} rows x {n_chunks} chunks exceed the grid limit"
            )));
        }
        Ok(LaunchPlan::Chunked {
            threads: threads_for(chunk_len, dtype),
            chunk_len: chunk_len as u32,
            n_chunks: n_chunks as u32,
        })
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
        PlanChoice::Auto => {
            let enough_rows = rows >= limits.sm_count as usize;
            match smem {
                Some(bytes) if enough_rows => fused(bytes),
                _ => chunked(auto_chunk_len(rows, vocab, limits)),
            }
        }
    }
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

/// Tiles per row of the scaling kernel.
pub fn scale_tiles(vocab: usize) -> usize {
    vocab.div_ceil(SCALE_TILE)
}
