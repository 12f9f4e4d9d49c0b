//! NCCL's loader (`xent::nccl`): the search order, a clear error when nothing loads, and, where a
//! library is found (`XENT_NCCL`, or the `nvidia-nccl-cu12/cu13` wheel beside a Python the test
//! can ask), loading it and reading its version (no GPU needed).

use std::path::PathBuf;

use xent::nccl::{self, Nccl};
use xent_tests::{nccl_for_gpu_tests, nccl_world, site_packages};

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

/// The vocabulary-parallel tests' option sets without `Reduction::None` (the loss these tests
/// read is a scalar).
/// The vocabulary-parallel option sets with a reduction, the entropies asked for with every
/// option and with the causal shift.
fn option_sets(vocab: usize) -> Vec<(&'static str, xent::Options)> {
    xent_tests::vocab_parallel_option_sets(vocab)
        .into_iter()
        .filter(|(_, opts)| opts.reduction != xent::Reduction::None)
        .map(|(name, opts)| {
            let opts = xent::Options {
                return_entropy: matches!(name, "every option" | "causal"),
                ..opts
            };
            (name, opts)
        })
        .collect()
}

/// One case of the NCCL tests: `[2, 37, 32003]` f32 logits in [-4, 4), labels with every sixth
/// row `ignore_index` (-100, or 3: a vocabulary id that is ignored), the same on every rank.
struct NcclCase {
    shape: xent::Shape,
    logits: Vec<f32>,
    labels: Vec<i64>,
}

impl NcclCase {
    fn new(opts: &xent::Options) -> NcclCase {
        let shape = xent::Shape::batched(2, 37, 32003);
        let (rows, vocab) = (shape.rows(), shape.vocab);
        let mut rng = xent_tests::Rng(2026);
        let logits = (0..rows * vocab)
            .map(|_| (rng.unit() * 8.0 - 4.0) as f32)
            .collect();
        let labels = (0..rows)
            .map(|r| match r % 6 {
                5 => opts.ignore_index,
                _ => rng.below(vocab as u64) as i64,
            })
            .collect();
        NcclCase {
            shape,
            logits,
            labels,
        }
    }
}

/// What one rank computed: the loss, and its shard's gradient (eagerly, and from each replay of a
/// CUDA graph of the same call when captured).
struct RankResult {
    loss: f32,
    grad: Vec<f32>,
    /// The token accuracy, where the options ask for it.
    accuracy: Option<f32>,
    /// The entropies over the whole vocabulary, where the options ask for them.
    entropy: Option<Vec<f32>>,
    /// Each replay's loss, gradient and entropies (empty without them).
    replays: Vec<(f32, Vec<f32>, Vec<f32>)>,
}

