//! The GPU path: loads the committed PTX for the device, plans and launches the kernels.
//!
//! A call enqueues, on the caller's stream, `memset(counts)`, the count kernel, the cross-entropy
//! kernel(s) and the finish kernel, and returns at once: nothing waits on the host, so a call can
//! be captured in a CUDA graph (with [`CrossEntropy::forward_backward_into`] and buffers made
//! before the capture).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::abi::{
    ArgmaxParams, COUNT_DONE, COUNT_WORDS, CountParams, FinishParams, MODE_FORWARD, MODE_FUSED,
    RowsParams, SMEM_REDUCTION_BYTES, ScaleParams, XentParams,
};
use crate::error::{Error, Result};
use crate::kernels::{
    ClusterLaunchKey, Kernel, PLAN_CACHE_MAX, PlanKey, XentKind, cluster_keep, cluster_kernels,
    kernel_traits, kernels, opt_params, ptx_for_arch, split_kernels, variant,
};
use crate::loss::{Loss, LossKey, same_bits};
use crate::options::{DType, Element, Label, Options, Shape};
use crate::plan::{self, DeviceLimits, LaunchPlan};
use crate::ptx_index::PtxIndex;

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
    /// ([`plan::small_kernel`]); off unless `XENT_SMALL_KERNEL=1` until they are measured on a
    /// GPU (`bench/NOTES.md`, session 35).
    small_kernel: AtomicBool,
    /// Testing: a launch of a kernel that its call did not [`preload`](Self::preload) is an error.
    strict_preload: AtomicBool,
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
    /// Opens device `ordinal` (its primary context); kernels load as [`from_context`](Self::from_context) says.
    /// Errors: [`Error::NoDriver`] without libcuda, [`Error::NoDevice`] without that device.
    pub fn new(ordinal: usize) -> Result<CrossEntropy> {
        // cudarc panics when it cannot load libcuda: ask first.
        if !driver_loadable() {
            return Err(Error::NoDriver);
        }
        let count =
            CudaContext::device_count().map_err(|_| Error::NoDevice { ordinal, count: 0 })?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice {
                ordinal,
                count: count.max(0) as usize,
            });
        }
        Self::from_context(CudaContext::new(ordinal)?)
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
        let limits = DeviceLimits {
            sm_count: ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
                as u32,
            max_smem_per_block: ctx.attribute(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )? as u32,
            max_cluster: if clusters { plan::MAX_CLUSTER } else { 1 },
        };
        // Development hook: `XENT_LIMITS=a100` plans as on an A100 (108 SMs, 163 KiB of shared
        // memory a block, no clusters), for measuring the sm_80 plans on a larger GPU.
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
            small_kernel: AtomicBool::new(std::env::var("XENT_SMALL_KERNEL").as_deref() == Ok("1")),
            strict_preload: AtomicBool::new(false),
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

    /// The plan a call with this shape, dtype and options would run. On sm_90 the automatic
    /// cluster shape asks the driver how many clusters of each candidate launch fit at once (the
    /// first time this handle plans that launch; remembered after).
    pub fn plan_for(&self, shape: &Shape, dtype: DType, opts: &Options) -> Result<LaunchPlan> {
        self.plan_variant(shape, dtype, opts, opts.weight.is_some())
    }

    /// [`plan_for`](Self::plan_for) with class weights on or off whatever `opts.weight` says (the
    /// raw API takes them in device memory).
    pub(crate) fn plan_variant(
        &self,
        shape: &Shape,
        dtype: DType,
        opts: &Options,
        weighted: bool,
    ) -> Result<LaunchPlan> {
        let variant = variant(opts, weighted, opts.return_token_accuracy);
        let key = (shape.rows(), shape.vocab, dtype, opts.plan, variant);
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&known) = plans.get(&key) {
            return Ok(known);
        }
        let mut cache = self
            .active_clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let made = plan::plan_with(
            shape.rows(),
            shape.vocab,
            dtype,
            self.limits,
            opts.plan,
            kernel_traits(variant),
            &mut |launch| self.active_clusters(&mut cache, variant, dtype, launch),
        )?;
        self.check_block_threads(&made, variant, dtype)?;
        // A bound on what a caller with ever new shapes keeps: start again past it.
        if plans.len() >= PLAN_CACHE_MAX {
            plans.clear();
        }
        plans.insert(key, made);
        Ok(made)
    }

    /// Fails with [`Error::PlanDoesNotFit`] when a cluster or split plan asks for more threads per
    /// CTA than its kernel can launch with: the most a block may have is the register file over
    /// the kernel's registers per thread, so a kernel of more than 64 stops short of 1024 (the soft
    /// cap with token accuracy did on sm_90 at 72 registers, until session 32; the sm_80 split
    /// kernels take up to 125, but their threads are not forced). The automatic plans ask for at
    /// most [`plan::MAX_THREADS`]; only a forced `threads` reaches this.
    fn check_block_threads(
        &self,
        made: &LaunchPlan,
        variant: &'static str,
        dtype: DType,
    ) -> Result<()> {
        let (kind, threads) = match *made {
            LaunchPlan::Cluster { threads, .. } => (XentKind::Cluster, threads),
            LaunchPlan::Split { threads, .. } => (XentKind::Split, threads),
            _ => return Ok(()),
        };
        if threads <= plan::MAX_THREADS {
            return Ok(());
        }
        for label in ["i32", "i64"] {
            let kernel = Kernel::Xent {
                kind,
                variant,
                dtype,
                label,
            };
            let Some(function) = self.kernel_if_any(kernel) else {
                continue;
            };
            let function = function?;
            let most = function
                .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
                .map_err(|e| Error::Driver(e.to_string()))?;
            if i64::from(threads) > i64::from(most) {
                return Err(Error::PlanDoesNotFit(format!(
                    "{threads} threads per CTA: the {} kernel for these options launches with at \
                     most {most} ({} registers a thread)",
                    kernel.canonical().name(),
                    function.num_regs().unwrap_or(0),
                )));
            }
        }
        Ok(())
    }

    /// The cluster launches the automatic plan weighs for this shape, dtype and options, with the
    /// driver's answer for each (see [`plan::cluster_shape_by_residency`]): why a plan was chosen.
    /// Empty without clusters (before sm_90). A forced `threads` in `opts.plan` is kept.
    pub fn cluster_candidates(
        &self,
        shape: &Shape,
        dtype: DType,
        opts: &Options,
    ) -> Vec<plan::ClusterCandidate> {
        let variant = variant(opts, opts.weight.is_some(), opts.return_token_accuracy);
        let threads = match opts.plan {
            plan::PlanChoice::Cluster { threads, .. } => threads,
            _ => None,
        };
        let mut cache = self
            .active_clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        plan::cluster_candidates(
            shape.rows(),
            shape.vocab,
            dtype,
            self.limits,
            cluster_keep(variant),
            threads,
            &mut |launch| self.active_clusters(&mut cache, variant, dtype, launch),
        )
    }

    /// CTAs of the split kernel of `variant` for `dtype` the device runs at once with `threads`
    /// and `smem_bytes` each (`None` if the driver cannot say).
    fn resident_split_ctas(
        &self,
        variant: &'static str,
        dtype: DType,
        threads: u32,
        smem_bytes: u32,
    ) -> Option<u32> {
        // The fewer of the i32 and i64 kernels': a cooperative launch of more CTAs than are
        // resident fails, and the JIT may give either label type's kernel more registers (the
        // sm_80 PTX on an H200: vocabulary 35, f32, token accuracy, seen 2026-12-01).
        self.ctx.bind_to_thread().ok()?;
        let mut per_sm = u32::MAX;
        for label in ["i32", "i64"] {
            let kernel = Kernel::Xent {
                kind: XentKind::Split,
                variant,
                dtype,
                label,
            };
            let function = self.kernel_if_any(kernel)?.ok()?;
            let blocks = function
                .occupancy_max_active_blocks_per_multiprocessor(threads, smem_bytes as usize, None)
                .ok()?;
            per_sm = per_sm.min(blocks);
        }
        Some(per_sm * self.limits.sm_count)
    }

    /// How many clusters of `launch` (a cluster plan of the `variant` kernels for `dtype`) the
    /// device runs at once, as the driver says (`None` if it cannot say), remembered in `cache`;
    /// for a split plan, how many of its CTAs (remembered under cluster size 0).
    fn active_clusters(
        &self,
        cache: &mut HashMap<ClusterLaunchKey, Option<u32>>,
        variant: &'static str,
        dtype: DType,
        launch: &LaunchPlan,
    ) -> Option<u32> {
        if let &LaunchPlan::Split {
            threads,
            smem_bytes,
            ..
        } = launch
        {
            let key = (variant, dtype, threads, smem_bytes, 0);
            return *cache
                .entry(key)
                .or_insert_with(|| self.resident_split_ctas(variant, dtype, threads, smem_bytes));
        }
        let &LaunchPlan::Cluster {
            threads,
            size,
            smem_bytes,
            ..
        } = launch
        else {
            return None;
        };
        let key = (variant, dtype, threads, smem_bytes, size);
        if let Some(&known) = cache.get(&key) {
            return known;
        }
        // The i32 and i64 kernels differ by a few instructions, not in registers.
        let kernel = Kernel::Xent {
            kind: XentKind::Cluster,
            variant,
            dtype,
            label: "i64",
        };
        let Some(Ok(function)) = self.kernel_if_any(kernel) else {
            cache.insert(key, None);
            return None;
        };
        let mut attribute = cluster_attribute(size);
        let config = cluster_config(
            size,
            threads,
            smem_bytes,
            std::ptr::null_mut(),
            std::slice::from_mut(&mut attribute),
        );
        let mut clusters: std::ffi::c_int = 0;
        let answer = self.ctx.bind_to_thread().ok().and_then(|()| {
            // SAFETY: `config` and the attribute it points at live across the call; the driver
            // only reads them and writes one int.
            let result = unsafe {
                cudarc::driver::sys::cuOccupancyMaxActiveClusters(
                    &mut clusters,
                    function.cu_function(),
                    &config,
                )
            };
            result.result().ok()?;
            u32::try_from(clusters).ok().filter(|&n| n > 0)
        });
        cache.insert(key, answer);
        answer
    }

    /// The function of `kernel` (its canonical kernel's), loaded now if the handle loads kernels
    /// on first use; `None` if the handle has no such kernel (one of another architecture's plans).
    fn kernel_if_any(&self, kernel: Kernel) -> Option<Result<&CudaFunction>> {
        let kernel = kernel.canonical();
        let slot = self.kernels.get(&kernel)?;
        if let Some(function) = slot.get() {
            return Some(Ok(function));
        }
        // One load at a time (the driver compiles one module at a time anyway), so that threads
        // that want the same kernel wait for one compile rather than each making its own.
        let _one_load = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(function) = slot.get() {
            return Some(Ok(function));
        }
        Some(
            self.load_kernel(kernel)
                .map(|function| slot.get_or_init(|| function)),
        )
    }

    /// The function a launch of `kernel` takes: [`kernel_if_any`](Self::kernel_if_any) of a
    /// kernel every handle has (`from_context` made a slot for each, so a missing one is a bug).
    /// With [`set_strict_preload`](Self::set_strict_preload), a kernel not loaded before is an
    /// error instead: its call did not [`preload`](Self::preload) it.
    fn kernel(&self, kernel: Kernel) -> Result<&CudaFunction> {
        if self.strict_preload.load(Ordering::Relaxed)
            && self
                .kernels
                .get(&kernel.canonical())
                .is_some_and(|slot| slot.get().is_none())
        {
            return Err(Error::Driver(format!(
                "{} launched before its call preloaded it",
                kernel.canonical().name()
            )));
        }
        self.loaded(kernel)
    }

    /// The function of `kernel`, a kernel every handle has, loaded now if need be
    /// ([`kernel_if_any`](Self::kernel_if_any)).
    fn loaded(&self, kernel: Kernel) -> Result<&CudaFunction> {
        self.kernel_if_any(kernel).unwrap_or_else(|| {
            Err(Error::Driver(format!(
                "no kernel {} for this device",
                kernel.canonical().name()
            )))
        })
    }

    /// Loads `kernel` from a module of its own ([`PtxIndex::module_for`]): the driver compiles
    /// that kernel alone.
    fn load_kernel(&self, kernel: Kernel) -> Result<CudaFunction> {
        let name = kernel.name();
        let Some(index) = &self.lazy else {
            // Eager handles filled every slot in `from_context`.
            return Err(Error::Driver(format!("{name} was not loaded")));
        };
        let text = index
            .module_for(&name)
            .ok_or_else(|| Error::Driver(format!("the PTX has no kernel {name}")))?;
        // The driver's error names no kernel: say which one failed to load.
        let load = || -> Result<CudaFunction> {
            let module = self.ctx.load_module(Ptx::from_src(text))?;
            let function = module.load_function(&name)?;
            configure(&function, &name, self.limits)?;
            Ok(function)
        };
        load().map_err(|err| match err {
            Error::Driver(message) => {
                Error::Driver(format!("loading kernel {name} on its first use: {message}"))
            }
            other => other,
        })
    }

    /// Loads now, where not loaded yet, each kernel of `kernels`. A call does this for every
    /// kernel it will launch before it launches the first, so that one that cannot be loaded (on
    /// a device without memory for its code, say) fails the call before anything is enqueued,
    /// never halfway through it (a gradient written in place and its loss not finished).
    pub(crate) fn preload(&self, kernels: impl IntoIterator<Item = Option<Kernel>>) -> Result<()> {
        for kernel in kernels.into_iter().flatten() {
            self.loaded(kernel)?;
        }
        Ok(())
    }

    pub(crate) fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::ContextMismatch);
        }
        Ok(())
    }

    /// Cross-entropy loss of `logits` against `labels`, with the gradient written into `logits`
    /// in place. Enqueued on `stream`; returns without waiting. Read the loss with
    /// [`Loss::read`], which also reports labels out of range.
    pub fn forward_backward<T: Element, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        logits: &mut impl DevicePtrMut<T>,
        labels: &impl DevicePtr<L>,
        shape: Shape,
        opts: &Options,
    ) -> Result<Loss> {
        shape.validate(logits.len(), labels.len())?;
        let mut out = Loss::new(stream, shape.rows())?;
        self.forward_backward_into(stream, logits, labels, shape, opts, &mut out)?;
        Ok(out)
    }

    /// As [`forward_backward`](Self::forward_backward), into buffers made beforehand (so the
    /// call allocates nothing, e.g. under CUDA graph capture).
    pub fn forward_backward_into<T: Element, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        logits: &mut impl DevicePtrMut<T>,
        labels: &impl DevicePtr<L>,
        shape: Shape,
        opts: &Options,
        out: &mut Loss,
    ) -> Result<()> {
        self.check_stream(stream)?;
        shape.validate(logits.len(), labels.len())?;
        let (logits_ptr, _logits_guard) = logits.device_ptr_mut(stream);
        self.enqueue::<T, L>(stream, logits_ptr, labels, shape, opts, out, MODE_FUSED)
    }

    /// Two-phase mode, forward: the loss, per-row loss and log-sum-exp (and the options'
    /// outputs) into `out`, reading each logit once and writing nothing to the logits. Keep `out`
    /// for [`backward_into`](Self::backward_into) / [`backward_in_place`](Self::backward_in_place)
    /// once the upstream gradient is known: only O(rows) memory is kept between the two.
    pub fn forward<T: Element, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<L>,
        shape: Shape,
        opts: &Options,
        out: &mut Loss,
    ) -> Result<()> {
        self.check_stream(stream)?;
        shape.validate(logits.len(), labels.len())?;
        let (logits_ptr, _logits_guard) = logits.device_ptr(stream);
        self.enqueue::<T, L>(stream, logits_ptr, labels, shape, opts, out, MODE_FORWARD)
    }

    /// Two-phase mode, backward: the gradient of `upstream · loss` (`upstream` one value, or one
    /// per row for [`Reduction::None`](crate::Reduction::None)) w.r.t. the logits, from the
    /// log-sum-exp a [`forward`](Self::forward) call with the same logits, labels, shape and options kept in
    /// `forward`, written into `grad` (same shape and row stride as the logits, and the same
    /// address modulo 16 bytes, as any buffer from `alloc` is). Reads and writes each element
    /// once: the upstream scaling costs no extra pass.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<T: Element, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<L>,
        shape: Shape,
        opts: &Options,
        forward: &Loss,
        upstream: &impl DevicePtr<f32>,
        grad: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        shape.validate(logits.len(), labels.len())?;
        shape.validate(grad.len(), labels.len())?;
        let (logits_ptr, _l) = logits.device_ptr(stream);
        let (grad_ptr, _g) = grad.device_ptr_mut(stream);
        let (labels_ptr, _b) = labels.device_ptr(stream);
        let (upstream_ptr, _u) = upstream.device_ptr(stream);
        let delta = grad_ptr.wrapping_sub(logits_ptr);
        self.enqueue_backward::<T, L>(
            stream,
            (
                logits_ptr,
                delta,
                labels_ptr,
                (upstream_ptr, upstream.len()),
            ),
            shape,
            opts,
            forward,
        )
    }

    /// As [`backward_into`](Self::backward_into), the gradient written over the logits.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_in_place<T: Element, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        logits: &mut impl DevicePtrMut<T>,
        labels: &impl DevicePtr<L>,
        shape: Shape,
        opts: &Options,
        forward: &Loss,
        upstream: &impl DevicePtr<f32>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        shape.validate(logits.len(), labels.len())?;
        let (logits_ptr, _l) = logits.device_ptr_mut(stream);
        let (labels_ptr, _b) = labels.device_ptr(stream);
        let (upstream_ptr, _u) = upstream.device_ptr(stream);
        self.enqueue_backward::<T, L>(
            stream,
            (logits_ptr, 0, labels_ptr, (upstream_ptr, upstream.len())),
            shape,
            opts,
            forward,
        )
    }

    /// Checks a backward against the forward `Loss` it reads, then launches the backward kernel:
    /// `ptrs` = (logits, grad - logits in bytes, labels, (upstream, its length)).
    fn enqueue_backward<T: Element, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        ptrs: (u64, u64, u64, (u64, usize)),
        shape: Shape,
        opts: &Options,
        forward: &Loss,
    ) -> Result<()> {
        if forward.rows != shape.rows() {
            return Err(Error::InvalidOption(format!(
                "the forward Loss holds {} rows, the shape has {}",
                forward.rows,
                shape.rows()
            )));
        }
        let same_weights = opts
            .weight
            .as_ref()
            .is_none_or(|w| same_bits(&forward.weight_host, w));
        if forward.loss_key != Some(LossKey::of(opts, opts.weight.is_some())) || !same_weights {
            return Err(Error::InvalidOption(
                "backward needs the loss options of the forward call that made `forward` (one of \
                 ignore_index, reduction, causal_shift, label_smoothing, lse_square_scale, \
                 softcap, weight differs)"
                    .to_string(),
            ));
        }
        let weight = match (&opts.weight, forward.weight.as_ref()) {
            (Some(_), Some(w)) => w.device_ptr(stream).0,
            _ => 0,
        };
        let (counts, _c) = forward.counts.device_ptr(stream);
        let (row_lse, _s) = forward.row_lse.device_ptr(stream);
        let (logits, grad_delta, labels, upstream) = ptrs;
        let call = KernelCall {
            dtype: T::DTYPE,
            label: L::NAME,
            logits,
            labels,
            shape,
            weight,
        };
        self.launch_backward(
            stream, &call, opts, counts, row_lse, upstream, grad_delta, None,
        )
    }

    /// Launches the two-phase backward kernel of `call` from a forward's `counts` and `row_lse`
    /// (device addresses), `upstream` = (address, length), the gradient `grad_delta` bytes from
    /// each logit (0: in place; a multiple of 16). Every address has been checked by the caller.
    /// With `slice` = `(start, len, row_stride)` the logits hold columns `[start, start + len)`
    /// of `call.shape.vocab`, `row_stride` elements apart, and only their gradient is written.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_backward(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        counts: u64,
        row_lse: u64,
        upstream: (u64, usize),
        grad_delta: u64,
        slice: Option<(usize, usize, usize)>,
    ) -> Result<()> {
        let (upstream_ptr, upstream_len) = upstream;
        let shape = call.shape;
        opts.validate_except_weight_values(shape.vocab)?;
        let rows = shape.rows();
        crate::options::check_upstream_len(rows, upstream_len)?;
        if !grad_delta.is_multiple_of(16) {
            return Err(Error::InvalidOption(
                "the gradient buffer must start at the same address modulo 16 bytes as the logits"
                    .to_string(),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        // A slice of the vocabulary: its columns only, `row_stride` elements apart in memory.
        let (slice_start, slice_len, _) = slice.unwrap_or((0, 0, 0));
        let (columns, row_shape) = match slice {
            Some((start, len, row_stride)) => {
                if len == 0 || start + len > shape.vocab || row_stride < len {
                    return Err(Error::InvalidOption(format!(
                        "vocabulary slice [{start}, {}) of [0, {}) with rows {row_stride} apart",
                        start + len,
                        shape.vocab
                    )));
                }
                (
                    len,
                    Shape {
                        row_stride,
                        ..shape
                    },
                )
            }
            None => (shape.vocab, shape),
        };
        let (n_tiles, blocks) = plan::tile_grid(rows, columns)?;
        let params = XentParams {
            rows: self.rows_params(call.logits, call.labels, row_shape, opts),
            counts,
            row_loss: 0,
            row_lse,
            partials: 0,
            reduction: opts.reduction.code(),
            grad_scale: opts.grad_scale,
            n_chunks: n_tiles as u32,
            chunk_len: plan::SCALE_TILE as u32,
            mode: MODE_FUSED,
            upstream_per_row: (upstream_len == rows && rows > 1) as u32,
            grad_delta,
            upstream: upstream_ptr,
            opts: opt_params(opts, call.weight, 0),
            slice_start: slice_start as u32,
            slice_len: slice_len as u32,
            ..XentParams::default()
        };
        let kernel = backward_kernel(call, opts);
        self.preload([Some(kernel)])?;
        self.launch(
            stream,
            kernel,
            &params,
            blocks,
            plan::SCALE_THREADS,
            SMEM_REDUCTION_BYTES,
        )
    }

    pub(crate) fn rows_params(
        &self,
        logits: u64,
        labels: u64,
        shape: Shape,
        opts: &Options,
    ) -> RowsParams {
        RowsParams {
            logits,
            labels,
            n_rows: shape.rows() as u64,
            row_stride: shape.row_stride as u64,
            vocab: shape.vocab as u32,
            seq_len: if opts.causal_shift {
                shape.seq_len as u32
            } else {
                0
            },
            ignore_index: opts.ignore_index,
        }
    }

    /// Prepares `out` for a call (partials, class weights, accuracy buffer, the options' record),
    /// then enqueues count, the cross-entropy kernel(s) in `mode` and finish.
    #[allow(clippy::too_many_arguments)]
    fn enqueue<T: Element, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        logits_ptr: u64,
        labels: &impl DevicePtr<L>,
        shape: Shape,
        opts: &Options,
        out: &mut Loss,
        mode: u32,
    ) -> Result<()> {
        opts.validate_except_weight_values(shape.vocab)?;
        let rows = shape.rows();
        if out.rows != rows {
            return Err(Error::InvalidOption(format!(
                "the Loss buffers hold {} rows, the shape has {rows}",
                out.rows
            )));
        }
        let launch_plan = self.plan_for(&shape, T::DTYPE, opts)?;
        out.reserve_partials(stream, plan::partials_len(rows, &launch_plan))?;
        out.prepare(stream, opts)?;

        let (labels_ptr, _labels_guard) = labels.device_ptr(stream);
        let (counts, _c) = out.counts.device_ptr_mut(stream);
        let (row_loss, _l) = out.row_loss.device_ptr_mut(stream);
        let (row_lse, _s) = out.row_lse.device_ptr_mut(stream);
        let (loss, _f) = out.loss.device_ptr_mut(stream);
        let (extras, _e) = out.extras.device_ptr_mut(stream);
        let partials = match out.partials.as_mut() {
            Some(p) => p.device_ptr_mut(stream).0,
            None => 0,
        };
        let weight = match (&opts.weight, out.weight.as_mut()) {
            (Some(_), Some(w)) => w.device_ptr_mut(stream).0,
            _ => 0,
        };
        let row_correct = match (opts.return_token_accuracy, out.row_correct.as_mut()) {
            (true, Some(c)) => c.device_ptr_mut(stream).0,
            _ => 0,
        };
        let predicted = match (opts.return_predicted_tokens, out.predicted.as_mut()) {
            (true, Some(c)) => c.device_ptr_mut(stream).0,
            _ => 0,
        };
        let call = KernelCall {
            dtype: T::DTYPE,
            label: L::NAME,
            logits: logits_ptr,
            labels: labels_ptr,
            shape,
            weight,
        };
        let buffers = LossBuffers {
            loss,
            row_loss,
            row_lse,
            counts,
            extras,
            row_correct,
            predicted,
            partials,
            // `Loss` allocates its counts zeroed, and small calls leave the done counter at 0.
            done_zeroed: true,
        };
        self.launch_loss(stream, &call, opts, launch_plan, &buffers, mode)
    }

    /// Enqueues count, the cross-entropy kernel(s) of `launch_plan` in `mode` and finish for
    /// `call`, into `out`. Every address has been checked by the caller against the shape and the
    /// plan (`out.partials` holds [`plan::partials_len`] words, `out.row_correct` one word per row
    /// when `opts.return_token_accuracy`).
    pub(crate) fn launch_loss(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        launch_plan: LaunchPlan,
        out: &LossBuffers,
        mode: u32,
    ) -> Result<()> {
        let rows = call.shape.rows();
        let small = self.small_finish.load(Ordering::Relaxed)
            && plan::self_finish(rows, &launch_plan, opts, call.weight != 0);
        let small_kernel = self.small_kernel(rows, &launch_plan, opts, call.weight != 0, small);
        self.preload(loss_kernels(call, opts, &launch_plan, small, small_kernel))?;
        // The predicted tokens first: the fused modes write the gradient over the logits.
        self.launch_argmax(stream, call, opts, out.predicted)?;
        if !small {
            self.launch_count(stream, call, opts, out.counts)?;
            self.launch_main(stream, call, opts, launch_plan, out, mode, false)?;
            return self.launch_finish(stream, rows, call.weight != 0, opts, out);
        }
        if !out.done_zeroed {
            // SAFETY: `out.counts` holds `COUNT_WORDS` words (checked by the caller).
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    out.counts + 4 * COUNT_DONE as u64,
                    0,
                    4,
                    stream.cu_stream(),
                )
            }?;
        }
        self.launch_main(stream, call, opts, launch_plan, out, mode, true)
    }

    /// Enqueues the count kernel over `call`'s labels (its logits unread) into `counts`, zeroed
    /// first unless the kernel's one block stores every word (few rows, or class weights).
    pub(crate) fn launch_count(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        counts: u64,
    ) -> Result<()> {
        let shape = call.shape;
        let rows = shape.rows();
        let weight = call.weight;
        let rows_params = self.rows_params(call.logits, call.labels, shape, opts);
        // With class weights one block sums them, in a fixed order.
        let (blocks, threads) = if weight != 0 {
            (1, plan::COUNT_WEIGHT_THREADS)
        } else {
            (plan::count_blocks(rows, self.limits), plan::COUNT_THREADS)
        };
        if rows == 0 || blocks > 1 {
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    counts,
                    0,
                    4 * COUNT_WORDS,
                    stream.cu_stream(),
                )
            }?;
        }
        if rows > 0 {
            let params = CountParams {
                rows: rows_params,
                counts,
                weight,
                sum_class_weights: (weight != 0 && opts.label_smoothing != 0.0) as u32,
                _pad: 0,
            };
            self.launch(
                stream,
                Kernel::Count { label: call.label },
                &params,
                blocks,
                threads,
                SMEM_REDUCTION_BYTES,
            )?;
        }
        Ok(())
    }

    /// Enqueues the cross-entropy kernel(s) of `launch_plan` over `call`'s rows, reading the
    /// counts of `out.counts` (which may cover more rows than `call`: a linear layer's chunk);
    /// with `self_finish` (a call that [`plan::self_finish`] allows) the kernel counts and finishes
    /// itself instead.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_main(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        launch_plan: LaunchPlan,
        out: &LossBuffers,
        mode: u32,
        self_finish: bool,
    ) -> Result<()> {
        let shape = call.shape;
        let rows = shape.rows();
        let weight = call.weight;
        let counts = out.counts;
        if rows > 0 {
            let rows_params = self.rows_params(call.logits, call.labels, shape, opts);
            let mut params = XentParams {
                rows: rows_params,
                counts,
                row_loss: out.row_loss,
                row_lse: out.row_lse,
                partials: out.partials,
                reduction: opts.reduction.code(),
                grad_scale: opts.grad_scale,
                n_chunks: 1,
                chunk_len: shape.vocab as u32,
                mode,
                upstream_per_row: 0,
                grad_delta: 0,
                upstream: 0,
                opts: opt_params(opts, weight, out.row_correct),
                self_finish: self_finish as u32,
                loss: out.loss,
                extras: out.extras,
                ..XentParams::default()
            };
            let kernel = |kind| xent_kernel(call, opts, kind);
            match launch_plan {
                LaunchPlan::Fused {
                    threads,
                    smem_bytes,
                } => {
                    self.launch(
                        stream,
                        kernel(XentKind::Fused),
                        &params,
                        rows as u32,
                        threads,
                        smem_bytes,
                    )?;
                }
                LaunchPlan::Chunked {
                    threads,
                    chunk_len,
                    n_chunks,
                } => {
                    params.n_chunks = n_chunks;
                    params.chunk_len = chunk_len;
                    let blocks = (rows * n_chunks as usize) as u32;
                    self.launch(
                        stream,
                        kernel(XentKind::ChunkPartial),
                        &params,
                        blocks,
                        threads,
                        SMEM_REDUCTION_BYTES,
                    )?;
                    self.launch(
                        stream,
                        kernel(XentKind::ChunkGrad),
                        &params,
                        blocks,
                        threads,
                        SMEM_REDUCTION_BYTES,
                    )?;
                }
                LaunchPlan::Cluster {
                    threads,
                    chunk_len,
                    size,
                    smem_bytes,
                } => {
                    params.n_chunks = size;
                    params.chunk_len = chunk_len;
                    let blocks = (rows * size as usize) as u32;
                    // A small call's kernel waits for the one before it in the kernel
                    // (`griddepcontrol.wait`), so its launch need not.
                    let pdl = self_finish && self.pdl.load(Ordering::Relaxed);
                    let small =
                        self.small_kernel(rows, &launch_plan, opts, weight != 0, self_finish);
                    self.launch_cluster(
                        stream,
                        kernel(cluster_kind(small)),
                        &params,
                        (blocks, threads, smem_bytes),
                        size,
                        pdl,
                    )?;
                }
                LaunchPlan::Split {
                    threads,
                    chunk_len,
                    n_chunks,
                    groups,
                    smem_bytes,
                } => {
                    params.n_chunks = n_chunks;
                    params.chunk_len = chunk_len;
                    // The groups' counters, after their summaries, start at 0.
                    let summaries =
                        2 * crate::abi::PARTIAL_WORDS * n_chunks as usize * groups as usize;
                    // SAFETY: `out.partials` holds `partials_len` words (checked by the caller).
                    unsafe {
                        cudarc::driver::result::memset_d8_async(
                            out.partials + 4 * summaries as u64,
                            0,
                            4 * groups as usize,
                            stream.cu_stream(),
                        )?;
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (groups * n_chunks, 1, 1),
                        block_dim: (threads, 1, 1),
                        shared_mem_bytes: smem_bytes,
                    };
                    let function = self.kernel(kernel(XentKind::Split))?;
                    // SAFETY: as in `launch`; the plan sized the grid to what is resident at once,
                    // and the driver refuses a cooperative launch that is not.
                    unsafe {
                        stream
                            .launch_builder(function)
                            .arg(&params)
                            .launch_cooperative(cfg)
                    }?;
                }
            }
        }
        Ok(())
    }

    /// Enqueues the predicted-tokens kernel over `call`'s logits into `out` (`[i64; rows]`; 0:
    /// nothing to do): before anything writes a gradient over them.
    pub(crate) fn launch_argmax(
        &self,
        stream: &Arc<CudaStream>,
        call: &KernelCall,
        opts: &Options,
        out: u64,
    ) -> Result<()> {
        let rows = call.shape.rows();
        if rows == 0 || out == 0 {
            return Ok(());
        }
        let kernel = argmax_kernel(call);
        let params = ArgmaxParams {
            rows: self.rows_params(call.logits, call.labels, call.shape, opts),
            out,
        };
        self.preload([Some(kernel)])?;
        self.launch(
            stream,
            kernel,
            &params,
            plan::argmax_blocks(rows, self.limits),
            plan::ARGMAX_THREADS,
            SMEM_REDUCTION_BYTES,
        )
    }

    /// Enqueues the finish kernel: the reduced loss of `rows` rows of `out`.
    pub(crate) fn launch_finish(
        &self,
        stream: &Arc<CudaStream>,
        rows: usize,
        weighted: bool,
        opts: &Options,
        out: &LossBuffers,
    ) -> Result<()> {
        let params = FinishParams {
            row_loss: out.row_loss,
            counts: out.counts,
            loss: out.loss,
            n_rows: rows as u64,
            reduction: opts.reduction.code(),
            weighted: weighted as u32,
            row_lse: out.row_lse,
            row_correct: out.row_correct,
            extras: out.extras,
            lse_square_scale: opts.lse_square_scale,
            _pad: 0,
        };
        self.launch(
            stream,
            Kernel::Finish,
            &params,
            1,
            plan::FINISH_THREADS,
            SMEM_REDUCTION_BYTES,
        )
    }

    /// Scales a gradient in place by an upstream gradient on the device: `upstream` holds one
    /// value (every row) or one per row (e.g. the upstream of `Reduction::None`).
    pub fn scale_grad<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        grad: &mut impl DevicePtrMut<T>,
        shape: Shape,
        upstream: &impl DevicePtr<f32>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        shape.validate(grad.len(), shape.rows())?;
        let (grad_ptr, _g) = grad.device_ptr_mut(stream);
        let (upstream_ptr, _u) = upstream.device_ptr(stream);
        self.launch_scale(
            stream,
            T::DTYPE,
            grad_ptr,
            shape,
            (upstream_ptr, upstream.len()),
        )
    }

    /// Launches the scaling kernel over `grad` (`dtype`, checked against `shape` by the caller)
    /// with `upstream` = (address, length). Where a factor is exactly 1 the kernel returns without
    /// touching the gradient (see `kernels-gpu/src/scale.rs`).
    pub(crate) fn launch_scale(
        &self,
        stream: &Arc<CudaStream>,
        dtype: DType,
        grad: u64,
        shape: Shape,
        upstream: (u64, usize),
    ) -> Result<()> {
        let rows = shape.rows();
        crate::options::check_upstream_len(rows, upstream.1)?;
        if rows == 0 {
            return Ok(());
        }
        let (n_tiles, blocks) = plan::scale_grid(rows, shape.vocab, self.limits)?;
        let params = ScaleParams {
            grad,
            upstream: upstream.0,
            n_rows: rows as u64,
            row_stride: shape.row_stride as u64,
            vocab: shape.vocab as u32,
            per_row: (upstream.1 == rows && rows > 1) as u32,
            tile_len: plan::SCALE_TILE as u32,
            n_tiles: n_tiles as u32,
        };
        self.preload([Some(Kernel::Scale { dtype })])?;
        self.launch(
            stream,
            Kernel::Scale { dtype },
            &params,
            blocks,
            plan::SCALE_THREADS,
            0,
        )
    }

    /// Launches `kernel` on (blocks, threads, dynamic shared bytes) with thread-block clusters of
    /// `cluster` CTAs (`cuLaunchKernelEx`); with `pdl`, also with a programmatic dependency on
    /// the stream's previous kernel (a programmatic dependent launch: the grid may start before
    /// that kernel ends, so `kernel` must wait for it, `griddepcontrol.wait`, before it touches
    /// memory).
    fn launch_cluster<P: DeviceRepr>(
        &self,
        stream: &CudaStream,
        kernel: Kernel,
        params: &P,
        (blocks, threads, smem_bytes): (u32, u32, u32),
        cluster: u32,
        pdl: bool,
    ) -> Result<()> {
        use cudarc::driver::sys;
        let mut attributes = [cluster_attribute(cluster), programmatic_attribute()];
        let used = 1 + usize::from(pdl);
        let mut config = cluster_config(
            cluster,
            threads,
            smem_bytes,
            stream.cu_stream(),
            &mut attributes[..used],
        );
        config.gridDimX = blocks;
        let function = self.kernel(kernel)?;
        let mut args = [params as *const P as *mut std::ffi::c_void];
        self.ctx.bind_to_thread()?;
        // SAFETY: as in `launch`; `args` points at the one parameter block the entry point takes,
        // and the driver copies it before returning.
        let result = unsafe {
            sys::cuLaunchKernelEx(
                &config,
                function.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        result.result()?;
        Ok(())
    }

    pub(crate) fn launch<P: DeviceRepr>(
        &self,
        stream: &CudaStream,
        kernel: Kernel,
        params: &P,
        blocks: u32,
        threads: u32,
        smem_bytes: u32,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem_bytes,
        };
        let function = self.kernel(kernel)?;
        // SAFETY: `params` is the parameter block this entry point declares, every address in it
        // was bounds-checked against the shape above, and the buffers outlive the enqueued work
        // (cudarc's stream-ordered frees).
        unsafe { stream.launch_builder(function).arg(params).launch(cfg) }?;
        Ok(())
    }
}

