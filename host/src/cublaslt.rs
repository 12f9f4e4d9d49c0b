//! cuBLASLt, opened at run time: the GEMMs of linear + cross-entropy (issue 12), the one place
//! where a kernel is not xent's own. cudarc 0.19 built for CUDA 12 never asks the loader for
//! `libcublasLt.so.13`, the file of the CUDA 13 wheels PyTorch installs, and its loader panics
//! when it finds nothing; this one searches where those libraries live and says what it tried.
//! The types (handles, the heuristic result, enum values) are cudarc's bindings.
//!
//! On the H200 (PyTorch's `nvidia/cu13/lib/libcublasLt.so.13`), `tests/gemm.rs` checks each of the
//! linear path's GEMM shapes against f64, and `tests/linear.rs` the whole path.

use crate::setting::Setting;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
    /// The algorithm chosen for each GEMM shape: cuBLASLt's heuristic choice (asked once per
    /// shape), or the fastest timed ([`CublasLt::set_tuning`]).
    algos: Mutex<HashMap<AlgoKey, lt::cublasLtMatmulAlgo_t>>,
    /// [`CublasLt::set_tuning`]: `None` follows [`tuning_env`].
    tune: Setting,
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
                    algos: Mutex::new(HashMap::new()),
                    tune: Setting::default(),
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

    /// Autotuning of this handle's GEMMs: `Some(true)` on, `Some(false)` off, `None` (the
    /// default) as `XENT_GEMM_TUNE` says ([`tuning_env`]). When on, the first GEMM of each shape
    /// (operands' sizes, types, layouts and alignments, bias, workspace) with `beta` 0, outside
    /// graph capture, runs each of cuBLASLt's first [`MAX_ALGOS`] heuristic choices
    /// [`TUNE_RUNS`] times, timed with events (the host waits for them), and the fastest serves
    /// every later GEMM of that shape, `beta` 1 included (the weight gradient's accumulation
    /// takes the algorithm its first chunk timed). With a 16-bit output only algorithms that
    /// reduce split sums in f32 are candidates (no extra rounding to the output's type). Shapes
    /// met first with `beta` 1 keep cuBLASLt's first choice until a `beta` 0 GEMM of theirs
    /// comes. Off by default: the first call of each shape waits, and a choice made by timing may
    /// differ between processes, and with it the rounding of the sums: cuBLASLt's candidates do not
    /// all round a 16-bit logit alike (with a bias, its 2nd to 8th choices for a `[74, 192]` block
    /// of logits on an H200 gave other bf16 values than its first; `tests/linear.rs`).
    pub fn set_tuning(&self, on: Option<bool>) {
        self.tune.set(on);
    }

    /// Whether this handle's GEMMs are tuned now ([`set_tuning`](Self::set_tuning)).
    pub fn tuning(&self) -> bool {
        self.tune.get().unwrap_or_else(tuning_env)
    }

    /// How many GEMM shapes have a tuned algorithm.
    pub fn tuned_shapes(&self) -> usize {
        self.algos.lock().map_or(0, |algos| {
            algos
                .keys()
                .filter(|key| key.choice == Choice::Tuned)
                .count()
        })
    }

    /// Enqueues `gemm` on `stream` with `workspace` (address, bytes; cuBLASLt picks an algorithm
    /// that fits it, asked once per shape and kept: a chunked linear call makes the same few
    /// GEMMs dozens of times).
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
        // SAFETY: the caller's promises.
        unsafe { self.matmul_on_sms(stream, gemm, workspace, 0) }
    }

    /// [`matmul`](Self::matmul) with cuBLASLt told to plan for `sms` SMs
    /// (`CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET`; 0: the whole device), for a GEMM that shares the
    /// device with another one on a second stream: its persistent kernels then launch that many
    /// CTAs and leave the other SMs to the other GEMM.
    ///
    /// # Safety
    /// As [`matmul`](Self::matmul).
    pub unsafe fn matmul_on_sms(
        &self,
        stream: cudarc::driver::sys::CUstream,
        gemm: &Gemm,
        workspace: (u64, usize),
        sms: u32,
    ) -> Result<()> {
        let (m, _, n) = gemm.dims()?;
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
        if sms > 0 {
            set(
                Attr::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET,
                sms.min(i32::MAX as u32) as i32,
            )?;
        }
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
        // SAFETY (every `matmul` call below): the caller's contract on the operands, workspace
        // and stream; `desc` and the layouts describe them.
        let run = |algo: &lt::cublasLtMatmulAlgo_t| unsafe {
            (f.matmul)(
                self.handle,
                desc,
                (&gemm.alpha as *const f32).cast(),
                gemm.b.ptr as *const c_void,
                lb,
                gemm.a.ptr as *const c_void,
                la,
                (&gemm.beta as *const f32).cast(),
                gemm.out.ptr as *const c_void,
                ld,
                gemm.out.ptr as *mut c_void,
                ld,
                algo,
                workspace.0 as *mut c_void,
                workspace.1,
                stream as lt::cudaStream_t,
            )
        };
        let tune = self.tuning();
        let pick = algo_override(gemm);
        let key = AlgoKey {
            shape: ShapeKey::of(gemm, workspace.1, sms),
            choice: if tune {
                Choice::Tuned
            } else {
                Choice::Heuristic(pick)
            },
        };
        let cached = self
            .algos
            .lock()
            .map_err(|_| poisoned())?
            .get(&key)
            .copied();
        let algo = match cached {
            Some(algo) => algo,
            None => {
                let wanted = if tune { MAX_ALGOS } else { pick + 1 };
                // SAFETY: `desc` and the layouts are live until the guards below run.
                let found = unsafe {
                    self.heuristics(desc, [lb, la, ld], gemm, workspace.1, wanted, tune)
                }?;
                // Timing runs the GEMM several times: only when that leaves the result as one
                // run would (beta 0: D is overwritten, not added to) and nothing is captured. A
                // heuristic choice is kept as it is.
                let keep = !tune || (gemm.beta == 0.0 && !capturing(stream)?);
                let algo = match tune && keep {
                    true => fastest(&found, &run, stream)?,
                    false => found[pick.min(found.len() - 1)],
                };
                if keep {
                    self.algos.lock().map_err(|_| poisoned())?.insert(key, algo);
                }
                algo
            }
        };
        check(run(&algo), "cublasLtMatmul")?;
        drop(layouts_guard);
        drop(guard);
        Ok(())
    }

    /// cuBLASLt's first `wanted` usable algorithms for `desc` over the layouts `[B, A, D]` of
    /// `gemm` (in cuBLASLt's order: its A is our B) within `workspace` bytes; with `tune` and a
    /// 16-bit output, only those that reduce split sums in f32. At least one, or an error.
    ///
    /// # Safety
    /// `desc` and the layouts must be live descriptors of this library.
    unsafe fn heuristics(
        &self,
        desc: lt::cublasLtMatmulDesc_t,
        [lb, la, ld]: [lt::cublasLtMatrixLayout_t; 3],
        gemm: &Gemm,
        workspace: usize,
        wanted: usize,
        tune: bool,
    ) -> Result<Vec<lt::cublasLtMatmulAlgo_t>> {
        let f = &self.fns;
        let mut pref = std::ptr::null_mut();
        check(
            unsafe { (f.pref_create)(&mut pref) },
            "cublasLtMatmulPreferenceCreate",
        )?;
        let _pref_guard = Cleanup(Some(|| unsafe {
            (f.pref_destroy)(pref);
        }));
        use lt::cublasLtMatmulPreferenceAttributes_t as Pref;
        // One preference attribute from its value's bytes.
        let set_pref = |attr: Pref, value: &[u8], what: &str| {
            // SAFETY: `pref` is live until `_pref_guard` runs; the value is `value.len()` bytes.
            check(
                unsafe { (f.pref_set)(pref, attr, value.as_ptr().cast(), value.len()) },
                what,
            )
        };
        set_pref(
            Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &(workspace as u64).to_ne_bytes(),
            "cublasLtMatmulPreferenceSetAttribute",
        )?;
        // cuBLASLt assumes 256-byte aligned matrices unless told otherwise: tell it what each one
        // has (its address and row pitch), so no algorithm needing more is picked. cuBLASLt's A
        // is our B, its B our A.
        for (attr, o) in [
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &gemm.b),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &gemm.a),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &gemm.out),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &gemm.out),
        ] {
            set_pref(
                attr,
                &alignment(o).to_ne_bytes(),
                "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)",
            )?;
        }
        if tune && gemm.out.dtype != DType::F32 {
            // Timing would also pick split-K algorithms that add their partial sums in a 16-bit
            // output (in place, or in a workspace of the output's type): one rounding per part
            // instead of one in all. Only f32 reductions are candidates.
            let mask = lt::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
            set_pref(
                Pref::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                &mask.to_ne_bytes(),
                "cublasLtMatmulPreferenceSetAttribute(REDUCTION_SCHEME_MASK)",
            )?;
        }
        // SAFETY: plain C structs of integers; all zero is a valid value to overwrite.
        let mut results: [lt::cublasLtMatmulHeuristicResult_t; MAX_ALGOS] =
            unsafe { std::mem::zeroed() };
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
                    wanted.min(MAX_ALGOS) as c_int,
                    results.as_mut_ptr(),
                    &mut found,
                )
            },
            "cublasLtMatmulAlgoGetHeuristic",
        )?;
        let (m, k, n) = gemm.dims()?;
        if found <= 0 {
            return Err(Error::Driver(format!(
                "cuBLASLt has no algorithm for a [{m}, {k}] x [{k}, {n}] GEMM within {workspace} \
                 bytes of workspace"
            )));
        }
        let usable: Vec<_> = results[..found as usize]
            .iter()
            .take_while(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        if usable.is_empty() {
            return Err(Error::Driver(format!(
                "cuBLASLt's first algorithm for a [{m}, {k}] x [{k}, {n}] GEMM is not usable: {:?}",
                results[0].state
            )));
        }
        Ok(usable)
    }
}

