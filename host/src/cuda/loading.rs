//! The handle's kernel table: each kernel loaded when the handle is made or on its first use
//! (a module of its own), and what a kernel needs set before its first launch.

use std::sync::atomic::Ordering;

use cudarc::driver::CudaFunction;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::nvrtc::Ptx;

use super::CrossEntropy;
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::plan::DeviceLimits;
#[cfg(doc)]
use crate::ptx_index::PtxIndex;

impl CrossEntropy {
    /// The function of `kernel` (its canonical kernel's), loaded now if the handle loads kernels
    /// on first use; `None` if the handle has no such kernel (one of another architecture's plans).
    pub(super) fn kernel_if_any(&self, kernel: Kernel) -> Option<Result<&CudaFunction>> {
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
    pub(super) fn kernel(&self, kernel: Kernel) -> Result<&CudaFunction> {
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
}

/// Sets what a kernel needs before its first launch: the dynamic shared memory the plans may give
/// the kernels that keep rows on chip (the device's opt-in maximum), and clusters past 8 CTAs.
pub(super) fn configure(function: &CudaFunction, name: &str, limits: DeviceLimits) -> Result<()> {
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
