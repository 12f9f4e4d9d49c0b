//! xent through candle against `candle_nn::loss::cross_entropy` on CUDA tensors (feature
//! `candle-cuda`): forward + backward of the loss of `[N, V]` logits, median of timed steps
//! between CUDA events on candle's stream, and the peak of the device's memory pool above what
//! was in use before the step (candle allocates stream-ordered, from that pool). One JSON line
//! per (method, shape): `method` `candle` or `xent_candle`, `n`, `v`, `dtype`, `ms_median`,
//! `extra_peak_MiB`. Then linear + cross-entropy from hidden states `[N, D]` and a weight
//! `[V, D]`, both gradients: `candle_linear` (candle's matmul, then `candle_nn`'s loss),
//! `xent_candle_unfused` (candle's matmul, then xent's loss on the whole logits) and
//! `xent_candle_linear` (`xent::candle::linear_cross_entropy`, no `[N, V]` logits), with `d`.
//!
//! `bench-candle --bench [--configs N:V:dtype,...] [--linear-configs N:D:V:dtype,...]`

use candle_core::{DType, Device, Tensor, Var};
use xent::cudarc::driver::sys;

const DEFAULT_CONFIGS: &str = "8192:32000:bf16,8192:128256:bf16,4096:262144:bf16,8192:128256:f32";
/// Linear + cross-entropy: `N:D:V:dtype`.
const DEFAULT_LINEAR_CONFIGS: &str = "4096:4096:128256:bf16,8192:4096:128256:bf16";

fn parse(config: &str) -> (usize, usize, DType, &str) {
    let parts: Vec<&str> = config.split(':').collect();
    let dtype = match parts[2] {
        "f32" => DType::F32,
        "f16" => DType::F16,
        _ => DType::BF16,
    };
    (
        parts[0].parse().unwrap(),
        parts[1].parse().unwrap(),
        dtype,
        parts[2],
    )
}

/// The device's default memory pool (what cudarc's stream-ordered allocations draw from).
fn pool() -> sys::CUmemoryPool {
    let mut pool = std::ptr::null_mut();
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, 0) }
        .result()
        .expect("the default memory pool");
    pool
}

fn pool_attr(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> u64 {
    let mut value = 0u64;
    unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast()) }
        .result()
        .expect("a memory pool attribute");
    value
}

fn reset_high(pool: sys::CUmemoryPool) {
    let mut zero = 0u64;
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    }
    .result()
    .expect("reset the pool's high-water mark");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return; // `cargo test` runs benches without --bench: nothing to do
    }
    let configs = args
        .iter()
        .position(|a| a == "--configs")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| DEFAULT_CONFIGS.to_string());
    let device = Device::new_cuda(0).expect("a CUDA device for candle");
    let Device::Cuda(cuda) = &device else {
        unreachable!()
    };
    let stream = cuda.cuda_stream();
    let pool = pool();
    for config in configs.split(',') {
        let (n, v, dtype, dtype_name) = parse(config);
        let x = Tensor::randn(0f32, 1f32, (n, v), &device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let t = Tensor::rand(0f32, v as f32, n, &device)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        for method in ["candle", "xent_candle"] {
            let step = || {
                let loss = if method == "xent_candle" {
                    xent::candle::cross_entropy(x.as_tensor(), &t, &xent::Options::default())
                        .unwrap()
                } else {
                    candle_nn::loss::cross_entropy(x.as_tensor(), &t).unwrap()
                };
                let grads = loss.backward().unwrap();
                drop(grads);
            };
            let (median, extra) = measure(&stream, pool, step);
            println!(
                "{{\"method\": \"{method}\", \"n\": {n}, \"v\": {v}, \"dtype\": \"{dtype_name}\", \
                 \"ms_median\": {median:.3}, \"extra_peak_MiB\": {extra}}}"
            );
        }
    }
    let linear_configs = args
        .iter()
        .position(|a| a == "--linear-configs")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| DEFAULT_LINEAR_CONFIGS.to_string());
    for config in linear_configs.split(',').filter(|c| !c.is_empty()) {
        let parts: Vec<&str> = config.split(':').collect();
        let (n, d): (usize, usize) = (parts[0].parse().unwrap(), parts[1].parse().unwrap());
        let rest = parts[1..].join(":");
        let (_, v, dtype, dtype_name) = parse(&rest);
        let randn = |rows: usize, scale: f64| {
            let t = (Tensor::randn(0f32, 1f32, (rows, d), &device).unwrap() * scale).unwrap();
            Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
        };
        let (h, w) = (randn(n, 1.0), randn(v, 1.0 / (d as f64).sqrt()));
        let t = Tensor::rand(0f32, v as f32, n, &device)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        for method in ["candle_linear", "xent_candle_unfused", "xent_candle_linear"] {
            let step = || {
                let opts = xent::Options::default();
                let loss = match method {
                    "xent_candle_linear" => {
                        xent::candle::linear_cross_entropy(h.as_tensor(), w.as_tensor(), &t, &opts)
                            .unwrap()
                    }
                    _ => {
                        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
                        if method == "candle_linear" {
                            candle_nn::loss::cross_entropy(&logits, &t).unwrap()
                        } else {
                            xent::candle::cross_entropy(&logits, &t, &opts).unwrap()
                        }
                    }
                };
                let grads = loss.backward().unwrap();
                drop(grads);
            };
            let (median, extra) = measure(&stream, pool, step);
            println!(
                "{{\"method\": \"{method}\", \"n\": {n}, \"d\": {d}, \"v\": {v}, \"dtype\": \
                 \"{dtype_name}\", \"ms_median\": {median:.3}, \"extra_peak_MiB\": {extra}}}"
            );
        }
    }
}

/// Median ms of 10 timed `step`s (after 3 untimed) between CUDA events on `stream`, and the MiB
/// the memory pool's use rose above what was in use before them.
fn measure(
    stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    pool: sys::CUmemoryPool,
    step: impl Fn(),
) -> (f64, u64) {
    for _ in 0..3 {
        step();
    }
    stream.synchronize().unwrap();
    let base = pool_attr(
        pool,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
    );
    reset_high(pool);
    let mut times = Vec::new();
    for _ in 0..10 {
        let start = stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        step();
        let end = stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        end.synchronize().unwrap();
        times.push(start.elapsed_ms(&end).unwrap() as f64);
    }
    let high = pool_attr(
        pool,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
    );
    times.sort_by(f64::total_cmp);
    ((times[4] + times[5]) / 2.0, high.saturating_sub(base) >> 20)
}
