//! A self-contained HTML report: one file, no scripts, no network. Charts are inline SVG drawn
//! here (latency CDFs per endpoint; throughput and TTFT against offered load for a sweep), so
//! the file opens the same anywhere and can be archived beside BENCHMARKS.md.

use std::fmt::Write;

use crate::metrics::RequestRecord;
use crate::report::{self, Price};
use crate::run::RunResult;
use crate::sweep::Sweep;

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
const W: f64 = 560.0;
const H: f64 = 300.0;
const PAD_L: f64 = 64.0;
const PAD_B: f64 = 44.0;
const PAD_T: f64 = 28.0;
const PAD_R: f64 = 16.0;
/// Most points drawn per CDF line (the rest are summarized by the percentiles in the table).
const MAX_CDF_POINTS: usize = 400;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round step for about five ticks over `[0, max]`.
fn tick_step(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 1.0 && v.fract() == 0.0) {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A line chart with one series per endpoint.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let x_max = pts.clone().map(|p| p.0).fold(0.0, f64::max);
    let y_max = pts.map(|p| p.1).fold(0.0, f64::max);
    let (xs, ys) = (tick_step(x_max), tick_step(y_max));
    let x_top = (x_max / xs).ceil().max(1.0) * xs;
    let y_top = (y_max / ys).ceil().max(1.0) * ys;
    let px = |x: f64| PAD_L + x / x_top * (W - PAD_L - PAD_R);
    let py = |y: f64| H - PAD_B - y / y_top * (H - PAD_B - PAD_T);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{t}"><title>{t}</title><rect width="100%" height="100%" fill="#fff"/><text x="{cx}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{t}</text>"##,
        t = esc(title),
        cx = W / 2.0
    );
    let mut v = 0.0;
    while v <= x_top + 1e-9 {
        let _ = write!(
            s,
            r##"<line x1="{x}" y1="{y0}" x2="{x}" y2="{y1}" stroke="#eee"/><text x="{x}" y="{ty}" text-anchor="middle" font-size="11">{l}</text>"##,
            x = px(v),
            y0 = py(0.0),
            y1 = py(y_top),
            ty = H - PAD_B + 16.0,
            l = fmt_tick(v)
        );
        v += xs;
    }
    let mut v = 0.0;
    while v <= y_top + 1e-9 {
        let _ = write!(
            s,
            r##"<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#eee"/><text x="{tx}" y="{ty}" text-anchor="end" font-size="11">{l}</text>"##,
            x0 = px(0.0),
            x1 = px(x_top),
            y = py(v),
            tx = PAD_L - 6.0,
            ty = py(v) + 4.0,
            l = fmt_tick(v)
        );
        v += ys;
    }
    let _ = write!(
        s,
        r##"<line x1="{x0}" y1="{yb}" x2="{x1}" y2="{yb}" stroke="#333"/><line x1="{x0}" y1="{yb}" x2="{x0}" y2="{yt}" stroke="#333"/><text x="{cx}" y="{lx}" text-anchor="middle" font-size="12">{xl}</text><text x="14" y="{cy}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {cy})">{yl}</text>"##,
        x0 = px(0.0),
        x1 = px(x_top),
        yb = py(0.0),
        yt = py(y_top),
        cx = (PAD_L + W - PAD_R) / 2.0,
        lx = H - 8.0,
        cy = (PAD_T + H - PAD_B) / 2.0,
        xl = esc(x_label),
        yl = esc(y_label)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if !path.is_empty() {
            let _ = write!(
                s,
                r##"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"##,
                path.join(" ")
            );
        }
        for p in points.iter().filter(|_| points.len() <= 40) {
            let _ = write!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"##,
                px(p.0),
                py(p.1)
            );
        }
        let _ = write!(
            s,
            r##"<rect x="{x}" y="{y}" width="12" height="3" fill="{color}"/><text x="{tx}" y="{ty}" font-size="11">{n}</text>"##,
            x = PAD_L + 10.0,
            y = PAD_T + 8.0 + 16.0 * i as f64,
            tx = PAD_L + 28.0,
            ty = PAD_T + 12.0 + 16.0 * i as f64,
            n = esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// The empirical CDF of samples in seconds, as (ms, fraction) points.
pub fn cdf(samples_s: impl Iterator<Item = f64>) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = samples_s
        .filter(|x| x.is_finite())
        .map(|x| x * 1e3)
        .collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let step = n.div_ceil(MAX_CDF_POINTS).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], (i + 1) as f64 / n as f64))
        .collect();
    if let Some(&last) = v.last() {
        if out.last() != Some(&(last, 1.0)) {
            out.push((last, 1.0));
        }
    }
    out
}

fn cdf_chart(
    title: &str,
    runs: &[(&str, &RunResult)],
    f: fn(&RequestRecord) -> Vec<f64>,
) -> String {
    let series: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|(name, r)| {
            let samples = r.records.iter().filter(|x| x.ok()).flat_map(f);
            (format!("{name}: {}", r.url), cdf(samples))
        })
        .collect();
    line_chart(title, "milliseconds", "fraction of samples", &series)
}

