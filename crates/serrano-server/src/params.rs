//! Validation of request fields against OpenAI's ranges and serrano's limits, for every
//! backend, and their translation into sampling parameters. Each limit is named in the error so
//! a client can tell which value to change. What depends on a model (token ids inside its
//! vocabulary) is checked by the backend that serves it ([`check_token_ids`]).

use serrano_api::SamplingFields;
use serrano_engine::SamplingParams;

use crate::error::ApiError;

/// Most stop strings per request, and longest stop string, in bytes.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 512;
/// Most `logit_bias` entries.
pub const MAX_LOGIT_BIAS: usize = 1024;

fn range(param: &str, v: Option<f32>, lo: f32, hi: f32, default: f32) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x),
        Some(x) => Err(ApiError::invalid_param(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
    }
}

pub fn sampling(f: &SamplingFields) -> Result<SamplingParams, ApiError> {
    let top_p = range("top_p", f.top_p, 0.0, 1.0, 1.0)?;
    if top_p <= 0.0 {
        return Err(ApiError::invalid_param(
            "top_p",
            "top_p must be greater than 0",
        ));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1 (disabled) or positive, got {k}"),
            ))
        }
    };
    let repetition_penalty = range("repetition_penalty", f.repetition_penalty, 0.0, 10.0, 1.0)?;
    if repetition_penalty <= 0.0 {
        return Err(ApiError::invalid_param(
            "repetition_penalty",
            "repetition_penalty must be greater than 0",
        ));
    }
    let mut logit_bias = Vec::new();
    if let Some(b) = &f.logit_bias {
        if b.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!("at most {MAX_LOGIT_BIAS} logit_bias entries"),
            ));
        }
        for (k, &v) in b {
            let id: u32 = k.parse().map_err(|_| {
                ApiError::invalid_param("logit_bias", format!("'{k}' is not a token id"))
            })?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("bias for token {id} must be between -100 and 100"),
                ));
            }
            logit_bias.push((id, v));
        }
    }
    Ok(SamplingParams {
        temperature: range("temperature", f.temperature, 0.0, 2.0, 1.0)?,
        top_k,
        top_p,
        min_p: range("min_p", f.min_p, 0.0, 1.0, 0.0)?,
        repetition_penalty,
        frequency_penalty: range("frequency_penalty", f.frequency_penalty, -2.0, 2.0, 0.0)?,
        presence_penalty: range("presence_penalty", f.presence_penalty, -2.0, 2.0, 0.0)?,
        logit_bias,
        seed: f.seed.map(|s| s as u64),
    })
}

pub fn stops(f: &SamplingFields) -> Result<Vec<String>, ApiError> {
    let stops = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings"),
        ));
    }
    if stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid_param(
            "stop",
            format!("stop strings are limited to {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(stops)
}

/// Most `stop_token_ids` per request.
pub const MAX_STOP_TOKEN_IDS: usize = 64;

pub fn stop_token_ids(f: &SamplingFields) -> Result<(), ApiError> {
    if f.stop_token_ids
        .as_ref()
        .is_some_and(|ids| ids.len() > MAX_STOP_TOKEN_IDS)
    {
        return Err(ApiError::invalid_param(
            "stop_token_ids",
            format!("at most {MAX_STOP_TOKEN_IDS} stop_token_ids"),
        ));
    }
    Ok(())
}

/// Token ids a request names (`logit_bias` keys, `stop_token_ids`) inside a model's vocabulary.
pub fn check_token_ids(
    p: &SamplingParams,
    f: &SamplingFields,
    vocab_size: usize,
) -> Result<(), ApiError> {
    if let Some((bad, _)) = p.logit_bias.iter().find(|(t, _)| *t as usize >= vocab_size) {
        return Err(ApiError::invalid_param(
            "logit_bias",
            format!("'{bad}' is not a token id below {vocab_size}"),
        ));
    }
    let ids = f.stop_token_ids.iter().flatten();
    if let Some(bad) = ids.clone().find(|&&t| t as usize >= vocab_size) {
        return Err(ApiError::invalid_param(
            "stop_token_ids",
            format!("token id {bad} is outside the vocabulary (size {vocab_size})"),
        ));
    }
    Ok(())
}

/// Most choices (`n`) per request.
pub const MAX_CHOICES: u32 = 16;

/// The number of choices asked for (`n`, default 1).
pub fn choices(f: &SamplingFields) -> Result<usize, ApiError> {
    match f.n {
        None => Ok(1),
        Some(n) if (1..=MAX_CHOICES).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid_param(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_openai() {
        let p = sampling(&fields("{}")).unwrap();
        assert_eq!((p.temperature, p.top_p, p.top_k), (1.0, 1.0, 0));
    }

    #[test]
    fn out_of_range_values_name_the_param() {
        for (json, param) in [
            (r#"{"temperature": 3}"#, "temperature"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_k": -5}"#, "top_k"),
            (r#"{"min_p": 2}"#, "min_p"),
            (r#"{"presence_penalty": 9}"#, "presence_penalty"),
            (r#"{"frequency_penalty": -9}"#, "frequency_penalty"),
            (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
            (r#"{"logit_bias": {"abc": 1}}"#, "logit_bias"),
            (r#"{"logit_bias": {"5": 1000}}"#, "logit_bias"),
        ] {
            let e = sampling(&fields(json)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{json}");
            assert_eq!(e.status, 400);
        }
    }

    #[test]
    fn token_ids_outside_the_vocabulary_name_the_param() {
        for (json, param) in [
            (r#"{"logit_bias": {"500": 1}}"#, "logit_bias"),
            (r#"{"stop_token_ids": [100]}"#, "stop_token_ids"),
        ] {
            let f = fields(json);
            let e = check_token_ids(&sampling(&f).unwrap(), &f, 100).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{json}");
        }
        let f = fields(r#"{"logit_bias": {"99": 1}, "stop_token_ids": [0]}"#);
        check_token_ids(&sampling(&f).unwrap(), &f, 100).unwrap();
    }

    #[test]
    fn stop_limits() {
        assert_eq!(stops(&fields(r#"{"stop": "x"}"#)).unwrap(), vec!["x"]);
        let many = format!(r#"{{"stop": [{}]}}"#, vec!["\"a\""; 17].join(","));
        assert!(stops(&fields(&many)).is_err());
        assert_eq!(choices(&fields(r#"{"n": 3}"#)).unwrap(), 3);
        assert_eq!(choices(&fields("{}")).unwrap(), 1);
        assert!(choices(&fields(r#"{"n": 0}"#)).is_err());
        assert!(choices(&fields(r#"{"n": 17}"#)).is_err());
    }
}
