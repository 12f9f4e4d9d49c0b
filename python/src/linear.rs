//! Linear + cross-entropy for the Python package: [`xent::linear`]'s raw call on tensors by
//! address, the scratch sized here and allocated by PyTorch (so its memory shows in PyTorch's
//! accounting and returns to its cache).

use std::path::PathBuf;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use xent::cublaslt::CublasLt;
use xent::linear::{
    LinearPass, LinearShape, RawGrad, RawLinearCall, RawLinearGrads, RawLinearScratch,
    RawLinearShardCall,
};
use xent::vocab_parallel::Collective;

use super::{
    Buffer, Device, Options, dtype_of, label_type_of, py_err, raw, raw_loss, with_outputs,
};

/// `[batch, seq_len]` rows of `hidden` features against `vocab` classes.
type LinearShapeArgs = (usize, usize, usize, usize);

/// The inputs: hidden states, weight, optional bias (all of `dtype`), labels and class weights.
type LinearInputs<'a> = (
    Buffer,
    Buffer,
    Option<Buffer>,
    &'a str,
    Buffer,
    &'a str,
    LinearShapeArgs,
    Option<Buffer>,
);

fn raw_linear_call(
    (hidden, weight, bias, dtype, labels, label_type, shape, class_weight): LinearInputs<'_>,
) -> PyResult<RawLinearCall> {
    let (batch, seq_len, hidden_size, vocab) = shape;
    Ok(RawLinearCall {
        hidden: raw(hidden),
        weight: raw(weight),
        bias: bias.map(raw),
        dtype: dtype_of(dtype)?,
        labels: raw(labels),
        label_type: label_type_of(label_type)?,
        shape: LinearShape {
            batch,
            seq_len,
            hidden: hidden_size,
            vocab,
        },
        class_weight: class_weight.map(raw),
    })
}

fn pass_of(name: &str, upstream: Option<Buffer>) -> PyResult<LinearPass> {
    match (name, upstream) {
        ("forward", _) => Ok(LinearPass::Forward),
        ("fused", _) => Ok(LinearPass::Fused),
        ("backward", Some(upstream)) => Ok(LinearPass::Backward {
            upstream: raw(upstream),
        }),
        ("backward", None) => Err(PyValueError::new_err("a backward pass needs an upstream")),
        (other, _) => Err(PyValueError::new_err(format!(
            "pass must be 'forward', 'fused' or 'backward', got {other:?}"
        ))),
    }
}

/// A gradient buffer and its dtype's name.
type GradArg = Option<(Buffer, String)>;

/// A rank's part of a call whose LM head is split by vocabulary: `(start, vocab, world)`, its
/// classes `start..start + V_r` of `vocab` over `world` ranks.
type ShardArgs = (usize, usize, usize);

/// A vocabulary-split call's collective: `(rank, gather, send, recv)`, `gather(count)` a Python
/// callable that all-gathers the first `count` values of `send` (float32) from every rank into
/// the first `world · count` of `recv`, in rank order, on PyTorch's current stream.
type GatherArgs = (usize, Py<PyAny>, Buffer, Buffer);

/// The all-gather as a Python callable does it (`torch.distributed.all_gather_into_tensor` on
/// the caller's tensors); an exception it raises is kept and raised again by the call.
struct PyGather {
    world: usize,
    rank: usize,
    gather: Py<PyAny>,
    failed: std::sync::Mutex<Option<PyErr>>,
}

impl Collective for PyGather {
    fn world(&self) -> usize {
        self.world
    }

    fn rank(&self) -> usize {
        self.rank
    }

    unsafe fn all_gather_f32(
        &self,
        _send: u64,
        _recv: u64,
        count: usize,
        _stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    ) -> xent::Result<()> {
        Python::attach(|py| self.gather.call1(py, (count,)).map(|_| ())).map_err(|err| {
            let message = format!("the all-gather raised {err}");
            *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
            xent::Error::Driver(message)
        })
    }
}

fn raw_grad(grad: GradArg) -> PyResult<Option<RawGrad>> {
    grad.map(|(buffer, dtype)| {
        Ok(RawGrad {
            buffer: raw(buffer),
            dtype: dtype_of(&dtype)?,
        })
    })
    .transpose()
}

impl Device {
    fn blas(&self) -> PyResult<&CublasLt> {
        self.blas.get().ok_or_else(|| {
            PyRuntimeError::new_err("cuBLASLt is not open: call Device.open_cublaslt first")
        })
    }
}

/// Opens cuBLASLt for the linear path (once; later calls return the same library's path):
/// `$XENT_CUBLASLT`, then `libcublasLt.so.13`/`.12`/`.so` in `dirs`, then on the loader's
/// path. RuntimeError naming every file tried when none loads.
#[pyfunction]
pub(crate) fn open_cublaslt(device: &Device, dirs: Vec<String>) -> PyResult<String> {
    if let Some(blas) = device.blas.get() {
        return Ok(blas.path().display().to_string());
    }
    let dirs: Vec<PathBuf> = dirs.into_iter().map(PathBuf::from).collect();
    let blas = CublasLt::open(&dirs).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let path = blas.path().display().to_string();
    let _ = device.blas.set(blas);
    Ok(path)
}

