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
