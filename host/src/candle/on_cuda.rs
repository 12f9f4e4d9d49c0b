//! The candle op on CUDA tensors (cargo feature `candle-cuda`): xent's raw API on candle's
//! buffers and stream. The forward keeps the label counts and per-row log-sum-exps in the op, the
//! backward (a second op sharing them) writes the gradient of `upstream · loss` once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType as CandleDType, Layout};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::{err, shape_of};
use crate::abi::COUNT_WORDS;
use crate::cuda::CrossEntropy;
use crate::options::{DType, Options, Reduction, Shape};
use crate::raw::{LabelType, RawBuffer, RawCall, RawLoss};

/// What a forward keeps for its backward.
pub(super) struct Saved {
    pub(super) counts: CudaSlice<u32>,
    pub(super) row_lse: CudaSlice<f32>,
    /// The class weights the forward uploaded (uploaded once per step, not again in backward).
    pub(super) weight: Option<CudaSlice<f32>>,
    /// `linear_cross_entropy`'s gradients of `grad_scale · loss` w.r.t. the hidden states and
    /// the weight, where its forward computed them (the fused pass), each until the backward
    /// takes it.
    pub(super) grads: [Option<CudaStorage>; 2],
}

/// Shared by a forward op and the backward op it makes.
pub(super) type SavedSlot = Arc<Mutex<Option<Saved>>>;

/// xent's kernels on each CUDA device, loaded once per process.
pub(super) fn handle(ordinal: usize) -> candle_core::Result<Arc<CrossEntropy>> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<CrossEntropy>>>> = OnceLock::new();
    let mut handles = HANDLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = handles.get(&ordinal) {
        return Ok(handle.clone());
    }
    // candle's streams belong to the device's primary context.
    let handle = Arc::new(CrossEntropy::on_primary_context(ordinal).map_err(err)?);
    handles.insert(ordinal, handle.clone());
    Ok(handle)
}

pub(super) fn driver(e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The address and length of `slice`'s elements from `layout`'s start (contiguous), with the
/// guard that keeps cudarc's event tracking right until the enqueued work is done with it.
pub(super) fn view<'a, T>(
    slice: &'a CudaSlice<T>,
    layout: &Layout,
    stream: &'a CudaStream,
) -> (RawBuffer, cudarc::driver::SyncOnDrop<'a>) {
    let (start, end) = layout.contiguous_offsets().expect("checked contiguous");
    let (ptr, guard) = slice.device_ptr(stream);
    (
        RawBuffer::new(ptr + (start * size_of::<T>()) as u64, end - start),
        guard,
    )
}

/// The logits of `storage` as xent reads them: buffer, dtype and the guard.
fn logits_of<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    stream: &'a CudaStream,
) -> candle_core::Result<(RawBuffer, DType, cudarc::driver::SyncOnDrop<'a>)> {
    values_of(storage, layout, stream, "xent cross_entropy: logits")
}

/// A float storage's values as xent reads them (`what` names them in the error for another
/// dtype): buffer, dtype and the guard.
pub(super) fn values_of<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    stream: &'a CudaStream,
    what: &str,
) -> candle_core::Result<(RawBuffer, DType, cudarc::driver::SyncOnDrop<'a>)> {
    Ok(match storage.dtype() {
        CandleDType::F32 => {
            let (b, g) = view(storage.as_cuda_slice::<f32>()?, layout, stream);
            (b, DType::F32, g)
        }
        CandleDType::F16 => {
            let (b, g) = view(storage.as_cuda_slice::<half::f16>()?, layout, stream);
            (b, DType::F16, g)
        }
        CandleDType::BF16 => {
            let (b, g) = view(storage.as_cuda_slice::<half::bf16>()?, layout, stream);
            (b, DType::Bf16, g)
        }
        other => candle_core::bail!("{what} of dtype {other:?}: expected f32, f16 or bf16"),
    })
}

