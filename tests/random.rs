//! Randomized differential tests: thousands of random calls (shape, dtype, label type, options,
//! row strides, plans, label mixes, base offsets) on the GPU against the CPU reference, drawn by a
//! seeded generator; plus the fixed corner shapes such a draw may miss (a misaligned base pointer
//! under every plan, sequences of one position under the shift).
//!
//! Environment:
//! - `XENT_SEED`: the base seed (decimal or `0x` hex; default [`DEFAULT_SEED`]). Case 0 draws with
//!   the base seed itself and case `i` with a seed derived from it, so a failing case, printed with
//!   its own seed, replays alone: `XENT_SEED=<its seed> XENT_RANDOM_CASES=1`.
//! - `XENT_RANDOM_CASES`: cases of `random_cases_match_cpu_reference` (default 2000; 50 under
//!   `XENT_SANITIZE=1`); `random_label_mixes_and_base_offsets_match_cpu_reference` runs a quarter
//!   as many.
//!
//! Without a GPU the GPU tests print `SKIPPED`; the generator's own test (reproducible draws,
//! bounded work, every option covered) runs everywhere.

use xent::plan::PlanChoice;
use xent::{DType, Error, Options, Shape};
use xent_tests::{
    Case, DTYPES, FromI64, REDUCTIONS, Rng, assert_no_failures, gpu, random_labels, report,
    run_case_dtype, run_case_labels_dtype, sanitizing,
};

/// The base seed when `XENT_SEED` is not set.
const DEFAULT_SEED: u64 = 0x00c0_ffee_2026_1128;
const DEFAULT_CASES: usize = 2000;
/// compute-sanitizer runs 10-100x slower: a handful of cases still covers every kernel.
const SANITIZER_CASES: usize = 50;
/// Largest `rows * row_stride` of one case (4 Mi elements: 16 rows of a 262144 vocabulary): the
/// occasional large case. The host side of a case (random logits, f64 reference, comparison)
/// costs about 60 ns per element in a release build on 2 cores, 270 ns in a debug build.
const MAX_CASE_ELEMENTS: usize = 1 << 22;
/// Largest `rows * row_stride` of the other cases, so that a default run averages about 1/4 Mi
/// elements per case (the large cases make up half of that): 2000 cases, about 30 s of host work
/// in a release build.
const TYPICAL_CASE_ELEMENTS: usize = 1 << 18;
/// Elements a run may spend per case on average (four times the draw's average, so only an
/// unlucky seed meets it): a run of N cases stops drawing work past N times this, counting the
/// cases it leaves out.
const BUDGET_PER_CASE: usize = 1 << 20;
/// The budget under the sanitizer, whose racecheck makes a 4 Mi-element case take minutes: the
/// large draws are left out (and counted), the small ones run.
const SANITIZER_BUDGET_PER_CASE: usize = 1 << 16;
/// Stop after this many failures: each prints its case and how to replay it.
const MAX_FAILURES: usize = 10;
/// Vocabularies of released models: Llama 2 (32000), Phi-3 (32064), Granite (49152), GPT-2
/// (50257), 2^16, Llama 3 (128256), Qwen2 (151936), Qwen2-VL (152064), 256000 (Gemma),
/// Gemma 3 (262144).
const LLM_VOCABS: [usize; 10] = [
    32000, 32064, 49152, 50257, 65536, 128256, 151936, 152064, 256000, 262144,
];
/// Gradient scales: 1 most often, fractions (1 / accumulation steps), a loss scale.
const GRAD_SCALES: [f32; 10] = [
    1.0,
    1.0,
    1.0,
    1.0,
    0.5,
    0.125,
    1.0 / 7.0,
    3.0,
    1024.0,
    1.0 / 1024.0,
];
/// Mixed into a case's seed for the draws of the label-mix test, so those do not shift the
/// case's own draws.
const LABEL_MIX_SALT: u64 = 0x1abe_1500_0000_0001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LabelType {
    I32,
    I64,
}

