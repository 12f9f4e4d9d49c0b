//! NCCL, opened at run time, for the vocabulary-parallel loss (issue 15): the library search and
//! the few entry points the one collective needs. cudarc 0.19.10 looks for `libnccl.so`,
//! `libnccl.so.12`, ... but never `libnccl.so.2`, the only file the `nvidia-nccl-cu12/cu13` wheels
//! that PyTorch installs ship (`site-packages/nvidia/nccl/lib/`), and its loader panics when it
//! finds nothing; this one searches there too and says what it tried.
//!
//! Loading and `ncclGetVersion` need no GPU; `tests/nccl.rs` checks them wherever a library is
//! found (`XENT_NCCL`, or a wheel installed beside the Python the tests see). Communicators and
//! collectives come with the vocabulary-parallel kernels.

use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};

use libloading::Library;

use crate::error::{Error, Result};

/// An environment variable naming the NCCL library file, or a folder holding it; tried first.
pub const NCCL_ENV: &str = "XENT_NCCL";

/// The file names tried in each folder and then on the loader's own path.
pub const FILE_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// What to try, in order: `$XENT_NCCL` (`env`: a file, or a folder searched for
/// [`FILE_NAMES`]), each of `dirs`, the `nvidia/nccl/lib` folder of each of `site_packages`
/// (where the NCCL wheels put it), then the bare names (the loader's path).
pub fn candidates(env: Option<&str>, dirs: &[PathBuf], site_packages: &[PathBuf]) -> Vec<PathBuf> {
    let wheels = site_packages
        .iter()
        .map(|site| site.join("nvidia/nccl/lib"));
    crate::dylib::candidates(env, dirs.iter().cloned().chain(wheels), &FILE_NAMES)
}

/// `ncclResult_t`.
type Status = c_int;

/// The entry points used, by NCCL's C signatures (`nccl.h`; the handles as opaque pointers).
struct Fns {
    get_version: unsafe extern "C" fn(*mut c_int) -> Status,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    comm_init_rank: unsafe extern "C" fn(*mut *mut c_void, c_int, UniqueId, c_int) -> Status,
    comm_destroy: unsafe extern "C" fn(*mut c_void) -> Status,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        *mut c_void,
        *mut c_void,
    ) -> Status,
}

impl Fns {
    /// Every entry point of `lib`, or the name of the first one missing.
    fn of(lib: &Library) -> std::result::Result<Fns, &'static str> {
        // SAFETY: each symbol is looked up by NCCL's name and given NCCL's C signature.
        unsafe {
            macro_rules! get {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes())
                        .map_err(|_| $name)?
                };
            }
            Ok(Fns {
                get_version: get!("ncclGetVersion"),
                get_error_string: get!("ncclGetErrorString"),
                get_unique_id: get!("ncclGetUniqueId"),
                comm_init_rank: get!("ncclCommInitRank"),
                comm_destroy: get!("ncclCommDestroy"),
                all_gather: get!("ncclAllGather"),
            })
        }
    }
}

/// `ncclUniqueId`: 128 bytes that every rank of a communicator must share (through a file, the
/// environment, or memory when the ranks are threads).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniqueId {
    pub internal: [u8; 128],
}

/// An NCCL library.
pub struct Nccl {
    fns: Fns,
    path: PathBuf,
    /// Kept loaded while `fns` point into it.
    _lib: Library,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl").field("path", &self.path).finish()
    }
}

impl Nccl {
    /// Loads NCCL from the first of [`candidates`] that has every entry point.
    /// `Error::LibraryNotFound` lists what was tried and why each failed.
    pub fn open(dirs: &[PathBuf], site_packages: &[PathBuf]) -> Result<Nccl> {
        let env = std::env::var(NCCL_ENV).ok();
        let candidates = candidates(env.as_deref(), dirs, site_packages);
        let (lib, path, fns) = crate::dylib::open_first(candidates, Fns::of).map_err(|tried| {
            Error::LibraryNotFound {
                library: "NCCL",
            hint: format!(
                "set {NCCL_ENV} to the file or its folder (PyTorch's: site-packages/nvidia/nccl/\
                 lib/libnccl.so.2, from the nvidia-nccl-cu12 or -cu13 wheel)"
            ),
            tried,
            }
        })?;
        Ok(Nccl {
            fns,
            path,
            _lib: lib,
        })
    }

    /// The file that loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, status: Status, what: &str) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for every status.
        let text = unsafe { std::ffi::CStr::from_ptr((self.fns.get_error_string)(status)) };
        Err(Error::Driver(format!(
            "{what}: NCCL error {status}: {}",
            text.to_string_lossy()
        )))
    }

    /// NCCL's version, as `(major, minor, patch)` (needs no GPU).
    pub fn version(&self) -> Result<(u32, u32, u32)> {
        let mut code = 0;
        // SAFETY: writes one int.
        self.check(
            unsafe { (self.fns.get_version)(&mut code) },
            "ncclGetVersion",
        )?;
        let code = code as u32;
        // NCCL 2.9 and later: major * 10000 + minor * 100 + patch.
        Ok((code / 10000, code / 100 % 100, code % 100))
    }

    /// A new unique id for a communicator (needs a GPU and its network setup).
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: writes one id.
        self.check(
            unsafe { (self.fns.get_unique_id)(&mut id) },
            "ncclGetUniqueId",
        )?;
        Ok(id)
    }

    /// Rank `rank` of a `world`-rank communicator on the current device of the calling thread.
    /// Blocks until every rank has joined.
    pub fn comm_init_rank(&self, world: usize, id: UniqueId, rank: usize) -> Result<Comm<'_>> {
        let mut comm = std::ptr::null_mut();
        // SAFETY: writes one communicator handle.
        self.check(
            unsafe { (self.fns.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) },
            "ncclCommInitRank",
        )?;
        Ok(Comm {
            nccl: self,
            comm,
            world,
            rank,
        })
    }
}

/// One rank of an NCCL communicator.
pub struct Comm<'a> {
    nccl: &'a Nccl,
    comm: *mut c_void,
    pub world: usize,
    pub rank: usize,
}

/// `ncclFloat32`.
const NCCL_FLOAT32: c_int = 7;

impl Comm<'_> {
    /// Gathers `count` f32 values from every rank into `recv` (`world · count`, rank order),
    /// enqueued on `stream`.
    ///
    /// # Safety
    /// `send` and `recv` must be device memory of the communicator's device holding `count` and
    /// `world · count` f32 values, alive until the collective has run; `stream` a stream of
    /// that device.
    pub unsafe fn all_gather_f32(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        // SAFETY: as the caller promised.
        let status = unsafe {
            (self.nccl.fns.all_gather)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                NCCL_FLOAT32,
                self.comm,
                stream.cast(),
            )
        };
        self.nccl.check(status, "ncclAllGather")
    }
}

impl Drop for Comm<'_> {
    fn drop(&mut self) {
        // SAFETY: made by `ncclCommInitRank` of this library, destroyed once.
        unsafe {
            (self.nccl.fns.comm_destroy)(self.comm);
        }
    }
}
