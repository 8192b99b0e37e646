//! Llama-family transformer: configuration from GGUF metadata, weights, and the batched forward
//! pass over sequences at different positions.

use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::ops::{self, matmul, rmsnorm, QMatrix, Rope, RopeStyle};
use crate::quant::dequantize_row;

/// Element-wise work below this size runs on the calling thread (a fork-join costs more).
const PAR_MIN_ELEMS: usize = 1 << 14;

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub rope_dims: usize,
    pub rope_style: RopeStyle,
    pub rope_pos_scale: f32,
}

impl ModelConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig> {
        let arch = f.get_str("general.architecture")?.to_string();
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Adjacent,
            "qwen2" => RopeStyle::Neox,
            _ => return Err(EngineError::UnsupportedArchitecture(arch)),
        };
        let k = |s: &str| format!("{arch}.{s}");
        let u = |s: &str| f.get_u64(&k(s)).map(|v| v as usize);
        let d_model = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || d_model % n_heads != 0 {
            return Err(EngineError::Invalid(format!(
                "{n_heads} heads / {n_kv_heads} KV heads do not divide a {d_model}-wide model"
            )));
        }
        let head_dim = u("attention.key_length").unwrap_or(d_model / n_heads);
        let rope_dims = u("rope.dimension_count").unwrap_or(head_dim);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(EngineError::Invalid(format!(
                "rope dimension {rope_dims} does not fit head dimension {head_dim}"
            )));
        }
        let rope_pos_scale = match f.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => 1.0,
            Some("linear") => {
                1.0 / f.get_f64(&k("rope.scaling.factor")).unwrap_or(1.0).max(1.0) as f32
            }
            Some(other) => {
                return Err(EngineError::Invalid(format!(
                    "rope scaling '{other}' is not supported; supported: none, linear"
                )))
            }
        };
        let vocab_size = match f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(t) => t.len(),
            None => u("vocab_size")?,
        };
        Ok(ModelConfig {
            n_layers: u("block_count")?,
            d_ff: u("feed_forward_length")?,
            context_length: u("context_length")?,
            rms_eps: f
                .get_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            rope_base: f.get_f64(&k("rope.freq_base")).unwrap_or(10000.0) as f32,
            architecture: arch,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rope_dims,
            rope_style,
            rope_pos_scale,
        })
    }

    /// Width of one position's K (or V) across KV heads.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
}

pub struct Model {
    pub config: ModelConfig,
    token_embd: QMatrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: QMatrix,
    rope: Rope,
    weight_bytes: usize,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Which logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    /// The last new token's (next-token prediction).
    Last,
    /// Every new token's (prompt log-probabilities).
    All,
}

/// One sequence's share of a forward step: `tokens` go at positions `start..`, and its KV is
/// sequence `i` of the step's [`KvCache`] when this is the step's `i`-th entry.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub logits: LogitsWanted,
}

/// The KV cache as one forward step sees it, sequences numbered by their place in the step.
/// Positions are written in order before they are read; the paged pool implements it.
pub trait KvCache: Sync {
    /// Stores `k` and `v` (each `n_kv_heads * head_dim`) of `seq` for `layer` at `pos`.
    fn write(&mut self, seq: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]);
    /// Positions per block.
    fn block_tokens(&self) -> usize;
    /// The keys (or values) of `seq` at `layer` for the positions of its `i`-th block, as f16
    /// bits: `block_tokens()` rows of `n_kv_heads * head_dim`, row `j` being position
    /// `i * block_tokens() + j` (rows past the sequence's length hold stale data).
    fn block(&self, seq: usize, layer: usize, value: bool, i: usize) -> &[u16];
}

fn tensor<'a>(f: &'a GgufFile, name: &str) -> Result<&'a TensorInfo> {
    f.tensors
        .get(name)
        .ok_or_else(|| EngineError::MissingTensor(name.into()))
}

fn matrix(f: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
    let t = tensor(f, name)?;
    if t.dims != [cols as u64, rows as u64] {
        return Err(EngineError::TensorShape {
            name: name.into(),
            got: t.dims.clone(),
            want: vec![cols as u64, rows as u64],
        });
    }
    Ok(QMatrix::new(t.dtype, rows, cols, f.bytes.clone(), t.offset))
}