/// One random call: everything `run_case` needs, and the seed that reproduces it.
#[derive(Clone, Debug)]
struct Draw {
    seed: u64,
    dtype: DType,
    label_type: LabelType,
    case: Case,
}

impl Draw {
    fn elements(&self) -> usize {
        self.case.shape.min_logits_len().expect("drawn shapes fit")
    }
}

/// `XENT_SEED`, or [`DEFAULT_SEED`].
fn base_seed() -> u64 {
    let Ok(text) = std::env::var("XENT_SEED") else {
        return DEFAULT_SEED;
    };
    let text = text.trim();
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => text.replace('_', "").parse(),
    };
    parsed.unwrap_or_else(|e| panic!("XENT_SEED={text:?} is not a u64: {e}"))
}

/// `XENT_RANDOM_CASES`, or the default (smaller under the sanitizer).
fn case_count() -> usize {
    match std::env::var("XENT_RANDOM_CASES") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("XENT_RANDOM_CASES={text:?} is not a count: {e}")),
        Err(_) if sanitizing() => SANITIZER_CASES,
        Err(_) => DEFAULT_CASES,
    }
}

/// Seed of case `index`: the base seed itself for case 0 (so any case replays as case 0 of a
/// one-case run), a SplitMix64 output of the base and index otherwise.
fn case_seed(base: u64, index: usize) -> u64 {
    match index {
        0 => base,
        _ => Rng(base ^ (index as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)).next_u64(),
    }
}

/// Log-uniform in `[lo, hi]`: as many small values as large ones per octave.
fn log_uniform(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    let (ln_lo, ln_hi) = ((lo as f64).ln(), (hi.max(lo) as f64).ln());
    ((ln_lo + rng.unit() * (ln_hi - ln_lo)).exp().round() as usize).clamp(lo, hi.max(lo))
}

/// Splits `rows` into `(batch, seq_len)`, rounding `rows` down to a multiple of the batch: often
/// one sequence, often sequences of one position (all ignored under the shift), else a random
/// batch.
fn factor(rng: &mut Rng, rows: usize) -> (usize, usize) {
    if rows == 0 {
        return if rng.below(2) == 0 {
            (0, 1 + rng.below(8) as usize)
        } else {
            (1, 0)
        };
    }
    match rng.below(5) {
        0 => (rows, 1),
        1 => (1, rows),
        _ => {
            let batch = 1 + rng.below(rows.min(64) as u64) as usize;
            (batch, rows / batch)
        }
    }
}

/// A chunk length for a forced chunked plan: tiny chunks (many per row), up to the row, or up to
/// a tile; always a multiple of 8, sometimes longer than the row.
fn chunk_len(rng: &mut Rng, vocab: usize) -> usize {
    let units = match rng.below(3) {
        0 => 1 + rng.below(32),
        1 => 1 + rng.below(vocab.div_ceil(8) as u64 + 1),
        _ => 1 + rng.below(4096),
    };
    8 * units as usize
}

