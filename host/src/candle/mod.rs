//! candle integration (cargo feature `candle`): xent's loss as a candle op with a backward, for
//! Rust training loops, and linear + cross-entropy ([`linear_cross_entropy`]: the LM head's loss
//! without the `[N, V]` logits). `cross_entropy(&logits, &targets, &opts)` takes `[N, V]` or `[..., V]`
//! logits (f32, f16, bf16; contiguous) and class indices (u32, i64 or i32) of the leading shape,
//! and returns the loss as an f32 tensor (a scalar, or per row for `Reduction::None`);
//! `loss.backward()` yields the gradient of `upstream · loss` w.r.t. the logits, rounded once to
//! their dtype.
//!
//! CPU tensors run xent's f64 CPU reference. CUDA tensors (cargo feature `candle-cuda`) run xent's
//! kernels on candle's stream, two-phase: the forward reads the logits once and keeps per-row
//! log-sum-exps, the backward writes the gradient of `upstream · loss` into a new tensor in one
//! pass (candle's tensors are immutable, so the logits are never overwritten). On CUDA a label out
//! of range makes the loss NaN instead of an error (no host synchronisation); u32 targets are
//! read as i32 (class indices below 2^31).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Tensor};

use crate::cpu;
use crate::options::{Element, Options, Reduction, Shape};

/// The loss of `logits` against `targets` with `opts` (see the module's doc), differentiable in
/// candle's autograd w.r.t. the logits.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    opts: &Options,
) -> candle_core::Result<Tensor> {
    opts.validate(*logits.dims().last().unwrap_or(&0))
        .map_err(candle_core::Error::wrap)?;
    if opts.return_predicted_tokens || opts.return_entropy {
        candle_core::bail!(
            "xent cross_entropy: return_predicted_tokens and return_entropy are not supported here \
             (the op returns the loss only): take logits.argmax(D::Minus1) before the call"
        );
    }
    logits.apply_op2(
        targets,
        Forward {
            opts: opts.clone(),
            #[cfg(feature = "candle-cuda")]
            saved: Default::default(),
        },
    )
}

/// The forward op: the loss (and nothing written anywhere).
struct Forward {
    opts: Options,
    /// What a CUDA forward keeps for the backward (label counts, per-row log-sum-exps).
    #[cfg(feature = "candle-cuda")]
    saved: on_cuda::SavedSlot,
}

/// The backward op: `(logits, targets, upstream)` to the gradient of `upstream · loss`.
struct Backward {
    opts: Options,
    #[cfg(feature = "candle-cuda")]
    saved: on_cuda::SavedSlot,
}

fn err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// xent's shape of logits laid out as `l1` with targets laid out as `l2`: contiguous, classes
/// last, the targets of the leading shape (`[batch, seq_len]` for the causal shift).
fn shape_of(l1: &Layout, l2: &Layout) -> candle_core::Result<Shape> {
    let dims = l1.dims();
    let Some((&vocab, leading)) = dims.split_last() else {
        candle_core::bail!("xent cross_entropy: logits must have a class dimension (last)");
    };
    if l2.dims() != leading {
        candle_core::bail!(
            "xent cross_entropy: targets of shape {:?}, the logits {:?} need {:?}",
            l2.dims(),
            dims,
            leading
        );
    }
    if !l1.is_contiguous() || !l2.is_contiguous() {
        candle_core::bail!("xent cross_entropy: logits and targets must be contiguous");
    }
    let rows: usize = leading.iter().product();
    let seq_len = leading.last().copied().unwrap_or(1);
    Ok(if leading.len() >= 2 && seq_len > 0 {
        Shape::batched(rows / seq_len, seq_len, vocab)
    } else {
        Shape::flat(rows, vocab)
    })
}

/// The targets as i64 class indices.
fn labels_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<i64>> {
    let (start, end) = l.contiguous_offsets().expect("checked contiguous");
    Ok(match s {
        CpuStorage::I64(v) => v[start..end].to_vec(),
        CpuStorage::U32(v) => v[start..end].iter().map(|&x| x as i64).collect(),
        CpuStorage::I32(v) => v[start..end].iter().map(|&x| x as i64).collect(),
        other => candle_core::bail!(
            "xent cross_entropy: targets of dtype {:?}: expected u32, i64 or i32",
            other.dtype()
        ),
    })
}

/// A contiguous copy of the logits of `s` (a CPU reference call writes over what it is given).
fn logits_of<T: Copy>(v: &[T], l: &Layout) -> Vec<T> {
    let (start, end) = l.contiguous_offsets().expect("checked contiguous");
    v[start..end].to_vec()
}

