//! Logits of more than 2^31 and 2^32 elements (16384 and 32768 rows of a 151936 vocabulary in
//! bf16: 5 GB and 10 GB), where 32-bit element or byte offsets would wrap: QuACK returns a NaN
//! loss at 16384 x 151936 on an H200.
//!
//! The logits are made on the host, row by row from per-row seeds, in parallel; the f64 reference
//! loss and log-sum-exp of every row are computed in the same pass. After each GPU call the test
//! compares the loss, the count of scored rows and every row's loss and log-sum-exp with that
//! reference, and the gradient of sampled rows (the first, the last, those around the 2^30, 2^31
//! and 2^32 element offsets, and random ones) with the CPU reference of each row alone.
//!
//! Skipped without a GPU, under `XENT_SANITIZE=1`, and when the device has too little free memory
//! for two copies of the logits (the pristine one and the one the call overwrites).

use std::sync::Mutex;
use std::time::Instant;

use xent::half::bf16;
use xent::{DType, Error, Options, PlanChoice, Reduction, Shape, cpu};
use xent_tests::{Rng, gpu, grad_atol, grad_rtol, loss_tol, report, sanitizing};

/// Qwen2's vocabulary (the QuACK failure's).
const VOCAB: usize = 151_936;
const SEED: u64 = 0x4855_4745; // "HUGE"
/// Rows filled and uploaded at a time: 1024 rows of 151936 bf16 are 311 MB of host memory.
const UPLOAD_ROWS: usize = 1024;
/// Rows whose gradient is compared besides the first, the last and those around the large
/// offsets.
const RANDOM_SAMPLED_ROWS: usize = 8;
/// Free device memory kept beyond the two copies of the logits (per-row outputs, partials, other
/// tests' buffers).
const HEADROOM_BYTES: usize = 1 << 30;
/// One huge test at a time: each holds two copies of its logits on the device.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// 16384 x 151936 = 2.49e9 elements, 4.98 GB: element offsets pass 2^31, byte offsets 2^32.
#[test]
fn more_than_2_pow_31_logits_match_reference_on_sampled_rows() {
    huge_case(16384);
}

/// 32768 x 151936 = 4.98e9 elements, 9.96 GB: element offsets pass 2^32.
#[test]
fn more_than_2_pow_32_logits_match_reference_on_sampled_rows() {
    huge_case(32768);
}

/// Label of `row`: one row in 16 ignored (-100), else a class, from the row's own seed.
fn label_of(row: usize) -> i64 {
    let bits = Rng(SEED ^ 0x1abe1 ^ ((row as u64) << 24)).next_u64();
    if bits.is_multiple_of(16) {
        -100
    } else {
        ((bits >> 8) % VOCAB as u64) as i64
    }
}

/// Fills `out` with row `row`'s logits: one SplitMix64 draw per element, the sum of three 16-bit
/// uniforms (roughly normal, standard deviation 3.5) with 1 in 64 values spiked to +-12.
fn fill_row(row: usize, out: &mut [bf16]) {
    let mut rng = Rng(SEED ^ ((row as u64) << 32));
    for x in out {
        let bits = rng.next_u64();
        let sum = (bits & 0xffff) + ((bits >> 16) & 0xffff) + ((bits >> 32) & 0xffff);
        let normal = sum as f32 / 65536.0 - 1.5; // variance 1/4
        let spike = match (bits >> 48) & 63 {
            0 if bits >> 63 == 0 => 12.0,
            0 => -12.0,
            _ => 0.0,
        };
        *x = bf16::from_f32(normal * 7.0 + spike);
    }
}

/// A row's f64 reference: its log-sum-exp and loss (both 0 for an ignored row).
#[derive(Clone, Copy, Default)]
struct RowReference {
    lse: f64,
    loss: f64,
    scored: bool,
}