/// The targets as xent reads them (u32 as i32: the same bits below 2^31).
pub(super) fn labels_of<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    stream: &'a CudaStream,
) -> candle_core::Result<(RawBuffer, LabelType, cudarc::driver::SyncOnDrop<'a>)> {
    Ok(match storage.dtype() {
        CandleDType::I64 => {
            let (b, g) = view(storage.as_cuda_slice::<i64>()?, layout, stream);
            (b, LabelType::I64, g)
        }
        CandleDType::I32 => {
            let (b, g) = view(storage.as_cuda_slice::<i32>()?, layout, stream);
            (b, LabelType::I32, g)
        }
        CandleDType::U32 => {
            let (b, g) = view(storage.as_cuda_slice::<u32>()?, layout, stream);
            (b, LabelType::I32, g)
        }
        other => candle_core::bail!(
            "xent cross_entropy: targets of dtype {other:?}: expected u32, i64 or i32"
        ),
    })
}

/// The options without host class weights (the raw API takes them on the device).
pub(super) fn device_options(opts: &Options) -> Options {
    Options {
        weight: None,
        ..opts.clone()
    }
}

/// The class weights uploaded, if any.
pub(super) fn upload_weight(
    opts: &Options,
    stream: &Arc<CudaStream>,
) -> candle_core::Result<Option<CudaSlice<f32>>> {
    opts.weight
        .as_ref()
        .map(|w| stream.clone_htod(w).map_err(driver))
        .transpose()
}

/// Device buffers of one forward call's outputs.
struct Outputs {
    loss: CudaSlice<f32>,
    row_loss: CudaSlice<f32>,
    row_lse: CudaSlice<f32>,
    counts: CudaSlice<u32>,
    extras: CudaSlice<f32>,
    row_correct: Option<CudaSlice<u32>>,
    workspace: Option<CudaSlice<f32>>,
}

/// The loss of the call on `stream` into new buffers (the logits only read).
fn run_forward(
    xent: &CrossEntropy,
    stream: &Arc<CudaStream>,
    call: &RawCall,
    opts: &Options,
) -> candle_core::Result<Outputs> {
    let rows = call.shape.rows();
    let workspace_len = xent
        .raw_workspace_len(&call.shape, call.dtype, opts, call.weight.is_some())
        .map_err(err)?;
    let alloc = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(driver);
    let mut out = Outputs {
        loss: alloc(1)?,
        row_loss: alloc(rows)?,
        row_lse: alloc(rows)?,
        counts: stream.alloc_zeros::<u32>(COUNT_WORDS).map_err(driver)?,
        extras: alloc(2)?,
        row_correct: match opts.return_token_accuracy {
            true => Some(stream.alloc_zeros::<u32>(rows.max(1)).map_err(driver)?),
            false => None,
        },
        workspace: match workspace_len {
            0 => None,
            n => Some(alloc(n)?),
        },
    };
    let raw = RawLoss {
        loss: RawBuffer::of(stream, &mut out.loss),
        row_loss: RawBuffer::of(stream, &mut out.row_loss),
        row_lse: RawBuffer::of(stream, &mut out.row_lse),
        counts: RawBuffer::of(stream, &mut out.counts),
        extras: RawBuffer::of(stream, &mut out.extras),
        row_correct: out.row_correct.as_mut().map(|c| RawBuffer::of(stream, c)),
        predicted: None,
        entropy: None,
        workspace: out.workspace.as_mut().map(|w| RawBuffer::of(stream, w)),
    };
    // SAFETY: every address is a live buffer of candle's or this call's on `stream`'s context,
    // of the stated type and length (the layouts were checked contiguous); the guards and
    // buffers outlive the enqueue, and cudarc's stream order keeps them alive for the kernels.
    unsafe { xent.raw_forward(stream, call, opts, &raw, false) }.map_err(err)?;
    Ok(out)
}

/// The forward op on CUDA: the loss (a scalar, or per row for `Reduction::None`), and what the
/// backward needs kept in `saved`.
pub(super) fn forward(
    opts: &Options,
    saved: &SavedSlot,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
    let shape: Shape = shape_of(l1, l2)?;
    let device = s1.device.clone();
    let stream = device.cuda_stream();
    let xent = handle(stream.context().ordinal())?;
    let dev_opts = device_options(opts);
    let mut weight = upload_weight(opts, &stream)?;
    let (logits, dtype, _g1) = logits_of(s1, l1, &stream)?;
    let (labels, label_type, _g2) = labels_of(s2, l2, &stream)?;
    let call = RawCall {
        logits,
        dtype,
        labels,
        label_type,
        shape,
        weight: weight.as_mut().map(|w| RawBuffer::of(&stream, w)),
    };
    let out = run_forward(&xent, &stream, &call, &dev_opts)?;
    let result = match opts.reduction {
        Reduction::None => (
            CudaStorage::wrap_cuda_slice(out.row_loss, device),
            candle_core::Shape::from(l2.dims()),
        ),
        Reduction::Mean | Reduction::Sum => (
            CudaStorage::wrap_cuda_slice(out.loss, device),
            candle_core::Shape::from(()),
        ),
    };
    *saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved {
        counts: out.counts,
        row_lse: out.row_lse,
        weight,
        grads: [None, None],
    });
    Ok(result)
}