fn vector(f: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>> {
    let t = tensor(f, name)?;
    if t.n_elements() != n as u64 {
        return Err(EngineError::TensorShape {
            name: name.into(),
            got: t.dims.clone(),
            want: vec![n as u64],
        });
    }
    let mut out = vec![0f32; n];
    dequantize_row(t.dtype, f.tensor_bytes(t), &mut out);
    Ok(out)
}

fn optional_vector(f: &GgufFile, name: &str, n: usize) -> Result<Option<Vec<f32>>> {
    if f.tensors.contains_key(name) {
        vector(f, name, n).map(Some)
    } else {
        Ok(None)
    }
}

impl Model {
    pub fn load(f: &GgufFile) -> Result<Model> {
        let c = ModelConfig::from_gguf(f)?;
        let (d, q_width, kv_width) = (c.d_model, c.n_heads * c.head_dim, c.kv_width());
        let mut token_embd = matrix(f, "token_embd.weight", c.vocab_size, d)?;
        let mut output = if f.tensors.contains_key("output.weight") {
            Some(matrix(f, "output.weight", c.vocab_size, d)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: vector(f, &n("attn_norm.weight"), d)?,
                wq: matrix(f, &n("attn_q.weight"), q_width, d)?,
                wk: matrix(f, &n("attn_k.weight"), kv_width, d)?,
                wv: matrix(f, &n("attn_v.weight"), kv_width, d)?,
                wo: matrix(f, &n("attn_output.weight"), d, q_width)?,
                bq: optional_vector(f, &n("attn_q.bias"), q_width)?,
                bk: optional_vector(f, &n("attn_k.bias"), kv_width)?,
                bv: optional_vector(f, &n("attn_v.bias"), kv_width)?,
                ffn_norm: vector(f, &n("ffn_norm.weight"), d)?,
                w_gate: matrix(f, &n("ffn_gate.weight"), c.d_ff, d)?,
                w_up: matrix(f, &n("ffn_up.weight"), c.d_ff, d)?,
                w_down: matrix(f, &n("ffn_down.weight"), d, c.d_ff)?,
            });
        }
        let mut all: Vec<&mut QMatrix> = vec![&mut token_embd];
        all.extend(output.as_mut());
        for l in &mut layers {
            all.extend([
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ]);
        }
        ops::pack_all(&mut all).map_err(EngineError::Alloc)?;
        let output = output.unwrap_or_else(|| token_embd.clone());
        let freq_factors = optional_vector(f, "rope_freqs.weight", c.rope_dims / 2)?;
        let rope = Rope::new(
            c.rope_style,
            c.rope_dims,
            c.rope_base,
            freq_factors.as_deref(),
            c.rope_pos_scale,
        );
        let tied = !f.tensors.contains_key("output.weight");
        let weight_bytes = token_embd.bytes_total()
            + if tied { 0 } else { output.bytes_total() }
            + layers
                .iter()
                .map(|l| {
                    [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                        .iter()
                        .map(|m| m.bytes_total())
                        .sum::<usize>()
                })
                .sum::<usize>();
        Ok(Model {
            output_norm: vector(f, "output_norm.weight", d)?,
            config: c,
            token_embd,
            layers,
            output,
            rope,
            weight_bytes,
        })
    }

    /// Bytes of weights read per decode step (the memory-bandwidth floor of one token).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Runs one step over all sequences' new tokens and returns, per sequence, the logits it asked
    /// for (`rows * vocab` values). Weights are read once for the whole batch; attention runs per
    /// sequence over its own cache.
    pub fn forward(&self, kv: &mut dyn KvCache, seqs: &[SeqStep<'_>]) -> Result<Vec<Vec<f32>>> {
        ops::with_scratch(&BUFFERS, |b| {
            let out = self.forward_in(kv, seqs, b);
            // A step with logits for every prompt token (echo) can need tens of MiB: keep
            // what decode steps reuse, not that, on every thread that ever ran a step.
            if b.bytes() > RETAIN_BUFFER_BYTES {
                *b = Buffers::default();
            }
            out
        })
    }

    fn forward_in(
        &self,
        kv: &mut dyn KvCache,
        seqs: &[SeqStep<'_>],
        buffers: &mut Buffers,
    ) -> Result<Vec<Vec<f32>>> {
        let Buffers {
            seq_of,
            pos_of,
            ids,
            x,
            h,
            q,
            k,
            v,
            att,
            o,
            g,
            up,
            rows,
            sel,
            logits,
        } = buffers;
        seq_of.clear();
        pos_of.clear();
        ids.clear();
        let c = &self.config;
        let (d, hd, nh, nkv) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads);
        let (qw, kvw) = (nh * hd, c.kv_width());
        // Flatten: token t belongs to sequence seq_of[t] at position pos_of[t].
        for (s, step) in seqs.iter().enumerate() {
            let start = step.start;
            if start + step.tokens.len() > c.context_length {
                return Err(EngineError::Invalid(format!(
                    "sequence of {} tokens exceeds the context length {}",
                    start + step.tokens.len(),
                    c.context_length
                )));
            }
            for (i, &t) in step.tokens.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(EngineError::Invalid(format!(
                        "token id {t} is outside the vocabulary ({})",
                        c.vocab_size
                    )));
                }
                seq_of.push(s);
                pos_of.push(start + i);
                ids.push(t);
            }
        }
        let n = ids.len();
        let x = sized(x, n * d);
        for (t, &id) in ids.iter().enumerate() {
            self.token_embd
                .dequantize_row_into(id as usize, &mut x[t * d..(t + 1) * d]);
        }
        let h = sized(h, n * d);
        let q = sized(q, n * qw);
        let k = sized(k, n * kvw);
        let v = sized(v, n * kvw);
        let att = sized(att, n * qw);
        let o = sized(o, n * d);
        let g = sized(g, n * c.d_ff);
        let up = sized(up, n * c.d_ff);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        for (li, layer) in self.layers.iter().enumerate() {
            rmsnorm(x, &layer.attn_norm, c.rms_eps, h);
            ops::matmul_many(
                &[&layer.wq, &layer.wk, &layer.wv],
                h,
                n,
                &mut [&mut *q, &mut *k, &mut *v],
            );
            add_bias(q, layer.bq.as_deref());
            add_bias(k, layer.bk.as_deref());
            add_bias(v, layer.bv.as_deref());
            for t in 0..n {
                for head in q[t * qw..(t + 1) * qw].chunks_exact_mut(hd) {
                    self.rope.apply(head, pos_of[t]);
                }
                for head in k[t * kvw..(t + 1) * kvw].chunks_exact_mut(hd) {
                    self.rope.apply(head, pos_of[t]);
                }
                kv.write(
                    seq_of[t],
                    li,
                    pos_of[t],
                    &k[t * kvw..(t + 1) * kvw],
                    &v[t * kvw..(t + 1) * kvw],
                );
            }
            // Causal attention: token t attends to its own sequence's positions 0..=pos_of[t].
            // One task per (token, KV head) serves the query heads of its group, so each cached
            // key and value is read once per task.
            let kv_ro: &dyn KvCache = kv;
            att.par_chunks_mut(group * hd)
                .enumerate()
                .for_each(|(i, out)| {
                    let (t, kvh) = (i / nkv, i % nkv);
                    let qg = &q[t * qw + kvh * group * hd..t * qw + (kvh + 1) * group * hd];
                    let task = Attend {
                        kv: kv_ro,
                        seq: seq_of[t],
                        layer: li,
                        n_pos: pos_of[t] + 1,
                        kv_head: kvh,
                        head_dim: hd,
                        scale,
                    };
                    attend(&task, qg, out);
                });
            matmul(&layer.wo, att, n, o);
            x.iter_mut().zip(&*o).for_each(|(a, b)| *a += b);
            rmsnorm(x, &layer.ffn_norm, c.rms_eps, h);
            ops::matmul_many(
                &[&layer.w_gate, &layer.w_up],
                h,
                n,
                &mut [&mut *g, &mut *up],
            );
            // A fork-join costs more than a decode step's few thousand multiplies.
            if g.len() >= PAR_MIN_ELEMS {
                g.par_iter_mut()
                    .zip(&*up)
                    .for_each(|(a, b)| *a = ops::silu(*a) * b);
            } else {
                g.iter_mut()
                    .zip(&*up)
                    .for_each(|(a, b)| *a = ops::silu(*a) * b);
            }
            matmul(&layer.w_down, g, n, o);
            x.iter_mut().zip(&*o).for_each(|(a, b)| *a += b);
        }
        // Only the rows someone asked for go through the (large) output head.
        rows.clear();
        let mut t0 = 0;
        for s in seqs.iter() {
            let len = s.tokens.len();
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last if len > 0 => rows.push(t0 + len - 1),
                LogitsWanted::Last => {}
                LogitsWanted::All => rows.extend(t0..t0 + len),
            }
            t0 += len;
        }
        let sel = sized(sel, rows.len() * d);
        for (i, &r) in rows.iter().enumerate() {
            rmsnorm(
                &x[r * d..(r + 1) * d],
                &self.output_norm,
                c.rms_eps,
                &mut sel[i * d..(i + 1) * d],
            );
        }
        let logits = sized(logits, rows.len() * c.vocab_size);
        if !rows.is_empty() {
            matmul(&self.output, sel, rows.len(), logits);
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for s in seqs {
            let k = match s.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => usize::from(!s.tokens.is_empty()),
                LogitsWanted::All => s.tokens.len(),
            };
            out.push(logits[at * c.vocab_size..(at + k) * c.vocab_size].to_vec());
            at += k;
        }
        Ok(out)
    }
}

