//! One handle shared by threads: `CrossEntropy` and `Loss` are `Send + Sync` (checked when this
//! file compiles, so it holds on machines without a GPU too), and calls made at the same time
//! from several threads, each on its own stream, each get their own right answer (checked on the
//! GPU against the CPU reference). Every call has its own inputs, so a result that leaked from
//! another call (a buffer shared inside the handle, a launch on the wrong stream) would not match.

use std::sync::Barrier;

use xent::half::bf16;
use xent::{CrossEntropy, Element, Label, Loss, Options, PlanChoice, Reduction, Shape};
use xent_tests::{Case, FromI64, Prepared, case_labels, gpu, random_labels, report, sanitizing};

/// Compiles only if `T` may be moved to and shared between threads.
const fn assert_send_sync<T: Send + Sync>() {}

const _: () = {
    assert_send_sync::<CrossEntropy>();
    assert_send_sync::<Loss>();
};

/// The compile-time assertions above, named in the test list (this test runs everywhere).
#[test]
fn handle_and_loss_are_send_and_sync() {
    assert_send_sync::<CrossEntropy>();
    assert_send_sync::<Loss>();
}

/// What one thread computes, over and over with new inputs.
#[derive(Clone, Debug)]
struct Work {
    name: &'static str,
    case: Case,
    /// Elements between the allocation and the first row (see `Prepared`).
    base_offset: usize,
}

/// How long each thread keeps at it: `iterations` rounds of `in_flight` calls enqueued back to
/// back before the first is read, both threads starting each round together.
struct Rounds {
    iterations: usize,
    in_flight: usize,
}

/// One thread's part: on a stream of its own, `rounds.iterations` rounds of `rounds.in_flight`
/// calls, each with new inputs; every round starts at `barrier`, so the two threads' kernels are
/// in flight together. Errors are collected, not returned early, so both threads reach every
/// barrier. Returns the calls checked and the failures.
fn worker<T: Element, L: Label + FromI64>(
    xent: &CrossEntropy,
    barrier: &Barrier,
    work: &Work,
    rounds: &Rounds,
) -> (usize, Vec<String>) {
    let stream = xent.context().new_stream();
    let mut failures = Vec::new();
    let mut checked = 0;
    for iteration in 0..rounds.iterations {
        let batch: Result<Vec<Prepared<T, L>>, String> = match &stream {
            Err(err) => Err(format!("new_stream: {err}")),
            Ok(stream) => (0..rounds.in_flight)
                .map(|k| {
                    let mut case = work.case.clone();
                    case.seed = work.case.seed + (iteration * rounds.in_flight + k) as u64;
                    let labels: Vec<L> = case_labels(&case);
                    Prepared::new(stream, &case, labels, work.base_offset)
                })
                .collect(),
        };
        barrier.wait();
        let result = batch.and_then(|mut batch| {
            let losses = batch
                .iter_mut()
                .map(|call| call.launch(xent))
                .collect::<Result<Vec<Loss>, String>>()?;
            for (call, loss) in batch.iter().zip(&losses) {
                call.check(loss)?;
                checked += 1;
            }
            Ok(())
        });
        if let Err(msg) = result {
            failures.push(format!("{} round {iteration}: {msg}", work.name));
        }
    }
    (checked, failures)
}

#[test]
fn two_threads_on_two_streams_compute_different_losses_at_once() {
    let Some(xent) = gpu() else { return };
    let (rounds, seq_len, rows_b) = if sanitizing() {
        (
            Rounds {
                iterations: 1,
                in_flight: 2,
            },
            8,
            16,
        )
    } else {
        (
            Rounds {
                iterations: 8,
                in_flight: 3,
            },
            40,
            150,
        )
    };
    // bf16 logits and i64 labels: LLM rows under the shift, the mean; the automatic plan (the
    // cluster kernel on sm_90), or without clusters the split plan's cooperative launch (4 chunks a
    // row), beside the other stream's kernels.
    let clusters = xent.limits().max_cluster > 1;
    let mut case_a = Case::new(0, 32000);
    case_a.shape = Shape::batched(2, seq_len, 32000);
    case_a.opts = Options {
        causal_shift: true,
        plan: if clusters {
            PlanChoice::Auto
        } else {
            PlanChoice::Split {
                chunk_len: Some(8000),
                threads: None,
            }
        },
        ..Options::default()
    };
    case_a.ignored = 0.1;
    case_a.seed = 1000;
    let work_a = Work {
        name: if clusters {
            "bf16/i64 shifted mean, automatic plan"
        } else {
            "bf16/i64 shifted mean, split plan"
        },
        case: case_a,
        base_offset: 0,
    };
    // f32 logits and i32 labels: padded rows from a misaligned base, the chunked pair, the sum
    // with a gradient scale and another ignore_index.
    let mut case_b = Case::new(rows_b, 5003);
    case_b.shape = Shape::flat(rows_b, 5003).with_row_stride(5011);
    case_b.opts = Options {
        ignore_index: -1,
        reduction: Reduction::Sum,
        grad_scale: 0.5,
        plan: PlanChoice::Chunked {
            chunk_len: Some(1024),
        },
        ..Options::default()
    };
    case_b.seed = 2000;
    let work_b = Work {
        name: "f32/i32 strided sum, chunked plan",
        case: case_b,
        base_offset: 1,
    };

    let barrier = Barrier::new(2);
    let ((checked_a, failures_a), (checked_b, failures_b)) = std::thread::scope(|scope| {
        let a = scope.spawn(|| worker::<bf16, i64>(xent, &barrier, &work_a, &rounds));
        let b = scope.spawn(|| worker::<f32, i32>(xent, &barrier, &work_b, &rounds));
        (
            a.join().expect("thread a panicked"),
            b.join().expect("thread b panicked"),
        )
    });
    report(&format!(
        "concurrency: {checked_a} calls of '{}' and {checked_b} of '{}' checked",
        work_a.name, work_b.name
    ));
    let failures: Vec<String> = failures_a.into_iter().chain(failures_b).collect();
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    let expected = rounds.iterations * rounds.in_flight;
    assert_eq!((checked_a, checked_b), (expected, expected));
}

/// A call enqueued on one thread is waited for and read on another (the `Loss` moves, as a
/// training loop's might to a logging thread), while the first thread enqueues more work on its
/// stream.
#[test]
fn a_loss_launched_on_one_thread_is_read_on_another() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().new_stream().expect("new_stream");
    let mut case = Case::new(37, 4099);
    let labels: Vec<i64> = random_labels(37, 4099, 0.2, -100, case.seed);
    let mut first = Prepared::<bf16, i64>::new(&stream, &case, labels, 0).expect("upload");
    let loss = first.launch(xent).expect("launch");
    let reader = std::thread::spawn(move || first.check(&loss));

    case.seed += 1;
    let labels: Vec<i64> = random_labels(37, 4099, 0.2, -100, case.seed);
    let mut second = Prepared::<bf16, i64>::new(&stream, &case, labels, 0).expect("upload");
    let second_loss = second.launch(xent).expect("launch");
    reader
        .join()
        .expect("reader panicked")
        .unwrap_or_else(|msg| panic!("first call, read on another thread: {msg}"));
    second
        .check(&second_loss)
        .unwrap_or_else(|msg| panic!("second call: {msg}"));
}
