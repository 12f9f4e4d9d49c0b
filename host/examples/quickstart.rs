//! Quickstart: loss and gradient of a small batch of random bf16 logits, on the GPU when there is
//! one, else on the CPU (it says which). `cargo run --release --example quickstart`.

use xent::half::bf16;
use xent::{CrossEntropy, Options, Shape, cpu};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (batch, seq_len, vocab) = (4, 512, 32000);
    let shape = Shape::batched(batch, seq_len, vocab);
    let opts = Options {
        causal_shift: true,
        ..Options::default()
    };

    // Deterministic pseudo-random logits and labels, one label in seven ignored.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let logits: Vec<bf16> = (0..shape.rows() * vocab)
        .map(|_| bf16::from_f32((next() % 2000) as f32 / 250.0 - 4.0))
        .collect();
    let labels: Vec<i64> = (0..shape.rows())
        .map(|i| {
            if i % 7 == 0 {
                -100
            } else {
                (next() % vocab as u64) as i64
            }
        })
        .collect();
    println!("causal-LM cross-entropy: batch {batch}, seq_len {seq_len}, vocab {vocab}, bf16");

    match CrossEntropy::new(0) {
        Ok(xent) => {
            let stream = xent.context().default_stream();
            let name = xent.context().name()?;
            let mut d_logits = stream.clone_htod(&logits)?;
            let d_labels = stream.clone_htod(&labels)?;
            let plan = xent.plan_for(&shape, xent::DType::Bf16, &opts)?;
            let loss = xent.forward_backward(&stream, &mut d_logits, &d_labels, shape, &opts)?;
            println!("GPU ({name}), plan {plan:?}");
            println!(
                "loss = {:.6} over {} scored tokens",
                loss.read()?,
                loss.n_valid()?
            );
            let grad = stream.clone_dtoh(&d_logits)?;
            let mut reference = logits.clone();
            let expected = cpu::forward_backward(&mut reference, &labels, shape, &opts)?;
            let max_diff = grad
                .iter()
                .zip(&reference)
                .map(|(g, r)| (g.to_f64() - r.to_f64()).abs())
                .fold(0.0, f64::max);
            println!(
                "CPU reference loss = {:.6}; max |grad - reference| = {max_diff:.3e}",
                expected.loss
            );
        }
        Err(err) => {
            println!("no CUDA GPU ({err}): using the CPU path");
            let mut grad = logits;
            let loss = cpu::forward_backward(&mut grad, &labels, shape, &opts)?;
            println!(
                "loss = {:.6} over {} scored tokens (CPU, f64)",
                loss.loss, loss.n_valid
            );
        }
    }
    Ok(())
}
