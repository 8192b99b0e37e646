//! A tiny random-weight Llama GGUF, written on the fly, for fast tests that need no download.
//! Its byte-level tokenizer round-trips any text; its outputs are deterministic noise.

use crate::gguf::{GgufWriter, Value};
use crate::quant::{quantize_row, DType};

pub const TINY_VOCAB_MERGES: &[&str] = &[
    "h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "Ġwo r", "l d", "Ġwor ld", "Ġ t", "Ġt he",
];

/// Shape of the tiny model; the defaults keep a forward step well under a millisecond.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub n_layers: u32,
    pub d_model: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub d_ff: u32,
    pub context_length: u32,
    pub seed: u64,
    pub weight_type: DType,
    /// `llama` or `qwen2` (which adds Q/K/V biases and rotates halves).
    pub architecture: &'static str,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            n_layers: 2,
            d_model: 64,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 128,
            context_length: 256,
            seed: 1,
            weight_type: DType::Q4_1,
            architecture: "llama",
        }
    }
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The default model's shape (SmolLM2-135M): 30 layers of width 576, 9 query heads and 3 KV
/// heads of 64, MLP 1,536, a 49,152-token vocabulary; for tests of arithmetic on that shape.
pub fn smollm2_135m_config() -> crate::model::ModelConfig {
    crate::model::ModelConfig {
        architecture: "llama".into(),
        n_layers: 30,
        d_model: 576,
        d_ff: 1536,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        context_length: 8192,
        rms_eps: 1e-5,
        rope_base: 100000.0,
        rope_dims: 64,
        rope_style: crate::ops::RopeStyle::Adjacent,
        rope_pos_scale: 1.0,
    }
}

/// Deterministic values in [-1, 1), for kernel tests against their references.
pub fn random_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Lcg(seed);
    (0..n).map(|_| rng.next()).collect()
}

/// A row of `n` weights of `dtype`: quantized from random values where a reference quantizer
/// exists; for k-quants (which have none here), random bytes with small scales, every byte
/// pattern being a valid block.
pub fn random_quant_row(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
    let scales: &[usize] = match dtype {
        DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q6_K => &[208],
        _ => return quantize_row(dtype, &random_vec(n, seed)),
    };
    let mut w: Vec<u8> = random_vec(dtype.row_bytes(n), seed)
        .iter()
        .map(|v| (v.abs() * 255.0) as u8)
        .collect();
    for b in w.chunks_exact_mut(dtype.block_bytes()) {
        for &at in scales {
            let d = half::f16::from_f32(0.001 + 0.01 * (b[100 + at / 2] as f32 / 255.0));
            b[at..at + 2].copy_from_slice(&d.to_le_bytes());
        }
    }
    w
}

impl TinyModel {
    pub fn gguf_bytes(&self) -> Vec<u8> {
        let mut tokens: Vec<String> = Vec::new();
        let mut n = 0u32;
        for b in 0..256u32 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                char::from_u32(b)
            } else {
                n += 1;
                char::from_u32(255 + n)
            };
            tokens.push(c.map(String::from).unwrap_or_default());
        }
        let mut types = vec![1u32; 256];
        for m in TINY_VOCAB_MERGES {
            tokens.push(m.replace(' ', ""));
            types.push(1);
        }
        for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
            tokens.push(s.into());
            types.push(3);
        }
        let vocab = tokens.len() as u64;
        let eos = vocab - 1;
        let (d, ff) = (self.d_model as u64, self.d_ff as u64);
        let hd = d / self.n_heads as u64;
        let kvw = hd * self.n_kv_heads as u64;
        let mut rng = Lcg(self.seed);
        let mut mat = |rows: u64, cols: u64, dt: DType, scale: f32| -> Vec<u8> {
            (0..rows)
                .flat_map(|_| {
                    quantize_row(
                        dt,
                        &(0..cols).map(|_| rng.next() * scale).collect::<Vec<_>>(),
                    )
                })
                .collect()
        };
        let mut w = GgufWriter::new();
        let s = |v: &str| Value::String(v.into());
        let arch = self.architecture;
        let k = |key: &str| format!("{arch}.{key}");
        w.meta("general.architecture", s(arch))
            .meta("general.name", s("tiny-random"))
            .meta(&k("block_count"), Value::U32(self.n_layers))
            .meta(&k("context_length"), Value::U32(self.context_length))
            .meta(&k("embedding_length"), Value::U32(self.d_model))
            .meta(&k("feed_forward_length"), Value::U32(self.d_ff))
            .meta(&k("attention.head_count"), Value::U32(self.n_heads))
            .meta(&k("attention.head_count_kv"), Value::U32(self.n_kv_heads))
            .meta(&k("rope.freq_base"), Value::F32(10000.0))
            .meta(&k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5))
            .meta("tokenizer.ggml.model", s("gpt2"))
            .meta("tokenizer.ggml.pre", s("smollm"))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            )
            .meta(
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::U32).collect()),
            )
            .meta(
                "tokenizer.ggml.merges",
                Value::Array(TINY_VOCAB_MERGES.iter().map(|m| s(m)).collect()),
            )
            .meta("tokenizer.ggml.bos_token_id", Value::U32(eos as u32 - 1))
            .meta("tokenizer.ggml.eos_token_id", Value::U32(eos as u32))
            .meta("tokenizer.ggml.add_bos_token", Value::Bool(false))
            .meta("tokenizer.chat_template", s(crate::chat::CHATML_TEMPLATE));
        let ones = |n: u64| quantize_row(DType::F32, &vec![1.0; n as usize]);
        w.tensor(
            "token_embd.weight",
            &[d, vocab],
            DType::Q8_0,
            mat(vocab, d, DType::Q8_0, 1.0),
        );
        w.tensor("output_norm.weight", &[d], DType::F32, ones(d));
        let wt = self.weight_type;
        for i in 0..self.n_layers {
            let n = |x: &str| format!("blk.{i}.{x}");
            w.tensor(&n("attn_norm.weight"), &[d], DType::F32, ones(d));
            w.tensor(&n("ffn_norm.weight"), &[d], DType::F32, ones(d));
            w.tensor(&n("attn_q.weight"), &[d, d], wt, mat(d, d, wt, 0.3));
            w.tensor(&n("attn_k.weight"), &[d, kvw], wt, mat(kvw, d, wt, 0.3));
            w.tensor(&n("attn_v.weight"), &[d, kvw], wt, mat(kvw, d, wt, 0.3));
            w.tensor(&n("attn_output.weight"), &[d, d], wt, mat(d, d, wt, 0.3));
            w.tensor(&n("ffn_gate.weight"), &[d, ff], wt, mat(ff, d, wt, 0.3));
            w.tensor(&n("ffn_up.weight"), &[d, ff], wt, mat(ff, d, wt, 0.3));
            w.tensor(&n("ffn_down.weight"), &[ff, d], wt, mat(d, ff, wt, 0.3));
            if arch == "qwen2" {
                w.tensor(
                    &n("attn_q.bias"),
                    &[d],
                    DType::F32,
                    mat(1, d, DType::F32, 0.1),
                );
                w.tensor(
                    &n("attn_k.bias"),
                    &[kvw],
                    DType::F32,
                    mat(1, kvw, DType::F32, 0.1),
                );
                w.tensor(
                    &n("attn_v.bias"),
                    &[kvw],
                    DType::F32,
                    mat(1, kvw, DType::F32, 0.1),
                );
            }
        }
        w.to_bytes()
    }

    /// Writes the model to `path` (for tests that start the server binary).
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        std::fs::write(path, self.gguf_bytes())
    }
}
