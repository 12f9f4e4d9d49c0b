//! The vocabulary-parallel protocol (`xent::vocab_parallel`), in f64 on the CPU, against xent's
//! CPU reference over the whole vocabulary: P in {1, 2, 3, 4, 8} shards, even and uneven, every
//! option and reduction, the causal shift, ignored rows, upstream gradients, the entropies and
//! their gradient, f32 and bf16.

use xent::half::bf16;
use xent::vocab_parallel::{self, Shard};
use xent::{Element, Options, Reduction, Shape, cpu};

/// Logits in [-4, 4) and labels (every fifth row ignored) for `shape`, seeded.
fn inputs<T: Element>(shape: Shape, opts: &Options, seed: u64) -> (Vec<T>, Vec<i64>) {
    let (rows, vocab) = (shape.rows(), shape.vocab);
    let mut rng = xent_tests::Rng(rows as u64 * seed + vocab as u64);
    let logits = (0..rows * vocab)
        .map(|_| T::from_f64(rng.unit() * 8.0 - 4.0))
        .collect();
    let labels = (0..rows)
        .map(|r| {
            if r % 5 == 4 {
                opts.ignore_index
            } else {
                rng.below(vocab as u64) as i64
            }
        })
        .collect();
    (logits, labels)
}

/// One call split over `shards`: stats per shard, the "all-gather" (every rank sees all), then
/// every shard's backward (with the entropies' gradient where `entropy_upstream` is given);
/// returns rank 0's loss and the shards' gradients side by side.
fn split_call<T: Element>(
    logits: &[T],
    labels: &[i64],
    shape: Shape,
    shards: &[Shard],
    opts: &Options,
    (upstream, entropy_upstream): (&[f32], Option<&[f32]>),
) -> (cpu::CpuLoss, Vec<T>) {
    let (rows, vocab) = (shape.rows(), shape.vocab);
    let gathered: Vec<_> = shards
        .iter()
        .map(|s| {
            vocab_parallel::cpu_shard_stats(
                &s.columns(logits, shape),
                labels,
                s.shape_in(shape),
                *s,
                vocab,
                opts,
            )
            .unwrap()
        })
        .collect();
    let mut grad = vec![T::from_f64(f64::NAN); rows * vocab];
    let mut first_loss = None;
    for s in shards {
        let mut mine = s.columns(logits, shape);
        let loss = vocab_parallel::cpu_shard_backward_entropy(
            &mut mine,
            labels,
            s.shape_in(shape),
            *s,
            vocab,
            opts,
            &gathered,
            upstream,
            entropy_upstream,
        )
        .unwrap();
        for r in 0..rows {
            grad[r * vocab + s.start..r * vocab + s.start + s.width]
                .copy_from_slice(&mine[r * s.width..(r + 1) * s.width]);
        }
        // Every rank computes the same loss.
        match &first_loss {
            None => first_loss = Some(loss),
            Some(first) => {
                assert_eq!(first.loss.to_bits(), loss.loss.to_bits());
                let bits = |l: &cpu::CpuLoss| {
                    l.entropy
                        .as_ref()
                        .map(|e| e.iter().map(|h| h.to_bits()).collect::<Vec<_>>())
                };
                assert_eq!(bits(first), bits(&loss));
            }
        }
    }
    (first_loss.unwrap(), grad)
}

