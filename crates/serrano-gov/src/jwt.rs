//! OIDC/JWT bearer tokens verified against a JWKS file (the identity provider's published public
//! keys), with one claim naming the tenant. The file is read once at start-up; rotate keys by
//! restarting (or, later, by config reload).

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::error::GovError;

/// Longest token accepted, so a hostile header cannot make us parse megabytes.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub jwks_path: PathBuf,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// The claim whose string value names the tenant.
    pub tenant_claim: String,
}

/// Who a verified token names.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtIdentity {
    pub tenant: String,
    pub subject: String,
}

pub struct JwtVerifier {
    keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
    config: JwtConfig,
}

fn load_error(path: &Path, why: impl std::fmt::Display) -> GovError {
    GovError::Invalid(format!("JWKS {}: {why}", path.display()))
}

impl JwtVerifier {
    /// Loads the JWKS. Only asymmetric keys (RSA, EC P-256/P-384, Ed25519) are accepted: a JWKS
    /// file holds an identity provider's public keys, and a shared secret does not belong there.
    pub fn load(config: JwtConfig) -> Result<JwtVerifier, GovError> {
        let path = &config.jwks_path;
        let text = std::fs::read_to_string(path).map_err(|e| load_error(path, e))?;
        let set: JwkSet = serde_json::from_str(&text).map_err(|e| load_error(path, e))?;
        let mut keys = vec![];
        for jwk in &set.keys {
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                    Algorithm::ES384
                }
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                _ => {
                    return Err(load_error(
                        path,
                        "only RSA, EC P-256/P-384 and Ed25519 public keys are accepted",
                    ))
                }
            };
            // A key's declared algorithm wins (e.g. RS512), within its family.
            let alg = match jwk.common.key_algorithm.map(|a| a.to_string()) {
                Some(a) => a.parse::<Algorithm>().map_err(|e| load_error(path, e))?,
                None => alg,
            };
            if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                return Err(load_error(path, "HMAC keys are not accepted"));
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| load_error(path, e))?;
            keys.push((jwk.common.key_id.clone(), alg, key));
        }
        if keys.is_empty() {
            return Err(load_error(path, "no keys"));
        }
        Ok(JwtVerifier { keys, config })
    }

    /// Whether a bearer credential is a JWT rather than an API key.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.starts_with("eyJ") && token.matches('.').count() == 2
    }

    /// Verifies signature, expiry (required), not-before, issuer and audience, and reads the
    /// tenant claim.
    pub fn verify(&self, token: &str) -> Result<JwtIdentity, GovError> {
        let bad = |why: &str| GovError::Unauthorized(format!("Invalid bearer token: {why}."));
        if token.len() > MAX_TOKEN_BYTES {
            return Err(bad("too long"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| bad("malformed"))?;
        let (_, alg, key) = match &header.kid {
            Some(kid) => self.keys.iter().find(|(k, _, _)| k.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or_else(|| bad("no trusted key matches its kid"))?;
        if header.alg != *alg {
            return Err(bad("its algorithm is not its key's"));
        }
        let mut v = Validation::new(*alg);
        v.set_required_spec_claims(&["exp"]);
        v.validate_nbf = true;
        match &self.config.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.config.issuer {
            v.set_issuer(&[iss]);
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            match e.kind() {
                ExpiredSignature => bad("expired"),
                ImmatureSignature => bad("not valid yet"),
                InvalidAudience => bad("wrong audience"),
                InvalidIssuer => bad("wrong issuer"),
                InvalidSignature => bad("bad signature"),
                MissingRequiredClaim(_) => bad("a required claim (exp) is missing"),
                _ => bad("rejected"),
            }
        })?;
        let claim = &self.config.tenant_claim;
        let tenant = data.claims[claim]
            .as_str()
            .ok_or_else(|| bad(&format!("no '{claim}' claim naming the tenant")))?
            .to_string();
        let subject = data.claims["sub"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(64)
            .collect();
        Ok(JwtIdentity { tenant, subject })
    }
}
