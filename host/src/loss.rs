//! What a call leaves on the device: [`Loss`], its buffers and readers, and the record of the
//! options that made it (a two-phase backward must use the same).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::abi::{COUNT_BAD, COUNT_VALID, COUNT_WEIGHT, COUNT_WORDS};
use crate::error::{Error, Result};
use crate::options::{Options, Reduction};
use crate::raw::{RawBuffer, RawLoss};

/// Whether two float slices hold the same bits: one `memcmp`, so a call with the weights it
/// uploaded last costs microseconds, not a scan of 4 x vocab bytes value by value.
pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    // SAFETY: an `f32` slice is `4 * len` initialised bytes with no padding.
    let bytes =
        |x: &[f32]| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), 4 * x.len()) };
    bytes(a) == bytes(b)
}

/// The options a forward call's results depend on besides the class weights (compared by bytes
/// on their own): a backward must use the same. `grad_scale`, `plan` and the token accuracy may
/// differ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LossKey {
    ignore_index: i64,
    reduction: Reduction,
    causal_shift: bool,
    /// `label_smoothing`, `lse_square_scale` and `softcap` (0 for none) as bits.
    values: [u32; 3],
    /// Class weights are on (their values are compared apart).
    weighted: bool,
}

impl LossKey {
    pub(crate) fn of(opts: &Options, weighted: bool) -> LossKey {
        LossKey {
            ignore_index: opts.ignore_index,
            reduction: opts.reduction,
            causal_shift: opts.causal_shift,
            values: [
                opts.label_smoothing.to_bits(),
                opts.lse_square_scale.to_bits(),
                opts.softcap.unwrap_or(0.0).to_bits(),
            ],
            weighted,
        }
    }
}

/// The results of a call, on the device: the loss scalar, per-row loss and log-sum-exp, and the
/// label counts. Reading them synchronises with the stream; leaving them on the device does not.
pub struct Loss {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) rows: usize,
    pub(crate) loss: CudaSlice<f32>,
    pub(crate) row_loss: CudaSlice<f32>,
    pub(crate) row_lse: CudaSlice<f32>,
    pub(crate) counts: CudaSlice<u32>,
    pub(crate) partials: Option<CudaSlice<f32>>,
    /// The z-loss part of the loss and the token accuracy (`[f32; 2]`).
    pub(crate) extras: CudaSlice<f32>,
    /// Class weights on the device, and the host copy they were uploaded from (a call with the
    /// same weights does not upload them again, so it can be captured in a CUDA graph).
    pub(crate) weight: Option<CudaSlice<f32>>,
    pub(crate) weight_host: Vec<f32>,
    /// Per-row token accuracy (`[u32; rows]`), once a call asked for it.
    pub(crate) row_correct: Option<CudaSlice<u32>>,
    /// The last call asked for token accuracy.
    pub(crate) accuracy_on: bool,
    /// Per-row predicted tokens (`[i64; rows]`), once a call asked for them.
    pub(crate) predicted: Option<CudaSlice<i64>>,
    /// The last call asked for predicted tokens.
    pub(crate) predicted_on: bool,
    /// Per-row entropies (`[f32; rows]`), once a call asked for them.
    pub(crate) entropy: Option<CudaSlice<f32>>,
    /// The last call asked for entropies.
    pub(crate) entropy_on: bool,
    /// The loss options of the last call into these buffers (none before the first).
    pub(crate) loss_key: Option<LossKey>,
}

impl Loss {
    /// Device buffers for calls over `rows` rows on `stream`.
    pub fn new(stream: &Arc<CudaStream>, rows: usize) -> Result<Loss> {
        Ok(Loss {
            stream: stream.clone(),
            rows,
            loss: stream.alloc_zeros(1)?,
            row_loss: stream.alloc_zeros(rows.max(1))?,
            row_lse: stream.alloc_zeros(rows.max(1))?,
            counts: stream.alloc_zeros(COUNT_WORDS)?,
            partials: None,
            extras: stream.alloc_zeros(2)?,
            weight: None,
            weight_host: Vec::new(),
            row_correct: None,
            accuracy_on: false,
            predicted: None,
            predicted_on: false,
            entropy: None,
            entropy_on: false,
            loss_key: None,
        })
    }

