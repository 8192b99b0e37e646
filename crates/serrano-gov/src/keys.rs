//! API keys: generated with 256 random bits, stored as sha256, compared in constant time.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::Retention;

/// Every generated key starts with this, so leaked keys are easy to scan for.
pub const KEY_PREFIX: &str = "sk-srn-";
/// Characters of a key shown in listings and audit records; never enough to guess the rest.
pub const SHOWN_CHARS: usize = 15;
/// Shortest key accepted (an operator-chosen master key included).
pub const MIN_KEY_CHARS: usize = 32;
/// Longest key accepted, so a hostile header cannot make us hash megabytes.
pub const MAX_KEY_CHARS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Inference and the admin API.
    Admin,
    /// Inference only.
    Inference,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Inference => "inference",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "inference" => Some(Role::Inference),
            _ => None,
        }
    }
}

/// Who a request is from, once its key checked out.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant_id: i64,
    pub tenant: String,
    pub key_id: i64,
    /// The key's first characters (never the secret).
    pub key_prefix: String,
    pub role: Role,
    /// Model names this key may use; `None` allows all.
    pub models: Option<Vec<String>>,
    /// The key may ask for the interactive latency class though its tenant's is batch.
    pub grant_interactive: bool,
    pub retention: Retention,
    /// The tenant's safety filters, if it has a policy.
    pub filter: Option<std::sync::Arc<serrano_safety::Filter>>,
}

impl Principal {
    pub fn may_use_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    let mut s = String::with_capacity(KEY_PREFIX.len() + 64);
    s.push_str(KEY_PREFIX);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// The lookup prefix of a key, shown in listings and audit records; `None` if the key's length
/// is out of bounds. A generated key shows its first characters (its random part starts after
/// `sk-srn-`); any other key (an operator's master key) shows a digest, never its own text.
pub fn shown(key: &str) -> Option<String> {
    if !(MIN_KEY_CHARS..=MAX_KEY_CHARS).contains(&key.len()) || !key.is_ascii() {
        return None;
    }
    if key.starts_with(KEY_PREFIX) && key.len() >= KEY_PREFIX.len() + 64 {
        return Some(key[..SHOWN_CHARS].to_string());
    }
    let digest: String = hash(key)[..4].iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("ext-{digest}"))
}

pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_long_random_and_checkable() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_PREFIX.len() + 64);
        assert!(shown(&a).is_some_and(|p| p.starts_with(KEY_PREFIX)));
        let master = "my-own-master-key-that-is-long-enough";
        assert!(shown(master).is_some_and(|p| p.starts_with("ext-") && !master.contains(&p[4..])));
        assert!(hashes_equal(&hash(&a), &hash(&a)));
        assert!(!hashes_equal(&hash(&a), &hash(&b)));
        assert_eq!(shown("short"), None);
        assert_eq!(shown(&"x".repeat(MAX_KEY_CHARS + 1)), None);
    }
}
