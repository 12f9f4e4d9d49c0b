//! The GPU path: loads the committed PTX for the device, plans and launches the kernels.
//!
//! A call enqueues, on the caller's stream, `memset(counts)`, the count kernel, the cross-entropy
//! kernel(s) and the finish kernel, and returns at once: nothing waits on the host, so a call can
//! be captured in a CUDA graph (with [`CrossEntropy::forward_backward_into`] and buffers made
//! before the capture).

//!
//! The handle's code, by what it does:
//! - this file: the handle, made on a device or a context, and its switches;
//! - [`calls`]: the public calls on device buffers, checked and enqueued;
//! - [`launch`]: the kernels a call enqueues in order, with their parameter blocks;
//! - [`driver`]: the launches themselves (plain, or with clusters through `cuLaunchKernelEx`);
//! - [`planning`]: the automatic plans and the driver's occupancy answers they weigh;
//! - [`loading`]: the kernel table, each kernel loaded when the handle is made or on first use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};
use crate::kernels::{
    ClusterLaunchKey, Kernel, PlanKey, cluster_kernels, kernels, ptx_for_arch, split_kernels,
};
use crate::options::Options;
use crate::plan::{self, DeviceLimits, LaunchPlan};
use crate::ptx_index::PtxIndex;

mod calls;
mod driver;
mod launch;
mod loading;
mod partition;
mod planning;

pub use partition::green_context;

pub(crate) use launch::{
    KernelCall, LossBuffers, argmax_kernel, backward_kernel, entropy_kernel, loss_kernels,
    main_kernels,
};
use loading::configure;

/// Whether the CUDA driver library can be opened (cudarc panics where it cannot). The names are
/// those an NVIDIA driver installs; where cudarc links libcuda instead (another crate of the
/// build chose `dynamic-linking`), it is loaded already and opening it succeeds.
pub fn driver_loadable() -> bool {
    const NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];
    // SAFETY: opening the driver library runs its initialisers, as cudarc's own loading does.
    NAMES
        .iter()
        .any(|&name| unsafe { libloading::Library::new(name) }.is_ok())
}

/// Device `ordinal`'s primary context. [`Error::NoDriver`] without libcuda (cudarc would panic:
/// asked first), [`Error::NoDevice`] without that device.
pub(crate) fn primary_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_loadable() {
        return Err(Error::NoDriver);
    }
    let count = CudaContext::device_count().map_err(|_| Error::NoDevice { ordinal, count: 0 })?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::NoDevice {
            ordinal,
            count: count.max(0) as usize,
        });
    }
    Ok(CudaContext::new(ordinal)?)
}

