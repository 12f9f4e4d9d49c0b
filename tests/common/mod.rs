//! Shared helpers of the integration tests: the GPU handle (or a loud skip), seeded random
//! inputs, and the comparison of a GPU call with the CPU reference at stated tolerances.

use std::sync::OnceLock;

use xent::cudarc::driver::CudaStream;
use xent::half::{bf16, f16};
use xent::{CrossEntropy, DType, Element, Label, Options, Reduction, Shape, cpu};

/// The GPU handle shared by a test binary, or `None` (after printing why) when there is no GPU.
/// With `XENT_REQUIRE_GPU=1` a missing GPU fails the test instead.
/// A fresh handle on `shared`'s context that loads each kernel on its first use and refuses to
/// launch one that its call did not load before its first launch (`CrossEntropy::preload`), so a
/// test on it also checks that every call it makes loads all its kernels up front.
pub fn strict_lazy_handle(shared: &CrossEntropy) -> CrossEntropy {
    let handle = CrossEntropy::from_context_loading(shared.context().clone(), true)
        .expect("a second handle on a context that already has one");
    handle.set_strict_preload(true);
    handle
}

pub fn gpu() -> Option<&'static CrossEntropy> {
    static HANDLE: OnceLock<Result<CrossEntropy, String>> = OnceLock::new();
    let handle = HANDLE.get_or_init(|| CrossEntropy::new(0).map_err(|e| e.to_string()));
    match handle {
        Ok(xent) => Some(xent),
        Err(err) if std::env::var("XENT_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("XENT_REQUIRE_GPU=1 but no GPU: {err}")
        }
        Err(err) => {
            // Written to the stderr handle, not through `eprintln!`, so the test harness's output
            // capture does not hide it.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: GPU test without a GPU ({err}); set XENT_REQUIRE_GPU=1 to fail instead"
            );
            None
        }
    }
}

/// Under `XENT_SANITIZE=1` (compute-sanitizer runs 10-100x slower) tests shrink their shapes.
pub fn sanitizing() -> bool {
    std::env::var("XENT_SANITIZE").is_ok_and(|v| v == "1")
}

/// SplitMix64: small, seeded, good enough for test data.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Value written between rows (in the stride padding): it must survive every call.
pub const PAD: f64 = 7.25;

/// Random logits for `shape`: roughly N(0, 2) with 1 in 64 values spiked to +-12, and `PAD`
/// between rows. Filled in parallel, deterministically per seed.
pub fn random_logits<T: Element>(shape: &Shape, seed: u64) -> Vec<T> {
    let len = shape.min_logits_len().expect("shape fits usize");
    let mut data = vec![T::from_f64(PAD); len];
    let rows_per_job = 256;
    std::thread::scope(|scope| {
        for (job, chunk) in data.chunks_mut(rows_per_job * shape.row_stride).enumerate() {
            scope.spawn(move || {
                let mut rng = Rng(seed ^ (job as u64).wrapping_mul(0x1000_0000_01b3));
                for row in chunk.chunks_mut(shape.row_stride) {
                    for x in row.iter_mut().take(shape.vocab) {
                        let normal = (0..4).map(|_| rng.unit()).sum::<f64>() - 2.0; // var 1/3
                        let spike = if rng.below(64) == 0 { 12.0 } else { 0.0 };
                        let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
                        *x = T::from_f64(normal * 3.5 + sign * spike);
                    }
                }
            });
        }
    });
    data
}

/// Random labels in `[0, vocab)`, a fraction `ignored` of them `ignore_index`.
pub fn random_labels<L: Label + FromI64>(
    rows: usize,
    vocab: usize,
    ignored: f64,
    ignore_index: i64,
    seed: u64,
) -> Vec<L> {
    let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(17));
    (0..rows)
        .map(|_| {
            let label = if rng.unit() < ignored {
                ignore_index
            } else {
                rng.below(vocab as u64) as i64
            };
            L::from_i64(label)
        })
        .collect()
}

/// Building labels of either type from i64.
pub trait FromI64 {
    fn from_i64(v: i64) -> Self;
}
impl FromI64 for i64 {
    fn from_i64(v: i64) -> Self {
        v
    }
}
impl FromI64 for i32 {
    fn from_i64(v: i64) -> Self {
        v as i32
    }
}