/// Draws case `seed`. The plan is drawn last, so a device without clusters (`max_cluster` 1)
/// draws the same shapes and options as one with them.
fn draw(seed: u64, max_cluster: u32) -> Draw {
    let mut rng = Rng(seed);
    let dtype = DTYPES[rng.below(3) as usize];
    let label_type = if rng.below(2) == 0 {
        LabelType::I64
    } else {
        LabelType::I32
    };
    let vocab = match rng.below(20) {
        // Fewer classes than a warp has threads, or than a vector has elements.
        0..=6 => 1 + rng.below(40) as usize,
        // Odd sizes: rows that end mid-vector, mid-batch, mid-chunk.
        7..=13 => log_uniform(&mut rng, 1000, 70_000),
        _ => LLM_VOCABS[rng.below(LLM_VOCABS.len() as u64) as usize],
    };
    // An extra that is not a multiple of the vector width (8 elements of 2 bytes, 4 of 4) starts
    // rows at varying offsets from a 16-byte boundary, so the scalar head and tail paths run.
    let extra = match rng.below(16) {
        0..=8 => 0,
        9 => 1,
        10 => 2,
        11 => 3,
        12 => 7,
        13 => 8,
        14 => 64,
        _ => 1 + rng.below(200) as usize,
    };
    let row_stride = vocab + extra;
    let rows_within = |elements: usize| (elements / row_stride).max(1);
    let rows = match rng.below(40) {
        0 => 0,
        // Occasionally many rows: more than one count block, many fused blocks, a long finish.
        1..=3 => {
            let most = rows_within(MAX_CASE_ELEMENTS);
            log_uniform(&mut rng, 301, most).min(most)
        }
        4..=19 => (1 + rng.below(16) as usize).min(rows_within(TYPICAL_CASE_ELEMENTS)),
        _ => (1 + rng.below(300) as usize).min(rows_within(TYPICAL_CASE_ELEMENTS)),
    };
    let (batch, seq_len) = factor(&mut rng, rows);
    let causal_shift = rng.below(10) < 3;
    let ignored = match rng.below(10) {
        0 | 1 => 0.0,
        2 => 1.0,
        3 => 0.9 + 0.1 * rng.unit(),
        _ => 0.5 * rng.unit(),
    };
    let ignore_index = match rng.below(10) {
        0..=5 => -100,
        6 | 7 => -1,
        // A class: its rows are ignored, the others scored as usual.
        _ => rng.below(vocab as u64) as i64,
    };
    let grad_scale = GRAD_SCALES[rng.below(GRAD_SCALES.len() as u64) as usize];
    let reduction = REDUCTIONS[rng.below(3) as usize];
    let plan = match rng.below(10) {
        0..=3 => PlanChoice::Auto,
        4 => PlanChoice::Fused,
        5 | 6 => PlanChoice::Chunked {
            chunk_len: Some(chunk_len(&mut rng, vocab)),
        },
        7 => PlanChoice::Chunked { chunk_len: None },
        _ if max_cluster > 1 => PlanChoice::Cluster {
            size: match rng.below(4) {
                0 => None,
                // Up to the non-portable 16 a forced plan may ask for.
                _ => Some(1 + rng.below(xent::plan::MAX_FORCED_CLUSTER as u64) as u32),
            },
            threads: draw_cluster_threads(seed),
        },
        // Without clusters, the split plan (sm_80).
        _ => PlanChoice::Split {
            chunk_len: match rng.below(2) {
                0 => None,
                _ => Some(chunk_len(&mut rng, vocab)),
            },
            // Forced thread counts: 64 to the most a CTA of the split plan may have.
            threads: match rng.below(3) {
                0 => Some(64 * (1 + rng.below(u64::from(xent::plan::MAX_THREADS / 64))) as u32),
                _ => None,
            },
        },
    };
    let options = draw_loss_options(seed, vocab);
    Draw {
        seed,
        dtype,
        label_type,
        case: Case {
            shape: Shape {
                batch,
                seq_len,
                vocab,
                row_stride,
            },
            opts: Options {
                ignore_index,
                reduction,
                grad_scale,
                causal_shift,
                plan,
                ..options
            },
            ignored,
            seed,
        },
    }
}

/// Salt of the cluster thread count's generator (a stream of its own, as the options').
const THREADS_SALT: u64 = 0x7468_7265_6164_7321;

/// The threads per CTA of a forced cluster plan: automatic in half the cases, else any multiple
/// of 32 up to 1024 (the kernels take any block size; the planner picks few of them).
fn draw_cluster_threads(seed: u64) -> Option<u32> {
    let mut rng = Rng(seed ^ THREADS_SALT);
    match rng.below(2) {
        0 => None,
        _ => Some(32 * (1 + rng.below(32) as u32)),
    }
}

