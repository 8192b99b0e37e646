use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file: {0}")]
    Format(String),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    Version(u32),
    #[error("unsupported tensor type {type_name} (id {type_id}) for tensor '{tensor}'; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K")]
    UnsupportedType {
        tensor: String,
        type_id: u32,
        type_name: String,
    },
    #[error("unsupported model architecture '{0}'; supported: llama, mistral, qwen2")]
    UnsupportedArchitecture(String),
    #[error("missing GGUF metadata key '{0}'")]
    MissingKey(String),
    #[error("GGUF metadata key '{key}' has the wrong type: expected {expected}")]
    KeyType { key: String, expected: &'static str },
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {want:?}")]
    TensorShape {
        name: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("cannot allocate memory for repacked weights: {0}")]
    Alloc(std::io::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