/// Relative error of rounding to nearest into `dtype`: half an ulp, 2^-p for p significand bits
/// (f32: 24, f16: 11, bf16: 8).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2f64.powi(-24),
        DType::F16 => 2f64.powi(-11),
        DType::Bf16 => 2f64.powi(-8),
    }
}

/// Spacing of the type's subnormals: below the normal range, rounding errs by up to half of it
/// in absolute terms, whatever the value.
pub fn subnormal_step(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2f64.powi(-149),
        DType::F16 => 2f64.powi(-24),
        DType::Bf16 => 2f64.powi(-133),
    }
}

/// `Err((|g - e|, tol))` when a gradient element `g` is further than `atol + rtol * |e|` from
/// its reference `e` (or NaN where the reference is not), else `Ok(|g - e| / tol)`; NaN against
/// a NaN reference (a row with a NaN logit) is `Ok(0)`.
pub fn grad_error(g: f64, e: f64, rtol: f64, atol: f64) -> Result<f64, (f64, f64)> {
    if g.is_nan() && e.is_nan() {
        return Ok(0.0);
    }
    let tol = atol + rtol * e.abs();
    let err = (g - e).abs();
    if err.is_nan() || err > tol {
        Err((err, tol))
    } else {
        Ok(err / tol)
    }
}

/// The labels `run_case` draws for `case`: one per row, a fraction `case.ignored` of them
/// `ignore_index`.
pub fn case_labels<L: Label + FromI64>(case: &Case) -> Vec<L> {
    let shape = case.shape;
    random_labels(
        shape.rows(),
        shape.vocab,
        case.ignored,
        case.opts.ignore_index,
        case.seed,
    )
}

/// Panics listing every mismatch, if there is any.
#[track_caller]
pub fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} mismatch(es):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Relative tolerance of a gradient element of type `dtype` against the f64 reference: one unit
/// in the last place of the type (the GPU rounds its f32 result, the CPU its f64 result, and the
/// two may land on neighbouring values), at least 1e-5 for the f32 arithmetic itself
/// (`ex2.approx` is within 2^-22 relative; `x * log2(e) - lse2` loses about 2^-20 for |x| ~ 10).
pub fn grad_rtol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2f64.powi(-10),
        DType::Bf16 => 2f64.powi(-7),
    }
}

/// Absolute tolerance of a gradient element, relative to the gradient's scale: the target
/// element's `p - 1` cancels, leaving f32 error of about 2^-20 of the scale; f16 also rounds
/// values below its smallest normal (6.1e-5) to a 2^-24 grid.
pub fn grad_atol(dtype: DType, scale: f64) -> f64 {
    let base = 1e-5 * scale.abs();
    if dtype == DType::F16 {
        base + 2f64.powi(-24)
    } else {
        base
    }
}

/// Tolerance of a loss or log-sum-exp value `reference`: f32 arithmetic on values up to ~30
/// (2^-20 relative error per row, summed over many rows in f64).
pub fn loss_tol(reference: f64) -> f64 {
    1e-5 * reference.abs().max(1.0)
}

/// Tolerance of the reduced loss: `loss_tol` of the total, or, when the per-row terms cancel
/// (rows whose loss is ~0 while their log-sum-exp is not: V = 1, say), 1e-6 of the magnitudes
/// summed (each row's f32 log-sum-exp carries a rounding error relative to |lse| + |loss|, and a
/// sum over thousands of rows adds them up).
pub fn total_loss_tol(expected: &cpu::CpuLoss, opts: &Options) -> f64 {
    let scale = cpu::grad_scale(opts, expected.n_valid).abs();
    let magnitude: f64 = (expected.row_lse.iter().zip(&expected.row_loss))
        .map(|(lse, loss)| lse.abs() + loss.abs())
        .sum();
    loss_tol(expected.loss).max(1e-6 * scale * magnitude)
}

/// The scale the gradient's absolute tolerance is relative to: the largest coefficient of a
/// row's gradient, `max w·ce_scale·(1 + ε) + 2·s·max|lse|·z_scale` (see `xent::Options`), which
/// is `cpu::grad_scale` without options.
pub fn grad_tol_scale(opts: &Options, expected: &cpu::CpuLoss) -> f64 {
    let z_scale = cpu::grad_scale(opts, expected.n_valid).abs();
    let ce_scale = match opts.reduction {
        Reduction::Mean => opts.grad_scale as f64 / expected.total_weight,
        _ => opts.grad_scale as f64,
    }
    .abs();
    let w_max = opts.weight.as_ref().map_or(1.0, |w| {
        w.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()))
    });
    let lse_max = expected.row_lse.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
    let z = 2.0 * opts.lse_square_scale as f64 * lse_max * z_scale;
    let scale = w_max * ce_scale * (1.0 + opts.label_smoothing as f64) + z;
    // A weighted mean over no weight is 0/0: fall back to the unweighted scale.
    if scale.is_finite() { scale } else { z_scale }
}