/// Salt of the loss options' generator (a stream of its own, so adding options left every
/// other field of a seed's draw as it was).
const OPTIONS_SALT: u64 = 0x6f70_7469_6f6e_7321;

/// The loss options of a draw: none in half the cases, else each on with probability 2/5.
fn draw_loss_options(seed: u64, vocab: usize) -> Options {
    let mut rng = Rng(seed ^ OPTIONS_SALT);
    if rng.below(2) == 0 {
        return Options::default();
    }
    let mut on = || rng.below(5) < 2;
    let (smoothing, z, cap, weight, accuracy) = (on(), on(), on(), on(), on());
    Options {
        label_smoothing: if smoothing {
            [0.1, 0.5, 1.0][rng.below(3) as usize]
        } else {
            0.0
        },
        lse_square_scale: if z {
            [1e-4, 0.01][rng.below(2) as usize]
        } else {
            0.0
        },
        softcap: cap.then(|| [5.0, 30.0][rng.below(2) as usize]),
        weight: weight.then(|| (0..vocab).map(|_| (rng.below(9) as f32) * 0.25).collect()),
        return_token_accuracy: accuracy,
        ..Options::default()
    }
}

/// Labels for the label-mix test: classes, `ignore_index` (at the case's `ignored` rate), and
/// labels out of range (none, about one, a random share, or all), plus the logits' offset in
/// elements from a 16-byte-aligned allocation. Out-of-range values include ones a kernel that
/// truncated labels to 32 bits would take for a class (2^32 + c).
fn draw_label_mix(draw: &Draw) -> (Vec<i64>, usize) {
    let mut rng = Rng(draw.seed ^ LABEL_MIX_SALT);
    let case = &draw.case;
    let (rows, vocab) = (case.shape.rows(), case.shape.vocab as i64);
    let ignore_index = case.opts.ignore_index;
    let mut bad = vec![
        vocab,
        vocab + 1,
        vocab + 8,
        -1,
        -2,
        -101,
        -vocab,
        i32::MAX as i64,
        i32::MIN as i64,
    ];
    if draw.label_type == LabelType::I64 {
        bad.extend([
            1 << 32,
            (1 << 32) + rng.below(vocab as u64) as i64,
            -(1 << 32),
            u32::MAX as i64,
            i64::MAX,
            i64::MIN,
        ]);
    }
    bad.retain(|&label| label != ignore_index && !(0..vocab).contains(&label));
    let bad_share = match rng.below(4) {
        0 => 0.0,
        1 => 1.0 / rows.max(1) as f64,
        2 => 0.3 * rng.unit(),
        _ => 1.0,
    };
    let labels = (0..rows)
        .map(|_| {
            let u = rng.unit();
            if u < bad_share {
                bad[rng.below(bad.len() as u64) as usize]
            } else if u < bad_share + (1.0 - bad_share) * case.ignored {
                ignore_index
            } else {
                rng.below(vocab as u64) as i64
            }
        })
        .collect();
    let base_offset = match rng.below(3) {
        0 => 0,
        _ => 1 + rng.below(7) as usize,
    };
    (labels, base_offset)
}

/// What a run did, for its summary line.
#[derive(Default)]
struct Tally {
    run: usize,
    /// A forced plan that cannot run the shape on this device (`PlanDoesNotFit`): allowed.
    plan_does_not_fit: usize,
    over_budget: usize,
    elements: usize,
    failures: Vec<String>,
}

impl Tally {
    fn summary(&self, test: &str, cases: usize, base: u64, budget: usize) -> String {
        format!(
            "{test}: {cases} cases from XENT_SEED={base:#x}: {} run ({:.3e} logits), {} skipped \
             (forced plan does not fit), {} skipped (over the budget of {budget:.3e} logits), \
             {} failed",
            self.run,
            self.elements as f64,
            self.plan_does_not_fit,
            self.over_budget,
            self.failures.len()
        )
    }