/// The CPU reference's loss of `logits` (consumed: the reference writes its gradient over them).
fn forward_loss<T: Element>(
    mut logits: Vec<T>,
    labels: &[i64],
    shape: Shape,
    opts: &Options,
) -> candle_core::Result<cpu::CpuLoss> {
    cpu::forward_backward(&mut logits, labels, shape, opts).map_err(err)
}

/// The CPU reference's gradient of `upstream · loss`, rounded once to `T`.
fn backward_grad<T: Element>(
    mut logits: Vec<T>,
    labels: &[i64],
    shape: Shape,
    opts: &Options,
    upstream: &[f32],
) -> candle_core::Result<Vec<T>> {
    cpu::forward_backward_upstream(&mut logits, labels, shape, opts, upstream).map_err(err)?;
    Ok(logits)
}

fn unsupported_logits(s: &CpuStorage) -> candle_core::Error {
    candle_core::Error::msg(format!(
        "xent cross_entropy: logits of dtype {:?}: expected f32, f16 or bf16",
        s.dtype()
    ))
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "xent-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let shape = shape_of(l1, l2)?;
        let labels = labels_of(s2, l2)?;
        let opts = &self.opts;
        let loss = match s1 {
            CpuStorage::F32(v) => forward_loss(logits_of(v, l1), &labels, shape, opts)?,
            CpuStorage::F16(v) => forward_loss(logits_of(v, l1), &labels, shape, opts)?,
            CpuStorage::BF16(v) => forward_loss(logits_of(v, l1), &labels, shape, opts)?,
            other => return Err(unsupported_logits(other)),
        };
        Ok(match self.opts.reduction {
            Reduction::None => (
                CpuStorage::F32(loss.row_loss.iter().map(|&x| x as f32).collect()),
                candle_core::Shape::from(l2.dims()),
            ),
            Reduction::Mean | Reduction::Sum => (
                CpuStorage::F32(vec![loss.loss as f32]),
                candle_core::Shape::from(()),
            ),
        })
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        on_cuda::forward(&self.opts, &self.saved, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let upstream = grad_loss
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .contiguous()?;
        let grad = logits.apply_op3_no_bwd(
            targets,
            &upstream,
            &Backward {
                opts: self.opts.clone(),
                #[cfg(feature = "candle-cuda")]
                saved: self.saved.clone(),
            },
        )?;
        Ok((Some(grad), None))
    }
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "xent-cross-entropy-backward"
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
        let shape = shape_of(l1, l2)?;
        let labels = labels_of(s2, l2)?;
        let upstream = match s3 {
            CpuStorage::F32(v) => logits_of(v, l3),
            _ => candle_core::bail!("xent cross_entropy: the upstream gradient must be f32"),
        };
        let opts = &self.opts;
        let storage = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(backward_grad(
                logits_of(v, l1),
                &labels,
                shape,
                opts,
                &upstream,
            )?),
            CpuStorage::F16(v) => CpuStorage::F16(backward_grad(
                logits_of(v, l1),
                &labels,
                shape,
                opts,
                &upstream,
            )?),
            CpuStorage::BF16(v) => CpuStorage::BF16(backward_grad(
                logits_of(v, l1),
                &labels,
                shape,
                opts,
                &upstream,
            )?),
            other => return Err(unsupported_logits(other)),
        };
        Ok((storage, l1.shape().clone()))
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
        on_cuda::backward(&self.opts, &self.saved, (s1, l1), (s2, l2), (s3, l3))
    }
}

mod linear;
#[cfg(feature = "candle-cuda")]
mod linear_on_cuda;
#[cfg(feature = "candle-cuda")]
mod on_cuda;

