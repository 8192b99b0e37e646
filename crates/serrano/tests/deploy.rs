//! The operations files in `deploy/`: the Prometheus alert rules pass `promtool` (Debian's
//! `prometheus` package; `.ci/run` installs it) with their unit tests, and every metric the
//! rules and the Grafana dashboard name is one a real server's `/metrics` serves.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::Server;
use serde_json::{json, Value};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .expect("promtool (Debian's `prometheus` package; .ci/run installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
}

/// Metric names (`serrano` and then `_` or `:`) in a PromQL expression or rules text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut rest = text;
    while let Some(at) = rest.find("serrano") {
        let preceded = rest[..at].chars().last().is_some_and(ident);
        let tail = &rest[at..];
        let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
        let name = &tail[..end];
        if !preceded && name.len() > "serrano".len() {
            names.insert(name.to_string());
        }
        rest = &tail[end.max(1)..];
    }
    names
}

/// Every sample name a scrape can carry: those present, and those its `# TYPE` lines declare
/// (a family with no series yet still has its name).
fn served_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_count", "_sum"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[test]
fn the_rules_and_the_dashboard_name_only_metrics_the_server_serves() {
    let rules = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    let recorded: BTreeSet<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_string)
        .collect();
    let mut wanted: BTreeSet<String> = metric_names(&rules)
        .difference(&recorded)
        .cloned()
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/serrano.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            wanted.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    assert!(wanted.len() >= 15, "{wanted:?}");

    // A server with a budget (the budget gauge has a series per budget) after one request.
    let s = Server::tiny(&[]);
    s.tenant("acme");
    let budget = json!({"tenant": "acme", "unit": "tokens", "period": "day", "limit": 100});
    assert_eq!(s.post("/admin/v1/budgets", &budget).0, 200);
    let body = json!({"prompt": "hi", "max_tokens": 4});
    assert_eq!(s.post("/v1/completions", &body).0, 200);
    let scrape = s.metrics_text();
    let served = served_names(&scrape);
    let missing: Vec<_> = wanted.difference(&served).collect();
    assert!(missing.is_empty(), "not on /metrics: {missing:?}");
    assert!(
        scrape.contains("serrano_budget_used_ratio{tenant=\"acme\",key_id=\"0\",unit=\"tokens\",period=\"day\"} "),
        "{scrape}"
    );
    assert!(
        scrape.contains("serrano_gov_write_queue_capacity 4096"),
        "{scrape}"
    );
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        "sum(rate(serrano:generation_tokens_total{x=\"serrano\"}[5m])) / serrano_gov_write_queue",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["serrano:generation_tokens_total", "serrano_gov_write_queue"]
    );
}