    /// Panics with every failure, after printing the summary.
    fn finish(self, test: &str, cases: usize, base: u64, budget: usize) {
        report(&self.summary(test, cases, base, budget));
        assert!(
            self.failures.is_empty(),
            "{} random case(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// Runs `cases` draws through `run_one`, with the plan check, the budget and the failure report
/// shared by both random tests.
fn run_random(
    test: &str,
    cases: usize,
    mut run_one: impl FnMut(&xent::CrossEntropy, &Draw) -> Result<(), String>,
) {
    let Some(xent) = gpu() else { return };
    let base = base_seed();
    let per_case = if sanitizing() {
        SANITIZER_BUDGET_PER_CASE
    } else {
        BUDGET_PER_CASE
    };
    let budget = cases.saturating_mul(per_case);
    report(&format!(
        "{test}: {cases} cases from XENT_SEED={base:#x} (set XENT_SEED / XENT_RANDOM_CASES to \
         change)"
    ));
    let mut tally = Tally::default();
    for index in 0..cases {
        let seed = case_seed(base, index);
        let draw = draw(seed, xent.limits().max_cluster);
        let work = draw.elements();
        if tally.elements + work > budget {
            tally.over_budget += 1;
            continue;
        }
        let opts = &draw.case.opts;
        let result = match xent.plan_for(&draw.case.shape, draw.dtype, opts) {
            Err(Error::PlanDoesNotFit(_)) if opts.plan != PlanChoice::Auto => {
                tally.plan_does_not_fit += 1;
                continue;
            }
            Err(err) => Err(format!("planning failed: {err}")),
            // The library must return errors, never panic: a panic is this case's failure, with
            // its seed, not the end of the run.
            Ok(_) => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_one(xent, &draw)))
                    .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(&panic))))
            }
        };
        tally.run += 1;
        tally.elements += work;
        if let Err(msg) = result {
            let failure = format!(
                "case {index} (seed {seed:#x}) {draw:?}\n  {msg}\n  replay: XENT_SEED={seed:#x} \
                 XENT_RANDOM_CASES=1 XENT_REQUIRE_GPU=1 cargo test --release -p xent-tests \
                 --test random -- {test} --exact"
            );
            report(&format!("FAILED {failure}"));
            tally.failures.push(failure);
            if tally.failures.len() >= MAX_FAILURES {
                report(&format!("{test}: stopping after {MAX_FAILURES} failures"));
                break;
            }
        }
    }
    tally.finish(test, cases, base, budget);
}

/// The message of a caught panic.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(msg), _) => msg.to_string(),
        (_, Some(msg)) => msg.clone(),
        _ => "(not a string)".into(),
    }
}

/// Labels of type `L` from i64 values (in range for `L`).
fn to_labels<L: FromI64>(labels: &[i64]) -> Vec<L> {
    labels.iter().map(|&label| L::from_i64(label)).collect()
}

/// `run_case_labels_dtype` with the draw's dtype and label type.
fn run_with_labels(
    xent: &xent::CrossEntropy,
    draw: &Draw,
    labels: &[i64],
    base_offset: usize,
) -> Result<(), String> {
    let stream = xent.context().default_stream();
    let (dtype, case) = (draw.dtype, &draw.case);
    match draw.label_type {
        LabelType::I64 => {
            run_case_labels_dtype::<i64>(xent, &stream, dtype, case, to_labels(labels), base_offset)
        }
        LabelType::I32 => {
            run_case_labels_dtype::<i32>(xent, &stream, dtype, case, to_labels(labels), base_offset)
        }
    }
    .map(|_| ())
}

