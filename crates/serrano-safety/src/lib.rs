//! Safety filters for serrano's governed OpenAI-compatible gateway.
//!
//! A tenant's [`Policy`] (JSON stored per tenant) says which checks run and whether a hit
//! blocks the request, is redacted, or is only logged:
//!
//! * PII in prompts and optionally in completions ([`scan_pii`], [`redact`], [`OutputScanner`]
//!   for streams, where PII split across chunks is still caught);
//! * prompt injection, by weighted heuristics ([`injection_score`]);
//! * blocked terms, whole-word and case-insensitive;
//! * a tool allowlist for requested tools and returned tool calls.
//!
//! Nothing here keeps matched text: [`Finding`]s hold offsets and [`Verdict`]s hold counts, so
//! audit records built from them never contain the PII they report.

mod error;
mod injection;
mod pii;
mod stream;
mod terms;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use error::SafetyError;
pub use injection::injection_score;
pub use pii::{redact, scan_pii};
pub use stream::OutputScanner;

/// What a check does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Refuse the request (or stop the stream).
    Block,
    /// Replace the offending text by a `[REDACTED:KIND]` placeholder and go on.
    Redact,
    /// Let it through unchanged; only the verdict records it.
    Log,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Redact => "redact",
            Action::Log => "log",
        }
    }
}

/// Kinds of personal or secret data the PII check detects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    Email,
    Phone,
    PaymentCard,
    Iban,
    UsSsn,
    IpAddress,
    /// API keys, tokens and private keys.
    Secret,
}

impl PiiKind {
    pub const ALL: [PiiKind; 7] = [
        PiiKind::Email,
        PiiKind::Phone,
        PiiKind::PaymentCard,
        PiiKind::Iban,
        PiiKind::UsSsn,
        PiiKind::IpAddress,
        PiiKind::Secret,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::PaymentCard => "payment_card",
            PiiKind::Iban => "iban",
            PiiKind::UsSsn => "us_ssn",
            PiiKind::IpAddress => "ip_address",
            PiiKind::Secret => "secret",
        }
    }

    /// The [`Finding::kind`] and verdict key: "pii.email", ...
    pub fn finding_kind(self) -> &'static str {
        match self {
            PiiKind::Email => "pii.email",
            PiiKind::Phone => "pii.phone",
            PiiKind::PaymentCard => "pii.payment_card",
            PiiKind::Iban => "pii.iban",
            PiiKind::UsSsn => "pii.us_ssn",
            PiiKind::IpAddress => "pii.ip_address",
            PiiKind::Secret => "pii.secret",
        }
    }
}

/// Most blocked terms per tenant, and longest term, so one policy cannot make every request
/// build or search a huge automaton.
pub const MAX_BLOCKED_TERMS: usize = 10_000;
pub const MAX_TERM_BYTES: usize = 256;

/// A tenant's filter policy; every field may be omitted, and unknown fields are rejected so a
/// misspelt setting is an error instead of a silently disabled check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// `None`: PII is not checked.
    pub pii: Option<Action>,
    /// `None`: all kinds.
    pub pii_kinds: Option<Vec<PiiKind>>,
    /// Also scan completions (streamed or not) with the `pii` action.
    pub pii_on_output: bool,
    /// Injection is judged on the whole prompt, so there is nothing to cut out: `Redact` is
    /// treated as `Block`.
    pub injection: Option<Action>,
    /// Score at or above which the injection check fires (0 to 1; default 0.5).
    pub injection_threshold: f32,
    /// Case-insensitive (ASCII letters), whole-word terms.
    pub blocked_terms: Vec<String>,
    /// Default `Block` when `blocked_terms` is non-empty.
    pub blocked_terms_action: Option<Action>,
    /// `None`: any tool; `Some(list)`: only these function names (an empty list allows none).
    pub allowed_tools: Option<Vec<String>>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            pii: None,
            pii_kinds: None,
            pii_on_output: false,
            injection: None,
            injection_threshold: 0.5,
            blocked_terms: Vec::new(),
            blocked_terms_action: None,
            allowed_tools: None,
        }
    }
}

