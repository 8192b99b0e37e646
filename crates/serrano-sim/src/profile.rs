//! A backend calibrated on a real serrano (`serrano sim calibrate`): its engine's own step-time
//! model (the coefficients its `/metrics` shows) with the KV size, step limits and price of the
//! server it was read from. `sim run --profile` replays one; a fleet file's `sim = { profile =
//! FILE }` puts one behind the router.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serrano_engine::scheduler::SchedulerConfig;
use serrano_engine::steptime::StepModel;

use crate::sim::{Backend, SimError, Timing};

/// Largest profile file read (a profile is a dozen lines; anything bigger is not one).
pub const MAX_PROFILE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    /// Seconds a step costs whatever it holds.
    pub intercept_s: f64,
    /// Seconds per prompt token in the step.
    pub prefill_token_s: f64,
    /// Seconds per decoding sequence in the step.
    pub decode_seq_s: f64,
    /// Seconds per thousand KV positions the step's tokens attend to.
    pub kv_kilotoken_s: f64,
    /// KV cache positions of the server's engine.
    pub kv_tokens: usize,
    pub max_num_seqs: usize,
    pub max_batch_tokens: usize,
    /// What the server's machine costs, dollars per hour.
    pub price_per_hour: f64,
}

impl Profile {
    /// A profile file's text, checked: finite coefficients, a KV cache, step limits and a
    /// price that are not negative.
    pub fn parse(text: &str) -> Result<Profile, SimError> {
        let bad = |m: String| SimError::Workload(format!("profile: {m}"));
        if text.len() > MAX_PROFILE_BYTES {
            return Err(bad(format!("over {MAX_PROFILE_BYTES} bytes")));
        }
        let p: Profile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let coefficients = p.coefficients();
        if coefficients.iter().any(|c| !c.is_finite()) {
            return Err(bad(format!("coefficients {coefficients:?}")));
        }
        if p.kv_tokens == 0 || p.max_num_seqs == 0 || p.max_batch_tokens == 0 {
            return Err(bad(
                "kv_tokens, max_num_seqs and max_batch_tokens must be 1 or more".into(),
            ));
        }
        if !(p.price_per_hour.is_finite() && p.price_per_hour >= 0.0) {
            return Err(bad(format!("price_per_hour {}", p.price_per_hour)));
        }
        Ok(p)
    }

    /// A profile file, read no further than [`MAX_PROFILE_BYTES`].
    pub fn load(path: &Path) -> Result<Profile, SimError> {
        let bad = |m: String| SimError::Workload(format!("profile {}: {m}", path.display()));
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| {
                f.take(MAX_PROFILE_BYTES as u64 + 1)
                    .read_to_string(&mut text)
            })
            .map_err(|e| bad(e.to_string()))?;
        Profile::parse(&text).map_err(|e| bad(e.to_string()))
    }

    /// The profile as a file, with a comment saying what the numbers are.
    pub fn to_file(&self) -> Result<String, SimError> {
        let body = toml::to_string(self).map_err(|e| SimError::Workload(e.to_string()))?;
        Ok(format!(
            "# `serrano sim calibrate` of {}: the engine's own step-time model (seconds: \
             intercept, per prompt token, per decoding sequence, per thousand positions \
             attended)\n{body}",
            self.name
        ))
    }

    /// Intercept, per prompt token, per decoding sequence, per thousand positions: the order
    /// of the engine's `StepModel` coefficients.
    pub fn coefficients(&self) -> [f64; 4] {
        [
            self.intercept_s,
            self.prefill_token_s,
            self.decode_seq_s,
            self.kv_kilotoken_s,
        ]
    }

    /// The simulated backend: the engine's step model with these coefficients, its KV cache,
    /// and the server's step limits unless `scheduler` overrides them.
    pub fn backend(&self, scheduler: Option<SchedulerConfig>) -> Backend {
        Backend {
            timing: Timing::Calibrated {
                steps: StepModel::from_coefficients(self.coefficients()),
                kv_tokens: self.kv_tokens,
            },
            scheduler: scheduler.unwrap_or(SchedulerConfig {
                max_num_seqs: self.max_num_seqs,
                max_batch_tokens: self.max_batch_tokens,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            name: "serrano at http://127.0.0.1:8080".into(),
            intercept_s: 0.0021,
            prefill_token_s: 0.00062,
            decode_seq_s: 0.0011,
            kv_kilotoken_s: 0.00061,
            kv_tokens: 46_592,
            max_num_seqs: 32,
            max_batch_tokens: 256,
            price_per_hour: 0.1,
        }
    }

    #[test]
    fn a_profile_survives_its_file_and_becomes_a_calibrated_backend() {
        let p = sample();
        let back = Profile::parse(&p.to_file().unwrap()).unwrap();
        assert_eq!(back, p);
        let b = back.backend(None);
        assert_eq!(b.scheduler.max_batch_tokens, 256);
        assert!(matches!(
            b.timing,
            Timing::Calibrated {
                kv_tokens: 46_592,
                ..
            }
        ));
        let other = SchedulerConfig {
            max_num_seqs: 4,
            max_batch_tokens: 64,
        };
        assert_eq!(back.backend(Some(other)).scheduler.max_num_seqs, 4);
    }

    #[test]
    fn a_broken_profile_is_refused_with_the_reason() {
        let text = sample().to_file().unwrap();
        for (broken, why) in [
            (
                text.replace("kv_tokens = 46592", "kv_tokens = 0"),
                "kv_tokens",
            ),
            (
                text.replace("price_per_hour = 0.1", "price_per_hour = -1.0"),
                "price",
            ),
            (
                text.replace("intercept_s = 0.0021", "intercept_s = nan"),
                "coefficients",
            ),
            (text.replace("max_num_seqs", "max_seqs"), "max_seqs"),
            ("x".repeat(MAX_PROFILE_BYTES + 1), "bytes"),
        ] {
            let e = Profile::parse(&broken).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(why)),
                "{why}: {e:?}"
            );
        }
    }
}
