//! xent's candle op on CUDA tensors (feature `candle-cuda`), on the GPU: values and gradients
//! against the same op on CPU tensors (xent's f64 reference) and against
//! `candle_nn::loss::cross_entropy`, every dtype, both label types, ignore_index, the causal shift
//! and the loss options; and a few optimizer steps of a small model with xent's loss tracking the
//! same model with candle's.

use candle_core::{DType, Device, Tensor, Var};
use xent::{Options, Reduction};

/// candle's CUDA device 0, or `None` (after `xent_tests::gpu` printed why) without a GPU.
fn cuda() -> Option<Device> {
    xent_tests::gpu()?;
    Some(Device::new_cuda(0).expect("a GPU for xent but no candle CUDA device"))
}

/// Logits `[rows, vocab]` (or `dims`), values in [-4, 4), seeded.
fn logits(dims: &[usize], seed: u64) -> Vec<f32> {
    let mut rng = xent_tests::Rng(seed);
    let n: usize = dims.iter().product();
    (0..n).map(|_| (rng.unit() * 8.0 - 4.0) as f32).collect()
}

fn labels(rows: usize, vocab: usize, ignore_every: usize, seed: u64) -> Vec<i64> {
    let mut rng = xent_tests::Rng(seed);
    (0..rows)
        .map(|r| {
            if ignore_every > 0 && r % ignore_every == ignore_every - 1 {
                -100
            } else {
                rng.below(vocab as u64) as i64
            }
        })
        .collect()
}

/// Loss and gradient of `upstream · loss` (the upstream a tensor of the loss's shape) through
/// candle's autograd, as f64 vectors.
fn loss_and_grad(
    values: &[f32],
    dims: &[usize],
    dtype: DType,
    targets: &Tensor,
    opts: &Options,
    upstream: &[f32],
    device: &Device,
) -> (Vec<f64>, Vec<f64>) {
    let x = Tensor::from_vec(values.to_vec(), dims, device)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let x = Var::from_tensor(&x).unwrap();
    let targets = targets.to_device(device).unwrap();
    let loss = xent::candle::cross_entropy(x.as_tensor(), &targets, opts).unwrap();
    let up = Tensor::from_vec(upstream.to_vec(), loss.shape(), device).unwrap();
    let grads = (loss.clone() * up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = grads.get(x.as_tensor()).expect("a gradient for the logits");
    assert_eq!(grad.dtype(), dtype, "the gradient has the logits' dtype");
    let to64 = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    (to64(&loss), to64(grad))
}

fn close(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let error = (g - w).abs();
        if error.is_nan() || error > atol + rtol * w.abs() {
            return Err(format!("{what}[{i}]: {g} against {w}"));
        }
    }
    Ok(())
}

/// Relative tolerance of a gradient element of `dtype` against the CPU path's (both rounded once
/// from f32 / f64 values that agree to ~1e-6): two units of the dtype.
/// The absolute floor of a gradient comparison: f16 gradients this small are subnormal, where
/// one rounding step is 2^-24 whatever the value (two roundings of the same f32 may differ by it).
fn grad_atol(dtype: DType, scale: f64) -> f64 {
    let floor = if dtype == DType::F16 {
        2f64.powi(-24)
    } else {
        0.0
    };
    (1e-6 * scale).max(floor)
}

fn grad_rtol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2.0 * 2f64.powi(-11),
        _ => 2.0 * 2f64.powi(-8),
    }
}

