//! The vocabulary-parallel loss for the Python package: one rank's two steps on tensors by
//! address (`xent::vocab_parallel`); the collective between them is PyTorch's
//! (`torch.distributed.all_gather_into_tensor`).

use pyo3::prelude::*;
use xent::vocab_parallel::{Shard, ShardCall, ShardLayout};
use xent::{CrossEntropy, DType, Shape};

use super::{
    Buffer, Device, Options, ShapeArgs, dtype_of, label_type_of, py_err, raw, raw_loss, shape_of,
    with_outputs,
};

fn layout(
    xent: &CrossEntropy,
    rows: usize,
    vocab: usize,
    world: usize,
    dtype: DType,
    opts: &xent::Options,
) -> PyResult<ShardLayout> {
    xent.shard_layout(rows, vocab, world, dtype, opts)
        .map_err(py_err)
}

/// A rank's call: its shard of the logits (`shape`: `(batch, seq_len, width, row_stride)`),
/// global labels, the shard `(start, width)` of `vocab` classes, class weights of the whole
/// vocabulary.
#[allow(clippy::too_many_arguments)]
fn call_of(
    logits: Buffer,
    dtype: &str,
    labels: Buffer,
    label_type: &str,
    shape: ShapeArgs,
    (start, width): (usize, usize),
    vocab: usize,
    weight: Option<Buffer>,
) -> PyResult<ShardCall> {
    let shape: Shape = shape_of(shape);
    Ok(ShardCall {
        logits: raw(logits),
        dtype: dtype_of(dtype)?,
        labels: raw(labels),
        label_type: label_type_of(label_type)?,
        shape,
        shard: Shard { start, width },
        vocab,
        weight: weight.map(raw),
    })
}

/// f32 values each rank contributes to the all-gather of a `world`-rank call (`predicted`: the
/// call also returns the predicted tokens; `entropy`: the entropies).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, rows, vocab, world, dtype, opts, predicted=false, entropy=false))]
pub(crate) fn shard_words(
    device: &Device,
    rows: usize,
    vocab: usize,
    world: usize,
    dtype: &str,
    opts: &Options,
    predicted: bool,
    entropy: bool,
) -> PyResult<usize> {
    let opts = with_outputs(&opts.inner, predicted, entropy);
    Ok(layout(&device.xent, rows, vocab, world, dtype_of(dtype)?, &opts)?.words)
}

/// Step 1 on one rank: its contribution into `send` (`shard_words` f32 values; `predicted` and
/// `entropy` as there).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, logits, dtype, labels, label_type, shape, shard, vocab, world, weight, opts, send, predicted=false, entropy=false))]
pub(crate) fn shard_stats(
    device: &Device,
    stream: usize,
    logits: Buffer,
    dtype: &str,
    labels: Buffer,
    label_type: &str,
    shape: ShapeArgs,
    shard: (usize, usize),
    vocab: usize,
    world: usize,
    weight: Option<Buffer>,
    opts: &Options,
    send: Buffer,
    predicted: bool,
    entropy: bool,
) -> PyResult<()> {
    let call = call_of(
        logits, dtype, labels, label_type, shape, shard, vocab, weight,
    )?;
    let opts = with_outputs(&opts.inner, predicted, entropy);
    let layout = layout(
        &device.xent,
        call.shape.rows(),
        vocab,
        world,
        call.dtype,
        &opts,
    )?;
    let stream = device.stream(stream);
    // SAFETY: `xent/torch/vocab_parallel.py` took every address from a live tensor of this
    // device of the stated dtype and length; PyTorch keeps them until the stream has run.
    unsafe {
        device
            .xent
            .raw_shard_stats(&stream, &call, &opts, &layout, raw(send))
    }
    .map_err(py_err)
}

/// Step 3 on one rank: from the gathered contributions (`world · shard_words`), the loss into
/// `stats` (the package's stats layout, with the rows predicted right where `opts` asks for token
/// accuracy), the predicted tokens into `predicted` (int64, one a row) and the entropies into
/// `entropy` (f32, one a row) where given, and, with `fused`, the gradient of
/// `grad_scale · loss` over the shard's logits.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, logits, dtype, labels, label_type, shape, shard, vocab, world, weight, opts, gathered, stats, fused, predicted=None, entropy=None))]
pub(crate) fn shard_backward(
    device: &Device,
    stream: usize,
    logits: Buffer,
    dtype: &str,
    labels: Buffer,
    label_type: &str,
    shape: ShapeArgs,
    shard: (usize, usize),
    vocab: usize,
    world: usize,
    weight: Option<Buffer>,
    opts: &Options,
    gathered: Buffer,
    stats: Buffer,
    fused: bool,
    predicted: Option<Buffer>,
    entropy: Option<Buffer>,
) -> PyResult<()> {
    let call = call_of(
        logits, dtype, labels, label_type, shape, shard, vocab, weight,
    )?;
    let rows = call.shape.rows();
    let accuracy = opts.inner.return_token_accuracy;
    let opts = with_outputs(&opts.inner, predicted.is_some(), entropy.is_some());
    let layout = layout(&device.xent, rows, vocab, world, call.dtype, &opts)?;
    let out = raw_loss(stats, rows, accuracy, None, predicted, entropy)?;
    let stream = device.stream(stream);
    // SAFETY: as in `shard_stats`; `predicted`, where given, a live int64 tensor of `rows`.
    unsafe {
        device.xent.raw_shard_backward(
            &stream,
            &call,
            &opts,
            &layout,
            world,
            raw(gathered),
            &out,
            fused,
        )
    }
    .map_err(py_err)
}

/// Two-phase, step 4 on one rank: the gradient of `upstream · loss` over the shard's logits, from
/// the `stats` of a step 3 without `fused` (its counts and whole-vocabulary log-sum-exps),
/// `upstream` one value or one per row; with `entropy` (step 3's entropies, `[f32; rows]`) and
/// `entropy_upstream` (`[f32; rows]`), plus the gradient of `Σ entropy_upstream·entropy`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, logits, dtype, labels, label_type, shape, shard, vocab, weight, opts, stats, upstream, entropy=None, entropy_upstream=None))]
pub(crate) fn shard_grad(
    device: &Device,
    stream: usize,
    logits: Buffer,
    dtype: &str,
    labels: Buffer,
    label_type: &str,
    shape: ShapeArgs,
    shard: (usize, usize),
    vocab: usize,
    weight: Option<Buffer>,
    opts: &Options,
    stats: Buffer,
    upstream: Buffer,
    entropy: Option<Buffer>,
    entropy_upstream: Option<Buffer>,
) -> PyResult<()> {
    let call = call_of(
        logits, dtype, labels, label_type, shape, shard, vocab, weight,
    )?;
    let out = raw_loss(stats, call.shape.rows(), false, None, None, entropy)?;
    let stream = device.stream(stream);
    // SAFETY: as in `shard_stats`; `stats` and `entropy` are the same call's step 3 outputs,
    // enqueued before on this stream.
    unsafe {
        device.xent.raw_shard_grad_with_entropy(
            &stream,
            &call,
            &opts.inner,
            &out,
            raw(upstream),
            entropy_upstream.map(raw),
        )
    }
    .map_err(py_err)
}
