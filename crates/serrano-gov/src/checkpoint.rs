//! Ed25519-signed checkpoints of the audit chain.
//!
//! A checkpoint signs `(seq, hash, time)` of the chain's head. Verification recomputes the chain
//! and checks that the record at each checkpoint's `seq` has the signed hash, so a chain rebuilt
//! after an edit (every hash recomputed, the head rewritten) still fails against any checkpoint
//! signed before the edit, as long as the signing key stayed secret.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::audit::hex;
use crate::error::GovError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub time_ms: i64,
    /// Hex of the 32-byte Ed25519 public key.
    pub public_key: String,
    /// Hex of the 64-byte signature over [`Checkpoint::message`].
    pub signature: String,
}

impl Checkpoint {
    pub fn message(seq: i64, hash: &str, time_ms: i64) -> String {
        format!("serrano-audit-checkpoint\n{seq}\n{hash}\n{time_ms}")
    }

    pub fn sign(key: &SigningKey, seq: i64, hash: &str, time_ms: i64) -> Checkpoint {
        let sig = key.sign(Self::message(seq, hash, time_ms).as_bytes());
        Checkpoint {
            seq,
            hash: hash.to_string(),
            time_ms,
            public_key: hex(key.verifying_key().as_bytes()),
            signature: hex(&sig.to_bytes()),
        }
    }

    /// Checks the signature, and that it was made by `trusted` if given (else by the key the
    /// checkpoint names, which only proves integrity, not origin).
    pub fn verify_signature(&self, trusted: Option<&VerifyingKey>) -> Result<(), String> {
        let named = parse_public_key(&self.public_key)?;
        if trusted.is_some_and(|t| t != &named) {
            return Err("signed by a key other than the trusted one".into());
        }
        let sig: [u8; 64] = unhex(&self.signature)
            .and_then(|b| b.try_into().ok())
            .ok_or("the signature is not 64 bytes of hex")?;
        named
            .verify(
                Self::message(self.seq, &self.hash, self.time_ms).as_bytes(),
                &Signature::from_bytes(&sig),
            )
            .map_err(|_| "the signature does not match".to_string())
    }
}

pub fn parse_public_key(s: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = unhex(s.trim())
        .and_then(|b| b.try_into().ok())
        .ok_or("a public key is 32 bytes of hex")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

/// A signing key from its file: the 32-byte seed as 64 hex characters.
pub fn read_signing_key(path: &std::path::Path) -> Result<SigningKey, GovError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| GovError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let seed: [u8; 32] = unhex(text.trim())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            GovError::Invalid(format!(
                "{} must hold a 32-byte Ed25519 seed as 64 hex characters",
                path.display()
            ))
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A fresh signing key and its seed file text.
pub fn generate_signing_key() -> (SigningKey, String) {
    let seed: [u8; 32] = rand::random();
    (SigningKey::from_bytes(&seed), hex(&seed))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_every_field_and_the_key() {
        let (key, seed) = generate_signing_key();
        let cp = Checkpoint::sign(&key, 7, "ab", 1000);
        assert_eq!(cp.verify_signature(Some(&key.verifying_key())), Ok(()));
        assert_eq!(seed.len(), 64);
        for bad in [
            Checkpoint {
                seq: 8,
                ..cp.clone()
            },
            Checkpoint {
                hash: "ac".into(),
                ..cp.clone()
            },
            Checkpoint {
                time_ms: 1001,
                ..cp.clone()
            },
        ] {
            assert!(bad.verify_signature(None).is_err());
        }
        let (other, _) = generate_signing_key();
        assert!(cp.verify_signature(Some(&other.verifying_key())).is_err());
    }
}