/// A cross-entropy call as the kernels see it: element and label types, device addresses (the
/// class weights' or 0), the shape.
pub(crate) struct KernelCall {
    pub dtype: DType,
    /// [`Label::NAME`] of the label type.
    pub label: &'static str,
    pub logits: u64,
    pub labels: u64,
    pub shape: Shape,
    pub weight: u64,
}

/// The device addresses of a call's outputs (see [`Loss`]): `row_correct` and `partials` are 0
/// when the call needs none.
pub(crate) struct LossBuffers {
    pub loss: u64,
    pub row_loss: u64,
    pub row_lse: u64,
    pub counts: u64,
    pub extras: u64,
    pub row_correct: u64,
    /// `[i64; rows]` of predicted tokens (`return_predicted_tokens`; 0: none).
    pub predicted: u64,
    pub partials: u64,
    /// Whether `counts[COUNT_DONE]` is known to be 0 (buffers xent allocated); otherwise a small
    /// call zeroes it first.
    pub done_zeroed: bool,
}

/// A launch attribute `id` with its value zeroed, for the caller to set.
fn launch_attribute(
    id: cudarc::driver::sys::CUlaunchAttributeID,
) -> cudarc::driver::sys::CUlaunchAttribute {
    cudarc::driver::sys::CUlaunchAttribute {
        id,
        pad: [0; 4],
        value: cudarc::driver::sys::CUlaunchAttributeValue { pad: [0; 64] },
    }
}

