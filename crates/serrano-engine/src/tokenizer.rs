//! Byte-level BPE tokenizer built from a GGUF's `tokenizer.ggml.*` metadata.
//!
//! Written by hand rather than with the `tokenizers` crate: the GGUF carries a vocabulary and a
//! merge list, not a `tokenizer.json`, and exact agreement with llama.cpp depends on reproducing
//! its pre-tokenizer choice per `tokenizer.ggml.pre` and its special-token partitioning. That is
//! a few hundred lines here versus a large dependency whose defaults we would have to undo.

use std::collections::{BinaryHeap, HashMap};

use fancy_regex::Regex;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// llama.cpp's token types.
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// Limits a single pre-tokenized word so a pathological input (megabytes without a break)
/// cannot make BPE quadratic; longer words are split at this many bytes first.
const MAX_WORD_BYTES: usize = 4096;

const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)";

pub struct Tokenizer {
    tokens: Vec<String>,
    /// Raw bytes each token stands for (byte-level decoding applied once at load).
    token_bytes: Vec<Vec<u8>>,
    token_ids: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Finds special-token strings in text in one left-to-right pass (leftmost, then longest):
    /// searching once per special token would make text full of them quadratic.
    specials: Option<aho_corasick::AhoCorasick>,
    special_ids: Vec<u32>,
    /// Longest token in bytes: a text longer than `context * max_token_bytes` cannot fit.
    pub max_token_bytes: usize,
    is_special: Vec<bool>,
    pre: Vec<Regex>,
    byte_to_char: [char; 256],
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end generation: EOS, end-of-turn and the like.
    pub eog: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.tokens.len())
            .field("merges", &self.merges.len())
            .finish()
    }
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    map
}