#[test]
fn random_cases_match_cpu_reference() {
    run_random(
        "random_cases_match_cpu_reference",
        case_count(),
        |xent, draw| {
            if draw.case.shape.rows() == 0 {
                // `run_case` uploads buffers of the shape's size; cuMemAlloc rejects 0 bytes.
                return run_with_labels(xent, draw, &[], 0);
            }
            let stream = xent.context().default_stream();
            match draw.label_type {
                LabelType::I64 => run_case_dtype::<i64>(xent, &stream, draw.dtype, &draw.case),
                LabelType::I32 => run_case_dtype::<i32>(xent, &stream, draw.dtype, &draw.case),
            }
            .map(|_| ())
        },
    );
}

#[test]
fn random_label_mixes_and_base_offsets_match_cpu_reference() {
    run_random(
        "random_label_mixes_and_base_offsets_match_cpu_reference",
        case_count().div_ceil(4),
        |xent, draw| {
            let (labels, base_offset) = draw_label_mix(draw);
            run_with_labels(xent, draw, &labels, base_offset)
        },
    );
}

/// The generator, on the CPU: a seed gives one case (so replays work), every case respects the
/// element cap, a default run stays within its budget, and the default draw covers every option
/// the tests claim to (each dtype, label type, reduction and plan kind; zero rows, many rows;
/// tiny, odd and LLM vocabularies; misaligned strides; one-position sequences under the shift;
/// no and all labels ignored; `ignore_index` a class).
#[test]
fn random_draws_are_reproducible_bounded_and_cover_every_option() {
    let base = DEFAULT_SEED;
    let cluster_device = xent::plan::MAX_CLUSTER;
    assert_eq!(
        case_seed(base, 0),
        base,
        "case 0 must replay from its own seed"
    );
    let draws: Vec<Draw> = (0..DEFAULT_CASES)
        .map(|i| draw(case_seed(base, i), cluster_device))
        .collect();
    let mut seeds: Vec<u64> = draws.iter().map(|d| d.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    assert_eq!(seeds.len(), DEFAULT_CASES, "case seeds repeat");
    for d in &draws {
        let again = draw(d.seed, cluster_device);
        assert_eq!(format!("{d:?}"), format!("{again:?}"), "seed {:#x}", d.seed);
        assert_eq!(draw_label_mix(d), draw_label_mix(&again));
        assert!(d.elements() <= MAX_CASE_ELEMENTS, "{d:?}");
        let shape = d.case.shape;
        shape
            .validate(d.elements(), shape.rows())
            .unwrap_or_else(|e| panic!("{d:?}: {e}"));
        // Without clusters only the plan may differ.
        let plain = draw(d.seed, 1);
        assert_eq!(plain.case.shape, shape);
        assert!(!matches!(plain.case.opts.plan, PlanChoice::Cluster { .. }));
        if let PlanChoice::Chunked {
            chunk_len: Some(len),
        } = d.case.opts.plan
        {
            assert!(len > 0 && len.is_multiple_of(8), "{d:?}");
        }
        let (labels, base_offset) = draw_label_mix(d);
        assert_eq!(labels.len(), shape.rows());
        assert!(base_offset < 8);
        if d.label_type == LabelType::I32 {
            assert!(labels.iter().all(|&l| i32::try_from(l).is_ok()), "{d:?}");
        }
    }
    let total: usize = draws.iter().map(Draw::elements).sum();
    report(&format!(
        "random draws: {DEFAULT_CASES} cases average {:.0} logits (cap {MAX_CASE_ELEMENTS}), \
         total {total:.3e} of a budget of {:.3e}",
        total as f64 / DEFAULT_CASES as f64,
        (DEFAULT_CASES * BUDGET_PER_CASE) as f64,
    ));
    assert!(
        total <= DEFAULT_CASES * BUDGET_PER_CASE / 2,
        "a default run would come close to its budget and leave cases out"
    );

    let covered = |what: &str, test: &dyn Fn(&Draw) -> bool| {
        let count = draws.iter().filter(|d| test(d)).count();
        assert!(count > 0, "no default draw has {what}");
    };
    for dtype in DTYPES {
        covered(dtype.name(), &|d| d.dtype == dtype);
    }
    for label_type in [LabelType::I32, LabelType::I64] {
        covered("each label type", &|d| d.label_type == label_type);
    }
    for reduction in REDUCTIONS {
        covered("each reduction", &|d| d.case.opts.reduction == reduction);
    }
    covered("the automatic plan", &|d| {
        d.case.opts.plan == PlanChoice::Auto
    });
    covered("a forced fused plan", &|d| {
        d.case.opts.plan == PlanChoice::Fused
    });
    covered("a forced chunk length", &|d| {
        matches!(d.case.opts.plan, PlanChoice::Chunked { chunk_len: Some(_) })
    });
    covered("the automatic chunk length", &|d| {
        d.case.opts.plan == PlanChoice::Chunked { chunk_len: None }
    });
    covered("a forced cluster size", &|d| {
        matches!(d.case.opts.plan, PlanChoice::Cluster { size: Some(_), .. })
    });
    covered(
        "a forced non-portable cluster size (over 8)",
        &|d| matches!(d.case.opts.plan, PlanChoice::Cluster { size: Some(s), .. } if s > xent::plan::MAX_CLUSTER),
    );
    covered("a forced thread count per CTA", &|d| {
        matches!(
            d.case.opts.plan,
            PlanChoice::Cluster {
                threads: Some(_),
                ..
            }
        )
    });
    covered("1024 threads per CTA", &|d| {
        matches!(
            d.case.opts.plan,
            PlanChoice::Cluster {
                threads: Some(1024),
                ..
            }
        )
    });
    covered("the automatic cluster size", &|d| {
        d.case.opts.plan
            == PlanChoice::Cluster {
                size: None,
                threads: None,
            }
    });
    covered("zero rows", &|d| d.case.shape.rows() == 0);
    covered("more than 300 rows", &|d| d.case.shape.rows() > 300);
    covered("more than 100000 rows", &|d| d.case.shape.rows() > 100_000);
    covered("a vocabulary of 1", &|d| d.case.shape.vocab == 1);
    covered("an odd vocabulary", &|d| {
        d.case.shape.vocab > 1000 && d.case.shape.vocab % 2 == 1
    });
    covered(
        "a vocabulary too long for one block's shared memory",
        &|d| d.case.shape.vocab >= 131_072,
    );
    covered("a stride that misaligns rows", &|d| {
        (d.case.shape.row_stride - d.case.shape.vocab) % 2 == 1
    });
    covered("one-position sequences under the shift", &|d| {
        d.case.opts.causal_shift && d.case.shape.seq_len == 1 && d.case.shape.batch > 1
    });
    covered("several sequences under the shift", &|d| {
        d.case.opts.causal_shift && d.case.shape.seq_len > 1 && d.case.shape.batch > 1
    });
    covered("no label ignored", &|d| d.case.ignored == 0.0);
    covered("every label ignored", &|d| d.case.ignored == 1.0);
    covered("ignore_index a class", &|d| d.case.opts.ignore_index >= 0);
    covered("a gradient scale other than 1", &|d| {
        d.case.opts.grad_scale != 1.0
    });
    covered("labels out of range", &|d| {
        let (labels, _) = draw_label_mix(d);
        labels
            .iter()
            .any(|&l| l != d.case.opts.ignore_index && !(0..d.case.shape.vocab as i64).contains(&l))
    });
    covered("a label 2^32 + class", &|d| {
        let classes_past_2_pow_32 = (1 << 32)..(1 << 32) + d.case.shape.vocab as i64;
        draw_label_mix(d)
            .0
            .iter()
            .any(|l| classes_past_2_pow_32.contains(l))
    });
    covered("a misaligned base pointer", &|d| draw_label_mix(d).1 > 0);
}

// ---------------------------------------------------------------------------------------------
// Fixed corners of the same comparison.
// ---------------------------------------------------------------------------------------------

/// Every plan the device has, forced or automatic, with a chunk that splits rows.
fn all_plans(xent: &xent::CrossEntropy) -> Vec<PlanChoice> {
    let mut plans = vec![
        PlanChoice::Auto,
        PlanChoice::Fused,
        PlanChoice::Chunked {
            chunk_len: Some(512),
        },
        PlanChoice::Chunked { chunk_len: None },
    ];
    if xent.limits().max_cluster > 1 {
        plans.push(PlanChoice::Cluster {
            size: Some(3),
            threads: None,
        });
        plans.push(PlanChoice::Cluster {
            size: None,
            threads: None,
        });
    }
    plans
}

/// Logits whose first row starts 1 or 3 elements past a 16-byte boundary (a view into a larger
/// buffer, as a slice of a PyTorch tensor would be): 2 or 6 bytes for bf16 and f16, 4 or 12 for
/// f32. Every plan must fall back to scalar accesses where vectors would be misaligned, and stay
/// correct, with vocabularies that are and are not multiples of the vector width.
#[test]
fn misaligned_base_pointer_is_handled_by_every_plan() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let mut failures = Vec::new();
    for dtype in DTYPES {
        for plan in all_plans(xent) {
            for vocab in [7, 4096, 4099] {
                for (base_offset, extra) in [(1, 0), (3, 0), (1, 5)] {
                    let mut case = Case::new(9, vocab);
                    case.shape = Shape::flat(9, vocab).with_row_stride(vocab + extra);
                    case.opts.plan = plan;
                    case.seed = (vocab * 16 + base_offset) as u64;
                    let labels: Vec<i64> = random_labels(9, vocab, 0.2, -100, case.seed);
                    let result = if base_offset == 1 {
                        run_case_labels_dtype::<i64>(
                            xent,
                            &stream,
                            dtype,
                            &case,
                            labels,
                            base_offset,
                        )
                    } else {
                        run_case_labels_dtype::<i32>(
                            xent,
                            &stream,
                            dtype,
                            &case,
                            to_labels(&labels),
                            base_offset,
                        )
                    };
                    if let Err(msg) = result {
                        failures.push(msg);
                    }
                }
            }
        }
    }
    assert_no_failures(&failures);
}

