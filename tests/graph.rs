//! A call makes no host synchronisation, so it can be captured in a CUDA graph and replayed:
//! the replays give the eager call's loss and gradient, bit for bit (the kernels reduce in a fixed
//! order). Its own test binary, because it turns cudarc's event tracking off for its context.

use std::sync::Mutex;

use xent::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use xent::half::bf16;
use xent::{CrossEntropy, DType, Loss, Options, PlanChoice, Shape, plan};
use xent_tests::{gpu, random_labels, random_logits};

/// One capture at a time: a capture in global mode fails if another thread makes an unsafe call
/// meanwhile (the harness runs tests on several threads).
static CAPTURE: Mutex<()> = Mutex::new(());

#[test]
fn a_captured_call_replays_with_the_same_loss_and_gradient() {
    let Some(xent) = gpu() else { return };
    let _one_at_a_time = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = xent.context();
    // SAFETY: this test uses one stream; cudarc's cross-stream events are not needed, and an
    // event record of them inside the capture would join the graph.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap(); // the legacy default stream cannot be captured
    let shape = Shape::batched(4, 33, 32000);
    let logits: Vec<bf16> = random_logits(&shape, 11);
    let labels: Vec<i64> = random_labels(shape.rows(), shape.vocab, 0.2, -100, 11);
    let pristine = stream.clone_htod(&logits).unwrap();
    let d_labels = stream.clone_htod(&labels).unwrap();
    let mut work = stream.alloc_zeros::<bf16>(logits.len()).unwrap();

    let mut plans = vec![
        PlanChoice::Auto,
        PlanChoice::Chunked {
            chunk_len: Some(4096),
        },
    ];
    if xent.limits().max_cluster == 1 {
        // sm_80: the split plan's cooperative launch, and the memset of its counters, captured.
        plans.push(PlanChoice::Fused);
        plans.push(PlanChoice::Split {
            chunk_len: Some(4096),
            threads: None,
        });
    }
    for plan in plans {
        let opts = Options {
            causal_shift: true,
            plan,
            ..Options::default()
        };
        // Eagerly first: this also makes every buffer the call needs, so the capture allocates
        // nothing.
        let mut out = Loss::new(&stream, shape.rows()).unwrap();
        stream.memcpy_dtod(&pristine, &mut work).unwrap();
        xent.forward_backward_into(&stream, &mut work, &d_labels, shape, &opts, &mut out)
            .unwrap();
        let eager_loss = out.read().unwrap();
        let eager_grad = stream.clone_dtoh(&work).unwrap();
        assert!(eager_loss.is_finite());

        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        stream.memcpy_dtod(&pristine, &mut work).unwrap();
        xent.forward_backward_into(&stream, &mut work, &d_labels, shape, &opts, &mut out)
            .unwrap();
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("the capture recorded work");

        for replay in 0..3 {
            stream.memset_zeros(&mut work).unwrap(); // the replay must restore and recompute
            graph.launch().unwrap();
            let loss = out.read().unwrap();
            assert_eq!(
                loss.to_bits(),
                eager_loss.to_bits(),
                "{plan:?} replay {replay}"
            );
            let grad = stream.clone_dtoh(&work).unwrap();
            assert!(
                grad.iter()
                    .zip(&eager_grad)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{plan:?} replay {replay}: gradient differs"
            );
        }
    }
}

/// The automatic cluster size asks the driver how many clusters fit (`cuOccupancyMaxActiveClusters`)
/// the first time a handle plans a launch shape, then remembers it. A shape first planned inside a
/// capture (global mode, the strictest) must plan as it would eagerly: the query is legal there,
/// and the replay gives the eager call's loss.
#[test]
fn a_shape_first_planned_inside_a_capture_plans_as_it_would_eagerly() {
    let Some(xent) = gpu() else { return };
    let _one_at_a_time = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = xent.context().clone();
    // SAFETY: as in the test above.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    // 1024 rows: more than one wave of clusters, so the occupancy decides the size.
    let shape = Shape::batched(8, 128, 128_256);
    let logits: Vec<bf16> = random_logits(&shape, 12);
    let labels: Vec<i64> = random_labels(shape.rows(), shape.vocab, 0.1, -100, 12);
    let pristine = stream.clone_htod(&logits).unwrap();
    let d_labels = stream.clone_htod(&labels).unwrap();
    let mut work = stream.alloc_zeros::<bf16>(logits.len()).unwrap();
    let opts = Options::default();

    // Eagerly on the shared handle: plans with an eager query and makes the Loss's buffers.
    let mut out = Loss::new(&stream, shape.rows()).unwrap();
    stream.memcpy_dtod(&pristine, &mut work).unwrap();
    xent.forward_backward_into(&stream, &mut work, &d_labels, shape, &opts, &mut out)
        .unwrap();
    let eager_loss = out.read().unwrap();
    let eager_plan = xent.plan_for(&shape, DType::Bf16, &opts).unwrap();

    // A fresh handle has never planned this shape: its first query runs inside the capture.
    let fresh = CrossEntropy::from_context(ctx.clone()).unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
        .unwrap();
    stream.memcpy_dtod(&pristine, &mut work).unwrap();
    fresh
        .forward_backward_into(&stream, &mut work, &d_labels, shape, &opts, &mut out)
        .unwrap();
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture recorded work");
    let captured_plan = fresh.plan_for(&shape, DType::Bf16, &opts).unwrap();
    let fallback = plan::plan(
        shape.rows(),
        shape.vocab,
        DType::Bf16,
        xent.limits(),
        PlanChoice::Auto,
    )
    .unwrap();
    if fallback == eager_plan {
        eprintln!("note: on this device the fallback plan is the occupancy plan ({eager_plan:?})");
    }
    assert_eq!(
        captured_plan, eager_plan,
        "planned inside the capture (fallback without an occupancy answer: {fallback:?})"
    );

    stream.memset_zeros(&mut work).unwrap();
    graph.launch().unwrap();
    let loss = out.read().unwrap();
    assert_eq!(
        loss.to_bits(),
        eager_loss.to_bits(),
        "replay {loss} vs eager {eager_loss}"
    );
}
