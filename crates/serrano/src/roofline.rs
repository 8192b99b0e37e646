//! `serrano roofline`: this machine's memory bandwidth and FMA throughput on the kernel pool, the
//! decode and prefill ceilings they put on the loaded model, and how close the engine gets.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serrano_engine::quant::DType;
use serrano_engine::roofline::{
    attention_macs, fma_throughput, int8_throughput, kv_bytes_per_token, matmul_macs_per_token,
    matmul_throughput, prefill_ceiling, read_bandwidth, PROBE_TRIES,
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
    /// Prompt lengths for the measured prefill speeds, comma-separated: each is held against
    /// its own ceiling (attention grows with the square of the prompt) and against the first.
    #[arg(long, value_delimiter = ',', default_value = "512,1024,4096")]
    prefill_tokens: Vec<usize>,
    /// Measured runs of each; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

/// Time each compute probe gets, shared among its tries (the fastest is kept).
const PROBE_RUN: Duration = Duration::from_millis(1500);

/// Tokens per call of the matmul probe: enough for the kernel's widest tiles (8 tokens) to
/// run nearly every pass, as in a prefill chunk or a large decode batch.
const MATMUL_PROBE_TOKENS: usize = 64;

pub fn run(a: RooflineArgs) -> Result<()> {
    let probe = format!(
        "best of {PROBE_TRIES} runs of {:.1} s",
        PROBE_RUN.as_secs_f64() / PROBE_TRIES as f64
    );
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
    let (flops, isa) = fma_throughput(PROBE_RUN);
    let int8 = int8_throughput(PROBE_RUN);
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
        "f32 FMA throughput: {:.1} GFLOP/s ({isa}; {probe})",
        flops / 1e9
    );
    if let Some(m) = int8 {
        println!(
            "8-bit dot throughput: {:.1} G multiply-adds/s (AVX512-VNNI; {probe})",
            m / 1e9
        );
    }
    if let Some(m) = int8.filter(|_| serrano_engine::kernels::has_avx512()) {
        // The repacked kernel alone, on the model's largest matrix shape, against the probe:
        // how much of the ceiling the kernel's own instruction mix leaves.
        let mut line = String::new();
        for dtype in [DType::Q4_1, DType::Q4_0, DType::Q8_0] {
            let r = matmul_throughput(dtype, c.d_ff, c.d_model, MATMUL_PROBE_TOKENS, PROBE_RUN)?;
            line += &format!(
                "{}{dtype:?} {:.1} G ({:.0}%)",
                if line.is_empty() { "" } else { ", " },
                r / 1e9,
                100.0 * r / m
            );
        }
        println!(
            "matmul (repacked weights, {}x{}, {MATMUL_PROBE_TOKENS} tokens a call, {probe}): {line} multiply-adds/s (% of the 8-bit dot)",
            c.d_ff, c.d_model
        );
    }
    // The larger of the two: a cache that holds the step's bytes serves them faster.
    let decode_ceiling = bw.max(bw_step) / bytes;
    // Prefill: arithmetic. The matmuls at the integer kernels' rate where they run, else at
    // f32 FMA's (a multiply-add is 2 FLOPs); attention at f32 FMA's in every build.
    let fma_macs = flops / 2.0;
    let (matmul_rate, matmul_basis) = match int8 {
        Some(m) if serrano_engine::kernels::has_avx512() => (m, "8-bit dot"),
        _ => (fma_macs, "f32 FMA"),
    };
    // A prompt the served context cannot hold (or an empty one) cannot run; say so rather
    // than fail.
    let (lengths, too_long): (Vec<usize>, Vec<usize>) = a
        .prefill_tokens
        .iter()
        .partition(|&&n| n > 0 && n < info.context_length);
    if !too_long.is_empty() {
        println!(
            "prefill: skipping prompts of {too_long:?} tokens (a prompt and its one new token must fit the served context of {})",
            info.context_length
        );
    }

    let mut best_decode = 0f64;
    let mut best_prefill = vec![0f64; lengths.len()];
    // A different first token for every prompt, so nothing comes from the prefix cache (the
    // prompts are one text cut to length: a longer one would otherwise reuse a shorter one's
    // KV); run 0 warms up and is not counted.
    let mut prompts = 0u32;
    for run in 0..a.repeat.max(1) + 1 {
        let mut prompt = |n: usize| {
            let mut p = synthetic_prompt(&info.tokenizer, n);
            prompts += 1;
            p[0] = (p[0] + prompts) % c.vocab_size as u32;
            p
        };
        let mut req = GenerateRequest::new(prompt(8), a.decode_tokens);
        req.ignore_eos = true;
        let d = timed_run(&engine, req)?;
        if run > 0 {
            best_decode = best_decode.max(d.decode_tps);
        }
        for (&n, best) in lengths.iter().zip(&mut best_prefill) {
            let mut req = GenerateRequest::new(prompt(n), 1);
            req.ignore_eos = true;
            let p = timed_run(&engine, req)?;
            if run > 0 {
                *best = best.max(n as f64 / p.ttft_s.max(1e-9));
            }
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
    let macs = matmul_macs_per_token(c);
    println!(
        "prefill: matmuls {:.0}M multiply-adds a token at the {matmul_basis} rate ({:.0} tok/s alone); attention {:.0} G multiply-adds/s (f32 FMA)",
        macs / 1e6,
        matmul_rate / macs,
        fma_macs / 1e9
    );
    let rows: Vec<(usize, f64, f64)> = lengths
        .iter()
        .zip(&best_prefill)
        .map(|(&n, &best)| (n, best, prefill_ceiling(c, n, matmul_rate, fma_macs)))
        .collect();
    for (i, &(n, best, ceiling)) in rows.iter().enumerate() {
        // Against the first length too: how much a longer prompt loses, beside how much its
        // ceiling says it must.
        let against_first = match rows.first() {
            Some(&(f, f_best, f_ceiling)) if i > 0 => format!(
                "; {:.0}% of the {f}-token rate (the ceilings' ratio: {:.0}%)",
                100.0 * best / f_best.max(1e-9),
                100.0 * ceiling / f_ceiling
            ),
            _ => String::new(),
        };
        let attention = attention_macs(c, n);
        println!(
            "prefill {n} tokens: ceiling {ceiling:.0} tok/s (attention {:.0}% of its multiply-adds); measured {best:.1} tok/s (best of {}) = {:.0}% of the ceiling{against_first}",
            100.0 * attention / (attention + n as f64 * macs),
            a.repeat.max(1),
            100.0 * best / ceiling
        );
    }
    Ok(())
}