/// Tolerance of a row's entropy `reference` (nats): f32 sums of `ex2.approx` terms over the row
/// and an `lg2.approx` (each within about 2^-22), and the soft cap's polynomial (a few ulp of each
/// capped logit, which moves the entropy by as much of the logits' spread).
pub fn entropy_tol(reference: f64) -> f64 {
    2e-5 * reference.abs().max(1.0)
}

/// Compares a call's entropies (`None`: not asked for) with the reference's: NaN where it is NaN.
pub fn check_entropy(got: Option<Vec<f32>>, want: &Option<Vec<f64>>) -> Result<(), String> {
    match (got, want) {
        (None, None) => Ok(()),
        (Some(got), Some(want)) if got.len() == want.len() => {
            let bad = (0..got.len()).find(|&r| {
                let (g, w) = (got[r] as f64, want[r]);
                !((g.is_nan() && w.is_nan()) || (g - w).abs() <= entropy_tol(w))
            });
            match bad {
                None => Ok(()),
                Some(r) => Err(format!(
                    "entropy row {r}: {} != reference {}",
                    got[r], want[r]
                )),
            }
        }
        (got, want) => Err(format!(
            "entropy: {} rows against the reference's {}",
            got.map_or("no".to_string(), |g| g.len().to_string()),
            want.as_ref()
                .map_or("no".to_string(), |w| w.len().to_string())
        )),
    }
}

/// Compares what the loss options add (the z-loss part, the token accuracy per row and overall)
/// with the reference; `Ok` when the call did not ask for them.
pub fn check_option_outputs(
    loss: &xent::Loss,
    expected: &cpu::CpuLoss,
    opts: &Options,
) -> Result<(), String> {
    let z = loss.read_z_loss().map_err(|e| e.to_string())? as f64;
    let same = |a: f64, b: f64, tol: f64| (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol;
    if !same(z, expected.z_loss, total_loss_tol(expected, opts)) {
        return Err(format!("z_loss {z} != reference {}", expected.z_loss));
    }
    let predicted = loss.read_predicted_tokens().map_err(|e| e.to_string())?;
    if predicted != expected.predicted_tokens {
        let (got, want) = (
            predicted.unwrap_or_default(),
            expected.predicted_tokens.clone(),
        );
        let want = want.unwrap_or_default();
        let r = (0..got.len().max(want.len())).find(|&r| got.get(r) != want.get(r));
        return Err(format!(
            "predicted tokens (asked: {}): row {r:?}: {:?} != reference {:?}",
            opts.return_predicted_tokens,
            r.and_then(|r| got.get(r)),
            r.and_then(|r| want.get(r))
        ));
    }
    check_entropy(
        loss.read_entropy().map_err(|e| e.to_string())?,
        &expected.entropy,
    )?;
    let accuracy = loss.read_accuracy().map_err(|e| e.to_string())?;
    let row_correct = loss.read_row_correct().map_err(|e| e.to_string())?;
    match (
        &expected.row_correct,
        row_correct,
        expected.accuracy,
        accuracy,
    ) {
        (None, None, None, None) => Ok(()),
        (Some(want), Some(got), Some(want_acc), Some(got_acc)) => {
            if let Some(r) = (0..want.len()).find(|&r| want[r] != got[r]) {
                return Err(format!(
                    "row {r}: correct {} != reference {}",
                    got[r], want[r]
                ));
            }
            if !same(got_acc as f64, want_acc, 1e-6) {
                return Err(format!("accuracy {got_acc} != reference {want_acc}"));
            }
            Ok(())
        }
        (_, got, _, got_acc) => Err(format!(
            "token accuracy asked: {}, GPU returned rows: {}, accuracy: {got_acc:?}",
            opts.return_token_accuracy,
            got.is_some()
        )),
    }
}

/// One GPU call against the CPU reference. Its `Debug` (in every failure message) shows the
/// first class weights and their count, not all of them: a vocabulary's worth made one failing
/// random run's log 2 MB.
#[derive(Clone)]
pub struct Case {
    pub shape: Shape,
    pub opts: Options,
    /// Fraction of labels set to `ignore_index`.
    pub ignored: f64,
    pub seed: u64,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 4;
        let weight = self.opts.weight.as_ref().map(|w| {
            let head: Vec<String> = w.iter().take(SHOWN).map(|x| format!("{x:?}")).collect();
            let more = if w.len() > SHOWN { ", ..." } else { "" };
            format!("[{}{more}] ({} values)", head.join(", "), w.len())
        });
        let opts = Options {
            weight: None,
            ..self.opts.clone()
        };
        f.debug_struct("Case")
            .field("shape", &self.shape)
            .field("opts (weight below)", &opts)
            .field("weight", &weight)
            .field("ignored", &self.ignored)
            .field("seed", &self.seed)
            .finish()
    }
}

