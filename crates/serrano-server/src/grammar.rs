//! Structured outputs on the local engine: a JSON schema (a `response_format`, a tool's
//! parameters) is compiled by llguidance, the engine behind structured outputs in vLLM and
//! llama.cpp, into a constraint that gives the engine a mask of allowed tokens at every step.
//! The engine knows only its `TokenConstraint` seam; llguidance lives here.

use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use serrano_engine::{Constraint, ConstraintFactory, ModelInfo, TokenConstraint, TokenMask};

/// A model's vocabulary indexed for llguidance, built once per engine.
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

/// llguidance's view of the engine's tokenizer: the byte trie of every token (special tokens
/// behind the marker byte, so no grammar can produce them as text), and tokenizing with the
/// model's own BPE.
struct Vocabulary {
    trie: TokTrie,
    info: Arc<ModelInfo>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.info
            .tokenizer
            .encode(&String::from_utf8_lossy(s), false, false)
    }
}

impl Grammars {
    pub fn new(info: &Arc<ModelInfo>) -> Result<Grammars, String> {
        let tok = &info.tokenizer;
        let words: Vec<Vec<u8>> = (0..tok.vocab_size() as u32)
            .map(|id| {
                let bytes = tok.token_bytes(id);
                if tok.is_special(id) {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(bytes);
                    marked
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        // The token that ends a constrained answer: the template's end of turn when it has one.
        let end = tok
            .eog
            .iter()
            .copied()
            .find(|&t| t != tok.eos.unwrap_or(u32::MAX))
            .or(tok.eos)
            .ok_or("the model has no end-of-generation token")?;
        let rx = TokRxInfo::new(tok.vocab_size() as u32, end);
        let env: TokEnv = Arc::new(Vocabulary {
            trie: TokTrie::from(&rx, &words),
            info: info.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        // Grammar errors come back as values; llguidance's own logging stays quiet.
        factory.set_stderr_log_level(0);
        Ok(Grammars {
            factory: Arc::new(factory),
        })
    }

    /// A constraint to JSON matching `schema`; `Err` names what llguidance cannot compile.
    pub fn json_schema(&self, schema: &Value) -> Result<Constraint, String> {
        self.compile(TopLevelGrammar::from_json_schema(schema.clone()))
    }

    /// A constraint to a grammar in llguidance's Lark dialect.
    pub fn lark(&self, grammar: &str) -> Result<Constraint, String> {
        self.compile(TopLevelGrammar::from_lark(grammar.to_string()))
    }

    fn compile(&self, grammar: TopLevelGrammar) -> Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let template = Matcher::new(Ok(parser));
        if let Some(e) = template.get_error() {
            return Err(e);
        }
        Ok(Constraint(Arc::new(Template(Mutex::new(template)))))
    }
}

/// A compiled grammar; each choice starts from a copy.
struct Template(Mutex<Matcher>);

impl ConstraintFactory for Template {
    fn start(&self) -> Box<dyn TokenConstraint> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Box::new(Matching(m.deep_clone()))
    }
}

/// One sequence's position in its grammar.
struct Matching(Matcher);

impl TokenConstraint for Matching {
    fn allowed(&mut self) -> Result<TokenMask, String> {
        self.0
            .compute_mask_or_eos()
            .map(|v| v.as_slice().to_vec())
            .map_err(|e| e.to_string())
    }

    fn accept(&mut self, token: u32) -> Result<(), String> {
        self.0.consume_token(token).map_err(|e| e.to_string())
    }

    fn complete(&self) -> bool {
        self.0.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// The tiny random model's vocabulary (every byte, some merges, specials).
    fn info() -> Arc<ModelInfo> {
        static ENGINE: std::sync::OnceLock<serrano_engine::EngineHandle> =
            std::sync::OnceLock::new();
        ENGINE
            .get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("tiny.gguf");
                serrano_engine::testing::TinyModel::default()
                    .write(&path)
                    .unwrap();
                serrano_engine::start(&path, Default::default()).unwrap()
            })
            .info()
            .clone()
    }

    fn grammars() -> &'static Grammars {
        static G: std::sync::OnceLock<Grammars> = std::sync::OnceLock::new();
        G.get_or_init(|| Grammars::new(&info()).unwrap())
    }

    /// A random schema of the kinds structured outputs must support, bounded so every value
    /// it allows is finite.
    fn schema() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            (0i64..50, 0i64..50).prop_map(
                |(a, b)| json!({"type": "integer", "minimum": a.min(b), "maximum": a.max(b)})
            ),
            Just(json!({"type": "boolean"})),
            Just(json!({"type": "null"})),
            (1usize..8).prop_map(|n| json!({"type": "string", "maxLength": n})),
            proptest::collection::vec("[a-z]{1,5}", 1..4).prop_map(|e| json!({"enum": e})),
            "[a-z]{1,6}".prop_map(|c| json!({"const": c})),
        ];
        leaf.prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                proptest::collection::btree_map("[a-z]{1,4}", inner.clone(), 1..4).prop_map(|props| {
                    let required: Vec<&String> = props.keys().collect();
                    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
                }),
                (inner.clone(), 0usize..2, 0usize..3).prop_map(|(items, lo, extra)| {
                    json!({"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra})
                }),
                (inner.clone(), inner).prop_map(|(a, b)| json!({"anyOf": [a, b]})),
            ]
        })
    }

    /// Whether `v` satisfies `s` (the keywords `schema()` generates).
    fn valid(v: &Value, s: &Value) -> bool {
        if let Some(any) = s["anyOf"].as_array() {
            return any.iter().any(|a| valid(v, a));
        }
        if let Some(e) = s["enum"].as_array() {
            return e.contains(v);
        }
        if !s["const"].is_null() {
            return v == &s["const"];
        }
        match s["type"].as_str() {
            Some("integer") => v.as_i64().is_some_and(|n| {
                n >= s["minimum"].as_i64().unwrap_or(i64::MIN)
                    && n <= s["maximum"].as_i64().unwrap_or(i64::MAX)
            }),
            Some("boolean") => v.is_boolean(),
            Some("null") => v.is_null(),
            Some("string") => v.as_str().is_some_and(|t| {
                t.chars().count() <= s["maxLength"].as_u64().unwrap_or(u64::MAX) as usize
            }),
            Some("array") => v.as_array().is_some_and(|a| {
                a.len() >= s["minItems"].as_u64().unwrap_or(0) as usize
                    && a.len() <= s["maxItems"].as_u64().unwrap_or(u64::MAX) as usize
                    && a.iter().all(|x| valid(x, &s["items"]))
            }),
            Some("object") => v.as_object().is_some_and(|o| {
                let props = s["properties"].as_object().cloned().unwrap_or_default();
                o.len() == props.len()
                    && props
                        .iter()
                        .all(|(k, ps)| o.get(k).is_some_and(|x| valid(x, ps)))
            }),
            _ => false,
        }
    }

    /// Walks a constraint with random allowed tokens (preferring ones that are not only
    /// whitespace, which JSON would allow for ever) until it is complete; the text written.
    fn walk(c: &Constraint, seed: u64) -> Option<String> {
        let info = info();
        let tok = &info.tokenizer;
        let mut m = c.0.start();
        let mut rng = seed;
        let mut out = Vec::new();
        for _ in 0..2000 {
            if m.complete() {
                return Some(tok.decode(&out, true));
            }
            let mask = m.allowed().ok()?;
            let allowed: Vec<u32> = (0..tok.vocab_size() as u32)
                .filter(|&t| {
                    mask.get(t as usize / 32)
                        .is_some_and(|w| w >> (t % 32) & 1 == 1)
                })
                .collect();
            let visible: Vec<u32> = allowed
                .iter()
                .copied()
                .filter(|&t| {
                    !tok.is_special(t) && !tok.token_bytes(t).iter().all(u8::is_ascii_whitespace)
                })
                .collect();
            let pool = if visible.is_empty() {
                &allowed
            } else {
                &visible
            };
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let t = *pool.get((rng >> 33) as usize % pool.len().max(1))?;
            m.accept(t).ok()?;
            if tok.is_special(t) {
                return Some(tok.decode(&out, true));
            }
            out.push(t);
        }
        None
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever tokens the mask lets through, the text parses and validates.
        #[test]
        fn every_text_the_mask_allows_parses_and_validates(s in schema(), seed in any::<u64>()) {
            let c = grammars().json_schema(&s).unwrap();
            let text = walk(&c, seed);
            prop_assert!(text.is_some(), "no complete text for {s}");
            let text = text.unwrap_or_default();
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("{e}: {text:?} for {s}")))?;
            prop_assert!(valid(&v, &s), "{text} does not satisfy {s}");
        }
    }

    #[test]
    fn local_refs_and_their_defs_are_followed() {
        let s = json!({
            "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"], "additionalProperties": false}},
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 2}},
            "required": ["a", "b"],
            "additionalProperties": false
        });
        let c = grammars().json_schema(&s).unwrap();
        for seed in 0..16 {
            let text = walk(&c, seed).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(
                v["a"]["x"].as_i64().is_some_and(|x| (0..=9).contains(&x)),
                "{text}"
            );
            let b = v["b"].as_array().unwrap();
            assert!((1..=2).contains(&b.len()), "{text}");
        }
    }

    #[test]
    fn a_schema_it_cannot_compile_is_refused_with_the_reason() {
        let e = grammars()
            .json_schema(
                &json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}),
            )
            .err()
            .unwrap();
        assert!(e.contains("missing"), "{e}");
    }
}
