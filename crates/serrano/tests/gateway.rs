//! `serrano gateway` in front of a real serrano node: governance applies at the gateway, usage
//! comes from the upstream, streams pass through, and a dead upstream is a 502 with its record.

mod common;

use common::{Server, ADMIN_KEY};
use serde_json::{json, Value};

fn node_and_gateway(gateway_args: &[&str]) -> (Server, Server) {
    let node = Server::tiny(&["--served-model-name", "tiny"]);
    let mut args = vec!["--upstream-name", "node", "--upstream-key-env", "NODE_KEY"];
    args.extend_from_slice(gateway_args);
    std::env::set_var("NODE_KEY", ADMIN_KEY);
    let gw = Server::gateway(&format!("{}/v1", node.base), &args);
    (node, gw)
}

fn last_inference_record(s: &Server) -> Value {
    let (_, v) = s.get("/admin/v1/audit?limit=1000");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|r| r["endpoint"] == "/v1/chat/completions" || r["endpoint"] == "/v1/completions")
        .cloned()
        .unwrap()
}

#[test]
fn gateway_forwards_with_governance() {
    let (node, gw) = node_and_gateway(&[]);
    gw.tenant("acme");
    let key = gw.key("acme", json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();
    gw.post(
        "/admin/v1/budgets",
        &json!({"tenant": "acme", "unit": "tokens", "period": "day", "limit": 100000}),
    );
    // The upstream's models are the gateway's.
    let (_, models) = gw.get("/v1/models");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["owned_by"], "node");

    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0});
    let (st, v, h) = gw.post_as(&key, "/v1/chat/completions", body.to_string().as_bytes());
    assert_eq!(st, 200, "{v}");
    assert!(h.contains_key("x-request-id"));
    assert_eq!(h["x-serrano-backend"].as_str(), "node");
    assert_eq!(
        h["x-serrano-route"].as_str(),
        "priority: node (first of 1 eligible)"
    );
    let direct = node.post("/v1/chat/completions", &body).1;
    assert_eq!(v["choices"][0]["message"], direct["choices"][0]["message"]);
    let rec = last_inference_record(&gw);
    assert_eq!(
        (
            rec["backend"].as_str(),
            rec["tenant"].as_str(),
            rec["status"].as_u64()
        ),
        (Some("node"), Some("acme"), Some(200))
    );
    assert_eq!(rec["completion_tokens"], v["usage"]["completion_tokens"]);
    assert_eq!(rec["prompt_tokens"], v["usage"]["prompt_tokens"]);
    let (_, ledger) = gw.get("/admin/v1/ledger");
    assert_eq!(ledger["open_requests"], 0);
    assert_eq!(ledger["spent_total"], v["usage"]["total_tokens"]);

    // A stream passes through; the usage chunk only when asked for.
    for include_usage in [false, true] {
        let mut b = json!({"model": "tiny", "prompt": "once upon", "max_tokens": 6, "stream": true, "ignore_eos": true});
        if include_usage {
            b["stream_options"] = json!({"include_usage": true});
        }
        let r = ureq::post(&gw.url("/v1/completions"))
            .set("Authorization", &format!("Bearer {key}"))
            .send_json(b)
            .unwrap();
        let text = r.into_string().unwrap();
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        let usage_chunks = data.iter().filter(|d| d.contains("\"usage\":{")).count();
        assert_eq!(usage_chunks, include_usage as usize, "{text}");
        let rec = last_inference_record(&gw);
        assert_eq!(
            (rec["status"].as_u64(), rec["completion_tokens"].as_u64()),
            (Some(200), Some(6))
        );
    }

    // Without max_tokens the gateway sets its default, so the reservation bounds the output.
    let (st, v, _) = gw.post_as(
        &key,
        "/v1/completions",
        br#"{"model": "tiny", "prompt": "hi"}"#,
    );
    assert_eq!(st, 200, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 4096);

    // Values that would escape the reservation are refused before anything is forwarded.
    for bad in [
        json!({"model": "tiny", "prompt": "hi", "max_tokens": u64::MAX}),
        json!({"model": "tiny", "prompt": "hi", "max_tokens": 4, "n": "4"}),
        json!({"model": "tiny", "prompt": "hi", "max_tokens": 4, "n": 17}),
    ] {
        let (st, v, _) = gw.post_as(&key, "/v1/completions", bad.to_string().as_bytes());
        assert_eq!(st, 400, "{bad}: {v}");
    }
    let (_, ledger) = gw.get("/admin/v1/ledger");
    assert_eq!(ledger["reserved_total"], 0);

    // The upstream gone: 502, audited, nothing left reserved or charged.
    let spent = gw.get("/admin/v1/ledger").1["spent_total"].clone();
    drop(node);
    let (st, v, _) = gw.post_as(&key, "/v1/chat/completions", body.to_string().as_bytes());
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (502, Some("upstream_error")),
        "{v}"
    );
    assert_eq!(last_inference_record(&gw)["status"], 502);
    assert_eq!(gw.get("/admin/v1/ledger").1["open_requests"], 0);
    assert_eq!(gw.get("/admin/v1/ledger").1["spent_total"], spent);
    // `/tokenize` goes to the backend (gone: 502); `/detokenize` needs a local model.
    let (st, _) = gw.post("/tokenize", &json!({"prompt": "hi"}));
    assert_eq!(st, 502);
    let (st, _) = gw.post("/detokenize", &json!({"tokens": [1, 2]}));
    assert_eq!(st, 404);
}

/// A gateway has no tokenizer of its own: `/tokenize` goes to the node the router would send
/// the request to, with its model id, so a load generator gets exact prompts through the front
/// door; a model nobody serves is a 404 at the gateway.
#[test]
fn a_gateway_forwards_tokenize_to_its_backend() {
    let (node, gw) = node_and_gateway(&[]);
    for body in [
        json!({"model": "tiny", "prompt": "the quick brown fox"}),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    ] {
        let (st, direct) = node.post("/tokenize", &body);
        assert_eq!(st, 200, "{direct}");
        let (st, through) = gw.post("/tokenize", &body);
        assert_eq!((st, &through), (200, &direct));
        assert!(direct["count"].as_u64().unwrap() > 0, "{direct}");
    }
    let (st, v) = gw.post("/tokenize", &json!({"model": "nope", "prompt": "x"}));
    assert_eq!(st, 404, "{v}");
    // Counted as a request of the key, and audited at the gateway.
    let (_, audit) = gw.get("/admin/v1/audit?limit=1000");
    let tokenized = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["endpoint"] == "/tokenize")
        .count();
    assert!(tokenized >= 2, "{audit}");
}
