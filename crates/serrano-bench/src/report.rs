//! Reports: the terminal table and JSON whose field names are vLLM's `--save-result` names where
//! the concept matches (`mean_ttft_ms`, `p99_itl_ms`, `output_throughput`, ...).

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::metrics::{Stats, Summary};
use crate::run::RunResult;

/// What the capacity costs, to turn throughput into dollars per 1M tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Price {
    /// The backend's price per hour (a GPU or CPU instance).
    pub per_hour: Option<f64>,
    /// Per-token prices (a hosted API), dollars per 1M tokens.
    pub per_1m_input: Option<f64>,
    pub per_1m_output: Option<f64>,
}

/// Dollars per 1M output tokens, at the achieved throughput and at the goodput.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    pub usd_per_1m_output_tokens: f64,
    pub usd_per_1m_output_tokens_at_goodput: Option<f64>,
}

impl Price {
    pub fn cost(&self, s: &Summary) -> Option<Cost> {
        let per_m = |tokens_per_s: f64| -> Option<f64> {
            if let Some(h) = self.per_hour {
                return (tokens_per_s > 0.0).then(|| h / 3600.0 / tokens_per_s * 1e6);
            }
            // Per-token prices: what a million output tokens cost with their share of input.
            let out = s.total_output_tokens as f64;
            (out > 0.0 && (self.per_1m_input.is_some() || self.per_1m_output.is_some())).then(
                || {
                    let input = s.total_input_tokens as f64 * self.per_1m_input.unwrap_or(0.0);
                    let output = out * self.per_1m_output.unwrap_or(0.0);
                    (input + output) / out
                },
            )
        };
        Some(Cost {
            usd_per_1m_output_tokens: per_m(s.output_throughput)?,
            usd_per_1m_output_tokens_at_goodput: s.token_goodput.and_then(|g| {
                if self.per_hour.is_some() {
                    per_m(g)
                } else {
                    None
                }
            }),
        })
    }
}

fn stats_fields(out: &mut Map<String, Value>, name: &str, s: &Stats) {
    out.insert(format!("mean_{name}_ms"), json!(s.mean));
    out.insert(format!("median_{name}_ms"), json!(s.median));
    out.insert(format!("std_{name}_ms"), json!(s.std));
    for (p, v, ci) in &s.percentiles {
        out.insert(format!("p{p}_{name}_ms"), json!(v));
        out.insert(format!("ci95_p{p}_{name}_ms"), json!(ci));
    }
}

/// One run as JSON without the per-request arrays (for sweep points).
pub fn summary_json(r: &RunResult, price: Option<&Price>) -> Value {
    let mut v = to_json(r, price);
    if let Some(o) = v.as_object_mut() {
        for k in ["input_lens", "output_lens", "ttfts", "itls", "errors"] {
            o.remove(k);
        }
    }
    v
}

/// Most successful requests whose per-request arrays (`input_lens`, `output_lens`, `ttfts`,
/// `itls`) a JSON result holds, and most `errors` listed: an hour of simulated traffic at 100 req/s would write every
/// token's gap, over a gigabyte. Past it they are left out and `per_request_omitted` says so.
pub const MAX_DETAILED_REQUESTS: usize = 20_000;

