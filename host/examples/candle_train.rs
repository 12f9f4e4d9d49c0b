//! A tiny language model (an embedding and a linear head) trained for a few SGD steps in candle
//! with xent's loss: prints the loss curve and which path ran. With `--features candle` it runs on
//! the CPU (xent's f64 reference); with `--features candle-cuda` on a GPU when there is one
//! (xent's kernels on candle's stream). With `--linear` the head and the loss are one op,
//! `xent::candle::linear_cross_entropy`, which never holds the `[batch, seq_len, vocab]` logits.
//!
//! `cargo run --release --example candle_train --features candle [-- --linear]`

use candle_core::{DType, Device, Tensor, Var};
use xent::Options;

fn main() -> candle_core::Result<()> {
    let linear = std::env::args().any(|a| a == "--linear");
    let device = match Device::new_cuda(0) {
        Ok(device) => {
            println!("candle on CUDA device 0: xent's kernels");
            device
        }
        Err(err) => {
            println!("candle on the CPU ({err}): xent's CPU reference");
            Device::Cpu
        }
    };
    let (vocab, dim, batch, seq_len) = (1024usize, 64usize, 4usize, 64usize);
    // A corpus with structure to learn: token t + 1 follows token t (mod vocab), with noise.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut tokens = Vec::with_capacity(batch * seq_len);
    for _ in 0..batch {
        let mut t = (next() % vocab as u64) as u32;
        for _ in 0..seq_len {
            tokens.push(t);
            t = if next() % 4 == 0 {
                (next() % vocab as u64) as u32
            } else {
                (t + 1) % vocab as u32
            };
        }
    }
    let tokens = Tensor::from_vec(tokens, (batch, seq_len), &device)?;
    let embed = Var::from_tensor(&(Tensor::randn(0f32, 1f32, (vocab, dim), &device)? * 0.5)?)?;
    let head = Var::from_tensor(&(Tensor::randn(0f32, 1f32, (vocab, dim), &device)? * 0.05)?)?;
    // Next-token loss over [batch, seq_len, vocab] logits: position t scored against token t + 1
    // of its sequence by the causal shift, no slicing.
    let opts = Options {
        causal_shift: true,
        ..Options::default()
    };
    let lr = 2.0;
    let mut curve = Vec::new();
    for step in 0..20 {
        let hidden = embed.as_tensor().index_select(&tokens.flatten_all()?, 0)?;
        let loss = if linear {
            // The head's GEMMs and the loss in one op, a chunk of rows of logits at a time.
            let hidden = hidden.reshape((batch, seq_len, dim))?;
            xent::candle::linear_cross_entropy(&hidden, head.as_tensor(), &tokens, &opts)?
        } else {
            let logits = hidden
                .matmul(&head.as_tensor().t()?)?
                .reshape((batch, seq_len, vocab))?;
            xent::candle::cross_entropy(&logits, &tokens, &opts)?
        };
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        curve.push(value);
        println!("step {step:2}: loss {value:.4}");
        let grads = loss.backward()?;
        for var in [&embed, &head] {
            let g = grads.get(var.as_tensor()).expect("a gradient");
            var.set(&(var.as_tensor() - (g * lr)?)?)?;
        }
    }
    let (first, last) = (curve[0], curve[curve.len() - 1]);
    println!(
        "loss {first:.4} -> {last:.4} (uniform: ln {vocab} = {:.4}){}",
        (vocab as f32).ln(),
        if linear { ", linear_cross_entropy" } else { "" }
    );
    if last.is_nan() || last >= first {
        candle_core::bail!("the loss did not go down");
    }
    Ok(())
}
