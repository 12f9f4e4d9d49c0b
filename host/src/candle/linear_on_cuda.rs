//! [`linear_cross_entropy`](super::linear_cross_entropy) on CUDA tensors (cargo feature
//! `candle-cuda`): `xent::linear`'s raw API on candle's buffers and stream.
//!
//! With gradients to come and a scalar loss (the mean or the sum), the forward runs the fused
//! pass (`LinearPass::Fused`: three GEMMs a chunk) and keeps both gradients of
//! `grad_scale · loss` in the op; the backward scales each in place by the upstream gradient
//! (xent's scale kernel, which leaves a factor of exactly 1 alone) and hands it over. Otherwise
//! two-phase: the forward (`LinearPass::Forward`) keeps the label counts and per-row
//! log-sum-exps, and the backward (`LinearPass::Backward`) computes the chunks' logits again and
//! writes both gradients of `upstream · loss` (per row for `Reduction::None`) into one new buffer
//! (the hidden states', then the weight's). A gradient that is a sum (the weight's over chunks of
//! rows, the hidden states' over blocks of the vocabulary) is summed in f32 and rounded once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType as CandleDType, Layout, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream};

use super::err;
use super::linear::linear_shape;
use super::on_cuda::{
    self, Saved, SavedSlot, device_options, driver, handle, labels_of, upload_weight, view,
};
use crate::abi::COUNT_WORDS;
use crate::cublaslt::CublasLt;
use crate::cuda::CrossEntropy;
use crate::linear::{LinearPass, RawGrad, RawLinearCall, RawLinearGrads, RawLinearScratch};
use crate::options::{DType, Options, Reduction, Shape};
use crate::raw::{RawBuffer, RawLoss};

/// cuBLASLt, opened once per process (from `XENT_CUBLASLT` or the loader's path: candle's own
/// build links the same library).
fn blas() -> candle_core::Result<&'static CublasLt> {
    static BLAS: OnceLock<Result<CublasLt, String>> = OnceLock::new();
    BLAS.get_or_init(|| CublasLt::open(&[]).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| candle_core::Error::Msg(format!("xent linear_cross_entropy: {e}")))
}

/// One scratch per device (its chunk of logits and cuBLASLt's workspace), kept between calls and
/// grown when a call needs more; held for the call.
type ScratchSlot = Arc<Mutex<Scratch>>;

#[derive(Default)]
struct Scratch {
    logits: Option<CudaSlice<u8>>,
    workspace: Option<CudaSlice<u8>>,
    labels: Option<CudaSlice<u8>>,
}

fn scratch_of(ordinal: usize) -> ScratchSlot {
    static SCRATCH: OnceLock<Mutex<HashMap<usize, ScratchSlot>>> = OnceLock::new();
    SCRATCH
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(ordinal)
        .or_default()
        .clone()
}

/// `slot`'s buffer of at least `bytes` (one byte when 0), reallocated on `stream` if shorter.
fn reserve(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<u8>>,
    bytes: usize,
) -> candle_core::Result<RawBuffer> {
    if slot.as_ref().is_none_or(|b| b.len() < bytes.max(1)) {
        *slot = Some(stream.alloc_zeros::<u8>(bytes.max(1)).map_err(driver)?);
    }
    Ok(RawBuffer::of(
        stream,
        slot.as_mut().expect("reserved above"),
    ))
}

/// The hidden states' or the weight's values as xent reads them: buffer, dtype and the guard.
fn values_of<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    stream: &'a CudaStream,
) -> candle_core::Result<(RawBuffer, DType, cudarc::driver::SyncOnDrop<'a>)> {
    on_cuda::values_of(storage, layout, stream, "xent linear_cross_entropy: values")
}

/// Runs `pass` of the call on `stream` in the device's scratch.
#[allow(clippy::too_many_arguments)]
fn run(
    xent: &CrossEntropy,
    stream: &Arc<CudaStream>,
    call: &RawLinearCall,
    opts: &Options,
    pass: LinearPass,
    out: &RawLoss,
    grads: &RawLinearGrads,
) -> candle_core::Result<()> {
    let lens = xent
        .raw_linear_scratch_lens(call, opts, pass, None)
        .map_err(err)?;
    let slot = scratch_of(stream.context().ordinal());
    let mut kept = slot.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = RawLinearScratch {
        chunk_rows: lens.chunk_rows,
        logits: reserve(stream, &mut kept.logits, lens.logits_bytes)?,
        gemm_workspace: reserve(stream, &mut kept.workspace, lens.gemm_workspace_bytes)?,
        labels: match lens.labels_bytes {
            0 => None,
            bytes => Some(reserve(stream, &mut kept.labels, bytes)?),
        },
        // No bias, so no bias gradient and no ones.
        ones: None,
    };
    // SAFETY: every address is a live buffer of candle's or of this module's on `stream`'s
    // context, of the stated type and length (the layouts were checked contiguous); the scratch
    // stays locked, and cudarc's stream order keeps every buffer alive for the enqueued work.
    unsafe { xent.raw_linear(blas()?, stream, call, opts, pass, out, grads, &scratch) }.map_err(err)
}