/// One run as JSON: vLLM's names, plus serrano's extras (errors, confidence intervals, client
/// lag, goodput, cost, energy); per-request arrays up to [`MAX_DETAILED_REQUESTS`].
pub fn to_json(r: &RunResult, price: Option<&Price>) -> Value {
    let s = &r.summary;
    let mut o = Map::new();
    let put = |o: &mut Map<String, Value>, k: &str, v: Value| {
        o.insert(k.to_string(), v);
    };
    put(&mut o, "backend", json!("openai"));
    put(&mut o, "base_url", json!(r.url));
    put(&mut o, "model_id", json!(r.model));
    put(&mut o, "workload", json!(r.workload));
    put(
        &mut o,
        "request_rate",
        if r.request_rate.is_finite() {
            json!(r.request_rate)
        } else {
            json!("inf")
        },
    );
    put(&mut o, "max_concurrency", json!(r.max_concurrency));
    put(&mut o, "burstiness", json!(r.burstiness));
    put(
        &mut o,
        "exact_prompt_lengths",
        json!(r.exact_prompt_lengths),
    );
    summary_fields(&mut o, s);
    let by_turn = crate::metrics::mean_ttft_ms_by_turn(&r.records);
    if !by_turn.is_empty() {
        put(&mut o, "mean_ttft_ms_by_turn", json!(by_turn));
    }
    put(&mut o, "cost", json!(price.and_then(|p| p.cost(s))));
    if !r.tenants.is_empty() {
        let tenants = r.tenants.iter().map(|t| {
            let mut o = Map::new();
            o.insert("name".into(), json!(t.name));
            o.insert("slo".into(), json!(t.slo));
            summary_fields(&mut o, &t.summary);
            o.insert("cost".into(), json!(price.and_then(|p| p.cost(&t.summary))));
            Value::Object(o)
        });
        put(&mut o, "tenants", Value::Array(tenants.collect()));
    }
    put(&mut o, "energy", json!(r.energy));
    put(&mut o, "gpu_energy", json!(r.gpu_energy));
    let ok = r.records.iter().filter(|x| x.ok());
    let n = ok.clone().count();
    if n <= MAX_DETAILED_REQUESTS {
        put(
            &mut o,
            "input_lens",
            json!(ok.clone().map(|x| x.prompt_tokens).collect::<Vec<_>>()),
        );
        put(
            &mut o,
            "output_lens",
            json!(ok.clone().map(|x| x.output_tokens).collect::<Vec<_>>()),
        );
        put(
            &mut o,
            "ttfts",
            json!(ok.clone().map(|x| x.ttft()).collect::<Vec<_>>()),
        );
        put(
            &mut o,
            "itls",
            json!(ok.map(|x| x.itls().collect::<Vec<_>>()).collect::<Vec<_>>()),
        );
    } else {
        put(
            &mut o,
            "per_request_omitted",
            json!(format!(
                "{n} requests: over {MAX_DETAILED_REQUESTS}, so no input_lens, output_lens, \
                 ttfts or itls arrays (the summary above covers every request)"
            )),
        );
    }
    put(
        &mut o,
        "errors",
        json!(r
            .records
            .iter()
            .filter_map(|x| x.error.clone())
            .take(MAX_DETAILED_REQUESTS)
            .collect::<Vec<_>>()),
    );
    Value::Object(o)
}

