//! Linear layer + cross-entropy as a candle op: `linear_cross_entropy(&hidden, &weight, &targets,
//! &opts)` is the loss of `hidden·weightᵀ` without the `[N, V]` logits in memory, differentiable
//! w.r.t. the hidden states and the weight (the LM head of a Rust training loop).
//!
//! CPU tensors run xent's f64 reference ([`crate::linear::cpu_forward_backward_upstream`]: the
//! logits in f64, O(N·V·D), for tests and small models). CUDA tensors (cargo feature
//! `candle-cuda`) run the linear path of `xent::linear` on candle's stream, a chunk of rows of
//! logits at a time: with gradients to come of a scalar loss, the fused pass in the forward
//! (three GEMMs a chunk) and the gradients scaled in the backward; otherwise two-phase (the
//! backward computes the chunks' logits again). See `linear_on_cuda.rs`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Storage, Tensor};

use super::{err, labels_of};
use crate::linear::{self, LinearShape};
use crate::options::{Element, Options, Reduction};

/// The loss of `hidden·weightᵀ` against `targets` with `opts`: `hidden` `[..., D]` (f32, f16 or
/// bf16, contiguous), `weight` `[V, D]` of the same dtype (contiguous), `targets` class indices
/// (u32, i64 or i32) of `hidden`'s leading shape (`[batch, seq_len]` for the causal shift). The
/// loss is an f32 tensor: a scalar, or per row for `Reduction::None`. `loss.backward()` yields the
/// gradients of `upstream · loss` w.r.t. `hidden` and `weight`, in their dtype. No bias (an LM
/// head has none); `return_predicted_tokens` and `return_entropy` are refused (the op returns the
/// loss only).
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    opts: &Options,
) -> candle_core::Result<Tensor> {
    let vocab = weight.dims().first().copied().unwrap_or(0);
    opts.validate(vocab).map_err(err)?;
    if opts.return_predicted_tokens || opts.return_entropy {
        candle_core::bail!(
            "xent linear_cross_entropy: return_predicted_tokens and return_entropy are not \
             supported here (the op returns the loss only)"
        );
    }
    if hidden.dtype() != weight.dtype() {
        candle_core::bail!(
            "xent linear_cross_entropy: hidden states of {:?} and a weight of {:?}: they must \
             have one dtype",
            hidden.dtype(),
            weight.dtype()
        );
    }
    hidden.apply_op3(
        weight,
        targets,
        Forward {
            opts: opts.clone(),
            // Gradients to come (an input candle tracks) of a scalar loss: on CUDA the forward
            // computes them too (three GEMMs a chunk, not four), for the backward to scale.
            fused: (hidden.track_op() || weight.track_op()) && opts.reduction != Reduction::None,
            #[cfg(feature = "candle-cuda")]
            saved: Default::default(),
        },
    )
}

/// The forward op over `(hidden, weight, targets)`: the loss.
struct Forward {
    opts: Options,
    /// On CUDA, compute both gradients of `grad_scale · loss` in the forward (a scalar loss).
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    fused: bool,
    /// What a CUDA forward keeps for the backward (label counts, per-row log-sum-exps).
    #[cfg(feature = "candle-cuda")]
    saved: super::on_cuda::SavedSlot,
}

/// The backward op over `(hidden, weight)`, with the targets and the upstream gradient kept in
/// it: both gradients, packed in one flat tensor (`hidden`'s, then `weight`'s).
struct Backward {
    opts: Options,
    targets: Tensor,
    upstream: Tensor,
    #[cfg(feature = "candle-cuda")]
    saved: super::on_cuda::SavedSlot,
}