impl Case {
    pub fn new(rows: usize, vocab: usize) -> Case {
        Case {
            shape: Shape::flat(rows, vocab),
            opts: Options::default(),
            ignored: 1.0 / 7.0,
            seed: 1,
        }
    }
}

/// What a comparison found.
#[derive(Debug)]
pub struct Outcome {
    pub loss_gpu: f64,
    pub loss_cpu: f64,
    pub max_grad_err_over_tol: f64,
}

/// Runs `case` on the GPU and the CPU and compares everything: loss, per-row loss and lse, every
/// gradient element, and the untouched stride padding. Returns a message on mismatch.
pub fn run_case<T: Element, L: Label + FromI64>(
    xent: &CrossEntropy,
    stream: &std::sync::Arc<CudaStream>,
    case: &Case,
) -> Result<Outcome, String> {
    let logits: Vec<T> = random_logits(&case.shape, case.seed);
    let labels: Vec<L> = case_labels(case);
    run_logits(xent, stream, case, logits, labels)
}

/// [`run_case`] on the logits and labels given (`case.seed` and `case.ignored` unused): padding
/// between rows, if any, must hold [`PAD`].
pub fn run_logits<T: Element, L: Label>(
    xent: &CrossEntropy,
    stream: &std::sync::Arc<CudaStream>,
    case: &Case,
    logits: Vec<T>,
    labels: Vec<L>,
) -> Result<Outcome, String> {
    let reference = Reference::new(case, logits, labels)?;
    reference.check(xent, stream, case)
}

/// A case's inputs and the CPU reference's results on them, computed once: the reference does not
/// depend on the plan, so a test can check every plan against one (`check`), which saves the
/// reference's time at large shapes.
pub struct Reference<T: Element, L: Label> {
    logits: Vec<T>,
    labels: Vec<L>,
    expected: cpu::CpuLoss,
    /// The reference's gradient, rounded to `T` as the GPU writes it.
    grad: Vec<T>,
}

impl<T: Element, L: Label + FromI64> Reference<T, L> {
    /// The reference for `case`'s random logits and labels.
    pub fn of_case(case: &Case) -> Result<Reference<T, L>, String> {
        Reference::new(
            case,
            random_logits(&case.shape, case.seed),
            case_labels(case),
        )
    }
}

impl<T: Element, L: Label> Reference<T, L> {
    /// The reference on `logits` and `labels` with `case`'s shape and options (its plan unused).
    pub fn new(case: &Case, logits: Vec<T>, labels: Vec<L>) -> Result<Reference<T, L>, String> {
        let mut grad = logits.clone();
        let expected = cpu::forward_backward(&mut grad, &labels, case.shape, &case.opts)
            .map_err(|e| format!("reference of {case:?}: {e}"))?;
        Ok(Reference {
            logits,
            labels,
            expected,
            grad,
        })
    }

    /// The reference's loss, per-row losses and option outputs.
    pub fn expected(&self) -> &cpu::CpuLoss {
        &self.expected
    }