/// A summary's numbers, under vLLM's names: the whole run's, and each tenant's.
fn summary_fields(o: &mut Map<String, Value>, s: &Summary) {
    let mut put = |k: &str, v: Value| {
        o.insert(k.to_string(), v);
    };
    put("duration", json!(s.duration));
    put("completed", json!(s.completed));
    put("failed", json!(s.failed));
    put("error_rate", json!(s.error_rate));
    put("retried", json!(s.retried));
    put("total_input_tokens", json!(s.total_input_tokens));
    put("total_output_tokens", json!(s.total_output_tokens));
    put("request_throughput", json!(s.request_throughput));
    put("request_goodput", json!(s.request_goodput));
    put("output_throughput", json!(s.output_throughput));
    put("token_goodput", json!(s.token_goodput));
    put("total_token_throughput", json!(s.total_token_throughput));
    put("slo_met", json!(s.slo_met));
    stats_fields(o, "ttft", &s.ttft);
    stats_fields(o, "tpot", &s.tpot);
    stats_fields(o, "itl", &s.itl);
    stats_fields(o, "e2el", &s.e2el);
    stats_fields(o, "client_lag", &s.client_lag);
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// `p99 [lo, hi]`
fn pct(s: &Stats, p: f64) -> String {
    s.percentiles
        .iter()
        .find(|x| x.0 == p)
        .map_or("-".into(), |(_, v, [lo, hi])| {
            format!("{} [{}, {}]", ms(*v), ms(*lo), ms(*hi))
        })
}

/// The terminal summary: one column per run (e.g. two endpoints side by side).
pub fn table(runs: &[(&str, &RunResult)], price: Option<&Price>) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&RunResult) -> String| {
        rows.push((name.to_string(), runs.iter().map(|(_, r)| f(r)).collect()));
    };
    row("endpoint", &|r| r.url.clone());
    row("model", &|r| r.model.clone());
    row("offered load", &|r| match r.max_concurrency {
        Some(c) => format!("closed loop, {c} concurrent"),
        None => format!("open loop, {:.2} req/s", r.request_rate),
    });
    row("completed / failed / resent", &|r| {
        let s = &r.summary;
        format!("{} / {} / {}", s.completed, s.failed, s.retried)
    });
    row("duration (s)", &|r| format!("{:.2}", r.summary.duration));
    row("input / output tokens", &|r| {
        format!(
            "{} / {}",
            r.summary.total_input_tokens, r.summary.total_output_tokens
        )
    });
    row("requests/s", &|r| {
        format!("{:.2}", r.summary.request_throughput)
    });
    row("output tokens/s", &|r| {
        format!("{:.1}", r.summary.output_throughput)
    });
    row("total tokens/s", &|r| {
        format!("{:.1}", r.summary.total_token_throughput)
    });
    for (label, get) in [
        (
            "TTFT ms",
            (|s: &Summary| s.ttft.clone()) as fn(&Summary) -> Stats,
        ),
        ("TPOT ms", |s: &Summary| s.tpot.clone()),
        ("ITL ms", |s: &Summary| s.itl.clone()),
        ("E2E ms", |s: &Summary| s.e2el.clone()),
    ] {
        row(&format!("{label} mean"), &|r| ms(get(&r.summary).mean));
        for p in [50.0, 90.0, 99.0] {
            row(&format!("{label} p{p} [95% CI]"), &|r| {
                pct(&get(&r.summary), p)
            });
        }
    }
    if runs
        .iter()
        .any(|(_, r)| r.records.iter().any(|x| x.turn > 0))
    {
        row("TTFT ms mean by turn", &|r| {
            crate::metrics::mean_ttft_ms_by_turn(&r.records)
                .into_iter()
                .map(ms)
                .collect::<Vec<_>>()
                .join(" / ")
        });
    }
    let mut names: Vec<&str> = Vec::new();
    for (_, r) in runs {
        for t in &r.tenants {
            if !names.contains(&t.name.as_str()) {
                names.push(&t.name);
            }
        }
    }
    for name in names {
        let of = |r: &RunResult| {
            r.tenants
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.summary.clone())
        };
        row(&format!("tenant {name}: completed / failed"), &|r| {
            of(r).map_or("-".into(), |s| format!("{} / {}", s.completed, s.failed))
        });
        row(&format!("tenant {name}: output tokens/s"), &|r| {
            of(r).map_or("-".into(), |s| format!("{:.1}", s.output_throughput))
        });
        for (label, get) in [
            (
                "TTFT",
                (|s: &Summary| s.ttft.clone()) as fn(&Summary) -> Stats,
            ),
            ("ITL", |s: &Summary| s.itl.clone()),
            ("TPOT", |s: &Summary| s.tpot.clone()),
        ] {
            row(&format!("tenant {name}: {label} p50 / p99 ms"), &|r| {
                of(r).map_or("-".into(), |s| {
                    let st = get(&s);
                    let p = |q| ms(st.p(q).unwrap_or(f64::NAN));
                    format!("{} / {}", p(50.0), p(99.0))
                })
            });
        }
        row(&format!("tenant {name}: SLO met"), &|r| {
            of(r)
                .and_then(|s| s.slo_met)
                .map_or("-".into(), |m| if m { "yes" } else { "no" }.into())
        });
    }
    row("client lag p99 ms", &|r| {
        ms(r.summary.client_lag.p(99.0).unwrap_or(f64::NAN))
    });
    if runs.iter().any(|(_, r)| r.summary.slo_met.is_some()) {
        row("SLO met", &|r| {
            r.summary
                .slo_met
                .map_or("-".into(), |m| if m { "yes" } else { "no" }.into())
        });
        row("goodput req/s", &|r| {
            r.summary
                .request_goodput
                .map_or("-".into(), |g| format!("{g:.2}"))
        });
        row("goodput output tokens/s", &|r| {
            r.summary
                .token_goodput
                .map_or("-".into(), |g| format!("{g:.1}"))
        });
    }
    if let Some(p) = price {
        row("$ per 1M output tokens", &|r| {
            p.cost(&r.summary)
                .map_or("-".into(), |c| format!("{:.4}", c.usd_per_1m_output_tokens))
        });
        row("$ per 1M at goodput", &|r| {
            p.cost(&r.summary)
                .and_then(|c| c.usd_per_1m_output_tokens_at_goodput)
                .map_or("-".into(), |c| format!("{c:.4}"))
        });
    }
    row("energy J/output token", &|r| {
        r.energy
            .as_ref()
            .and_then(|e| e.joules_per_output_token)
            .map_or("not measurable here".into(), |j| format!("{j:.3}"))
    });
    if runs.iter().any(|(_, r)| r.gpu_energy.is_some()) {
        row("GPU energy J/output token", &|r| {
            r.gpu_energy
                .as_ref()
                .and_then(|e| e.joules_per_output_token)
                .map_or("-".into(), |j| format!("{j:.3}"))
        });
    }
    let label_w = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let col_w: Vec<usize> = (0..runs.len())
        .map(|i| {
            rows.iter()
                .map(|(_, v)| v[i].len())
                .max()
                .unwrap_or(0)
                .max(runs[i].0.len())
        })
        .collect();
    let mut out = format!("{:label_w$}", "");
    for (i, (name, _)) in runs.iter().enumerate() {
        out.push_str(&format!("  {:>w$}", name, w = col_w[i]));
    }
    out.push('\n');
    for (name, values) in rows {
        out.push_str(&format!("{name:label_w$}"));
        for (i, v) in values.iter().enumerate() {
            out.push_str(&format!("  {:>w$}", v, w = col_w[i]));
        }
        out.push('\n');
    }
    out
}

