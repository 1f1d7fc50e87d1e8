//! The body of `POST /v1/completions`, checked field by field.
//!
//! The JSON is read as a generic value and each field is checked by hand rather than derived with
//! serde, so that every refusal names the field and what it must be (serde's type errors give a
//! line and column, which a client cannot act on).

use super::ServeConfig;
use crate::infer::SampleOptions;
use serde_json::{Map, Value};

/// The fields a request may hold.
pub const FIELDS: [&str; 6] = ["prompt", "max_tokens", "temperature", "top_k", "seed", "stream"];

/// Bytes generated when a request does not say (lowered to the server's cap).
pub const DEFAULT_MAX_TOKENS: usize = 128;

/// A request that passed every check.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The prompt's bytes (UTF-8, as JSON strings are).
    pub prompt: Vec<u8>,
    /// How to sample.
    pub opts: SampleOptions,
    /// Whether to answer with server-sent events.
    pub stream: bool,
}

/// Why a request was refused: the message, and the field concerned when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// What was wrong, in words a client can act on.
    pub message: String,
    /// The request field concerned.
    pub field: Option<&'static str>,
}

impl Invalid {
    fn field(field: &'static str, message: String) -> Self {
        Invalid {
            message,
            field: Some(field),
        }
    }

    fn body(message: impl Into<String>) -> Self {
        Invalid {
            message: message.into(),
            field: None,
        }
    }
}

/// Parse and check a request body against the server's limits.
pub fn parse(body: &[u8], config: &ServeConfig) -> Result<Completion, Invalid> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Invalid::body(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(Invalid::body(
            "the body must be a JSON object such as {\"prompt\": \"text\"}",
        ));
    };
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(Invalid::body(format!(
            "unknown field {unknown:?} (known: {})",
            FIELDS.join(", ")
        )));
    }
    let prompt = match fields.get("prompt") {
        Some(Value::String(s)) => s.as_bytes().to_vec(),
        Some(_) => return Err(Invalid::field("prompt", "prompt must be a string".into())),
        None => return Err(Invalid::field("prompt", "prompt is required".into())),
    };
    if prompt.len() > config.max_prompt_bytes {
        return Err(Invalid::field(
            "prompt",
            format!(
                "prompt is {} bytes, more than the limit of {} bytes",
                prompt.len(),
                config.max_prompt_bytes
            ),
        ));
    }
    let max_tokens = match integer(&fields, "max_tokens")? {
        Some(n) => n,
        None => DEFAULT_MAX_TOKENS.min(config.max_tokens) as u64,
    };
    if max_tokens == 0 || max_tokens > config.max_tokens as u64 {
        return Err(Invalid::field(
            "max_tokens",
            format!(
                "max_tokens must be between 1 and {} (the server's limit), got {max_tokens}",
                config.max_tokens
            ),
        ));
    }
    let defaults = SampleOptions::default();
    let temperature = match fields.get("temperature") {
        None | Some(Value::Null) => defaults.temperature,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(_) => return Err(Invalid::field("temperature", "temperature must be a number".into())),
    };
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Invalid::field(
            "temperature",
            format!("temperature must be a non-negative number (0: always the most likely byte), got {temperature}"),
        ));
    }
    let top_k = integer(&fields, "top_k")?.unwrap_or(defaults.top_k as u64);
    if top_k > 256 {
        return Err(Invalid::field(
            "top_k",
            format!("top_k must be between 0 (all bytes) and 256, got {top_k}"),
        ));
    }
    let seed = integer(&fields, "seed")?.unwrap_or(defaults.seed);
    let stream = match fields.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Invalid::field("stream", "stream must be true or false".into())),
    };
    Ok(Completion {
        prompt,
        opts: SampleOptions {
            max_tokens: max_tokens as usize,
            temperature,
            top_k: top_k as usize,
            seed,
        },
        stream,
    })
}

/// A non-negative integer field (absent or null: `None`).
fn integer(fields: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, Invalid> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| Invalid::field(name, format!("{name} must be a non-negative integer, got {n}"))),
        Some(_) => Err(Invalid::field(name, format!("{name} must be a non-negative integer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str) -> Result<Completion, Invalid> {
        parse(body.as_bytes(), &ServeConfig::default())
    }

    #[test]
    fn defaults_fill_every_field_but_the_prompt() {
        let c = check(r#"{"prompt": "hi"}"#).expect("valid");
        assert_eq!(c.prompt, b"hi");
        assert!(!c.stream);
        assert_eq!(c.opts.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(c.opts.top_k, SampleOptions::default().top_k);
        let c = check(r#"{"prompt": "", "max_tokens": 3, "temperature": 0, "top_k": 0, "seed": 9, "stream": true}"#)
            .expect("valid");
        assert_eq!(
            (c.opts.max_tokens, c.opts.top_k, c.opts.seed, c.stream),
            (3, 0, 9, true)
        );
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases = [
            (r#"{"prompt": 1}"#, Some("prompt")),
            (r#"{"max_tokens": 1}"#, Some("prompt")),
            (r#"{"prompt": "a", "max_tokens": 0}"#, Some("max_tokens")),
            (r#"{"prompt": "a", "max_tokens": 1000000}"#, Some("max_tokens")),
            (r#"{"prompt": "a", "max_tokens": -1}"#, Some("max_tokens")),
            (r#"{"prompt": "a", "max_tokens": "5"}"#, Some("max_tokens")),
            (r#"{"prompt": "a", "temperature": -1}"#, Some("temperature")),
            (r#"{"prompt": "a", "temperature": "hot"}"#, Some("temperature")),
            (r#"{"prompt": "a", "top_k": 1.5}"#, Some("top_k")),
            (r#"{"prompt": "a", "top_k": 300}"#, Some("top_k")),
            (r#"{"prompt": "a", "seed": -2}"#, Some("seed")),
            (r#"{"prompt": "a", "stream": 1}"#, Some("stream")),
            (r#"{"prompt": "a", "tokens": 5}"#, None),
            (r#"{"prompt": "a""#, None),
            (r#"["prompt"]"#, None),
        ];
        for (body, field) in cases {
            let e = check(body).expect_err(body);
            assert_eq!(e.field, field, "{body}: {}", e.message);
            if let Some(f) = field {
                assert!(e.message.contains(f), "{body}: {}", e.message);
            }
        }
        let e = check(r#"{"prompt": "a", "tokens": 5}"#).expect_err("unknown");
        assert!(e.message.contains("unknown field \"tokens\""), "{}", e.message);
        let long = format!(
            r#"{{"prompt": "{}"}}"#,
            "x".repeat(ServeConfig::default().max_prompt_bytes + 1)
        );
        assert_eq!(check(&long).expect_err("long").field, Some("prompt"));
    }
}