/// Under the causal shift, position `t` is scored against label `t + 1` of its sequence, so the
/// first label of each sequence is never read (as PyTorch's `labels[:, 1:]`): out-of-range values
/// there must not be reported. With one position per sequence (T = 1) nothing is scored at all:
/// the mean is NaN (PyTorch's mean over no rows), the sum 0, every gradient 0.
#[test]
fn causal_shift_never_reads_the_first_label_of_a_sequence() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let vocab = 1000;
    let mut failures = Vec::new();
    for dtype in [DType::Bf16, DType::F32] {
        for plan in all_plans(xent) {
            for reduction in REDUCTIONS {
                for (batch, seq_len) in [(6, 1), (5, 3), (1, 2)] {
                    let mut case = Case::new(0, vocab);
                    case.shape = Shape::batched(batch, seq_len, vocab);
                    case.opts = Options {
                        reduction,
                        causal_shift: true,
                        plan,
                        ..Options::default()
                    };
                    case.seed = (batch * 100 + seq_len) as u64;
                    let mut labels: Vec<i64> =
                        random_labels(batch * seq_len, vocab, 0.25, -100, case.seed);
                    for first in (0..labels.len()).step_by(seq_len) {
                        labels[first] = vocab as i64 + 5;
                    }
                    if let Err(msg) =
                        run_case_labels_dtype::<i64>(xent, &stream, dtype, &case, labels, 0)
                    {
                        failures.push(msg);
                    }
                }
            }
        }
    }
    assert_no_failures(&failures);
}