/// `opts` with the outputs a `pass` writes: the predicted tokens where asked for, the entropies
/// where asked for except in a backward, which reads the forward's (for their gradient) and
/// writes none. `linear_scratch` and `linear` take the same rule, so a split call's all-gather is
/// sized for what its pass sends.
fn pass_outputs(
    opts: &xent::Options,
    pass: &LinearPass,
    predicted: bool,
    entropy: bool,
) -> xent::Options {
    let backward = matches!(pass, LinearPass::Backward { .. });
    with_outputs(opts, predicted, entropy && !backward)
}

/// The memory (bytes) a linear call of `rows` rows over `vocab` classes of `dtype` may give its
/// chunks of logits and cuBLASLt's workspace: `budget` bytes of logits and the workspace for
/// them, or the default budget (None). A call on fewer rows that holds other memory for them
/// keeps within it by [`linear_logits_within`] of what is left.
#[pyfunction]
#[pyo3(signature = (rows, vocab, dtype, budget=None))]
pub(crate) fn linear_chunks_budget(
    rows: usize,
    vocab: usize,
    dtype: &str,
    budget: Option<usize>,
) -> PyResult<usize> {
    Ok(xent::linear::chunks_budget_bytes(
        rows,
        vocab,
        dtype_of(dtype)?,
        budget,
    ))
}

/// The fewest rows a fused pass's chunks may hold (or every row) to take the row scheme, and to
/// write the hidden states' gradient over them (`xent::linear::row_scheme_min_rows`: 192, or
/// `XENT_ROW_SCHEME_MIN_ROWS`).
#[pyfunction]
pub(crate) fn linear_row_scheme_min_rows() -> usize {
    xent::linear::row_scheme_min_rows()
}

/// The rows from which a fused pass's chunks take the row scheme on `device`'s card
/// (`CrossEntropy::linear_row_scheme_rows`: its crossover, 192 on an H200 and 282 on an H100
/// SXM, or `XENT_ROW_SCHEME_MIN_ROWS`); fewer take the gradients by blocks of the vocabulary.
#[pyfunction]
pub(crate) fn linear_row_scheme_rows(device: &Device) -> usize {
    device.xent.linear_row_scheme_rows()
}

/// Rows per chunk of a linear call of `rows` rows over `vocab` classes of `dtype` under `budget`
/// bytes of logits (None: the default).
#[pyfunction]
#[pyo3(signature = (rows, vocab, dtype, budget=None))]
pub(crate) fn linear_chunk_rows(
    rows: usize,
    vocab: usize,
    dtype: &str,
    budget: Option<usize>,
) -> PyResult<usize> {
    Ok(xent::linear::chunk_rows(
        rows,
        vocab,
        dtype_of(dtype)?,
        budget,
    ))
}

/// The largest budget of logits (bytes) whose chunk and cuBLASLt's workspace take at most `total`
/// bytes together (0: none fits).
#[pyfunction]
pub(crate) fn linear_logits_within(total: usize) -> usize {
    xent::linear::logits_budget_within(total)
}

/// The scratch a linear call needs: (rows per chunk, bytes of logits, bytes of cuBLASLt's
/// workspace, bytes of shifted labels, ones, f32 values of the loss's workspace, f32 values a
/// vocabulary-split call's all-gather sends), for chunks of logits of at most `budget` bytes
/// (None: the default). `outputs`: whether the call is given buffers for the predicted tokens and
/// the entropies (a split call's all-gather carries more a row for those its pass writes:
/// `pass_outputs`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, hidden, weight, bias, dtype, labels, label_type, shape, class_weight, opts, pass_name, budget, shard=None, outputs=(false, false)))]
pub(crate) fn linear_scratch(
    device: &Device,
    hidden: Buffer,
    weight: Buffer,
    bias: Option<Buffer>,
    dtype: &str,
    labels: Buffer,
    label_type: &str,
    shape: LinearShapeArgs,
    class_weight: Option<Buffer>,
    opts: &Options,
    pass_name: &str,
    budget: Option<usize>,
    shard: Option<ShardArgs>,
    outputs: (bool, bool),
) -> PyResult<(usize, usize, usize, usize, usize, usize, usize)> {
    let pass = pass_of(pass_name, Some((0, 1)))?;
    let opts = &pass_outputs(&opts.inner, &pass, outputs.0, outputs.1);
    let call = raw_linear_call((
        hidden,
        weight,
        bias,
        dtype,
        labels,
        label_type,
        shape,
        class_weight,
    ))?;
    let (lens, gather_words) = match shard {
        None => (
            device
                .xent
                .raw_linear_scratch_lens(&call, opts, pass, budget)
                .map_err(py_err)?,
            0,
        ),
        Some((start, vocab, world)) => {
            let call = RawLinearShardCall {
                linear: call,
                start,
                vocab,
            };
            let lens = device
                .xent
                .raw_linear_shard_scratch_lens(&call, world, opts, pass, budget)
                .map_err(py_err)?;
            (lens.linear, lens.gather_words)
        }
    };
    Ok((
        lens.chunk_rows,
        lens.logits_bytes,
        lens.gemm_workspace_bytes,
        lens.labels_bytes,
        lens.ones_len,
        lens.loss_workspace_len,
        gather_words,
    ))
}