/// The cross-entropy kernel of `kind` for `call` with `opts` (its [`variant`]).
fn xent_kernel(call: &KernelCall, opts: &Options, kind: XentKind) -> Kernel {
    Kernel::Xent {
        kind,
        variant: variant(opts, call.weight != 0, opts.return_token_accuracy),
        dtype: call.dtype,
        label: call.label,
    }
}

/// The predicted-tokens kernel of `call` ([`CrossEntropy::launch_argmax`]).
pub(crate) fn argmax_kernel(call: &KernelCall) -> Kernel {
    Kernel::Argmax {
        dtype: call.dtype,
        label: call.label,
    }
}

/// The two-phase backward kernel of `call` with `opts` (it never counts the token accuracy).
pub(crate) fn backward_kernel(call: &KernelCall, opts: &Options) -> Kernel {
    Kernel::Xent {
        kind: XentKind::Backward,
        variant: variant(opts, call.weight != 0, false),
        dtype: call.dtype,
        label: call.label,
    }
}

/// The cluster plan's kernels: the small-call ones for a call that takes them
/// ([`CrossEntropy::small_kernel`]).
fn cluster_kind(small_kernel: bool) -> XentKind {
    if small_kernel {
        XentKind::ClusterSmall
    } else {
        XentKind::Cluster
    }
}

