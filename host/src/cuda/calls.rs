//! The public calls on device buffers: checked against their shape and stream, then enqueued
//! ([`launch`](super::launch)).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::CrossEntropy;
use super::launch::{KernelCall, LossBuffers};
use crate::abi::{MODE_FORWARD, MODE_FUSED};
use crate::error::{Error, Result};
use crate::loss::{Loss, LossKey, same_bits};
use crate::options::{Element, Label, Options, Shape};
use crate::plan;
use crate::raw::{RawBuffer, entropy_pair};

impl CrossEntropy {
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
        let none: Option<&CudaSlice<f32>> = None;
        self.backward_to(
            stream, logits, labels, shape, opts, forward, upstream, none, grad,
        )
    }

    /// As [`backward_into`](Self::backward_into), with the gradient of the entropies added: of
    /// `upstream · loss + Σ_r entropy_upstream[r]·H_r`, where `H_r` is row `r`'s entropy as the
    /// forward returned it (`forward` must come from a call with
    /// [`Options::return_entropy`](crate::Options::return_entropy); `entropy_upstream` holds one
    /// `f32` a row). `dH/dy_j = p_j·(lse - H - y_j)` for the softmax `p` of the soft-capped
    /// logits `y` (the soft cap's derivative then applies); rows not scored get no gradient. An
    /// entropy bonus in RL (`loss - β·mean(H)`) is `entropy_upstream = -β / rows` a row. The
    /// per-element (`opt_`) backward kernel computes it, whatever the options.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with_entropy_into<T: Element, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<L>,
        shape: Shape,
        opts: &Options,
        forward: &Loss,
        upstream: &impl DevicePtr<f32>,
        entropy_upstream: &impl DevicePtr<f32>,
        grad: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.backward_to(
            stream,
            logits,
            labels,
            shape,
            opts,
            forward,
            upstream,
            Some(entropy_upstream),
            grad,
        )
    }

    /// [`backward_into`](Self::backward_into), with the entropies' gradient where
    /// `entropy_upstream` is given.
    #[allow(clippy::too_many_arguments)]
    fn backward_to<T: Element, L: Label, E: DevicePtr<f32>>(
        &self,
        stream: &Arc<CudaStream>,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<L>,
        shape: Shape,
        opts: &Options,
        forward: &Loss,
        upstream: &impl DevicePtr<f32>,
        entropy_upstream: Option<&E>,
        grad: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        shape.validate(logits.len(), labels.len())?;
        shape.validate(grad.len(), labels.len())?;
        let (logits_ptr, _l) = logits.device_ptr(stream);
        let (grad_ptr, _g) = grad.device_ptr_mut(stream);
        let (labels_ptr, _b) = labels.device_ptr(stream);
        let (upstream_ptr, _u) = upstream.device_ptr(stream);
        let entropy = entropy_upstream.map(|e| (e.device_ptr(stream), e.len()));
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
            entropy.as_ref().map(|((ptr, _), len)| (*ptr, *len)),
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
            None,
        )
    }

    /// Checks a backward against the forward `Loss` it reads, then launches the backward kernel:
    /// `ptrs` = (logits, grad - logits in bytes, labels, (upstream, its length)); with
    /// `entropy_upstream` (address, length), the entropies' gradient too.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_backward<T: Element, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        ptrs: (u64, u64, u64, (u64, usize)),
        shape: Shape,
        opts: &Options,
        forward: &Loss,
        entropy_upstream: Option<(u64, usize)>,
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
        let entropies = match &forward.entropy {
            Some(e) if forward.entropy_on => Some(RawBuffer::new(e.device_ptr(stream).0, e.len())),
            _ => None,
        };
        let entropy_upstream = entropy_upstream.map(|(ptr, len)| RawBuffer::new(ptr, len));
        let entropy = entropy_pair(entropies, entropy_upstream, shape.rows())?;
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
            stream, &call, opts, counts, row_lse, upstream, grad_delta, None, entropy,
        )
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
        let entropy = match (opts.return_entropy, out.entropy.as_mut()) {
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
            entropy,
            partials,
            // `Loss` allocates its counts zeroed, and small calls leave the done counter at 0.
            done_zeroed: true,
        };
        self.launch_loss(stream, &call, opts, launch_plan, &buffers, mode)
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
}
