//! Two-phase mode, for a training step that needs the loss before the gradient: `forward` leaves
//! the logits untouched and keeps only O(rows) per-row results (loss and log-sum-exp); later
//! `backward_into` writes the gradient, times the upstream gradient, into another buffer in one
//! pass. With label smoothing and a z-loss. On the GPU when there is one, checked against the CPU
//! reference; else on the CPU (it says which). `cargo run --release --example two_phase`.

use xent::half::bf16;
use xent::{CrossEntropy, Loss, Options, Shape, cpu};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (batch, seq_len, vocab) = (2, 256, 50_000);
    let shape = Shape::batched(batch, seq_len, vocab);
    let opts = Options {
        causal_shift: true,
        label_smoothing: 0.1,
        lse_square_scale: 1e-4,
        ..Options::default()
    };
    // The upstream gradient of the loss, e.g. a loss weight: one value for the whole loss (or one
    // per row, with `Reduction::None`).
    let upstream = [0.5f32];

    // Deterministic pseudo-random logits and labels, one label in five ignored.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let logits: Vec<bf16> = (0..shape.rows() * vocab)
        .map(|_| bf16::from_f32((next() % 4000) as f32 / 400.0 - 5.0))
        .collect();
    let labels: Vec<i32> = (0..shape.rows())
        .map(|i| {
            if i % 5 == 0 {
                -100
            } else {
                (next() % vocab as u64) as i32
            }
        })
        .collect();
    println!(
        "two-phase cross-entropy: batch {batch}, seq_len {seq_len}, vocab {vocab}, bf16, \
         label smoothing 0.1, z-loss 1e-4, upstream {}",
        upstream[0]
    );

    let mut reference = logits.clone();
    let expected =
        cpu::forward_backward_upstream(&mut reference, &labels, shape, &opts, &upstream)?;
    match CrossEntropy::new(0) {
        Ok(xent) => {
            let stream = xent.context().default_stream();
            let d_logits = stream.clone_htod(&logits)?;
            let d_labels = stream.clone_htod(&labels)?;
            // Phase one: the loss. The logits stay as they are.
            let mut out = Loss::new(&stream, shape.rows())?;
            xent.forward(&stream, &d_logits, &d_labels, shape, &opts, &mut out)?;
            let (loss, z_loss) = (out.read()?, out.read_z_loss()?);
            println!(
                "GPU ({}): loss = {loss:.6} (z-loss part {z_loss:.3e}); CPU reference {:.6} ({:.3e})",
                xent.context().name()?,
                expected.loss,
                expected.z_loss
            );
            // Phase two: the gradient, into its own buffer.
            let d_upstream = stream.clone_htod(&upstream)?;
            let mut d_grad = stream.alloc_zeros::<bf16>(logits.len())?;
            xent.backward_into(
                &stream,
                &d_logits,
                &d_labels,
                shape,
                &opts,
                &out,
                &d_upstream,
                &mut d_grad,
            )?;
            let grad = stream.clone_dtoh(&d_grad)?;
            let max_diff = grad
                .iter()
                .zip(&reference)
                .map(|(g, r)| (g.to_f64() - r.to_f64()).abs())
                .fold(0.0, f64::max);
            let untouched = stream.clone_dtoh(&d_logits)? == logits;
            println!("max |grad - reference| = {max_diff:.3e}; logits untouched: {untouched}");
        }
        Err(err) => {
            println!("no CUDA GPU ({err}): using the CPU path");
            println!(
                "loss = {:.6} (z-loss part {:.3e}) over {} scored tokens (CPU, f64)",
                expected.loss, expected.z_loss, expected.n_valid
            );
        }
    }
    Ok(())
}
