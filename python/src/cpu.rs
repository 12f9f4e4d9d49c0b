//! The CPU path of the extension: host buffers (NumPy arrays, CPU tensors) through xent's f64
//! reference ([`xent::cpu`]), with the GPU path's modes and stats layout, so that the Python
//! layer above treats both alike.

use pyo3::prelude::*;
use xent::half::{bf16, f16};
use xent::{DType, Element, Label};

use super::{
    Buffer, Options, STATS_COUNTS, STATS_EXTRAS, STATS_LOSS, STATS_ROWS, ShapeArgs, dtype_of,
    label_type_of, py_err, shape_of, stats_len,
};
use xent::raw::LabelType;

/// What a CPU call computes: `fused` writes the gradient of `grad_scale · loss` over the logits,
/// `forward` writes only the stats, `backward` writes the gradient of `upstream · loss` into
/// `grad` (which may be the logits) and leaves the stats alone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fused,
    Forward,
    Backward,
}

/// `len` values of `T` at host address `ptr` (a dangling, aligned pointer when empty).
///
/// # Safety
/// `ptr` must point at `len` initialised values of `T` that nothing else touches during the
/// call.
unsafe fn host_slice<'a, T>(ptr: u64, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) }
}

/// Runs a CPU call; see [`Mode`]. Host buffers by (address, elements), described and checked
/// by `xent/_tensors.py`.
#[pyfunction]
#[pyo3(signature = (logits, dtype, labels, label_type, shape, weight, opts, stats, mode,
    upstream=None, grad=None, entropy_upstream=None, entropy=None))]
#[allow(clippy::too_many_arguments)]
pub fn cpu_call(
    logits: Buffer,
    dtype: &str,
    labels: Buffer,
    label_type: &str,
    shape: ShapeArgs,
    weight: Option<Buffer>,
    opts: &Options,
    stats: Buffer,
    mode: &str,
    upstream: Option<Buffer>,
    grad: Option<Buffer>,
    entropy_upstream: Option<Buffer>,
    entropy: Option<Buffer>,
) -> PyResult<()> {
    let mode = match mode {
        "fused" => Mode::Fused,
        "forward" => Mode::Forward,
        "backward" => Mode::Backward,
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "unknown mode {other:?}"
            )));
        }
    };
    let mut opts = opts.inner.clone();
    // A forward's entropies (`[f32; rows]`) where the caller gave a buffer for them.
    opts.return_entropy = entropy.is_some();
    // SAFETY: the weights are `vocab` f32 values of a live host array.
    opts.weight = weight.map(|(ptr, len)| unsafe { host_slice::<f32>(ptr, len) }.to_vec());
    let call = Call {
        logits,
        labels,
        shape: shape_of(shape),
        opts,
        stats,
        mode,
        upstream,
        grad,
        entropy_upstream,
        entropy,
    };
    let result = match (dtype_of(dtype)?, label_type_of(label_type)?) {
        (DType::F32, LabelType::I64) => call.run::<f32, i64>(),
        (DType::F32, LabelType::I32) => call.run::<f32, i32>(),
        (DType::F16, LabelType::I64) => call.run::<f16, i64>(),
        (DType::F16, LabelType::I32) => call.run::<f16, i32>(),
        (DType::Bf16, LabelType::I64) => call.run::<bf16, i64>(),
        (DType::Bf16, LabelType::I32) => call.run::<bf16, i32>(),
    };
    result.map_err(py_err)
}

/// Scales a host gradient in place by `upstream` (one value or one per row).
#[pyfunction]
pub fn cpu_scale_grad(
    grad: Buffer,
    dtype: &str,
    shape: ShapeArgs,
    upstream: Buffer,
) -> PyResult<()> {
    let shape = shape_of(shape);
    // SAFETY: live host arrays of the stated dtype and lengths (see `cpu_call`).
    let upstream = unsafe { host_slice::<f32>(upstream.0, upstream.1) };
    let result = match dtype_of(dtype)? {
        DType::F32 => xent::cpu::scale_grad(
            unsafe { host_slice::<f32>(grad.0, grad.1) },
            shape,
            upstream,
        ),
        DType::F16 => xent::cpu::scale_grad(
            unsafe { host_slice::<f16>(grad.0, grad.1) },
            shape,
            upstream,
        ),
        DType::Bf16 => xent::cpu::scale_grad(
            unsafe { host_slice::<bf16>(grad.0, grad.1) },
            shape,
            upstream,
        ),
    };
    result.map_err(py_err)
}

struct Call {
    logits: Buffer,
    labels: Buffer,
    shape: xent::Shape,
    opts: xent::Options,
    stats: Buffer,
    mode: Mode,
    upstream: Option<Buffer>,
    grad: Option<Buffer>,
    /// A backward's entropies' upstream gradient (`[f32; rows]`): their gradient is added.
    entropy_upstream: Option<Buffer>,
    /// A forward's entropies (`[f32; rows]`), written where given.
    entropy: Option<Buffer>,
}

