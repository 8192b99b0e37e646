//! Speed of one matrix product per weight format, on the pool the engine uses: by default the
//! decode-shaped workload (one token), with the weight bytes streamed from memory each call.
//!
//! `cargo run --release -p serrano-engine --example kquant_matvec [ROWS COLS SECONDS TOKENS]`
//! prints, per format, the time per call and the weight bytes read per second, for the file
//! layout and, where this CPU repacks the format (Q4_0, Q4_1, Q8_0 on AVX-512), for the packed
//! one too. Defaults: a 8192 x 8192 matrix (larger than most L3 caches in every format), 2 s
//! per format, 1 token; more tokens measure the batched kernels (multiply-adds per second).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serrano_engine::gguf::Bytes;
use serrano_engine::kernels;
use serrano_engine::ops::{matmul, pack_all, QMatrix};
use serrano_engine::quant::DType;
use serrano_engine::testing::{random_quant_row, random_vec};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse().unwrap_or_else(|_| {
                eprintln!("usage: kquant_matvec [ROWS COLS SECONDS TOKENS] (whole numbers)");
                std::process::exit(2)
            })
        })
        .collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (rows, cols, secs, n) = (arg(0, 8192), arg(1, 8192), arg(2, 2) as u64, arg(3, 1));
    if cols % 256 != 0 || n == 0 {
        eprintln!("COLS must be a multiple of 256 (the k-quant block) and TOKENS at least 1");
        std::process::exit(2);
    }
    println!(
        "{rows} x {cols}, {n} token(s), {} threads, kernels: {}",
        rayon::current_num_threads(),
        kernels::simd_name()
    );
    let x = random_vec(cols * n, 1);
    // Every format with an integer kernel, then the float formats the engine also runs.
    for dtype in kernels::FORMATS
        .into_iter()
        .chain([DType::F16, DType::BF16])
    {
        let data: Vec<u8> = (0..rows)
            .flat_map(|r| random_quant_row(dtype, cols, r as u64))
            .collect();
        let file = QMatrix::new(dtype, rows, cols, Arc::new(Bytes::Owned(data)), 0);
        let mut packed = file.clone();
        pack_all(&mut [&mut packed]).expect("an arena for the packed copy");
        for (layout, w) in [("file", &file), ("packed", &packed)] {
            if layout == "packed" && !w.is_packed() {
                continue;
            }
            let mut y = vec![0f32; rows * n];
            matmul(w, &x, n, &mut y);
            let (mut calls, started) = (0u32, Instant::now());
            while started.elapsed() < Duration::from_secs(secs) {
                matmul(w, &x, n, &mut y);
                calls += 1;
            }
            let s = (started.elapsed() / calls).as_secs_f64();
            println!(
                "{:<5} {layout:<6} {:>8.3} ms/call  {:>6.1} GB/s of weights  {:>7.1} G multiply-adds/s",
                format!("{dtype:?}"),
                s * 1e3,
                w.bytes_total() as f64 / s / 1e9,
                (rows * cols * n) as f64 / s / 1e9
            );
        }
    }
}
