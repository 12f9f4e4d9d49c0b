//! cuBLASLt, opened at run time: the GEMMs of linear + cross-entropy (issue 12), the one place
//! where a kernel is not xent's own. cudarc 0.19 built for CUDA 12 never asks the loader for
//! `libcublasLt.so.13`, the file of the CUDA 13 wheels PyTorch installs, and its loader panics
//! when it finds nothing; this one searches where those libraries live and says what it tried.
//! The types (handles, the heuristic result, enum values) are cudarc's bindings.
//!
//! On the H200 (PyTorch's `nvidia/cu13/lib/libcublasLt.so.13`), `tests/gemm.rs` checks each of the
//! linear path's GEMM shapes against f64, and `tests/linear.rs` the whole path.

use std::ffi::{c_int, c_void};
use std::path::{Path, PathBuf};

use cudarc::cublaslt::sys as lt;
use libloading::Library;

use crate::error::{Error, Result};
use crate::options::DType;

/// An environment variable naming the cuBLASLt library file, or a folder holding it; tried first.
pub const CUBLASLT_ENV: &str = "XENT_CUBLASLT";

/// The file names tried in each folder and then on the loader's own path, newest CUDA first.
pub const FILE_NAMES: [&str; 3] = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"];

/// What to try, in order: `$XENT_CUBLASLT` (`env`: a file, or a folder searched for
/// [`FILE_NAMES`]), each of `dirs` searched for [`FILE_NAMES`], then the bare names (the
/// loader's path: `LD_LIBRARY_PATH`, the system's folders).
pub fn candidates(env: Option<&str>, dirs: &[PathBuf]) -> Vec<PathBuf> {
    crate::dylib::candidates(env, dirs.iter().cloned(), &FILE_NAMES)
}

type Status = lt::cublasStatus_t;

