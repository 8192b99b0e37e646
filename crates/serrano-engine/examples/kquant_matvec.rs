//! Speed of one matrix-vector product per weight format, on the pool the engine uses: the
//! decode-shaped workload (one token), with the weight bytes streamed from memory each call.
//!
//! `cargo run --release -p serrano-engine --example kquant_matvec [ROWS COLS SECONDS]`
//! prints, per format, the time per call and the weight bytes read per second. Defaults: a
//! 8192 x 8192 matrix (larger than this machine's L3 cache in every format), 2 s per format.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serrano_engine::gguf::Bytes;
use serrano_engine::ops::{matmul, QMatrix};
use serrano_engine::quant::DType;
use serrano_engine::testing::{random_quant_row, random_vec};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("ROWS COLS SECONDS are whole numbers"))
        .collect();
    let (rows, cols) = (
        args.first().copied().unwrap_or(8192),
        args.get(1).copied().unwrap_or(8192),
    );
    let secs = args.get(2).copied().unwrap_or(2) as u64;
    assert!(
        cols % 256 == 0,
        "COLS must be a multiple of 256 (the k-quant block)"
    );
    println!(
        "{rows} x {cols}, one token, {} threads, kernels: {}",
        rayon::current_num_threads(),
        serrano_engine::kernels::simd_name()
    );
    let x = random_vec(cols, 1);
    for dtype in [
        DType::Q4_0,
        DType::Q4_1,
        DType::Q8_0,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::F16,
        DType::BF16,
    ] {
        let data: Vec<u8> = (0..rows)
            .flat_map(|r| random_quant_row(dtype, cols, r as u64))
            .collect();
        let bytes = data.len();
        let w = QMatrix::new(dtype, rows, cols, Arc::new(Bytes::Owned(data)), 0);
        let mut y = vec![0f32; rows];
        matmul(&w, &x, 1, &mut y);
        let (mut calls, started) = (0u32, Instant::now());
        while started.elapsed() < Duration::from_secs(secs) {
            matmul(&w, &x, 1, &mut y);
            calls += 1;
        }
        let per_call = started.elapsed() / calls;
        println!(
            "{:<5} {:>8.3} ms/call  {:>6.1} GB/s of weights",
            format!("{dtype:?}"),
            per_call.as_secs_f64() * 1e3,
            bytes as f64 / per_call.as_secs_f64() / 1e9
        );
    }
}