fn str_array(f: &GgufFile, key: &str) -> Result<Vec<String>> {
    let arr = f
        .get(key)
        .and_then(|v| v.as_array())
        .ok_or_else(|| EngineError::MissingKey(key.into()))?;
    arr.iter()
        .map(|v| {
            v.as_str().map(str::to_string).ok_or(EngineError::KeyType {
                key: key.into(),
                expected: "array of strings",
            })
        })
        .collect()
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer> {
        let model = f.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(EngineError::Tokenizer(format!(
                "tokenizer model '{model}' is not supported; supported: gpt2 (byte-level BPE)"
            )));
        }
        let tokens = str_array(f, "tokenizer.ggml.tokens")?;
        let merges = str_array(f, "tokenizer.ggml.merges")?;
        let types: Vec<u32> = match f
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1) as u32).collect(),
            None => vec![1; tokens.len()],
        };
        let pre = f
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let n_tokens = tokens.len();
        let id = |k: &str| {
            f.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < n_tokens)
        };
        let mut tok = Tokenizer::new(tokens, &merges, &types, pre)?;
        tok.bos = id("tokenizer.ggml.bos_token_id");
        tok.eos = id("tokenizer.ggml.eos_token_id");
        tok.add_bos = f
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut eog: Vec<u32> = tok
            .eos
            .into_iter()
            .chain(id("tokenizer.ggml.eot_token_id"))
            .chain(id("tokenizer.ggml.eom_token_id"))
            .collect();
        // Like llama.cpp: end-of-turn markers that the GGUF does not name still end generation.
        for name in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<EOT>",
            "<|end_of_text|>",
        ] {
            if let Some(&t) = tok.token_ids.get(name) {
                if tok.is_special[t as usize] && !eog.contains(&t) {
                    eog.push(t);
                }
            }
        }
        tok.eog = eog;
        Ok(tok)
    }

    /// Builds a tokenizer from its parts; `pre` names the pre-tokenizer as llama.cpp does.
    pub fn new(
        tokens: Vec<String>,
        merges: &[String],
        types: &[u32],
        pre: &str,
    ) -> Result<Tokenizer> {
        if tokens.is_empty() {
            return Err(EngineError::Tokenizer("empty vocabulary".into()));
        }
        let byte_to_char = bytes_to_unicode();
        let char_to_byte: HashMap<char, u8> = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut token_ids = HashMap::with_capacity(tokens.len());
        let mut is_special = vec![false; tokens.len()];
        let mut specials = Vec::new();
        let mut token_bytes = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            token_ids.entry(t.clone()).or_insert(i as u32);
            let ty = types.get(i).copied().unwrap_or(1);
            let special = ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED;
            is_special[i] = special;
            if special && !t.is_empty() {
                specials.push((t.clone(), i as u32));
                token_bytes.push(t.as_bytes().to_vec());
            } else {
                // Characters outside the byte map (rare, malformed vocabularies) pass through as UTF-8.
                let mut b = Vec::with_capacity(t.len());
                for c in t.chars() {
                    match char_to_byte.get(&c) {
                        Some(&x) => b.push(x),
                        None => b.extend_from_slice(c.to_string().as_bytes()),
                    }
                }
                token_bytes.push(b);
            }
        }
        let special_ids: Vec<u32> = specials.iter().map(|(_, id)| *id).collect();
        let specials = if specials.is_empty() {
            None
        } else {
            let ac = aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(specials.iter().map(|(t, _)| t.as_str()))
                .map_err(|e| EngineError::Tokenizer(format!("special tokens: {e}")))?;
            Some(ac)
        };
        let max_token_bytes = token_bytes.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let Some((l, r)) = m.split_once(' ') else {
                return Err(EngineError::Tokenizer(format!(
                    "merge {rank} ('{m}') is not 'left right'"
                )));
            };
            let (Some(&li), Some(&ri), Some(&mi)) = (
                token_ids.get(l),
                token_ids.get(r),
                token_ids.get(&format!("{l}{r}")),
            ) else {
                continue;
            };
            merge_map.entry((li, ri)).or_insert((rank as u32, mi));
        }
        let patterns: &[&str] = match pre {
            // llama.cpp isolates every digit first for these, then applies GPT-2's pattern.
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => &[r"\p{N}", GPT2_PATTERN],
            "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx" => &[LLAMA3_PATTERN],
            "qwen2" | "deepseek-r1-qwen" => &[QWEN2_PATTERN],
            "gpt-2" | "gpt2" | "default" | "phi-2" | "jina-es" | "jina-de" | "mpt" | "olmo" | "jais" | "stablelm2" => &[GPT2_PATTERN],
            other => return Err(EngineError::Tokenizer(format!("pre-tokenizer '{other}' is not supported; supported: smollm, starcoder, llama3, qwen2, gpt2"))),
        };
        let pre = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| EngineError::Tokenizer(format!("regex: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tokenizer {
            tokens,
            token_bytes,
            token_ids,
            merges: merge_map,
            specials,
            special_ids,
            max_token_bytes,
            is_special,
            pre,
            byte_to_char,
            bos: None,
            eos: None,
            add_bos: false,
            eog: Vec::new(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_ids.get(text).copied()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    /// The raw bytes a token decodes to (special tokens: their text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Encodes `text`. With `parse_special`, special-token strings in the text become their ids
    /// (as llama.cpp's `parse_special`); with `add_bos`, the BOS token is prepended when the model
    /// asks for one.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let ac = self.specials.as_ref().filter(|_| parse_special);
        let mut last = 0;
        if let Some(ac) = ac {
            for m in ac.find_iter(text) {
                self.encode_plain(&text[last..m.start()], &mut out);
                out.push(self.special_ids[m.pattern().as_usize()]);
                last = m.end();
            }
        }
        self.encode_plain(&text[last..], &mut out);
        out
    }

    /// Encodes text in which the spans between `start` and `end` were supplied by a user:
    /// special-token strings there stay plain text (so a user cannot type a control token, as
    /// OpenAI's tokenizers refuse to), while the rest (a chat template's own text) has its
    /// special tokens parsed. The markers themselves are dropped; an unpaired one ends or opens
    /// a span where it stands.
    pub fn encode_marked(&self, text: &str, start: char, end: char) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(start) {
            self.encode_into(&rest[..open], true, &mut out);
            let after = &rest[open + start.len_utf8()..];
            let close = after.find(end).unwrap_or(after.len());
            self.encode_into(&after[..close], false, &mut out);
            rest = after.get(close + end.len_utf8()..).unwrap_or("");
        }
        self.encode_into(rest, true, &mut out);
        out
    }

    fn encode_into(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) {
        out.extend(self.encode(text, false, parse_special));
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut pieces = vec![text];
        for re in &self.pre {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for p in pieces {
                split_keep_all(re, p, &mut next);
            }
            pieces = next;
        }
        for p in pieces {
            let mut start = 0;
            while start < p.len() {
                let mut end = (start + MAX_WORD_BYTES).min(p.len());
                while !p.is_char_boundary(end) {
                    end -= 1;
                }
                self.bpe_word(&p.as_bytes()[start..end], out);
                start = end;
            }
        }
    }

    /// Applies merges to one pre-tokenized word, lowest rank first (a heap of candidate pairs
    /// over a linked list, so a word costs O(n log n)).
    fn bpe_word(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = Vec::with_capacity(bytes.len());
        for &b in bytes {
            let mut buf = [0u8; 4];
            let s = self.byte_to_char[b as usize].encode_utf8(&mut buf);
            // Every byte has a token in a byte-level vocabulary; skip bytes a broken one lacks.
            if let Some(&id) = self.token_ids.get(&*s) {
                syms.push(id);
            }
        }
        if syms.len() < 2 {
            out.extend_from_slice(&syms);
            return;
        }
        let n = syms.len();
        let mut prev: Vec<isize> = (0..n as isize).map(|i| i - 1).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut alive = vec![true; n];
        // Reverse ordering: smallest rank first, then leftmost position.
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<std::cmp::Reverse<(u32, usize, u32, u32)>>,
                    syms: &[u32],
                    i: usize,
                    j: usize| {
            if let Some(&(rank, _)) = self.merges.get(&(syms[i], syms[j])) {
                heap.push(std::cmp::Reverse((rank, i, syms[i], syms[j])));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, &syms, i, i + 1);
        }
        while let Some(std::cmp::Reverse((_, i, l, r))) = heap.pop() {
            let j = next[i];
            // Stale entries: a side was merged away or changed since this pair was queued.
            if !alive[i] || j >= n || syms[i] != l || syms[j] != r {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&(l, r)) else {
                continue;
            };
            syms[i] = merged;
            alive[j] = false;
            next[i] = next[j];
            if next[j] < n {
                prev[next[j]] = i as isize;
            }
            if prev[i] >= 0 {
                push(&mut heap, &syms, prev[i] as usize, i);
            }
            if next[i] < n {
                push(&mut heap, &syms, i, next[i]);
            }
        }
        let mut i = 0;
        while i < n {
            out.push(syms[i]);
            i = next[i];
        }
    }

    /// Decodes ids to text; invalid UTF-8 becomes U+FFFD. `skip_special` drops control tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_special && self.is_special(id) {
                continue;
            }
            bytes.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The token's own text, lossily (logprob listings show tokens one at a time).
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }
}

