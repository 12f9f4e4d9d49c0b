//! cuBLASLt opened at run time (`xent::cublaslt`): where it is looked for and what a miss says
//! (CPU), and each GEMM shape of linear + cross-entropy against an f64 GEMM (GPU; on the GPU
//! machine `XENT_CUBLASLT` points at PyTorch's cuBLAS wheel, see run.sh).

use std::path::PathBuf;

use xent::cublaslt::{self, CublasLt, FILE_NAMES, Gemm, Operand};
use xent::cudarc::driver::DevicePtr;
use xent::half::bf16;
use xent::{DType, Element, Error};
use xent_tests::gpu;

#[test]
fn candidates_are_the_variable_then_the_folders_then_the_loader_path() {
    let dirs = [PathBuf::from("/a"), PathBuf::from("/b")];
    let tries = cublaslt::candidates(Some("/x/libcublasLt.so.13"), &dirs);
    let mut want = vec![PathBuf::from("/x/libcublasLt.so.13")];
    for dir in ["/a", "/b"] {
        want.extend(FILE_NAMES.iter().map(|name| PathBuf::from(dir).join(name)));
    }
    want.extend(FILE_NAMES.iter().map(PathBuf::from));
    assert_eq!(tries, want);
    // A folder in the variable is searched like the others; an empty one is ignored.
    let dir = std::env::temp_dir();
    let tries = cublaslt::candidates(dir.to_str(), &[]);
    assert_eq!(tries[0], dir.join(FILE_NAMES[0]));
    assert_eq!(cublaslt::candidates(Some(""), &[]).len(), FILE_NAMES.len());
}

#[test]
fn a_missing_library_is_an_error_that_lists_what_was_tried() {
    match CublasLt::open(&[PathBuf::from("/nonexistent-xent-dir")]) {
        Err(Error::LibraryNotFound { library, tried, .. }) => {
            assert_eq!(library, "cuBLASLt");
            let wanted = "/nonexistent-xent-dir/libcublasLt.so.13";
            assert!(tried.iter().any(|t| t.starts_with(wanted)), "{tried:?}");
            let message = CublasLt::open(&[]).unwrap_err().to_string();
            assert!(message.contains("XENT_CUBLASLT"), "{message}");
        }
        // Found (on the loader's path or through XENT_CUBLASLT) and loaded with every entry point,
        // but no device to make a handle on: seen here with PyTorch's libcublasLt.so.13.
        Err(Error::Driver(msg)) if msg.starts_with("cublasLtCreate") => eprintln!("{msg}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(lib) => eprintln!("cuBLASLt found at {}", lib.path().display()),
    }
}

fn operand(dtype: DType, rows: usize, cols: usize, transposed: bool) -> Operand {
    Operand {
        ptr: 0,
        dtype,
        rows,
        cols,
        ld: cols,
        transposed,
    }
}

#[test]
fn gemm_shapes_are_checked() {
    let a = operand(DType::Bf16, 4, 3, false);
    let b = operand(DType::Bf16, 5, 3, true);
    let out = operand(DType::F32, 4, 5, false);
    let gemm = Gemm {
        a,
        b,
        out,
        alpha: 1.0,
        beta: 0.0,
        bias: 0,
    };
    assert_eq!(gemm.dims().unwrap(), (4, 3, 5));
    let bad_inner = Gemm {
        b: operand(DType::Bf16, 5, 2, true),
        ..gemm
    };
    assert!(matches!(bad_inner.dims(), Err(Error::BadShape(_))));
    let bad_out = Gemm {
        out: operand(DType::F32, 5, 4, false),
        ..gemm
    };
    assert!(matches!(bad_out.dims(), Err(Error::BadShape(_))));
    let bad_ld = Gemm {
        a: Operand { ld: 2, ..a },
        ..gemm
    };
    assert!(matches!(bad_ld.dims(), Err(Error::BadShape(_))));
}

#[test]
fn alignment_is_what_the_address_and_the_row_pitch_keep() {
    let at = |ptr, ld| {
        cublaslt::alignment(&Operand {
            ptr,
            ld,
            ..operand(DType::Bf16, 2, 3, false)
        })
    };
    assert_eq!(at(0x1000, 128), 256);
    assert_eq!(at(0x1000, 3), 2);
    assert_eq!(at(0x1008, 128), 8);
    assert_eq!(at(0x1002, 128), 2);
}

/// Row-major `[rows, cols]` values on a grid of 1/16 (exact in bf16).
fn values(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
    let mut rng = xent_tests::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..rows * cols)
        .map(|_| (rng.below(33) as f64 - 16.0) / 16.0)
        .collect()
}

/// `op(X)[i, j]` of a row-major `[rows, cols]` matrix.
fn at(x: &[f64], cols: usize, transposed: bool, i: usize, j: usize) -> f64 {
    if transposed {
        x[j * cols + i]
    } else {
        x[i * cols + j]
    }
}