/// The call's shape from the layouts of `hidden` (`[..., D]`), `weight` (`[V, D]`) and the
/// targets (`hidden`'s leading shape), all contiguous.
pub(super) fn linear_shape(
    hidden: &Layout,
    weight: &Layout,
    targets: &Layout,
) -> candle_core::Result<LinearShape> {
    let Some((&d, leading)) = hidden.dims().split_last() else {
        candle_core::bail!("xent linear_cross_entropy: hidden states need a feature dimension");
    };
    let &[vocab, weight_d] = weight.dims() else {
        candle_core::bail!(
            "xent linear_cross_entropy: the weight must be [V, D], not {:?}",
            weight.dims()
        );
    };
    if weight_d != d {
        candle_core::bail!(
            "xent linear_cross_entropy: hidden states of {d} features and a weight of {weight_d}"
        );
    }
    if targets.dims() != leading {
        candle_core::bail!(
            "xent linear_cross_entropy: targets of shape {:?}, the hidden states {:?} need {:?}",
            targets.dims(),
            hidden.dims(),
            leading
        );
    }
    if !hidden.is_contiguous() || !weight.is_contiguous() || !targets.is_contiguous() {
        candle_core::bail!(
            "xent linear_cross_entropy: hidden states, weight and targets must be contiguous"
        );
    }
    let rows: usize = leading.iter().product();
    let seq_len = leading.last().copied().unwrap_or(1);
    let (batch, seq_len) = if leading.len() >= 2 && seq_len > 0 {
        (rows / seq_len, seq_len)
    } else {
        (1, rows)
    };
    Ok(LinearShape {
        batch,
        seq_len,
        hidden: d,
        vocab,
    })
}

/// `$body` with `$h` and `$w` contiguous copies of the hidden states' and the weight's values
/// (one dtype: f32, f16 or bf16), and `$wrap` the `CpuStorage` variant of that dtype; any other
/// dtype returns the error.
macro_rules! with_values {
    (($s1:expr, $l1:expr), ($s2:expr, $l2:expr), |$h:ident, $w:ident, $wrap:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(h), CpuStorage::F32(w)) => {
                let ($h, $w, $wrap) = (values_of(h, $l1), values_of(w, $l2), CpuStorage::F32);
                $body
            }
            (CpuStorage::F16(h), CpuStorage::F16(w)) => {
                let ($h, $w, $wrap) = (values_of(h, $l1), values_of(w, $l2), CpuStorage::F16);
                $body
            }
            (CpuStorage::BF16(h), CpuStorage::BF16(w)) => {
                let ($h, $w, $wrap) = (values_of(h, $l1), values_of(w, $l2), CpuStorage::BF16);
                $body
            }
            (other, _) => return Err(unsupported(other)),
        }
    };
}

/// A contiguous copy of the values of `v` from `l`.
fn values_of<T: Copy>(v: &[T], l: &Layout) -> Vec<T> {
    let (start, end) = l.contiguous_offsets().expect("checked contiguous");
    v[start..end].to_vec()
}

/// The reference's loss and gradients of `upstream · loss` for one dtype.
fn reference<T: Element>(
    (hidden, weight): (&[T], &[T]),
    labels: &[i64],
    shape: LinearShape,
    opts: &Options,
    upstream: &[f32],
) -> candle_core::Result<linear::CpuLinear> {
    linear::cpu_forward_backward_upstream(hidden, weight, None, labels, shape, opts, upstream)
        .map_err(err)
}

/// Both gradients of the reference rounded once to `T`, packed (`hidden`'s, then `weight`'s).
fn packed<T: Element>(grads: &linear::CpuLinear) -> Vec<T> {
    grads
        .grad_hidden
        .iter()
        .chain(&grads.grad_weight)
        .map(|&g| T::from_f64(g))
        .collect()
}

fn unsupported(s: &CpuStorage) -> candle_core::Error {
    candle_core::Error::msg(format!(
        "xent linear_cross_entropy: values of dtype {:?}: expected f32, f16 or bf16",
        s.dtype()
    ))
}