/// The forward pass's working memory, kept per thread between steps so a decode step does
/// not allocate it again (the logits it returns are the caller's).
#[derive(Default)]
struct Buffers {
    seq_of: Vec<usize>,
    pos_of: Vec<usize>,
    ids: Vec<u32>,
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    up: Vec<f32>,
    rows: Vec<usize>,
    sel: Vec<f32>,
    logits: Vec<f32>,
}

impl Buffers {
    fn bytes(&self) -> usize {
        let f = [
            &self.x,
            &self.h,
            &self.q,
            &self.k,
            &self.v,
            &self.att,
            &self.o,
            &self.g,
            &self.up,
            &self.sel,
            &self.logits,
        ];
        f.iter().map(|v| v.capacity() * 4).sum::<usize>()
            + (self.seq_of.capacity() + self.pos_of.capacity() + self.rows.capacity()) * 8
            + self.ids.capacity() * 4
    }
}

/// Most working memory a thread keeps between forward passes.
const RETAIN_BUFFER_BYTES: usize = 64 << 20;

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = Default::default();
}

/// `v` as `n` zeros, keeping its allocation.
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.clear();
    v.resize(n, 0.0);
    v
}

/// One (token, KV head) attention task: the query heads of the group attend to positions
/// `0..n_pos` of the sequence.
struct Attend<'a> {
    kv: &'a dyn KvCache,
    seq: usize,
    layer: usize,
    n_pos: usize,
    kv_head: usize,
    head_dim: usize,
    scale: f32,
}