    /// Runs `case` (its shape and options as the reference's, any plan) on the GPU and compares
    /// everything with the reference: loss, per-row loss and lse, every gradient element, and the
    /// untouched stride padding. Returns a message on mismatch.
    pub fn check(
        &self,
        xent: &CrossEntropy,
        stream: &std::sync::Arc<CudaStream>,
        case: &Case,
    ) -> Result<Outcome, String> {
        let shape = case.shape;
        let context = |what: &str| format!("{what} in {case:?} ({} logits)", T::DTYPE.name());
        let expected = &self.expected;

        let mut d_logits = stream
            .clone_htod(&self.logits)
            .map_err(|e| context(&e.to_string()))?;
        let d_labels = stream
            .clone_htod(&self.labels)
            .map_err(|e| context(&e.to_string()))?;
        let loss = xent
            .forward_backward(stream, &mut d_logits, &d_labels, shape, &case.opts)
            .map_err(|e| context(&e.to_string()))?;
        let loss_gpu = loss.read().map_err(|e| context(&e.to_string()))? as f64;
        let row_loss = loss.read_row_loss().map_err(|e| context(&e.to_string()))?;
        let row_lse = loss.read_row_lse().map_err(|e| context(&e.to_string()))?;
        let grad: Vec<T> = stream
            .clone_dtoh(&d_logits)
            .map_err(|e| context(&e.to_string()))?;

        let n_valid = loss.n_valid().map_err(|e| context(&e.to_string()))? as usize;
        if n_valid != expected.n_valid {
            return Err(context(&format!(
                "n_valid {n_valid} != {}",
                expected.n_valid
            )));
        }
        let same = |a: f64, b: f64, tol: f64| (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol;
        if !same(
            loss_gpu,
            expected.loss,
            total_loss_tol(expected, &case.opts),
        ) {
            return Err(context(&format!(
                "loss {loss_gpu} != reference {}",
                expected.loss
            )));
        }
        for r in 0..shape.rows() {
            let (l, e) = (row_loss[r] as f64, expected.row_loss[r]);
            if !same(l, e, loss_tol(e)) {
                return Err(context(&format!("row {r}: loss {l} != reference {e}")));
            }
            let (l, e) = (row_lse[r] as f64, expected.row_lse[r]);
            if !same(l, e, loss_tol(e)) {
                return Err(context(&format!("row {r}: lse {l} != reference {e}")));
            }
        }
        check_option_outputs(&loss, expected, &case.opts).map_err(|e| context(&e))?;
        let scale = grad_tol_scale(&case.opts, expected);
        let (rtol, atol) = (grad_rtol(T::DTYPE), grad_atol(T::DTYPE, scale));
        let mut worst = 0.0f64;
        for (i, (g, e)) in grad.iter().zip(&self.grad).enumerate() {
            let (g, e) = (g.to_f64(), e.to_f64());
            let in_row = i % shape.row_stride < shape.vocab;
            if !in_row {
                if g != PAD {
                    return Err(context(&format!("padding element {i} changed to {g}")));
                }
                continue;
            }
            match grad_error(g, e, rtol, atol) {
                Ok(ratio) => worst = worst.max(ratio),
                Err((err, tol)) => {
                    let (r, j) = (i / shape.row_stride, i % shape.row_stride);
                    return Err(context(&format!(
                        "grad[{r}, {j}] = {g:e}, reference {e:e}, |diff| {err:e} > tol {tol:e}"
                    )));
                }
            }
        }
        Ok(Outcome {
            loss_gpu,
            loss_cpu: expected.loss,
            max_grad_err_over_tol: worst,
        })
    }
}

/// Runs `case` for one dtype chosen at run time.
pub fn run_case_dtype<L: Label + FromI64>(
    xent: &CrossEntropy,
    stream: &std::sync::Arc<CudaStream>,
    dtype: DType,
    case: &Case,
) -> Result<Outcome, String> {
    match dtype {
        DType::F32 => run_case::<f32, L>(xent, stream, case),
        DType::F16 => run_case::<f16, L>(xent, stream, case),
        DType::Bf16 => run_case::<bf16, L>(xent, stream, case),
    }
}

/// Every plan, forced: the fused kernel, the chunked pair (with a chunk of `chunk_len` that
/// splits rows) and, where the device has clusters, the cluster kernel with 3 CTAs per row.
pub fn forced_plans(xent: &CrossEntropy, chunk_len: usize) -> Vec<xent::PlanChoice> {
    let mut plans = vec![
        xent::PlanChoice::Fused,
        xent::PlanChoice::Chunked {
            chunk_len: Some(chunk_len),
        },
    ];
    if xent.limits().max_cluster > 1 {
        plans.push(xent::PlanChoice::Cluster {
            size: Some(3),
            threads: None,
        });
    } else {
        plans.push(xent::PlanChoice::Split {
            chunk_len: Some(chunk_len),
            threads: None,
        });
    }
    plans
}

/// Every reduction, for loops over options.
pub const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];
/// Every dtype.
pub const DTYPES: [DType; 3] = [DType::Bf16, DType::F16, DType::F32];

