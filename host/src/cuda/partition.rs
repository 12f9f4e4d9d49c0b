//! The SMs a context may run on: a green context's partition of the device (CUDA 12.4 and later
//! drivers), or the whole device.
//!
//! A handle plans for its context's SMs, not the device's: the grids sized by SM count (the
//! count kernel's, the split plan's co-resident groups, which must all be resident at once) stay
//! right when a program runs xent on part of a GPU, beside other work. `XENT_GREEN_SMS=N` makes
//! [`CrossEntropy::new`](super::CrossEntropy::new) open such a partition itself, for tests and
//! benchmarks: with `XENT_ARCH=sm_80 XENT_LIMITS=a100` it runs the A100's kernels on 108 SMs,
//! each holding as many CTAs as an A100's would ([`plan::a100_ctas_per_sm`]).

use std::sync::Arc;

use cudarc::driver::CudaContext;
use cudarc::driver::sys::{self, CUdevResourceType};

use crate::error::{Error, Result};
#[cfg(doc)]
use crate::plan;

/// Room for one `CUdevResource` of any layout so far (CUDA 12.4-13.x: a 96-byte header, the
/// union whose first word is the SM count, since 13.1 a pointer after it), with margin: the
/// driver writes its own layout, which may be newer than the bindings'.
#[repr(C, align(8))]
struct Resource([u8; 1024]);

impl Resource {
    /// Where the SM count sits: after the 4-byte type and 92 bytes of padding, the union's first
    /// field (`CUdevSmResource::smCount`) in every layout.
    const SM_COUNT_OFFSET: usize = 96;

    fn new() -> Resource {
        Resource([0; 1024])
    }

    fn ptr(&mut self) -> *mut sys::CUdevResource {
        self.0.as_mut_ptr().cast()
    }

    fn sm_count(&self) -> u32 {
        let at = Self::SM_COUNT_OFFSET;
        u32::from_ne_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }
}

/// The driver entry points of green contexts; a driver before CUDA 12.4 lacks them (and cudarc
/// would panic calling one that is missing: ask first).
const GREEN_ENTRY_POINTS: [&str; 5] = [
    "cuDeviceGetDevResource",
    "cuDevSmResourceSplitByCount",
    "cuDevResourceGenerateDesc",
    "cuGreenCtxCreate",
    "cuCtxFromGreenCtx",
];

/// Whether the driver library has `name`. Asked of the library itself, not of cudarc, which
/// has no handle to it where another crate of the build links libcuda (candle's `cuda`).
fn has_entry_point(name: &str) -> bool {
    static DRIVER: std::sync::OnceLock<Option<libloading::Library>> = std::sync::OnceLock::new();
    let driver = DRIVER.get_or_init(|| {
        // SAFETY: the driver is loaded already (the caller made a context): opening it again
        // runs no initialiser.
        ["libcuda.so.1", "libcuda.so"]
            .iter()
            .find_map(|&file| unsafe { libloading::Library::new(file) }.ok())
    });
    let symbol = format!("{name}\0");
    // SAFETY: looking a symbol up runs nothing, and the pointer is not called.
    driver
        .as_ref()
        .is_some_and(|lib| unsafe { lib.get::<unsafe extern "C" fn()>(symbol.as_bytes()).is_ok() })
}

/// SMs `ctx` may run on: its SM resource (`cuCtxGetDevResource`: a green context's partition, or
/// the whole device), or `device_sms` where the driver cannot say.
pub(crate) fn context_sm_count(ctx: &CudaContext, device_sms: u32) -> u32 {
    if !has_entry_point("cuCtxGetDevResource") || ctx.bind_to_thread().is_err() {
        return device_sms;
    }
    let mut resource = Resource::new();
    // SAFETY: `resource` has room for any layout of the struct the driver writes.
    let result = unsafe {
        sys::cuCtxGetDevResource(
            ctx.cu_ctx(),
            resource.ptr(),
            CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
        )
    };
    match result.result() {
        Ok(()) if (1..=device_sms).contains(&resource.sm_count()) => resource.sm_count(),
        _ => device_sms,
    }
}