fn row_reference(row: usize, logits: &[bf16]) -> RowReference {
    let label = label_of(row);
    if label < 0 {
        return RowReference::default();
    }
    let lse = cpu::log_sum_exp(logits.iter().map(|x| x.to_f64()));
    RowReference {
        lse,
        loss: lse - logits[label as usize].to_f64(),
        scored: true,
    }
}

/// Fills rows `first..first + references.len()` into `out` and their references, over every core.
fn fill_rows(first: usize, out: &mut [bf16], references: &mut [RowReference]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = references.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let jobs = out
            .chunks_mut(per_thread * VOCAB)
            .zip(references.chunks_mut(per_thread));
        for (job, (rows, references)) in jobs.enumerate() {
            scope.spawn(move || {
                let rows = rows.chunks_mut(VOCAB).zip(references);
                for (i, (logits, reference)) in rows.enumerate() {
                    let row = first + job * per_thread + i;
                    fill_row(row, logits);
                    *reference = row_reference(row, logits);
                }
            });
        }
    });
}

/// Rows whose gradient is compared: the first and last, those holding (and next to) the elements
/// at offsets 2^30, 2^31 and 2^32 (2^31 and 2^32 bytes are 2^30 and 2^31 bf16 elements), and
/// random ones.
fn sampled_rows(rows: usize) -> Vec<usize> {
    let total = rows * VOCAB;
    let mut sampled = vec![0, rows - 1];
    for offset in [1usize << 30, 1 << 31, 1 << 32] {
        if offset < total {
            let row = offset / VOCAB;
            sampled.extend([row.saturating_sub(1), row, (row + 1).min(rows - 1)]);
        }
    }
    let mut rng = Rng(SEED ^ rows as u64);
    sampled.extend((0..RANDOM_SAMPLED_ROWS).map(|_| rng.below(rows as u64) as usize));
    sampled.sort_unstable();
    sampled.dedup();
    sampled
}

