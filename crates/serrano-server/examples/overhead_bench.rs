//! Open-loop latency of chat completions at fixed request rates, for measuring a gateway's
//! added latency against the same stub called directly. Latency is measured from each request's
//! intended send time, so queueing in the client is not hidden.
//!
//! `overhead_bench URL KEY RATE SECONDS` prints one JSON line: rate, sent, ok, errors, p50/p90/p99
//! in milliseconds, and the client's worst send lag. With `OVERHEAD_TRACE=FILE` it also writes
//! one line per request (intended send time from the start and latency, both in ms) to see
//! whether the slow ones cluster in time (a stall) or spread out (contention). With
//! `OVERHEAD_RANDOM_IDS=1` each request carries a random `x-request-id` (the gateway otherwise
//! makes one that sorts by time), to measure what key order costs the store.

use std::time::{Duration, Instant};

use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, key, rate, secs] = args.as_slice() else {
        eprintln!("usage: overhead_bench URL KEY RATE SECONDS");
        std::process::exit(2);
    };
    let (url, key) = (url.clone(), key.clone());
    let (Ok(rate), Ok(secs)) = (rate.parse::<f64>(), secs.parse::<f64>()) else {
        eprintln!("RATE and SECONDS must be numbers");
        std::process::exit(2);
    };
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4096)
        .build()
        .expect("client");
    let body = json!({"model": "stub", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16});
    let random_ids = std::env::var_os("OVERHEAD_RANDOM_IDS").is_some();
    let n = (rate * secs) as usize;
    let start = Instant::now() + Duration::from_millis(200);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut max_lag = Duration::ZERO;
    // Warm the connection pool so the first requests do not pay for connecting.
    for _ in 0..8 {
        let _ = client.post(&url).bearer_auth(&key).json(&body).send().await;
    }
    for i in 0..n {
        let intended = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(intended.into()).await;
        max_lag = max_lag.max(Instant::now().saturating_duration_since(intended));
        let (client, url, key, body, tx) = (
            client.clone(),
            url.clone(),
            key.clone(),
            body.clone(),
            tx.clone(),
        );
        tokio::spawn(async move {
            let mut request = client.post(&url).bearer_auth(&key).json(&body);
            if random_ids {
                request = request.header(
                    "x-request-id",
                    format!("req-{:032x}", rand::random::<u128>()),
                );
            }
            let ok = match request.send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            let _ = tx.send((ok, intended.elapsed(), intended - start));
        });
    }
    drop(tx);
    let mut lat = vec![];
    let mut errors = 0;
    let trace_path = std::env::var("OVERHEAD_TRACE").ok();
    let mut trace = String::new();
    while let Some((ok, d, at)) = rx.recv().await {
        if trace_path.is_some() {
            trace.push_str(&format!(
                "{:.3} {:.3}\n",
                at.as_secs_f64() * 1e3,
                if ok { d.as_secs_f64() * 1e3 } else { f64::NAN }
            ));
        }
        if ok {
            lat.push(d.as_secs_f64() * 1e3);
        } else {
            errors += 1;
        }
    }
    if let Some(path) = trace_path {
        if let Err(e) = std::fs::write(&path, trace) {
            eprintln!("cannot write {path}: {e}");
        }
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{}",
        json!({"rate": rate, "sent": n, "ok": lat.len(), "errors": errors,
               "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
               "max_send_lag_ms": max_lag.as_secs_f64() * 1e3})
    );
}
