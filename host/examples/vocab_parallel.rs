//! Vocabulary-parallel cross-entropy, as a tensor-parallel LM head computes it: the vocabulary is
//! split over P ranks, each holding logits `[N, V_r]` for its classes; one all-gather of a few
//! values per row gives every rank the loss and its own columns' gradient. Here the P ranks run
//! in one process: on the GPU (`raw_shards_in_process`: each rank's step 1 writes its place of the
//! gathered buffer, then each rank's step 3), else with the CPU model of the same protocol
//! (`cpu_shard_stats` / `cpu_shard_backward`). Checked against the CPU reference over the whole
//! vocabulary (the loss, the gradient, token accuracy and each row's entropy); it says which
//! path ran. `cargo run --release --example vocab_parallel`.
//! Across GPUs, NCCL's communicator (`xent::nccl`) or PyTorch's process group does the all-gather
//! (README, "Vocabulary-parallel").

use xent::raw::{LabelType, RawBuffer, RawLoss};
use xent::vocab_parallel::{self, Shard, ShardCall};
use xent::{CrossEntropy, DType, Options, Shape, cpu};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (rows, vocab, world) = (512, 128_256, 4);
    let shape = Shape::flat(rows, vocab);
    let opts = Options {
        label_smoothing: 0.1,
        lse_square_scale: 1e-4,
        return_token_accuracy: true,
        return_entropy: true,
        ..Options::default()
    };
    let shards = Shard::split(vocab, world)?;

    // Deterministic pseudo-random logits and labels, one label in five ignored and one in three
    // the row's first maximal logit.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| (next() % 4000) as f32 / 400.0 - 5.0)
        .collect();
    let labels: Vec<i64> = (0..rows)
        .map(|i| {
            if i % 5 == 0 {
                -100
            } else if i % 3 == 0 {
                // A row predicted right: its label its first maximal logit.
                let row = &logits[i * vocab..(i + 1) * vocab];
                (0..vocab).fold(0, |b, j| if row[j] > row[b] { j } else { b }) as i64
            } else {
                (next() % vocab as u64) as i64
            }
        })
        .collect();
    println!(
        "vocabulary-parallel cross-entropy: {rows} rows, vocab {vocab} split over {world} ranks \
         ({} classes each), f32, label smoothing 0.1, z-loss 1e-4, token accuracy, entropies",
        shards[0].width
    );

    let mut want_grad = logits.clone();
    let want = cpu::forward_backward(&mut want_grad, &labels, shape, &opts)?;
    // Each rank's gradient, and the loss, token accuracy and entropies every rank computed.
    type Ranks = (String, Vec<f64>, Vec<f64>, Vec<Vec<f64>>, Vec<Vec<f32>>);
    let (path, losses, accuracies, entropies, grads): Ranks = match CrossEntropy::new(0) {
        Ok(xent) => {
            let stream = xent.context().default_stream();
            let layout = xent.shard_layout(rows, vocab, world, DType::F32, &opts)?;
            let mut d_labels = stream.clone_htod(&labels)?;
            let mut gathered = stream.alloc_zeros::<f32>(world * layout.words)?;
            let mut pieces = shards
                .iter()
                .map(|s| stream.clone_htod(&s.columns(&logits, shape)))
                .collect::<Result<Vec<_>, _>>()?;
            let labels_raw = RawBuffer::of(&stream, &mut d_labels);
            let calls: Vec<ShardCall> = shards
                .iter()
                .zip(pieces.iter_mut())
                .map(|(s, p)| ShardCall {
                    logits: RawBuffer::of(&stream, p),
                    dtype: DType::F32,
                    labels: labels_raw,
                    label_type: LabelType::I64,
                    shape: s.shape_in(shape),
                    shard: *s,
                    vocab,
                    weight: None,
                })
                .collect();
            // Each rank's outputs: loss, per-row loss and lse, extras (the z-loss part and the
            // token accuracy), the entropies, counts, the rows predicted right.
            let mut buffers = (0..world)
                .map(|_| -> Result<_, Box<dyn std::error::Error>> {
                    Ok((
                        [
                            stream.alloc_zeros::<f32>(1)?,
                            stream.alloc_zeros::<f32>(rows)?,
                            stream.alloc_zeros::<f32>(rows)?,
                            stream.alloc_zeros::<f32>(2)?,
                            stream.alloc_zeros::<f32>(rows)?,
                        ],
                        stream.alloc_zeros::<u32>(xent::abi::COUNT_WORDS)?,
                        stream.alloc_zeros::<u32>(rows)?,
                    ))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let outs: Vec<RawLoss> = buffers
                .iter_mut()
                .map(
                    |([loss, row_loss, row_lse, extras, entropy], counts, correct)| RawLoss {
                        loss: RawBuffer::of(&stream, loss),
                        row_loss: RawBuffer::of(&stream, row_loss),
                        row_lse: RawBuffer::of(&stream, row_lse),
                        counts: RawBuffer::of(&stream, counts),
                        extras: RawBuffer::of(&stream, extras),
                        row_correct: Some(RawBuffer::of(&stream, correct)),
                        predicted: None,
                        entropy: Some(RawBuffer::of(&stream, entropy)),
                        workspace: None,
                    },
                )
                .collect();
            let gathered_raw = RawBuffer::of(&stream, &mut gathered);
            // SAFETY: every buffer above is this stream's device memory of the stated length,
            // alive until the reads below synchronise.
            unsafe {
                xent.raw_shards_in_process(
                    &stream,
                    &calls,
                    &opts,
                    &layout,
                    gathered_raw,
                    &outs,
                    true,
                )
            }?;
            let (mut losses, mut accuracies, mut entropies) = (Vec::new(), Vec::new(), Vec::new());
            for ([loss, _, _, extras, entropy], _, _) in &buffers {
                losses.push(stream.clone_dtoh(loss)?[0] as f64);
                accuracies.push(stream.clone_dtoh(extras)?[1] as f64);
                entropies.push(
                    stream
                        .clone_dtoh(entropy)?
                        .iter()
                        .map(|&h| h as f64)
                        .collect(),
                );
            }
            let grads = pieces
                .iter()
                .map(|p| stream.clone_dtoh(p))
                .collect::<Result<Vec<_>, _>>()?;
            let path = format!("GPU ({})", xent.context().name()?);
            (path, losses, accuracies, entropies, grads)
        }
        Err(err) => {
            println!("no CUDA GPU ({err}): the ranks run the protocol's CPU model");
            // Step 1 on every rank, the all-gather (every rank sees all), step 3 on every rank.
            let gathered = shards
                .iter()
                .map(|s| {
                    vocab_parallel::cpu_shard_stats(
                        &s.columns(&logits, shape),
                        &labels,
                        s.shape_in(shape),
                        *s,
                        vocab,
                        &opts,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (mut losses, mut accuracies) = (Vec::new(), Vec::new());
            let (mut entropies, mut grads) = (Vec::new(), Vec::new());
            for s in &shards {
                let mut mine = s.columns(&logits, shape);
                let loss = vocab_parallel::cpu_shard_backward(
                    &mut mine,
                    &labels,
                    s.shape_in(shape),
                    *s,
                    vocab,
                    &opts,
                    &gathered,
                    &[1.0],
                )?;
                losses.push(loss.loss);
                accuracies.push(loss.accuracy.unwrap_or(f64::NAN));
                entropies.push(loss.entropy.unwrap_or_default());
                grads.push(mine);
            }
            (
                "CPU (f64)".to_string(),
                losses,
                accuracies,
                entropies,
                grads,
            )
        }
    };

    let scale = want_grad.iter().fold(0.0f64, |m, g| m.max(g.abs() as f64));
    let mut worst = 0.0f64;
    for (s, grad) in shards.iter().zip(&grads) {
        for r in 0..rows {
            for j in 0..s.width {
                let (g, w) = (
                    grad[r * s.width + j] as f64,
                    want_grad[r * vocab + s.start + j] as f64,
                );
                worst = worst.max((g - w).abs());
            }
        }
    }
    let loss_error = (losses[0] - want.loss).abs();
    let want_accuracy = want.accuracy.unwrap_or(f64::NAN);
    // The entropies over the whole vocabulary: every rank's against the reference's.
    let want_entropy = want.entropy.clone().unwrap_or_default();
    let mut entropy_error = 0.0f64;
    for (r, &w) in want_entropy.iter().enumerate() {
        for rank in &entropies {
            entropy_error = entropy_error.max((rank[r] - w).abs() / w.abs().max(1.0));
        }
    }
    let mean_entropy = want_entropy.iter().sum::<f64>() / rows as f64;
    println!(
        "{path}: loss = {:.6} on every rank (reference over the whole vocabulary {:.6}, |error| \
         {loss_error:.1e}); max |gradient error| {worst:.1e} (gradient values up to {scale:.1e}); \
         token accuracy {:.6} (reference {want_accuracy:.6}); entropies (mean {mean_entropy:.4} \
         nats) within {entropy_error:.1e} relative",
        losses[0], want.loss, accuracies[0]
    );
    let same = losses.iter().all(|l| l.to_bits() == losses[0].to_bits());
    // The accuracy is a count over the scored rows: the same on every rank, and the reference's
    // to f32's rounding.
    let accurate = accuracies.iter().all(|a| (a - want_accuracy).abs() <= 1e-6);
    let entropies_ok = entropies.iter().all(|e| e.len() == rows) && entropy_error <= 2e-5;
    if !same
        || loss_error > 1e-5 * (1.0 + want.loss.abs())
        || worst > 1e-5 * scale
        || !accurate
        || !entropies_ok
    {
        return Err(format!(
            "the ranks do not match the reference (losses {losses:?}, accuracies {accuracies:?})"
        )
        .into());
    }
    Ok(())
}
