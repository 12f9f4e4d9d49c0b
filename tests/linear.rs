//! Linear layer + cross-entropy, the CPU side: the f64 reference (`xent::linear`) against finite
//! differences of its own loss and against xent's reference on materialised logits, the chunk
//! planner, and bad shapes; and the GPU path (cuBLASLt + xent's kernel per chunk) against the
//! same arithmetic done on the CPU.

use xent::linear::{self, LinearShape};
use xent::{DType, Error, Options, Reduction, cpu};

/// Values on a grid of 1/64, so that a perturbation of 1/128 is exact in f32.
fn grid(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state % 129) as f32 - 64.0) / 64.0
        })
        .collect()
}

fn option_sets() -> Vec<(&'static str, Options)> {
    let base = Options::default();
    vec![
        ("mean", base.clone()),
        (
            "sum",
            Options {
                reduction: Reduction::Sum,
                ..base.clone()
            },
        ),
        (
            "none",
            Options {
                reduction: Reduction::None,
                ..base.clone()
            },
        ),
        (
            "all",
            Options {
                label_smoothing: 0.1,
                lse_square_scale: 1e-2,
                softcap: Some(3.0),
                weight: Some(vec![0.5, 1.0, 2.0, 1.5, 0.25]),
                grad_scale: 0.5,
                ..base.clone()
            },
        ),
        (
            "causal",
            Options {
                causal_shift: true,
                label_smoothing: 0.2,
                ..base
            },
        ),
    ]
}

#[test]
fn reference_gradients_are_central_differences_of_its_loss() {
    let shape = LinearShape {
        batch: 2,
        seq_len: 3,
        hidden: 4,
        vocab: 5,
    };
    let labels: Vec<i64> = vec![1, 4, -100, 0, 2, 3];
    let hidden = grid(shape.rows() * shape.hidden, 1);
    let weight = grid(shape.vocab * shape.hidden, 2);
    let bias = grid(shape.vocab, 3);
    let eps = 1.0 / 128.0;
    for (name, opts) in option_sets() {
        let loss_of = |h: &[f32], w: &[f32], b: &[f32]| {
            let out = linear::cpu_forward_backward(h, w, Some(b), &labels, shape, &opts).unwrap();
            // The gradient is that of grad_scale * loss.
            out.loss.loss * opts.grad_scale as f64
        };
        let got =
            linear::cpu_forward_backward(&hidden, &weight, Some(&bias), &labels, shape, &opts)
                .unwrap();
        let check = |what: &str, analytic: &[f64], perturb: &dyn Fn(usize, f32) -> f64| {
            for (i, &a) in analytic.iter().enumerate() {
                let numeric = (perturb(i, eps) - perturb(i, -eps)) / (2.0 * eps as f64);
                assert!(
                    (numeric - a).abs() <= 2e-4 * (1.0 + a.abs()),
                    "{name}: d loss / d {what}[{i}]: central difference {numeric}, reference {a}"
                );
            }
        };
        check("hidden", &got.grad_hidden, &|i, e| {
            let mut h = hidden.clone();
            h[i] += e;
            loss_of(&h, &weight, &bias)
        });
        check("weight", &got.grad_weight, &|i, e| {
            let mut w = weight.clone();
            w[i] += e;
            loss_of(&hidden, &w, &bias)
        });
        check("bias", got.grad_bias.as_deref().unwrap(), &|i, e| {
            let mut b = bias.clone();
            b[i] += e;
            loss_of(&hidden, &weight, &b)
        });
    }
}

