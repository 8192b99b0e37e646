//! The roofline step time of a model on a device: a step takes the longer of its arithmetic at
//! the device's (efficiency-scaled) peak and its memory traffic at the (efficiency-scaled)
//! bandwidth, plus a fixed overhead. The step is the engine's own description of one
//! ([`StepShape`]: prompt tokens, decoding sequences, positions attended), so the simulator can
//! put this model where the engine's measured step-time model stands.
//!
//! Arithmetic: every token of the step multiplies the layers' weights (2 FLOPs a weight), each
//! sampled token the output head too, and attention costs 4 FLOPs per attended position per
//! unit of attention width (scores and the weighted sum of values). Traffic: the layers' and
//! head's weights once per step, the K and V of every attended position, and the K and V the
//! step writes. Norms, activations and sampling are left out (small beside these).

use serrano_engine::model::ModelConfig;
use serrano_engine::steptime::StepShape;

use crate::catalog::{Device, ModelSpec};

/// Bytes of one cached K or V element (the engine keeps f16).
const KV_ELEMENT_BYTES: f64 = 2.0;

/// How weights are stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 2 bytes a weight, BF16 tensor throughput.
    Bf16,
    /// 1 byte a weight, INT8 tensor throughput.
    Int8,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "bf16" => Some(Precision::Bf16),
            "int8" => Some(Precision::Int8),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }

    pub fn weight_bytes(self) -> f64 {
        match self {
            Precision::Bf16 => 2.0,
            Precision::Int8 => 1.0,
        }
    }

    /// The device's dense peak at this precision, operations per second.
    pub fn peak(self, d: &Device) -> f64 {
        match self {
            Precision::Bf16 => d.bf16_tflops * 1e12,
            Precision::Int8 => d.int8_tops * 1e12,
        }
    }
}

/// What the roofline needs of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Weights each token multiplies through the layers (attention and MLP projections).
    pub layer_params: f64,
    /// The output head (vocabulary x width), multiplied for sampled tokens only.
    pub head_params: f64,
    /// Every stored parameter: layers, norms, the embedding (once when the head shares it).
    pub total_params: f64,
    pub n_layers: usize,
    /// Query heads x head dimension.
    pub attn_width: usize,
    /// K and V bytes one position adds to the cache, over all layers.
    pub kv_bytes_per_token: f64,
}

impl ModelShape {
    /// The shape of a Llama-family model (grouped-query attention, gated MLP, output head
    /// tied to the embedding unless `untied_head`).
    pub fn from_config(c: &ModelConfig, untied_head: bool) -> ModelShape {
        ModelShape::from_spec(&ModelSpec {
            name: c.architecture.clone(),
            source: "its GGUF".into(),
            n_layers: c.n_layers,
            d_model: c.d_model,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            d_ff: c.d_ff,
            vocab_size: c.vocab_size,
            tied_head: !untied_head,
        })
    }

    /// The shape of a catalog model (its published dimensions, no weights needed).
    pub fn from_spec(c: &ModelSpec) -> ModelShape {
        let (d, q, kv) = (
            c.d_model as f64,
            (c.n_heads * c.head_dim) as f64,
            (c.n_kv_heads * c.head_dim) as f64,
        );
        let per_layer = d * q + 2.0 * d * kv + q * d + 3.0 * d * c.d_ff as f64;
        let layer_params = per_layer * c.n_layers as f64;
        let head_params = d * c.vocab_size as f64;
        let norms = d * (2 * c.n_layers + 1) as f64;
        let embeddings = if c.tied_head { 1.0 } else { 2.0 } * head_params;
        ModelShape {
            layer_params,
            head_params,
            total_params: layer_params + norms + embeddings,
            n_layers: c.n_layers,
            attn_width: c.n_heads * c.head_dim,
            kv_bytes_per_token: 2.0 * (c.n_layers as f64) * kv * KV_ELEMENT_BYTES,
        }
    }

    /// Bytes of weights stored at `p`.
    pub fn weight_bytes(&self, p: Precision) -> f64 {
        self.total_params * p.weight_bytes()
    }

    /// Positions the device's memory holds for the KV cache once the weights are loaded
    /// (`None` when the weights alone do not fit).
    pub fn kv_capacity_tokens(&self, d: &Device, p: Precision) -> Option<f64> {
        let free = d.memory_gb * 1e9 - self.weight_bytes(p);
        (free > 0.0).then(|| free / self.kv_bytes_per_token)
    }
}

/// A step's modelled time and what bounds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTime {
    pub compute_s: f64,
    pub memory_s: f64,
    /// The longer of the two, plus the device's step overhead.
    pub seconds: f64,
    /// Whether the arithmetic (not the memory traffic) is the longer.
    pub compute_bound: bool,
}