/// The cross-entropy kernels that [`CrossEntropy::launch_main`] launches for `launch_plan`
/// (`small_kernel`: the call takes the small-call kernels, [`CrossEntropy::small_kernel`]).
pub(crate) fn main_kernels(
    call: &KernelCall,
    opts: &Options,
    launch_plan: &LaunchPlan,
    small_kernel: bool,
) -> [Option<Kernel>; 2] {
    let kernel = |kind| Some(xent_kernel(call, opts, kind));
    match launch_plan {
        LaunchPlan::Fused { .. } => [kernel(XentKind::Fused), None],
        LaunchPlan::Chunked { .. } => [kernel(XentKind::ChunkPartial), kernel(XentKind::ChunkGrad)],
        LaunchPlan::Cluster { .. } => [kernel(cluster_kind(small_kernel)), None],
        LaunchPlan::Split { .. } => [kernel(XentKind::Split), None],
    }
}

/// Every kernel [`CrossEntropy::launch_loss`] launches for `launch_plan`: count and finish
/// unless the call is `small` (it counts and finishes in its one kernel), and
/// [`main_kernels`].
pub(crate) fn loss_kernels(
    call: &KernelCall,
    opts: &Options,
    launch_plan: &LaunchPlan,
    small: bool,
    small_kernel: bool,
) -> [Option<Kernel>; 4] {
    let [first, second] = main_kernels(call, opts, launch_plan, small_kernel);
    [
        (!small).then_some(Kernel::Count { label: call.label }),
        first,
        second,
        (!small).then_some(Kernel::Finish),
    ]
}