/// The loss of `loss` as the op returns it: per row (of the targets' shape) or a scalar.
fn loss_storage(
    loss: &crate::cpu::CpuLoss,
    opts: &Options,
    targets: &Layout,
) -> (CpuStorage, candle_core::Shape) {
    match opts.reduction {
        Reduction::None => (
            CpuStorage::F32(loss.row_loss.iter().map(|&x| x as f32).collect()),
            candle_core::Shape::from(targets.dims()),
        ),
        Reduction::Mean | Reduction::Sum => (
            CpuStorage::F32(vec![loss.loss as f32]),
            candle_core::Shape::from(()),
        ),
    }
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "xent-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let shape = linear_shape(l1, l2, l3)?;
        let labels = labels_of(s3, l3)?;
        let opts = &self.opts;
        let one = [1.0f32];
        let result = with_values!((s1, l1), (s2, l2), |h, w, _wrap| {
            reference((&h, &w), &labels, shape, opts, &one)?
        });
        Ok(loss_storage(&result.loss, opts, l3))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        super::linear_on_cuda::forward(
            &self.opts,
            self.fused,
            &self.saved,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let upstream = grad_loss
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .contiguous()?;
        #[cfg(feature = "candle-cuda")]
        if super::linear_on_cuda::has_grads(&self.saved) {
            // The fused forward's gradients, each scaled by the upstream gradient in place.
            let take = |which: usize| TakeGrad {
                saved: self.saved.clone(),
                which,
            };
            let grad_hidden = hidden.apply_op2_no_bwd(&upstream, &take(0))?;
            let grad_weight = weight.apply_op2_no_bwd(&upstream, &take(1))?;
            return Ok((Some(grad_hidden), Some(grad_weight), None));
        }
        let grads = hidden.apply_op2_no_bwd(
            weight,
            &Backward {
                opts: self.opts.clone(),
                targets: targets.clone(),
                upstream,
                #[cfg(feature = "candle-cuda")]
                saved: self.saved.clone(),
            },
        )?;
        let n_hidden = hidden.elem_count();
        let grad_hidden = grads.narrow(0, 0, n_hidden)?.reshape(hidden.shape())?;
        let grad_weight = grads
            .narrow(0, n_hidden, weight.elem_count())?
            .reshape(weight.shape())?;
        Ok((Some(grad_hidden), Some(grad_weight), None))
    }
}

/// The op over `(values, upstream)` that hands over the fused CUDA forward's gradient w.r.t.
/// `values` (the hidden states, `which` 0, or the weight, 1), scaled by the upstream gradient.
#[cfg(feature = "candle-cuda")]
struct TakeGrad {
    saved: super::on_cuda::SavedSlot,
    which: usize,
}

#[cfg(feature = "candle-cuda")]
impl CustomOp2 for TakeGrad {
    fn name(&self) -> &'static str {
        "xent-linear-cross-entropy-take-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        candle_core::bail!("xent linear_cross_entropy: a fused forward's gradients are on the GPU")
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let grad = super::linear_on_cuda::take_grad(
            &self.saved,
            self.which,
            l1.shape().elem_count(),
            (s2, l2),
        )?;
        Ok((grad, l1.shape().clone()))
    }
}