/// The forward op on CUDA: the loss (a scalar, or per row for `Reduction::None`), and what the
/// backward needs kept in `saved`: with `fused`, both gradients of `grad_scale · loss`.
pub(super) fn forward(
    opts: &Options,
    fused: bool,
    saved: &SavedSlot,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
    let shape = linear_shape(l1, l2, l3)?;
    let rows = shape.rows();
    let device = s1.device.clone();
    let stream = device.cuda_stream();
    let xent = handle(stream.context().ordinal())?;
    let dev_opts = device_options(opts);
    let mut weight = upload_weight(opts, &stream)?;
    let (hidden, dtype, _g1) = values_of(s1, l1, &stream)?;
    let (head, _, _g2) = values_of(s2, l2, &stream)?;
    let (labels, label_type, _g3) = labels_of(s3, l3, &stream)?;
    let call = RawLinearCall {
        hidden,
        weight: head,
        bias: None,
        dtype,
        labels,
        label_type,
        shape,
        class_weight: weight.as_mut().map(|w| RawBuffer::of(&stream, w)),
    };
    let pass = if fused {
        LinearPass::Fused
    } else {
        LinearPass::Forward
    };
    let lens = xent
        .raw_linear_scratch_lens(&call, &dev_opts, pass, None)
        .map_err(err)?;
    let alloc = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(driver);
    let mut loss = alloc(1)?;
    let mut row_loss = alloc(rows)?;
    let mut row_lse = alloc(rows)?;
    let mut counts = stream.alloc_zeros::<u32>(COUNT_WORDS).map_err(driver)?;
    let mut extras = alloc(2)?;
    let mut row_correct = match opts.return_token_accuracy {
        true => Some(stream.alloc_zeros::<u32>(rows.max(1)).map_err(driver)?),
        false => None,
    };
    let mut workspace = match lens.loss_workspace_len {
        0 => None,
        n => Some(alloc(n)?),
    };
    let out = RawLoss {
        loss: RawBuffer::of(&stream, &mut loss),
        row_loss: RawBuffer::of(&stream, &mut row_loss),
        row_lse: RawBuffer::of(&stream, &mut row_lse),
        counts: RawBuffer::of(&stream, &mut counts),
        extras: RawBuffer::of(&stream, &mut extras),
        row_correct: row_correct.as_mut().map(|c| RawBuffer::of(&stream, c)),
        predicted: None,
        entropy: None,
        workspace: workspace.as_mut().map(|w| RawBuffer::of(&stream, w)),
    };
    // The fused pass's gradients, both in f32 and rounded to the values' dtype once at the end:
    // the weight's is summed over the chunks of rows, and the hidden states' over the blocks of
    // the vocabulary where chunks under the card's `linear_row_scheme_rows` take them by blocks.
    let (n_hidden, n_weight) = (hidden.len, head.len);
    let mut sums = None;
    let grads = if fused {
        let mut hidden_grad = stream.alloc_zeros::<f32>(n_hidden.max(1)).map_err(driver)?;
        let mut weight_grad = stream.alloc_zeros::<f32>(n_weight.max(1)).map_err(driver)?;
        let grads = RawLinearGrads {
            hidden: Some(RawGrad {
                buffer: RawBuffer::new(RawBuffer::of(&stream, &mut hidden_grad).ptr, n_hidden),
                dtype: DType::F32,
            }),
            weight: Some(RawGrad {
                buffer: RawBuffer::new(RawBuffer::of(&stream, &mut weight_grad).ptr, n_weight),
                dtype: DType::F32,
            }),
            bias: None,
            accumulate: false,
        };
        sums = Some((hidden_grad, weight_grad));
        grads
    } else {
        RawLinearGrads::default()
    };
    run(&xent, &stream, &call, &dev_opts, pass, &out, &grads)?;
    let grads = match sums {
        Some((h, w)) => [
            Some(rounded(h, l1.shape(), dtype, &device)?),
            Some(rounded(w, l2.shape(), dtype, &device)?),
        ],
        None => [None, None],
    };
    let result = match opts.reduction {
        Reduction::None => (
            CudaStorage::wrap_cuda_slice(row_loss, device),
            candle_core::Shape::from(l3.dims()),
        ),
        Reduction::Mean | Reduction::Sum => (
            CudaStorage::wrap_cuda_slice(loss, device),
            candle_core::Shape::from(()),
        ),
    };
    *saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved {
        counts,
        row_lse,
        weight,
        grads,
    });
    Ok(result)
}