/// Heuristic results asked for at most (`XENT_GEMM_ALGO`'s index, and the candidates timed when
/// tuning: [`tuning_env`]).
pub const MAX_ALGOS: usize = 8;

/// Timed runs of each candidate when tuning (after one untimed run).
pub const TUNE_RUNS: usize = 3;

/// `XENT_GEMM_TUNE=1`: autotuning on for every handle left at its default
/// ([`CublasLt::set_tuning`]).
pub fn tuning_env() -> bool {
    std::env::var_os("XENT_GEMM_TUNE").is_some_and(|v| v == "1")
}

/// What makes two GEMMs the same problem for cuBLASLt: shapes, types, layouts, alignments,
/// epilogue (the bias's alignment, 0 without) and workspace (not the addresses beyond their
/// alignment, not alpha or beta).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ShapeKey {
    operands: [(usize, usize, usize, bool, u8, u32); 3],
    bias: u32,
    workspace: usize,
    /// The SMs cuBLASLt was told to plan for (0: all).
    sms: u32,
}

/// How a shape's algorithm was chosen: cuBLASLt's heuristic choice `i` ([`algo_override`]), or
/// the fastest timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Choice {
    Heuristic(usize),
    Tuned,
}

/// A shape and how its algorithm was chosen: the key of [`CublasLt`]'s algorithm cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AlgoKey {
    shape: ShapeKey,
    choice: Choice,
}