/// The roofline time of one step holding `s`, with `sampled` of its tokens sampled (each
/// decode, and each prompt whose last chunk is in the step).
pub fn step_time(
    d: &Device,
    m: &ModelShape,
    p: Precision,
    s: StepShape,
    sampled: usize,
) -> StepTime {
    let tokens = (s.prefill_tokens + s.decode_seqs) as f64;
    let flops = 2.0 * m.layer_params * tokens
        + 2.0 * m.head_params * sampled as f64
        + 4.0 * (m.n_layers * m.attn_width) as f64 * s.kv_tokens as f64;
    let bytes = (m.layer_params + m.head_params) * p.weight_bytes()
        + m.kv_bytes_per_token * (s.kv_tokens as f64 + tokens);
    let compute_s = flops / (p.peak(d) * d.compute_efficiency);
    let memory_s = bytes / (d.memory_gbs * 1e9 * d.memory_efficiency);
    StepTime {
        compute_s,
        memory_s,
        seconds: compute_s.max(memory_s) + d.step_overhead_us * 1e-6,
        compute_bound: compute_s > memory_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 TFLOP/s BF16, 1 TB/s, no losses: the hand-computed cases below.
    fn device() -> Device {
        Device {
            name: "toy".into(),
            source: "test".into(),
            bf16_tflops: 100.0,
            int8_tops: 200.0,
            memory_gbs: 1000.0,
            memory_gb: 10.0,
            interconnect_gbs: 1.0,
            power_w: 1.0,
            price_per_hour: 1.0,
            compute_efficiency: 1.0,
            memory_efficiency: 1.0,
            step_overhead_us: 0.0,
        }
    }

    /// A billion weights, nothing else.
    fn model() -> ModelShape {
        ModelShape {
            layer_params: 1e9,
            head_params: 0.0,
            total_params: 1e9,
            n_layers: 1,
            attn_width: 0,
            kv_bytes_per_token: 0.0,
        }
    }

    fn shape(prefill_tokens: usize, decode_seqs: usize, kv_tokens: usize) -> StepShape {
        StepShape {
            prefill_tokens,
            decode_seqs,
            kv_tokens,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
    }

    #[test]
    fn one_decode_reads_the_weights_and_a_long_prompt_is_arithmetic() {
        let (d, m) = (device(), model());
        // 2 GB of BF16 weights at 1 TB/s: 2 ms; 2 GFLOP at 100 TFLOP/s: 20 us.
        let t = step_time(&d, &m, Precision::Bf16, shape(0, 1, 0), 1);
        assert!(close(t.memory_s, 2e-3) && close(t.compute_s, 2e-5), "{t:?}");
        assert!(close(t.seconds, 2e-3) && !t.compute_bound);
        // 1,000 prompt tokens: 2 TFLOP, 20 ms, against the same 2 ms of weights.
        let t = step_time(&d, &m, Precision::Bf16, shape(1000, 0, 0), 1);
        assert!(close(t.compute_s, 2e-2) && t.compute_bound, "{t:?}");
        // The ridge: peak / bandwidth x bytes per weight / 2 = 100 tokens.
        let t = step_time(&d, &m, Precision::Bf16, shape(100, 0, 0), 1);
        assert!(close(t.compute_s, t.memory_s), "{t:?}");
        // INT8: half the bytes, twice the peak.
        let t = step_time(&d, &m, Precision::Int8, shape(0, 1, 0), 1);
        assert!(close(t.memory_s, 1e-3) && close(t.compute_s, 1e-5), "{t:?}");
    }

    #[test]
    fn attention_and_the_kv_cache_and_overhead_add_their_share() {
        let mut d = device();
        d.step_overhead_us = 50.0;
        d.memory_efficiency = 0.5;
        let m = ModelShape {
            n_layers: 10,
            attn_width: 1000,
            kv_bytes_per_token: 1e5,
            head_params: 1e8,
            ..model()
        };
        // 4 decodes attending 1,000 positions each.
        let t = step_time(&d, &m, Precision::Bf16, shape(0, 4, 4000), 4);
        let flops = 2.0 * 1e9 * 4.0 + 2.0 * 1e8 * 4.0 + 4.0 * 10.0 * 1000.0 * 4000.0;
        let bytes = 1.1e9 * 2.0 + 1e5 * (4000.0 + 4.0);
        assert!(close(t.compute_s, flops / 1e14), "{t:?}");
        assert!(close(t.memory_s, bytes / 5e11), "{t:?}");
        assert!(close(t.seconds, t.memory_s + 50e-6));
    }

    #[test]
    fn the_default_model_has_its_published_parameter_count() {
        // SmolLM2-135M, the head tied to the embedding.
        let c = serrano_engine::testing::smollm2_135m_config();
        let m = ModelShape::from_config(&c, false);
        assert_eq!(m.total_params, 134_515_008.0);
        // K and V: 2 x 30 layers x 192 x 2 bytes.
        assert_eq!(m.kv_bytes_per_token, 23_040.0);
        let h100 = crate::Catalog::builtin()
            .unwrap()
            .device("h100-sxm")
            .unwrap()
            .clone();
        let cap = m.kv_capacity_tokens(&h100, Precision::Bf16).unwrap();
        assert!(cap > 3e6, "{cap}");
    }

    /// The catalog's model shapes count the parameters their published configs do: the
    /// default model's as its GGUF gives them, Llama 3.1 8B's 8,030,261,248.
    #[test]
    fn catalog_models_count_their_published_parameters() {
        let c = crate::Catalog::builtin().unwrap();
        let shape = |n: &str| ModelShape::from_spec(c.model(n).unwrap());
        assert_eq!(shape("smollm2-135m").total_params, 134_515_008.0);
        let m = shape("llama-3.1-8b");
        assert_eq!(m.total_params, 8_030_261_248.0);
        // K and V: 2 x 32 layers x 8 heads x 128 x 2 bytes.
        assert_eq!(m.kv_bytes_per_token, 131_072.0);
        assert!(shape("llama-3.1-70b").total_params > 70e9);
        let e = c.model("gpt-5").unwrap_err().to_string();
        assert!(e.contains("llama-3.1-8b"), "{e}");
    }
}
