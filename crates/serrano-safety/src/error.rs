/// Why a policy cannot be used; every variant is a configuration mistake the admin API should
/// report as 400, never something a request can trigger.
#[derive(Debug, thiserror::Error)]
pub enum SafetyError {
    #[error("the policy is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("injection_threshold must be a number from 0 to 1, not {0}")]
    Threshold(f32),
    #[error(
        "pii_kinds is empty, so the PII check would check nothing; omit it to check all kinds"
    )]
    NoPiiKinds,
    #[error("pii_on_output needs a pii action (block, redact or log)")]
    OutputWithoutPii,
    #[error("blocked_terms entry {0} is empty")]
    EmptyTerm(usize),
    #[error("blocked_terms entry {index} is {len} bytes; the limit is {max}")]
    TermTooLong {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("{count} blocked_terms; the limit is {max}")]
    TooManyTerms { count: usize, max: usize },
    #[error("allowed_tools entry {0} is empty")]
    EmptyToolName(usize),
    #[error("the blocked-term matcher cannot be built: {0}")]
    Matcher(String),
}
