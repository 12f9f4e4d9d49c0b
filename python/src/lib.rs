//! `xent._xent`: the Python extension's Rust side, glue only. It takes buffers by address and
//! element count (from PyTorch tensors or NumPy arrays, described and checked once in
//! `xent/_tensors.py`), the CUDA stream by handle, and calls `xent`: its raw API
//! ([`xent::raw`]) on the GPU, its CPU reference ([`xent::cpu`]) on host memory. No kernel logic
//! lives here.
//!
//! Every output of a forward call lives in one `f32` buffer owned by the caller, the *stats*
//! (layout: [`STATS_LOSS`], [`STATS_EXTRAS`], [`STATS_COUNTS`], then from [`STATS_ROWS`] the
//! per-row loss, the per-row log-sum-exp and, when asked for, the per-row token accuracy), so
//! that a call allocates one tensor and Python slices views of it. A plan that needs scratch
//! memory (the chunked plan's partial sums) takes a second buffer, the workspace.

use std::sync::Arc;

use pyo3::exceptions::{PyIndexError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use xent::raw::{LabelType, RawBuffer, RawCall, RawLoss};
use xent::{CrossEntropy, DType, Error, Reduction, Shape};

/// Index of the loss in the stats.
const STATS_LOSS: usize = 0;
/// Index of the extras (`[z_loss, token_accuracy]`) in the stats.
const STATS_EXTRAS: usize = 1;
/// Index of the label counts (`[u32; COUNT_WORDS]`: scored rows, rows out of range, ...).
const STATS_COUNTS: usize = 3;
/// Index of the first per-row value (a multiple of 4: 16-byte aligned row arrays).
const STATS_ROWS: usize = 8;

/// A Python exception of the kind PyTorch raises for each error.
fn py_err(err: Error) -> PyErr {
    let message = err.to_string();
    match err {
        Error::NoDriver
        | Error::NoDevice { .. }
        | Error::UnsupportedComputeCapability { .. }
        | Error::Driver(_)
        | Error::ContextMismatch => PyRuntimeError::new_err(message),
        Error::LabelOutOfRange { .. } => PyIndexError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

fn dtype_of(name: &str) -> PyResult<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "float16" => Ok(DType::F16),
        "bfloat16" => Ok(DType::Bf16),
        other => Err(PyTypeError::new_err(format!(
            "logits of dtype {other} are not supported: expected float32, float16 or bfloat16"
        ))),
    }
}

fn label_type_of(name: &str) -> PyResult<LabelType> {
    match name {
        "int64" => Ok(LabelType::I64),
        "int32" => Ok(LabelType::I32),
        other => Err(PyTypeError::new_err(format!(
            "targets of dtype {other} are not supported: expected int64 or int32 class indices"
        ))),
    }
}

/// A call's options, checked once when made (PyTorch's and Liger's names and defaults).
#[pyclass(frozen, module = "xent._xent")]
struct Options {
    inner: xent::Options,
}

#[pymethods]
impl Options {
    #[new]
    #[pyo3(signature = (*, ignore_index=-100, reduction="mean", grad_scale=1.0,
        causal_shift=false, label_smoothing=0.0, lse_square_scale=0.0, softcap=None,
        return_token_accuracy=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        ignore_index: i64,
        reduction: &str,
        grad_scale: f32,
        causal_shift: bool,
        label_smoothing: f32,
        lse_square_scale: f32,
        softcap: Option<f32>,
        return_token_accuracy: bool,
    ) -> PyResult<Options> {
        let reduction = match reduction {
            "mean" => Reduction::Mean,
            "sum" => Reduction::Sum,
            "none" => Reduction::None,
            other => {
                return Err(PyValueError::new_err(format!(
                    "reduction must be 'mean', 'sum' or 'none', got {other:?}"
                )));
            }
        };
        let inner = xent::Options {
            ignore_index,
            reduction,
            grad_scale,
            causal_shift,
            label_smoothing,
            lse_square_scale,
            softcap,
            return_token_accuracy,
            ..xent::Options::default()
        };
        // Without class weights the vocabulary does not matter to the checks.
        inner.validate(1).map_err(py_err)?;
        Ok(Options { inner })
    }

    #[getter]
    fn ignore_index(&self) -> i64 {
        self.inner.ignore_index
    }

    #[getter]
    fn reduction(&self) -> &'static str {
        match self.inner.reduction {
            Reduction::Mean => "mean",
            Reduction::Sum => "sum",
            Reduction::None => "none",
        }
    }

    #[getter]
    fn grad_scale(&self) -> f32 {
        self.inner.grad_scale
    }

    #[getter]
    fn causal_shift(&self) -> bool {
        self.inner.causal_shift
    }

    #[getter]
    fn label_smoothing(&self) -> f32 {
        self.inner.label_smoothing
    }

    #[getter]
    fn lse_square_scale(&self) -> f32 {
        self.inner.lse_square_scale
    }

    #[getter]
    fn softcap(&self) -> Option<f32> {
        self.inner.softcap
    }

    #[getter]
    fn return_token_accuracy(&self) -> bool {
        self.inner.return_token_accuracy
    }

    fn __repr__(&self) -> String {
        let o = &self.inner;
        format!(
            "Options(ignore_index={}, reduction={:?}, grad_scale={}, causal_shift={}, \
             label_smoothing={}, lse_square_scale={}, softcap={}, return_token_accuracy={})",
            o.ignore_index,
            self.reduction(),
            o.grad_scale,
            if o.causal_shift { "True" } else { "False" },
            o.label_smoothing,
            o.lse_square_scale,
            o.softcap.map_or("None".to_string(), |c| c.to_string()),
            if o.return_token_accuracy {
                "True"
            } else {
                "False"
            },
        )
    }
}