#[test]
fn reference_loss_is_xents_on_the_materialised_logits() {
    let shape = LinearShape::flat(7, 6, 5);
    let labels: Vec<i32> = vec![0, 1, 2, 3, 4, -100, 2];
    let hidden = grid(7 * 6, 4);
    let weight = grid(5 * 6, 5);
    for (name, opts) in option_sets() {
        let got =
            linear::cpu_forward_backward(&hidden, &weight, None, &labels, shape, &opts).unwrap();
        assert!(got.grad_bias.is_none());
        // Logits on the grid's products are exact in f32 (sums of at most 6 products of 1/64ths).
        let mut logits: Vec<f32> = (0..7)
            .flat_map(|r| {
                let (hidden, weight) = (&hidden, &weight);
                (0..5).map(move |j| (0..6).map(|k| hidden[r * 6 + k] * weight[j * 6 + k]).sum())
            })
            .collect();
        let want = cpu::forward_backward(&mut logits, &labels, shape.logits(), &opts).unwrap();
        let (a, b) = (got.loss.loss, want.loss);
        assert!(
            (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
            "{name}: loss {a} against {b}"
        );
        assert_eq!(got.loss.n_valid, want.n_valid, "{name}");
    }
}

#[test]
fn chunks_fit_the_budget_and_default_to_an_eighth_of_the_logits() {
    // 8192 x 128256 bf16: the logits are 2004 MiB; an eighth is 250 MiB = 1024 rows of 250.5 KiB.
    let rows = linear::chunk_rows(8192, 128256, DType::Bf16, None);
    assert_eq!(rows, 1024, "exactly an eighth of the rows");
    assert!(rows * 128256 * 2 <= 8192 * 128256 * 2 / 8);
    // Few rows: the 64 MiB floor, capped at the rows there are.
    assert_eq!(linear::chunk_rows(100, 128256, DType::Bf16, None), 100);
    assert_eq!(linear::chunk_rows(1, 32000, DType::F32, None), 1);
    // An explicit budget, and one below a row: still one row.
    assert_eq!(
        linear::chunk_rows(8192, 128256, DType::Bf16, Some(63 << 20)),
        256
    );
    assert_eq!(linear::chunk_rows(8192, 128256, DType::F32, Some(1000)), 1);
    assert_eq!(
        linear::chunk_rows(8192, 1000, DType::F32, Some(5 * 4000)),
        5
    );
    for rows in [1, 7, 8, 9, 1000, 8192, 16384] {
        for budget in [None, Some(1 << 20), Some(1 << 30)] {
            let chunk = linear::chunk_rows(rows, 32000, DType::Bf16, budget);
            assert!(
                (1..=rows).contains(&chunk),
                "{rows} rows, {budget:?}: {chunk}"
            );
        }
    }
}

#[test]
fn bad_linear_shapes_are_errors() {
    let shape = LinearShape::flat(2, 3, 4);
    let labels = [0i64, 1];
    let call = |h: usize, w: usize, b: Option<usize>, l: &[i64]| {
        let (hidden, weight, bias) = (vec![0f32; h], vec![0f32; w], vec![0f32; b.unwrap_or(0)]);
        let bias = b.map(|_| bias.as_slice());
        linear::cpu_forward_backward(&hidden, &weight, bias, l, shape, &Options::default())
    };
    assert!(call(6, 12, None, &labels).is_ok());
    assert!(matches!(
        call(5, 12, None, &labels),
        Err(Error::BadShape(_))
    ));
    assert!(matches!(
        call(6, 11, None, &labels),
        Err(Error::BadShape(_))
    ));
    assert!(matches!(
        call(6, 12, Some(3), &labels),
        Err(Error::BadShape(_))
    ));
    assert!(matches!(
        call(6, 12, None, &[0]),
        Err(Error::LabelsLength { .. })
    ));
    assert!(matches!(
        call(6, 12, None, &[0, 9]),
        Err(Error::LabelOutOfRange { .. })
    ));
    let no_features = LinearShape::flat(2, 0, 4);
    assert!(matches!(
        linear::cpu_forward_backward::<f32, i64>(
            &[],
            &[],
            None,
            &labels,
            no_features,
            &Options::default()
        ),
        Err(Error::BadShape(_))
    ));
}

/// The GPU path against the arithmetic it performs, done on the CPU: logits `h·Wᵀ + b` rounded to
/// `T` (the GEMM's output), xent's CPU reference on them (the gradient rounded to `T`, as the
/// kernel writes it), then the gradients' GEMMs in f64. The GPU's GEMMs accumulate in f32, so a
/// logit may round the other way: the tolerances below allow one unit of `T` in every term.
fn check_linear<T: xent::Element>(
    xent: &xent::CrossEntropy,
    blas: &xent::cublaslt::CublasLt,
    shape: LinearShape,
    with_bias: bool,
    labels: &[i64],
    opts: &Options,
    budget: Option<usize>,
) -> Result<(), String> {
    let stream = xent.context().default_stream();
    let (rows, d, v) = (shape.rows(), shape.hidden, shape.vocab);
    let to_t = |x: &[f32]| x.iter().map(|&f| T::from_f64(f as f64)).collect::<Vec<T>>();
    let hidden = to_t(&grid(rows * d, 11));
    let weight = to_t(&grid(v * d, 12));
    let bias = to_t(&grid(v, 13));
    // The CPU's version of the GPU's arithmetic.
    let mut logits: Vec<T> = (0..rows * v)
        .map(|i| {
            let (r, j) = (i / v, i % v);
            let dot: f64 = (0..d)
                .map(|k| hidden[r * d + k].to_f64() * weight[j * d + k].to_f64())
                .sum();
            T::from_f64(dot + if with_bias { bias[j].to_f64() } else { 0.0 })
        })
        .collect();
    let want = cpu::forward_backward(&mut logits, labels, shape.logits(), opts)
        .map_err(|e| e.to_string())?;
    let g = |r: usize, j: usize| logits[r * v + j].to_f64();
    let ulp = xent_tests::unit_roundoff(T::DTYPE) * 2.0;

    let d_hidden = stream.clone_htod(&hidden).unwrap();
    let d_weight = stream.clone_htod(&weight).unwrap();
    let d_bias = stream.clone_htod(&bias).unwrap();
    let d_labels = stream.clone_htod(labels).unwrap();
    let mut d_grad_hidden = stream.alloc_zeros::<T>(rows * d).unwrap();
    let mut d_grad_weight = stream.clone_htod(&vec![0.25f32; v * d]).unwrap(); // accumulated into
    let mut d_grad_bias = stream.clone_htod(&vec![0.5f32; v]).unwrap();
    let mut scratch = linear::LinearScratch::new(&stream, budget).unwrap();
    let mut out = xent::Loss::new(&stream, rows).unwrap();
    xent.linear_forward_backward(
        blas,
        &stream,
        (&d_hidden, &d_weight, with_bias.then_some(&d_bias)),
        &d_labels,
        shape,
        opts,
        (
            &mut d_grad_hidden,
            &mut d_grad_weight,
            with_bias.then_some(&mut d_grad_bias),
        ),
        &mut scratch,
        &mut out,
    )
    .map_err(|e| e.to_string())?;
    let loss = out.read().map_err(|e| e.to_string())? as f64;
    if (loss - want.loss).abs() > 1e-3 * (1.0 + want.loss.abs()) {
        return Err(format!("loss {loss} against {}", want.loss));
    }
    let grad_hidden = stream.clone_dtoh(&d_grad_hidden).unwrap();
    for r in 0..rows {
        for k in 0..d {
            let terms: Vec<f64> = (0..v)
                .map(|j| g(r, j) * weight[j * d + k].to_f64())
                .collect();
            let want: f64 = terms.iter().sum();
            let scale: f64 = terms.iter().map(|t| t.abs()).sum();
            let got = grad_hidden[r * d + k].to_f64();
            if (got - want).abs() > 4.0 * ulp * (scale + want.abs()) + 1e-30 {
                return Err(format!("grad_hidden[{r},{k}] {got} against {want}"));
            }
        }
    }
    let grad_weight = stream.clone_dtoh(&d_grad_weight).unwrap();
    for j in 0..v {
        for k in 0..d {
            let terms: Vec<f64> = (0..rows)
                .map(|r| g(r, j) * hidden[r * d + k].to_f64())
                .collect();
            let want = 0.25 + terms.iter().sum::<f64>();
            let scale: f64 = terms.iter().map(|t| t.abs()).sum();
            let got = grad_weight[j * d + k] as f64;
            if (got - want).abs() > 4.0 * ulp * scale + 1e-6 {
                return Err(format!("grad_weight[{j},{k}] {got} against {want}"));
            }
        }
    }
    if with_bias {
        let grad_bias = stream.clone_dtoh(&d_grad_bias).unwrap();
        for (j, &got) in grad_bias.iter().enumerate() {
            let terms: Vec<f64> = (0..rows).map(|r| g(r, j)).collect();
            let want = 0.5 + terms.iter().sum::<f64>();
            let scale: f64 = terms.iter().map(|t| t.abs()).sum();
            if (got as f64 - want).abs() > 4.0 * ulp * scale + 1e-6 {
                return Err(format!("grad_bias[{j}] {got} against {want}"));
            }
        }
    }
    Ok(())
}

#[test]
fn gpu_linear_cross_entropy_matches_the_same_arithmetic_on_the_cpu() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let blas = match xent::cublaslt::CublasLt::open(&[]) {
        Ok(blas) => blas,
        Err(err) => panic!("a GPU but no cuBLASLt (set XENT_CUBLASLT): {err}"),
    };
    let shape = LinearShape {
        batch: 2,
        seq_len: 37,
        hidden: 48,
        vocab: 1003,
    };
    let mut labels: Vec<i64> = (0..shape.rows() as i64).map(|r| (r * 37) % 1003).collect();
    labels[5] = -100;
    labels[40] = -100;
    let mut failures = Vec::new();
    for (name, opts) in option_sets() {
        let opts = match opts.weight {
            Some(_) => Options {
                weight: Some((0..1003).map(|j| 0.5 + (j % 4) as f32 * 0.5).collect()),
                ..opts
            },
            None => opts,
        };
        // Budgets: every row in one chunk, and chunks of 16 rows (the last one shorter).
        for budget in [None, Some(16 * 1003 * 2)] {
            for with_bias in [false, true] {
                let result = check_linear::<xent::half::bf16>(
                    xent, &blas, shape, with_bias, &labels, &opts, budget,
                )
                .and_then(|()| {
                    check_linear::<f32>(xent, &blas, shape, with_bias, &labels, &opts, budget)
                });
                if let Err(msg) = result {
                    failures.push(format!("{name} budget {budget:?} bias {with_bias}: {msg}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
