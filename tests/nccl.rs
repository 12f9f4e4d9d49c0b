//! NCCL's loader (`xent::nccl`): the search order, a clear error when nothing loads, and, where a
//! library is found (`XENT_NCCL`, or the `nvidia-nccl-cu12/cu13` wheel beside a Python the test
//! can ask), loading it and reading its version (no GPU needed).

use std::path::PathBuf;

use xent::nccl::{self, Nccl};

/// The site-packages folders of `python3`, if there is one.
fn site_packages() -> Vec<PathBuf> {
    std::process::Command::new("python3")
        .args([
            "-c",
            "import site; print('\\n'.join(site.getsitepackages()))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn candidates_look_where_the_wheels_put_nccl() {
    let tries = nccl::candidates(
        Some("/opt/x/libnccl.so.2"),
        &[PathBuf::from("/d")],
        &[PathBuf::from("/site")],
    );
    let shown: Vec<String> = tries.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(
        shown,
        vec![
            "/opt/x/libnccl.so.2",
            "/d/libnccl.so.2",
            "/d/libnccl.so",
            "/site/nvidia/nccl/lib/libnccl.so.2",
            "/site/nvidia/nccl/lib/libnccl.so",
            "libnccl.so.2",
            "libnccl.so",
        ]
    );
}

#[test]
fn nccl_loads_and_reports_its_version_or_says_what_it_tried() {
    match Nccl::open(&[], &site_packages()) {
        Ok(nccl) => {
            let (major, minor, patch) = nccl.version().expect("ncclGetVersion needs no GPU");
            eprintln!(
                "NCCL {major}.{minor}.{patch} from {}",
                nccl.path().display()
            );
            assert_eq!(major, 2, "NCCL 2.x");
        }
        Err(err) => {
            let message = err.to_string();
            assert!(message.contains("libnccl.so.2"), "{message}");
            assert!(message.contains("XENT_NCCL"), "{message}");
            eprintln!("SKIPPED: no NCCL here ({message})");
        }
    }
}

/// The vocabulary-parallel call over NCCL (issue 15): one
/// thread per GPU of the machine (one rank on a one-GPU machine: loading, the communicator and
/// the call path), the vocabulary split over them, each rank's loss and gradient against the
/// CPU reference over the whole vocabulary. `XENT_NCCL_WORLD` caps the ranks.
#[test]
fn vocab_parallel_over_nccl_matches_the_reference_on_every_gpu() {
    use xent::cudarc::driver::CudaContext;
    use xent::raw::{LabelType, RawBuffer, RawLoss};
    use xent::vocab_parallel::{Shard, ShardCall};
    use xent::{Options, Shape, cpu};

    let Some(_) = xent_tests::gpu() else {
        return;
    };
    let nccl = match Nccl::open(&[], &site_packages()) {
        Ok(nccl) => nccl,
        Err(err) if std::env::var("XENT_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("a GPU but no NCCL (set XENT_NCCL): {err}")
        }
        Err(err) => {
            eprintln!("SKIPPED: no NCCL ({err})");
            return;
        }
    };
    let gpus = CudaContext::device_count().unwrap() as usize;
    let world = std::env::var("XENT_NCCL_WORLD")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(gpus)
        .min(gpus)
        .max(1);
    let (batch, seq_len, vocab) = (2usize, 37usize, 32003usize);
    let shape = Shape::batched(batch, seq_len, vocab);
    let rows = shape.rows();
    let mut rng = xent_tests::Rng(2026);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| (rng.unit() * 8.0 - 4.0) as f32)
        .collect();
    let labels: Vec<i64> = (0..rows)
        .map(|r| {
            if r % 6 == 5 {
                -100
            } else {
                rng.below(vocab as u64) as i64
            }
        })
        .collect();
    let opts = Options {
        label_smoothing: 0.1,
        lse_square_scale: 1e-4,
        causal_shift: true,
        ..Options::default()
    };
    let mut want_grad = logits.clone();
    let want = cpu::forward_backward(&mut want_grad, &labels, shape, &opts).unwrap();
    let shards = Shard::split(vocab, world).unwrap();
    let id = nccl.unique_id().expect("ncclGetUniqueId");
    let results: Vec<Result<(f32, Vec<f32>), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .iter()
            .enumerate()
            .map(|(rank, shard)| {
                let (nccl, logits, labels, opts) = (&nccl, &logits, &labels, &opts);
                scope.spawn(move || -> Result<(f32, Vec<f32>), String> {
                    let xent = xent::CrossEntropy::new(rank).map_err(|e| e.to_string())?;
                    xent.context().bind_to_thread().map_err(|e| e.to_string())?;
                    let stream = xent.context().default_stream();
                    let comm = nccl
                        .comm_init_rank(world, id, rank)
                        .map_err(|e| e.to_string())?;
                    let piece: Vec<f32> = (0..rows)
                        .flat_map(|r| {
                            logits[r * vocab + shard.start..r * vocab + shard.start + shard.width]
                                .to_vec()
                        })
                        .collect();
                    let mut d_piece = stream.clone_htod(&piece).unwrap();
                    let mut d_labels = stream.clone_htod(labels).unwrap();
                    let layout = xent
                        .shard_layout(rows, vocab, world, xent::DType::F32, opts)
                        .map_err(|e| e.to_string())?;
                    let mut send = stream.alloc_zeros::<f32>(layout.words).unwrap();
                    let mut recv = stream.alloc_zeros::<f32>(world * layout.words).unwrap();
                    let mut loss = stream.alloc_zeros::<f32>(1).unwrap();
                    let mut row_loss = stream.alloc_zeros::<f32>(rows).unwrap();
                    let mut row_lse = stream.alloc_zeros::<f32>(rows).unwrap();
                    let mut counts = stream.alloc_zeros::<u32>(xent::abi::COUNT_WORDS).unwrap();
                    let mut extras = stream.alloc_zeros::<f32>(2).unwrap();
                    let call = ShardCall {
                        logits: RawBuffer::of(&stream, &mut d_piece),
                        dtype: xent::DType::F32,
                        labels: RawBuffer::of(&stream, &mut d_labels),
                        label_type: LabelType::I64,
                        shape: Shape {
                            vocab: shard.width,
                            row_stride: shard.width,
                            ..shape
                        },
                        shard: *shard,
                        vocab,
                        weight: None,
                    };
                    let out = RawLoss {
                        loss: RawBuffer::of(&stream, &mut loss),
                        row_loss: RawBuffer::of(&stream, &mut row_loss),
                        row_lse: RawBuffer::of(&stream, &mut row_lse),
                        counts: RawBuffer::of(&stream, &mut counts),
                        extras: RawBuffer::of(&stream, &mut extras),
                        row_correct: None,
                        workspace: None,
                    };
                    let buffers = (
                        RawBuffer::of(&stream, &mut send),
                        RawBuffer::of(&stream, &mut recv),
                    );
                    unsafe {
                        xent.raw_vocab_parallel(
                            &stream, &comm, &call, opts, &layout, buffers, &out, true,
                        )
                    }
                    .map_err(|e| e.to_string())?;
                    let loss = stream.clone_dtoh(&loss).unwrap()[0];
                    Ok((loss, stream.clone_dtoh(&d_piece).unwrap()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let scale = want_grad.iter().fold(0.0f64, |m, g| m.max(g.abs() as f64));
    for (rank, (shard, result)) in shards.iter().zip(results).enumerate() {
        let (loss, grad) = result.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert!(
            (loss as f64 - want.loss).abs() <= 1e-5 * (1.0 + want.loss.abs()),
            "rank {rank} of {world}: loss {loss} against {}",
            want.loss
        );
        for r in 0..rows {
            for j in 0..shard.width {
                let (g, w) = (
                    grad[r * shard.width + j] as f64,
                    want_grad[r * vocab + shard.start + j] as f64,
                );
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs() + 1e-6 * scale,
                    "rank {rank} of {world}: grad[{r}, {}] {g} against {w}",
                    shard.start + j
                );
            }
        }
    }
    eprintln!(
        "vocabulary-parallel over NCCL: {world} rank(s), loss {}",
        want.loss
    );
}
