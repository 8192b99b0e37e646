//! The audit record and its hash chain.
//!
//! Each record's hash covers the previous record's hash, its sequence number and its exact JSON
//! text, and the chain's tip is kept beside it (`audit_head`). Changing, deleting, reordering or
//! truncating records therefore breaks verification; prompt and completion content lives in a
//! separate table so it can be erased without touching the chain.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How much of a tenant's prompts and completions the audit log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    /// Nothing but counts.
    #[default]
    None,
    /// The sha256 of each, to prove later what was sent without keeping it.
    Hash,
    /// The text itself.
    Full,
}

impl Retention {
    pub fn as_str(self) -> &'static str {
        match self {
            Retention::None => "none",
            Retention::Hash => "hash",
            Retention::Full => "full",
        }
    }
    pub fn parse(s: &str) -> Option<Retention> {
        match s {
            "none" => Some(Retention::None),
            "hash" => Some(Retention::Hash),
            "full" => Some(Retention::Full),
            _ => None,
        }
    }
}

/// One request, whatever its outcome. Field order is the JSON order, and the JSON text is what
/// the chain hashes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1; set when the record is appended.
    pub seq: u64,
    /// Unix milliseconds when the record was appended.
    pub time_ms: i64,
    pub request_id: String,
    pub method: String,
    pub endpoint: String,
    pub tenant: Option<String>,
    /// The key's shown prefix, never the secret.
    pub key: Option<String>,
    pub model: Option<String>,
    pub backend: Option<String>,
    pub region: Option<String>,
    pub config_version: Option<u64>,
    pub route: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nusd: i64,
    pub ttft_ms: Option<f64>,
    pub latency_ms: f64,
    /// HTTP status; 499 when the client went away first.
    pub status: u16,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    /// Safety-filter verdicts.
    pub filters: Vec<serde_json::Value>,
    pub tool_calls: Vec<String>,
    /// sha256 (hex) of each tool call's arguments, aligned with `tool_calls` (the arguments
    /// themselves are content, kept only per the tenant's retention). Absent from records
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_args_sha256: Vec<String>,
    /// An admin change (`changes.rs`: its id, actor, action, kind, target, before and after);
    /// absent from request records and from records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<serde_json::Value>,
}

/// Longest text of a string field of a record, in bytes as its JSON writes them (an escaped
/// control character counts six): a client's 60,000-byte path or 4 MB model name must not
/// become a chained, fsynced record kept forever. Longer text is cut at a character boundary
/// and its length noted (`"/v1/xxxx… (60000 bytes)"`).
pub const MAX_FIELD_BYTES: usize = 256;
/// Most tool names a record lists; one more entry notes how many were left out.
pub const MAX_TOOL_CALLS: usize = 32;
/// Most filter verdicts a record holds; one more entry notes how many were left out.
pub const MAX_VERDICTS: usize = 32;
/// Longest filter verdict, as JSON text; a longer one is kept as its cut text.
pub const MAX_VERDICT_BYTES: usize = 512;

impl AuditRecord {
    /// Bounds every string field but the request id (the server admits only short ones) to
    /// [`MAX_FIELD_BYTES`], and the tool names and verdicts to their counts, noting what was
    /// cut. `more_tools` and `more_verdicts` are those already left out before the record was
    /// built (see `ticket.rs`).
    pub fn bound(&mut self, more_tools: usize, more_verdicts: usize) {
        for field in [&mut self.method, &mut self.endpoint] {
            bound_text(field, MAX_FIELD_BYTES);
        }
        let optional = [
            &mut self.tenant,
            &mut self.key,
            &mut self.model,
            &mut self.backend,
            &mut self.region,
            &mut self.route,
            &mut self.finish_reason,
            &mut self.error,
        ];
        for text in optional.into_iter().flatten() {
            bound_text(text, MAX_FIELD_BYTES);
        }
        cut_list(&mut self.tool_args_sha256, MAX_TOOL_CALLS);
        let more_tools = more_tools + cut_list(&mut self.tool_calls, MAX_TOOL_CALLS);
        for name in &mut self.tool_calls {
            bound_text(name, MAX_FIELD_BYTES);
        }
        if more_tools > 0 {
            self.tool_calls.push(format!("… ({more_tools} more)"));
        }
        let more_verdicts = more_verdicts + cut_list(&mut self.filters, MAX_VERDICTS);
        for verdict in &mut self.filters {
            bound_verdict(verdict);
        }
        if more_verdicts > 0 {
            self.filters
                .push(serde_json::json!({ "dropped": more_verdicts }));
        }
    }
}