impl Policy {
    /// Parses and validates a stored policy.
    pub fn from_json(json: &str) -> Result<Policy, SafetyError> {
        let p: Policy = serde_json::from_str(json)?;
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), SafetyError> {
        if !(0.0..=1.0).contains(&self.injection_threshold) {
            return Err(SafetyError::Threshold(self.injection_threshold));
        }
        if self.pii_kinds.as_ref().is_some_and(|k| k.is_empty()) {
            return Err(SafetyError::NoPiiKinds);
        }
        if self.pii_on_output && self.pii.is_none() {
            return Err(SafetyError::OutputWithoutPii);
        }
        if self.blocked_terms.len() > MAX_BLOCKED_TERMS {
            return Err(SafetyError::TooManyTerms {
                count: self.blocked_terms.len(),
                max: MAX_BLOCKED_TERMS,
            });
        }
        for (index, term) in self.blocked_terms.iter().enumerate() {
            let len = term.trim().len();
            if len == 0 {
                return Err(SafetyError::EmptyTerm(index));
            }
            if len > MAX_TERM_BYTES {
                return Err(SafetyError::TermTooLong {
                    index,
                    len,
                    max: MAX_TERM_BYTES,
                });
            }
        }
        if let Some(i) = self
            .allowed_tools
            .iter()
            .flatten()
            .position(|t| t.trim().is_empty())
        {
            return Err(SafetyError::EmptyToolName(i));
        }
        Ok(())
    }

    /// Whether no check is enabled (the gateway can skip filtering altogether).
    pub fn is_empty(&self) -> bool {
        self.pii.is_none()
            && self.injection.is_none()
            && self.blocked_terms.is_empty()
            && self.allowed_tools.is_none()
    }

    /// The PII kinds checked.
    pub fn effective_pii_kinds(&self) -> Vec<PiiKind> {
        let mut kinds = self
            .pii_kinds
            .clone()
            .unwrap_or_else(|| PiiKind::ALL.to_vec());
        kinds.sort_by_key(|k| *k as u8);
        kinds.dedup();
        kinds
    }
}

/// One detection. Offsets are byte offsets into the scanned text; the matched text itself is
/// deliberately absent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// "pii.email", ..., "pii.secret", "injection", "blocked_term" or "tool".
    pub kind: String,
    pub start: usize,
    pub end: usize,
}

/// What the audit record stores about one check that fired.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// "prompt", "output" or "tools".
    pub stage: &'static str,
    pub action: Action,
    /// Counts by kind: "pii.email", "blocked_term", "tool", and for injection one entry per
    /// heuristic that fired ("injection.ignore_previous").
    pub kinds: BTreeMap<String, u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// The result of [`Filter::check_prompt`].
#[derive(Debug, Clone, PartialEq)]
pub enum PromptOutcome {
    /// Nothing to change; `verdicts` holds what Log-mode checks found.
    Allow { verdicts: Vec<Verdict> },
    /// Forward `text` instead of the original.
    Redacted {
        text: String,
        verdicts: Vec<Verdict>,
    },
    /// Refuse the request; `reason` names the checks, never the matched text.
    Blocked {
        verdicts: Vec<Verdict>,
        reason: String,
    },
}

impl PromptOutcome {
    pub fn verdicts(&self) -> &[Verdict] {
        match self {
            PromptOutcome::Allow { verdicts }
            | PromptOutcome::Redacted { verdicts, .. }
            | PromptOutcome::Blocked { verdicts, .. } => verdicts,
        }
    }
}

/// A tenant's policy, prepared for checking (the blocked-term automaton is built once).
pub struct Filter {
    policy: Policy,
    kinds: Vec<PiiKind>,
    terms: Option<terms::Terms>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn counts<'a>(kinds: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u32> {
    let mut m = BTreeMap::new();
    for k in kinds {
        *m.entry(k.to_string()).or_insert(0) += 1;
    }
    m
}

