//! Where a small call's time goes on the GPU: the phase timeline of calls of 1, 8 and 64 rows of
//! 128256 classes in bf16 (`TRACE_ROWS`, comma-separated, for others), each the last of
//! `TRACE_CALLS` (50) calls back to back, read from a PTX build whose cluster kernels stamp
//! `%globaltimer` as they go (`cargo xtask ptx-trace`):
//!
//! ```text
//! cargo xtask ptx-trace
//! XENT_PTX=target/ptx-trace/sm_90.ptx cargo run --release --example small_trace
//! ```
//!
//! Each CTA's thread 0 writes its stamps, its `%smid` and a mark over the first 32 words of its
//! chunk of the gradient (the call's output is then not a gradient); this prints, per phase, the
//! shortest, median and longest time over the CTAs, and the stamps of the first 16 CTAs and of
//! the one that ended last. Without a GPU, or with the committed PTX, it says so and exits.
//! Calls of at most 64 rows run the small-call kernels, whose phases come in another order,
//! unless `XENT_SMALL_KERNEL=0` (read by the handle too).

use std::error::Error;

use xent::half::bf16;
use xent::{CrossEntropy, LaunchPlan, Loss, Options, Shape};

const VOCAB: usize = 128256;
const PHASES: [&str; 14] = [
    "dep_wait",
    "count+label",
    "scales",
    "load+pass1",
    "merge+cl_bar",
    "dsmem+coef",
    "grad",
    "write+cl_wait",
    "fin:done_flag",
    "fin:counts",
    "fin:row_loads",
    "fin:block_sums",
    "fin:div+store",
    "fin:exit",
];
/// The first six phases of the small-call kernels (by default, at most 64 rows:
/// `xent_cluster_small_*`), which count the labels behind the first pass and take the done
/// counter before the gradient; the rest are [`PHASES`]' (a one-row call's finish, from a
/// register, leaves no `fin:` marks).
const SMALL_KERNEL_HEAD: [&str; 6] = [
    "dep_wait",
    "load+pass1",
    "count+x_label",
    "merge+scales",
    "cl_bar",
    "dsmem+coef+done",
];