/// Keeps the first `max` items; returns how many were dropped.
fn cut_list<T>(list: &mut Vec<T>, max: usize) -> usize {
    let dropped = list.len().saturating_sub(max);
    list.truncate(max);
    dropped
}

/// Bytes `c` takes in JSON text, as serde_json escapes it.
fn json_width(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Cuts `text` to its longest prefix whose JSON is at most `max` bytes, noting its length,
/// unless it fits already. Reads at most `max` characters of it.
pub fn bound_text(text: &mut String, max: usize) {
    let mut width = 0;
    let cut = text.char_indices().find_map(|(i, c)| {
        width += json_width(c);
        (width > max).then_some(i)
    });
    if let Some(i) = cut {
        let len = text.len();
        text.truncate(i);
        text.push_str(&format!("… ({len} bytes)"));
    }
}

/// A verdict whose JSON passes [`MAX_VERDICT_BYTES`] becomes `{"truncated": its cut text}`.
fn bound_verdict(verdict: &mut serde_json::Value) {
    let mut text = verdict.to_string();
    if text.len() > MAX_VERDICT_BYTES {
        bound_text(&mut text, MAX_FIELD_BYTES);
        *verdict = serde_json::json!({ "truncated": text });
    }
}

pub fn chain_hash(prev_hash: &str, seq: u64, record: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(record.as_bytes());
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// One stored row of the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainRow {
    pub seq: i64,
    pub record: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The first place the chain does not hold.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("audit record {seq}: {reason}")]
pub struct ChainError {
    pub seq: i64,
    pub reason: String,
}

/// What `serrano audit verify` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub ok: bool,
    pub first_bad_seq: Option<i64>,
    pub reason: Option<String>,
    pub head_hash: String,
    /// Signed checkpoints that verified.
    pub checkpoints: u64,
}

/// Checks a chain one row at a time, in stored order, keeping only the last hash and the next
/// sequence number: a log of any length verifies in constant memory, read in pages.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    prev: String,
    expected: i64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            prev: GENESIS.to_string(),
            expected: 1,
        }
    }
}

impl ChainVerifier {
    pub fn new() -> ChainVerifier {
        ChainVerifier::default()
    }

    /// Checks the next row against the one before it.
    pub fn push(&mut self, row: ChainRow) -> Result<(), ChainError> {
        let bad = |reason: String| ChainError {
            seq: row.seq,
            reason,
        };
        let expected = self.expected;
        if row.seq != expected {
            return Err(bad(format!(
                "expected sequence number {expected} (a record is missing or out of order)"
            )));
        }
        if row.prev_hash != self.prev {
            return Err(bad("does not link to the record before it".into()));
        }
        if chain_hash(&row.prev_hash, row.seq as u64, &row.record) != row.hash {
            return Err(bad("content does not match its hash".into()));
        }
        match serde_json::from_str::<AuditRecord>(&row.record) {
            Ok(r) if r.seq == row.seq as u64 => {}
            _ => return Err(bad("record is not a valid audit record".into())),
        }
        self.prev = row.hash;
        self.expected += 1;
        Ok(())
    }

    /// Records that verified so far.
    pub fn records(&self) -> u64 {
        (self.expected - 1) as u64
    }