/// The split call against the whole-vocabulary reference; `upstreams` = the loss's upstream and,
/// where given, the entropies'. With `return_entropy` and no smoothing (whose loss a `-inf` logit
/// makes infinite) row 1 is half `-inf`, the half without its target: whole shards of it hold no
/// finite logit at P >= 2.
fn check<T: Element>(
    what: &str,
    shape: Shape,
    world: usize,
    opts: &Options,
    upstreams: (&[f32], Option<&[f32]>),
) -> Result<(), String> {
    let (rows, vocab) = (shape.rows(), shape.vocab);
    let (mut logits, labels) = inputs::<T>(shape, opts, 31);
    if opts.return_entropy && opts.label_smoothing == 0.0 {
        let target = labels[if opts.causal_shift { 2 } else { 1 }];
        let half = if (0..vocab as i64 / 2).contains(&target) {
            vocab + vocab / 2..2 * vocab
        } else {
            vocab..vocab + vocab / 2
        };
        logits[half].fill(T::from_f64(f64::NEG_INFINITY));
    }
    let shards = Shard::split(vocab, world).unwrap();
    let (loss, grad) = split_call(&logits, &labels, shape, &shards, opts, upstreams);
    let mut want_grad = logits.clone();
    let (upstream, entropy_upstream) = upstreams;
    let want = cpu::forward_backward_entropy(
        &mut want_grad,
        &labels,
        shape,
        opts,
        upstream,
        entropy_upstream,
    )
    .unwrap();
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + b.abs());
    if !near(loss.loss, want.loss) {
        return Err(format!("{what}: loss {} against {}", loss.loss, want.loss));
    }
    match (&loss.entropy, &want.entropy) {
        (None, None) => {}
        (Some(got), Some(entropies)) => {
            if let Some(r) = (0..rows).find(|&r| !near(got[r], entropies[r])) {
                return Err(format!(
                    "{what}: row {r}'s entropy {} against {}",
                    got[r], entropies[r]
                ));
            }
        }
        (got, want) => return Err(format!("{what}: entropies {got:?} against {want:?}")),
    }
    for r in 0..rows {
        if !near(loss.row_loss[r], want.row_loss[r]) || !near(loss.row_lse[r], want.row_lse[r]) {
            return Err(format!(
                "{what}: row {r}: {} / {} against {} / {}",
                loss.row_loss[r], loss.row_lse[r], want.row_loss[r], want.row_lse[r]
            ));
        }
    }
    if loss.row_correct != want.row_correct || loss.accuracy != want.accuracy {
        return Err(format!(
            "{what}: accuracy {:?} against {:?}",
            loss.accuracy, want.accuracy
        ));
    }
    // Both round the same f64 value once, computed in another order: at most one unit apart.
    let ulp = xent_tests::unit_roundoff(T::DTYPE) * 2.0;
    for (i, (g, w)) in grad.iter().zip(&want_grad).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        if (g - w).abs() > ulp * w.abs() + 1e-300 && (g - w).abs() > 1e-15 {
            return Err(format!("{what}: grad[{i}] {g} against {w}"));
        }
    }
    Ok(())
}