/// A new gradient buffer of `len` elements of the logits' type whose address matches `logits`
/// modulo 16 bytes (the kernels' vectors line up with the logits'): `(buffer, offset in
/// elements)`.
fn aligned_grad<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    logits: RawBuffer,
    len: usize,
) -> candle_core::Result<(CudaSlice<T>, usize)> {
    let size = size_of::<T>();
    let misaligned = (logits.ptr % 16) as usize / size;
    let buffer = stream.alloc_zeros::<T>(len + misaligned).map_err(driver)?;
    Ok((buffer, misaligned))
}

/// The backward op on CUDA: the gradient of `upstream · loss` w.r.t. the logits, in a new tensor.
pub(super) fn backward(
    opts: &Options,
    saved: &SavedSlot,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
    let shape: Shape = shape_of(l1, l2)?;
    let device = s1.device.clone();
    let stream = device.cuda_stream();
    let xent = handle(stream.context().ordinal())?;
    let (logits, dtype, _g1) = logits_of(s1, l1, &stream)?;
    let (labels, label_type, _g2) = labels_of(s2, l2, &stream)?;
    if s3.dtype() != CandleDType::F32 || !l3.is_contiguous() {
        candle_core::bail!("xent cross_entropy: the upstream gradient must be contiguous f32");
    }
    let (upstream, _g3) = view(s3.as_cuda_slice::<f32>()?, l3, &stream);
    // The forward's counts, log-sum-exps and class weights, or (a backward without its
    // forward's, as candle may call it after moving tensors) a forward now.
    let dev_opts = device_options(opts);
    let call_with = |weight: Option<&mut CudaSlice<f32>>| RawCall {
        logits,
        dtype,
        labels,
        label_type,
        shape,
        weight: weight.map(|w| RawBuffer::of(&stream, w)),
    };
    let mut slot = saved.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        let mut weight = upload_weight(opts, &stream)?;
        let out = run_forward(&xent, &stream, &call_with(weight.as_mut()), &dev_opts)?;
        *slot = Some(Saved {
            counts: out.counts,
            row_lse: out.row_lse,
            weight,
            grads: [None, None],
        });
    }
    let kept = slot.as_mut().expect("filled above");
    let call = call_with(kept.weight.as_mut());
    let forward = RawLoss {
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
    let len = logits.len;
    macro_rules! grad_of {
        ($t:ty) => {{
            let (mut buffer, offset) = aligned_grad::<$t>(&stream, logits, len)?;
            let base = RawBuffer::of(&stream, &mut buffer);
            let grad = RawBuffer::new(base.ptr + (offset * size_of::<$t>()) as u64, len);
            // SAFETY: as in `run_forward`; `grad` holds the logits' elements at their address
            // modulo 16 bytes.
            unsafe { xent.raw_backward(&stream, &call, &dev_opts, &forward, upstream, grad) }
                .map_err(err)?;
            if offset == 0 {
                CudaStorage::wrap_cuda_slice(buffer, device)
            } else {
                // candle's storage starts at its buffer: move the gradient to a buffer of its own.
                let mut exact = stream.alloc_zeros::<$t>(len).map_err(driver)?;
                stream
                    .memcpy_dtod(&buffer.slice(offset..offset + len), &mut exact)
                    .map_err(driver)?;
                CudaStorage::wrap_cuda_slice(exact, device)
            }
        }};
    }
    let storage = match dtype {
        DType::F32 => grad_of!(f32),
        DType::F16 => grad_of!(half::f16),
        DType::Bf16 => grad_of!(half::bf16),
    };
    Ok((storage, l1.shape().clone()))
}
