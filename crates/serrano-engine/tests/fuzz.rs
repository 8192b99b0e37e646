//! Hostile model files and text: arbitrary bytes, and valid GGUFs with bytes flipped, must give
//! an error (or a model), never a panic or an allocation the file did not pay for; any string
//! must tokenize and decode. Bounded runs (a few hundred cases each) so CI stays quick; raise
//! PROPTEST_CASES to search longer.

use proptest::prelude::*;
use serrano_engine::gguf::GgufFile;
use serrano_engine::model::Model;
use serrano_engine::tokenizer::Tokenizer;

/// A small valid GGUF (the tiny random model) to mutate.
fn tiny_gguf() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        serrano_engine::testing::TinyModel::default()
            .write(&path)
            .unwrap();
        std::fs::read(&path).unwrap()
    })
}

/// Parses, then builds everything a server builds from a file; errors are fine.
fn load(bytes: Vec<u8>) {
    let Ok(f) = GgufFile::from_vec(bytes) else {
        return;
    };
    let _ = Tokenizer::from_gguf(&f);
    let _ = Model::load(&f);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        load(bytes);
    }

    #[test]
    fn a_valid_file_with_bytes_changed_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = tiny_gguf().to_vec();
        // Most of a file is tensor data; aim at the header, where lengths and counts live.
        let header = bytes.len().min(64 << 10);
        for (at, value) in flips {
            bytes[at.index(header)] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        load(bytes);
    }

    #[test]
    fn any_text_tokenizes_and_decodes(text in ".{0,300}", special in any::<bool>()) {
        let f = GgufFile::from_vec(tiny_gguf().to_vec()).unwrap();
        let t = Tokenizer::from_gguf(&f).unwrap();
        let ids = t.encode(&text, true, special);
        let _ = t.decode(&ids, false);
        let marked = t.encode_marked(&text, '\u{E000}', '\u{E001}');
        prop_assert!(marked.iter().all(|&id| (id as usize) < t.vocab_size()));
    }
}