impl ShapeKey {
    fn of(gemm: &Gemm, workspace: usize, sms: u32) -> ShapeKey {
        let o = |o: &Operand| {
            let dtype = match o.dtype {
                DType::F32 => 0,
                DType::F16 => 1,
                DType::Bf16 => 2,
            };
            (o.rows, o.cols, o.ld, o.transposed, dtype, alignment(o))
        };
        let bias = if gemm.bias == 0 {
            0
        } else {
            address_alignment(gemm.bias)
        };
        ShapeKey {
            operands: [o(&gemm.a), o(&gemm.b), o(&gemm.out)],
            bias,
            workspace,
            sms,
        }
    }
}

fn poisoned() -> Error {
    Error::Driver("cuBLASLt's algorithm cache: a thread panicked holding it".into())
}

/// Whether `stream` is capturing a graph (where nothing may wait).
fn capturing(stream: cudarc::driver::sys::CUstream) -> Result<bool> {
    use cudarc::driver::sys::CUstreamCaptureStatus as Status;
    // SAFETY: the caller's stream, valid per `matmul`'s contract.
    let status = unsafe { cudarc::driver::result::stream::is_capturing(stream) }
        .map_err(|err| Error::Driver(format!("cuStreamIsCapturing: {err}")))?;
    Ok(status != Status::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// The candidate of `found` whose runs through `run` on `stream` take the least time (one untimed
/// run, then [`TUNE_RUNS`] between two events); candidates that fail to run are skipped, and
/// the heuristic's first choice is kept when none ran.
fn fastest(
    found: &[lt::cublasLtMatmulAlgo_t],
    run: &dyn Fn(&lt::cublasLtMatmulAlgo_t) -> Status,
    stream: cudarc::driver::sys::CUstream,
) -> Result<lt::cublasLtMatmulAlgo_t> {
    use cudarc::driver::result::event;
    fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        move |err| Error::Driver(format!("{what}: {err}"))
    }
    let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    let start = event::create(flags).map_err(driver("cuEventCreate"))?;
    let end = event::create(flags).map_err(driver("cuEventCreate"));
    let end = match end {
        Ok(end) => end,
        Err(err) => {
            // SAFETY: made above, used by nothing.
            let _ = unsafe { event::destroy(start) };
            return Err(err);
        }
    };
    let mut best = (f32::INFINITY, found[0]);
    let timed = (|| -> Result<()> {
        for candidate in found {
            if run(candidate) != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                continue;
            }
            // SAFETY: events and stream of the current context.
            unsafe {
                event::record(start, stream).map_err(driver("cuEventRecord"))?;
                for _ in 0..TUNE_RUNS {
                    check(run(candidate), "cublasLtMatmul")?;
                }
                event::record(end, stream).map_err(driver("cuEventRecord"))?;
                event::synchronize(end).map_err(driver("cuEventSynchronize"))?;
                let ms = event::elapsed(start, end).map_err(driver("cuEventElapsedTime"))?;
                if ms < best.0 {
                    best = (ms, *candidate);
                }
            }
        }
        Ok(())
    })();
    // SAFETY: both events were made above; the last wait covered every record.
    unsafe {
        let _ = event::destroy(start);
        let _ = event::destroy(end);
    }
    timed.map(|()| best.1)
}

