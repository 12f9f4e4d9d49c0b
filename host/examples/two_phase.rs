//! Two-phase mode, for a training step that needs the loss before the gradient: `forward` leaves
//! the logits untouched and keeps only O(rows) per-row results (loss and log-sum-exp); later
//! `backward_into` writes the gradient, times the upstream gradient, into another buffer in one
//! pass. With label smoothing and a z-loss; then with each row's entropy differentiated too (an
//! entropy bonus, `backward_with_entropy_into`). On the GPU when there is one, checked against
//! the CPU reference; else on the CPU (it says which). `cargo run --release --example two_phase`.

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
    // An entropy bonus (GRPO's entropy_coef β = 0.01 over the scored tokens): -β / n a row.
    let bonus = vec![-0.01 / expected.n_valid as f32; shape.rows()];
    let mut with_bonus = logits.clone();
    let entropies = cpu::forward_backward_entropy(
        &mut with_bonus,
        &labels,
        shape,
        &Options {
            return_entropy: true,
            ..opts.clone()
        },
        &upstream,
        Some(&bonus),
    )?
    .entropy
    .expect("asked for");
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

            // An entropy bonus: the forward keeps each row's entropy, the backward adds the
            // gradient of Σ bonus[r]·H_r to the loss's.
            let ent_opts = Options {
                return_entropy: true,
                ..opts.clone()
            };
            let mut ent_out = Loss::new(&stream, shape.rows())?;
            xent.forward(
                &stream,
                &d_logits,
                &d_labels,
                shape,
                &ent_opts,
                &mut ent_out,
            )?;
            let d_bonus = stream.clone_htod(&bonus)?;
            xent.backward_with_entropy_into(
                &stream,
                &d_logits,
                &d_labels,
                shape,
                &ent_opts,
                &ent_out,
                &d_upstream,
                &d_bonus,
                &mut d_grad,
            )?;
            let grad = stream.clone_dtoh(&d_grad)?;
            let scale = with_bonus
                .iter()
                .fold(0.0f64, |m, r| m.max(r.to_f64().abs()));
            let worst = grad
                .iter()
                .zip(&with_bonus)
                .map(|(g, r)| {
                    (g.to_f64() - r.to_f64()).abs()
                        / (2f64.powi(-7) * r.to_f64().abs() + 1e-4 * scale)
                })
                .fold(0.0, f64::max);
            println!(
                "with an entropy bonus of {}: max |grad - reference| / tolerance = {worst:.3}",
                bonus[0]
            );
            assert!(
                worst <= 1.0,
                "the entropy bonus's gradient is off the reference"
            );
        }
        Err(err) => {
            println!("no CUDA GPU ({err}): using the CPU path");
            println!(
                "loss = {:.6} (z-loss part {:.3e}) over {} scored tokens (CPU, f64); with an \
                 entropy bonus, mean entropy {:.4} nats",
                expected.loss,
                expected.z_loss,
                expected.n_valid,
                entropies.iter().sum::<f64>() / expected.n_valid as f64
            );
        }
    }
    Ok(())
}
