//! GPU tests: every kernel, dtype, label type, reduction and plan against the CPU reference.
//! Without a GPU each test prints that it skipped; with `XENT_REQUIRE_GPU=1` it fails instead.

use xent::half::{bf16, f16};
use xent::{DType, Error, Options, PlanChoice, Reduction, Shape, cpu};
use xent_tests::{
    Case, DTYPES, REDUCTIONS, assert_no_failures, forced_plans, gpu, run_case_dtype, sanitizing,
};

/// Runs `case` for both label types and panics with every mismatch found.
fn check(xent: &xent::CrossEntropy, dtype: DType, case: &Case) {
    let stream = xent.context().default_stream();
    let mut failures = Vec::new();
    for result in [
        run_case_dtype::<i64>(xent, &stream, dtype, case),
        run_case_dtype::<i32>(xent, &stream, dtype, case),
    ] {
        if let Err(msg) = result {
            failures.push(msg);
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn every_dtype_label_reduction_and_plan_matches_reference() {
    let Some(xent) = gpu() else { return };
    for dtype in DTYPES {
        for reduction in REDUCTIONS {
            for plan in forced_plans(xent, 1024) {
                let mut case = Case::new(67, 5003);
                case.opts = Options {
                    reduction,
                    plan,
                    ..Options::default()
                };
                check(xent, dtype, &case);
            }
        }
    }
}

#[test]
fn vocab_sizes_and_row_counts_match_reference() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let vocabs: &[usize] = if sanitizing() {
        &[1, 7, 32000]
    } else {
        &[1, 7, 32000, 50257, 128256, 262144]
    };
    let row_counts: &[usize] = if sanitizing() { &[1, 3] } else { &[1, 3, 4096] };
    for &vocab in vocabs {
        for &rows in row_counts {
            let dtypes: &[DType] = if rows * vocab <= 4096 * 32000 {
                &DTYPES
            } else {
                &[DType::Bf16]
            };
            for &dtype in dtypes {
                match dtype {
                    DType::F32 => every_plan::<f32>(xent, &stream, rows, vocab),
                    DType::F16 => every_plan::<f16>(xent, &stream, rows, vocab),
                    DType::Bf16 => every_plan::<bf16>(xent, &stream, rows, vocab),
                }
            }
        }
    }
}

/// `vocab_sizes_and_row_counts_match_reference`'s case of `rows x vocab` in `T`: the CPU
/// reference once, then every plan against it (a forced plan whose row does not fit in shared
/// memory must say so).
fn every_plan<T: xent::Element>(
    xent: &xent::CrossEntropy,
    stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    rows: usize,
    vocab: usize,
) {
    let mut case = Case::new(rows, vocab);
    case.seed = (rows * 1_000_003 + vocab) as u64;
    let reference =
        xent_tests::Reference::<T, i64>::of_case(&case).unwrap_or_else(|msg| panic!("{msg}"));
    for plan in [
        PlanChoice::Auto,
        PlanChoice::Fused,
        PlanChoice::Chunked { chunk_len: None },
        PlanChoice::Split {
            chunk_len: None,
            threads: None,
        },
        PlanChoice::SplitL2 { chunk_len: None },
    ] {
        case.opts.plan = plan;
        let fits = xent.plan_for(&case.shape, T::DTYPE, &case.opts);
        if fits.is_err() && plan != PlanChoice::Auto {
            // A row too long for shared memory: the forced plan must say so.
            assert!(matches!(fits, Err(Error::PlanDoesNotFit(_))), "{fits:?}");
            continue;
        }
        let outcome = reference
            .check(xent, stream, &case)
            .unwrap_or_else(|msg| panic!("{msg}"));
        eprintln!(
            "{rows:>5} x {vocab:>6} {:<4} {plan:?}: loss {:.6} (ref {:.6}), worst grad err {:.2} of tol",
            T::DTYPE.name(),
            outcome.loss_gpu,
            outcome.loss_cpu,
            outcome.max_grad_err_over_tol
        );
    }
}

/// A handle on a partition of the SMs (a green context) plans for the partition's SMs, not the
/// device's, and every plan it runs there matches the reference: the split plan (sm_80) sizes
/// its co-resident groups by them (a cooperative launch of more CTAs than the partition holds
/// would fail or wait forever), and the count kernel's grid too.
#[test]
fn a_partition_of_the_sms_is_what_the_handle_plans_for() {
    let Some(whole) = gpu() else { return };
    let device_sms = whole
        .context()
        .attribute(
            xent::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as u32;
    if std::env::var_os("XENT_GREEN_SMS").is_none() && std::env::var_os("XENT_LIMITS").is_none() {
        // The context's SM resource, read from the driver's struct, is the whole device's.
        assert_eq!(whole.limits().sm_count, device_sms);
    }
    let wanted = 16;
    let clusters = whole.limits().max_cluster > 1;
    // No SMs, or more than the device has: errors, not panics.
    for bad in [0, device_sms + 1] {
        let made = xent::green_context(0, bad, clusters);
        assert!(
            matches!(made, Err(Error::InvalidOption(_))),
            "{bad} SMs: {made:?}"
        );
    }
    let ctx = xent::green_context(0, wanted, clusters).unwrap_or_else(|e| panic!("{e}"));
    let xent = xent::CrossEntropy::from_context(ctx).unwrap();
    let sms = xent.limits().sm_count;
    assert!(
        (wanted..device_sms).contains(&sms),
        "a partition of {wanted} SMs of {device_sms}: the handle plans for {sms}"
    );
    let stream = xent.context().new_stream().unwrap();
    // Two chunks a row on sm_80 (100 KB), more rows than groups of two.
    let rows = if sanitizing() { 40 } else { 300 };
    every_plan::<bf16>(&xent, &stream, rows, 50_000);
    every_plan::<f32>(&xent, &stream, rows / 4, 3001);
    if !clusters {
        let case = Case::new(rows, 50_000);
        let made = xent.plan_for(
            &case.shape,
            DType::Bf16,
            &Options {
                plan: PlanChoice::Split {
                    chunk_len: None,
                    threads: None,
                },
                ..Options::default()
            },
        );
        let Ok(xent::LaunchPlan::Split {
            groups, n_chunks, ..
        }) = made
        else {
            panic!("expected a split plan, got {made:?}");
        };
        // An SM holds a few of these CTAs (registers, shared memory), never 8; the whole
        // device would hold hundreds.
        assert!(
            groups * n_chunks <= 8 * sms,
            "{groups} groups of {n_chunks} CTAs on {sms} SMs"
        );
    }
}

/// The split plan (sm_80) walks each group's rows in turn, and copies a group's next row into the
/// stash behind the gradient of the row before where both lie alike modulo 16 bytes and the next
/// row is scored. Many rows a group (twice the groups and more), a third of the rows ignored (so
/// runs of them), strides that keep rows 16-byte aligned and one that does not, chunks a thread
/// covers in one vector and in several, and each family of split kernels, against the reference.
#[test]
fn split_plan_walks_many_rows_a_group_with_every_kernel_family() {
    let Some(xent) = gpu() else { return };
    if xent.limits().max_cluster > 1 {
        xent_tests::report("split plan: the cluster plan runs here (XENT_ARCH=sm_80 runs it)");
        return;
    }
    let families: [(&str, Options); 8] = [
        ("plain", Options::default()),
        (
            "z-loss and smoothing",
            Options {
                lse_square_scale: 1e-4,
                label_smoothing: 0.1,
                ..Options::default()
            },
        ),
        (
            "class weights",
            Options {
                weight: Some(Vec::new()),
                ..Options::default()
            },
        ),
        (
            "accuracy",
            Options {
                return_token_accuracy: true,
                ..Options::default()
            },
        ),
        (
            "soft cap",
            Options {
                softcap: Some(3.0),
                ..Options::default()
            },
        ),
        (
            "soft cap and accuracy",
            Options {
                softcap: Some(3.0),
                return_token_accuracy: true,
                ..Options::default()
            },
        ),
        (
            "weighted smoothing",
            Options {
                weight: Some(Vec::new()),
                label_smoothing: 0.1,
                ..Options::default()
            },
        ),
        (
            "all five",
            Options {
                lse_square_scale: 1e-4,
                label_smoothing: 0.1,
                softcap: Some(3.0),
                weight: Some(Vec::new()),
                return_token_accuracy: true,
                ..Options::default()
            },
        ),
    ];
    // The automatic plan of Llama 3's rows (too long for one block) takes the split plan for every
    // family, with 256 threads a CTA for the plain kernels, 512 for the soft cap's (alone, with
    // token accuracy, in all five) in f32 and 384 for the others.
    for (name, family) in &families {
        let opts = Options {
            weight: family.weight.as_ref().map(|_| vec![1.0; 128256]),
            ..family.clone()
        };
        for dtype in [DType::Bf16, DType::F32] {
            let auto = xent.plan_for(&Shape::flat(8192, 128256), dtype, &opts);
            let Ok(xent::LaunchPlan::Split { threads, .. }) = auto else {
                panic!("{name} {dtype:?}: automatic plan {auto:?}, not the split plan");
            };
            let soft_cap = matches!(*name, "soft cap" | "soft cap and accuracy" | "all five");
            let wanted = match *name {
                "plain" => xent::plan::SPLIT_MAX_THREADS,
                _ if soft_cap && dtype == DType::F32 => xent::plan::SPLIT_CAP_THREADS,
                _ => xent::plan::SPLIT_OPTION_THREADS,
            };
            assert_eq!(threads, wanted, "{name} {dtype:?}: automatic plan {auto:?}");
        }
    }
    let mut failures = Vec::new();
    let mut cases = 0;
    // Under the sanitizer (10-100x slower) only the small shape.
    let shapes: &[(usize, usize)] = if sanitizing() {
        &[(2048, 64)]
    } else {
        &[(2048, 64), (32000, 4096)]
    };
    for &(vocab, chunk_len) in shapes {
        for dtype in [DType::Bf16, DType::F32] {
            for extra in [0, 3] {
                for (name, family) in &families {
                    let opts = Options {
                        weight: family
                            .weight
                            .as_ref()
                            .map(|_| (0..vocab).map(|j| 0.5 + (j % 5) as f32 * 0.25).collect()),
                        plan: PlanChoice::Split {
                            chunk_len: Some(chunk_len),
                            threads: None,
                        },
                        ..family.clone()
                    };
                    // As many groups as are resident; then two rows a group and a few more.
                    let plan = xent.plan_for(&Shape::flat(1 << 20, vocab), dtype, &opts);
                    let Ok(xent::LaunchPlan::Split { groups, .. }) = plan else {
                        panic!(
                            "{name}, {vocab} x {chunk_len} {}: expected a split plan, got {plan:?}",
                            dtype.name()
                        );
                    };
                    let rows = 2 * groups as usize + 7;
                    let mut case = Case::new(rows, vocab);
                    case.shape = Shape::flat(rows, vocab).with_row_stride(vocab + extra);
                    case.opts = opts;
                    case.ignored = 0.3;
                    case.seed = (vocab + extra) as u64;
                    for result in [
                        run_case_dtype::<i64>(xent, &xent.context().default_stream(), dtype, &case),
                        run_case_dtype::<i32>(xent, &xent.context().default_stream(), dtype, &case),
                    ] {
                        cases += 1;
                        if let Err(msg) = result {
                            failures.push(format!("{name}: {msg}"));
                        }
                    }
                }
            }
        }
    }
    // The automatic plan's own chunks of long rows: even, rounded up to 256 bytes, so the last
    // chunk of a row is the shortest (32128 x 3 + 31872 in 16 bits, 18368 x 6 + 18048 in f32).
    if !sanitizing() {
        for dtype in [DType::Bf16, DType::F32] {
            let vocab = 128256;
            let plan = xent.plan_for(&Shape::flat(1 << 20, vocab), dtype, &Options::default());
            let Ok(xent::LaunchPlan::Split {
                groups, chunk_len, ..
            }) = plan
            else {
                panic!(
                    "automatic, {vocab} {}: expected a split plan, got {plan:?}",
                    dtype.name()
                );
            };
            assert_eq!(
                chunk_len as usize,
                xent::plan::auto_split_chunk_len(vocab, dtype),
                "{plan:?}"
            );
            let rows = 2 * groups as usize + 7;
            let mut case = Case::new(rows, vocab);
            case.ignored = 0.3;
            case.seed = 40 + dtype.bytes() as u64;
            for result in [
                run_case_dtype::<i64>(xent, &xent.context().default_stream(), dtype, &case),
                run_case_dtype::<i32>(xent, &xent.context().default_stream(), dtype, &case),
            ] {
                cases += 1;
                if let Err(msg) = result {
                    failures.push(format!("automatic, {vocab} {}: {msg}", dtype.name()));
                }
            }
        }
    }
    xent_tests::report(&format!(
        "split plan, many rows a group: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

/// The split_l2 plan (sm_80, the plain loss): each CTA reduces its group's next row before it
/// writes a row's gradient from its chunk read again, and its summaries cycle through four slots.
/// Many rows a group (so every slot is reused), a third of the rows ignored, aligned and unaligned
/// strides, one chunk a row, a few, and more than a warp's lanes (each lane merging several
/// summaries), every dtype and label type, against the reference (the forward-only kernel runs in
/// two_phase.rs); options it has no kernels for are refused.
#[test]
fn split_l2_plan_reduces_a_row_ahead_and_matches_the_reference() {
    let Some(xent) = gpu() else { return };
    if xent.limits().max_cluster > 1 {
        xent_tests::report("split_l2 plan: the cluster plan runs here (XENT_ARCH=sm_80 runs it)");
        return;
    }
    let refused = xent.plan_for(
        &Shape::flat(64, 32000),
        DType::Bf16,
        &Options {
            label_smoothing: 0.1,
            plan: PlanChoice::SplitL2 { chunk_len: None },
            ..Options::default()
        },
    );
    assert!(
        matches!(refused, Err(Error::PlanDoesNotFit(_))),
        "{refused:?}"
    );
    let mut failures = Vec::new();
    let mut cases = 0;
    let shapes: &[(usize, usize)] = if sanitizing() {
        &[(2048, 64), (1000, 1000)]
    } else {
        &[(2048, 64), (1000, 1000), (32000, 4096), (32000, 512)]
    };
    for &(vocab, chunk_len) in shapes {
        for dtype in DTYPES {
            for extra in [0, 3] {
                let opts = Options {
                    plan: PlanChoice::SplitL2 {
                        chunk_len: Some(chunk_len),
                    },
                    ..Options::default()
                };
                let plan = xent.plan_for(&Shape::flat(1 << 20, vocab), dtype, &opts);
                let Ok(xent::LaunchPlan::Split {
                    groups,
                    in_l2: true,
                    ..
                }) = plan
                else {
                    panic!(
                        "{vocab} x {chunk_len} {}: expected a split_l2 plan, got {plan:?}",
                        dtype.name()
                    );
                };
                // Every group walks at least nine rows: each of its four slots twice.
                let rows = 9 * groups as usize + 5;
                let mut case = Case::new(rows, vocab);
                case.shape = Shape::flat(rows, vocab).with_row_stride(vocab + extra);
                case.opts = opts;
                case.ignored = 0.3;
                case.seed = (vocab + extra + chunk_len) as u64;
                for result in [
                    run_case_dtype::<i64>(xent, &xent.context().default_stream(), dtype, &case),
                    run_case_dtype::<i32>(xent, &xent.context().default_stream(), dtype, &case),
                ] {
                    cases += 1;
                    if let Err(msg) = result {
                        failures.push(format!(
                            "{vocab} x {chunk_len} {} stride +{extra}: {msg}",
                            dtype.name()
                        ));
                    }
                }
            }
        }
    }
    xent_tests::report(&format!(
        "split_l2 plan, many rows a group: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

#[test]
fn causal_shift_scores_next_label_within_each_sequence() {
    let Some(xent) = gpu() else { return };
    for dtype in DTYPES {
        for plan in forced_plans(xent, 256) {
            for (batch, seq_len) in [(3, 37), (2, 1), (1, 64)] {
                let mut case = Case::new(0, 1000);
                case.shape = Shape::batched(batch, seq_len, 1000);
                case.opts = Options {
                    causal_shift: true,
                    plan,
                    ..Options::default()
                };
                check(xent, dtype, &case);
            }
        }
    }
}

#[test]
fn row_stride_leaves_padding_untouched_and_handles_misaligned_rows() {
    let Some(xent) = gpu() else { return };
    for dtype in DTYPES {
        for plan in forced_plans(xent, 512) {
            // Strides that keep rows 16-byte aligned, and ones that misalign every row.
            for extra in [0, 1, 13, 64] {
                let mut case = Case::new(50, 3001);
                case.shape = Shape::flat(50, 3001).with_row_stride(3001 + extra);
                case.opts.plan = plan;
                check(xent, dtype, &case);
            }
        }
    }
}

#[test]
fn ignore_index_and_grad_scale_options_match_reference() {
    let Some(xent) = gpu() else { return };
    for dtype in DTYPES {
        for plan in forced_plans(xent, 2048) {
            for (ignore_index, grad_scale, reduction) in [
                (0, 1.0, Reduction::Mean),
                (-1, 0.125, Reduction::Sum),
                (-100, 3.0, Reduction::Mean),
            ] {
                let mut case = Case::new(33, 4099);
                case.ignored = 0.5;
                case.opts = Options {
                    ignore_index,
                    grad_scale,
                    reduction,
                    plan,
                    ..Options::default()
                };
                check(xent, dtype, &case);
            }
        }
    }
}

/// Ignored rows must be exactly zero (not merely within tolerance), and not read.
#[test]
fn ignored_rows_get_zero_loss_and_gradient() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let (rows, vocab) = (16, 2053);
    for plan in forced_plans(xent, 512) {
        let logits = vec![bf16::from_f32(1.5); rows * vocab];
        let labels: Vec<i64> = (0..rows as i64)
            .map(|r| if r % 2 == 0 { -100 } else { r })
            .collect();
        let mut d_logits = stream.clone_htod(&logits).unwrap();
        let d_labels = stream.clone_htod(&labels).unwrap();
        let opts = Options {
            plan,
            ..Options::default()
        };
        let loss = xent
            .forward_backward(
                &stream,
                &mut d_logits,
                &d_labels,
                Shape::flat(rows, vocab),
                &opts,
            )
            .unwrap();
        let row_loss = loss.read_row_loss().unwrap();
        let grad = stream.clone_dtoh(&d_logits).unwrap();
        for r in (0..rows).step_by(2) {
            assert_eq!(row_loss[r], 0.0, "row {r}");
            assert!(
                grad[r * vocab..(r + 1) * vocab]
                    .iter()
                    .all(|g| g.to_bits() == 0),
                "row {r}"
            );
        }
        // Uniform rows: every scored row's loss is ln(vocab).
        let expected = (vocab as f32).ln();
        for r in (1..rows).step_by(2) {
            assert!(
                (row_loss[r] - expected).abs() < 1e-4,
                "row {r}: {}",
                row_loss[r]
            );
        }
        assert_eq!(loss.n_valid().unwrap(), (rows / 2) as u32);
    }
}

#[test]
fn all_rows_ignored_gives_nan_mean_and_zero_sum() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let (rows, vocab) = (5, 100);
    for (reduction, nan) in [(Reduction::Mean, true), (Reduction::Sum, false)] {
        let mut d_logits = stream.clone_htod(&vec![1.0f32; rows * vocab]).unwrap();
        let d_labels = stream.clone_htod(&vec![-100i64; rows]).unwrap();
        let opts = Options {
            reduction,
            ..Options::default()
        };
        let loss = xent
            .forward_backward(
                &stream,
                &mut d_logits,
                &d_labels,
                Shape::flat(rows, vocab),
                &opts,
            )
            .unwrap();
        let value = loss.read().unwrap();
        assert_eq!(value.is_nan(), nan, "{reduction:?}: {value}");
        assert!(
            stream
                .clone_dtoh(&d_logits)
                .unwrap()
                .iter()
                .all(|&g| g == 0.0)
        );
    }
}

#[test]
fn zero_rows_launch_nothing_and_report_like_pytorch() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let mut d_logits = stream.alloc_zeros::<f32>(1).unwrap();
    let labels_buffer = stream.alloc_zeros::<i64>(1).unwrap();
    let d_labels = labels_buffer.slice(0..0);
    let shape = Shape::flat(0, 100);
    let mean = xent
        .forward_backward(
            &stream,
            &mut d_logits,
            &d_labels,
            shape,
            &Options::default(),
        )
        .unwrap();
    assert!(mean.read().unwrap().is_nan());
    let opts = Options {
        reduction: Reduction::Sum,
        ..Options::default()
    };
    let sum = xent
        .forward_backward(&stream, &mut d_logits, &d_labels, shape, &opts)
        .unwrap();
    assert_eq!(sum.read().unwrap(), 0.0);
}

#[test]
fn out_of_range_label_is_reported_when_the_loss_is_read() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let (rows, vocab) = (4, 300);
    for plan in forced_plans(xent, 128) {
        for bad in [vocab as i64, -5, i64::MAX] {
            let mut d_logits = stream.clone_htod(&vec![0.5f32; rows * vocab]).unwrap();
            let d_labels = stream.clone_htod(&[3i64, bad, 7, -100]).unwrap();
            let opts = Options {
                plan,
                ..Options::default()
            };
            let loss = xent
                .forward_backward(
                    &stream,
                    &mut d_logits,
                    &d_labels,
                    Shape::flat(rows, vocab),
                    &opts,
                )
                .unwrap();
            match loss.read() {
                Err(Error::LabelOutOfRange { count: 1, .. }) => {}
                other => panic!("label {bad}: expected LabelOutOfRange, got {other:?}"),
            }
            let device_loss = stream.clone_dtoh(loss.device_loss()).unwrap()[0];
            assert!(
                device_loss.is_nan(),
                "the device scalar must not look valid"
            );
            let grad = stream.clone_dtoh(&d_logits).unwrap();
            assert!(
                grad[vocab..2 * vocab].iter().all(|&g| g == 0.0),
                "bad row's gradient is 0"
            );
            assert_eq!(loss.n_valid().unwrap(), 2);
        }
    }
}

#[test]
fn scale_grad_by_scalar_and_per_row_upstream_matches_reference() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    for dtype in DTYPES {
        for stride_extra in [0, 3] {
            let shape = Shape::flat(9, 10007).with_row_stride(10007 + stride_extra);
            let per_row: Vec<f32> = (0..9).map(|r| 0.5 + r as f32 * 0.25).collect();
            // Factors of exactly 1 are skipped on the device: the rows must be left as they are.
            let some_ones: Vec<f32> = (0..9)
                .map(|r| if r % 3 == 0 { 1.0 } else { 0.37 })
                .collect();
            for upstream in [vec![0.37f32], per_row, vec![1.0], some_ones] {
                let ok = match dtype {
                    DType::F32 => scale_case::<f32>(xent, &stream, shape, &upstream),
                    DType::F16 => scale_case::<xent::half::f16>(xent, &stream, shape, &upstream),
                    DType::Bf16 => scale_case::<bf16>(xent, &stream, shape, &upstream),
                };
                ok.unwrap_or_else(|msg| panic!("{} {shape:?}: {msg}", dtype.name()));
            }
        }
    }
}

#[test]
fn scale_grad_covers_more_tiles_than_its_grid_has_blocks() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    // 4000 rows x 2 tiles: more tiles than the grid-stride launch's blocks on any GPU here.
    let shape = Shape::flat(4000, 9000).with_row_stride(9001);
    let per_row: Vec<f32> = (0..4000)
        .map(|r| if r % 5 == 0 { 1.0 } else { 0.75 })
        .collect();
    for upstream in [vec![0.3f32], per_row] {
        scale_case::<bf16>(xent, &stream, shape, &upstream)
            .unwrap_or_else(|msg| panic!("{shape:?}: {msg}"));
    }
}

fn scale_case<T: xent::Element>(
    xent: &xent::CrossEntropy,
    stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    shape: Shape,
    upstream: &[f32],
) -> Result<(), String> {
    let grad: Vec<T> = xent_tests::random_logits(&shape, 5);
    let mut d_grad = stream.clone_htod(&grad).unwrap();
    let d_upstream = stream.clone_htod(upstream).unwrap();
    xent.scale_grad(stream, &mut d_grad, shape, &d_upstream)
        .map_err(|e| e.to_string())?;
    let got = stream.clone_dtoh(&d_grad).unwrap();
    let mut expected = grad;
    cpu::scale_grad(&mut expected, shape, upstream).map_err(|e| e.to_string())?;
    let rtol = xent_tests::grad_rtol(T::DTYPE);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        let (g, e) = (g.to_f64(), e.to_f64());
        if (g - e).abs() > rtol * e.abs() + 1e-30 {
            return Err(format!("element {i}: {g} != {e}"));
        }
    }
    Ok(())
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let mut d_logits = stream.alloc_zeros::<f32>(100).unwrap();
    let d_labels = stream.alloc_zeros::<i64>(10).unwrap();
    let opts = Options::default();
    let mut call = |shape: Shape| {
        xent.forward_backward(&stream, &mut d_logits, &d_labels, shape, &opts)
            .map(|_| ())
    };
    assert_eq!(call(Shape::flat(10, 0)), Err(Error::EmptyVocab));
    assert!(matches!(
        call(Shape::flat(10, 11)),
        Err(Error::LogitsTooShort { .. })
    ));
    assert!(matches!(
        call(Shape::flat(10, 10).with_row_stride(9)),
        Err(Error::RowStrideTooSmall { .. })
    ));
    assert!(matches!(
        call(Shape::flat(9, 10)),
        Err(Error::LabelsLength { .. })
    ));
}

/// The loss at logits of large magnitude (issue 13): computed as `(m - x[label]) + ln(s)`, its
/// error scales with the loss, not with the logits. All logits equal to 12345 (exact in f32, and
/// 12352 in bf16): every row's loss is ln(V) exactly; random logits in [-4, 4) shifted by 12345
/// (f32): the CPU reference's loss on the same values. Every plan, plain, with a z-loss and class
/// weights, and with label smoothing (its sum over the row taken relative to the label's logit),
/// weighted or not, soft-capped or not.
#[test]
fn loss_error_scales_with_the_loss_at_large_logit_magnitudes() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let (rows, vocab) = (64, 32000);
    let shape = Shape::flat(rows, vocab);
    let labels: Vec<i64> = (0..rows as i64).map(|r| (r * 499) % vocab as i64).collect();
    let d_labels = stream.clone_htod(&labels).unwrap();
    let mut rng = xent_tests::Rng(12345);
    let shifted: Vec<f32> = (0..rows * vocab)
        .map(|_| 12345.0 + (rng.unit() * 8.0 - 4.0) as f32)
        .collect();
    let mut failures = Vec::new();
    for plan in [
        PlanChoice::Auto,
        PlanChoice::Fused,
        PlanChoice::Chunked { chunk_len: None },
        PlanChoice::Split {
            chunk_len: None,
            threads: None,
        },
    ] {
        for (name, base) in [
            ("plain", Options::default()),
            (
                "z-loss and weights",
                Options {
                    // lse² is 1.5e8 here: a z-loss of 0.15 beside a cross-entropy of 10.
                    lse_square_scale: 1e-9,
                    weight: Some((0..vocab).map(|j| 0.5 + (j % 3) as f32 * 0.5).collect()),
                    ..Options::default()
                },
            ),
            (
                "smoothing",
                Options {
                    label_smoothing: 0.1,
                    ..Options::default()
                },
            ),
            (
                "weighted smoothing",
                Options {
                    label_smoothing: 0.1,
                    weight: Some((0..vocab).map(|j| 0.5 + (j % 3) as f32 * 0.5).collect()),
                    ..Options::default()
                },
            ),
            (
                // The cap bounds the logits: this checks the reference is taken after the cap.
                "smoothing with a soft cap",
                Options {
                    label_smoothing: 0.1,
                    softcap: Some(30.0),
                    ..Options::default()
                },
            ),
        ] {
            let opts = Options { plan, ..base };
            if xent.plan_for(&shape, DType::F32, &opts).is_err() {
                continue; // a forced plan that does not fit this shape
            }
            // All equal: ln(V) (plus the z-loss) per row, f32 and bf16.
            fn all_equal<T: xent::Element>(
                xent: &xent::CrossEntropy,
                stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
                value: T,
                labels: &[i64],
                d_labels: &xent::cudarc::driver::CudaSlice<i64>,
                shape: Shape,
                opts: &Options,
            ) -> (f64, f64) {
                let values = vec![value; shape.rows() * shape.vocab];
                let mut host = values.clone();
                let want = cpu::forward_backward(&mut host, labels, shape, opts)
                    .unwrap()
                    .loss;
                let mut d = stream.clone_htod(&values).unwrap();
                let got = xent
                    .forward_backward(stream, &mut d, d_labels, shape, opts)
                    .and_then(|l| l.read())
                    .unwrap() as f64;
                (got, want)
            }
            let f32_case = all_equal(xent, &stream, 12345.0f32, &labels, &d_labels, shape, &opts);
            let bf16_case = all_equal(
                xent,
                &stream,
                bf16::from_f32(12345.0),
                &labels,
                &d_labels,
                shape,
                &opts,
            );
            for (what, (got, want)) in [("f32 all 12345", f32_case), ("bf16 all 12352", bf16_case)]
            {
                if (got - want).abs() > 4e-6 * want.abs() {
                    failures.push(format!("{plan:?} {name} {what}: {got} against {want}"));
                }
            }
            // Random around 12345, row by row: the f64 reference on the same f32 values.
            let mut want_shifted = shifted.clone();
            let want = cpu::forward_backward(&mut want_shifted, &labels, shape, &opts)
                .unwrap()
                .row_loss;
            let mut d = stream.clone_htod(&shifted).unwrap();
            let got = xent
                .forward_backward(&stream, &mut d, &d_labels, shape, &opts)
                .and_then(|l| l.read_row_loss())
                .unwrap();
            for (r, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if (g as f64 - w).abs() > 1e-5 * w.abs() {
                    failures.push(format!(
                        "{plan:?} {name} f32 around 12345, row {r}: {g} against {w}"
                    ));
                    break;
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Small calls take one launch (`plan::self_finish`: each CTA counts the labels, the last one
/// reduces the loss): its loss, extras, counts, per-row outputs and gradient are the bits of the
/// three launches (count, cross-entropy, finish), for every option set that takes it, and stay
/// so call after call on the same `Loss` (the done counter wraps back to 0). Toggles the shared
/// handle's hook; the other tests pass on either path.
#[test]
fn small_calls_in_one_launch_match_three_launches_bit_for_bit() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let vocab = 5003;
    let class_weights =
        |vocab: usize| -> Vec<f32> { (0..vocab).map(|j| 0.5 + (j % 4) as f32 * 0.25).collect() };
    let weight = class_weights(vocab);
    let base = Options::default();
    let mut sets = xent_tests::reduction_option_sets();
    sets.extend([
        (
            "z-loss",
            Options {
                lse_square_scale: 1e-3,
                ..base.clone()
            },
        ),
        (
            "smoothing",
            Options {
                label_smoothing: 0.1,
                ..base.clone()
            },
        ),
        (
            "weights",
            Options {
                weight: Some(weight.clone()),
                ..base.clone()
            },
        ),
        (
            "accuracy",
            Options {
                return_token_accuracy: true,
                ..base.clone()
            },
        ),
        (
            "softcap",
            Options {
                softcap: Some(4.0),
                ..base.clone()
            },
        ),
        (
            "all but weighted smoothing",
            Options {
                lse_square_scale: 1e-3,
                softcap: Some(4.0),
                weight: Some(weight.clone()),
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
    ]);
    let mut failures = Vec::new();
    // Calls of at most 32 rows take one launch on every fused and cluster plan (a block has at
    // least a warp); larger ones where the plan's blocks have as many threads as there are rows.
    // The chunked plan (the sm_80 PTX spreads few rows over its chunks) takes three. One row of
    // Llama 3's vocabulary takes a cluster on sm_90, whose CTA that writes the row finishes the
    // call alone: its label in the first, a middle and the last chunk, and ignored.
    let mut cases: Vec<(usize, usize, Option<Vec<i64>>)> = [1, 3, 64, 200]
        .into_iter()
        .map(|rows| (rows, vocab, None))
        .collect();
    let llm = 128_256;
    cases.extend([0, 70_001, 128_255, -100].map(|label| (1, llm, Some(vec![label]))));
    let llm_weight = class_weights(llm);
    let mut not_taken = Vec::new();
    for dtype in [DType::Bf16, DType::F32] {
        for (rows, vocab, labels) in &cases {
            let (rows, vocab) = (*rows, *vocab);
            let shape = if rows == 64 {
                Shape::batched(4, 16, vocab)
            } else {
                Shape::flat(rows, vocab)
            };
            let labels = labels
                .clone()
                .unwrap_or_else(|| xent_tests::random_labels(rows, vocab, 1.0 / 6.0, -100, 7));
            for (name, opts) in &sets {
                let mut opts = opts.clone();
                if opts.weight.is_some() && vocab == llm {
                    opts.weight = Some(llm_weight.clone());
                }
                let opts = &opts;
                let weighted = opts.weight.is_some();
                let launch = xent.plan_for(&shape, dtype, opts);
                let one_block = matches!(
                    launch,
                    Ok(xent::LaunchPlan::Fused { .. } | xent::LaunchPlan::Cluster { .. })
                );
                let taken = launch
                    .is_ok_and(|launch| xent::plan::self_finish(rows, &launch, opts, weighted));
                let what = format!(
                    "{dtype:?} {rows} x {vocab}, labels {:?}, {name}",
                    &labels[..labels.len().min(4)]
                );
                if rows <= 32 && one_block && !taken {
                    not_taken.push(what.clone());
                }
                let result = match dtype {
                    DType::F32 => {
                        small_call_bits::<f32, i64>(xent, &stream, shape, &labels, opts, false)
                    }
                    _ => small_call_bits::<bf16, i64>(xent, &stream, shape, &labels, opts, false),
                };
                match result {
                    Ok((three, one, again)) => {
                        if three != one {
                            failures.push(format!("{what}: one launch differs from three"));
                        }
                        if one != again {
                            failures.push(format!("{what}: the second one-launch call differs"));
                        }
                    }
                    Err(err) => failures.push(format!("{what}: {err}")),
                }
            }
        }
    }
    xent.set_small_finish(true);
    assert_no_failures(&failures);
    assert!(not_taken.is_empty(), "three launches for {not_taken:?}");
}

/// The small-call kernels (`plan::small_kernel`: a cluster plan, at most 64 rows, the plain loss;
/// they count the labels behind the chunk's first pass) give the three launches' bits: loss,
/// counts, per-row outputs and gradient, in every reduction, with `grad_scale`, the causal shift,
/// a forward alone, all rows ignored, in each dtype and label type, at cluster sizes from 16 CTAs
/// (1-4 rows of Llama 3's vocabulary) down (a one-row call finishes from the loss in a register,
/// `finish_one_row`); and report out-of-range labels as those do. Toggles
/// the shared handle's hooks (and restores the handle's choice); the other tests pass
/// on either path.
#[test]
fn small_call_kernels_match_three_launches_bit_for_bit() {
    let Some(xent) = gpu() else { return };
    if xent.limits().max_cluster <= 1 {
        xent_tests::report("small-call kernels: no clusters on this device (nothing to check)");
        return;
    }
    let stream = xent.context().default_stream();
    let mut sets = xent_tests::reduction_option_sets();
    sets.extend([
        (
            "grad_scale",
            Options {
                grad_scale: 0.25,
                ..Options::default()
            },
        ),
        (
            "causal, sum",
            Options {
                causal_shift: true,
                reduction: Reduction::Sum,
                ..Options::default()
            },
        ),
        (
            "ignore_index 7",
            Options {
                ignore_index: 7,
                ..Options::default()
            },
        ),
    ]);
    let small_kernel_before = xent.small_kernel_on();
    xent.set_small_kernel(true);
    let (mut failures, mut not_taken, mut cases) = (Vec::new(), Vec::new(), 0);
    // Labels: random with a sixth ignored; in the first, a middle and the last chunk; none scored.
    let llm = 128_256;
    let mut shapes: Vec<(Shape, Option<Vec<i64>>)> = [1, 2, 4, 8, 17, 32, 33, 64]
        .into_iter()
        .flat_map(|rows| {
            [
                (Shape::flat(rows, llm), None),
                (Shape::flat(rows, 32_000), None),
            ]
        })
        .collect();
    shapes.push((Shape::batched(4, 16, llm), None));
    shapes.extend([0, 70_001, 128_255, -100].map(|label| (Shape::flat(1, llm), Some(vec![label]))));
    shapes.push((Shape::flat(3, llm), Some(vec![-100, -100, -100])));
    let mut dtypes = vec![DType::Bf16, DType::F16, DType::F32];
    // Under the sanitizer (10-100x slower): one dtype, 1, 8 or 33 rows, two option sets.
    if sanitizing() {
        dtypes.truncate(1);
        shapes.retain(|(shape, labels)| labels.is_none() && [1, 8, 33].contains(&shape.rows()));
        sets.retain(|(name, _)| ["mean", "causal, sum"].contains(name));
    }
    for dtype in dtypes {
        for (shape, labels) in &shapes {
            let (shape, rows) = (*shape, shape.rows());
            let labels = labels.clone().unwrap_or_else(|| {
                xent_tests::random_labels(rows, shape.vocab, 1.0 / 6.0, -100, 9)
            });
            for (name, opts) in &sets {
                for forward_only in [false, true] {
                    // A forward alone in two of the option sets.
                    if forward_only && !["mean", "causal, sum"].contains(name) {
                        continue;
                    }
                    let what = format!(
                        "{dtype:?} {rows} x {}, labels {:?}, {name}{}",
                        shape.vocab,
                        &labels[..labels.len().min(4)],
                        if forward_only { ", forward" } else { "" }
                    );
                    match xent.plan_for(&shape, dtype, opts) {
                        Ok(plan) if xent::plan::small_kernel(rows, &plan, opts, false) => {}
                        other => {
                            not_taken.push(format!("{what}: {other:?}"));
                            continue;
                        }
                    }
                    cases += 1;
                    // The ignored rows carry the set's `ignore_index` (-100 is out of range
                    // under `ignore_index` 7, which the out-of-range cases below try apart).
                    let labels: Vec<i64> = labels
                        .iter()
                        .map(|&l| if l == -100 { opts.ignore_index } else { l })
                        .collect();
                    // i32 labels for the 16-bit types, i64 for f32.
                    let labels32: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
                    let result = match dtype {
                        DType::F32 => small_call_bits::<f32, i64>(
                            xent,
                            &stream,
                            shape,
                            &labels,
                            opts,
                            forward_only,
                        ),
                        DType::F16 => small_call_bits::<f16, i32>(
                            xent,
                            &stream,
                            shape,
                            &labels32,
                            opts,
                            forward_only,
                        ),
                        DType::Bf16 => small_call_bits::<bf16, i32>(
                            xent,
                            &stream,
                            shape,
                            &labels32,
                            opts,
                            forward_only,
                        ),
                    };
                    match result {
                        Ok((three, one, again)) => {
                            if three != one {
                                failures.push(format!(
                                    "{what}: the small-call kernel differs from three launches"
                                ));
                            }
                            if one != again {
                                failures.push(format!("{what}: its second call differs"));
                            }
                        }
                        Err(err) => failures.push(format!("{what}: {err}")),
                    }
                }
            }
        }
    }
    // Out-of-range labels, in the small kernel at Llama 3's vocabulary.
    failures.extend(out_of_range_failures(xent, &stream, llm));
    xent.set_small_kernel(small_kernel_before);
    xent_tests::report(&format!(
        "small-call kernels on the GPU: {cases} cases, {} not taken, {} failed",
        not_taken.len(),
        failures.len()
    ));
    assert_no_failures(&failures);
    assert!(
        not_taken.is_empty(),
        "not the small-call kernel: {not_taken:?}"
    );
}

/// A small call's out-of-range labels (each CTA counts them at its start, the last one stores
/// the count) are reported as the three launches report them, with the same count.
#[test]
fn small_calls_in_one_launch_report_out_of_range_labels() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    assert_no_failures(&out_of_range_failures(xent, &stream, 5003));
}

/// A call of 5 rows of `vocab` classes whose labels `vocab` and -7 are out of range (-100 is
/// ignored), in three launches and in one: each way that does not report 2 labels out of range.
fn out_of_range_failures(
    xent: &xent::CrossEntropy,
    stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    vocab: usize,
) -> Vec<String> {
    let shape = Shape::flat(5, vocab);
    let logits: Vec<f32> = xent_tests::random_logits(&shape, 3);
    let d_labels = stream.clone_htod(&[vocab as i64, 2, -100, -7, 17]).unwrap();
    let mut failures = Vec::new();
    for small in [false, true] {
        xent.set_small_finish(small);
        let mut out = xent::Loss::new(stream, shape.rows()).unwrap();
        let mut d_logits = stream.clone_htod(&logits).unwrap();
        let result = xent
            .forward_backward_into(
                stream,
                &mut d_logits,
                &d_labels,
                shape,
                &Options::default(),
                &mut out,
            )
            .and_then(|()| out.read());
        if !matches!(result, Err(Error::LabelOutOfRange { count: 2, .. })) {
            failures.push(format!(
                "5 x {vocab}, one launch {small}: {result:?}, not 2 labels out of range"
            ));
        }
    }
    xent.set_small_finish(true);
    failures
}

/// Small cluster calls are launched with a programmatic dependency on the kernel before them
/// (their CTAs may start early and wait for it in the kernel): two such calls back to back in
/// place on one buffer, the second reading the first's gradient, give the bits they give without
/// it. Toggles the shared handle's hook; the other tests pass on either path.
#[test]
fn small_calls_back_to_back_give_the_same_bits_with_and_without_programmatic_launch() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let mut failures = Vec::new();
    for rows in [1, 8, 64] {
        let shape = Shape::flat(rows, 32000);
        let logits: Vec<bf16> = xent_tests::random_logits(&shape, 11);
        let labels: Vec<i64> = xent_tests::random_labels(rows, shape.vocab, 0.0, -100, 11);
        let d_labels = stream.clone_htod(&labels).unwrap();
        let twice = |pdl: bool| -> Result<(Vec<u32>, Vec<u16>), Error> {
            xent.set_pdl(pdl);
            let mut out = xent::Loss::new(&stream, rows)?;
            let mut d_logits = stream.clone_htod(&logits)?;
            let mut losses = Vec::new();
            for _ in 0..2 {
                xent.forward_backward_into(
                    &stream,
                    &mut d_logits,
                    &d_labels,
                    shape,
                    &Options::default(),
                    &mut out,
                )?;
            }
            losses.push(out.read()?.to_bits());
            losses.extend(out.read_row_loss()?.iter().map(|v| v.to_bits()));
            let grad = stream
                .clone_dtoh(&d_logits)?
                .iter()
                .map(|g| g.to_bits())
                .collect();
            Ok((losses, grad))
        };
        match (twice(false), twice(true)) {
            (Ok(off), Ok(on)) if off == on => {}
            (Ok(_), Ok(_)) => failures.push(format!("{rows} rows: the bits differ")),
            (off, on) => failures.push(format!("{rows} rows: {:?} / {:?}", off.err(), on.err())),
        }
    }
    xent.set_pdl(true);
    assert_no_failures(&failures);
}

/// A handle loads each kernel on its first use, as a module of its own (`ptx_index`), unless
/// `XENT_LAZY_MODULES=0` loads the PTX as one module when it is made: both give the same bits,
/// for the plain kernels and for option sets that take other kernels.
#[test]
fn kernels_loaded_on_first_use_give_the_bits_of_kernels_loaded_at_once() {
    let Some(xent) = gpu() else { return };
    let ctx = xent.context().clone();
    let stream = ctx.default_stream();
    let eager = xent::CrossEntropy::from_context_loading(ctx.clone(), false).unwrap();
    let lazy = xent::CrossEntropy::from_context_loading(ctx, true).unwrap();
    let mut option_sets = vec![Options::default()];
    option_sets.push(Options {
        label_smoothing: 0.1,
        lse_square_scale: 1e-4,
        ..Options::default()
    });
    option_sets.push(Options {
        softcap: Some(30.0),
        return_token_accuracy: true,
        ..Options::default()
    });
    let mut failures = Vec::new();
    for (rows, vocab) in [(3, 32000), (256, 128_256)] {
        let shape = Shape::flat(rows, vocab);
        let logits: Vec<bf16> = xent_tests::random_logits(&shape, 5);
        let labels: Vec<i64> = xent_tests::random_labels(rows, vocab, 0.1, -100, 5);
        let d_labels = stream.clone_htod(&labels).unwrap();
        for opts in &option_sets {
            let bits = |handle: &xent::CrossEntropy| -> Result<(Vec<u32>, Vec<u16>), Error> {
                let mut d_logits = stream.clone_htod(&logits)?;
                let out =
                    handle.forward_backward(&stream, &mut d_logits, &d_labels, shape, opts)?;
                let mut scalars = vec![out.read()?.to_bits()];
                scalars.extend(out.read_row_lse()?.iter().map(|v| v.to_bits()));
                let grad = stream
                    .clone_dtoh(&d_logits)?
                    .iter()
                    .map(|g| g.to_bits())
                    .collect();
                Ok((scalars, grad))
            };
            match (bits(&eager), bits(&lazy)) {
                (Ok(at_once), Ok(first_use)) if at_once == first_use => {}
                (Ok(_), Ok(_)) => failures.push(format!("{shape:?} {opts:?}: the bits differ")),
                (a, b) => {
                    failures.push(format!("{shape:?} {opts:?}: {:?} / {:?}", a.err(), b.err()))
                }
            }
        }
    }
    assert_no_failures(&failures);
}

/// A call loads every kernel it will launch before it launches the first (`preload`), so that a
/// kernel that cannot be loaded fails the call before anything is enqueued, never halfway (a
/// gradient written in place, its loss not finished). On a fresh handle that loads kernels on
/// first use and refuses to launch one its call did not load first (`set_strict_preload`), every
/// plan, option set and entry point (one launch and three, two-phase, scaling) must still match
/// the reference.
#[test]
fn every_call_loads_its_kernels_before_its_first_launch() {
    let Some(xent) = gpu() else { return };
    let fresh = xent_tests::strict_lazy_handle(xent);
    let stream = fresh.context().default_stream();
    let vocab = 3000;
    let weight: Vec<f32> = (0..vocab).map(|j| 0.5 + (j % 5) as f32 * 0.25).collect();
    let option_sets = [
        Options::default(),
        Options {
            label_smoothing: 0.1,
            lse_square_scale: 1e-4,
            ..Options::default()
        },
        Options {
            return_token_accuracy: true,
            ..Options::default()
        },
        Options {
            softcap: Some(30.0),
            ..Options::default()
        },
        Options {
            softcap: Some(30.0),
            return_token_accuracy: true,
            ..Options::default()
        },
        Options {
            label_smoothing: 0.1,
            weight: Some(weight.clone()),
            ..Options::default()
        },
        Options {
            label_smoothing: 0.1,
            lse_square_scale: 1e-4,
            softcap: Some(30.0),
            weight: Some(weight.clone()),
            return_token_accuracy: true,
            ..Options::default()
        },
    ];
    let mut failures = Vec::new();
    for dtype in DTYPES {
        // 3 rows: one launch where the plan allows it; 40: count, cross-entropy, finish.
        for rows in [3, 40] {
            for plan in forced_plans(&fresh, 1024) {
                for opts in &option_sets {
                    let mut case = Case::new(rows, vocab);
                    case.opts = Options {
                        plan,
                        ..opts.clone()
                    };
                    if let Err(msg) = run_case_dtype::<i64>(&fresh, &stream, dtype, &case) {
                        failures.push(format!("{dtype:?} {rows} rows {plan:?}: {msg}"));
                    }
                }
            }
        }
    }
    // Two-phase (forward, then backward in place) and scaling a gradient.
    let shape = Shape::flat(40, vocab);
    let logits: Vec<bf16> = xent_tests::random_logits(&shape, 3);
    let labels: Vec<i64> = xent_tests::random_labels(40, vocab, 0.1, -100, 3);
    let d_labels = stream.clone_htod(&labels).unwrap();
    for opts in &option_sets {
        let two_phase = || -> Result<(), Error> {
            let mut d_logits = stream.clone_htod(&logits)?;
            let mut out = xent::Loss::new(&stream, 40)?;
            fresh.forward(&stream, &d_logits, &d_labels, shape, opts, &mut out)?;
            let upstream = stream.clone_htod(&[0.5f32])?;
            fresh.backward_in_place(
                &stream,
                &mut d_logits,
                &d_labels,
                shape,
                opts,
                &out,
                &upstream,
            )?;
            fresh.scale_grad(&stream, &mut d_logits, shape, &upstream)?;
            stream.synchronize()?;
            Ok(())
        };
        if let Err(err) = two_phase() {
            failures.push(format!("two-phase {opts:?}: {err}"));
        }
    }
    assert_no_failures(&failures);
}

/// Every output of one call's bits: loss, extras, counts, per-row loss and log-sum-exp, gradient.
type CallBits = (Vec<u32>, Vec<u32>);

/// The bits of `shape` (random logits, a sixth of the rows ignored) through three launches, then
/// one launch twice on the same `Loss`; with `forward_only`, of the two-phase forward (the
/// logits left as they are).
fn small_call_bits<T: xent::Element, L: xent::Label>(
    xent: &xent::CrossEntropy,
    stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    shape: Shape,
    labels: &[L],
    opts: &Options,
    forward_only: bool,
) -> Result<(CallBits, CallBits, CallBits), Error> {
    let logits: Vec<T> = xent_tests::random_logits(&shape, 7);
    let d_labels = stream.clone_htod(labels)?;
    let mut out = xent::Loss::new(stream, shape.rows())?;
    let call = |small: bool, out: &mut xent::Loss| -> Result<CallBits, Error> {
        xent.set_small_finish(small);
        let mut d_logits = stream.clone_htod(&logits)?;
        if forward_only {
            xent.forward(stream, &d_logits, &d_labels, shape, opts, out)?;
        } else {
            xent.forward_backward_into(stream, &mut d_logits, &d_labels, shape, opts, out)?;
        }
        let mut scalars = vec![
            out.read()?.to_bits(),
            out.read_z_loss()?.to_bits(),
            out.n_valid()?,
        ];
        scalars.push(out.read_accuracy()?.map_or(0, f32::to_bits));
        if opts.weight.is_some() {
            scalars.push(out.read_total_weight()?.to_bits());
        }
        scalars.extend(out.read_row_loss()?.iter().map(|v| v.to_bits()));
        scalars.extend(out.read_row_lse()?.iter().map(|v| v.to_bits()));
        if let Some(correct) = out.read_row_correct()? {
            scalars.extend(correct.iter().map(|&c| c as u32));
        }
        let grad: Vec<u32> = stream
            .clone_dtoh(&d_logits)?
            .iter()
            .map(|&g| (g.to_f64() as f32).to_bits())
            .collect();
        Ok((scalars, grad))
    };
    let three = call(false, &mut out)?;
    let one = call(true, &mut out)?;
    let again = call(true, &mut out)?;
    Ok((three, one, again))
}

/// Small calls of Llama 3's vocabulary take the planner's small-call shapes (`plan::small_call_shape`:
/// clusters of 16 CTAs of 128 threads at 1-4 rows on a device that fits them, 8 of 128 at 32-128
/// rows) and match the reference, with and without options, in both 16-bit types.
#[test]
fn small_calls_of_an_llm_vocabulary_take_their_shapes_and_match_the_reference() {
    let Some(xent) = gpu() else { return };
    if xent.limits().max_cluster <= 1 {
        xent_tests::report("small-call shapes: no clusters on this device (nothing to check)");
        return;
    }
    let vocab = 128_256;
    let sets = [
        ("plain", Options::default()),
        (
            "z-loss + smoothing + accuracy",
            Options {
                lse_square_scale: 1e-4,
                label_smoothing: 0.1,
                return_token_accuracy: true,
                ..Options::default()
            },
        ),
        (
            "softcap, sum",
            Options {
                softcap: Some(30.0),
                reduction: Reduction::Sum,
                ..Options::default()
            },
        ),
    ];
    let (mut failures, mut cases) = (Vec::new(), 0);
    for rows in [1, 3, 4, 8, 32, 100, 128] {
        for dtype in [DType::Bf16, DType::F16] {
            for (name, opts) in &sets {
                let mut case = Case::new(rows, vocab);
                case.opts = opts.clone();
                case.seed = 40 + rows as u64;
                let plan = xent.plan_for(&case.shape, dtype, &case.opts).unwrap();
                let (size, threads) = match plan {
                    xent::plan::LaunchPlan::Cluster { size, threads, .. } => (size, threads),
                    other => panic!("{rows} x {vocab}: expected a cluster plan, got {other:?}"),
                };
                let expected = match rows {
                    1..=4 => Some((
                        xent::plan::MAX_FORCED_CLUSTER,
                        xent::plan::SMALL_CALL_THREADS,
                    )),
                    32..=128 => Some((xent::plan::MAX_CLUSTER, xent::plan::SMALL_CALL_THREADS)),
                    _ => None,
                };
                if let Some(want) = expected
                    && (size, threads) != want
                {
                    failures.push(format!(
                        "{rows} x {vocab} {name}: plan {plan:?}, expected {want:?}"
                    ));
                }
                let stream = xent.context().default_stream();
                cases += 1;
                if let Err(msg) = xent_tests::run_case_dtype::<i64>(xent, &stream, dtype, &case) {
                    failures.push(format!("{name}: {msg}"));
                }
            }
        }
    }
    xent_tests::report(&format!(
        "small calls of 128256 classes on the GPU: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}