/// Dispatches to the F16C/AVX2 build where the CPU has it; both do the same arithmetic (the
/// same products and sums in the same order, no fused multiply-add), so they agree bit for bit.
fn attend(task: &Attend<'_>, q: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: AVX2 and F16C were detected just above.
            unsafe { attend_avx2(task, q, out) };
            return;
        }
    }
    attend_with(
        task,
        q,
        out,
        attn_kernels::dots,
        attn_kernels::softmax,
        attn_kernels::axpys,
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn attend_avx2(task: &Attend<'_>, q: &[f32], out: &mut [f32]) {
    attend_with(
        task,
        q,
        out,
        |q, rows, out| unsafe { attn_kernels::dots_avx2(q, rows, out) },
        |x| unsafe { attn_kernels::softmax_avx2(x) },
        |o, w, rows| unsafe { attn_kernels::axpys_avx2(o, w, rows) },
    );
}

/// Attention of one KV head's query group over the cached positions, read a block at a time
/// straight from the f16 cache (no per-position call or conversion buffer).
#[inline(always)]
fn attend_with(
    task: &Attend<'_>,
    q: &[f32],
    out: &mut [f32],
    dots: impl Fn(&[f32], attn_kernels::Rows<'_>, &mut [f32]),
    softmax: impl Fn(&mut [f32]),
    axpys: impl Fn(&mut [f32], &[f32], attn_kernels::Rows<'_>),
) {
    let (hd, n_pos) = (task.head_dim, task.n_pos);
    let group = q.len() / hd;
    let bt = task.kv.block_tokens();
    let rows = |value: bool, b: usize| {
        let data = task.kv.block(task.seq, task.layer, value, b);
        attn_kernels::Rows {
            data,
            width: data.len() / bt,
            at: task.kv_head * hd,
            len: hd,
            n: bt.min(n_pos - b * bt),
        }
    };
    let n_blocks = n_pos.div_ceil(bt);
    ops::with_scratch(&SCORES, |scores| {
        scores.clear();
        scores.resize(group * n_pos, 0.0);
        for b in 0..n_blocks {
            let keys = rows(false, b);
            for (qh, s) in q.chunks_exact(hd).zip(scores.chunks_exact_mut(n_pos)) {
                let s = &mut s[b * bt..b * bt + keys.n];
                dots(qh, keys, s);
                s.iter_mut().for_each(|v| *v *= task.scale);
            }
        }
        for s in scores.chunks_exact_mut(n_pos) {
            softmax(s);
        }
        out.fill(0.0);
        for b in 0..n_blocks {
            let values = rows(true, b);
            for (o, s) in out.chunks_exact_mut(hd).zip(scores.chunks_exact(n_pos)) {
                axpys(o, &s[b * bt..b * bt + values.n], values);
            }
        }
    });
}

thread_local! {
    /// Attention scores, reused across tasks so a decode step allocates none.
    static SCORES: std::cell::RefCell<Vec<f32>> = Default::default();
}

/// Attention's kernels: dot products and scaled sums of f32 vectors with rows of the f16
/// cache, and the softmax between them. Each dot sums eight lanes of products, then the lanes
/// pairwise (`((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`, the order `vhaddps` gives four rows at
/// once), then the tail; sums of rows go row by row; the softmax sums its exponentials the
/// same way. The portable code is the reference and the AVX2 build agrees with it bit for bit
/// (no FMA, the same exponential polynomial).
mod attn_kernels {
    use half::f16;

    /// Rows `0..n` of one head in a cache block: row `j` is `data[j * width + at..][..len]`.
    #[derive(Debug, Clone, Copy)]
    pub struct Rows<'a> {
        pub data: &'a [u16],
        pub width: usize,
        pub at: usize,
        pub len: usize,
        pub n: usize,
    }

    impl<'a> Rows<'a> {
        #[inline(always)]
        pub fn row(&self, j: usize) -> &'a [u16] {
            let start = j * self.width + self.at;
            &self.data[start..start + self.len]
        }
    }

    #[inline(always)]
    fn f32_of(b: u16) -> f32 {
        f16::from_bits(b).to_f32()
    }

    #[inline(always)]
    fn sum_lanes(l: [f32; 8]) -> f32 {
        ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
    }

    pub fn dot(a: &[f32], b: &[u16]) -> f32 {
        debug_assert_eq!(a.len(), b.len());
        let mut acc = [0f32; 8];
        let n8 = a.len() / 8 * 8;
        for (x, y) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
            for i in 0..8 {
                acc[i] += x[i] * f32_of(y[i]);
            }
        }
        let mut s = sum_lanes(acc);
        for (x, y) in a[n8..].iter().zip(&b[n8..]) {
            s += x * f32_of(*y);
        }
        s
    }

    /// `out[j] = dot(q, rows.row(j))`.
    pub fn dots(q: &[f32], rows: Rows<'_>, out: &mut [f32]) {
        for (j, o) in out[..rows.n].iter_mut().enumerate() {
            *o = dot(q, rows.row(j));
        }
    }

    /// `o += w[j] * rows.row(j)` for each row in order.
    pub fn axpys(o: &mut [f32], w: &[f32], rows: Rows<'_>) {
        for (j, &wj) in w[..rows.n].iter().enumerate() {
            for (a, y) in o.iter_mut().zip(rows.row(j)) {
                *a += wj * f32_of(*y);
            }
        }
    }

    // Cephes' single-precision exponential: e^x = 2^n * e^r with n = round(x / ln 2) and
    // |r| <= ln 2 / 2, e^r by a degree-7 polynomial; within 2 ulp of the true value. Written by
    // hand, as llama.cpp's softmax does, because libm's expf is a call per element that cannot
    // vectorize, and it was a fifth of attention's time.
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    /// Below this e^x is under f32's smallest normal; softmax treats it as zero.
    const EXP_MIN: f32 = -87.0;

    /// e^x for x <= 0, the softmax's inputs once the maximum is subtracted.
    #[inline(always)]
    fn exp_nonpositive(x: f32) -> f32 {
        if x < EXP_MIN {
            return 0.0;
        }
        let n = (x * LOG2E + 0.5).floor();
        let r = (x - n * LN2_HI) - n * LN2_LO;
        let mut p = POLY[0];
        for c in &POLY[1..] {
            p = p * r + c;
        }
        let y = (p * (r * r) + r) + 1.0;
        y * f32::from_bits(((n as i32 + 127) << 23) as u32)
    }

    /// In-place softmax.
    pub fn softmax(x: &mut [f32]) {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let n8 = x.len() / 8 * 8;
        let mut acc = [0f32; 8];
        for c in x[..n8].chunks_exact_mut(8) {
            for (a, v) in acc.iter_mut().zip(c) {
                *v = exp_nonpositive(*v - max);
                *a += *v;
            }
        }
        let mut sum = sum_lanes(acc);
        for v in &mut x[n8..] {
            *v = exp_nonpositive(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        x.iter_mut().for_each(|v| *v *= inv);
    }

    #[cfg(target_arch = "x86_64")]
    pub use avx2::{axpys_avx2, dots_avx2, softmax_avx2};

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        use super::*;

        #[inline(always)]
        unsafe fn load_f16(p: &[u16], i: usize) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr().add(i) as *const __m128i))
        }

        /// Four rows' lane sums at once, each in [`super::sum_lanes`]' order.
        #[inline(always)]
        unsafe fn sum_lanes4(a: [__m256; 4]) -> [f32; 4] {
            let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            let mut out = [0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), s);
            out
        }

        /// [`super::dots`], four rows per pass: four independent sums hide the add latency and
        /// share each load of `q`.
        #[target_feature(enable = "avx2,f16c")]
        pub unsafe fn dots_avx2(q: &[f32], rows: Rows<'_>, out: &mut [f32]) {
            let (hd, n8) = (q.len(), q.len() / 8 * 8);
            assert_eq!(hd, rows.len);
            let out = &mut out[..rows.n];
            let mut j = 0;
            while j + 4 <= rows.n {
                let r = [
                    rows.row(j),
                    rows.row(j + 1),
                    rows.row(j + 2),
                    rows.row(j + 3),
                ];
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i < n8 {
                    let x = _mm256_loadu_ps(q.as_ptr().add(i));
                    for k in 0..4 {
                        acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(x, load_f16(r[k], i)));
                    }
                    i += 8;
                }
                let s = sum_lanes4(acc);
                for k in 0..4 {
                    let mut v = s[k];
                    for i in n8..hd {
                        v += q[i] * f32_of(r[k][i]);
                    }
                    out[j + k] = v;
                }
                j += 4;
            }
            for (jj, o) in out.iter_mut().enumerate().skip(j) {
                *o = dot(q, rows.row(jj));
            }
        }

        /// [`super::softmax`], eight lanes at a time.
        #[target_feature(enable = "avx2,f16c")]
        pub unsafe fn softmax_avx2(x: &mut [f32]) {
            let n8 = x.len() / 8 * 8;
            let p = x.as_mut_ptr();
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            for i in (0..n8).step_by(8) {
                m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let max = lanes
                .iter()
                .chain(&x[n8..])
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let (maxv, mut acc) = (_mm256_set1_ps(max), _mm256_setzero_ps());
            for i in (0..n8).step_by(8) {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), maxv));
                _mm256_storeu_ps(p.add(i), e);
                acc = _mm256_add_ps(acc, e);
            }
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            let mut sum = sum_lanes(lanes);
            for v in &mut x[n8..] {
                *v = exp_nonpositive(*v - max);
                sum += *v;
            }
            let inv = 1.0 / sum;
            let invv = _mm256_set1_ps(inv);
            for i in (0..n8).step_by(8) {
                _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), invv));
            }
            x[n8..].iter_mut().for_each(|v| *v *= inv);
        }

        /// [`exp_nonpositive`] of eight lanes, operation for operation.
        #[inline(always)]
        unsafe fn exp8(x: __m256) -> __m256 {
            let tiny = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_MIN), _CMP_LT_OQ);
            let n = _mm256_floor_ps(_mm256_add_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                _mm256_set1_ps(0.5),
            ));
            let r = _mm256_sub_ps(
                _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
                _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
            );
            let mut p = _mm256_set1_ps(POLY[0]);
            for c in &POLY[1..] {
                p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(*c));
            }
            let y = _mm256_add_ps(
                _mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r),
                _mm256_set1_ps(1.0),
            );
            let e = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            let y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
            _mm256_andnot_ps(tiny, y)
        }

        /// [`super::axpys`] with the output held in registers across the block's rows, for the
        /// usual head sizes; others go row by row through memory.
        #[target_feature(enable = "avx2,f16c")]
        pub unsafe fn axpys_avx2(o: &mut [f32], w: &[f32], rows: Rows<'_>) {
            assert_eq!(o.len(), rows.len);
            match o.len() {
                64 => axpys_fixed::<8>(o, w, rows),
                128 => axpys_fixed::<16>(o, w, rows),
                _ => super::axpys(o, w, rows),
            }
        }

        #[inline(always)]
        unsafe fn axpys_fixed<const C: usize>(o: &mut [f32], w: &[f32], rows: Rows<'_>) {
            let mut acc = [_mm256_setzero_ps(); C];
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(o.as_ptr().add(8 * c));
            }
            for (j, &wj) in w[..rows.n].iter().enumerate() {
                let (wv, r) = (_mm256_set1_ps(wj), rows.row(j));
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, load_f16(r, 8 * c)));
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * c), *a);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn f16_vec(n: usize, seed: u64) -> Vec<u16> {
            crate::testing::random_vec(n, seed)
                .iter()
                .map(|&x| f16::from_f32(x).to_bits())
                .collect()
        }

        /// A block of `n` rows, `width` apart, the head at column `at`.
        fn block(n: usize, width: usize, seed: u64) -> Vec<u16> {
            f16_vec(n * width, seed)
        }

        #[test]
        fn the_avx2_build_agrees_bit_for_bit() {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                for hd in [1, 7, 8, 64, 67, 128] {
                    for n in [1, 3, 4, 5, 16] {
                        let width = 3 * hd + 5;
                        let data = block(n, width, (hd * n) as u64);
                        let rows = Rows {
                            data: &data,
                            width,
                            at: hd + 2,
                            len: hd,
                            n,
                        };
                        let q = crate::testing::random_vec(hd, hd as u64);
                        let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
                        dots(&q, rows, &mut want);
                        // SAFETY: the features were detected above.
                        unsafe { dots_avx2(&q, rows, &mut got) };
                        assert_eq!(got, want, "dots hd={hd} n={n}");
                        let w = crate::testing::random_vec(n, 7);
                        let (mut o1, mut o2) = (q.clone(), q.clone());
                        axpys(&mut o1, &w, rows);
                        // SAFETY: as above.
                        unsafe { axpys_avx2(&mut o2, &w, rows) };
                        assert_eq!(o1, o2, "axpys hd={hd} n={n}");
                    }
                }
            }
        }

        #[test]
        fn softmax_matches_libm_and_its_avx2_build_bit_for_bit() {
            for n in [1, 3, 8, 17, 300] {
                let x: Vec<f32> = crate::testing::random_vec(n, n as u64)
                    .iter()
                    .map(|v| v * 40.0)
                    .collect();
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
                let mut p = x.clone();
                softmax(&mut p);
                for (got, v) in p.iter().zip(&x) {
                    let want = ((v - max) as f64).exp() / sum;
                    assert!(
                        (*got as f64 - want).abs() < 1e-6 * (1e-3 + want),
                        "n={n}: {got} vs {want}"
                    );
                }
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("f16c")
                {
                    let mut q = x.clone();
                    // SAFETY: the features were detected just above.
                    unsafe { softmax_avx2(&mut q) };
                    assert_eq!(q, p, "n={n}");
                }
            }
            // Far below the maximum is exactly zero, not a denormal or NaN.
            let mut p = vec![0.0, -200.0, -87.5, -86.0];
            softmax(&mut p);
            assert_eq!((p[1], p[2]), (0.0, 0.0));
            assert!(p[3] > 0.0 && p[0] == 1.0);
        }

        #[test]
        fn the_exponential_is_within_two_ulp_of_f64() {
            let mut x = -87.0f32;
            while x <= 0.0 {
                let (got, want) = (exp_nonpositive(x), (x as f64).exp());
                assert!(
                    ((got as f64 - want) / want).abs() < 2.5e-7,
                    "e^{x}: {got} vs {want}"
                );
                x += 0.013;
            }
        }

        #[test]
        fn the_dot_matches_an_f64_reference() {
            for n in [1, 8, 67] {
                let a = crate::testing::random_vec(n, 1);
                let b = f16_vec(n, 2);
                let want: f64 = a
                    .iter()
                    .zip(&b)
                    .map(|(&x, &y)| x as f64 * f32_of(y) as f64)
                    .sum();
                let got = dot(&a, &b) as f64;
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "n={n}: {got} vs {want}"
                );
            }
        }
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
    }
}