/// Rank `rank` of a `world`-rank vocabulary-parallel call over NCCL on GPU `rank`: eagerly, then
/// (with `capture`) captured in a CUDA graph and replayed twice on the pristine shard.
fn run_rank(
    nccl: &Nccl,
    world: usize,
    id: nccl::UniqueId,
    rank: usize,
    case: &NcclCase,
    opts: &xent::Options,
    capture: bool,
) -> Result<RankResult, String> {
    use xent::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use xent::raw::{LabelType, RawBuffer, RawLoss};
    use xent::vocab_parallel::{Shard, ShardCall};

    let err = |e: xent::Error| e.to_string();
    let drv = |e: xent::cudarc::driver::DriverError| e.to_string();
    let (shape, vocab) = (case.shape, case.shape.vocab);
    let rows = shape.rows();
    let shard = Shard::split(vocab, world).map_err(err)?[rank];
    let xent = xent::CrossEntropy::new(rank).map_err(err)?;
    xent.context().bind_to_thread().map_err(drv)?;
    // SAFETY: one stream; cudarc's cross-stream events are not needed, and an event record of
    // them inside the capture would join the graph.
    unsafe { xent.context().disable_event_tracking() };
    let stream = xent.context().new_stream().map_err(drv)?; // capturable, unlike the legacy one
    let comm = nccl.comm_init_rank(world, id, rank).map_err(err)?;
    let piece: Vec<f32> = shard.columns(&case.logits, shape);
    let pristine = stream.clone_htod(&piece).map_err(drv)?;
    let mut d_piece = stream.clone_htod(&piece).map_err(drv)?;
    let mut d_labels = stream.clone_htod(&case.labels).map_err(drv)?;
    let mut d_weight = match &opts.weight {
        Some(w) => Some(stream.clone_htod(w).map_err(drv)?),
        None => None,
    };
    let opts = xent::Options {
        weight: None,
        ..opts.clone()
    };
    let layout = xent
        .shard_layout(rows, vocab, world, xent::DType::F32, &opts)
        .map_err(err)?;
    let mut send = stream.alloc_zeros::<f32>(layout.words).map_err(drv)?;
    let mut recv = stream
        .alloc_zeros::<f32>(world * layout.words)
        .map_err(drv)?;
    let mut loss = stream.alloc_zeros::<f32>(1).map_err(drv)?;
    let mut row_loss = stream.alloc_zeros::<f32>(rows).map_err(drv)?;
    let mut row_lse = stream.alloc_zeros::<f32>(rows).map_err(drv)?;
    let mut counts = stream
        .alloc_zeros::<u32>(xent::abi::COUNT_WORDS)
        .map_err(drv)?;
    let mut extras = stream.alloc_zeros::<f32>(2).map_err(drv)?;
    let mut row_correct = stream.alloc_zeros::<u32>(rows).map_err(drv)?;
    let mut entropy = stream.alloc_zeros::<f32>(rows).map_err(drv)?;
    let call = ShardCall {
        logits: RawBuffer::of(&stream, &mut d_piece),
        dtype: xent::DType::F32,
        labels: RawBuffer::of(&stream, &mut d_labels),
        label_type: LabelType::I64,
        shape: shard.shape_in(shape),
        shard,
        vocab,
        weight: d_weight.as_mut().map(|w| RawBuffer::of(&stream, w)),
    };
    let out = RawLoss {
        loss: RawBuffer::of(&stream, &mut loss),
        row_loss: RawBuffer::of(&stream, &mut row_loss),
        row_lse: RawBuffer::of(&stream, &mut row_lse),
        counts: RawBuffer::of(&stream, &mut counts),
        extras: RawBuffer::of(&stream, &mut extras),
        row_correct: opts
            .return_token_accuracy
            .then(|| RawBuffer::of(&stream, &mut row_correct)),
        predicted: None,
        entropy: opts
            .return_entropy
            .then(|| RawBuffer::of(&stream, &mut entropy)),
        workspace: None,
    };
    let buffers = (
        RawBuffer::of(&stream, &mut send),
        RawBuffer::of(&stream, &mut recv),
    );
    // SAFETY: every buffer above is this stream's device memory of the stated length, alive past
    // the synchronising reads below.
    let step = || unsafe {
        xent.raw_vocab_parallel(&stream, &comm, &call, &opts, &layout, buffers, &out, true)
    };
    step().map_err(err)?;
    let read_loss = |stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>| {
        stream.clone_dtoh(&loss).map(|l| l[0]).map_err(drv)
    };
    let result_loss = read_loss(&stream)?;
    let grad = stream.clone_dtoh(&d_piece).map_err(drv)?;
    let accuracy = match opts.return_token_accuracy {
        true => Some(stream.clone_dtoh(&extras).map_err(drv)?[1]),
        false => None,
    };
    let read_entropy =
        |stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>| match opts.return_entropy {
            true => stream.clone_dtoh(&entropy).map_err(drv),
            false => Ok(Vec::new()),
        };
    let entropies = read_entropy(&stream)?;
    let mut replays = Vec::new();
    if capture {
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(drv)?;
        stream.memcpy_dtod(&pristine, &mut d_piece).map_err(drv)?;
        step().map_err(err)?;
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(drv)?
            .ok_or("the capture recorded no work")?;
        for _ in 0..2 {
            stream.memset_zeros(&mut d_piece).map_err(drv)?; // the replay restores and recomputes
            graph.launch().map_err(drv)?;
            replays.push((
                read_loss(&stream)?,
                stream.clone_dtoh(&d_piece).map_err(drv)?,
                read_entropy(&stream)?,
            ));
        }
    }
    Ok(RankResult {
        loss: result_loss,
        grad,
        accuracy,
        entropy: opts.return_entropy.then_some(entropies),
        replays,
    })
}