/// The whole report: summary table, latency CDFs, for sweeps the load curves, then `extra`
/// (HTML of the caller's own sections, e.g. a simulation's timeline).
pub fn report(
    title: &str,
    runs: &[(&str, &RunResult)],
    sweeps: &[(&str, &Sweep)],
    price: Option<&Price>,
    extra: &str,
) -> String {
    let mut body = String::new();
    let _ = write!(body, "<h1>{}</h1>", esc(title));
    let _ = write!(
        body,
        "<h2>Summary</h2><pre>{}</pre>",
        esc(&report::table(runs, price))
    );
    if runs.len() == 2 {
        let _ = write!(
            body,
            "<p>{}</p>",
            esc(&report::ratios(runs[0].1, runs[1].1))
        );
    }
    body.push_str("<h2>Latency distributions</h2><div class=\"charts\">");
    body.push_str(&cdf_chart("TTFT CDF", runs, |r| {
        r.ttft().into_iter().collect()
    }));
    body.push_str(&cdf_chart("Inter-token latency CDF", runs, |r| {
        r.itls().collect()
    }));
    body.push_str(&cdf_chart(
        "End-to-end latency CDF",
        runs,
        |r| vec![r.e2e()],
    ));
    body.push_str("</div>");
    if !sweeps.is_empty() {
        let kind = sweeps[0].1.load_kind;
        let unit = if kind == "rate" {
            "offered requests/s"
        } else {
            "concurrent requests"
        };
        let series = |f: fn(&RunResult) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
            sweeps
                .iter()
                .map(|(name, s)| {
                    (
                        name.to_string(),
                        s.curve().iter().map(|(l, r)| (*l, f(r))).collect(),
                    )
                })
                .collect()
        };
        body.push_str("<h2>Against offered load</h2><div class=\"charts\">");
        body.push_str(&line_chart(
            "Output throughput",
            unit,
            "output tokens/s",
            &series(|r| r.summary.output_throughput),
        ));
        body.push_str(&line_chart(
            "TTFT p99",
            unit,
            "milliseconds",
            &series(|r| r.summary.ttft.p(99.0).unwrap_or(f64::NAN)),
        ));
        body.push_str(&line_chart(
            "TTFT p50",
            unit,
            "milliseconds",
            &series(|r| r.summary.ttft.p(50.0).unwrap_or(f64::NAN)),
        ));
        body.push_str("</div><table><tr><th>endpoint</th><th>load</th><th>req/s</th><th>output tok/s</th><th>TTFT p99 ms</th><th>TPOT p99 ms</th><th>goodput req/s</th><th>SLO met</th></tr>");
        for (name, s) in sweeps {
            for (load, r) in s.curve() {
                let m = &r.summary;
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{load:.2}</td><td>{:.2}</td><td>{:.1}</td><td>{:.0}</td><td>{:.1}</td><td>{:.2}</td><td>{}</td></tr>",
                    esc(name),
                    m.request_throughput,
                    m.output_throughput,
                    m.ttft.p(99.0).unwrap_or(f64::NAN),
                    m.tpot.p(99.0).unwrap_or(f64::NAN),
                    m.request_goodput.unwrap_or(0.0),
                    if m.slo_met == Some(true) { "yes" } else { "no" }
                );
            }
            let _ = write!(
                body,
                "<tr><td colspan=\"8\"><b>{}: highest {kind} meeting the SLO: {}</b></td></tr>",
                esc(name),
                s.best.map_or("none".to_string(), |b| format!("{b:.2}"))
            );
        }
        body.push_str("</table>");
    }
    body.push_str(extra);
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>body{{font-family:sans-serif;margin:24px;color:#222}}pre{{background:#f6f6f6;padding:12px;overflow-x:auto}}.charts{{display:flex;flex-wrap:wrap;gap:16px}}svg{{border:1px solid #ddd}}table{{border-collapse:collapse;margin-top:12px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head><body>{body}<p><small>serrano bench: TTFT and E2E count from each request's intended send time (no coordinated omission); definitions in serrano's README.</small></p></body></html>",
        esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(100.0), 20.0);
        assert_eq!(tick_step(7.0), 2.0);
        assert_eq!(tick_step(0.3), 0.1);
    }

    #[test]
    fn cdfs_end_at_one_and_are_thinned() {
        let c = cdf((0..10_000).map(|i| i as f64 / 1e3));
        assert!(c.len() <= MAX_CDF_POINTS + 1);
        assert_eq!(c.last(), Some(&(9_999.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn charts_escape_names() {
        let svg = line_chart(
            "a<b",
            "x",
            "y",
            &[("<script>".into(), vec![(0.0, 1.0), (1.0, 2.0)])],
        );
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;"));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
    }
}