// ---------------------------------------------------------------------------------------------
// Explicit labels and offset base pointers (robustness tests: random.rs, concurrency.rs).
// ---------------------------------------------------------------------------------------------

/// Writes `line` to stderr past the test harness's output capture (as [`gpu`] does for its skip
/// notice), for summaries that should show in a passing run.
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// One GPU call whose inputs are on the device and whose CPU reference is still to be computed:
/// `case.shape`'s logits (from [`random_logits`] with `case.seed`) start `base_offset` elements
/// past the start of their allocation (the elements before them hold [`PAD`]), and the labels
/// are given explicitly, so they may include values out of range (`case.ignored` is not used).
///
/// Split into [`Prepared::launch`] and [`Prepared::check`] so a test can enqueue several calls
/// before it reads any result.
pub struct Prepared<T: Element, L: Label> {
    pub case: Case,
    pub base_offset: usize,
    stream: std::sync::Arc<CudaStream>,
    /// The logits as uploaded, prefix included.
    logits: Vec<T>,
    labels: Vec<L>,
    d_logits: xent::cudarc::driver::CudaSlice<T>,
    /// At least one element (a zero-length allocation is an error); the call sees `labels.len()`.
    d_labels: xent::cudarc::driver::CudaSlice<L>,
}

impl<T: Element, L: Label> Prepared<T, L> {
    /// Makes the inputs and uploads them on `stream` (the stream the call must run on).
    pub fn new(
        stream: &std::sync::Arc<CudaStream>,
        case: &Case,
        labels: Vec<L>,
        base_offset: usize,
    ) -> Result<Self, String> {
        let shape = case.shape;
        let mut logits = vec![T::from_f64(PAD); base_offset];
        logits.extend(random_logits::<T>(&shape, case.seed));
        if logits.is_empty() {
            logits.push(T::from_f64(PAD));
        }
        let upload = |e: xent::cudarc::driver::DriverError| format!("upload: {e} in {case:?}");
        let d_logits = stream.clone_htod(&logits).map_err(upload)?;
        let d_labels = if labels.is_empty() {
            stream.clone_htod(&[L::default()])
        } else {
            stream.clone_htod(&labels)
        }
        .map_err(upload)?;
        Ok(Prepared {
            case: case.clone(),
            base_offset,
            stream: stream.clone(),
            logits,
            labels,
            d_logits,
            d_labels,
        })
    }

    fn context(&self, what: &str) -> String {
        format!(
            "{what} in {:?} ({} logits at base offset {}, {} labels)",
            self.case,
            T::DTYPE.name(),
            self.base_offset,
            L::NAME
        )
    }

    /// Enqueues the call on the stream given to [`Prepared::new`]; returns without waiting.
    pub fn launch(&mut self, xent: &CrossEntropy) -> Result<xent::Loss, String> {
        let shape = self.case.shape;
        let len = shape.min_logits_len().expect("shape fits usize");
        let start = self.base_offset;
        let mut logits = self.d_logits.slice_mut(start..start + len);
        let labels = self.d_labels.slice(0..self.labels.len());
        xent.forward_backward(&self.stream, &mut logits, &labels, shape, &self.case.opts)
            .map_err(|e| format!("launch: {e} in {:?}", self.case))
    }