/// The entry points used, by the signatures of cudarc's bindings.
struct Fns {
    create: unsafe extern "C" fn(*mut lt::cublasLtHandle_t) -> Status,
    destroy: unsafe extern "C" fn(lt::cublasLtHandle_t) -> Status,
    desc_create: unsafe extern "C" fn(
        *mut lt::cublasLtMatmulDesc_t,
        lt::cublasComputeType_t,
        lt::cudaDataType,
    ) -> Status,
    desc_destroy: unsafe extern "C" fn(lt::cublasLtMatmulDesc_t) -> Status,
    desc_set: unsafe extern "C" fn(
        lt::cublasLtMatmulDesc_t,
        lt::cublasLtMatmulDescAttributes_t,
        *const c_void,
        usize,
    ) -> Status,
    layout_create: unsafe extern "C" fn(
        *mut lt::cublasLtMatrixLayout_t,
        lt::cudaDataType,
        u64,
        u64,
        i64,
    ) -> Status,
    layout_destroy: unsafe extern "C" fn(lt::cublasLtMatrixLayout_t) -> Status,
    pref_create: unsafe extern "C" fn(*mut lt::cublasLtMatmulPreference_t) -> Status,
    pref_destroy: unsafe extern "C" fn(lt::cublasLtMatmulPreference_t) -> Status,
    pref_set: unsafe extern "C" fn(
        lt::cublasLtMatmulPreference_t,
        lt::cublasLtMatmulPreferenceAttributes_t,
        *const c_void,
        usize,
    ) -> Status,
    heuristic: unsafe extern "C" fn(
        lt::cublasLtHandle_t,
        lt::cublasLtMatmulDesc_t,
        lt::cublasLtMatrixLayout_t,
        lt::cublasLtMatrixLayout_t,
        lt::cublasLtMatrixLayout_t,
        lt::cublasLtMatrixLayout_t,
        lt::cublasLtMatmulPreference_t,
        c_int,
        *mut lt::cublasLtMatmulHeuristicResult_t,
        *mut c_int,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    matmul: unsafe extern "C" fn(
        lt::cublasLtHandle_t,
        lt::cublasLtMatmulDesc_t,
        *const c_void,
        *const c_void,
        lt::cublasLtMatrixLayout_t,
        *const c_void,
        lt::cublasLtMatrixLayout_t,
        *const c_void,
        *const c_void,
        lt::cublasLtMatrixLayout_t,
        *mut c_void,
        lt::cublasLtMatrixLayout_t,
        *const lt::cublasLtMatmulAlgo_t,
        *mut c_void,
        usize,
        lt::cudaStream_t,
    ) -> Status,
}

impl Fns {
    /// Every entry point of `lib`, or the name of the first one missing.
    fn of(lib: &Library) -> std::result::Result<Fns, String> {
        // SAFETY: each symbol is looked up by its C name and given the signature of cudarc's
        // binding of that function.
        unsafe {
            macro_rules! get {
                ($name:literal) => {
                    *lib.get($name.as_bytes())
                        .map_err(|err| format!("{}: {err}", $name))?
                };
            }
            Ok(Fns {
                create: get!("cublasLtCreate"),
                destroy: get!("cublasLtDestroy"),
                desc_create: get!("cublasLtMatmulDescCreate"),
                desc_destroy: get!("cublasLtMatmulDescDestroy"),
                desc_set: get!("cublasLtMatmulDescSetAttribute"),
                layout_create: get!("cublasLtMatrixLayoutCreate"),
                layout_destroy: get!("cublasLtMatrixLayoutDestroy"),
                pref_create: get!("cublasLtMatmulPreferenceCreate"),
                pref_destroy: get!("cublasLtMatmulPreferenceDestroy"),
                pref_set: get!("cublasLtMatmulPreferenceSetAttribute"),
                heuristic: get!("cublasLtMatmulAlgoGetHeuristic"),
                matmul: get!("cublasLtMatmul"),
            })
        }
    }
}

fn check(status: Status, what: &str) -> Result<()> {
    match status {
        lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        other => Err(Error::Driver(format!("{what}: {other:?}"))),
    }
}

/// A cuBLASLt library and handle.
pub struct CublasLt {
    fns: Fns,
    handle: lt::cublasLtHandle_t,
    /// The file that loaded.
    path: PathBuf,
    /// Kept loaded while `fns` point into it; dropped last.
    _lib: Library,
}

// SAFETY: a cuBLASLt handle may be used from any thread (calls with it on different streams may
// run concurrently, as NVIDIA's documentation states for cublasLt handles); the function
// pointers are plain code addresses.
unsafe impl Send for CublasLt {}
unsafe impl Sync for CublasLt {}

impl std::fmt::Debug for CublasLt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CublasLt")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for CublasLt {
    fn drop(&mut self) {
        // SAFETY: the handle was made by `cublasLtCreate` of this library, which is still loaded.
        unsafe { (self.fns.destroy)(self.handle) };
    }
}

/// One operand of a [`Gemm`], as stored: a row-major `[rows, cols]` matrix `ld` elements between
/// rows, used as is or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub transposed: bool,
}

/// `D = alpha · op(A) · op(B) + beta · C (+ bias)` in row-major terms, `D` `[m, n]` written over
/// `C` (`out`, which may be f32 while `A` and `B` are 16-bit), f32 accumulation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub a: Operand,
    pub b: Operand,
    /// `[m, n]`, row-major; `transposed` must be false.
    pub out: Operand,
    pub alpha: f32,
    pub beta: f32,
    /// `[n]` values of `out`'s dtype added to every row of `D` (cuBLASLt's bias epilogue), or 0.
    pub bias: u64,
}

fn data_type(dtype: DType) -> lt::cudaDataType {
    match dtype {
        DType::F32 => lt::cudaDataType::CUDA_R_32F,
        DType::F16 => lt::cudaDataType::CUDA_R_16F,
        DType::Bf16 => lt::cudaDataType::CUDA_R_16BF,
    }
}

