//! What the benchmark binaries share (each includes it with `mod common;`): opening the GPU or
//! saying there is none, and timing enqueued work between two CUDA events.

use std::error::Error;
use std::sync::Arc;

use xent::CrossEntropy;
use xent::cudarc::driver::CudaStream;
use xent::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;

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