/// One GEMM `out = alpha·op(A)·op(B) + beta·out` on the GPU against f64.
#[allow(clippy::too_many_arguments)]
fn check_gemm<T: Element>(
    lib: &CublasLt,
    xent: &xent::CrossEntropy,
    (m, k, n): (usize, usize, usize),
    (ta, tb): (bool, bool),
    beta: f32,
) {
    let stream = xent.context().default_stream();
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    let (a, b, c) = (values(ar, ac, 1), values(br, bc, 2), values(m, n, 3));
    let to_t = |x: &[f64]| x.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>();
    let d_a = stream.clone_htod(&to_t(&a)).unwrap();
    let d_b = stream.clone_htod(&to_t(&b)).unwrap();
    let c32: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let d_out = stream.clone_htod(&c32).unwrap();
    let workspace = stream.alloc_zeros::<u8>(32 << 20).unwrap();
    let alpha = 0.5f32;
    {
        let (pa, _ga) = d_a.device_ptr(&stream);
        let (pb, _gb) = d_b.device_ptr(&stream);
        let (po, _go) = d_out.device_ptr(&stream);
        let (pw, _gw) = workspace.device_ptr(&stream);
        let gemm = Gemm {
            a: Operand {
                ptr: pa,
                ..operand(T::DTYPE, ar, ac, ta)
            },
            b: Operand {
                ptr: pb,
                ..operand(T::DTYPE, br, bc, tb)
            },
            out: Operand {
                ptr: po,
                ..operand(DType::F32, m, n, false)
            },
            alpha,
            beta,
            bias: 0,
        };
        unsafe { lib.matmul(stream.cu_stream(), &gemm, (pw, 32 << 20)) }.unwrap();
    }
    let got = stream.clone_dtoh(&d_out).unwrap();
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|p| at(&a, ac, ta, i, p) * at(&b, bc, tb, p, j))
                .sum();
            let want = alpha as f64 * dot + beta as f64 * c[i * n + j];
            let g = got[i * n + j] as f64;
            // Exact inputs, f32 accumulation of at most k products of 1/256ths.
            assert!(
                (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{} [{m},{k}]x[{k},{n}] ta={ta} tb={tb} beta={beta}: [{i},{j}] {g} != {want}",
                T::DTYPE.name()
            );
        }
    }
}

/// cuBLASLt on a GPU machine, or `None` (skipped) without one; with `XENT_REQUIRE_GPU=1` a
/// missing library fails the test.
fn cublaslt() -> Option<(&'static xent::CrossEntropy, CublasLt)> {
    let xent = gpu()?;
    match CublasLt::open(&[]) {
        Ok(lib) => Some((xent, lib)),
        Err(err) if std::env::var("XENT_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("XENT_REQUIRE_GPU=1 but {err}")
        }
        Err(err) => {
            eprintln!("SKIPPED: {err}");
            None
        }
    }
}

/// N = 67 rows, D = 40 features, V = 129 classes.
const SHAPE: (usize, usize, usize) = (67, 40, 129);

/// The linear path's GEMMs at [`SHAPE`], with `beta`: logits = h·Wᵀ, grad_hidden = G·W and
/// grad_weight (+)= Gᵀ·h in bf16, the logits in f32 too.
fn linear_gemms(lib: &CublasLt, xent: &xent::CrossEntropy, beta: f32) {
    let (rows, d, v) = SHAPE;
    check_gemm::<bf16>(lib, xent, (rows, d, v), (false, true), beta);
    check_gemm::<bf16>(lib, xent, (rows, v, d), (false, false), beta);
    check_gemm::<bf16>(lib, xent, (v, rows, d), (true, false), beta);
    check_gemm::<f32>(lib, xent, (rows, d, v), (false, true), beta);
}

#[test]
fn the_gemms_of_linear_cross_entropy_match_f64() {
    let Some((xent, lib)) = cublaslt() else {
        return;
    };
    for beta in [0.0, 1.0] {
        linear_gemms(&lib, xent, beta);
    }
}

#[test]
fn tuned_gemms_match_f64_and_keep_one_algorithm_per_shape() {
    let Some((xent, lib)) = cublaslt() else {
        return;
    };
    let (rows, d, v) = SHAPE;
    // Off: nothing is timed or kept.
    lib.set_tuning(Some(false));
    check_gemm::<bf16>(&lib, xent, (rows, d, v), (false, true), 0.0);
    assert_eq!(lib.tuned_shapes(), 0);
    // On: each shape's beta-0 GEMM times the candidates (each run several times, which must
    // leave the result of one run) and keeps the fastest; the beta-1 GEMMs after it accumulate
    // with that algorithm. Four shapes: the three of the linear path in bf16, one in f32.
    lib.set_tuning(Some(true));
    for beta in [0.0, 1.0] {
        linear_gemms(&lib, xent, beta);
    }
    assert_eq!(lib.tuned_shapes(), 4);
    // A shape met first with beta 1 is not timed (its output would be added to again).
    check_gemm::<bf16>(&lib, xent, (rows + 8, d, v), (false, true), 1.0);
    assert_eq!(lib.tuned_shapes(), 4);
}