/// Sets what a kernel needs before its first launch: the dynamic shared memory the plans may give
/// the kernels that keep rows on chip (the device's opt-in maximum), and clusters past 8 CTAs.
fn configure(function: &CudaFunction, name: &str, limits: DeviceLimits) -> Result<()> {
    if [
        "xent_fused_",
        "xent_cluster_",
        "xent_split_",
        "xent_lse_gemm_",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
    {
        function.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            limits.max_smem_per_block as i32,
        )?;
    }
    if name.starts_with("xent_cluster_") {
        function.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
            1,
        )?;
    }
    Ok(())
}

/// The launch attribute that sets a cluster of `size` CTAs along x.
fn cluster_attribute(size: u32) -> cudarc::driver::sys::CUlaunchAttribute {
    use cudarc::driver::sys::CUlaunchAttributeID;
    let mut attribute =
        launch_attribute(CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION);
    attribute.value.clusterDim.x = size;
    attribute.value.clusterDim.y = 1;
    attribute.value.clusterDim.z = 1;
    attribute
}

/// The launch attribute that lets a grid start before the stream's previous kernel has ended
/// (programmatic stream serialization); the kernel waits for it itself.
fn programmatic_attribute() -> cudarc::driver::sys::CUlaunchAttribute {
    use cudarc::driver::sys::CUlaunchAttributeID;
    let mut attribute = launch_attribute(
        CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
    );
    attribute.value.programmaticStreamSerializationAllowed = 1;
    attribute
}

/// A launch of one cluster of `size` CTAs (the caller sets the grid) with `attributes` (the
/// first from [`cluster_attribute`]), which must outlive the config.
fn cluster_config(
    size: u32,
    threads: u32,
    smem_bytes: u32,
    stream: cudarc::driver::sys::CUstream,
    attributes: &mut [cudarc::driver::sys::CUlaunchAttribute],
) -> cudarc::driver::sys::CUlaunchConfig {
    cudarc::driver::sys::CUlaunchConfig {
        gridDimX: size,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem_bytes,
        hStream: stream,
        attrs: attributes.as_mut_ptr(),
        numAttrs: attributes.len() as u32,
    }
}