    /// Waits for the call that returned `loss` and compares everything with the CPU reference:
    /// the loss (or, with labels out of range, [`xent::Error::LabelOutOfRange`] with their count
    /// and a NaN device scalar), the count of scored rows, per-row loss and lse of scored rows
    /// (exactly 0 for ignored ones), every gradient element (exactly 0 in rows not scored), and
    /// the untouched elements before the first row and between rows.
    ///
    /// The reference is the CPU call with every out-of-range label replaced by `ignore_index`:
    /// the documented treatment of such a row (zero gradient, not counted in the mean).
    pub fn check(&self, loss: &xent::Loss) -> Result<Outcome, String> {
        let (shape, opts) = (self.case.shape, &self.case.opts);
        let rows = shape.rows();
        let targets: Vec<xent::Target> = (0..rows)
            .map(|r| xent::row_target(&self.labels, &shape, opts, r))
            .collect();
        let n_bad = targets
            .iter()
            .filter(|t| matches!(t, xent::Target::OutOfRange(_)))
            .count();
        let vocab = shape.vocab as i64;
        let reference_labels: Vec<i64> = self
            .labels
            .iter()
            .map(|l| match l.to_i64() {
                label if label == opts.ignore_index || (0..vocab).contains(&label) => label,
                _ => opts.ignore_index,
            })
            .collect();
        let len = shape.min_logits_len().expect("shape fits usize");
        let start = self.base_offset;
        let mut reference = self.logits[start..start + len].to_vec();
        let expected = cpu::forward_backward(&mut reference, &reference_labels, shape, opts)
            .map_err(|e| self.context(&format!("CPU reference: {e}")))?;

        let driver = |e: xent::cudarc::driver::DriverError| self.context(&e.to_string());
        let same = |a: f64, b: f64, tol: f64| (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol;
        let loss_gpu = match (n_bad, loss.read()) {
            (0, Ok(value)) => {
                let value = value as f64;
                if !same(value, expected.loss, total_loss_tol(&expected, opts)) {
                    return Err(
                        self.context(&format!("loss {value} != reference {}", expected.loss))
                    );
                }
                value
            }
            (n, Err(xent::Error::LabelOutOfRange { count, .. })) if count == n && n > 0 => {
                let device = self.stream.clone_dtoh(loss.device_loss()).map_err(driver)?[0];
                if !device.is_nan() {
                    return Err(self.context(&format!(
                        "{n} label(s) out of range but the device loss is {device}, not NaN"
                    )));
                }
                f64::NAN
            }
            (n, other) => {
                return Err(self.context(&format!(
                    "{n} label(s) out of range, but reading the loss gave {other:?}"
                )));
            }
        };
        let n_valid = loss.n_valid().map_err(|e| self.context(&e.to_string()))? as usize;
        if n_valid != expected.n_valid {
            return Err(self.context(&format!("n_valid {n_valid} != {}", expected.n_valid)));
        }

        let row_loss = self
            .stream
            .clone_dtoh(loss.device_row_loss())
            .map_err(driver)?;
        let row_lse = self
            .stream
            .clone_dtoh(loss.device_row_lse())
            .map_err(driver)?;
        for (r, target) in targets.iter().enumerate() {
            let pairs = [
                ("loss", row_loss[r] as f64, expected.row_loss[r]),
                ("lse", row_lse[r] as f64, expected.row_lse[r]),
            ];
            for (what, got, want) in pairs {
                let ok = match target {
                    xent::Target::Class(_) => same(got, want, loss_tol(want)),
                    xent::Target::Ignored => got == 0.0,
                    // Not documented beyond "the loss scalar becomes NaN".
                    xent::Target::OutOfRange(_) => true,
                };
                if !ok {
                    return Err(self.context(&format!(
                        "row {r} ({target:?}): {what} {got} != reference {want}"
                    )));
                }
            }
        }

        if n_bad == 0 {
            check_option_outputs(loss, &expected, opts).map_err(|e| self.context(&e))?;
        }
        let grad: Vec<T> = self.stream.clone_dtoh(&self.d_logits).map_err(driver)?;
        let scale = grad_tol_scale(opts, &expected);
        let (rtol, atol) = (grad_rtol(T::DTYPE), grad_atol(T::DTYPE, scale));
        let mut worst = 0.0f64;
        for (i, g) in grad.iter().enumerate() {
            let g = g.to_f64();
            // (row, column) of element `i`, if it lies in a row (not before the first row, nor in
            // the padding between rows).
            let position = i
                .checked_sub(start)
                .filter(|&k| k < len)
                .map(|k| (k / shape.row_stride, k % shape.row_stride))
                .filter(|&(_, j)| j < shape.vocab);
            let Some((r, j)) = position else {
                if g != PAD {
                    return Err(self.context(&format!(
                        "element {i} outside the rows changed from {PAD} to {g}"
                    )));
                }
                continue;
            };
            let e = reference[i - start].to_f64();
            if !matches!(targets[r], xent::Target::Class(_)) {
                if g != 0.0 {
                    return Err(self.context(&format!(
                        "grad[{r}, {j}] = {g:e} in a row not scored ({:?})",
                        targets[r]
                    )));
                }
                continue;
            }
            match grad_error(g, e, rtol, atol) {
                Ok(ratio) => worst = worst.max(ratio),
                Err((err, tol)) => {
                    return Err(self.context(&format!(
                        "grad[{r}, {j}] = {g:e}, reference {e:e}, |diff| {err:e} > tol {tol:e}"
                    )));
                }
            }
        }
        Ok(Outcome {
            loss_gpu,
            loss_cpu: expected.loss,
            max_grad_err_over_tol: worst,
        })
    }
}

/// [`Prepared`]: upload, launch, wait and compare, in one call.
pub fn run_case_labels<T: Element, L: Label>(
    xent: &CrossEntropy,
    stream: &std::sync::Arc<CudaStream>,
    case: &Case,
    labels: Vec<L>,
    base_offset: usize,
) -> Result<Outcome, String> {
    let mut prepared = Prepared::<T, L>::new(stream, case, labels, base_offset)?;
    let loss = prepared.launch(xent)?;
    prepared.check(&loss)
}

/// [`run_case_labels`] for one dtype chosen at run time.
pub fn run_case_labels_dtype<L: Label>(
    xent: &CrossEntropy,
    stream: &std::sync::Arc<CudaStream>,
    dtype: DType,
    case: &Case,
    labels: Vec<L>,
    base_offset: usize,
) -> Result<Outcome, String> {
    match dtype {
        DType::F32 => run_case_labels::<f32, L>(xent, stream, case, labels, base_offset),
        DType::F16 => run_case_labels::<f16, L>(xent, stream, case, labels, base_offset),
        DType::Bf16 => run_case_labels::<bf16, L>(xent, stream, case, labels, base_offset),
    }
}

/// The default options under each reduction: "mean", "sum", "none".
pub fn reduction_option_sets() -> Vec<(&'static str, Options)> {
    [
        ("mean", Reduction::Mean),
        ("sum", Reduction::Sum),
        ("none", Reduction::None),
    ]
    .into_iter()
    .map(|(what, reduction)| {
        let opts = Options {
            reduction,
            ..Options::default()
        };
        (what, opts)
    })
    .collect()
}

/// The option sets of the vocabulary-parallel tests (`tests/vocab_parallel.rs`, `tests/nccl.rs`):
/// every reduction, every option at once, the causal shift, another `ignore_index`.
pub fn vocab_parallel_option_sets(vocab: usize) -> Vec<(&'static str, Options)> {
    let base = Options::default();
    let mut sets = reduction_option_sets();
    sets.extend([
        (
            "every option",
            Options {
                label_smoothing: 0.1,
                lse_square_scale: 1e-3,
                softcap: Some(4.0),
                weight: Some((0..vocab).map(|j| 0.5 + (j % 4) as f32 * 0.25).collect()),
                return_token_accuracy: true,
                grad_scale: 0.5,
                ..base.clone()
            },
        ),
        (
            "causal",
            Options {
                causal_shift: true,
                label_smoothing: 0.05,
                ..base.clone()
            },
        ),
        (
            "ignore 3",
            Options {
                ignore_index: 3,
                return_token_accuracy: true,
                ..base
            },
        ),
    ]);
    sets
}

/// The site-packages folders of `python3`, if there is one (where PyTorch's wheels put NCCL).
pub fn site_packages() -> Vec<std::path::PathBuf> {
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
                .map(std::path::PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// NCCL from `XENT_NCCL` or PyTorch's wheel, on a machine with a GPU (`None`: skip; a GPU
/// without NCCL under `XENT_REQUIRE_GPU=1` fails).
pub fn nccl_for_gpu_tests() -> Option<xent::nccl::Nccl> {
    gpu()?;
    match xent::nccl::Nccl::open(&[], &site_packages()) {
        Ok(nccl) => Some(nccl),
        Err(err) if std::env::var("XENT_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("a GPU but no NCCL (set XENT_NCCL): {err}")
        }
        Err(err) => {
            eprintln!("SKIPPED: no NCCL ({err})");
            None
        }
    }
}

/// Ranks of the multi-GPU tests: every GPU, at most `XENT_NCCL_WORLD`.
pub fn nccl_world() -> usize {
    let gpus = xent::cudarc::driver::CudaContext::device_count().unwrap() as usize;
    std::env::var("XENT_NCCL_WORLD")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(gpus)
        .min(gpus)
        .max(1)
}