/// The logits' layout: `[batch, seq_len]` rows of `vocab` classes, `row_stride` elements apart.
type ShapeArgs = (usize, usize, usize, usize);

fn shape_of((batch, seq_len, vocab, row_stride): ShapeArgs) -> Shape {
    Shape::batched(batch, seq_len, vocab).with_row_stride(row_stride)
}

/// `f32` values of the stats of a call over `rows` rows (see the module's doc).
#[pyfunction]
#[pyo3(signature = (rows, accuracy))]
fn stats_len(rows: usize, accuracy: bool) -> usize {
    STATS_ROWS + rows * (2 + accuracy as usize)
}

/// A buffer (address, elements).
type Buffer = (u64, usize);

fn raw((ptr, len): Buffer) -> RawBuffer {
    RawBuffer::new(ptr, len)
}

/// The outputs inside a stats buffer at `stats` for `rows` rows, and the workspace.
fn raw_loss(
    stats: Buffer,
    rows: usize,
    accuracy: bool,
    workspace: Option<Buffer>,
    predicted: Option<Buffer>,
    entropy: Option<Buffer>,
) -> PyResult<RawLoss> {
    let (base, len) = stats;
    let at = |index: usize, n: usize| RawBuffer::new(base + 4 * index as u64, n);
    let needed = stats_len(rows, accuracy);
    if len < needed {
        return Err(PyValueError::new_err(format!(
            "stats hold {len} values, the call needs {needed}"
        )));
    }
    Ok(RawLoss {
        loss: at(STATS_LOSS, 1),
        extras: at(STATS_EXTRAS, 2),
        counts: at(STATS_COUNTS, STATS_ROWS - STATS_COUNTS),
        row_loss: at(STATS_ROWS, rows),
        row_lse: at(STATS_ROWS + rows, rows),
        row_correct: accuracy.then(|| at(STATS_ROWS + 2 * rows, rows)),
        predicted: predicted.map(raw),
        entropy: entropy.map(raw),
        workspace: workspace.map(raw),
    })
}

/// `opts` with `return_predicted_tokens` and `return_entropy` as `predicted` and `entropy` say
/// (whether the caller gave a buffer for each).
fn with_outputs(opts: &xent::Options, predicted: bool, entropy: bool) -> xent::Options {
    xent::Options {
        return_predicted_tokens: predicted,
        return_entropy: entropy,
        ..opts.clone()
    }
}

