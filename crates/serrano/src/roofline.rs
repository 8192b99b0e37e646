//! `serrano roofline`: this machine's memory bandwidth and FMA throughput on the kernel pool, the
//! decode and prefill ceilings they put on the loaded model, and how close the engine gets.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serrano_engine::quant::DType;
use serrano_engine::roofline::{
    fma_throughput, int8_throughput, kv_bytes_per_token, matmul_macs_per_token, matmul_throughput,
    read_bandwidth,
};
use serrano_engine::GenerateRequest;

use crate::{start_engine, synthetic_prompt, timed_run};

#[derive(Args)]
pub struct RooflineArgs {
    #[command(flatten)]
    model: crate::ModelArgs,
    /// Bytes the bandwidth probe reads per pass (far larger than the caches).
    #[arg(long, default_value = "512MiB", value_parser = crate::parse_bytes)]
    probe_bytes: usize,
    /// Tokens decoded for the measured decode speed (after an 8-token prompt).
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Prompt tokens for the measured prefill speed.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Measured runs of each; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

/// Tokens per call of the matmul probe: enough for the kernel's widest tiles (8 tokens) to
/// run nearly every pass, as in a prefill chunk or a large decode batch.
const MATMUL_PROBE_TOKENS: usize = 64;

pub fn run(a: RooflineArgs) -> Result<()> {
    let (path, engine) = start_engine(&a.model, None)?;
    let info = engine.info().clone();
    let c = &info.config;
    let threads = rayon::current_num_threads();

    // Decode: every token reads all weights and its KV cache once.
    let context = 8 + a.decode_tokens / 2;
    let bytes = info.weight_bytes as f64 + kv_bytes_per_token(c, context);
    let bw = read_bandwidth(a.probe_bytes, 5);
    // Read over and over, a buffer of one step's bytes stays in whatever cache holds it, as
    // the weights do between decode steps: on a CPU whose last-level cache holds the model,
    // that cache's bandwidth is the ceiling, not memory's.
    let bw_step = read_bandwidth(bytes as usize, 10);
    let (flops, isa) = fma_throughput(Duration::from_millis(1500));
    let int8 = int8_throughput(Duration::from_millis(1500));
    println!(
        "kernel pool: {threads} threads; matmul kernels: {} (cap with {})",
        serrano_engine::kernels::simd_name(),
        serrano_engine::kernels::SIMD_ENV
    );
    println!(
        "read bandwidth: {:.1} GB/s from memory (best of 5 reads of {} MiB); {:.1} GB/s over one decode step's {:.1} MB (best of 10)",
        bw / 1e9,
        a.probe_bytes >> 20,
        bw_step / 1e9,
        bytes / 1e6
    );
    println!(
        "f32 FMA throughput: {:.1} GFLOP/s ({isa}; best of 5 runs of 0.3 s)",
        flops / 1e9
    );
    if let Some(m) = int8 {
        println!(
            "8-bit dot throughput: {:.1} G multiply-adds/s (AVX512-VNNI; best of 5 runs of 0.3 s)",
            m / 1e9
        );
    }
    if let Some(m) = int8.filter(|_| serrano_engine::kernels::has_avx512()) {
        // The repacked kernel alone, on the model's largest matrix shape, against the probe:
        // how much of the ceiling the kernel's own instruction mix leaves.
        let mut line = String::new();
        for dtype in [DType::Q4_1, DType::Q4_0, DType::Q8_0] {
            let r = matmul_throughput(
                dtype,
                c.d_ff,
                c.d_model,
                MATMUL_PROBE_TOKENS,
                Duration::from_millis(1500),
            )?;
            line += &format!(
                "{}{dtype:?} {:.1} G ({:.0}%)",
                if line.is_empty() { "" } else { ", " },
                r / 1e9,
                100.0 * r / m
            );
        }
        println!(
            "matmul (repacked weights, {}x{}, {MATMUL_PROBE_TOKENS} tokens a call, best of 5 runs of 0.3 s): {line} multiply-adds/s (% of the 8-bit dot)",
            c.d_ff, c.d_model
        );
    }
    // The larger of the two: a cache that holds the step's bytes serves them faster.
    let decode_ceiling = bw.max(bw_step) / bytes;
    // Prefill: arithmetic. The integer kernels' ceiling where they run, else f32 FMA (a
    // multiply-add is 2 FLOPs).
    let macs = matmul_macs_per_token(c);
    let (prefill_ceiling, prefill_basis) = match int8 {
        Some(m) if serrano_engine::kernels::has_avx512() => (m / macs, "8-bit dot throughput"),
        _ => (flops / (2.0 * macs), "f32 FMA"),
    };

    let mut best_decode = 0f64;
    let mut best_prefill = 0f64;
    for run in 0..a.repeat.max(1) + 1 {
        // A different first token each run, so nothing comes from the prefix cache; run 0
        // warms up and is not counted.
        let prompt = |n: usize| {
            let mut p = synthetic_prompt(&info.tokenizer, n);
            p[0] = (p[0] + run as u32 + 1) % c.vocab_size as u32;
            p
        };
        let mut req = GenerateRequest::new(prompt(8), a.decode_tokens);
        req.ignore_eos = true;
        let d = timed_run(&engine, req)?;
        let mut req = GenerateRequest::new(prompt(a.prefill_tokens), 1);
        req.ignore_eos = true;
        let p = timed_run(&engine, req)?;
        if run > 0 {
            best_decode = best_decode.max(d.decode_tps);
            best_prefill = best_prefill.max(a.prefill_tokens as f64 / p.ttft_s.max(1e-9));
        }
    }
    println!(
        "model: {} ({:.1} MB of weights; {:.2} MB of KV read per token at {context} tokens of context)",
        path.display(),
        info.weight_bytes as f64 / 1e6,
        kv_bytes_per_token(c, context) / 1e6
    );
    println!(
        "decode: ceiling {decode_ceiling:.0} tok/s (the better bandwidth / bytes per token; {:.0} from memory alone); measured {best_decode:.1} tok/s ({} new tokens, best of {}) = {:.0}% of the ceiling",
        bw / bytes,
        a.decode_tokens,
        a.repeat.max(1),
        100.0 * best_decode / decode_ceiling
    );
    println!(
        "prefill: ceiling {prefill_ceiling:.0} tok/s ({prefill_basis} / {:.0}M multiply-adds per token in the matmuls); measured {best_prefill:.1} tok/s ({}-token prompt, best of {}) = {:.0}% of the ceiling",
        macs / 1e6,
        a.prefill_tokens,
        a.repeat.max(1),
        100.0 * best_prefill / prefill_ceiling
    );
    Ok(())
}