impl Backward {
    /// The targets (class indices) and the upstream gradient, on the CPU.
    fn cpu_inputs(&self) -> candle_core::Result<(Vec<i64>, Layout, Vec<f32>)> {
        let (targets, targets_layout) = self.targets.storage_and_layout();
        let Storage::Cpu(targets) = &*targets else {
            candle_core::bail!("xent linear_cross_entropy: the targets are not on the CPU");
        };
        let labels = labels_of(targets, targets_layout)?;
        let (upstream, upstream_layout) = self.upstream.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(upstream)) = &*upstream else {
            candle_core::bail!("xent linear_cross_entropy: the upstream gradient must be f32");
        };
        Ok((
            labels,
            targets_layout.clone(),
            values_of(upstream, upstream_layout),
        ))
    }
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "xent-linear-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let (labels, targets_layout, upstream) = self.cpu_inputs()?;
        let shape = linear_shape(l1, l2, &targets_layout)?;
        let opts = &self.opts;
        let storage = with_values!((s1, l1), (s2, l2), |h, w, wrap| {
            wrap(packed(&reference(
                (&h, &w),
                &labels,
                shape,
                opts,
                &upstream,
            )?))
        });
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        Ok((storage, candle_core::Shape::from(len)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        super::linear_on_cuda::backward(
            &self.opts,
            &self.saved,
            (s1, l1),
            (s2, l2),
            (&self.targets, &self.upstream),
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::linear_cross_entropy;
    use crate::candle::cross_entropy;
    use crate::linear::{self, LinearShape};
    use crate::options::{Options, Reduction};

    /// Deterministic values in about [-1.5, 1.5).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 11) % 97) as f32 - 48.0) / 32.0)
            .collect()
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * scale + 1e-7,
                "{what}[{i}]: {g} against {w} (values up to {scale})"
            );
        }
    }

    /// The loss and both gradients through candle's own matmul and xent's `cross_entropy` op on
    /// the whole logits, against the linear op, for `hidden` of `dims` (leading shape, then D).
    fn check(dims: &[usize], vocab: usize, labels: &[i64], opts: &Options, upstream: &[f32]) {
        let (d, leading) = dims.split_last().unwrap();
        let rows: usize = leading.iter().product();
        let h =
            Var::from_tensor(&Tensor::from_vec(values(rows * d, 1), dims, &Device::Cpu).unwrap())
                .unwrap();
        let w = Var::from_tensor(
            &Tensor::from_vec(values(vocab * d, 2), (vocab, *d), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let t = Tensor::from_vec(labels.to_vec(), leading, &Device::Cpu).unwrap();
        let weigh = |loss: Tensor| match opts.reduction {
            Reduction::None => {
                let u = Tensor::from_vec(upstream.to_vec(), leading, &Device::Cpu).unwrap();
                (loss * u).unwrap().sum_all().unwrap()
            }
            _ => (loss * upstream[0] as f64).unwrap(),
        };
        // The fused op.
        let loss = linear_cross_entropy(h.as_tensor(), w.as_tensor(), &t, opts).unwrap();
        let grads = weigh(loss.clone()).backward().unwrap();
        let got_h: Vec<f32> = grads
            .get(h.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got_w: Vec<f32> = grads
            .get(w.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // candle's matmul, then xent's loss on the whole logits.
        let logits = h
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        let want_loss = cross_entropy(&logits, &t, opts).unwrap();
        let want_grads = weigh(want_loss.clone()).backward().unwrap();
        let want_h: Vec<f32> = want_grads
            .get(h.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want_w: Vec<f32> = want_grads
            .get(w.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(loss.dims(), want_loss.dims());
        let got: Vec<f32> = loss.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = want_loss.flatten_all().unwrap().to_vec1().unwrap();
        close(&got, &want, "loss");
        close(&got_h, &want_h, "grad_hidden");
        close(&got_w, &want_w, "grad_weight");
    }

    #[test]
    fn loss_and_gradients_are_candles_matmul_then_cross_entropy() {
        let labels = [1i64, 10, 3, 0, 7, 2];
        let weights: Vec<f32> = (0..11).map(|j| 0.5 + (j % 3) as f32 * 0.25).collect();
        for (opts, upstream) in [
            (Options::default(), 1.0f32),
            (
                Options {
                    label_smoothing: 0.1,
                    lse_square_scale: 1e-2,
                    ..Options::default()
                },
                0.3,
            ),
            (
                Options {
                    reduction: Reduction::Sum,
                    softcap: Some(2.0),
                    weight: Some(weights.clone()),
                    ..Options::default()
                },
                2.0,
            ),
            (
                Options {
                    ignore_index: 3,
                    grad_scale: 0.5,
                    ..Options::default()
                },
                1.5,
            ),
        ] {
            check(&[6, 5], 11, &labels, &opts, &[upstream]);
        }
    }

    #[test]
    fn per_row_losses_take_per_row_upstreams_and_the_causal_shift_works_on_3d_hidden_states() {
        let labels = [0i64, 1, 2, 3, 4, 5, 6, -100, 1, 2];
        let opts = Options {
            reduction: Reduction::None,
            causal_shift: true,
            ..Options::default()
        };
        let upstream: Vec<f32> = (0..10).map(|r| 0.25 + r as f32 * 0.5).collect();
        check(&[2, 5, 4], 7, &labels, &opts, &upstream);
    }

    #[test]
    fn bf16_gradients_are_the_f64_references_rounded_once() {
        let (rows, d, vocab) = (3, 4, 9);
        let to_bf16 =
            |v: Vec<f32>| -> Vec<half::bf16> { v.into_iter().map(half::bf16::from_f32).collect() };
        let (hv, wv) = (to_bf16(values(rows * d, 3)), to_bf16(values(vocab * d, 4)));
        let h = Var::from_tensor(&Tensor::from_vec(hv.clone(), (rows, d), &Device::Cpu).unwrap())
            .unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(wv.clone(), (vocab, d), &Device::Cpu).unwrap())
            .unwrap();
        let labels = [2i64, 8, 0];
        let t = Tensor::from_vec(labels.to_vec(), rows, &Device::Cpu).unwrap();
        let opts = Options::default();
        let loss = linear_cross_entropy(h.as_tensor(), w.as_tensor(), &t, &opts).unwrap();
        let grads = (loss * 0.3).unwrap().backward().unwrap();
        let (gh, gw) = (
            grads.get(h.as_tensor()).unwrap(),
            grads.get(w.as_tensor()).unwrap(),
        );
        assert_eq!((gh.dtype(), gw.dtype()), (DType::BF16, DType::BF16));
        assert_eq!((gh.dims(), gw.dims()), (&[rows, d][..], &[vocab, d][..]));
        let want = linear::cpu_forward_backward_upstream(
            &hv,
            &wv,
            None,
            &labels,
            LinearShape::flat(rows, d, vocab),
            &opts,
            &[0.3],
        )
        .unwrap();
        let round =
            |v: &[f64]| -> Vec<half::bf16> { v.iter().map(|&x| half::bf16::from_f64(x)).collect() };
        let got_h: Vec<half::bf16> = gh.flatten_all().unwrap().to_vec1().unwrap();
        let got_w: Vec<half::bf16> = gw.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got_h, round(&want.grad_hidden));
        assert_eq!(got_w, round(&want.grad_weight));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let dev = &Device::Cpu;
        let h = Tensor::from_vec(values(8, 5), (2, 4), dev).unwrap();
        let w = Tensor::from_vec(values(20, 6), (5, 4), dev).unwrap();
        let t = Tensor::from_vec(vec![1u32, 2], 2, dev).unwrap();
        let opts = Options::default();
        assert!(linear_cross_entropy(&h, &w, &t, &opts).is_ok());
        let message = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
        // A weight of another dtype, or of the wrong rank or width.
        let w16 = w.to_dtype(DType::BF16).unwrap();
        assert!(message(linear_cross_entropy(&h, &w16, &t, &opts)).contains("one dtype"));
        let flat = w.flatten_all().unwrap();
        assert!(message(linear_cross_entropy(&h, &flat, &t, &opts)).contains("[V, D]"));
        let narrow = Tensor::from_vec(values(15, 6), (5, 3), dev).unwrap();
        assert!(message(linear_cross_entropy(&h, &narrow, &t, &opts)).contains("features"));
        // Targets of another shape or dtype, labels out of range.
        let three = Tensor::from_vec(vec![1u32, 2, 3], 3, dev).unwrap();
        assert!(message(linear_cross_entropy(&h, &w, &three, &opts)).contains("targets"));
        let bytes = Tensor::from_vec(vec![1u8, 2], 2, dev).unwrap();
        assert!(linear_cross_entropy(&h, &w, &bytes, &opts).is_err());
        let out_of_range = Tensor::from_vec(vec![1u32, 9], 2, dev).unwrap();
        assert!(
            message(linear_cross_entropy(&h, &w, &out_of_range, &opts)).contains("out of range")
        );
        // A transposed (non-contiguous) weight, f64 values, predicted tokens, a bad option.
        let wt = Tensor::from_vec(values(20, 6), (4, 5), dev)
            .unwrap()
            .t()
            .unwrap();
        assert!(message(linear_cross_entropy(&h, &wt, &t, &opts)).contains("contiguous"));
        let (h64, w64) = (
            h.to_dtype(DType::F64).unwrap(),
            w.to_dtype(DType::F64).unwrap(),
        );
        assert!(message(linear_cross_entropy(&h64, &w64, &t, &opts)).contains("f32, f16 or bf16"));
        let predicted = Options {
            return_predicted_tokens: true,
            ..Options::default()
        };
        assert!(message(linear_cross_entropy(&h, &w, &t, &predicted)).contains("predicted"));
        let entropy = Options {
            return_entropy: true,
            ..Options::default()
        };
        assert!(message(linear_cross_entropy(&h, &w, &t, &entropy)).contains("return_entropy"));
        let smoothing = Options {
            label_smoothing: 2.0,
            ..Options::default()
        };
        assert!(linear_cross_entropy(&h, &w, &t, &smoothing).is_err());
    }
}