impl Call {
    fn run<T: Element, L: Label>(&self) -> xent::Result<()> {
        // SAFETY: every buffer is a live host array of the stated type and length, checked by
        // `xent/_tensors.py`; the gradient buffer is either the logits or does not overlap them.
        let labels = unsafe { host_slice::<L>(self.labels.0, self.labels.1) };
        let logits = unsafe { host_slice::<T>(self.logits.0, self.logits.1) };
        let result = match self.mode {
            Mode::Fused => xent::cpu::forward_backward(logits, labels, self.shape, &self.opts)?,
            Mode::Forward => {
                let mut scratch = logits.to_vec();
                xent::cpu::forward_backward(&mut scratch, labels, self.shape, &self.opts)?
            }
            Mode::Backward => {
                let (grad, upstream) = match (self.grad, self.upstream) {
                    (Some(grad), Some(upstream)) => (grad, upstream),
                    _ => {
                        return Err(xent::Error::InvalidOption(
                            "a backward call needs grad and upstream".into(),
                        ));
                    }
                };
                let upstream = unsafe { host_slice::<f32>(upstream.0, upstream.1) };
                let entropy_upstream = self
                    .entropy_upstream
                    .map(|(ptr, len)| &*unsafe { host_slice::<f32>(ptr, len) });
                if grad.0 == self.logits.0 {
                    xent::cpu::forward_backward_entropy(
                        logits,
                        labels,
                        self.shape,
                        &self.opts,
                        upstream,
                        entropy_upstream,
                    )?;
                } else {
                    let grad = unsafe { host_slice::<T>(grad.0, grad.1) };
                    // The logits' rows only: what lies between rows belongs to someone else.
                    let (stride, vocab) = (self.shape.row_stride, self.shape.vocab);
                    for row in 0..self.shape.rows() {
                        let span = row * stride..row * stride + vocab;
                        if span.end <= grad.len().min(logits.len()) {
                            grad[span.clone()].copy_from_slice(&logits[span]);
                        }
                    }
                    xent::cpu::forward_backward_entropy(
                        grad,
                        labels,
                        self.shape,
                        &self.opts,
                        upstream,
                        entropy_upstream,
                    )?;
                }
                return Ok(());
            }
        };
        if let (Some((ptr, len)), Some(values)) = (self.entropy, &result.entropy) {
            if len < values.len() {
                return Err(xent::Error::InvalidOption(format!(
                    "entropy holds {len} values, the call has {} rows",
                    values.len()
                )));
            }
            // SAFETY: a live host f32 array of `len` values.
            let out = unsafe { host_slice::<f32>(ptr, len) };
            for (o, v) in out.iter_mut().zip(values) {
                *o = *v as f32;
            }
        }
        self.write_stats(&result)
    }

    /// Writes a CPU result into the stats buffer (the GPU path's layout).
    fn write_stats(&self, result: &xent::cpu::CpuLoss) -> xent::Result<()> {
        let rows = self.shape.rows();
        let accuracy = self.opts.return_token_accuracy;
        let needed = stats_len(rows, accuracy);
        if self.stats.1 < needed {
            return Err(xent::Error::InvalidOption(format!(
                "stats hold {} values, the call needs at least {needed}",
                self.stats.1
            )));
        }
        // SAFETY: a live host f32 array of `self.stats.1` values.
        let stats = unsafe { host_slice::<f32>(self.stats.0, self.stats.1) };
        stats[STATS_LOSS] = result.loss as f32;
        stats[STATS_EXTRAS] = result.z_loss as f32;
        stats[STATS_EXTRAS + 1] = result.accuracy.unwrap_or(f64::NAN) as f32;
        let weighted = self.opts.weight.is_some();
        let counts = [
            result.n_valid as u32,
            0,
            if weighted {
                (result.total_weight as f32).to_bits()
            } else {
                0
            },
            0,
        ];
        for (slot, count) in stats[STATS_COUNTS..STATS_ROWS].iter_mut().zip(counts) {
            *slot = f32::from_bits(count);
        }
        let (row_loss, rest) = stats[STATS_ROWS..].split_at_mut(rows);
        let (row_lse, rest) = rest.split_at_mut(rows);
        for (out, value) in row_loss.iter_mut().zip(&result.row_loss) {
            *out = *value as f32;
        }
        for (out, value) in row_lse.iter_mut().zip(&result.row_lse) {
            *out = *value as f32;
        }
        if let (true, Some(correct)) = (accuracy, &result.row_correct) {
            for (out, &hit) in rest[..rows].iter_mut().zip(correct) {
                *out = f32::from_bits(hit as u32);
            }
        }
        Ok(())
    }
}