/// A context on device `ordinal` that runs its work on `sm_count` of its SMs (a green context).
/// Streams made in it ([`CudaContext::new_stream`], its default stream) run there, and a
/// [`CrossEntropy`](super::CrossEntropy) made on it plans for them (its
/// [`limits`](super::CrossEntropy::limits)).
///
/// `clusters`: whether kernels with thread-block clusters will run there (sm_90's). The
/// partition then keeps SMs that can hold the largest clusters together, and the driver may
/// round the count up to its granularity; without, any count the driver's finest split allows
/// (108 for an A100's).
///
/// The partition lasts as long as the process: cudarc's context cannot destroy a green context.
/// Meant for tests and benchmarks (`XENT_GREEN_SMS`).
pub fn green_context(ordinal: usize, sm_count: u32, clusters: bool) -> Result<Arc<CudaContext>> {
    // Retains the device's primary context, which the green context shares (the driver advises
    // making it first).
    let primary = super::primary_context(ordinal)?;
    if let Some(missing) = GREEN_ENTRY_POINTS.iter().find(|n| !has_entry_point(n)) {
        return Err(Error::Driver(format!(
            "SM partitions (green contexts) need a CUDA 12.4 driver or later: this one has no \
             {missing}"
        )));
    }
    let device = primary.cu_device();
    let failed = |what: &str, err: sys::CUresult| {
        Error::Driver(format!(
            "a green context of {sm_count} SMs: {what}: {err:?}"
        ))
    };
    let mut whole = Resource::new();
    let mut group = Resource::new();
    let mut rest = Resource::new();
    let mut groups: std::ffi::c_uint = 1;
    let mut desc: sys::CUdevResourceDesc = std::ptr::null_mut();
    let mut green: sys::CUgreenCtx = std::ptr::null_mut();
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    primary.bind_to_thread()?;
    // SAFETY: each out-pointer has room for what the driver writes (one resource each: `groups`
    // is 1); the inputs are what the driver wrote before.
    unsafe {
        let result = sys::cuDeviceGetDevResource(
            device,
            whole.ptr(),
            CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
        );
        result
            .result()
            .map_err(|_| failed("the device's SMs", result))?;
        if sm_count == 0 || sm_count > whole.sm_count() {
            return Err(Error::InvalidOption(format!(
                "a partition of {sm_count} SMs: the device has {}",
                whole.sm_count()
            )));
        }
        // With clusters, SMs that can hold the largest (`..._MAX_POTENTIAL_CLUSTER_SIZE`, 2: the
        // kernels' clusters reach 16 CTAs); without, ignoring co-scheduling allows the finest
        // counts (`CU_DEV_SM_RESOURCE_SPLIT_IGNORE_SM_COSCHEDULING`, 1). The enum's name differs
        // between the bindings of CUDA 12 and 13.
        let flags: std::ffi::c_uint = if clusters { 2 } else { 1 };
        let result = sys::cuDevSmResourceSplitByCount(
            group.ptr(),
            &mut groups,
            whole.ptr(),
            rest.ptr(),
            flags,
            sm_count,
        );
        result
            .result()
            .map_err(|_| failed("splitting the SMs", result))?;
        if groups != 1 {
            return Err(Error::Driver(format!(
                "a green context of {sm_count} SMs: the driver made no group of that size"
            )));
        }
        let result = sys::cuDevResourceGenerateDesc(&mut desc, group.ptr(), 1);
        result
            .result()
            .map_err(|_| failed("its descriptor", result))?;
        let result = sys::cuGreenCtxCreate(
            &mut green,
            desc,
            device,
            sys::CUgreenCtxCreate_flags::CU_GREEN_CTX_DEFAULT_STREAM as std::ffi::c_uint,
        );
        result.result().map_err(|_| failed("creating it", result))?;
        let result = sys::cuCtxFromGreenCtx(&mut ctx, green);
        result
            .result()
            .map_err(|_| failed("its CUcontext", result))?;
        Ok(CudaContext::from_raw_context(ordinal, device, ctx)?)
    }
}
