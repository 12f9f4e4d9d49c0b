//! Launches through the driver: a plain launch, and one with thread-block clusters (and a
//! programmatic dependency) through `cuLaunchKernelEx`'s attributes.

use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::CrossEntropy;
use crate::error::Result;
use crate::kernels::Kernel;

impl CrossEntropy {
    /// Launches `kernel` on (blocks, threads, dynamic shared bytes) with thread-block clusters of
    /// `cluster` CTAs (`cuLaunchKernelEx`); with `pdl`, also with a programmatic dependency on
    /// the stream's previous kernel (a programmatic dependent launch: the grid may start before
    /// that kernel ends, so `kernel` must wait for it, `griddepcontrol.wait`, before it touches
    /// memory).
    pub(super) fn launch_cluster<P: DeviceRepr>(
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

/// The launch attribute that sets a cluster of `size` CTAs along x.
pub(super) fn cluster_attribute(size: u32) -> cudarc::driver::sys::CUlaunchAttribute {
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
pub(super) fn cluster_config(
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
