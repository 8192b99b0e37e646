//! A probe of this machine's limits with every thread of the kernel pool: sustained read
//! bandwidth (from memory, and over a buffer the size of what one decode step reads, which a
//! large cache may hold), f32 FMA and 8-bit dot-product throughput, and the ceilings they put
//! on a model's decode (bandwidth: every token reads all weights) and prefill (arithmetic).
//! Written by hand because it must use the engine's own thread pool; no crate measures that.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::gguf::Bytes;
use crate::model::ModelConfig;
use crate::ops::{matmul, pack_all, QMatrix};
use crate::quant::{quantize_row, DType};

/// Bytes one rayon task reads: large enough to stream, small enough to balance the threads.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// Independent FMA chains per thread: enough to cover the FMA latency on two ports.
const CHAINS: usize = 10;
const LANES: usize = 8;

/// Best read bandwidth (bytes/s) over `passes` reads of a `bytes`-long buffer, every pool
/// thread reading its share with the widest loads the CPU has (a ceiling must be at least as
/// fast a read as the kernels' own). The buffer is written first so every page is resident.
pub fn read_bandwidth(bytes: usize, passes: usize) -> f64 {
    let words = (bytes / 8).max(1);
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        let sum = buf
            .par_chunks(READ_CHUNK_BYTES / 8)
            .map(read_sum)
            .reduce(|| 0, u64::wrapping_add);
        let s = t.elapsed().as_secs_f64();
        black_box(sum);
        best = best.max((words * 8) as f64 / s.max(1e-9));
    }
    best
}

/// A sum of `c` (only so the reads cannot be optimized away), in 512-bit loads where AVX-512
/// exists: four independent accumulators, a cache line each.
fn read_sum(c: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        return unsafe { read_sum_avx512(c) };
    }
    c.iter().fold(0u64, |a, &x| a.wrapping_add(x))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_sum_avx512(c: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); 4];
    let lines = c.len() / 32;
    let p = c.as_ptr();
    for i in 0..lines {
        for (k, a) in acc.iter_mut().enumerate() {
            let v = _mm512_loadu_si512(p.add(32 * i + 8 * k) as *const _);
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let mut sum = 0u64;
    for a in acc {
        sum = sum.wrapping_add(_mm512_reduce_add_epi64(a) as u64);
    }
    c[lines * 32..].iter().fold(sum, |a, &x| a.wrapping_add(x))
}

/// f32 FMA throughput (FLOP/s, a multiply-add counted as 2) with every pool thread busy for
/// about `run`, and the instruction set used.
pub fn fma_throughput(run: Duration) -> (f64, &'static str) {
    let (kernel, name) = fma_kernel();
    let (iters, s) = on_every_thread(run, kernel);
    (iters * (CHAINS * LANES * 2) as f64 / s.max(1e-9), name)
}

/// Times a compute probe is measured, keeping the fastest.
pub const PROBE_TRIES: usize = 5;

/// How many units of work `f(n)` does in about `run / 4` (doubling from `start`): a timed
/// try that long is not dominated by its start-up.
fn calibrated_count(run: Duration, start: u64, mut f: impl FnMut(u64)) -> u64 {
    let mut n = start;
    loop {
        let t = Instant::now();
        f(n);
        if t.elapsed() >= run / 4 || n >= 1 << 40 {
            return n;
        }
        n *= 2;
    }
}

/// The seconds the fastest of [`PROBE_TRIES`] runs of `f` took. A ceiling is the best the
/// hardware does: on a shared VM a single run of half a second read anywhere from 55% to
/// 100% of the best one.
fn fastest(mut f: impl FnMut()) -> f64 {
    (0..PROBE_TRIES)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Runs `kernel(iters)` on every pool thread at once, `iters` calibrated on one thread to
/// last about `run / PROBE_TRIES`, [`PROBE_TRIES`] times; returns the iterations one run does
/// in all and the seconds the fastest took.
fn on_every_thread<T: Send>(run: Duration, kernel: impl Fn(u64) -> T + Sync) -> (f64, f64) {
    let iters = calibrated_count(run / PROBE_TRIES as u32, 1 << 14, |n| {
        black_box(kernel(n));
    });
    let threads = rayon::current_num_threads();
    let best = fastest(|| {
        black_box(rayon::broadcast(|_| kernel(iters)));
    });
    (threads as f64 * iters as f64, best)
}

/// 8-bit multiply-accumulates per second (`vpdpbusd`, what the integer matmul kernels run)
/// with every pool thread busy for about `run`, where the CPU has AVX512-VNNI.
pub fn int8_throughput(run: Duration) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512f") {
        // SAFETY: the features it needs were just detected.
        let (iters, s) = on_every_thread(run, |n| unsafe { dpbusd_avx512(n) });
        // Each instruction: 16 lanes x 4 byte products.
        return Some(iters * (CHAINS * 64) as f64 / s.max(1e-9));
    }
    let _ = run;
    None
}

