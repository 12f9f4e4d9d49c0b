//! # xent: fused cross-entropy for LLM training, every GPU kernel written in Rust
//!
//! One call computes the cross-entropy loss of `[rows, vocab]` logits and writes its gradient into
//! the logits in place: each logit is read from GPU memory once and its gradient written once
//! when a row fits in shared memory. The kernels are Rust (`kernels-gpu/`), compiled to PTX by
//! rustc's NVPTX backend and shipped in this crate, so building it needs neither nightly Rust nor
//! CUDA; running it needs an NVIDIA driver and a GPU of compute capability 8.0 or newer.
//!
//! ```no_run
//! use xent::{CrossEntropy, Options, Shape};
//! # fn main() -> xent::Result<()> {
//! let xent = CrossEntropy::new(0)?;
//! let stream = xent.context().default_stream();
//! let (rows, vocab) = (4, 32000);
//! let mut logits = stream.clone_htod(&vec![half::bf16::from_f32(0.5); rows * vocab])?;
//! let labels = stream.clone_htod(&[1i64, -100, 7, 31999])?;
//! let loss = xent.forward_backward(&stream, &mut logits, &labels, Shape::flat(rows, vocab),
//!                                  &Options::default())?;
//! println!("loss = {}", loss.read()?); // `logits` now holds d(loss)/d(logits)
//! # Ok(()) }
//! ```
//!
//! Options keep PyTorch's names and defaults ([`Options`]); the causal-LM shift is an option, not
//! a copy; [`cpu`] holds an f64 implementation of the same API, the test oracle and the fallback
//! without a GPU.

pub mod abi;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
pub mod cublaslt;
mod cuda;
mod dylib;
mod error;
mod kernels;
pub mod linear;
mod loss;
pub mod nccl;
mod options;
pub mod plan;
mod ptx_index;
pub mod raw;
mod setting;
pub mod vocab_parallel;

pub use cuda::{CrossEntropy, driver_loadable, green_context};
pub use error::{Error, Result};
pub use kernels::{
    PTX_SM80, PTX_SM90, cluster_kernel_names, kernel_names, ptx_for, ptx_for_arch,
    split_kernel_names,
};
pub use loss::Loss;
pub use options::{DType, Element, Label, Options, Reduction, Shape, Target, row_target};
pub use plan::{DeviceLimits, LaunchPlan, PlanChoice};

/// Re-exported so callers name the same cudarc and half versions as this crate.
pub use cudarc;
pub use half;