impl Gemm {
    /// `(m, k, n)` of `op(A)·op(B)`, or the mismatch.
    pub fn dims(&self) -> Result<(usize, usize, usize)> {
        let op = |o: &Operand| {
            if o.transposed {
                (o.cols, o.rows)
            } else {
                (o.rows, o.cols)
            }
        };
        let ((m, k), (k2, n)) = (op(&self.a), op(&self.b));
        let bad = |msg: String| Err(Error::BadShape(msg));
        if k != k2 {
            return bad(format!("GEMM inner sizes differ: {k} and {k2}"));
        }
        if self.out.transposed || (self.out.rows, self.out.cols) != (m, n) {
            return bad(format!(
                "GEMM output is [{}, {}], op(A)·op(B) is [{m}, {n}]",
                self.out.rows, self.out.cols
            ));
        }
        for (name, o) in [("A", &self.a), ("B", &self.b), ("D", &self.out)] {
            if o.ld < o.cols {
                return bad(format!(
                    "GEMM operand {name}: ld {} < {} columns",
                    o.ld, o.cols
                ));
            }
        }
        Ok((m, k, n))
    }
}

impl CublasLt {
    /// Loads cuBLASLt from the first of [`candidates`] (`$XENT_CUBLASLT`, `dirs`, the loader's
    /// path) that has every entry point, and makes a handle. `Error::LibraryNotFound` lists what
    /// was tried and why each failed.
    pub fn open(dirs: &[PathBuf]) -> Result<CublasLt> {
        let env = std::env::var(CUBLASLT_ENV).ok();
        let opened = crate::dylib::open_first(candidates(env.as_deref(), dirs), Fns::of);
        match opened {
            Ok((lib, path, fns)) => {
                let mut handle = std::ptr::null_mut();
                // SAFETY: `create` writes one handle.
                check(unsafe { (fns.create)(&mut handle) }, "cublasLtCreate")?;
                Ok(CublasLt {
                    fns,
                    handle,
                    path,
                    _lib: lib,
                })
            }
            Err(tried) => Err(Error::LibraryNotFound {
                library: "cuBLASLt",
                hint: format!(
                    "set {CUBLASLT_ENV} to the file or its folder (PyTorch's: site-packages/nvidia/\
                 cublas/lib, or nvidia/cu13/lib)"
                ),
                tried,
            }),
        }
    }

