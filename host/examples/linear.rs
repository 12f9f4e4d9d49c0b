//! Linear + cross-entropy without materialising the logits: the loss of `hidden · weightᵀ` and the
//! gradients of the hidden states and the weight, computed in chunks of rows (cuBLASLt GEMMs around
//! xent's kernel) on the GPU when there is one, else by the f64 CPU reference (it says which).
//! `cargo run --release --example linear`.

use xent::half::bf16;
use xent::linear::{self, LinearScratch, LinearShape};
use xent::{CrossEntropy, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shape = LinearShape {
        batch: 2,
        seq_len: 128,
        hidden: 256,
        vocab: 4096,
    };
    let (rows, d, v) = (shape.rows(), shape.hidden, shape.vocab);
    let opts = Options {
        causal_shift: true,
        label_smoothing: 0.1,
        // Each scored row's entropy too (RL trainers log it): one more read of each chunk.
        return_entropy: true,
        ..Options::default()
    };
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 2001) as f32 / 1000.0 - 1.0
    };
    let hidden: Vec<bf16> = (0..rows * d).map(|_| bf16::from_f32(next())).collect();
    let weight: Vec<bf16> = (0..v * d).map(|_| bf16::from_f32(next() / 16.0)).collect();
    let labels: Vec<i64> = (0..rows as i64).map(|r| (r * 7919) % v as i64).collect();
    println!(
        "linear + cross-entropy: batch {}, seq_len {}, hidden {d}, vocab {v}, bf16, causal, smoothing 0.1",
        shape.batch, shape.seq_len
    );
    let reference = linear::cpu_forward_backward(&hidden, &weight, None, &labels, shape, &opts)?;

    let xent = match CrossEntropy::new(0) {
        Ok(xent) => xent,
        Err(err) => {
            println!("no GPU ({err}): the CPU reference computed it");
            println!("loss = {:.6}", reference.loss.loss);
            let entropy = reference.loss.entropy.as_deref().unwrap_or_default();
            println!(
                "mean entropy of the scored rows = {:.6} nats",
                mean_scored(entropy, rows, shape.seq_len)
            );
            return Ok(());
        }
    };
    let blas = xent::cublaslt::CublasLt::open(&[])?;
    let stream = xent.context().default_stream();
    let d_hidden = stream.clone_htod(&hidden)?;
    let d_weight = stream.clone_htod(&weight)?;
    let d_labels = stream.clone_htod(&labels)?;
    let mut grad_hidden = stream.alloc_zeros::<bf16>(rows * d)?;
    let mut grad_weight = stream.alloc_zeros::<f32>(v * d)?;
    // Chunks of 64 rows: the logits never exist for more than a quarter of the rows at once.
    let mut scratch = LinearScratch::new(&stream, Some(64 * v * 2))?;
    let mut out = xent::Loss::new(&stream, rows)?;
    xent.linear_forward_backward(
        &blas,
        &stream,
        (&d_hidden, &d_weight, None),
        &d_labels,
        shape,
        &opts,
        (&mut grad_hidden, &mut grad_weight, None),
        &mut scratch,
        &mut out,
    )?;
    let loss = out.read()?;
    println!(
        "GPU ({}), cuBLASLt {}: loss = {loss:.6}; CPU reference {:.6}",
        xent.context().name()?,
        blas.path().display(),
        reference.loss.loss
    );
    let worst = |got: Vec<f64>, want: &[f64]| {
        let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f64, f64::max);
        err / scale
    };
    let gh = stream.clone_dtoh(&grad_hidden)?;
    let gw = stream.clone_dtoh(&grad_weight)?;
    let eh = worst(
        gh.iter().map(|x| x.to_f64()).collect(),
        &reference.grad_hidden,
    );
    let ew = worst(
        gw.iter().map(|&x| x as f64).collect(),
        &reference.grad_weight,
    );
    println!("largest gradient error / largest gradient: hidden {eh:.2e}, weight {ew:.2e}");
    let want_entropy = reference.loss.entropy.as_deref().unwrap_or_default();
    let got_entropy: Vec<f64> = out
        .read_entropy()?
        .unwrap_or_default()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let entropy_error = got_entropy
        .iter()
        .zip(want_entropy)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f64, f64::max);
    println!(
        "mean entropy of the scored rows = {:.6} nats; CPU reference {:.6}; largest difference {entropy_error:.2e}",
        mean_scored(&got_entropy, rows, shape.seq_len),
        mean_scored(want_entropy, rows, shape.seq_len)
    );
    let loss_error = (loss as f64 - reference.loss.loss).abs();
    // bf16 logits and gradients: a few units of 2^-8 of the largest value.
    if loss_error > 1e-2
        || eh > 0.05
        || ew > 0.05
        || entropy_error > 1e-2
        || got_entropy.len() != rows
    {
        return Err(format!(
            "the GPU disagrees with the reference: loss {loss_error:.2e}, entropy {entropy_error:.2e}"
        )
        .into());
    }
    println!("ok");
    Ok(())
}

/// The mean of `values` (one a row) over the rows the causal shift scores (each sequence's last
/// of `seq_len` is not).
fn mean_scored(values: &[f64], rows: usize, seq_len: usize) -> f64 {
    let scored: Vec<f64> = (0..rows)
        .filter(|r| r % seq_len != seq_len - 1)
        .map(|r| values.get(r).copied().unwrap_or(f64::NAN))
        .collect();
    scored.iter().sum::<f64>() / scored.len().max(1) as f64
}