/// xent's kernels on one CUDA device (its primary context, the one PyTorch uses).
#[pyclass(frozen, module = "xent._xent")]
struct Device {
    xent: CrossEntropy,
    /// cuBLASLt for the linear path, opened on first use (`open_cublaslt`).
    blas: std::sync::OnceLock<xent::cublaslt::CublasLt>,
}

impl Device {
    /// `stream` (a `CUstream` handle, 0 for the legacy default stream) as a cudarc stream of
    /// this device's context.
    fn stream(&self, stream: usize) -> Arc<cudarc_stream::CudaStream> {
        // SAFETY: the handle comes from the framework that owns the stream (PyTorch's current
        // stream of this device), which outlives the call; the stream is borrowed, never
        // destroyed by cudarc.
        unsafe {
            self.xent
                .context()
                .wrap_borrowed_stream(stream as cudarc_stream::CUstream)
        }
    }
}

/// cudarc's stream types, through xent's re-export.
mod cudarc_stream {
    pub use xent::cudarc::driver::CudaStream;
    pub use xent::cudarc::driver::sys::CUstream;
}

#[pymethods]
impl Device {
    /// Opens CUDA device `ordinal` and loads the kernels (RuntimeError without a driver, device
    /// or a compute capability of 8.0).
    #[new]
    fn new(ordinal: usize) -> PyResult<Device> {
        // PyTorch's streams belong to the device's primary context.
        let xent = CrossEntropy::on_primary_context(ordinal).map_err(py_err)?;
        Ok(Device {
            xent,
            blas: std::sync::OnceLock::new(),
        })
    }

    /// The loss into `stats`, enqueued on `stream`; with `fused`, the gradient of
    /// `grad_scale · loss` written over the logits in the same pass. Returns 0, or, enqueueing
    /// nothing, the `f32` values of workspace the call's plan needs when `workspace` is missing
    /// or shorter (only the chunked plan has one): call again with one that long.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        stream: usize,
        logits: Buffer,
        dtype: &str,
        labels: Buffer,
        label_type: &str,
        shape: ShapeArgs,
        weight: Option<Buffer>,
        opts: &Options,
        stats: Buffer,
        workspace: Option<Buffer>,
        fused: bool,
    ) -> PyResult<usize> {
        let call = raw_call(logits, dtype, labels, label_type, shape, weight)?;
        let opts = &opts.inner;
        let needed = self
            .xent
            .raw_workspace_len(&call.shape, call.dtype, opts, weight.is_some())
            .map_err(py_err)?;
        if needed > workspace.map_or(0, |(_, len)| len) {
            return Ok(needed);
        }
        let accuracy = opts.return_token_accuracy;
        let out = raw_loss(stats, call.shape.rows(), accuracy, workspace, None, None)?;
        let stream = self.stream(stream);
        // SAFETY: `xent/_tensors.py` took every address and length from a live tensor of this
        // device, of the dtype named, and the tensors outlive the enqueued work (PyTorch's
        // caching allocator reuses memory only in stream order).
        unsafe { self.xent.raw_forward(&stream, &call, opts, &out, fused) }.map_err(py_err)?;
        Ok(0)
    }

    /// Each scored row's entropy into `out` (`[f32; rows]`, 0 for the others; of the soft-capped
    /// logits with the options' soft cap), enqueued on `stream`: one read of the logits.
    #[allow(clippy::too_many_arguments)]
    fn entropy(
        &self,
        stream: usize,
        logits: Buffer,
        dtype: &str,
        labels: Buffer,
        label_type: &str,
        shape: ShapeArgs,
        opts: &Options,
        out: Buffer,
    ) -> PyResult<()> {
        let call = raw_call(logits, dtype, labels, label_type, shape, None)?;
        let stream = self.stream(stream);
        // SAFETY: as in `forward`; `out` a live float32 tensor of one value a row.
        unsafe { self.xent.raw_entropy(&stream, &call, &opts.inner, raw(out)) }.map_err(py_err)
    }

    /// Two-phase backward: the gradient of `upstream · loss` into `grad` (the logits' address
    /// for in place), from the stats of a forward without `fused`; with `entropy` (the
    /// forward's entropies, `[f32; rows]`) and `entropy_upstream` (`[f32; rows]`), plus the
    /// gradient of `Σ entropy_upstream·entropy`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (stream, logits, dtype, labels, label_type, shape, weight, opts, stats, upstream, grad, entropy=None, entropy_upstream=None))]
    fn backward(
        &self,
        stream: usize,
        logits: Buffer,
        dtype: &str,
        labels: Buffer,
        label_type: &str,
        shape: ShapeArgs,
        weight: Option<Buffer>,
        opts: &Options,
        stats: Buffer,
        upstream: Buffer,
        grad: Buffer,
        entropy: Option<Buffer>,
        entropy_upstream: Option<Buffer>,
    ) -> PyResult<()> {
        let call = raw_call(logits, dtype, labels, label_type, shape, weight)?;
        let accuracy = opts.inner.return_token_accuracy;
        let forward = raw_loss(stats, call.shape.rows(), accuracy, None, None, entropy)?;
        let stream = self.stream(stream);
        // SAFETY: as in `forward`.
        unsafe {
            self.xent.raw_backward_with_entropy(
                &stream,
                &call,
                &opts.inner,
                &forward,
                raw(upstream),
                entropy_upstream.map(raw),
                raw(grad),
            )
        }
        .map_err(py_err)
    }

    /// Scales a gradient in place by `upstream` (one value or one per row); where a factor is
    /// exactly 1 the device skips its rows.
    fn scale_grad(
        &self,
        stream: usize,
        grad: Buffer,
        dtype: &str,
        shape: ShapeArgs,
        upstream: Buffer,
    ) -> PyResult<()> {
        let stream = self.stream(stream);
        // SAFETY: as in `forward`.
        unsafe {
            self.xent.raw_scale_grad(
                &stream,
                raw(grad),
                dtype_of(dtype)?,
                shape_of(shape),
                raw(upstream),
            )
        }
        .map_err(py_err)
    }
}