/// `CHAINS` independent `vpdpbusd` accumulators, `iters` times.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpbusd_avx512(iters: u64) -> i32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_epi8(black_box(3));
    let b = _mm512_set1_epi8(black_box(-1));
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_dpbusd_epi32(*v, a, b);
        }
    }
    let mut sum = _mm512_setzero_si512();
    for v in acc {
        sum = _mm512_add_epi32(sum, v);
    }
    _mm512_reduce_add_epi32(sum)
}

type FmaKernel = fn(u64) -> f32;

fn fma_kernel() -> (FmaKernel, &'static str) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features it needs were just detected.
        return (|n| unsafe { fma_avx2(n) }, "AVX2+FMA");
    }
    (fma_portable, "portable (no FMA detected)")
}

/// `CHAINS` x `LANES` chains of `v = v * a + b`, `iters` times; returns their sum.
fn fma_portable(iters: u64) -> f32 {
    let (a, b) = (black_box(0.999_999f32), black_box(1e-7f32));
    let mut acc = [[1f32; LANES]; CHAINS];
    for _ in 0..iters {
        for chain in acc.iter_mut() {
            for v in chain.iter_mut() {
                *v = *v * a + b;
            }
        }
    }
    acc.iter().flatten().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(black_box(0.999_999));
    let b = _mm256_set1_ps(black_box(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0f32; LANES];
    let mut sum = _mm256_setzero_ps();
    for v in acc {
        sum = _mm256_add_ps(sum, v);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
    out.iter().sum()
}

/// Multiply-adds per second of the engine's own matmul (`ops::matmul`: activation
/// quantization, the fork-join and the kernel) on a `rows` x `cols` matrix of `dtype`,
/// repacked as the model's weights are, against `tokens` tokens at once: what the kernel
/// reaches of the 8-bit ceiling with nothing else of the forward pass around it. Best of
/// [`PROBE_TRIES`] runs of about `run / PROBE_TRIES`, each a loop of whole calls on a pool
/// thread (as a step runs). The weights are pseudo-random, quantized with the file format's
/// own code.
pub fn matmul_throughput(
    dtype: DType,
    rows: usize,
    cols: usize,
    tokens: usize,
    run: Duration,
) -> std::io::Result<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5e11a);
    let mut next = || rng.random_range(-0.5f32..0.5);
    let mut data = Vec::with_capacity(rows * dtype.row_bytes(cols));
    for _ in 0..rows {
        let row: Vec<f32> = (0..cols).map(|_| next()).collect();
        data.extend(quantize_row(dtype, &row));
    }
    let mut w = QMatrix::new(dtype, rows, cols, Arc::new(Bytes::Owned(data)), 0);
    pack_all(&mut [&mut w])?;
    let x: Vec<f32> = (0..tokens * cols).map(|_| next()).collect();
    let mut y = vec![0f32; tokens * rows];
    let best = rayon::scope(|_| {
        let mut calls = |n: u64| (0..n).for_each(|_| matmul(&w, &x, tokens, &mut y));
        let n = calibrated_count(run / PROBE_TRIES as u32, 1, &mut calls);
        fastest(|| calls(n)) / n as f64
    });
    black_box(&y);
    Ok((rows * cols * tokens) as f64 / best.max(1e-12))
}

/// Multiply-adds one token costs in the weight matmuls, the output head aside (prefill computes
/// logits for the last position only).
pub fn matmul_macs_per_token(c: &ModelConfig) -> f64 {
    let (d, q, kv) = (
        c.d_model as f64,
        (c.n_heads * c.head_dim) as f64,
        (c.n_kv_heads * c.head_dim) as f64,
    );
    c.n_layers as f64 * (d * q + 2.0 * d * kv + q * d + 3.0 * d * c.d_ff as f64)
}