fn main() -> Result<(), Box<dyn Error>> {
    let rows_text = std::env::var("TRACE_ROWS").unwrap_or_else(|_| "1,8,64".into());
    let rows_list: Vec<usize> = rows_text
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("TRACE_ROWS={rows_text}: expected row counts, comma-separated"))?;
    if rows_list.contains(&0) {
        return Err(format!("TRACE_ROWS={rows_text}: row counts must be positive").into());
    }
    let calls: usize = match std::env::var("TRACE_CALLS") {
        Ok(text) => text
            .parse()
            .map_err(|_| format!("TRACE_CALLS={text}: expected a number of calls"))?,
        Err(_) => 50,
    };
    let xent = match CrossEntropy::new(0) {
        Ok(xent) => xent,
        Err(err) => {
            println!("small_trace: no GPU here ({err}); it reads a GPU's timeline, nothing to do");
            return Ok(());
        }
    };
    let stream = xent.context().default_stream();
    let small_kernels = xent.small_kernel_on();
    for n in rows_list {
        let shape = Shape::flat(n, VOCAB);
        let opts = Options::default();
        let plan = xent.plan_for(&shape, xent::DType::Bf16, &opts)?;
        let (size, chunk_len) = match plan {
            LaunchPlan::Cluster {
                size, chunk_len, ..
            } => (size as usize, chunk_len as usize),
            other => return Err(format!("{n} rows: not a cluster plan: {other:?}").into()),
        };
        let host: Vec<bf16> = (0..n * VOCAB)
            .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 250.0 - 2.0))
            .collect();
        let labels: Vec<i64> = (0..n).map(|r| ((r * 7919) % VOCAB) as i64).collect();
        let mut logits = stream.clone_htod(&host)?;
        let labels = stream.clone_htod(&labels)?;
        let mut out = Loss::new(&stream, n)?;
        for _ in 0..calls {
            xent.forward_backward_into(&stream, &mut logits, &labels, shape, &opts, &mut out)?;
        }
        stream.synchronize()?;
        let grad: Vec<bf16> = stream.clone_dtoh(&logits)?;
        let words: Vec<u32> = grad
            .chunks(2)
            .map(|p| p[0].to_bits() as u32 | (p.get(1).map_or(0, |b| b.to_bits() as u32) << 16))
            .collect();
        let mut ctas = Vec::new();
        for r in 0..n {
            for k in 0..size {
                let at = (r * VOCAB + k * chunk_len) / 2;
                if !(r * VOCAB + k * chunk_len).is_multiple_of(2) || words[at + 31] != 0x7ace_7ace {
                    println!(
                        "small_trace: row {r}'s CTA {k} left no timeline: not a trace build; run \
                         `cargo xtask ptx-trace` and set XENT_PTX=target/ptx-trace/sm_90.ptx"
                    );
                    return Ok(());
                }
                let stamp =
                    |j: usize| words[at + 2 * j] as u64 | (words[at + 2 * j + 1] as u64) << 32;
                // Registers' stamps 0-8, the finish's five (0: not reached, so the one before),
                // then the end (register stamp 9).
                let mut t: Vec<u64> = (0..9).map(stamp).collect();
                for j in 10..15 {
                    let v = stamp(j);
                    t.push(if v == 0 { *t.last().unwrap() } else { v });
                }
                t.push(stamp(9));
                ctas.push(Cta {
                    row: r,
                    rank: k,
                    sm: words[at + 30],
                    t,
                });
            }
        }
        let base = ctas.iter().map(|c| c.t[1]).min().unwrap();
        let first_start = ctas.iter().map(|c| c.t[0]).min().unwrap();
        let end = ctas.iter().map(|c| c.t[14]).max().unwrap();
        println!(
            "\n{n} rows: plan {plan:?}; {} CTAs; times in ns from the first CTA past its dependency wait",
            ctas.len()
        );
        println!(
            "first CTA start {} ns before; last CTA end at {} ns",
            base as i64 - first_start as i64,
            end - base
        );
        let mut header = String::from("phase (ns)        ");
        for q in ["min", "median", "max"] {
            header += &format!("{q:>8}");
        }
        println!("{header}");
        let mut phases = PHASES;
        if small_kernels && xent::plan::small_kernel(n, &plan, &opts, false) {
            println!("small-call kernel (xent_cluster_small_*)");
            phases[..SMALL_KERNEL_HEAD.len()].copy_from_slice(&SMALL_KERNEL_HEAD);
        }
        for (j, name) in phases.iter().enumerate() {
            spread(
                name,
                ctas.iter()
                    .map(|c| c.t[j + 1] as i64 - c.t[j] as i64)
                    .collect(),
            );
        }
        spread(
            "past dep_wait at",
            ctas.iter().map(|c| c.t[1] as i64 - base as i64).collect(),
        );
        let show = ctas.len().min(16);
        println!("first {show} CTAs (row, rank, sm): stamps from `base`");
        let last = ctas.iter().max_by_key(|c| c.t[14]).unwrap();
        for c in ctas.iter().take(show).chain(std::iter::once(last)) {
            let rel: Vec<String> =
                c.t.iter()
                    .map(|&t| format!("{:>6}", t as i64 - base as i64))
                    .collect();
            println!(
                "  {:>3} {:>2} sm{:>3}: {}",
                c.row,
                c.rank,
                c.sm,
                rel.join(" ")
            );
        }
    }
    Ok(())
}

/// One CTA's timeline: its row, its rank in the row's cluster, its SM, and its 15 stamps (ns).
struct Cta {
    row: usize,
    rank: usize,
    sm: u32,
    t: Vec<u64>,
}

/// Prints `name` and the shortest, median and longest of `values`.
fn spread(name: &str, mut values: Vec<i64>) {
    values.sort();
    let (min, median, max) = (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    );
    println!("{name:<18}{min:>8}{median:>8}{max:>8}");
}
