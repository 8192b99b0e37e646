//! A profile's step-time coefficients from a real server, fitted by the engine's own
//! `StepModel` (one model in the project, not a second fit): replayed from a serrano's
//! `--step-log`, or measured from outside any OpenAI-compatible server through the load
//! generator. (A running serrano's `/metrics` has them directly: `serrano sim calibrate`.)

use std::io::{BufRead, Read};

use serrano_bench::{RunOptions, Target, Workload};
use serrano_engine::steptime::{chunk_kv_tokens, StepModel, StepShape, MIN_STEPS};

use crate::sim::SimError;

/// Longest step-log line read (a line is about 150 bytes; a longer one is not the engine's).
pub const MAX_STEP_LOG_LINE: u64 = 4096;

/// Concurrent streams of [`measure`]'s decode runs: eight batch sizes, as many decode-only rows
/// as the step-time model needs to trust its fit.
pub const MEASURED_BATCHES: [u64; 8] = [1, 2, 3, 4, 6, 8, 12, 16];

/// The engine's step-time model after the steps of a `--step-log` (one server run's, from its
/// start): calibration rows pinned and real steps in the window, as the engine learned them
/// (`Engine::learn`), so the coefficients are the ones its `/metrics` showed after the last
/// logged step (to the last bits: the log's decimal seconds parse back within an ulp).
pub fn from_step_log(mut log: impl BufRead) -> Result<[f64; 4], SimError> {
    let mut model = StepModel::default();
    let mut line = String::new();
    for n in 1.. {
        let bad = |why: &str| SimError::Workload(format!("step log line {n}: {why}"));
        line.clear();
        let read = (&mut log)
            .take(MAX_STEP_LOG_LINE + 1)
            .read_line(&mut line)
            .map_err(|e| bad(&e.to_string()))?;
        if read == 0 {
            break;
        }
        if read as u64 > MAX_STEP_LOG_LINE {
            return Err(bad(&format!("over {MAX_STEP_LOG_LINE} bytes")));
        }
        let not_a_step = || bad("not a step-log line");
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|_| not_a_step())?;
        let count = |k: &str| v[k].as_u64().map(|x| x as usize).ok_or_else(not_a_step);
        let shape = StepShape {
            prefill_tokens: count("prefill_tokens")?,
            decode_seqs: count("decode_seqs")?,
            kv_tokens: count("kv_tokens")?,
        };
        let seconds = v["seconds"].as_f64().ok_or_else(not_a_step)?;
        if v["calibration"].as_bool() == Some(true) {
            model.observe_pinned(shape, seconds);
        } else {
            model.observe(shape, seconds);
        }
    }
    model.coefficients().ok_or_else(|| {
        SimError::Workload(format!(
            "too few steps in the step log for a step-time model ({MIN_STEPS} needed)"
        ))
    })
}

/// The engine's step-time model fitted to a server's measured latencies. A request of one
/// output token is one prefill step of its prompt (its time to first token, with the HTTP round
/// trip in it): 32 of them one at a time, prompts of 16 to `max_prompt` tokens. The median gap
/// of B streams decoding together is one decode step of B sequences: B of
/// [`MEASURED_BATCHES`], 64 tokens each.
pub async fn measure(target: &Target, max_prompt: u64) -> Result<[f64; 4], SimError> {
    let opts = RunOptions::default();
    let bench = |e: serrano_bench::BenchError| SimError::Workload(format!("measuring: {e}"));
    let workload = |requests: u64, prompt: &str, output: u64, clients: u64| {
        Workload::parse(
            &format!(
                "name = \"calibrate\"\nendpoint = \"completions\"\nstream = true\n\
                 requests = {requests}\nwarmup_requests = 1\nseed = 1\nprompt_tokens = {prompt}\n\
                 output_tokens = {{ dist = \"fixed\", value = {output} }}\n\
                 arrival = {{ kind = \"closed\", concurrency = {clients} }}\n"
            ),
            false,
        )
        .map_err(|e| SimError::Workload(format!("calibration workload: {e}")))
    };
    let mut model = StepModel::default();
    let prompts = format!(
        "{{ dist = \"uniform\", min = 16, max = {} }}",
        max_prompt.max(17)
    );
    let prefill = serrano_bench::run::run(target, &workload(32, &prompts, 1, 1)?, &opts)
        .await
        .map_err(bench)?;
    for r in prefill.records.iter().filter(|r| r.ok()) {
        let (Some(ttft), n) = (r.ttft(), r.prompt_tokens as usize) else {
            continue;
        };
        let shape = StepShape {
            prefill_tokens: n,
            decode_seqs: 0,
            kv_tokens: chunk_kv_tokens(0, n),
        };
        model.observe(shape, ttft);
    }
    let fixed = "{ dist = \"fixed\", value = 16 }";
    for b in MEASURED_BATCHES {
        let run = serrano_bench::run::run(target, &workload(b, fixed, 64, b)?, &opts)
            .await
            .map_err(bench)?;
        let Some(gap) = run.summary.itl.p(50.0) else {
            continue;
        };
        // 16 prompt tokens and 64 generated: positions 16 to 79, 48 on average.
        let shape = StepShape {
            prefill_tokens: 0,
            decode_seqs: b as usize,
            kv_tokens: b as usize * 48,
        };
        model.observe(shape, gap / 1e3);
    }
    model.coefficients().ok_or_else(|| {
        SimError::Workload(format!(
            "the measurements did not fit a step-time model (too few answered requests from {})",
            target.base
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step log is replayed as the engine learned it: the same coefficients as a model fed
    /// the same rows; a line that is not a step is refused with its number.
    #[test]
    fn a_step_log_gives_the_fit_of_its_rows() {
        let mut direct = StepModel::default();
        let mut log = String::new();
        for i in 0..40usize {
            let shape = StepShape {
                prefill_tokens: if i % 2 == 0 { 32 * (i % 7) } else { 0 },
                decode_seqs: i % 5,
                kv_tokens: 100 * i,
            };
            let seconds = 0.002 + 1e-5 * shape.prefill_tokens as f64 + 1e-4 * (i % 5) as f64;
            let calibration = i < 10;
            if calibration {
                direct.observe_pinned(shape, seconds);
            } else {
                direct.observe(shape, seconds);
            }
            log += &format!(
                "{{\"t\": 1.0, \"prefill_tokens\": {}, \"decode_seqs\": {}, \"kv_tokens\": {}, \
                 \"seconds\": {seconds}, \"predicted\": null, \"calibration\": {calibration}}}\n",
                shape.prefill_tokens, shape.decode_seqs, shape.kv_tokens
            );
        }
        // Equal but for the last bits: serde_json's float parsing may be one ulp off.
        let replayed = from_step_log(log.as_bytes()).unwrap();
        let direct = direct.coefficients().unwrap();
        for (a, b) in replayed.iter().zip(direct) {
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1e-9),
                "{replayed:?} vs {direct:?}"
            );
        }
        let broken = log.replacen("\"seconds\"", "\"secs\"", 1);
        let e = from_step_log(broken.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let long = format!("{}\n", "x".repeat(MAX_STEP_LOG_LINE as usize + 1));
        let e = from_step_log(long.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("over 4096 bytes"), "{e}");
        assert!(from_step_log(&b""[..]).is_err());
    }
}