/// Multiply-adds of causal attention over a whole prompt of `tokens` tokens: position `i`
/// scores `i + 1` keys and sums as many values, in every head of every layer.
pub fn attention_macs(c: &ModelConfig, tokens: usize) -> f64 {
    let (n, heads) = (tokens as f64, (c.n_layers * c.n_heads * c.head_dim) as f64);
    heads * n * (n + 1.0)
}

/// Prefill ceiling in tokens/s for a prompt of `tokens` tokens: the matmuls at `matmul_rate`
/// multiply-adds/s (the 8-bit dot, or f32 FMA where the integer kernels do not run) and
/// attention, which is f32 in every build, at `attention_rate`. Attention grows with the
/// square of the prompt, so a longer prompt's ceiling is lower: this is what a long prompt's
/// rate is held against, not the matmuls' ceiling alone.
pub fn prefill_ceiling(
    c: &ModelConfig,
    tokens: usize,
    matmul_rate: f64,
    attention_rate: f64,
) -> f64 {
    let seconds = tokens as f64 * matmul_macs_per_token(c) / matmul_rate
        + attention_macs(c, tokens) / attention_rate;
    tokens as f64 / seconds.max(f64::MIN_POSITIVE)
}

/// Bytes of f16 KV cache one decode step reads per sequence at this context length.
pub fn kv_bytes_per_token(c: &ModelConfig, context: usize) -> f64 {
    (c.n_layers * 2 * c.n_kv_heads * c.head_dim * 2 * context) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probes_measure_something() {
        let bw = read_bandwidth(4 << 20, 2);
        assert!(bw.is_finite() && bw > 0.0);
        let (flops, _) = fma_throughput(Duration::from_millis(20));
        assert!(flops.is_finite() && flops > 0.0);
        if let Some(macs) = int8_throughput(Duration::from_millis(20)) {
            assert!(macs.is_finite() && macs > 0.0);
        }
    }

    #[test]
    fn attention_takes_the_prefill_ceiling_down_with_the_square_of_the_prompt() {
        let c = crate::testing::smollm2_135m_config();
        // 512 positions score 1 + 2 + ... + 512 keys and sum as many values, in 270 heads of 64.
        assert_eq!(attention_macs(&c, 512), 270.0 * 64.0 * 512.0 * 513.0);
        assert_eq!(attention_macs(&c, 0), 0.0);
        // Attention free: the matmuls' ceiling whatever the length.
        let macs = matmul_macs_per_token(&c);
        let free = prefill_ceiling(&c, 4096, 460e9, f64::INFINITY);
        assert!((free - 460e9 / macs).abs() < 1e-6 * free, "{free}");
        // This machine's rates (8-bit dot 460 G, f32 FMA 115 G multiply-adds/s): a 4,096-token
        // prompt's ceiling is under half a 512-token prompt's, a 1,024-token one's above 3/4.
        let at = |n| prefill_ceiling(&c, n, 460e9, 115e9);
        assert!(at(1024) / at(512) > 0.75, "{} {}", at(1024), at(512));
        assert!(at(4096) / at(512) < 0.5, "{} {}", at(4096), at(512));
        assert!(at(1) > at(512) && at(512) > at(1024) && at(1024) > at(4096));
    }

    #[test]
    fn the_matmul_probe_measures_something() {
        for dtype in [DType::Q4_1, DType::Q8_0] {
            let macs = matmul_throughput(dtype, 40, 64, 9, Duration::from_millis(10)).unwrap();
            assert!(macs.is_finite() && macs > 0.0, "{dtype:?}: {macs}");
        }
    }

    #[test]
    fn the_read_loop_sums_what_a_plain_fold_does() {
        for n in [0, 1, 31, 32, 33, 1000] {
            let c: Vec<u64> = (0..n as u64)
                .map(|x| x.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect();
            assert_eq!(
                read_sum(&c),
                c.iter().fold(0u64, |a, &x| a.wrapping_add(x)),
                "{n}"
            );
        }
    }

    #[test]
    fn the_simd_fma_loop_computes_what_the_portable_one_does() {
        let (kernel, _) = fma_kernel();
        for n in [0, 1, 7, 1000] {
            let (a, b) = (kernel(n), fma_portable(n));
            // Fused and unfused multiply-adds round differently; the chains stay near 1.
            assert!((a - b).abs() <= 1e-3 * b.abs(), "{n}: {a} vs {b}");
        }
    }
}