    /// Makes the buffers ready for a call with `opts` (its class weights uploaded unless they are
    /// those of the last call, the token accuracy's buffer), and records the options the results
    /// will come from.
    pub(crate) fn prepare(&mut self, stream: &Arc<CudaStream>, opts: &Options) -> Result<()> {
        if let Some(weight) = &opts.weight {
            self.upload_weight(stream, weight)?;
        }
        if opts.return_token_accuracy && self.row_correct.is_none() {
            self.row_correct = Some(stream.alloc_zeros(self.rows.max(1))?);
        }
        if opts.return_predicted_tokens && self.predicted.is_none() {
            self.predicted = Some(stream.alloc_zeros(self.rows.max(1))?);
        }
        if opts.return_entropy && self.entropy.is_none() {
            self.entropy = Some(stream.alloc_zeros(self.rows.max(1))?);
        }
        self.loss_key = Some(LossKey::of(opts, opts.weight.is_some()));
        self.accuracy_on = opts.return_token_accuracy;
        self.predicted_on = opts.return_predicted_tokens;
        self.entropy_on = opts.return_entropy;
        Ok(())
    }

    fn upload_weight(&mut self, stream: &Arc<CudaStream>, weight: &[f32]) -> Result<()> {
        if self.weight.is_none() || !same_bits(&self.weight_host, weight) {
            crate::options::check_weight_values(weight)?;
            self.weight = Some(stream.clone_htod(weight)?);
            self.weight_host = weight.to_vec();
        }
        Ok(())
    }

    /// The buffers by address, for a raw call on `stream` (the accuracy buffer and the partial
    /// sums as far as [`prepare`](Self::prepare) and `reserve_partials` made them).
    pub(crate) fn raw(&mut self, stream: &Arc<CudaStream>) -> RawLoss {
        RawLoss {
            loss: RawBuffer::of(stream, &mut self.loss),
            row_loss: RawBuffer::of(stream, &mut self.row_loss),
            row_lse: RawBuffer::of(stream, &mut self.row_lse),
            counts: RawBuffer::of(stream, &mut self.counts),
            extras: RawBuffer::of(stream, &mut self.extras),
            row_correct: self.row_correct.as_mut().map(|c| RawBuffer::of(stream, c)),
            predicted: self.predicted.as_mut().map(|c| RawBuffer::of(stream, c)),
            entropy: self.entropy.as_mut().map(|c| RawBuffer::of(stream, c)),
            workspace: self.partials.as_mut().map(|p| RawBuffer::of(stream, p)),
        }
    }