/// The device address of `storage`'s first element (a float storage of the values' dtypes).
fn storage_ptr(storage: &mut CudaStorage, stream: &Arc<CudaStream>) -> candle_core::Result<u64> {
    Ok(match storage.dtype() {
        CandleDType::F32 => RawBuffer::of(stream, storage.as_cuda_slice_mut::<f32>()?).ptr,
        CandleDType::F16 => RawBuffer::of(stream, storage.as_cuda_slice_mut::<half::f16>()?).ptr,
        CandleDType::BF16 => RawBuffer::of(stream, storage.as_cuda_slice_mut::<half::bf16>()?).ptr,
        other => candle_core::bail!("xent linear_cross_entropy: a gradient of {other:?}"),
    })
}

/// `sums` (f32, of `shape` from their start) rounded once to `dtype`, as a storage of that dtype
/// (`sums` itself for f32).
fn rounded(
    sums: CudaSlice<f32>,
    shape: &candle_core::Shape,
    dtype: DType,
    device: &candle_core::CudaDevice,
) -> candle_core::Result<CudaStorage> {
    let stream = device.cuda_stream();
    macro_rules! zeros {
        ($t:ty) => {
            // No elements: candle's conversion would launch an empty grid.
            CudaStorage::wrap_cuda_slice(
                stream.alloc_zeros::<$t>(1).map_err(driver)?,
                device.clone(),
            )
        };
    }
    let empty = shape.elem_count() == 0;
    let sums = CudaStorage::wrap_cuda_slice(sums, device.clone());
    let layout = Layout::contiguous(shape.clone());
    Ok(match dtype {
        DType::F32 => sums,
        DType::F16 if empty => zeros!(half::f16),
        DType::Bf16 if empty => zeros!(half::bf16),
        DType::F16 => sums.to_dtype(&layout, CandleDType::F16)?,
        DType::Bf16 => sums.to_dtype(&layout, CandleDType::BF16)?,
    })
}

/// Whether `saved` holds the fused forward's gradients.
pub(super) fn has_grads(saved: &SavedSlot) -> bool {
    saved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|kept| kept.grads.iter().all(Option::is_some))
}

/// Elements of a float storage of the values' dtypes, and their xent dtype.
fn extent(storage: &CudaStorage) -> candle_core::Result<(usize, DType)> {
    Ok(match storage.dtype() {
        CandleDType::F32 => (storage.as_cuda_slice::<f32>()?.len(), DType::F32),
        CandleDType::F16 => (storage.as_cuda_slice::<half::f16>()?.len(), DType::F16),
        CandleDType::BF16 => (storage.as_cuda_slice::<half::bf16>()?.len(), DType::Bf16),
        other => candle_core::bail!("xent linear_cross_entropy: a gradient of {other:?}"),
    })
}