/// One linear + cross-entropy pass (`'forward'`, `'fused'` or `'backward'` with `upstream`)
/// on `stream`: the loss into `stats` (a backward reads the forward's), the gradients into
/// `grads` (`(hidden, (weight, dtype), (bias, dtype), accumulate)`, each optional), working in
/// `scratch` (`(chunk_rows, logits, gemm_workspace, labels, ones)`, sized by
/// `linear_scratch`; the ones filled with 1). With `predicted` (`[i64; rows]`, a forward or
/// fused pass), each scored row's first maximal logit's class too (-1 for the others); with
/// `entropy` (`[f32; rows]`, likewise), each scored row's entropy (0 for the others). A
/// `'backward'` pass with `entropy_upstream` (`[f32; rows]`) adds the gradient of the entropies
/// that its forward wrote into `entropy`, times that upstream.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, hidden, weight, bias, dtype, labels, label_type, shape, class_weight, opts, pass_name, upstream, stats, workspace, grads, scratch, predicted=None, entropy=None, entropy_upstream=None, shard=None, gather=None))]
pub(crate) fn linear(
    device: &Device,
    stream: usize,
    hidden: Buffer,
    weight: Buffer,
    bias: Option<Buffer>,
    dtype: &str,
    labels: Buffer,
    label_type: &str,
    shape: LinearShapeArgs,
    class_weight: Option<Buffer>,
    opts: &Options,
    pass_name: &str,
    upstream: Option<Buffer>,
    stats: Buffer,
    workspace: Option<Buffer>,
    grads: (GradArg, GradArg, GradArg, bool),
    scratch: (usize, Buffer, Buffer, Option<Buffer>, Option<Buffer>),
    predicted: Option<Buffer>,
    entropy: Option<Buffer>,
    entropy_upstream: Option<Buffer>,
    shard: Option<ShardArgs>,
    gather: Option<GatherArgs>,
) -> PyResult<()> {
    let call = raw_linear_call((
        hidden,
        weight,
        bias,
        dtype,
        labels,
        label_type,
        shape,
        class_weight,
    ))?;
    let pass = pass_of(pass_name, upstream)?;
    let accuracy = opts.inner.return_token_accuracy;
    let out = raw_loss(
        stats,
        call.shape.rows(),
        accuracy,
        workspace,
        predicted,
        entropy,
    )?;
    let opts = pass_outputs(&opts.inner, &pass, predicted.is_some(), entropy.is_some());
    let (grad_hidden, grad_weight, grad_bias, accumulate) = grads;
    let grads = RawLinearGrads {
        hidden: raw_grad(grad_hidden)?,
        weight: raw_grad(grad_weight)?,
        bias: raw_grad(grad_bias)?,
        accumulate,
    };
    let (chunk_rows, logits, gemm_workspace, labels, ones) = scratch;
    let scratch = RawLinearScratch {
        chunk_rows,
        logits: raw(logits),
        gemm_workspace: raw(gemm_workspace),
        labels: labels.map(raw),
        ones: ones.map(raw),
    };
    let blas = device.blas()?;
    let stream = device.stream(stream);
    let entropy_upstream = entropy_upstream.map(raw);
    let Some((start, vocab, world)) = shard else {
        // SAFETY: `xent/torch/linear.py` took every address and length from a live tensor of
        // this device, of the dtype named, sized the scratch with `linear_scratch` and filled the
        // ones; the tensors outlive the enqueued work (PyTorch's caching allocator reuses memory
        // only in stream order).
        return unsafe {
            device.xent.raw_linear_with_entropy(
                blas,
                &stream,
                &call,
                &opts,
                pass,
                &out,
                entropy_upstream,
                &grads,
                &scratch,
            )
        }
        .map_err(py_err);
    };
    let Some((rank, gather, send, recv)) = gather else {
        return Err(PyValueError::new_err(
            "a vocabulary-split call needs its all-gather",
        ));
    };
    let call = RawLinearShardCall {
        linear: call,
        start,
        vocab,
    };
    let comm = PyGather {
        world,
        rank,
        gather,
        failed: std::sync::Mutex::new(None),
    };
    // SAFETY: as above, and `gather` all-gathers into `recv` on PyTorch's current stream, which
    // is `stream`.
    let result = unsafe {
        device.xent.raw_linear_vocab_parallel(
            blas,
            &stream,
            &comm,
            &call,
            &opts,
            pass,
            &out,
            entropy_upstream,
            &grads,
            &scratch,
            (raw(send), raw(recv)),
        )
    };
    if let Some(err) = comm.failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(err);
    }
    result.map_err(py_err)
}