    pub(crate) fn reserve_partials(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<()> {
        if len > 0 && self.partials.as_ref().is_none_or(|p| p.len() < len) {
            self.partials = Some(stream.alloc_zeros(len)?);
        }
        Ok(())
    }

    /// The loss as a device scalar (`[f32; 1]`), for use without a host round trip. NaN when a
    /// label was out of range.
    pub fn device_loss(&self) -> &CudaSlice<f32> {
        &self.loss
    }

    /// Per-row losses on the device (`[f32; rows]`; 0 for ignored rows, NaN for a row whose label
    /// is out of range).
    pub fn device_row_loss(&self) -> &CudaSlice<f32> {
        &self.row_loss
    }

    /// Per-row natural log-sum-exp on the device (`[f32; rows]`; 0 for ignored rows and rows whose
    /// label is out of range).
    pub fn device_row_lse(&self) -> &CudaSlice<f32> {
        &self.row_lse
    }

    /// The reduction the loss was computed with.
    pub fn reduction(&self) -> Reduction {
        self.loss_key.map_or(Reduction::Mean, |key| key.reduction)
    }

    /// Waits for the call and returns the loss; [`Error::LabelOutOfRange`] if any label was
    /// neither `ignore_index` nor a class.
    pub fn read(&self) -> Result<f32> {
        self.check_labels()?;
        Ok(self.stream.clone_dtoh(&self.loss)?[0])
    }

    /// Waits for the call and returns the number of rows scored (labels not ignored).
    pub fn n_valid(&self) -> Result<u32> {
        Ok(self.stream.clone_dtoh(&self.counts)?[COUNT_VALID])
    }

    /// Waits for the call and returns the per-row losses.
    pub fn read_row_loss(&self) -> Result<Vec<f32>> {
        self.check_labels()?;
        let mut v = self.stream.clone_dtoh(&self.row_loss)?;
        v.truncate(self.rows);
        Ok(v)
    }

    /// Waits for the call and returns the per-row log-sum-exp. Unlike the losses it does not
    /// depend on the labels, so it is returned even when a label was out of range.
    pub fn read_row_lse(&self) -> Result<Vec<f32>> {
        let mut v = self.stream.clone_dtoh(&self.row_lse)?;
        v.truncate(self.rows);
        Ok(v)
    }

    /// Waits for the call and returns the z-loss part of the loss (`Σ lse_square_scale·lse²` over
    /// the scored rows, divided by their count for the mean); 0 without the z-loss.
    pub fn read_z_loss(&self) -> Result<f32> {
        self.check_labels()?;
        let z_loss_on = self
            .loss_key
            .is_some_and(|key| f32::from_bits(key.values[1]) != 0.0);
        if !z_loss_on {
            return Ok(0.0);
        }
        Ok(self.stream.clone_dtoh(&self.extras)?[0])
    }

    /// Waits for the call and returns the token accuracy (the fraction of scored rows whose first
    /// maximal logit is the label; NaN without scored rows), or `None` when the call did not
    /// ask for it (`return_token_accuracy`).
    pub fn read_accuracy(&self) -> Result<Option<f32>> {
        if !self.accuracy_on {
            return Ok(None);
        }
        self.check_labels()?;
        Ok(Some(self.stream.clone_dtoh(&self.extras)?[1]))
    }

    /// Waits for the call and returns, per row, whether its first maximal logit is its label
    /// (false for rows not scored), or `None` when the call did not ask for token accuracy.
    pub fn read_row_correct(&self) -> Result<Option<Vec<bool>>> {
        match (&self.row_correct, self.accuracy_on) {
            (Some(c), true) => {
                self.check_labels()?;
                let v = self.stream.clone_dtoh(c)?;
                Ok(Some(v[..self.rows].iter().map(|&x| x != 0).collect()))
            }
            _ => Ok(None),
        }
    }

    /// Waits for the call and returns, per row, its first maximal logit's class (`torch.argmax`
    /// of the logits as given; -1 for rows not scored), or `None` when the call did not ask for
    /// them (`return_predicted_tokens`).
    pub fn read_predicted_tokens(&self) -> Result<Option<Vec<i64>>> {
        match (&self.predicted, self.predicted_on) {
            (Some(p), true) => {
                let v = self.stream.clone_dtoh(p)?;
                Ok(Some(v[..self.rows].to_vec()))
            }
            _ => Ok(None),
        }
    }

    /// Waits for the call and returns, per row, the entropy of its softmax in nats (of the
    /// soft-capped logits with a soft cap; 0 for rows not scored), or `None` when the call did
    /// not ask for them (`return_entropy`).
    pub fn read_entropy(&self) -> Result<Option<Vec<f32>>> {
        match (&self.entropy, self.entropy_on) {
            (Some(e), true) => {
                let v = self.stream.clone_dtoh(e)?;
                Ok(Some(v[..self.rows].to_vec()))
            }
            _ => Ok(None),
        }
    }

    /// Waits for the call and returns `Σ weight[label]` over the scored rows (PyTorch's
    /// `total_weight`): the mean's divisor, the scored row count without class weights.
    pub fn read_total_weight(&self) -> Result<f32> {
        let counts = self.stream.clone_dtoh(&self.counts)?;
        Ok(if self.loss_key.is_some_and(|key| key.weighted) {
            f32::from_bits(counts[COUNT_WEIGHT])
        } else {
            counts[COUNT_VALID] as f32
        })
    }

    /// Waits for the call; [`Error::LabelOutOfRange`] if any label was out of range.
    pub fn check_labels(&self) -> Result<()> {
        let counts = self.stream.clone_dtoh(&self.counts)?;
        match counts[COUNT_BAD] as usize {
            0 => Ok(()),
            count => Err(Error::LabelOutOfRange {
                count,
                row: None,
                label: None,
            }),
        }
    }
}
