//! What the benchmark binaries share (each includes it with `mod common;`): opening the GPU or
//! saying there is none, and timing enqueued work between two CUDA events.

use std::error::Error;
use std::sync::Arc;

use xent::cudarc::driver::CudaStream;
use xent::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use xent::{CrossEntropy, PlanChoice};

/// A handle on GPU 0, or `None` after telling stderr why not (`bench`: the binary's name, `skip`:
/// what it leaves out). Without a GPU under `XENT_REQUIRE_GPU=1` the process exits with 1.
pub fn gpu(bench: &str, skip: &str) -> Option<CrossEntropy> {
    match CrossEntropy::new(0) {
        Ok(xent) => Some(xent),
        Err(err) => {
            eprintln!("{bench}: no GPU ({err}); {skip}");
            if std::env::var("XENT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                std::process::exit(1);
            }
            None
        }
    }
}

/// The GPU time in ms of the work `enqueue` puts on `stream`, between two CUDA events (waits for
/// it).
pub fn event_ms(
    stream: &Arc<CudaStream>,
    enqueue: impl FnOnce() -> Result<(), Box<dyn Error>>,
) -> Result<f32, Box<dyn Error>> {
    let ctx = stream.context();
    let start = ctx.new_event(Some(CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CU_EVENT_DEFAULT))?;
    start.record(stream)?;
    enqueue()?;
    end.record(stream)?;
    end.synchronize()?;
    Ok(start.elapsed_ms(&end)?)
}

/// A plan as the benches' command lines and `XENT_SMALL_PLAN` spell it:
/// `auto|fused|chunked|split[:LEN]|split_l2[:LEN]|cluster[:N[:T]]` (`cluster::T`: T threads per CTA, the size
/// automatic). (lse_gemm.rs has no plan.)
#[allow(dead_code)]
pub fn parse_plan(text: Option<&str>) -> Result<PlanChoice, String> {
    Ok(match text {
        Some("auto") => PlanChoice::Auto,
        Some("fused") => PlanChoice::Fused,
        Some("chunked") => PlanChoice::Chunked { chunk_len: None },
        Some("split") => PlanChoice::Split {
            chunk_len: None,
            threads: None,
        },
        // `split:LEN`, `split:LEN:THREADS`, `split::THREADS` (an empty part: automatic).
        Some(forced) if forced.starts_with("split:") => {
            let mut parts = forced[6..].split(':');
            PlanChoice::Split {
                chunk_len: forced_part(parts.next(), "chunk length", forced)?,
                threads: forced_part(parts.next(), "thread count", forced)?,
            }
        }
        Some("split_l2") => PlanChoice::SplitL2 { chunk_len: None },
        Some(forced) if forced.starts_with("split_l2:") => PlanChoice::SplitL2 {
            chunk_len: Some(chunk_len(forced, 9)?),
        },
        Some("cluster") => PlanChoice::Cluster {
            size: None,
            threads: None,
        },
        Some(forced) if forced.starts_with("cluster:") => {
            let mut parts = forced[8..].split(':');
            PlanChoice::Cluster {
                size: forced_part(parts.next(), "cluster size", forced)?,
                threads: forced_part(parts.next(), "thread count", forced)?,
            }
        }
        other => {
            return Err(format!(
                "plan auto|fused|chunked|split[:LEN[:T]]|split_l2[:LEN]|cluster[:N[:T]], not {other:?}"
            ));
        }
    })
}

/// One `:`-separated part of a forced plan (`cluster:N:T`, `split:LEN:T`): absent or empty is the
/// automatic choice (`None`).
fn forced_part<T: std::str::FromStr>(
    part: Option<&str>,
    what: &str,
    forced: &str,
) -> Result<Option<T>, String> {
    match part {
        None | Some("") => Ok(None),
        Some(n) => n
            .parse()
            .map(Some)
            .map_err(|_| format!("bad {what} in {forced}")),
    }
}

/// The chunk length after the first `at` bytes of a forced plan (`split_l2:LEN`).
#[allow(dead_code)]
fn chunk_len(forced: &str, at: usize) -> Result<usize, String> {
    forced[at..]
        .parse()
        .map_err(|_| format!("bad chunk length in {forced}"))
}