fn raw_call(
    logits: Buffer,
    dtype: &str,
    labels: Buffer,
    label_type: &str,
    shape: ShapeArgs,
    weight: Option<Buffer>,
) -> PyResult<RawCall> {
    Ok(RawCall {
        logits: raw(logits),
        dtype: dtype_of(dtype)?,
        labels: raw(labels),
        label_type: label_type_of(label_type)?,
        shape: shape_of(shape),
        weight: weight.map(raw),
    })
}

mod cpu;
mod linear;
mod vocab_parallel;

/// Number of CUDA devices the driver sees; 0 without a driver (never raises).
#[pyfunction]
fn cuda_device_count() -> usize {
    // cudarc panics when it cannot load libcuda: ask first.
    if !xent::driver_loadable() {
        return 0;
    }
    xent::cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

#[pymodule]
fn _xent(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Options>()?;
    m.add_class::<Device>()?;
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(stats_len, m)?)?;
    m.add_function(wrap_pyfunction!(cpu::cpu_call, m)?)?;
    m.add_function(wrap_pyfunction!(cpu::cpu_scale_grad, m)?)?;
    m.add_function(wrap_pyfunction!(linear::open_cublaslt, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear_scratch, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear_chunks_budget, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear_logits_within, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear_chunk_rows, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear_row_scheme_min_rows, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear_row_scheme_rows, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel::shard_words, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel::shard_stats, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel::shard_backward, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel::shard_grad, m)?)?;
    m.add("STATS_LOSS", STATS_LOSS)?;
    m.add("STATS_EXTRAS", STATS_EXTRAS)?;
    m.add("STATS_COUNTS", STATS_COUNTS)?;
    m.add("STATS_ROWS", STATS_ROWS)?;
    m.add(
        "LINEAR_ROW_SCHEME_MIN_ROWS",
        xent::linear::ROW_SCHEME_MIN_ROWS,
    )?;
    m.add("COUNT_VALID", xent::abi::COUNT_VALID)?;
    m.add("COUNT_BAD", xent::abi::COUNT_BAD)?;
    m.add("COUNT_WEIGHT", xent::abi::COUNT_WEIGHT)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
