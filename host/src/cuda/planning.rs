//! Planning on this device: the automatic plans, remembered by the handle, and the driver's
//! occupancy answers they weigh (`cuOccupancyMaxActiveClusters`, a split kernel's resident CTAs).

use std::collections::HashMap;

use cudarc::driver::sys::CUfunction_attribute;

use super::CrossEntropy;
use super::driver::{cluster_attribute, cluster_config};
use super::launch::split_kind;
use crate::error::{Error, Result};
use crate::kernels::{ClusterLaunchKey, Kernel, PLAN_CACHE_MAX, XentKind, kernel_traits, variant};
use crate::options::{DType, Options, Shape};
use crate::plan::{self, LaunchPlan};

impl CrossEntropy {
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
            kernel_traits(variant, dtype),
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
            LaunchPlan::Split { threads, in_l2, .. } => (split_kind(in_l2), threads),
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
            kernel_traits(variant, dtype),
            threads,
            &mut |launch| self.active_clusters(&mut cache, variant, dtype, launch),
        )
    }

    /// CTAs of the split kernel (`kind`) of `variant` for `dtype` the device runs at once with
    /// `threads` and `smem_bytes` each (`None` if the driver cannot say).
    fn resident_split_ctas(
        &self,
        kind: XentKind,
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
                kind,
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
        if self.a100 {
            // The driver answers for this GPU's shared memory an SM (228 KiB on an H200).
            per_sm = per_sm.min(plan::a100_ctas_per_sm(smem_bytes));
        }
        Some(per_sm * self.limits.sm_count)
    }

    /// How many clusters of `launch` (a cluster plan of the `variant` kernels for `dtype`) the
    /// device runs at once, as the driver says (`None` if it cannot say), remembered in `cache`;
    /// for a split plan, how many of its CTAs (remembered under cluster size 0, split_l2's under
    /// `u32::MAX`).
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
            in_l2,
            ..
        } = launch
        {
            let key = (
                variant,
                dtype,
                threads,
                smem_bytes,
                if in_l2 { u32::MAX } else { 0 },
            );
            return *cache.entry(key).or_insert_with(|| {
                self.resident_split_ctas(split_kind(in_l2), variant, dtype, threads, smem_bytes)
            });
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
}