/// A handle to the kernels on one CUDA device. Cheap to share: `Send + Sync`, and calls from
/// several threads on several streams run concurrently.
pub struct CrossEntropy {
    ctx: Arc<CudaContext>,
    /// Every kernel the handle may launch, loaded on its first use (a module of its own, from
    /// `lazy`) or, with `XENT_LAZY_MODULES=0`, when the handle is made (the PTX as one module).
    /// A load that failed is not kept: the next use tries again (a load needs device memory for
    /// the code, which a full device may lack for a while).
    kernels: HashMap<Kernel, OnceLock<CudaFunction>>,
    /// The PTX split into one module a kernel, when the kernels load on first use.
    lazy: Option<PtxIndex>,
    /// Held while a kernel is loaded on its first use.
    loading: Mutex<()>,
    limits: DeviceLimits,
    /// The driver's `cuOccupancyMaxActiveClusters` by [`ClusterLaunchKey`], asked once each: the
    /// automatic cluster size depends on it.
    active_clusters: Mutex<HashMap<ClusterLaunchKey, Option<u32>>>,
    /// The automatic plans made so far, by [`PlanKey`]: planning weighs up to a few dozen cluster
    /// launches, a few microseconds a call, which small calls would spend on every call.
    plans: Mutex<HashMap<PlanKey, LaunchPlan>>,
    /// The sm_90a module's warpgroup-MMA prototype (`linear::lse_gemm`), loaded on first use
    /// (or why it could not be).
    pub(crate) wgmma: std::sync::OnceLock<std::result::Result<[CudaFunction; 5], String>>,
    /// The second stream of the linear path's overlapped gradient GEMMs, made on first use.
    pub(crate) side: Mutex<Option<crate::linear::gpu::SideStream>>,
    /// Whether small calls take one launch ([`plan::self_finish`]); on unless `XENT_SMALL_FINISH=0`.
    small_finish: AtomicBool,
    /// Whether small cluster calls are launched with a programmatic dependency on the kernel
    /// before them (`launch_cluster`); on unless `XENT_PDL=0`.
    pdl: AtomicBool,
    /// Whether small calls of the plain loss take the cluster plan's small-call kernels
    /// ([`plan::small_kernel`]); on unless `XENT_SMALL_KERNEL=0` (measured faster on the H200 at
    /// 1, 8 and 64 rows: `bench/NOTES.md`, session 37).
    small_kernel: AtomicBool,
    /// Testing: a launch of a kernel that its call did not [`preload`](Self::preload) is an error.
    strict_preload: AtomicBool,
    /// Testing: whether the linear path's weight gradient takes xent's GEMM where it fits (`None`:
    /// the rule, `linear::gemm_tn::takes_weight_grad`).
    weight_grad_gemm: crate::setting::Setting,
    /// `XENT_LIMITS=a100`: an SM holds the CTAs an A100's would ([`plan::a100_ctas_per_sm`]).
    a100: bool,
    /// The card's tensor-core rate and memory bandwidth (its context's SMs), where known: where
    /// the linear path's two gradient schemes cross ([`crate::linear::scheme`]).
    pub(crate) rates: Option<crate::linear::CardRates>,
}

impl std::fmt::Debug for CrossEntropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrossEntropy")
            .field("ordinal", &self.ctx.ordinal())
            .field("limits", &self.limits)
            .finish()
    }
}

impl CrossEntropy {
    /// Opens device `ordinal` (its primary context, or with `XENT_GREEN_SMS=N` a partition of N of
    /// its SMs: a development hook); kernels load as [`from_context`](Self::from_context) says.
    /// Errors: [`Error::NoDriver`] without libcuda, [`Error::NoDevice`] without that device.
    pub fn new(ordinal: usize) -> Result<CrossEntropy> {
        let ctx = primary_context(ordinal)?;
        // Development hook: `XENT_GREEN_SMS=N` runs on N of the device's SMs (a green context,
        // `partition`), e.g. 108 with `XENT_ARCH=sm_80 XENT_LIMITS=a100` for an A100's SMs.
        let ctx = match std::env::var("XENT_GREEN_SMS").ok() {
            None => ctx,
            Some(text) => {
                let sms = text.parse().map_err(|_| {
                    Error::InvalidOption(format!("XENT_GREEN_SMS={text}: expected a number of SMs"))
                })?;
                let (major, minor) = ctx.compute_capability()?;
                let arch = std::env::var("XENT_ARCH").ok();
                let (_, clusters) = ptx_for_arch(major, minor, arch.as_deref())?;
                green_context(ordinal, sms, clusters)?
            }
        };
        Self::from_context(ctx)
    }

    /// Opens device `ordinal`'s primary context whatever `XENT_GREEN_SMS` says: the context
    /// PyTorch and candle run on, whose streams a framework passes in.
    pub fn on_primary_context(ordinal: usize) -> Result<CrossEntropy> {
        Self::from_context(primary_context(ordinal)?)
    }

    /// Makes a handle on an existing context (e.g. one shared with candle or your own code).
    ///
    /// Each kernel is compiled by the driver (from the PTX, then from its cache in
    /// `~/.nv/ComputeCache`) on its first launch, as a module of its own, so a program pays only
    /// for the kernels it uses. `XENT_LAZY_MODULES=0` loads them all when the handle is made, as
    /// one module (tens of seconds on a machine's first handle).
    pub fn from_context(ctx: Arc<CudaContext>) -> Result<CrossEntropy> {
        let lazy = std::env::var("XENT_LAZY_MODULES").as_deref() != Ok("0");
        Self::from_context_loading(ctx, lazy)
    }