#[test]
fn cuda_matches_the_cpu_path_for_every_dtype_label_type_and_option() {
    let Some(gpu) = cuda() else {
        return;
    };
    let mut failures = Vec::new();
    let cases: Vec<(&str, Options)> = vec![
        ("mean", Options::default()),
        (
            "sum",
            Options {
                reduction: Reduction::Sum,
                ..Options::default()
            },
        ),
        (
            "none",
            Options {
                reduction: Reduction::None,
                ..Options::default()
            },
        ),
        (
            "options",
            Options {
                label_smoothing: 0.1,
                lse_square_scale: 1e-3,
                softcap: Some(5.0),
                grad_scale: 0.5,
                ..Options::default()
            },
        ),
        (
            "weights",
            Options {
                weight: Some((0..1003).map(|j| 0.5 + (j % 3) as f32 * 0.5).collect()),
                label_smoothing: 0.05,
                ..Options::default()
            },
        ),
        (
            "causal",
            Options {
                causal_shift: true,
                ..Options::default()
            },
        ),
    ];
    for (name, opts) in cases {
        let dims: Vec<usize> = if opts.causal_shift {
            vec![3, 41, 1003]
        } else {
            vec![123, 1003]
        };
        let rows = dims[..dims.len() - 1].iter().product::<usize>();
        let values = logits(&dims, 7);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for label_type in [DType::I64, DType::U32] {
                // u32 targets cannot hold -100: none ignored there.
                let ignore = if label_type == DType::I64 { 7 } else { 0 };
                let ids = labels(rows, 1003, ignore, 11);
                let targets = Tensor::from_vec(ids, &dims[..dims.len() - 1], &Device::Cpu)
                    .unwrap()
                    .to_dtype(label_type)
                    .unwrap();
                let upstream: Vec<f32> = if opts.reduction == Reduction::None {
                    (0..rows).map(|r| 0.25 + (r % 5) as f32 * 0.5).collect()
                } else {
                    vec![0.75]
                };
                let (loss_cpu, grad_cpu) = loss_and_grad(
                    &values,
                    &dims,
                    dtype,
                    &targets,
                    &opts,
                    &upstream,
                    &Device::Cpu,
                );
                let (loss_gpu, grad_gpu) =
                    loss_and_grad(&values, &dims, dtype, &targets, &opts, &upstream, &gpu);
                let scale = grad_cpu.iter().fold(0.0f64, |m, g| m.max(g.abs()));
                let result = close("loss", &loss_gpu, &loss_cpu, 1e-5, 1e-5).and_then(|()| {
                    close(
                        "grad",
                        &grad_gpu,
                        &grad_cpu,
                        grad_rtol(dtype),
                        grad_atol(dtype, scale),
                    )
                });
                if let Err(msg) = result {
                    failures.push(format!("{name} {dtype:?} {label_type:?}: {msg}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cuda_matches_candle_nn_cross_entropy() {
    let Some(gpu) = cuda() else {
        return;
    };
    let (rows, vocab) = (257, 32000);
    let values = logits(&[rows, vocab], 3);
    let ids: Vec<u32> = labels(rows, vocab, 0, 5)
        .iter()
        .map(|&l| l as u32)
        .collect();
    let x = Var::from_tensor(&Tensor::from_vec(values, (rows, vocab), &gpu).unwrap()).unwrap();
    let t = Tensor::from_vec(ids, rows, &gpu).unwrap();
    let ours = xent::candle::cross_entropy(x.as_tensor(), &t, &Options::default()).unwrap();
    let theirs = candle_nn::loss::cross_entropy(x.as_tensor(), &t).unwrap();
    let g_ours = ours.backward().unwrap();
    let g_theirs = theirs.backward().unwrap();
    let a = ours.to_scalar::<f32>().unwrap() as f64;
    let b = theirs.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (a - b).abs() < 1e-5 * b.abs(),
        "loss {a} against candle_nn's {b}"
    );
    let flat = |g: &candle_core::backprop::GradStore| -> Vec<f64> {
        g.get(x.as_tensor())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (ga, gb) = (flat(&g_ours), flat(&g_theirs));
    let scale = gb.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    close("grad against candle_nn", &ga, &gb, 1e-4, 1e-6 * scale).unwrap();
}

/// A tiny language model (embedding, then a linear head) trained for a few SGD steps twice from
/// the same weights: with xent's loss and with candle_nn's. The losses must track each other.
#[test]
fn optimizer_steps_with_xents_loss_track_candle_nns() {
    let Some(gpu) = cuda() else {
        return;
    };
    let (vocab, dim, rows) = (512, 64, 256);
    let init = |n: usize, seed: u64, scale: f32| -> Vec<f32> {
        logits(&[n], seed).iter().map(|x| x * scale / 4.0).collect()
    };
    let tokens: Vec<u32> = labels(rows + 1, vocab, 0, 9)
        .iter()
        .map(|&l| l as u32)
        .collect();
    let inputs = Tensor::from_vec(tokens[..rows].to_vec(), rows, &gpu).unwrap();
    let targets = Tensor::from_vec(tokens[1..].to_vec(), rows, &gpu).unwrap();
    let mut curves = Vec::new();
    for use_xent in [true, false] {
        let embed = Var::from_tensor(
            &Tensor::from_vec(init(vocab * dim, 1, 1.0), (vocab, dim), &gpu).unwrap(),
        )
        .unwrap();
        let head = Var::from_tensor(
            &Tensor::from_vec(init(vocab * dim, 2, 0.1), (vocab, dim), &gpu).unwrap(),
        )
        .unwrap();
        let mut curve = Vec::new();
        for _ in 0..6 {
            let hidden = embed.as_tensor().index_select(&inputs, 0).unwrap();
            let logits = hidden.matmul(&head.as_tensor().t().unwrap()).unwrap();
            let loss = if use_xent {
                xent::candle::cross_entropy(&logits, &targets, &Options::default()).unwrap()
            } else {
                candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
            };
            curve.push(loss.to_scalar::<f32>().unwrap());
            let grads = loss.backward().unwrap();
            for var in [&embed, &head] {
                let g = grads.get(var.as_tensor()).unwrap();
                let next = (var.as_tensor() - (g * 1.0).unwrap()).unwrap();
                var.set(&next).unwrap();
            }
        }
        curves.push(curve);
    }
    let (ours, theirs) = (&curves[0], &curves[1]);
    assert!(ours[5] < ours[0], "the loss did not go down: {ours:?}");
    for (step, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (a - b).abs() < 1e-3 * b.abs(),
            "step {step}: xent {a} against candle_nn {b} ({ours:?} / {theirs:?})"
        );
    }
}

/// Loss and the gradients of `upstream · loss` w.r.t. the hidden states and the weight through
/// `xent::candle::linear_cross_entropy` on `device`, as f64 vectors.
#[allow(clippy::too_many_arguments)]
fn linear_loss_and_grads(
    (hidden, weight): (&[f32], &[f32]),
    (dims, vocab): (&[usize], usize),
    dtype: DType,
    targets: &Tensor,
    opts: &Options,
    upstream: &[f32],
    device: &Device,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = *dims.last().unwrap();
    let var = |values: &[f32], shape: &[usize]| {
        let t = Tensor::from_vec(values.to_vec(), shape, device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        Var::from_tensor(&t).unwrap()
    };
    let (h, w) = (var(hidden, dims), var(weight, &[vocab, d]));
    let targets = targets.to_device(device).unwrap();
    let loss =
        xent::candle::linear_cross_entropy(h.as_tensor(), w.as_tensor(), &targets, opts).unwrap();
    let up = Tensor::from_vec(upstream.to_vec(), loss.shape(), device).unwrap();
    let grads = (loss.clone() * up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let to64 = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (gh, gw) = (
        grads
            .get(h.as_tensor())
            .expect("a gradient for the hidden states"),
        grads.get(w.as_tensor()).expect("a gradient for the weight"),
    );
    assert_eq!(
        (gh.dtype(), gw.dtype()),
        (dtype, dtype),
        "the gradients have the values' dtype"
    );
    (to64(&loss), to64(gh), to64(gw))
}

/// `linear_cross_entropy` on CUDA (xent's linear path: cuBLASLt GEMMs a chunk of rows at a time,
/// two-phase) against the same op on CPU tensors (the f64 reference, logits not rounded), f32
/// and bf16, every reduction, the loss options, class weights and the causal shift. The GPU
/// rounds the logits to the values' dtype, so bf16 is compared at the logits' rounding.
#[test]
fn cuda_linear_cross_entropy_matches_the_cpu_path() {
    let Some(gpu) = cuda() else {
        return;
    };
    let (d, vocab) = (64, 1003);
    let cases: Vec<(&str, Options)> = vec![
        ("mean", Options::default()),
        (
            "none",
            Options {
                reduction: Reduction::None,
                ..Options::default()
            },
        ),
        (
            "options",
            Options {
                reduction: Reduction::Sum,
                label_smoothing: 0.1,
                lse_square_scale: 1e-3,
                softcap: Some(5.0),
                grad_scale: 0.5,
                ..Options::default()
            },
        ),
        (
            "weights",
            Options {
                weight: Some((0..vocab).map(|j| 0.5 + (j % 3) as f32 * 0.5).collect()),
                label_smoothing: 0.05,
                ..Options::default()
            },
        ),
        (
            "causal",
            Options {
                causal_shift: true,
                ..Options::default()
            },
        ),
    ];
    let mut failures = Vec::new();
    for (name, opts) in cases {
        let dims: Vec<usize> = if opts.causal_shift {
            vec![3, 41, d]
        } else {
            vec![123, d]
        };
        let rows = dims[..dims.len() - 1].iter().product::<usize>();
        // Hidden states and weight of unit scale: logits of a few units.
        let scaled = |n: usize, seed: u64| -> Vec<f32> {
            logits(&[n], seed).iter().map(|x| x / 8.0).collect()
        };
        let (hidden, weight) = (scaled(rows * d, 21), scaled(vocab * d, 22));
        let ids = labels(rows, vocab, 7, 23);
        let targets = Tensor::from_vec(ids, &dims[..dims.len() - 1], &Device::Cpu).unwrap();
        let upstream: Vec<f32> = if opts.reduction == Reduction::None {
            (0..rows).map(|r| 0.25 + (r % 5) as f32 * 0.5).collect()
        } else {
            vec![0.75]
        };
        for dtype in [DType::F32, DType::BF16] {
            let run = |device: &Device| {
                linear_loss_and_grads(
                    (&hidden, &weight),
                    (&dims, vocab),
                    dtype,
                    &targets,
                    &opts,
                    &upstream,
                    device,
                )
            };
            let (loss_cpu, gh_cpu, gw_cpu) = run(&Device::Cpu);
            let (loss_gpu, gh_gpu, gw_gpu) = run(&gpu);
            // f32: xent's GEMMs compute in f32 (not TF32), so the sums differ in order only; bf16: the
            // logits are rounded to bf16 on the GPU (2^-8 of a few units), the gradients too.
            let (rtol, floor) = if dtype == DType::F32 {
                (1e-4, 1e-5)
            } else {
                (2e-2, 2e-2)
            };
            let scale = |g: &[f64]| g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let result = close("loss", &loss_gpu, &loss_cpu, rtol, rtol)
                .and_then(|()| {
                    close(
                        "grad_hidden",
                        &gh_gpu,
                        &gh_cpu,
                        rtol,
                        floor * scale(&gh_cpu),
                    )
                })
                .and_then(|()| {
                    close(
                        "grad_weight",
                        &gw_gpu,
                        &gw_cpu,
                        rtol,
                        floor * scale(&gw_cpu),
                    )
                });
            if let Err(msg) = result {
                failures.push(format!("{name} {dtype:?}: {msg}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The hidden states' gradient of `linear_cross_entropy` by blocks of the vocabulary (forced:
/// `XENT_CHUNK_ROWS=8` makes every block 8 classes, 251 of them at V = 2003) against the same
/// call in one block, in bf16 and f16, two-phase (`Reduction::None`, whose backward always goes
/// by blocks) and fused (the sum, whose chunks under 192 rows take the gradients by blocks; the
/// sum, not the mean, keeps f16's gradients clear of its subnormals).
/// Summed in f32 and rounded once, the two differ by at most one unit in the last place (two
/// roundings of nearly one value): at most 2·2⁻⁸ (bf16) or 2·2⁻¹¹ (f16) of the largest value,
/// the bound. Summed in the dtype, they differ by one rounding a block (session 61, the build
/// before: 3.8% of the largest value in bf16, 0.4-0.5% in f16). The weight's gradient is written
/// once a block, so it is held to the same bound.
///
/// The chunking is read from the environment for every call, so the blocked calls run in a
/// child process of this test alone (`XENT_CANDLE_BLOCKS_CHILD`), which sets it between them.
#[test]
fn cuda_linear_cross_entropy_sums_grad_hidden_over_vocabulary_blocks_in_f32() {
    const NAME: &str = "cuda_linear_cross_entropy_sums_grad_hidden_over_vocabulary_blocks_in_f32";
    let Some(gpu) = cuda() else {
        return;
    };
    if std::env::var_os("XENT_CANDLE_BLOCKS_CHILD").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env("XENT_CANDLE_BLOCKS_CHILD", "1")
            .env_remove("XENT_CHUNK_ROWS")
            .output()
            .expect("start the child");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // The child's lines (the harness may print its test's name in front of the first).
        let cases: Vec<&str> = text
            .lines()
            .filter_map(|l| l.find("by blocks, ").map(|i| &l[i..]))
            .collect();
        for line in &cases {
            println!("{line}");
        }
        assert!(out.status.success(), "the child failed:\n{text}");
        assert_eq!(cases.len(), 4, "the child's cases:\n{text}");
        return;
    }
    let (rows, d, vocab) = (400, 64, 2003);
    let scaled =
        |n: usize, seed: u64| -> Vec<f32> { logits(&[n], seed).iter().map(|x| x / 8.0).collect() };
    let (hidden, weight) = (scaled(rows * d, 31), scaled(vocab * d, 32));
    let ids = labels(rows, vocab, 7, 33);
    let targets = Tensor::from_vec(ids, rows, &Device::Cpu).unwrap();
    let cases = [
        (
            "none",
            Options {
                reduction: Reduction::None,
                ..Options::default()
            },
        ),
        (
            "sum",
            Options {
                reduction: Reduction::Sum,
                ..Options::default()
            },
        ),
    ];
    let run = |opts: &Options, dtype: DType| {
        let upstream: Vec<f32> = if opts.reduction == Reduction::None {
            (0..rows).map(|r| 0.25 + (r % 5) as f32 * 0.5).collect()
        } else {
            vec![0.75]
        };
        linear_loss_and_grads(
            (&hidden, &weight),
            (&[rows, d], vocab),
            dtype,
            &targets,
            opts,
            &upstream,
            &gpu,
        )
    };
    let largest = |g: &[f64]| g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let farthest = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
    };
    let mut failures = Vec::new();
    for (name, opts) in &cases {
        for (dtype, unit) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
            let (_, gh_one, gw_one) = run(opts, dtype);
            // SAFETY: this child process runs this test alone on one thread, and nothing else
            // in it reads the environment while it is set.
            unsafe { std::env::set_var("XENT_CHUNK_ROWS", "8") };
            let (_, gh_blocks, gw_blocks) = run(opts, dtype);
            unsafe { std::env::remove_var("XENT_CHUNK_ROWS") };
            let (scale_h, scale_w) = (largest(&gh_one), largest(&gw_one));
            let (off_h, off_w) = (
                farthest(&gh_blocks, &gh_one) / scale_h,
                farthest(&gw_blocks, &gw_one) / scale_w,
            );
            println!(
                "by blocks, {name} {dtype:?}: grad_hidden {off_h:.3e}, grad_weight {off_w:.3e} of \
                 the largest value apart (bound {:.3e})",
                2.0 * unit
            );
            if !(scale_h > 0.0 && off_h <= 2.0 * unit && off_w <= 2.0 * unit) {
                failures.push(format!(
                    "{name} {dtype:?}: by blocks against one block, grad_hidden {off_h:.3e} and \
                     grad_weight {off_w:.3e} of the largest value apart (bound {:.3e})",
                    2.0 * unit
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