#[test]
fn shards_reproduce_the_whole_vocabulary_reference() {
    let mut failures = Vec::new();
    for (vocab, shape) in [
        (1003, Shape::batched(3, 7, 1003)),
        (64, Shape::batched(2, 9, 64)),
    ] {
        for (name, opts) in xent_tests::vocab_parallel_option_sets(vocab) {
            for world in [1, 2, 3, 4, 8] {
                let rows = shape.rows();
                let upstreams: Vec<Vec<f32>> = if opts.reduction == Reduction::None {
                    vec![(0..rows).map(|r| 0.5 + r as f32 * 0.25).collect()]
                } else {
                    vec![vec![1.0], vec![0.3]]
                };
                for upstream in &upstreams {
                    let what = format!("V {vocab} P {world} {name} upstream {:?}", &upstream[..1]);
                    let up = (upstream.as_slice(), None);
                    if let Err(msg) = check::<f32>(&what, shape, world, &opts, up) {
                        failures.push(msg);
                    }
                    if let Err(msg) =
                        check::<bf16>(&format!("{what} bf16"), shape, world, &opts, up)
                    {
                        failures.push(msg);
                    }
                }
                // The entropies over the whole vocabulary, logged and with their gradient (one
                // upstream a row, of both signs, 0 on some).
                let opts = Options {
                    return_entropy: true,
                    ..opts.clone()
                };
                let e_up: Vec<f32> = (0..rows).map(|r| ((r % 5) as f32 - 2.0) * 0.2).collect();
                for entropy_upstream in [None, Some(e_up.as_slice())] {
                    let what = format!(
                        "V {vocab} P {world} {name} entropies, gradient {}",
                        entropy_upstream.is_some()
                    );
                    let up = (upstreams[0].as_slice(), entropy_upstream);
                    if let Err(msg) = check::<f32>(&what, shape, world, &opts, up) {
                        failures.push(msg);
                    }
                    if let Err(msg) =
                        check::<bf16>(&format!("{what} bf16"), shape, world, &opts, up)
                    {
                        failures.push(msg);
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A shard's logits are its columns of every row, packed, whatever the whole call's row stride.
#[test]
fn a_shards_columns_and_shape_are_its_slice_of_every_row() {
    // 2 rows of 5 classes, 7 values apart; element (r, j) holds 10 r + j, padding 99.
    let whole = Shape {
        row_stride: 7,
        ..Shape::flat(2, 5)
    };
    let logits: Vec<u32> = (0..14)
        .map(|i| if i % 7 < 5 { 10 * (i / 7) + i % 7 } else { 99 })
        .collect();
    let shard = Shard { start: 2, width: 3 };
    assert_eq!(shard.columns(&logits, whole), vec![2, 3, 4, 12, 13, 14]);
    let shape = shard.shape_in(whole);
    assert_eq!((shape.vocab, shape.row_stride, shape.rows()), (3, 3, 2));
}

#[test]
fn shards_split_evenly_and_bad_calls_are_errors() {
    let shards = Shard::split(1003, 4).unwrap();
    let widths: Vec<usize> = shards.iter().map(|s| s.width).collect();
    assert_eq!(widths, vec![251, 251, 251, 250]);
    assert_eq!(shards[3].start, 753);
    assert!(Shard::split(10, 0).is_err());
    assert!(Shard::split(3, 4).is_err());
    let shard = Shard { start: 0, width: 5 };
    let logits = vec![0.0f32; 2 * 5];
    let opts = Options::default();
    // A label beyond the whole vocabulary, a shard past it, rows of the wrong width.
    let err =
        vocab_parallel::cpu_shard_stats(&logits, &[1i64, 12], Shape::flat(2, 5), shard, 10, &opts);
    assert!(
        matches!(err, Err(xent::Error::LabelOutOfRange { .. })),
        "{err:?}"
    );
    let past = Shard { start: 8, width: 5 };
    assert!(
        vocab_parallel::cpu_shard_stats(&logits, &[1i64, 2], Shape::flat(2, 5), past, 10, &opts)
            .is_err()
    );
    assert!(
        vocab_parallel::cpu_shard_stats(
            &logits,
            &[1i64, 2],
            Shape::flat(2, 5),
            Shard { start: 0, width: 4 },
            10,
            &opts
        )
        .is_err()
    );
    // The entropies' upstream must hold one value a row.
    let entropy = Options {
        return_entropy: true,
        ..Options::default()
    };
    let stats = vocab_parallel::cpu_shard_stats(
        &logits,
        &[1i64, 2],
        Shape::flat(2, 5),
        shard,
        10,
        &entropy,
    )
    .unwrap();
    let err = vocab_parallel::cpu_shard_backward_entropy(
        &mut logits.clone(),
        &[1i64, 2],
        Shape::flat(2, 5),
        shard,
        10,
        &entropy,
        &[stats.clone(), stats],
        &[1.0],
        Some(&[0.5]),
    );
    assert!(
        matches!(&err, Err(xent::Error::InvalidOption(m)) if m.contains("entropies")),
        "{err:?}"
    );
    // A shard layout holds the entropy summaries if and only if the call asks for them.
    if let Some(xent) = xent_tests::gpu() {
        let with = xent
            .shard_layout(2, 10, 2, xent::DType::F32, &entropy)
            .unwrap();
        let without = xent
            .shard_layout(2, 10, 2, xent::DType::F32, &opts)
            .unwrap();
        assert_eq!(with.words, without.words + 3 * 2);
        assert!(with.entropy && !without.entropy);
        // Refused before any launch: a layout without the summaries for a call that asks for the
        // entropies, and the entropies' gradient without the forward's entropies.
        use xent::raw::{LabelType, RawBuffer, RawLoss};
        let stream = xent.context().default_stream();
        let mut d_logits = stream.clone_htod(&logits).unwrap();
        let mut d_labels = stream.clone_htod(&[1i64, 2]).unwrap();
        let call = vocab_parallel::ShardCall {
            logits: RawBuffer::of(&stream, &mut d_logits),
            dtype: xent::DType::F32,
            labels: RawBuffer::of(&stream, &mut d_labels),
            label_type: LabelType::I64,
            shape: Shape::flat(2, 5),
            shard,
            vocab: 10,
            weight: None,
        };
        let mut send = stream.alloc_zeros::<f32>(with.words).unwrap();
        let send = RawBuffer::of(&stream, &mut send);
        let err = unsafe { xent.raw_shard_stats(&stream, &call, &entropy, &without, send) };
        assert!(
            matches!(&err, Err(xent::Error::InvalidOption(m)) if m.contains("return_entropy")),
            "{err:?}"
        );
        let f = |n: usize| stream.alloc_zeros::<f32>(n).unwrap();
        let (mut loss, mut row_loss, mut row_lse, mut extras, mut e_up) =
            (f(1), f(2), f(2), f(2), f(2));
        let mut counts = stream.alloc_zeros::<u32>(xent::abi::COUNT_WORDS).unwrap();
        let out = RawLoss {
            loss: RawBuffer::of(&stream, &mut loss),
            row_loss: RawBuffer::of(&stream, &mut row_loss),
            row_lse: RawBuffer::of(&stream, &mut row_lse),
            counts: RawBuffer::of(&stream, &mut counts),
            extras: RawBuffer::of(&stream, &mut extras),
            row_correct: None,
            predicted: None,
            entropy: None,
            workspace: None,
        };
        let mut one = stream.clone_htod(&[1.0f32]).unwrap();
        let upstream = RawBuffer::of(&stream, &mut one);
        let e_up = Some(RawBuffer::of(&stream, &mut e_up));
        let err = unsafe {
            xent.raw_shard_grad_with_entropy(&stream, &call, &opts, &out, upstream, e_up)
        };
        assert!(
            matches!(&err, Err(xent::Error::InvalidOption(m)) if m.contains("return_entropy")),
            "{err:?}"
        );
        // A shard wider than the layout's chunks cover (they cover the widest shard of the even
        // split, 5 of 10 classes here, in chunks of 8) would leave columns unread: refused.
        let mut wide_logits = stream.clone_htod(&[0.0f32; 18]).unwrap();
        let wide = vocab_parallel::ShardCall {
            logits: RawBuffer::of(&stream, &mut wide_logits),
            shape: Shape::flat(2, 9),
            shard: Shard { start: 0, width: 9 },
            ..call
        };
        let err = unsafe { xent.raw_shard_stats(&stream, &wide, &opts, &without, send) };
        assert!(
            matches!(&err, Err(xent::Error::InvalidOption(m)) if m.contains("wider")),
            "{err:?}"
        );
    }
    // The gathered stats of the wrong row count.
    let mut grad = logits.clone();
    let stats =
        vocab_parallel::cpu_shard_stats(&logits, &[1i64, 2], Shape::flat(2, 5), shard, 10, &opts)
            .unwrap();
    let short = vec![stats[..1].to_vec()];
    assert!(
        vocab_parallel::cpu_shard_backward(
            &mut grad,
            &[1i64, 2],
            Shape::flat(2, 5),
            shard,
            10,
            &opts,
            &short,
            &[1.0]
        )
        .is_err()
    );
}

/// The GPU path with P shards on one GPU: each shard's step 1
/// writes straight into its place of one gathered buffer (the collective, in process), then
/// every shard's step 3 reads all of it. Against the CPU reference over the whole vocabulary,
/// fused (the gradient in step 3) and two-phase (`raw_shard_grad` with an upstream gradient
/// after a forward that leaves the logits alone); with the entropies ("mean", "none", "every
/// option", "causal"), logged and, two-phase, with their gradient
/// (`raw_shard_grad_with_entropy`).
#[test]
fn gpu_shards_on_one_gpu_match_the_whole_vocabulary_reference() {
    use xent::cudarc::driver::CudaSlice;
    use xent::raw::{LabelType, RawBuffer, RawLoss};
    use xent::vocab_parallel::ShardCall;
    let Some(shared) = xent_tests::gpu() else {
        return;
    };
    let xent = &xent_tests::strict_lazy_handle(shared);
    let stream = xent.context().default_stream();
    let mut failures = Vec::new();
    for (vocab, shape) in [
        (1003, Shape::batched(3, 7, 1003)),
        (32000, Shape::batched(2, 33, 32000)),
    ] {
        for (name, opts) in xent_tests::vocab_parallel_option_sets(vocab) {
            // Predicted tokens with token accuracy ("ignore 3") and alone ("causal").
            let opts = Options {
                return_predicted_tokens: matches!(name, "ignore 3" | "causal"),
                return_entropy: matches!(name, "mean" | "none" | "every option" | "causal"),
                ..opts
            };
            for world in [1, 2, 3, 4, 8] {
                for dtype in [xent::DType::F32, xent::DType::Bf16] {
                    let result = match dtype {
                        xent::DType::F32 => gpu_case::<f32>(xent, &stream, shape, world, &opts),
                        _ => gpu_case::<bf16>(xent, &stream, shape, world, &opts),
                    };
                    if let Err(msg) = result {
                        failures.push(format!("V {vocab} P {world} {name} {dtype:?}: {msg}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    fn gpu_case<
        T: Element + xent::cudarc::driver::DeviceRepr + xent::cudarc::driver::ValidAsZeroBits,
    >(
        xent: &xent::CrossEntropy,
        stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
        shape: Shape,
        world: usize,
        opts: &Options,
    ) -> Result<(), String> {
        let (rows, vocab) = (shape.rows(), shape.vocab);
        let (logits, labels) = inputs::<T>(shape, opts, 7);
        let mut want_grad = logits.clone();
        let want = cpu::forward_backward(&mut want_grad, &labels, shape, opts)
            .map_err(|e| e.to_string())?;
        let shards = Shard::split(vocab, world).unwrap();
        let layout = xent
            .shard_layout(rows, vocab, world, T::DTYPE, opts)
            .map_err(|e| e.to_string())?;
        let dev_opts = Options {
            weight: None,
            ..opts.clone()
        };
        let mut weight: Option<CudaSlice<f32>> =
            opts.weight.as_ref().map(|w| stream.clone_htod(w).unwrap());
        let mut d_labels = stream.clone_htod(&labels).unwrap();
        let mut gathered = stream.alloc_zeros::<f32>(world * layout.words).unwrap();
        let gathered_raw = RawBuffer::of(stream, &mut gathered);
        let originals: Vec<Vec<T>> = shards.iter().map(|s| s.columns(&logits, shape)).collect();
        let mut pieces: Vec<CudaSlice<T>> = originals
            .iter()
            .map(|piece| stream.clone_htod(piece).unwrap())
            .collect();
        let labels_raw = RawBuffer::of(stream, &mut d_labels);
        let weight_raw = weight.as_mut().map(|w| RawBuffer::of(stream, w));
        let calls: Vec<ShardCall> = shards
            .iter()
            .zip(pieces.iter_mut())
            .map(|(s, piece)| ShardCall {
                logits: RawBuffer::of(stream, piece),
                dtype: T::DTYPE,
                labels: labels_raw,
                label_type: LabelType::I64,
                shape: s.shape_in(shape),
                shard: *s,
                vocab,
                weight: weight_raw,
            })
            .collect();
        // Every shard's outputs, then all ranks at once through raw_shards_in_process.
        let mut buffers: Vec<[CudaSlice<f32>; 4]> = (0..world)
            .map(|_| {
                [
                    stream.alloc_zeros::<f32>(1).unwrap(),
                    stream.alloc_zeros::<f32>(rows).unwrap(),
                    stream.alloc_zeros::<f32>(rows).unwrap(),
                    stream.alloc_zeros::<f32>(2).unwrap(),
                ]
            })
            .collect();
        let mut counts: Vec<CudaSlice<u32>> = (0..world)
            .map(|_| stream.alloc_zeros::<u32>(xent::abi::COUNT_WORDS).unwrap())
            .collect();
        // Token accuracy's and the predicted tokens' outputs, each rank's, filled with what no
        // row may end with (the kernels write every row).
        let mut row_correct: Vec<CudaSlice<u32>> = (0..world)
            .map(|_| stream.clone_htod(&vec![7u32; rows]).unwrap())
            .collect();
        let mut predicted: Vec<CudaSlice<i64>> = (0..world)
            .map(|_| stream.clone_htod(&vec![-7i64; rows]).unwrap())
            .collect();
        let mut entropies: Vec<CudaSlice<f32>> = (0..world)
            .map(|_| stream.clone_htod(&vec![-7.0f32; rows]).unwrap())
            .collect();
        let outs: Vec<RawLoss> = buffers
            .iter_mut()
            .zip(counts.iter_mut())
            .zip(row_correct.iter_mut().zip(predicted.iter_mut()))
            .zip(entropies.iter_mut())
            .map(
                |((([loss, row_loss, row_lse, extras], counts), (correct, tokens)), entropy)| {
                    RawLoss {
                        loss: RawBuffer::of(stream, loss),
                        row_loss: RawBuffer::of(stream, row_loss),
                        row_lse: RawBuffer::of(stream, row_lse),
                        counts: RawBuffer::of(stream, counts),
                        extras: RawBuffer::of(stream, extras),
                        row_correct: opts
                            .return_token_accuracy
                            .then(|| RawBuffer::of(stream, correct)),
                        predicted: opts
                            .return_predicted_tokens
                            .then(|| RawBuffer::of(stream, tokens)),
                        entropy: opts.return_entropy.then(|| RawBuffer::of(stream, entropy)),
                        workspace: None,
                    }
                },
            )
            .collect();
        // Every rank at once: the fused gradient in step 3, or (two-phase) none.
        let run_shards = |fused: bool| -> Result<(), String> {
            unsafe {
                xent.raw_shards_in_process(
                    stream,
                    &calls,
                    &dev_opts,
                    &layout,
                    gathered_raw,
                    &outs,
                    fused,
                )
            }
            .map_err(|e| e.to_string())
        };
        run_shards(true)?;
        let losses: Vec<f32> = buffers
            .iter()
            .map(|[loss, ..]| stream.clone_dtoh(loss).unwrap()[0])
            .collect();
        if losses.iter().any(|l| l.to_bits() != losses[0].to_bits()) {
            return Err(format!("the ranks' losses differ: {losses:?}"));
        }
        let got = losses[0] as f64;
        let loss_error = (got - want.loss).abs();
        if loss_error.is_nan() || loss_error > 1e-5 * (1.0 + want.loss.abs()) {
            return Err(format!("loss {got} against {}", want.loss));
        }
        // Every rank's token accuracy, rows predicted right and predicted tokens: the whole
        // vocabulary's, exactly (the argmax is of the logits as given, on both sides).
        for q in 0..world {
            if let (Some(want_correct), Some(want_accuracy)) = (&want.row_correct, want.accuracy) {
                let correct: Vec<bool> = stream
                    .clone_dtoh(&row_correct[q])
                    .unwrap()
                    .iter()
                    .map(|&c| {
                        assert!(c <= 1, "rank {q}: row_correct holds {c}");
                        c == 1
                    })
                    .collect();
                if &correct != want_correct {
                    return Err(format!("rank {q}: rows predicted right differ"));
                }
                let accuracy = stream.clone_dtoh(&buffers[q][3]).unwrap()[1];
                let want_accuracy32 = want_accuracy as f32;
                let same = accuracy.to_bits() == want_accuracy32.to_bits()
                    || (accuracy.is_nan() && want_accuracy32.is_nan());
                if !same {
                    return Err(format!(
                        "rank {q}: accuracy {accuracy} against {want_accuracy}"
                    ));
                }
            }
            if let Some(want_tokens) = &want.predicted_tokens {
                let tokens = stream.clone_dtoh(&predicted[q]).unwrap();
                if &tokens != want_tokens {
                    return Err(format!(
                        "rank {q}: predicted tokens {tokens:?} against {want_tokens:?}"
                    ));
                }
            }
            // The entropies over the whole vocabulary, the same bits on every rank.
            if opts.return_entropy {
                let got = stream.clone_dtoh(&entropies[q]).unwrap();
                let first = stream.clone_dtoh(&entropies[0]).unwrap();
                if got
                    .iter()
                    .zip(&first)
                    .any(|(a, b)| a.to_bits() != b.to_bits())
                {
                    return Err(format!("rank {q}'s entropies differ from rank 0's"));
                }
                xent_tests::check_entropy(Some(got), &want.entropy)
                    .map_err(|e| format!("rank {q}: {e}"))?;
            }
        }
        // Each shard's gradient against its columns of the whole-vocabulary reference.
        // `extra[r]`: row `r`'s allowance beyond the loss gradient's (the entropy term's).
        let compare = |what: &str,
                       pieces: &[CudaSlice<T>],
                       want_grad: &[T],
                       extra: &[f64]|
         -> Result<(), String> {
            let u = xent_tests::unit_roundoff(T::DTYPE) * 2.0;
            let scale = want_grad
                .iter()
                .fold(0.0f64, |m, g| m.max(g.to_f64().abs()));
            for (s, piece) in shards.iter().zip(pieces) {
                let got = stream.clone_dtoh(piece).unwrap();
                for r in 0..rows {
                    for j in 0..s.width {
                        let g = got[r * s.width + j].to_f64();
                        let w = want_grad[r * vocab + s.start + j].to_f64();
                        let error = (g - w).abs();
                        let tol = 2.0 * u * w.abs() + 1e-5 * scale + extra[r];
                        if error.is_nan() || error > tol {
                            return Err(format!(
                                "{what}grad[{r}, {}] {g} against {w}",
                                s.start + j
                            ));
                        }
                    }
                }
            }
            Ok(())
        };
        compare("", &pieces, &want_grad, &vec![0.0; rows])?;

        // Two-phase: a forward that leaves the logits alone, then each rank's gradient of
        // `upstream · loss` (one value; one per row without a reduction) from its row_lse.
        let upstream: Vec<f32> = if opts.reduction == xent::Reduction::None {
            (0..rows).map(|r| 0.25 + (r % 4) as f32 * 0.5).collect()
        } else {
            vec![0.75]
        };
        // With the entropies, their gradient too: an upstream a row, of both signs.
        let e_up: Vec<f32> = (0..rows).map(|r| ((r % 5) as f32 - 2.0) * 0.3).collect();
        let entropy_upstream = opts.return_entropy.then_some(e_up.as_slice());
        let mut want_grad = logits.clone();
        let want = cpu::forward_backward_entropy(
            &mut want_grad,
            &labels,
            shape,
            opts,
            &upstream,
            entropy_upstream,
        )
        .map_err(|e| e.to_string())?;
        // The entropy term's f32 error: `lse - y - H` (the entropy's tolerance and the
        // log-sum-exp's) times the row's largest `p` times its upstream.
        let extra: Vec<f64> = (0..rows)
            .map(|r| match (&want.entropy, entropy_upstream) {
                (Some(h), Some(e)) => {
                    let lse = want.row_lse[r];
                    let largest = (0..vocab)
                        .map(|j| logits[r * vocab + j].to_f64())
                        .fold(f64::NEG_INFINITY, f64::max);
                    let largest = match opts.softcap {
                        Some(cap) => cap as f64 * (largest / cap as f64).tanh(),
                        None => largest,
                    };
                    let p = (largest - lse).exp().min(1.0);
                    e[r].abs() as f64
                        * p
                        * (xent_tests::entropy_tol(h[r]) + 1e-5 * lse.abs().max(1.0))
                }
                _ => 0.0,
            })
            .collect();
        for (piece, original) in pieces.iter_mut().zip(&originals) {
            stream.memcpy_htod(original, piece).unwrap();
        }
        run_shards(false)?;
        for (piece, original) in pieces.iter().zip(&originals) {
            let now = stream.clone_dtoh(piece).unwrap();
            if now
                .iter()
                .zip(original)
                .any(|(a, b)| a.to_f64().to_bits() != b.to_f64().to_bits())
            {
                return Err("the two-phase forward wrote over the logits".to_string());
            }
        }
        let mut d_upstream = stream.clone_htod(&upstream).unwrap();
        let upstream_raw = RawBuffer::of(stream, &mut d_upstream);
        let mut d_e_up = stream.clone_htod(&e_up).unwrap();
        let e_up_raw = opts
            .return_entropy
            .then(|| RawBuffer::of(stream, &mut d_e_up));
        for (call, out) in calls.iter().zip(&outs) {
            unsafe {
                xent.raw_shard_grad_with_entropy(
                    stream,
                    call,
                    &dev_opts,
                    out,
                    upstream_raw,
                    e_up_raw,
                )
            }
            .map_err(|e| format!("two-phase: {e}"))?;
        }
        compare("two-phase: ", &pieces, &want_grad, &extra)
    }
}