pub use linear::linear_cross_entropy;

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::cross_entropy;
    use crate::cpu;
    use crate::options::{Options, Reduction, Shape};

    fn logits(rows: usize, vocab: usize) -> Vec<f32> {
        (0..rows * vocab)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0)
            .collect()
    }

    /// The loss and `d(upstream · loss)/d logits` of the CPU reference, on the same values.
    fn reference(
        values: &[f32],
        labels: &[i64],
        shape: Shape,
        opts: &Options,
        upstream: &[f32],
    ) -> (cpu::CpuLoss, Vec<f32>) {
        let mut grad = values.to_vec();
        let loss =
            cpu::forward_backward_upstream(&mut grad, labels, shape, opts, upstream).unwrap();
        (loss, grad)
    }

    #[test]
    fn loss_and_gradient_are_the_cpu_references_through_candles_autograd() {
        let (rows, vocab) = (6, 11);
        let values = logits(rows, vocab);
        let labels: Vec<u32> = vec![1, 10, 3, 0, 7, 2];
        let labels_i64: Vec<i64> = labels.iter().map(|&x| x as i64).collect();
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
                    ..Options::default()
                },
                2.0,
            ),
        ] {
            let x = Var::from_tensor(
                &Tensor::from_vec(values.clone(), (rows, vocab), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let t = Tensor::from_vec(labels.clone(), rows, &Device::Cpu).unwrap();
            let loss = cross_entropy(x.as_tensor(), &t, &opts).unwrap();
            let grads = (loss.clone() * upstream as f64)
                .unwrap()
                .backward()
                .unwrap();
            let got_grad = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
            let got_grad: Vec<f32> = got_grad.to_vec1().unwrap();
            let shape = Shape::flat(rows, vocab);
            let (want, want_grad) = reference(&values, &labels_i64, shape, &opts, &[upstream]);
            let got = loss.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (got - want.loss).abs() < 1e-5 * (1.0 + want.loss.abs()),
                "{got} vs {}",
                want.loss
            );
            assert_eq!(got_grad, want_grad);
        }
    }

    #[test]
    fn per_row_losses_take_per_row_upstreams_and_the_causal_shift_works_on_3d_logits() {
        let (batch, seq_len, vocab) = (2, 5, 7);
        let values = logits(batch * seq_len, vocab);
        let labels: Vec<i64> = vec![0, 1, 2, 3, 4, 5, 6, -100, 1, 2];
        let opts = Options {
            reduction: Reduction::None,
            causal_shift: true,
            ..Options::default()
        };
        let x = Var::from_tensor(
            &Tensor::from_vec(values.clone(), (batch, seq_len, vocab), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let t = Tensor::from_vec(labels.clone(), (batch, seq_len), &Device::Cpu).unwrap();
        let loss = cross_entropy(x.as_tensor(), &t, &opts).unwrap();
        assert_eq!(loss.dims(), &[batch, seq_len]);
        let upstream: Vec<f32> = (0..batch * seq_len)
            .map(|r| 0.25 + r as f32 * 0.5)
            .collect();
        let u = Tensor::from_vec(upstream.clone(), (batch, seq_len), &Device::Cpu).unwrap();
        let grads = (loss.clone() * u)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let shape = Shape::batched(batch, seq_len, vocab);
        let (want, want_grad) = reference(&values, &labels, shape, &opts, &upstream);
        assert_eq!(got, want_grad);
        let rows: Vec<f32> = loss.flatten_all().unwrap().to_vec1().unwrap();
        for (g, w) in rows.iter().zip(&want.row_loss) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn bf16_logits_get_a_bf16_gradient_rounded_once() {
        let (rows, vocab) = (3, 9);
        let values: Vec<half::bf16> = logits(rows, vocab)
            .iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect();
        let x = Var::from_tensor(
            &Tensor::from_vec(values.clone(), (rows, vocab), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let t = Tensor::from_vec(vec![2i64, 8, 0], rows, &Device::Cpu).unwrap();
        let loss = cross_entropy(x.as_tensor(), &t, &Options::default()).unwrap();
        let grads = (loss * 0.3).unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::BF16);
        let got: Vec<half::bf16> = g.flatten_all().unwrap().to_vec1().unwrap();
        let mut want = values.clone();
        cpu::forward_backward_upstream(
            &mut want,
            &[2i64, 8, 0],
            Shape::flat(rows, vocab),
            &Options::default(),
            &[0.3],
        )
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = Tensor::from_vec(logits(2, 5), (2, 5), &Device::Cpu).unwrap();
        let opts = Options::default();
        let wrong_shape = Tensor::from_vec(vec![1u32, 2, 3], 3, &Device::Cpu).unwrap();
        assert!(cross_entropy(&x, &wrong_shape, &opts).is_err());
        let bytes = Tensor::from_vec(vec![1u8, 2], 2, &Device::Cpu).unwrap();
        assert!(cross_entropy(&x, &bytes, &opts).is_err());
        let doubles = x.to_dtype(DType::F64).unwrap();
        let t = Tensor::from_vec(vec![1u32, 2], 2, &Device::Cpu).unwrap();
        assert!(cross_entropy(&doubles, &t, &opts).is_err());
        let out_of_range = Tensor::from_vec(vec![1u32, 9], 2, &Device::Cpu).unwrap();
        let message = cross_entropy(&x, &out_of_range, &opts)
            .unwrap_err()
            .to_string();
        assert!(message.contains("out of range"), "{message}");
        let bad_option = Options {
            label_smoothing: 2.0,
            ..Options::default()
        };
        assert!(cross_entropy(&x, &t, &bad_option).is_err());
        let transposed = x.t().unwrap();
        let t5 = Tensor::from_vec(vec![1u32, 2, 0, 1, 0], 5, &Device::Cpu).unwrap();
        assert!(cross_entropy(&transposed, &t5, &opts).is_err());
    }
}