impl Filter {
    pub fn new(policy: Policy) -> Result<Filter, SafetyError> {
        policy.validate()?;
        let terms = if policy.blocked_terms.is_empty() {
            None
        } else {
            Some(terms::Terms::new(&policy.blocked_terms)?)
        };
        Ok(Filter {
            kinds: policy.effective_pii_kinds(),
            policy,
            terms,
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Checks one prompt text (callers call it per message content, or on the joined text).
    /// Any check that blocks makes the outcome `Blocked`; otherwise Redact-mode hits make it
    /// `Redacted`. Every check that fired contributes a verdict.
    pub fn check_prompt(&self, text: &str) -> PromptOutcome {
        let mut verdicts = Vec::new();
        let mut reasons = Vec::new();
        let mut cut: Vec<Finding> = Vec::new();
        let mut apply = |verdict: Verdict, found: Vec<Finding>, reason: String| {
            match verdict.action {
                Action::Block => reasons.push(reason),
                Action::Redact => cut.extend(found),
                Action::Log => {}
            }
            verdicts.push(verdict);
        };

        if let Some(action) = self.policy.pii {
            let found = scan_pii(text, &self.kinds);
            if !found.is_empty() {
                let kinds = counts(found.iter().map(|f| f.kind.as_str()));
                let names: Vec<&str> = kinds
                    .keys()
                    .map(|k| k.strip_prefix("pii.").unwrap_or(k))
                    .collect();
                let reason = format!("the prompt contains PII ({})", names.join(", "));
                let verdict = Verdict {
                    stage: "prompt",
                    action,
                    kinds,
                    score: None,
                };
                apply(verdict, found, reason);
            }
        }

        if let Some(action) = self.policy.injection {
            let (score, fired) = injection_score(text);
            if score >= self.policy.injection_threshold && !fired.is_empty() {
                let action = match action {
                    Action::Redact => Action::Block,
                    a => a,
                };
                let verdict = Verdict {
                    stage: "prompt",
                    action,
                    kinds: fired
                        .iter()
                        .map(|name| (format!("injection.{name}"), 1))
                        .collect(),
                    score: Some(score),
                };
                let reason = format!("the prompt looks like a prompt injection (score {score:.2})");
                apply(verdict, Vec::new(), reason);
            }
        }

        if let Some(terms) = &self.terms {
            let found = terms.find(text);
            if !found.is_empty() {
                let action = self.policy.blocked_terms_action.unwrap_or(Action::Block);
                let verdict = Verdict {
                    stage: "prompt",
                    action,
                    kinds: counts(found.iter().map(|f| f.kind.as_str())),
                    score: None,
                };
                apply(
                    verdict,
                    found,
                    "the prompt contains a blocked term".to_string(),
                );
            }
        }

        if !reasons.is_empty() {
            PromptOutcome::Blocked {
                verdicts,
                reason: reasons.join("; "),
            }
        } else if !cut.is_empty() {
            PromptOutcome::Redacted {
                text: redact(text, &cut),
                verdicts,
            }
        } else {
            PromptOutcome::Allow { verdicts }
        }
    }

    /// Checks requested tool names (`tools[].function.name`) or a response's `tool_calls`
    /// names against `allowed_tools` (exact, case-sensitive names, as the API matches them).
    ///
    /// `Ok(None)`: allowed. `Err((verdict, reason))` when any name is not allowed; the verdict
    /// has stage "tools", action Block and counts under "tool". The allowlist has no action of
    /// its own, so `Ok(Some(_))` is not produced today; it is there for a future Log mode.
    pub fn check_tools(&self, names: &[&str]) -> Result<Option<Verdict>, (Verdict, String)> {
        let Some(allowed) = &self.policy.allowed_tools else {
            return Ok(None);
        };
        let mut denied: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !allowed.iter().any(|a| a.trim() == *n))
            .collect();
        if denied.is_empty() {
            return Ok(None);
        }
        let verdict = Verdict {
            stage: "tools",
            action: Action::Block,
            kinds: counts(denied.iter().map(|_| "tool")),
            score: None,
        };
        denied.sort_unstable();
        denied.dedup();
        // Tool names come from the request itself, so echoing them leaks nothing new; cap the
        // length so a hostile request cannot make the error (or the log line) huge.
        let mut list: String = denied.join(", ");
        if list.len() > 200 {
            let mut cut = 200;
            while !list.is_char_boundary(cut) {
                cut -= 1;
            }
            list.truncate(cut);
            list.push_str("...");
        }
        Err((
            verdict,
            format!("tools not allowed for this tenant: {list}"),
        ))
    }

    /// A scanner for one output stream (one per choice) when `pii_on_output` is set.
    pub fn output_scanner(&self) -> Option<OutputScanner> {
        match self.policy.pii {
            Some(action) if self.policy.pii_on_output => {
                Some(OutputScanner::new(action, &self.kinds))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