fn huge_case(rows: usize) {
    let Some(xent) = gpu() else { return };
    let name = format!("huge {rows} x {VOCAB} bf16");
    if sanitizing() {
        report(&format!(
            "SKIPPED: {name}: too large for compute-sanitizer (XENT_SANITIZE=1)"
        ));
        return;
    }
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let total = rows * VOCAB;
    let bytes = total * DType::Bf16.bytes();
    let ctx = xent.context();
    let (free, _) = ctx.mem_get_info().expect("cuMemGetInfo");
    let needed = 2 * bytes + HEADROOM_BYTES;
    if free < needed {
        report(&format!(
            "SKIPPED: {name}: needs {needed} bytes of device memory, {free} free"
        ));
        return;
    }
    let stream = ctx.default_stream();
    let shape = Shape::flat(rows, VOCAB);

    // Fill and upload in slices of rows, computing each row's reference on the way.
    let started = Instant::now();
    let mut pristine = stream.alloc_zeros::<bf16>(total).expect("alloc logits");
    let mut references = vec![RowReference::default(); rows];
    let mut host = vec![bf16::ZERO; UPLOAD_ROWS * VOCAB];
    for first in (0..rows).step_by(UPLOAD_ROWS) {
        let count = UPLOAD_ROWS.min(rows - first);
        let host = &mut host[..count * VOCAB];
        fill_rows(first, host, &mut references[first..first + count]);
        let mut slice = pristine.slice_mut(first * VOCAB..(first + count) * VOCAB);
        stream.memcpy_htod(host, &mut slice).expect("upload");
        stream.synchronize().expect("upload"); // `host` is refilled next
    }
    drop(host);
    let labels: Vec<i64> = (0..rows).map(label_of).collect();
    let d_labels = stream.clone_htod(&labels).expect("upload labels");
    let mut work = stream.alloc_zeros::<bf16>(total).expect("alloc work copy");
    let n_valid = references.iter().filter(|r| r.scored).count();
    let loss_sum: f64 = references.iter().map(|r| r.loss).sum();
    report(&format!(
        "{name}: {total} logits ({bytes} bytes) filled, uploaded and referenced in {:.1?}",
        started.elapsed()
    ));

    let mut runs = vec![
        (PlanChoice::Auto, Reduction::Mean),
        (PlanChoice::Chunked { chunk_len: None }, Reduction::Sum),
    ];
    if xent.limits().max_cluster > 1 {
        runs.push((
            PlanChoice::Cluster {
                size: Some(8),
                threads: None,
            },
            Reduction::Mean,
        ));
    }
    let mut failures = Vec::new();
    for (plan, reduction) in runs {
        let opts = Options {
            reduction,
            plan,
            ..Options::default()
        };
        let what = format!("{name} {plan:?} {reduction:?}");
        match xent.plan_for(&shape, DType::Bf16, &opts) {
            Err(Error::PlanDoesNotFit(msg)) if plan != PlanChoice::Auto => {
                report(&format!("{what}: skipped, the plan does not fit: {msg}"));
                continue;
            }
            Err(err) => {
                failures.push(format!("{what}: planning failed: {err}"));
                continue;
            }
            Ok(launch_plan) => report(&format!("{what}: {launch_plan:?}")),
        }
        stream
            .memcpy_dtod(&pristine, &mut work)
            .expect("copy logits");
        let started = Instant::now();
        let result = xent
            .forward_backward(&stream, &mut work, &d_labels, shape, &opts)
            .and_then(|loss| Ok((loss.read()?, loss)));
        let (value, loss) = match result {
            Ok(done) => done,
            Err(err) => {
                failures.push(format!("{what}: {err}"));
                continue;
            }
        };
        let gpu_time = started.elapsed();
        let expected = match reduction {
            Reduction::Mean => loss_sum / n_valid as f64,
            Reduction::Sum | Reduction::None => loss_sum,
        };
        report(&format!(
            "{what}: loss {value} (reference {expected}), {gpu_time:.1?} on the GPU"
        ));
        let mut problems = Vec::new();
        let loss_ok = (value as f64 - expected).abs() <= loss_tol(expected); // false for NaN
        if !loss_ok {
            problems.push(format!("loss {value} != reference {expected}"));
        }
        match loss.n_valid() {
            Ok(count) if count as usize == n_valid => {}
            other => problems.push(format!("n_valid {other:?} != {n_valid}")),
        }
        match (loss.read_row_loss(), loss.read_row_lse()) {
            (Ok(row_loss), Ok(row_lse)) => {
                let bad_rows: Vec<String> = (0..rows)
                    .filter_map(|r| {
                        let reference = references[r];
                        let (l, s) = (row_loss[r] as f64, row_lse[r] as f64);
                        let ok = (l - reference.loss).abs() <= loss_tol(reference.loss)
                            && (s - reference.lse).abs() <= loss_tol(reference.lse);
                        (!ok).then(|| {
                            format!(
                                "row {r}: loss {l} lse {s}, reference {} {}",
                                reference.loss, reference.lse
                            )
                        })
                    })
                    .collect();
                if !bad_rows.is_empty() {
                    problems.push(format!(
                        "{} rows' loss or lse differ, first: {}",
                        bad_rows.len(),
                        bad_rows[..bad_rows.len().min(4)].join("; ")
                    ));
                }
            }
            (a, b) => problems.push(format!("reading per-row outputs: {a:?} {b:?}")),
        }
        let scale = cpu::grad_scale(&opts, n_valid);
        for row in sampled_rows(rows) {
            if let Err(msg) = check_row_gradient(&stream, &work, row, scale) {
                problems.push(msg);
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{what}:\n  {}", problems.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Compares row `row` of the gradient in `grad` with the CPU reference of that row alone, its
/// gradient scaled by `scale` (the call's, which for the mean depends on every row's label).
fn check_row_gradient(
    stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    grad: &xent::cudarc::driver::CudaSlice<bf16>,
    row: usize,
    scale: f64,
) -> Result<(), String> {
    let got = stream
        .clone_dtoh(&grad.slice(row * VOCAB..(row + 1) * VOCAB))
        .map_err(|e| format!("row {row}: {e}"))?;
    let mut expected = vec![bf16::ZERO; VOCAB];
    fill_row(row, &mut expected);
    let opts = Options {
        reduction: Reduction::Sum,
        grad_scale: scale as f32,
        ..Options::default()
    };
    cpu::forward_backward(
        &mut expected,
        &[label_of(row)],
        Shape::flat(1, VOCAB),
        &opts,
    )
    .map_err(|e| format!("row {row}: CPU reference: {e}"))?;
    let (rtol, atol) = (grad_rtol(DType::Bf16), grad_atol(DType::Bf16, scale));
    for (j, (g, e)) in got.iter().zip(&expected).enumerate() {
        let (g, e) = (g.to_f64(), e.to_f64());
        let tol = atol + rtol * e.abs();
        let ok = (g - e).abs() <= tol; // false for NaN
        if !ok {
            return Err(format!(
                "grad[{row}, {j}] (element {}) = {g:e}, reference {e:e}, tol {tol:e}",
                row * VOCAB + j
            ));
        }
    }
    Ok(())
}

/// The host side of the huge tests, on the CPU: the per-row references made while filling agree
/// with the CPU reference of each row, rows differ from each other, and the sampled rows hold the
/// elements at the offsets the tests are about.
#[test]
fn huge_references_match_cpu_and_samples_cover_the_large_offsets() {
    // The first rows, and those holding the elements at offsets 2^31 and 2^32.
    for row in [0, 1, (1 << 31) / VOCAB, (1 << 32) / VOCAB] {
        let mut logits = vec![bf16::ZERO; VOCAB];
        let mut reference = [RowReference::default()];
        fill_rows(row, &mut logits, &mut reference);
        let label = label_of(row);
        let mut expected_grad = logits.clone();
        let expected = cpu::forward_backward(
            &mut expected_grad,
            &[label],
            Shape::flat(1, VOCAB),
            &Options::default(),
        )
        .unwrap();
        assert_eq!(reference[0].scored, label >= 0, "row {row}");
        assert!(
            (reference[0].loss - expected.row_loss[0]).abs() < 1e-9,
            "row {row}"
        );
        assert!(
            (reference[0].lse - expected.row_lse[0]).abs() < 1e-9,
            "row {row}"
        );
        let distinct = logits
            .iter()
            .map(|x| x.to_bits())
            .collect::<std::collections::HashSet<_>>();
        assert!(
            distinct.len() > 100,
            "row {row}: {} distinct values",
            distinct.len()
        );
    }
    let mut first_two = vec![bf16::ZERO; 2 * VOCAB];
    fill_rows(0, &mut first_two, &mut [RowReference::default(); 2]);
    assert_ne!(first_two[..VOCAB], first_two[VOCAB..], "rows must differ");
    let labels: Vec<i64> = (0..32768).map(label_of).collect();
    let ignored = labels.iter().filter(|&&l| l == -100).count();
    assert!(
        (1000..3000).contains(&ignored),
        "{ignored} of 32768 rows ignored"
    );
    assert!(
        labels
            .iter()
            .all(|&l| l == -100 || (0..VOCAB as i64).contains(&l))
    );

    for (rows, offsets) in [
        (16384, &[1usize << 30, 1 << 31][..]),
        (32768, &[1 << 30, 1 << 31, 1 << 32][..]),
    ] {
        let sampled = sampled_rows(rows);
        assert!(sampled.contains(&0) && sampled.contains(&(rows - 1)));
        for &offset in offsets {
            assert!(rows * VOCAB > offset);
            let row = offset / VOCAB;
            assert!(
                sampled.contains(&row) && sampled.contains(&(row + 1)),
                "{rows} rows: row {row} holds element {offset}"
            );
        }
    }
}