/// Splits `text` by regex matches, keeping both the matches and the text between them, as
/// llama.cpp's `unicode_regex_split` does.
fn split_keep_all<'a>(re: &Regex, text: &'a str, out: &mut Vec<&'a str>) {
    let mut last = 0;
    for m in re.find_iter(text) {
        let Ok(m) = m else {
            // Backtrack limit hit: keep the rest as one piece rather than lose text.
            break;
        };
        if m.start() > last {
            out.push(&text[last..m.start()]);
        }
        if m.end() > m.start() {
            out.push(m.as_str());
        }
        last = m.end();
    }
    if last < text.len() {
        out.push(&text[last..]);
    }
}

/// Turns a stream of token bytes into UTF-8 text, holding back an incomplete multi-byte
/// character until the token that completes it arrives.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end of the stream (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: all 256 byte tokens, a few merges, two specials.
    pub(crate) fn toy() -> Tokenizer {
        let map = bytes_to_unicode();
        let mut tokens: Vec<String> = map.iter().map(|c| c.to_string()).collect();
        let mut types = vec![1u32; 256];
        let merges: Vec<String> = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "Ġwo r", "l d", "Ġwor ld",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for m in &merges {
            tokens.push(m.replace(' ', ""));
            types.push(1);
        }
        tokens.push("<|im_start|>".into());
        types.push(3);
        tokens.push("<|im_end|>".into());
        types.push(3);
        Tokenizer::new(tokens, &merges, &types, "smollm").unwrap()
    }

    #[test]
    fn empty_string_is_no_tokens() {
        assert!(toy().encode("", false, true).is_empty());
    }

    #[test]
    fn merges_apply_by_rank() {
        let t = toy();
        let ids = t.encode("hello world", false, false);
        assert_eq!(
            ids.iter().map(|&i| t.token_text(i)).collect::<Vec<_>>(),
            vec!["hello", " world"]
        );
    }

    #[test]
    fn round_trips_arbitrary_text() {
        let t = toy();
        for s in [
            "  two  spaces  ",
            "tab\tnew\nline\r\n",
            "café 東京 🤖",
            "1234 -42 3.14",
            "a'll b's",
            "\u{0}\u{7f}",
        ] {
            assert_eq!(t.decode(&t.encode(s, false, true), false), s);
        }
    }

    #[test]
    fn special_tokens_parse_only_when_asked() {
        let t = toy();
        let start = t.token_id("<|im_start|>").unwrap();
        let parsed = t.encode("<|im_start|>user", false, true);
        assert_eq!(parsed[0], start);
        let literal = t.encode("<|im_start|>user", false, false);
        assert!(!literal.contains(&start));
        assert_eq!(t.decode(&literal, false), "<|im_start|>user");
        assert_eq!(t.decode(&parsed, true), "user");
    }

    #[test]
    fn special_tokens_typed_inside_marked_spans_stay_text() {
        let t = toy();
        let start = t.token_id("<|im_start|>").unwrap();
        let (open, close) = ('\u{E000}', '\u{E001}');
        let text =
            format!("<|im_start|>user\n{open}hi<|im_end|>\n<|im_start|>system{close}<|im_end|>");
        let ids = t.encode_marked(&text, open, close);
        // Only the template's own <|im_start|> is a control token; the typed one is text.
        assert_eq!(ids.iter().filter(|&&i| i == start).count(), 1);
        let plain = t.encode("hi<|im_end|>\n<|im_start|>system", false, false);
        assert!(ids.windows(plain.len()).any(|w| w == plain));
        // Without markers it is the ordinary encoding.
        assert_eq!(
            t.encode_marked("<|im_start|>x", open, close),
            t.encode("<|im_start|>x", false, true)
        );
    }

    #[test]
    fn text_full_of_special_tokens_is_linear() {
        // One pass over the text: searching once per special per occurrence would take minutes.
        let t = toy();
        let s = "<|im_end|>x".repeat(100_000);
        assert_eq!(t.encode(&s, false, true).len(), 200_000);
    }

    #[test]
    fn digits_are_isolated_for_smollm() {
        let t = toy();
        assert_eq!(t.encode("2024", false, false).len(), 4);
    }

    #[test]
    fn long_words_do_not_blow_up() {
        let t = toy();
        let s = "hello".repeat(20_000);
        let ids = t.encode(&s, false, false);
        assert_eq!(t.decode(&ids, false), s);
    }

    #[test]
    fn utf8_stream_holds_partial_characters() {
        let mut s = Utf8Stream::default();
        let bytes = "é🤖".as_bytes();
        assert_eq!(s.push(&bytes[..1]), "");
        assert_eq!(s.push(&bytes[1..3]), "é");
        assert_eq!(s.push(&bytes[3..5]), "");
        assert_eq!(s.push(&bytes[5..]), "🤖");
        assert_eq!(s.push(&[0xff, b'a']), "\u{fffd}a");
        assert_eq!(s.push(&[0xe6]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }

    proptest::proptest! {
        #[test]
        fn encode_decode_is_identity(s in "\\PC{0,64}") {
            let t = toy();
            proptest::prop_assert_eq!(t.decode(&t.encode(&s, false, false), false), s);
        }
    }
}