/// `XENT_GEMM_ALGO=i` makes every GEMM use cuBLASLt's `i`-th heuristic result (0 is its first
/// choice; the last it has when it has fewer; at most 7), for measuring whether another algorithm
/// is faster for a shape; `XENT_GEMM_ALGO=L,H,W` gives one a role ([`algo_pick`]). Unset: 0.
fn algo_override(gemm: &Gemm) -> usize {
    std::env::var("XENT_GEMM_ALGO").map_or(0, |text| algo_pick(&text, gemm))
}

/// The heuristic result [`algo_override`] takes for `gemm` from `text`: one index for every GEMM,
/// or three for the linear path's roles, told apart by their transposes: `L` for `A·Bᵀ` (the
/// logits `h·Wᵀ`), `H` for `A·B` (`grad_hidden = G·W`), `W` for `Aᵀ·B` (`grad_weight = Gᵀ·h`). A
/// part that is missing or not a number is 0; at most 7.
fn algo_pick(text: &str, gemm: &Gemm) -> usize {
    let parts: Vec<usize> = text
        .split(',')
        .map(|p| p.trim().parse::<usize>().unwrap_or(0))
        .collect();
    let role = match (gemm.a.transposed, gemm.b.transposed) {
        (false, true) => 0,
        (false, false) => 1,
        (true, _) => 2,
    };
    let i = match parts.len() {
        1 => parts[0],
        _ => parts.get(role).copied().unwrap_or(0),
    };
    i.min(MAX_ALGOS - 1)
}

/// The alignment in bytes an operand keeps on every row: the largest power of two, at most 256,
/// dividing its address and its row pitch.
pub fn alignment(o: &Operand) -> u32 {
    let pitch = (o.ld * o.dtype.bytes()) as u64;
    address_alignment(o.ptr | pitch)
}

/// The largest power of two, at most 256, that divides `bits` (an address, or addresses and
/// pitches or-ed together).
fn address_alignment(bits: u64) -> u32 {
    let bits = bits | 256;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gemm(a_t: bool, b_t: bool) -> Gemm {
        let o = |transposed| Operand {
            ptr: 0,
            dtype: DType::Bf16,
            rows: 1,
            cols: 1,
            ld: 1,
            transposed,
        };
        Gemm {
            a: o(a_t),
            b: o(b_t),
            out: o(false),
            alpha: 1.0,
            beta: 0.0,
            bias: 0,
        }
    }

    #[test]
    fn algo_pick_takes_one_index_or_one_a_role() {
        let (logits, hidden, weight) = (gemm(false, true), gemm(false, false), gemm(true, false));
        for g in [&logits, &hidden, &weight] {
            assert_eq!(algo_pick("2", g), 2);
            assert_eq!(algo_pick("99", g), MAX_ALGOS - 1);
            assert_eq!(algo_pick("x", g), 0);
        }
        assert_eq!(algo_pick("1,2,3", &logits), 1);
        assert_eq!(algo_pick("1,2,3", &hidden), 2);
        assert_eq!(algo_pick("1,2,3", &weight), 3);
        assert_eq!(algo_pick("0,,2", &hidden), 0);
        assert_eq!(algo_pick("0,1", &weight), 0);
    }
}