/// Checks rank `rank`'s result against the CPU reference over the whole vocabulary; replays must
/// equal the eager call bit for bit.
fn check_rank(
    what: &str,
    world: usize,
    rank: usize,
    case: &NcclCase,
    opts: &xent::Options,
    result: &RankResult,
) -> Result<(), String> {
    let (shape, vocab) = (case.shape, case.shape.vocab);
    let rows = shape.rows();
    let mut want_grad = case.logits.clone();
    let want = xent::cpu::forward_backward(&mut want_grad, &case.labels, shape, opts)
        .map_err(|e| e.to_string())?;
    let shard = xent::vocab_parallel::Shard::split(vocab, world).unwrap()[rank];
    let scale = want_grad.iter().fold(0.0f64, |m, g| m.max(g.abs() as f64));
    let want_loss = want.loss;
    let at = format!("{what}, rank {rank} of {world}");
    if (result.loss as f64 - want_loss).abs() > 1e-5 * (1.0 + want_loss.abs()) {
        return Err(format!("{at}: loss {} against {want_loss}", result.loss));
    }
    // Token accuracy over the whole vocabulary: the argmax of the logits as given, exactly.
    let want_accuracy = want.accuracy.map(|a| a as f32);
    if result.accuracy.map(f32::to_bits) != want_accuracy.map(f32::to_bits) {
        return Err(format!(
            "{at}: accuracy {:?} against {want_accuracy:?}",
            result.accuracy
        ));
    }
    // The entropies over the whole vocabulary.
    xent_tests::check_entropy(result.entropy.clone(), &want.entropy)
        .map_err(|e| format!("{at}: {e}"))?;
    for r in 0..rows {
        for j in 0..shard.width {
            let (g, w) = (
                result.grad[r * shard.width + j] as f64,
                want_grad[r * vocab + shard.start + j] as f64,
            );
            if (g - w).abs() > 1e-5 * w.abs() + 1e-6 * scale {
                return Err(format!(
                    "{at}: grad[{r}, {}] {g} against {w}",
                    shard.start + j
                ));
            }
        }
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let eager_entropy = result.entropy.as_deref().map_or(Vec::new(), bits);
    for (i, (loss, grad, entropy)) in result.replays.iter().enumerate() {
        let same = loss.to_bits() == result.loss.to_bits()
            && grad
                .iter()
                .zip(&result.grad)
                .all(|(a, b)| a.to_bits() == b.to_bits())
            && bits(entropy) == eager_entropy;
        if !same {
            return Err(format!(
                "{at}: graph replay {i} differs from the eager call"
            ));
        }
    }
    Ok(())
}

/// The vocabulary-parallel call over NCCL (issues 15 and 16): one thread per GPU of the machine
/// (one rank on a one-GPU machine: loading, the communicator, the call path), the vocabulary
/// (32003 classes: uneven shards from 2 ranks on) split over them, every option set, each rank's
/// loss and gradient against the CPU reference over the whole vocabulary; each call also captured
/// in a CUDA graph (the all-gather included) and replayed, bit for bit. `XENT_NCCL_WORLD` caps
/// the ranks.
#[test]
fn vocab_parallel_over_nccl_matches_the_reference_on_every_gpu() {
    let Some(nccl) = nccl_for_gpu_tests() else {
        return;
    };
    let world = nccl_world();
    let mut failures = Vec::new();
    for (what, opts) in option_sets(32003) {
        let case = NcclCase::new(&opts);
        let id = nccl.unique_id().expect("ncclGetUniqueId");
        let results: Vec<Result<RankResult, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let (nccl, case, opts) = (&nccl, &case, &opts);
                    scope.spawn(move || run_rank(nccl, world, id, rank, case, opts, true))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, result) in results.iter().enumerate() {
            let checked = result
                .as_ref()
                .map_err(|e| format!("{what}, rank {rank}: {e}"))
                .and_then(|r| check_rank(what, world, rank, &case, &opts, r));
            if let Err(e) = checked {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "vocabulary-parallel over NCCL, one thread per GPU: {world} rank(s), {} option sets, \
         eager and graph replays",
        option_sets(1).len()
    );
}

/// The same with one process per GPU, as `torchrun` runs them: this test starts its own binary
/// once per rank (`XENT_NCCL_CHILD_RANK`, the communicators' ids in hex in `XENT_NCCL_IDS`), each
/// child checks its rank against the CPU reference and exits non-zero on a mismatch.
#[test]
fn vocab_parallel_over_nccl_one_process_per_gpu() {
    const NAME: &str = "vocab_parallel_over_nccl_one_process_per_gpu";
    if let Ok(rank) = std::env::var("XENT_NCCL_CHILD_RANK") {
        let rank: usize = rank.parse().expect("XENT_NCCL_CHILD_RANK");
        let world: usize = std::env::var("XENT_NCCL_CHILD_WORLD")
            .ok()
            .and_then(|w| w.parse().ok())
            .expect("XENT_NCCL_CHILD_WORLD");
        let ids: Vec<nccl::UniqueId> = std::env::var("XENT_NCCL_IDS")
            .expect("XENT_NCCL_IDS")
            .split(',')
            .map(|hex| {
                let mut id = nccl::UniqueId { internal: [0; 128] };
                for (i, byte) in id.internal.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                        .expect("XENT_NCCL_IDS: 256 hex digits per id");
                }
                id
            })
            .collect();
        let nccl = Nccl::open(&[], &site_packages()).expect("NCCL in the child");
        for ((what, opts), id) in option_sets(32003).into_iter().zip(ids) {
            let case = NcclCase::new(&opts);
            let result = run_rank(&nccl, world, id, rank, &case, &opts, false)
                .unwrap_or_else(|e| panic!("{what}, rank {rank}: {e}"));
            check_rank(what, world, rank, &case, &opts, &result).unwrap();
        }
        return;
    }
    let Some(nccl) = nccl_for_gpu_tests() else {
        return;
    };
    let world = nccl_world();
    let exe = std::env::current_exe().unwrap();
    let sets = option_sets(1).len();
    // One id per option set (an id's bootstrap root, in this process, serves one communicator):
    // the children take id `i` for set `i`.
    let ids: Vec<String> = (0..sets)
        .map(|_| {
            let id = nccl.unique_id().expect("ncclGetUniqueId");
            id.internal.iter().map(|b| format!("{b:02x}")).collect()
        })
        .collect();
    let ids = ids.join(",");
    let children: Vec<_> = (0..world)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env("XENT_NCCL_CHILD_RANK", rank.to_string())
                .env("XENT_NCCL_CHILD_WORLD", world.to_string())
                .env("XENT_NCCL_IDS", &ids)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start a rank")
        })
        .collect();
    let mut failures = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            failures.push(format!(
                "rank {rank}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "vocabulary-parallel over NCCL, one process per GPU: {world} rank(s), {sets} option sets"
    );
}