    /// Compares the end of the rows pushed with the recorded tip `head` (`(seq, hash)`, or
    /// `None` for an empty log). Returns the number of records.
    pub fn finish(self, head: Option<(i64, String)>) -> Result<u64, ChainError> {
        let last = self.expected - 1;
        match head {
            None if last == 0 => Ok(0),
            None => Err(ChainError {
                seq: last,
                reason: "records exist but the chain head is missing".into(),
            }),
            Some((seq, hash)) if seq == last && hash == self.prev => Ok(last as u64),
            Some((seq, _)) => Err(ChainError {
                seq: last + 1,
                reason: format!(
                    "the chain head says {seq} records but {last} verify (records were truncated or the head edited)"
                ),
            }),
        }
    }
}

/// Checks rows (in stored order) against each other and against the recorded tip `head`
/// (`(seq, hash)`, or `None` for an empty log). Returns the number of records.
pub fn verify_chain(
    rows: impl IntoIterator<Item = ChainRow>,
    head: Option<(i64, String)>,
) -> Result<u64, ChainError> {
    let mut v = ChainVerifier::new();
    for row in rows {
        v.push(row)?;
    }
    v.finish(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chain(n: usize) -> (Vec<ChainRow>, Option<(i64, String)>) {
        let mut prev = GENESIS.to_string();
        let mut rows = vec![];
        for i in 1..=n {
            let rec = AuditRecord {
                seq: i as u64,
                request_id: format!("req-{i}"),
                status: 200,
                prompt_tokens: i as u64 * 7,
                ..Default::default()
            };
            let text = serde_json::to_string(&rec).unwrap();
            let hash = chain_hash(&prev, i as u64, &text);
            rows.push(ChainRow {
                seq: i as i64,
                record: text,
                prev_hash: prev.clone(),
                hash: hash.clone(),
            });
            prev = hash;
        }
        let head = (n > 0).then_some((n as i64, prev));
        (rows, head)
    }

    #[test]
    fn intact_chain_verifies() {
        let (rows, head) = chain(5);
        assert_eq!(verify_chain(rows, head), Ok(5));
        assert_eq!(verify_chain(vec![], None), Ok(0));
    }

    #[derive(Debug, Clone)]
    enum Tamper {
        Byte {
            row: usize,
            field: u8,
            at: usize,
            xor: u8,
        },
        Delete(usize),
        Swap(usize, usize),
        Truncate(usize),
    }

    fn tamper() -> impl Strategy<Value = Tamper> {
        prop_oneof![
            (0..64usize, 0..3u8, 0..4096usize, 1..=255u8).prop_map(|(row, field, at, xor)| {
                Tamper::Byte {
                    row,
                    field,
                    at,
                    xor,
                }
            }),
            (0..64usize).prop_map(Tamper::Delete),
            (0..64usize, 0..64usize).prop_map(|(a, b)| Tamper::Swap(a, b)),
            (1..64usize).prop_map(Tamper::Truncate),
        ]
    }

    proptest! {
        /// Any single-byte change, deletion, reordering or truncation fails verification.
        #[test]
        fn any_tampering_is_detected(n in 1..12usize, t in tamper()) {
            let (mut rows, head) = chain(n);
            match t {
                Tamper::Byte { row, field, at, xor } => {
                    let r = &mut rows[row % n];
                    let s = match field {
                        0 => &mut r.record,
                        1 => &mut r.prev_hash,
                        _ => &mut r.hash,
                    };
                    let mut bytes = std::mem::take(s).into_bytes();
                    let i = at % bytes.len();
                    bytes[i] ^= xor;
                    // Invalid UTF-8 could not be stored as TEXT; keep such a byte lossy, which
                    // still changes it.
                    *s = String::from_utf8_lossy(&bytes).into_owned();
                }
                Tamper::Delete(i) => { rows.remove(i % n); }
                Tamper::Swap(a, b) => {
                    let (a, b) = (a % n, b % n);
                    prop_assume!(a != b);
                    rows.swap(a, b);
                }
                Tamper::Truncate(k) => { rows.truncate(n - 1 - (k % n).min(n - 1)); prop_assume!(rows.len() < n); }
            }
            prop_assert!(verify_chain(rows, head).is_err());
        }
    }
}