/// The fused forward's gradient w.r.t. the hidden states (`which` 0) or the weight (1), taken
/// out of `saved` and scaled in place by `upstream` (one f32 on the device): the backward's
/// result for that input, `len` elements.
pub(super) fn take_grad(
    saved: &SavedSlot,
    which: usize,
    len: usize,
    (s2, l2): (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    let taken = saved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .and_then(|kept| kept.grads[which].take());
    let Some(mut grad) = taken else {
        candle_core::bail!("xent linear_cross_entropy: the forward's gradient was taken already");
    };
    if s2.dtype() != CandleDType::F32 || !l2.is_contiguous() || l2.shape().elem_count() != 1 {
        candle_core::bail!("xent linear_cross_entropy: the upstream gradient must be one f32");
    }
    let (elements, dtype) = extent(&grad)?;
    // The buffer may hold one element more than an empty gradient (no zero-length allocation).
    if elements < len {
        candle_core::bail!("xent linear_cross_entropy: a gradient of {elements} values for {len}");
    }
    let stream = grad.device.cuda_stream();
    let xent = handle(stream.context().ordinal())?;
    let (upstream, _g) = view(s2.as_cuda_slice::<f32>()?, l2, &stream);
    if len > 0 {
        let ptr = storage_ptr(&mut grad, &stream)?;
        // SAFETY: `grad` is this module's buffer of at least `len` elements of `dtype` on the
        // stream's context, `upstream` candle's one f32 (checked above); both outlive the
        // enqueue (cudarc's stream order).
        unsafe {
            xent.raw_scale_grad(
                &stream,
                RawBuffer::new(ptr, len),
                dtype,
                Shape::flat(1, len),
                upstream,
            )
        }
        .map_err(err)?;
    }
    Ok(grad)
}

/// The backward op on CUDA: the gradients of `upstream · loss` w.r.t. the hidden states and the
/// weight, packed in one new buffer (`[N·D]` then `[V·D]`, the values' dtype).
pub(super) fn backward(
    opts: &Options,
    saved: &SavedSlot,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (targets, upstream): (&Tensor, &Tensor),
) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
    let (targets, l3) = targets.storage_and_layout();
    let Storage::Cuda(s3) = &*targets else {
        candle_core::bail!("xent linear_cross_entropy: the targets are not on the GPU");
    };
    let (upstream, l4) = upstream.storage_and_layout();
    let Storage::Cuda(s4) = &*upstream else {
        candle_core::bail!("xent linear_cross_entropy: the upstream gradient is not on the GPU");
    };
    if s4.dtype() != CandleDType::F32 || !l4.is_contiguous() {
        candle_core::bail!(
            "xent linear_cross_entropy: the upstream gradient must be contiguous f32"
        );
    }
    let shape = linear_shape(l1, l2, l3)?;
    let device = s1.device.clone();
    let stream = device.cuda_stream();
    let xent = handle(stream.context().ordinal())?;
    let dev_opts = device_options(opts);
    let (hidden, dtype, _g1) = values_of(s1, l1, &stream)?;
    let (head, _, _g2) = values_of(s2, l2, &stream)?;
    let (labels, label_type, _g3) = labels_of(s3, l3, &stream)?;
    let (upstream, _g4) = view(s4.as_cuda_slice::<f32>()?, l4, &stream);
    let call_with = |weight: Option<&mut CudaSlice<f32>>| RawLinearCall {
        hidden,
        weight: head,
        bias: None,
        dtype,
        labels,
        label_type,
        shape,
        class_weight: weight.map(|w| RawBuffer::of(&stream, w)),
    };
    let mut slot = saved.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        // A backward without its forward's outputs (candle may call it after moving tensors):
        // the forward again, into a slot of its own.
        let again: SavedSlot = Default::default();
        forward(opts, false, &again, (s1, l1), (s2, l2), (s3, l3))?;
        *slot = again.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
    let kept = slot.as_mut().expect("filled above");
    let call = call_with(kept.weight.as_mut());
    let forward_out = RawLoss {
        loss: RawBuffer::new(0, 0),
        row_loss: RawBuffer::new(0, 0),
        row_lse: RawBuffer::of(&stream, &mut kept.row_lse),
        counts: RawBuffer::of(&stream, &mut kept.counts),
        extras: RawBuffer::new(0, 0),
        row_correct: None,
        predicted: None,
        entropy: None,
        workspace: None,
    };
    // Both gradients packed in one buffer of the values' dtype. The blocks of the vocabulary
    // each add to the hidden states' gradient: a 16-bit one is summed in f32 and rounded once,
    // into the buffer's front.
    let (n_hidden, n_weight) = (hidden.len, head.len);
    let mut sums = match dtype {
        DType::F32 => None,
        DType::F16 | DType::Bf16 => {
            Some(stream.alloc_zeros::<f32>(n_hidden.max(1)).map_err(driver)?)
        }
    };
    macro_rules! grads_of {
        ($t:ty) => {{
            let mut packed = stream
                .alloc_zeros::<$t>((n_hidden + n_weight).max(1))
                .map_err(driver)?;
            let base = RawBuffer::of(&stream, &mut packed).ptr;
            let grads = RawLinearGrads {
                hidden: Some(match sums.as_mut() {
                    Some(sums) => RawGrad {
                        buffer: RawBuffer::new(RawBuffer::of(&stream, sums).ptr, n_hidden),
                        dtype: DType::F32,
                    },
                    None => RawGrad {
                        buffer: RawBuffer::new(base, n_hidden),
                        dtype,
                    },
                }),
                weight: Some(RawGrad {
                    buffer: RawBuffer::new(base + (n_hidden * size_of::<$t>()) as u64, n_weight),
                    dtype,
                }),
                bias: None,
                accumulate: false,
            };
            run(
                &xent,
                &stream,
                &call,
                &dev_opts,
                LinearPass::Backward { upstream },
                &forward_out,
                &grads,
            )?;
            if let Some(sums) = sums.take().filter(|_| n_hidden > 0) {
                let shape = candle_core::Shape::from(n_hidden);
                let narrow = rounded(sums, &shape, dtype, &device)?;
                stream
                    .memcpy_dtod(
                        narrow.as_cuda_slice::<$t>()?,
                        &mut packed.slice_mut(0..n_hidden),
                    )
                    .map_err(driver)?;
            }
            CudaStorage::wrap_cuda_slice(packed, device)
        }};
    }
    let storage = match dtype {
        DType::F32 => grads_of!(f32),
        DType::F16 => grads_of!(half::f16),
        DType::Bf16 => grads_of!(half::bf16),
    };
    Ok((storage, candle_core::Shape::from(n_hidden + n_weight)))
}