    /// The file that loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Enqueues `gemm` on `stream` with `workspace` (address, bytes; cuBLASLt picks an algorithm
    /// that fits it).
    ///
    /// # Safety
    /// Every operand's address must be device memory of the stream's context holding its
    /// `[rows, cols]` with stride `ld`, live until the GEMM has run; `stream` a valid stream.
    pub unsafe fn matmul(
        &self,
        stream: cudarc::driver::sys::CUstream,
        gemm: &Gemm,
        workspace: (u64, usize),
    ) -> Result<()> {
        let (m, k, n) = gemm.dims()?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Row-major D = op(A)·op(B) is column-major Dᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major [r, c]
        // matrix in memory is the column-major [c, r] one: so cuBLASLt multiplies B's memory by
        // A's, each transposed when its operand is, into Dᵀ of n rows and m columns.
        let f = &self.fns;
        let compute = lt::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let scale = lt::cudaDataType::CUDA_R_32F;
        let mut desc = std::ptr::null_mut();
        check(
            unsafe { (f.desc_create)(&mut desc, compute, scale) },
            "cublasLtMatmulDescCreate",
        )?;
        let guard = Cleanup(Some(|| unsafe {
            (f.desc_destroy)(desc);
        }));
        // `cublasOperation_t` (cublas_api.h; not in cudarc's cuBLASLt bindings): an `int`,
        // `CUBLAS_OP_N` = 0, `CUBLAS_OP_T` = 1.
        let op = |transposed: bool| -> i32 { transposed as i32 };
        let set = |attr, value: i32| {
            check(
                unsafe { (f.desc_set)(desc, attr, (&value as *const i32).cast(), 4) },
                "cublasLtMatmulDescSetAttribute",
            )
        };
        use lt::cublasLtMatmulDescAttributes_t as Attr;
        set(Attr::CUBLASLT_MATMUL_DESC_TRANSA, op(gemm.b.transposed))?;
        set(Attr::CUBLASLT_MATMUL_DESC_TRANSB, op(gemm.a.transposed))?;
        if gemm.bias != 0 {
            // The bias epilogue adds a vector along the rows of column-major Dᵀ: one value per
            // column of row-major D.
            let epilogue = lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as i32;
            set(Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue)?;
            let bias = gemm.bias;
            check(
                unsafe {
                    (f.desc_set)(
                        desc,
                        Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        (&bias as *const u64).cast(),
                        8,
                    )
                },
                "cublasLtMatmulDescSetAttribute(BIAS_POINTER)",
            )?;
        }
        // All three made before any is checked, so the clean-up below frees whichever were.
        let made: Vec<(Status, lt::cublasLtMatrixLayout_t)> = [&gemm.b, &gemm.a, &gemm.out]
            .into_iter()
            .map(|o| {
                let mut layout = std::ptr::null_mut();
                let status = unsafe {
                    (f.layout_create)(
                        &mut layout,
                        data_type(o.dtype),
                        o.cols as u64,
                        o.rows as u64,
                        o.ld as i64,
                    )
                };
                (status, layout)
            })
            .collect();
        let layouts: Vec<_> = made.iter().map(|&(_, layout)| layout).collect();
        let layouts_guard = Cleanup(Some(|| {
            for &layout in layouts.iter().filter(|l| !l.is_null()) {
                unsafe { (f.layout_destroy)(layout) };
            }
        }));
        for &(status, _) in &made {
            check(status, "cublasLtMatrixLayoutCreate")?;
        }
        let (lb, la, ld) = (layouts[0], layouts[1], layouts[2]);
        let mut pref = std::ptr::null_mut();
        check(
            unsafe { (f.pref_create)(&mut pref) },
            "cublasLtMatmulPreferenceCreate",
        )?;
        let pref_guard = Cleanup(Some(|| unsafe {
            (f.pref_destroy)(pref);
        }));
        let bytes = workspace.1 as u64;
        check(
            unsafe {
                (f.pref_set)(
                    pref,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&bytes as *const u64).cast(),
                    8,
                )
            },
            "cublasLtMatmulPreferenceSetAttribute",
        )?;
        // cuBLASLt assumes 256-byte aligned matrices unless told otherwise: tell it what each one
        // has (its address and row pitch), so no algorithm needing more is picked. cuBLASLt's A
        // is our B, its B our A.
        use lt::cublasLtMatmulPreferenceAttributes_t as Pref;
        for (attr, o) in [
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &gemm.b),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &gemm.a),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &gemm.out),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &gemm.out),
        ] {
            let align = alignment(o);
            check(
                unsafe { (f.pref_set)(pref, attr, (&align as *const u32).cast(), 4) },
                "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)",
            )?;
        }
        // SAFETY: a plain C struct of integers; all zero is a valid value to be overwritten.
        let mut result: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        let mut found: c_int = 0;
        check(
            unsafe {
                (f.heuristic)(
                    self.handle,
                    desc,
                    lb,
                    la,
                    ld,
                    ld,
                    pref,
                    1,
                    &mut result,
                    &mut found,
                )
            },
            "cublasLtMatmulAlgoGetHeuristic",
        )?;
        if found == 0 {
            return Err(Error::Driver(format!(
                "cuBLASLt has no algorithm for a [{m}, {k}] x [{k}, {n}] GEMM within {} bytes of \
                 workspace",
                workspace.1
            )));
        }
        let out = gemm.out.ptr as *mut c_void;
        check(
            unsafe {
                (f.matmul)(
                    self.handle,
                    desc,
                    (&gemm.alpha as *const f32).cast(),
                    gemm.b.ptr as *const c_void,
                    lb,
                    gemm.a.ptr as *const c_void,
                    la,
                    (&gemm.beta as *const f32).cast(),
                    out,
                    ld,
                    out,
                    ld,
                    &result.algo,
                    workspace.0 as *mut c_void,
                    workspace.1,
                    stream as lt::cudaStream_t,
                )
            },
            "cublasLtMatmul",
        )?;
        drop(pref_guard);
        drop(layouts_guard);
        drop(guard);
        Ok(())
    }
}

/// The alignment in bytes an operand keeps on every row: the largest power of two, at most 256,
/// dividing its address and its row pitch.
pub fn alignment(o: &Operand) -> u32 {
    let pitch = (o.ld * o.dtype.bytes()) as u64;
    let bits = o.ptr | pitch | 256;
    (bits & bits.wrapping_neg()) as u32
}

/// Runs its closure when dropped (descriptor clean-up on every return path).
struct Cleanup<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for Cleanup<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}