    /// Testing hook: [`from_context`](Self::from_context) with each kernel loaded on its first
    /// use (`lazy`) or all of them now, whatever `XENT_LAZY_MODULES` says.
    #[doc(hidden)]
    pub fn from_context_loading(ctx: Arc<CudaContext>, lazy: bool) -> Result<CrossEntropy> {
        let (major, minor) = ctx.compute_capability()?;
        // Development hook: `XENT_ARCH=sm_80` runs the A100's kernels (no clusters) here.
        let arch = std::env::var("XENT_ARCH").ok();
        let (embedded, clusters) = ptx_for_arch(major, minor, arch.as_deref())?;
        // Development hook: `XENT_PTX=path` loads another PTX (a kernel variant under test) in
        // place of the embedded one, without rebuilding.
        let ptx = match std::env::var_os("XENT_PTX") {
            Some(path) => std::fs::read_to_string(&path).map_err(|err| {
                Error::Driver(format!("XENT_PTX={}: {err}", path.to_string_lossy()))
            })?,
            None => embedded.to_string(),
        };
        // The driver compiles PTX on a machine's first load (then from its cache): each kernel on
        // its first use (the quickstart, H200, cache off: 1.5 s), or all of it here as one module
        // (49.4 s; the driver compiles one module at a time, so 8 modules loaded from 8 threads
        // took as long as one).
        let (module, lazy) = if lazy {
            (None, Some(PtxIndex::parse(ptx)))
        } else {
            (Some(ctx.load_module(Ptx::from_src(ptx))?), None)
        };
        let device_sms =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let limits = DeviceLimits {
            // A green context's partition, where the context is one.
            sm_count: partition::context_sm_count(&ctx, device_sms),
            max_smem_per_block: ctx.attribute(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )? as u32,
            max_cluster: if clusters { plan::MAX_CLUSTER } else { 1 },
        };
        // Development hook: `XENT_LIMITS=a100` plans as on an A100 (108 SMs, 163 KiB of shared
        // memory a block, no clusters, as many CTAs an SM as its 164 KiB hold), for measuring the
        // sm_80 plans on a larger GPU.
        let a100 = std::env::var("XENT_LIMITS").as_deref() == Ok("a100");
        let limits = match std::env::var("XENT_LIMITS").ok().as_deref() {
            None => limits,
            Some("a100") if clusters => {
                return Err(Error::InvalidOption(
                    "XENT_LIMITS=a100 plans the sm_80 kernels: set XENT_ARCH=sm_80 too".into(),
                ));
            }
            Some("a100") => DeviceLimits {
                sm_count: limits.sm_count.min(DeviceLimits::A100.sm_count),
                max_smem_per_block: limits
                    .max_smem_per_block
                    .min(DeviceLimits::A100.max_smem_per_block),
                max_cluster: 1,
            },
            Some(other) => {
                return Err(Error::InvalidOption(format!(
                    "XENT_LIMITS={other}: expected a100"
                )));
            }
        };
        let attribute = |which| ctx.attribute(which).map(i64::from).unwrap_or(0);
        let rates = crate::linear::CardRates::from_attributes(
            (major, minor),
            limits.sm_count,
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE),
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE),
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH),
        );
        let mut wanted = kernels();
        if limits.max_cluster > 1 {
            wanted.extend(cluster_kernels());
        } else {
            wanted.extend(split_kernels());
        }
        let mut kernels = HashMap::new();
        for kernel in wanted {
            let name = kernel.name();
            let slot = OnceLock::new();
            match (&module, &lazy) {
                (Some(module), _) => {
                    let function = module.load_function(&name)?;
                    configure(&function, &name, limits)?;
                    let _ = slot.set(function);
                }
                // Loaded on first use; missing is an error now, as when loading them all.
                (None, Some(index)) if !index.has_entry(&name) => {
                    return Err(Error::Driver(format!("the PTX has no kernel {name}")));
                }
                _ => {}
            }
            kernels.insert(kernel, slot);
        }
        Ok(CrossEntropy {
            ctx,
            kernels,
            lazy,
            loading: Mutex::new(()),
            limits,
            active_clusters: Mutex::new(HashMap::new()),
            plans: Mutex::new(HashMap::new()),
            wgmma: std::sync::OnceLock::new(),
            side: Mutex::new(None),
            small_finish: AtomicBool::new(std::env::var("XENT_SMALL_FINISH").as_deref() != Ok("0")),
            pdl: AtomicBool::new(std::env::var("XENT_PDL").as_deref() != Ok("0")),
            small_kernel: AtomicBool::new(std::env::var("XENT_SMALL_KERNEL").as_deref() != Ok("0")),
            strict_preload: AtomicBool::new(false),
            weight_grad_gemm: crate::setting::Setting::default(),
            a100,
            rates,
        })
    }

    /// Testing hook: with `on`, launching a kernel that is not loaded yet is an error, so that a
    /// test on a handle that loads kernels on first use sees every call load all its kernels
    /// before its first launch ([`preload`](Self::preload)).
    #[doc(hidden)]
    pub fn set_strict_preload(&self, on: bool) {
        self.strict_preload.store(on, Ordering::Relaxed);
    }

    /// Testing hook: whether small calls take one launch (count and finish in the cross-entropy
    /// kernel, [`plan::self_finish`]) or three, as larger ones do. Both give the same bits.
    #[doc(hidden)]
    pub fn set_small_finish(&self, on: bool) {
        self.small_finish.store(on, Ordering::Relaxed);
    }

    /// Testing hook: the GEMM of the linear path's weight gradient where xent's own can take it
    /// (bf16, compute capability 9.0, operands the tensor memory accelerator can address):
    /// `Some(true)` xent's, `Some(false)` cuBLASLt's, `None` the rule
    /// ([`linear::gemm_tn::takes_weight_grad`](crate::linear::gemm_tn::takes_weight_grad), which
    /// takes xent's in place on some cards only). Both compute the same sums; the roundings differ.
    #[doc(hidden)]
    pub fn set_weight_grad_gemm(&self, ours: Option<bool>) {
        self.weight_grad_gemm.set(ours);
    }

    /// The choice [`set_weight_grad_gemm`](Self::set_weight_grad_gemm) made.
    pub(crate) fn weight_grad_gemm(&self) -> Option<bool> {
        self.weight_grad_gemm.get()
    }

    /// Testing hook: whether small cluster calls are launched with a programmatic dependency on
    /// the kernel before them (their CTAs start early and wait for it in the kernel). Both give
    /// the same bits.
    #[doc(hidden)]
    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on, Ordering::Relaxed);
    }

    /// Testing hook: whether small calls of the plain loss take the cluster plan's small-call
    /// kernels ([`plan::small_kernel`]) or the cluster kernels. Both give the same bits.
    #[doc(hidden)]
    pub fn set_small_kernel(&self, on: bool) {
        self.small_kernel.store(on, Ordering::Relaxed);
    }

    /// Testing hook: the handle's choice that [`set_small_kernel`](Self::set_small_kernel) sets
    /// (from `XENT_SMALL_KERNEL` when the handle is made).
    #[doc(hidden)]
    pub fn small_kernel_on(&self) -> bool {
        self.small_kernel.load(Ordering::Relaxed)
    }

    /// Whether a call of `rows` rows under `launch_plan`, taking one launch (`self_finish`), runs
    /// the small-call kernels: the handle's choice ([`set_small_kernel`](Self::set_small_kernel))
    /// and [`plan::small_kernel`].
    fn small_kernel(
        &self,
        rows: usize,
        launch_plan: &LaunchPlan,
        opts: &Options,
        weighted: bool,
        self_finish: bool,
    ) -> bool {
        self_finish
            && self.small_kernel.load(Ordering::Relaxed)
            && plan::small_kernel(rows, launch_plan, opts, weighted)
    }

    /// The context the kernels live in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// What planning knows about the device.
    pub fn limits(&self) -> DeviceLimits {
        self.limits
    }

    pub(crate) fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::ContextMismatch);
        }
        Ok(())
    }
}