/// Ratios of the second run to the first for the numbers a comparison is about.
pub fn ratios(a: &RunResult, b: &RunResult) -> String {
    let r = |x: f64, y: f64| {
        if x > 0.0 {
            format!("{:.2}x", y / x)
        } else {
            "-".into()
        }
    };
    let (sa, sb) = (&a.summary, &b.summary);
    let p = |s: &Stats, q| s.p(q).unwrap_or(f64::NAN);
    format!(
        "{} vs {}: output tokens/s {}, TTFT p50 {}, TTFT p99 {}, ITL p50 {}, ITL p99 {}, E2E p99 {}\n",
        b.url,
        a.url,
        r(sa.output_throughput, sb.output_throughput),
        r(p(&sa.ttft, 50.0), p(&sb.ttft, 50.0)),
        r(p(&sa.ttft, 99.0), p(&sb.ttft, 99.0)),
        r(p(&sa.itl, 50.0), p(&sb.itl, 50.0)),
        r(p(&sa.itl, 99.0), p(&sb.itl, 99.0)),
        r(p(&sa.e2el, 99.0), p(&sb.e2el, 99.0)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::RequestRecord;

    #[test]
    fn cost_per_million_from_an_hourly_price_and_from_token_prices() {
        let s = Summary {
            output_throughput: 100.0,
            token_goodput: Some(50.0),
            total_input_tokens: 2_000,
            total_output_tokens: 1_000,
            ..Default::default()
        };
        // $3.6/h at 100 tokens/s: $0.001 per second for 100 tokens, $10 per 1M.
        let c = Price {
            per_hour: Some(3.6),
            ..Default::default()
        }
        .cost(&s)
        .unwrap();
        assert!((c.usd_per_1m_output_tokens - 10.0).abs() < 1e-9);
        assert!((c.usd_per_1m_output_tokens_at_goodput.unwrap() - 20.0).abs() < 1e-9);
        // $1/1M in, $2/1M out, two input tokens per output token: $4 per 1M output tokens.
        let c = Price {
            per_1m_input: Some(1.0),
            per_1m_output: Some(2.0),
            ..Default::default()
        }
        .cost(&s)
        .unwrap();
        assert!((c.usd_per_1m_output_tokens - 4.0).abs() < 1e-9);
        assert_eq!(Price::default().cost(&s), None);
    }

    /// A run's JSON lists each request's lengths and latencies up to the limit; past it the
    /// arrays are left out, saying so, and the summary still counts every request.
    #[test]
    fn per_request_arrays_stop_at_the_limit() {
        let record = RequestRecord {
            intended: 0.0,
            sent: 0.0,
            end: 0.5,
            chunks: vec![0.1, 0.2, 0.3],
            prompt_tokens: 8,
            output_tokens: 3,
            ..Default::default()
        };
        let run = |n: usize| RunResult {
            url: "http://x/v1".into(),
            model: "m".into(),
            workload: "w".into(),
            request_rate: 1.0,
            max_concurrency: None,
            burstiness: None,
            exact_prompt_lengths: true,
            summary: Summary::default(),
            tenants: Vec::new(),
            energy: None,
            gpu_energy: None,
            records: vec![record.clone(); n],
        };
        let small = to_json(&run(3), None);
        assert_eq!(small["itls"].as_array().map(Vec::len), Some(3));
        assert_eq!(small["input_lens"][2], 8);
        assert!(small.get("per_request_omitted").is_none());
        let big = to_json(&run(MAX_DETAILED_REQUESTS + 1), None);
        for k in ["input_lens", "output_lens", "ttfts", "itls"] {
            assert!(big.get(k).is_none(), "{k}");
        }
        assert!(big["per_request_omitted"]
            .as_str()
            .unwrap()
            .contains("20001"));
    }
}
