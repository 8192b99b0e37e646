//! Llama-family transformer: configuration from GGUF metadata, weights, and the batched forward
//! pass over sequences at different positions.

use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, TensorInfo};
pub use crate::kv::KvCache;
use crate::ops::{self, matmul, rmsnorm, QMatrix, Rope, RopeStyle};
use crate::paged::{BlockId, KvStorage, PagedStep};
use crate::quant::dequantize_row;

/// Element-wise work below this size runs on the calling thread (a fork-join costs more).
const PAR_MIN_ELEMS: usize = 1 << 14;

/// Tensors every layer must have (norms, Q, K, V, output, gate, up, down); a header claiming more
/// layers than the file has tensors for is corrupt.
const TENSORS_PER_LAYER: usize = 9;

/// The widest dimension a header may claim. The largest open models are ~2^14 wide with
/// vocabularies of ~2^18, so anything above 2^24 is a corrupt file, refused before it sizes an
/// allocation.
const MAX_WIDTH: usize = 1 << 24;

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
        let n_layers = u("block_count")?;
        let d_ff = u("feed_forward_length")?;
        // Every size below is read from the header before any tensor is checked against it, so a
        // corrupt one must be refused here, not after a vector sized by it failed to allocate.
        if n_layers == 0 || n_layers > f.tensors.len() / TENSORS_PER_LAYER {
            return Err(EngineError::Invalid(format!(
                "{n_layers} layers in a file of {} tensors",
                f.tensors.len()
            )));
        }
        for (what, width) in [
            ("embedding length", d_model),
            ("feed-forward length", d_ff),
            ("vocabulary", vocab_size),
            ("attention width", n_heads.saturating_mul(head_dim)),
        ] {
            if width == 0 || width > MAX_WIDTH {
                return Err(EngineError::Invalid(format!(
                    "{what} {width} is outside 1..={MAX_WIDTH}"
                )));
            }
        }
        Ok(ModelConfig {
            n_layers,
            d_ff,
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
    /// The output head is a matrix of its own, not the token embeddings.
    untied_head: bool,
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
            untied_head: !tied,
        })
    }

    /// Whether the output head is a matrix of its own (not the token embeddings).
    pub fn untied_head(&self) -> bool {
        self.untied_head
    }

    /// Bytes of weights read per decode step (the memory-bandwidth floor of one token).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// [`forward`](Self::forward) on the paged KV pool (sequence `i` on block table
    /// `tables[i]`), run on a kernel-pool thread rather than the caller's: every parallel op
    /// then forks from a worker whose peers are still spinning from the last op, instead of
    /// waking the pool from outside and sleeping until it is done (two thread wake-ups per op,
    /// ~240 ops a token).
    pub fn forward_paged(
        &self,
        storage: &mut KvStorage,
        tables: &[Vec<BlockId>],
        seqs: &[SeqStep<'_>],
    ) -> Result<Vec<Vec<f32>>> {
        let mut kv = PagedStep {
            storage,
            tables: tables.iter().map(Vec::as_slice).collect(),
        };
        rayon::scope(|_| self.forward(&mut kv, seqs))
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
            angles,
            tiles,
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
        let half = self.rope.dims / 2;
        angles.clear();
        angles.resize(n * half, (0.0, 0.0));
        for (t, a) in angles.chunks_exact_mut(half.max(1)).enumerate() {
            self.rope.angles(pos_of[t], a);
        }
        attention_tiles(seq_of, pos_of, tiles);
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
                let angles = &angles[t * half..(t + 1) * half];
                for head in q[t * qw..(t + 1) * qw].chunks_exact_mut(hd) {
                    self.rope.rotate(head, angles);
                }
                for head in k[t * kvw..(t + 1) * kvw].chunks_exact_mut(hd) {
                    self.rope.rotate(head, angles);
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
            // One task per (tile, KV head) serves the query heads of its group for every token
            // of the tile, so each cached key and value is converted once per task.
            let kv_ro: &dyn KvCache = kv;
            let out = ops::Scatter::new(att, qw);
            let (q_ro, tiles_ro) = (&*q, &*tiles);
            (0..tiles.len() * nkv).into_par_iter().for_each(|i| {
                let ((t0, len), kvh) = (tiles_ro[i / nkv], i % nkv);
                let cols = kvh * group * hd..(kvh + 1) * group * hd;
                let task = Attend {
                    kv: kv_ro,
                    seq: seq_of[t0],
                    layer: li,
                    n_pos: pos_of[t0] + 1,
                    tokens: len,
                    kv_head: kvh,
                    head_dim: hd,
                    scale,
                };
                let dst = |t: usize| {
                    let p = out.span((t, cols.start), cols.len());
                    // SAFETY: `span` checked the row against `att`; this task alone writes
                    // columns `cols` of its tile's tokens (tasks' (tile, head) pairs are
                    // disjoint), and `att` is not read until every task has returned.
                    unsafe { std::slice::from_raw_parts_mut(p, cols.len()) }
                };
                if len == 1 {
                    attend(&task, &q_ro[t0 * qw..][cols.clone()], dst(t0));
                    return;
                }
                ops::with_scratch(&TILE_IO, |(qs, os)| {
                    qs.clear();
                    for t in t0..t0 + len {
                        qs.extend_from_slice(&q_ro[t * qw..][cols.clone()]);
                    }
                    os.clear();
                    os.resize(qs.len(), 0.0);
                    attend(&task, qs, os);
                    for (k, o) in os.chunks_exact(cols.len()).enumerate() {
                        dst(t0 + k).copy_from_slice(o);
                    }
                });
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
                g.par_chunks_mut(c.d_ff)
                    .zip(up.par_chunks(c.d_ff))
                    .for_each(|(a, b)| vector::silu_mul(a, b));
            } else {
                vector::silu_mul(g, up);
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
    /// Rotary `(sin, cos)` per token and rotated pair.
    angles: Vec<(f32, f32)>,
    /// Attention tiles: (first token, tokens).
    tiles: Vec<(usize, usize)>,
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
            + self.angles.capacity() * 8
            + self.tiles.capacity() * 16
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

/// Most tokens of one sequence whose queries attend together: the tile's query heads (12 for
/// a group of three) keep their scores and outputs in registers while a block of keys and
/// values is converted from f16 once for all of them. Long prompts spend most of their time in
/// attention, and one token's three heads left that conversion a third of the work.
const ATTN_TILE: usize = 4;

/// Splits the step's tokens into attention tiles: runs of at most [`ATTN_TILE`] consecutive
/// positions of one sequence (a decode step's tokens are tiles of one).
fn attention_tiles(seq_of: &[usize], pos_of: &[usize], tiles: &mut Vec<(usize, usize)>) {
    tiles.clear();
    let mut t0 = 0;
    while t0 < seq_of.len() {
        let mut t = t0 + 1;
        while t < seq_of.len()
            && t - t0 < ATTN_TILE
            && seq_of[t] == seq_of[t0]
            && pos_of[t] == pos_of[t - 1] + 1
        {
            t += 1;
        }
        tiles.push((t0, t - t0));
        t0 = t;
    }
}

/// One (tile, KV head) attention task: the query heads of the group, for each of `tokens`
/// consecutive positions of one sequence, attend causally: token `k` of the tile to positions
/// `0..n_pos + k`.
struct Attend<'a> {
    kv: &'a dyn KvCache,
    seq: usize,
    layer: usize,
    n_pos: usize,
    tokens: usize,
    kv_head: usize,
    head_dim: usize,
    scale: f32,
}

/// Dispatches to a build for the widest vector unit the CPU has (AVX-512, or AVX2 with FMA).
/// Every build does the same operations in the same order (fused multiply-adds lane by lane,
/// the same softmax), so they agree bit for bit with the portable reference. `q` and `out`
/// hold the tile's tokens one after another, each token's group of heads together.
fn attend(task: &Attend<'_>, q: &[f32], out: &mut [f32]) {
    use vector::{Avx2, Avx512, Portable};
    ops::with_scratch(&SCORES, |s| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx2") && has!("fma") && has!("f16c") {
                // SAFETY: the build's features were detected just above.
                unsafe { attend_with::<Avx512>(task, q, out, s) };
                return;
            }
            if has!("avx2") && has!("fma") && has!("f16c") {
                // SAFETY: as above.
                unsafe { attend_with::<Avx2>(task, q, out, s) };
                return;
            }
        }
        // SAFETY: the portable build needs no feature.
        unsafe { attend_with::<Portable>(task, q, out, s) }
    })
}

/// Attention of one KV head's query groups over the cached positions, a block at a time: the
/// block's keys (stored transposed, a row of 16 positions per dimension) and values are
/// converted from f16 once for the whole tile, every query head is scored against the block's
/// 16 positions at once, then the values are summed with each head's output held in
/// registers. Each head's operations are those it gets alone, in the same order (its own
/// softmax length; values position by position), so a token's result does not depend on its
/// tile.
///
/// # Safety
/// The CPU must have `K`'s features.
unsafe fn attend_with<K: vector::Isa>(
    task: &Attend<'_>,
    q: &[f32],
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    use vector::BT;
    let hd = task.head_dim;
    let heads = q.len() / hd;
    let group = heads / task.tokens;
    assert!(group * task.tokens * hd == q.len() && out.len() == q.len());
    debug_assert_eq!(task.kv.block_tokens(), BT);
    // Positions head `h` attends to: its token's.
    let n_of = |h: usize| task.n_pos + h / group;
    let n_blocks = n_of(heads - 1).div_ceil(BT);
    // Each head's scores over whole blocks: the lanes past its positions are computed from
    // stale slots or later tokens' keys and never read.
    let stride = n_blocks * BT;
    // Every element is written by the scores kernel before it is read: grow, never clear
    // (zeroing it was 2% of a long prompt).
    let scores = &mut scratch.scores;
    if scores.len() < heads * stride {
        scores.resize(heads * stride, 0.0);
    }
    for b in 0..n_blocks {
        let keys = task.kv.block(task.seq, task.layer, false, b);
        let kt = &keys[task.kv_head * hd * BT..(task.kv_head + 1) * hd * BT];
        K::scores(q, hd, kt, task.scale, &mut scores[b * BT..], stride);
    }
    for h in 0..heads {
        K::softmax(&mut scores[h * stride..h * stride + n_of(h)]);
    }
    out.fill(0.0);
    for b in 0..n_blocks {
        let lo = b * BT;
        let in_block = |h: usize| n_of(h).saturating_sub(lo).min(BT);
        let values = task.kv.block(task.seq, task.layer, true, b);
        let width = values.len() / BT;
        let v = &values[task.kv_head * hd..];
        // Every head has the first token's positions; later tokens' heads then take their
        // few more, in order, so each output element still sums its positions in order.
        let common = in_block(0);
        K::values(&scores[lo..], stride, common, v, width, hd, out);
        for h in group..heads {
            let n = in_block(h);
            if n > common {
                let p = &scores[h * stride + lo + common..];
                let o = &mut out[h * hd..(h + 1) * hd];
                K::values(p, stride, n - common, &v[common * width..], width, hd, o);
            }
        }
    }
}

/// Attention's working memory, reused across tasks so a decode step allocates none.
#[derive(Default)]
struct AttnScratch {
    scores: Vec<f32>,
}

thread_local! {
    static SCORES: std::cell::RefCell<AttnScratch> = Default::default();
    /// A tile's queries gathered and its outputs before they are scattered to their tokens.
    static TILE_IO: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = Default::default();
}

/// The forward pass's f32 vector kernels: attention and the SiLU gate.
///
/// Attention: keys arrive transposed (`k[d * 16 + j]` is dimension `d` of position
/// `j`), so a query scores all 16 positions of a block with one broadcast-and-FMA per
/// dimension and no sum across lanes; each score is two chains (even and odd dimensions)
/// added, then scaled. Values are summed position by position, in order, one fused
/// multiply-add per output element each. The softmax sums its exponentials in eight lanes,
/// then pairwise. The portable code is the reference; the AVX2 and AVX-512 builds (written
/// with intrinsics: LLVM left the portable loops scalar) do each lane's operations in the
/// same order, so all three agree bit for bit.
mod vector {
    use half::f16;

    /// Positions per KV block ([`crate::kv::BLOCK_TOKENS`]).
    pub const BT: usize = crate::kv::BLOCK_TOKENS;

    /// One build of the kernels.
    pub trait Isa {
        /// `out[h * stride + j] = scale * q_h · k_j` for the block's 16 positions, for every
        /// head `h` of `q` (`hd` values each); `k` is the head's transposed f16 keys.
        ///
        /// # Safety
        /// The CPU must have the build's features.
        unsafe fn scores(
            q: &[f32],
            hd: usize,
            k: &[u16],
            scale: f32,
            out: &mut [f32],
            stride: usize,
        );
        /// `out_h += Σ_j p[h * stride + j] * v_j` over the block's first `n` positions in
        /// order, for every head `h` of `out` (`hd` values each); value row `j` is the f16
        /// `v[j * width..][..hd]`.
        ///
        /// # Safety
        /// As for [`Isa::scores`].
        #[allow(clippy::too_many_arguments)]
        unsafe fn values(
            p: &[f32],
            stride: usize,
            n: usize,
            v: &[u16],
            width: usize,
            hd: usize,
            out: &mut [f32],
        );
        /// In-place softmax.
        ///
        /// # Safety
        /// As for [`Isa::scores`].
        unsafe fn softmax(x: &mut [f32]);
    }

    pub struct Portable;
    pub struct Avx2;
    pub struct Avx512;

    #[inline(always)]
    fn f32_of(b: u16) -> f32 {
        f16::from_bits(b).to_f32()
    }

    impl Isa for Portable {
        unsafe fn scores(
            q: &[f32],
            hd: usize,
            k: &[u16],
            scale: f32,
            out: &mut [f32],
            stride: usize,
        ) {
            for (h, qh) in q.chunks_exact(hd).enumerate() {
                let (mut even, mut odd) = ([0f32; BT], [0f32; BT]);
                for d in 0..hd {
                    let chain = if d % 2 == 0 { &mut even } else { &mut odd };
                    for j in 0..BT {
                        chain[j] = qh[d].mul_add(f32_of(k[d * BT + j]), chain[j]);
                    }
                }
                for j in 0..BT {
                    out[h * stride + j] = (even[j] + odd[j]) * scale;
                }
            }
        }

        unsafe fn values(
            p: &[f32],
            stride: usize,
            n: usize,
            v: &[u16],
            width: usize,
            hd: usize,
            out: &mut [f32],
        ) {
            for (h, o) in out.chunks_exact_mut(hd).enumerate() {
                for j in 0..n {
                    let w = p[h * stride + j];
                    for (a, &x) in o.iter_mut().zip(&v[j * width..j * width + hd]) {
                        *a = w.mul_add(f32_of(x), *a);
                    }
                }
            }
        }

        unsafe fn softmax(x: &mut [f32]) {
            softmax(x)
        }
    }

    /// The vector builds (off x86, the portable one under their names, so `attend` is one
    /// piece of code).
    macro_rules! build {
        ($name:ident, $scores:path, $values:path, $softmax:path) => {
            impl Isa for $name {
                unsafe fn scores(
                    q: &[f32],
                    hd: usize,
                    k: &[u16],
                    scale: f32,
                    out: &mut [f32],
                    stride: usize,
                ) {
                    $scores(q, hd, k, scale, out, stride)
                }
                unsafe fn values(
                    p: &[f32],
                    stride: usize,
                    n: usize,
                    v: &[u16],
                    width: usize,
                    hd: usize,
                    out: &mut [f32],
                ) {
                    $values(p, stride, n, v, width, hd, out)
                }
                unsafe fn softmax(x: &mut [f32]) {
                    $softmax(x)
                }
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    build!(Avx2, x86::scores_avx2, x86::values_avx2, x86::softmax_avx2);
    #[cfg(target_arch = "x86_64")]
    build!(
        Avx512,
        x86::scores_avx512,
        x86::values_avx512,
        x86::softmax_avx512
    );
    #[cfg(not(target_arch = "x86_64"))]
    build!(Avx2, Portable::scores, Portable::values, Portable::softmax);
    #[cfg(not(target_arch = "x86_64"))]
    build!(
        Avx512,
        Portable::scores,
        Portable::values,
        Portable::softmax
    );

    /// `g = silu(g) * up` elementwise, in the AVX2 build where the CPU has it (the same
    /// operations, so the same bits: libm's `expf`, a call per element, was a tenth of
    /// prefill).
    pub fn silu_mul(g: &mut [f32], up: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected just above.
            unsafe { x86::silu_mul_avx2(g, up) };
            return;
        }
        for (a, &b) in g.iter_mut().zip(up) {
            *a = silu(*a) * b;
        }
    }

    /// `x / (1 + e^-x)`, through the softmax's exponential of a non-positive argument: for
    /// negative `x` as `x e^x / (1 + e^x)`, which neither overflows nor loses precision.
    #[inline(always)]
    fn silu(x: f32) -> f32 {
        let e = exp_nonpositive(-x.abs());
        let num = if x >= 0.0 { x } else { x * e };
        num / (1.0 + e)
    }

    #[inline(always)]
    fn sum_lanes(l: [f32; 8]) -> f32 {
        ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
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
        let inv = finish_sum(&mut x[n8..], max, acc);
        x.iter_mut().for_each(|v| *v *= inv);
    }

    /// The end of every build's softmax sum: the eight lanes added pairwise, then the
    /// exponentials of the elements past the last whole vector, in order; returns 1 / sum.
    #[inline(always)]
    fn finish_sum(tail: &mut [f32], max: f32, lanes: [f32; 8]) -> f32 {
        let mut sum = sum_lanes(lanes);
        for v in tail {
            *v = exp_nonpositive(*v - max);
            sum += *v;
        }
        1.0 / sum
    }

    #[cfg(target_arch = "x86_64")]
    // Register tiles are indexed by head and vector number together; iterators over one of
    // them would hide the tile's shape.
    #[allow(clippy::needless_range_loop)]
    mod x86 {
        use std::arch::x86_64::*;

        use super::*;

        /// Most query heads scored together against one block of keys: two chains each,
        /// 24 of the 32 registers (an attention tile's four tokens of a group of three).
        const MAX_HEADS: usize = 12;

        /// Sixteen f16 values as f32.
        #[inline(always)]
        unsafe fn h16(p: *const u16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }

        /// Eight f16 values as f32.
        #[inline(always)]
        unsafe fn h8(p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }

        #[target_feature(enable = "avx512f,fma,f16c")]
        pub unsafe fn scores_avx512(
            q: &[f32],
            hd: usize,
            k: &[u16],
            scale: f32,
            out: &mut [f32],
            stride: usize,
        ) {
            let heads = q.len() / hd;
            assert!(k.len() >= hd * BT && out.len() >= (heads.max(1) - 1) * stride + BT);
            let mut h = 0;
            while h < heads {
                let (qp, op) = (q.as_ptr().add(h * hd), out.as_mut_ptr().add(h * stride));
                let take = match heads - h {
                    r if r >= MAX_HEADS => MAX_HEADS,
                    r if r >= 8 => 8,
                    r => r.min(4),
                };
                match take {
                    MAX_HEADS => scores512::<MAX_HEADS>(qp, hd, k.as_ptr(), scale, op, stride),
                    8 => scores512::<8>(qp, hd, k.as_ptr(), scale, op, stride),
                    4 => scores512::<4>(qp, hd, k.as_ptr(), scale, op, stride),
                    3 => scores512::<3>(qp, hd, k.as_ptr(), scale, op, stride),
                    2 => scores512::<2>(qp, hd, k.as_ptr(), scale, op, stride),
                    _ => scores512::<1>(qp, hd, k.as_ptr(), scale, op, stride),
                }
                h += take;
            }
        }

        /// `H` heads against one block: each dimension's 16 keys converted once for all of
        /// them, `2 H` chains side by side.
        #[inline(always)]
        unsafe fn scores512<const H: usize>(
            q: *const f32,
            hd: usize,
            k: *const u16,
            scale: f32,
            out: *mut f32,
            stride: usize,
        ) {
            let mut even = [_mm512_setzero_ps(); H];
            let mut odd = [_mm512_setzero_ps(); H];
            let mut d = 0;
            while d + 2 <= hd {
                let (k0, k1) = (h16(k.add(d * BT)), h16(k.add((d + 1) * BT)));
                for i in 0..H {
                    even[i] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(i * hd + d)), k0, even[i]);
                    odd[i] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(i * hd + d + 1)), k1, odd[i]);
                }
                d += 2;
            }
            if d < hd {
                let k0 = h16(k.add(d * BT));
                for i in 0..H {
                    even[i] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(i * hd + d)), k0, even[i]);
                }
            }
            let sc = _mm512_set1_ps(scale);
            for i in 0..H {
                let s = _mm512_mul_ps(_mm512_add_ps(even[i], odd[i]), sc);
                _mm512_storeu_ps(out.add(i * stride), s);
            }
        }

        #[target_feature(enable = "avx512f,fma,f16c")]
        pub unsafe fn values_avx512(
            p: &[f32],
            stride: usize,
            n: usize,
            v: &[u16],
            width: usize,
            hd: usize,
            out: &mut [f32],
        ) {
            let heads = out.len() / hd;
            assert!(n <= BT && (n == 0 || v.len() >= (n - 1) * width + hd));
            assert!(p.len() >= (heads.max(1) - 1) * stride + n);
            let (pp, vp, op) = (p.as_ptr(), v.as_ptr(), out.as_mut_ptr());
            // The usual head sizes keep every head's output in registers across the block
            // (`H` heads of `C` vectors); an attention tile's many heads go 12 at a time,
            // two vectors of each per pass; other sizes a vector at a time.
            let args = (pp, stride, n, vp, width, hd, op);
            match hd {
                64 | 128 if heads >= WIDE_HEADS => values_wide(args, heads),
                64 => values_tiled::<3, 4>(args, heads),
                128 => values_tiled::<2, 8>(args, heads),
                _ => {
                    for h in 0..heads {
                        let o = op.add(h * hd);
                        let mut c = 0;
                        while c + 16 <= hd {
                            let mut a = _mm512_loadu_ps(o.add(c));
                            for j in 0..n {
                                let w = _mm512_set1_ps(*pp.add(h * stride + j));
                                a = _mm512_fmadd_ps(w, h16(vp.add(j * width + c)), a);
                            }
                            _mm512_storeu_ps(o.add(c), a);
                            c += 16;
                        }
                        for c in c..hd {
                            for j in 0..n {
                                let x = f32_of(*vp.add(j * width + c));
                                *o.add(c) = (*pp.add(h * stride + j)).mul_add(x, *o.add(c));
                            }
                        }
                    }
                }
            }
        }

        /// Where [`values512`] reads and writes: probabilities, their stride, positions, value
        /// rows, their width, head size, outputs.
        type ValueArgs = (*const f32, usize, usize, *const u16, usize, usize, *mut f32);

        /// Heads summed together by [`values_wide`]: two vectors of each in registers.
        const WIDE_HEADS: usize = 12;

        /// [`values512`] over `heads` heads, [`WIDE_HEADS`] at a time and 32 columns per
        /// pass, then the rest as [`values_tiled`] does; a head size a multiple of 32.
        #[inline(always)]
        unsafe fn values_wide(a: ValueArgs, heads: usize) {
            let (p, stride, n, v, width, hd, out) = a;
            let mut h = 0;
            while h + WIDE_HEADS <= heads {
                for c in (0..hd).step_by(32) {
                    let (pv, po) = (v.add(c), out.add(h * hd + c));
                    values_pair512::<WIDE_HEADS>(p.add(h * stride), stride, n, pv, width, hd, po);
                }
                h += WIDE_HEADS;
            }
            let rest = (p.add(h * stride), stride, n, v, width, hd, out.add(h * hd));
            match hd {
                64 => values_tiled::<3, 4>(rest, heads - h),
                _ => values_tiled::<2, 8>(rest, heads - h),
            }
        }

        /// [`values512`] of two vectors (32 columns) of `H` heads, each position's two value
        /// vectors converted first and each head's probability broadcast once for both: the
        /// `2 H` sums, two values and one probability fill 27 registers (converting per
        /// vector, as [`values512`] does, kept all `H` probabilities live and spilled).
        #[inline(always)]
        unsafe fn values_pair512<const H: usize>(
            p: *const f32,
            stride: usize,
            n: usize,
            v: *const u16,
            width: usize,
            hd: usize,
            out: *mut f32,
        ) {
            let mut acc = [[_mm512_setzero_ps(); 2]; H];
            for i in 0..H {
                for c in 0..2 {
                    acc[i][c] = _mm512_loadu_ps(out.add(i * hd + 16 * c));
                }
            }
            for j in 0..n {
                let row = v.add(j * width);
                let x = [h16(row), h16(row.add(16))];
                for i in 0..H {
                    let w = _mm512_set1_ps(*p.add(i * stride + j));
                    acc[i][0] = _mm512_fmadd_ps(w, x[0], acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(w, x[1], acc[i][1]);
                }
            }
            for i in 0..H {
                for c in 0..2 {
                    _mm512_storeu_ps(out.add(i * hd + 16 * c), acc[i][c]);
                }
            }
        }

        /// [`values512`] over `heads` heads, `H` at a time, then one at a time.
        #[inline(always)]
        unsafe fn values_tiled<const H: usize, const C: usize>(a: ValueArgs, heads: usize) {
            let (p, stride, n, v, width, hd, out) = a;
            let mut h = 0;
            while h + H <= heads {
                values512::<H, C>(p.add(h * stride), stride, n, v, width, hd, out.add(h * hd));
                h += H;
            }
            while h < heads {
                values512::<1, C>(p.add(h * stride), stride, n, v, width, hd, out.add(h * hd));
                h += 1;
            }
        }

        #[inline(always)]
        unsafe fn values512<const H: usize, const C: usize>(
            p: *const f32,
            stride: usize,
            n: usize,
            v: *const u16,
            width: usize,
            hd: usize,
            out: *mut f32,
        ) {
            let mut acc = [[_mm512_setzero_ps(); C]; H];
            for i in 0..H {
                for c in 0..C {
                    acc[i][c] = _mm512_loadu_ps(out.add(i * hd + 16 * c));
                }
            }
            for j in 0..n {
                let row = v.add(j * width);
                for c in 0..C {
                    let x = h16(row.add(16 * c));
                    for i in 0..H {
                        let w = _mm512_set1_ps(*p.add(i * stride + j));
                        acc[i][c] = _mm512_fmadd_ps(w, x, acc[i][c]);
                    }
                }
            }
            for i in 0..H {
                for c in 0..C {
                    _mm512_storeu_ps(out.add(i * hd + 16 * c), acc[i][c]);
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn scores_avx2(
            q: &[f32],
            hd: usize,
            k: &[u16],
            scale: f32,
            out: &mut [f32],
            stride: usize,
        ) {
            let heads = q.len() / hd;
            assert!(k.len() >= hd * BT && out.len() >= (heads.max(1) - 1) * stride + BT);
            let mut h = 0;
            while h < heads {
                let (qp, op) = (q.as_ptr().add(h * hd), out.as_mut_ptr().add(h * stride));
                // Three heads' 12 accumulators and the 4 key vectors fill AVX2's 16 registers.
                match (heads - h).min(3) {
                    3 => scores256::<3>(qp, hd, k.as_ptr(), scale, op, stride),
                    2 => scores256::<2>(qp, hd, k.as_ptr(), scale, op, stride),
                    _ => scores256::<1>(qp, hd, k.as_ptr(), scale, op, stride),
                }
                h += 3;
            }
        }

        /// [`scores512`] in two halves of eight lanes.
        #[inline(always)]
        unsafe fn scores256<const H: usize>(
            q: *const f32,
            hd: usize,
            k: *const u16,
            scale: f32,
            out: *mut f32,
            stride: usize,
        ) {
            let z = _mm256_setzero_ps();
            let (mut even, mut odd) = ([[z; 2]; H], [[z; 2]; H]);
            let mut d = 0;
            while d + 2 <= hd {
                let k0 = [h8(k.add(d * BT)), h8(k.add(d * BT + 8))];
                let k1 = [h8(k.add((d + 1) * BT)), h8(k.add((d + 1) * BT + 8))];
                for i in 0..H {
                    let q0 = _mm256_set1_ps(*q.add(i * hd + d));
                    let q1 = _mm256_set1_ps(*q.add(i * hd + d + 1));
                    for half in 0..2 {
                        even[i][half] = _mm256_fmadd_ps(q0, k0[half], even[i][half]);
                        odd[i][half] = _mm256_fmadd_ps(q1, k1[half], odd[i][half]);
                    }
                }
                d += 2;
            }
            if d < hd {
                let k0 = [h8(k.add(d * BT)), h8(k.add(d * BT + 8))];
                for i in 0..H {
                    let q0 = _mm256_set1_ps(*q.add(i * hd + d));
                    for half in 0..2 {
                        even[i][half] = _mm256_fmadd_ps(q0, k0[half], even[i][half]);
                    }
                }
            }
            let sc = _mm256_set1_ps(scale);
            for i in 0..H {
                for half in 0..2 {
                    let s = _mm256_mul_ps(_mm256_add_ps(even[i][half], odd[i][half]), sc);
                    _mm256_storeu_ps(out.add(i * stride + 8 * half), s);
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn values_avx2(
            p: &[f32],
            stride: usize,
            n: usize,
            v: &[u16],
            width: usize,
            hd: usize,
            out: &mut [f32],
        ) {
            let heads = out.len() / hd;
            assert!(n <= BT && (n == 0 || v.len() >= (n - 1) * width + hd));
            assert!(p.len() >= (heads.max(1) - 1) * stride + n);
            let (pp, vp, op) = (p.as_ptr(), v.as_ptr(), out.as_mut_ptr());
            for h in 0..heads {
                let o = op.add(h * hd);
                let mut c = 0;
                // Eight vectors (64 dimensions) of one head in registers at a time.
                while c + 64 <= hd {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_loadu_ps(o.add(c + 8 * i));
                    }
                    for j in 0..n {
                        let w = _mm256_set1_ps(*pp.add(h * stride + j));
                        let row = vp.add(j * width + c);
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(w, h8(row.add(8 * i)), *a);
                        }
                    }
                    for (i, a) in acc.iter().enumerate() {
                        _mm256_storeu_ps(o.add(c + 8 * i), *a);
                    }
                    c += 64;
                }
                while c + 8 <= hd {
                    let mut a = _mm256_loadu_ps(o.add(c));
                    for j in 0..n {
                        let w = _mm256_set1_ps(*pp.add(h * stride + j));
                        a = _mm256_fmadd_ps(w, h8(vp.add(j * width + c)), a);
                    }
                    _mm256_storeu_ps(o.add(c), a);
                    c += 8;
                }
                for c in c..hd {
                    for j in 0..n {
                        let x = f32_of(*vp.add(j * width + c));
                        *o.add(c) = (*pp.add(h * stride + j)).mul_add(x, *o.add(c));
                    }
                }
            }
        }

        /// [`super::silu_mul`], eight lanes at a time.
        #[target_feature(enable = "avx2")]
        pub unsafe fn silu_mul_avx2(g: &mut [f32], up: &[f32]) {
            let n = g.len().min(up.len());
            let n8 = n / 8 * 8;
            let (gp, upp) = (g.as_mut_ptr(), up.as_ptr());
            let sign = _mm256_set1_ps(-0.0);
            let (zero, one) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0));
            for i in (0..n8).step_by(8) {
                let x = _mm256_loadu_ps(gp.add(i));
                let e = exp8(_mm256_or_ps(x, sign));
                let positive = _mm256_cmp_ps(x, zero, _CMP_GE_OQ);
                let num = _mm256_blendv_ps(_mm256_mul_ps(x, e), x, positive);
                let s = _mm256_div_ps(num, _mm256_add_ps(one, e));
                _mm256_storeu_ps(gp.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(upp.add(i))));
            }
            for i in n8..n {
                g[i] = silu(g[i]) * up[i];
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
            let inv = finish_sum(&mut x[n8..], max, lanes);
            let invv = _mm256_set1_ps(inv);
            for i in (0..n8).step_by(8) {
                _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), invv));
            }
            x[n8..].iter_mut().for_each(|v| *v *= inv);
        }

        /// [`super::softmax`], sixteen lanes at a time: each 16-lane exponential's two halves
        /// go into the eight-lane sum one after the other, as two eight-lane steps would, so
        /// the bits are [`softmax_avx2`]'s (a long prompt's attention spent a tenth of its
        /// time here).
        #[target_feature(enable = "avx512f,avx2,f16c")]
        pub unsafe fn softmax_avx512(x: &mut [f32]) {
            let (n16, n8) = (x.len() / 16 * 16, x.len() / 8 * 8);
            let p = x.as_mut_ptr();
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..n16).step_by(16) {
                m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
            }
            let max = x[n16..]
                .iter()
                .copied()
                .fold(_mm512_reduce_max_ps(m), f32::max);
            let mut acc = _mm256_setzero_ps();
            let maxv = _mm512_set1_ps(max);
            for i in (0..n16).step_by(16) {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), maxv));
                _mm512_storeu_ps(p.add(i), e);
                acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
                let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e));
                acc = _mm256_add_ps(acc, _mm256_castpd_ps(hi));
            }
            if n8 > n16 {
                let e = exp8(_mm256_sub_ps(
                    _mm256_loadu_ps(p.add(n16)),
                    _mm256_set1_ps(max),
                ));
                _mm256_storeu_ps(p.add(n16), e);
                acc = _mm256_add_ps(acc, e);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            let inv = finish_sum(&mut x[n8..], max, lanes);
            let invv = _mm512_set1_ps(inv);
            for i in (0..n16).step_by(16) {
                _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), invv));
            }
            x[n16..].iter_mut().for_each(|v| *v *= inv);
        }

        /// [`exp8`] of sixteen lanes, operation for operation.
        #[inline(always)]
        unsafe fn exp16(x: __m512) -> __m512 {
            let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_MIN));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(
                _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), _mm512_set1_ps(0.5)),
            );
            let r = _mm512_sub_ps(
                _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(LN2_HI))),
                _mm512_mul_ps(n, _mm512_set1_ps(LN2_LO)),
            );
            let mut p = _mm512_set1_ps(POLY[0]);
            for c in &POLY[1..] {
                p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(*c));
            }
            let y = _mm512_add_ps(
                _mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r),
                _mm512_set1_ps(1.0),
            );
            let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvttps_epi32(n),
                _mm512_set1_epi32(127),
            ));
            let y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
            _mm512_maskz_mov_ps(!tiny, y)
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
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A reference in f64: scores of every head against 16 transposed keys, and the value
        /// sums of some probabilities.
        fn f16_vec(n: usize, seed: u64) -> Vec<u16> {
            crate::testing::random_vec(n, seed)
                .iter()
                .map(|&x| f16::from_f32(x).to_bits())
                .collect()
        }

        /// Scores of every head against 16 transposed keys, and value sums of rows `width`
        /// apart, in f64.
        fn reference(
            q: &[f32],
            hd: usize,
            k: &[u16],
            p: &[f32],
            (v, width): (&[u16], usize),
            n: usize,
        ) -> (Vec<f64>, Vec<f64>) {
            let heads = q.len() / hd;
            let mut s = vec![0f64; heads * BT];
            let mut o = vec![0f64; heads * hd];
            for h in 0..heads {
                for j in 0..BT {
                    s[h * BT + j] = (0..hd)
                        .map(|d| q[h * hd + d] as f64 * f32_of(k[d * BT + j]) as f64)
                        .sum();
                }
                for j in 0..n {
                    for d in 0..hd {
                        o[h * hd + d] += p[h * BT + j] as f64 * f32_of(v[j * width + d]) as f64;
                    }
                }
            }
            (s, o)
        }

        /// The kernels against an f64 reference, for head counts that take every chunk of
        /// heads and head sizes the vector builds special-case or not; and every vector build
        /// gives the portable build's bits.
        #[test]
        fn kernels_match_a_reference_and_every_build_agrees_bit_for_bit() {
            for (heads, hd, n) in [
                (1, 64, 16),
                (3, 64, 5),
                (12, 64, 16),
                (12, 64, 3),
                (14, 64, 9),
                (16, 128, 11),
                (8, 128, 16),
                (4, 128, 16),
                (3, 128, 7),
                (7, 6, 1),
                (5, 67, 9),
                (2, 80, 16),
            ] {
                let seed = (heads * hd + n) as u64;
                let q = crate::testing::random_vec(heads * hd, seed);
                let k = f16_vec(hd * BT, seed + 1);
                // Value rows `width` apart, the head at column 3.
                let width = hd + 5;
                let v = f16_vec(n.max(1) * width, seed + 2);
                let vh = &v[3..];
                let p = crate::testing::random_vec(heads * BT, seed + 3);
                let o0 = crate::testing::random_vec(heads * hd, seed + 4);
                // SAFETY (each build): its features are detected before it runs.
                let run = |build: &dyn Fn(&mut [f32], &mut [f32])| {
                    let (mut s, mut o) = (vec![0f32; heads * BT], o0.clone());
                    build(&mut s, &mut o);
                    (s, o)
                };
                let (s, o) = run(&|s, o| unsafe {
                    Portable::scores(&q, hd, &k, 0.5, s, BT);
                    Portable::values(&p, BT, n, vh, width, hd, o);
                });
                let (ws, wo) = reference(&q, hd, &k, &p, (vh, width), n);
                for (got, want) in s.iter().zip(&ws) {
                    assert!(
                        (*got as f64 - 0.5 * want).abs() < 1e-5 * (1.0 + want.abs()),
                        "scores {heads}x{hd}: {got} vs {want}"
                    );
                }
                for ((got, want), start) in o.iter().zip(&wo).zip(&o0) {
                    let want = want + *start as f64;
                    assert!(
                        (*got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "values {heads}x{hd}: {got} vs {want}"
                    );
                }
                #[cfg(target_arch = "x86_64")]
                {
                    use std::arch::is_x86_feature_detected as has;
                    if has!("avx2") && has!("fma") && has!("f16c") {
                        let got = run(&|s, o| unsafe {
                            Avx2::scores(&q, hd, &k, 0.5, s, BT);
                            Avx2::values(&p, BT, n, vh, width, hd, o);
                        });
                        assert_eq!(got, (s.clone(), o.clone()), "avx2 {heads}x{hd}x{n}");
                    }
                    if has!("avx512f") && has!("fma") {
                        let got = run(&|s, o| unsafe {
                            Avx512::scores(&q, hd, &k, 0.5, s, BT);
                            Avx512::values(&p, BT, n, vh, width, hd, o);
                        });
                        assert_eq!(got, (s.clone(), o.clone()), "avx512 {heads}x{hd}x{n}");
                    }
                }
            }
        }

        /// SiLU against f64 over a wide range (both signs, tiny and huge), and its AVX2
        /// build bit for bit, tail included.
        #[test]
        fn silu_matches_f64_and_its_avx2_build_bit_for_bit() {
            let x: Vec<f32> = (0..2003)
                .map(|i| (i as f32 - 1001.0) * 0.11)
                .chain([-200.0, 1e-30, -0.0, 95.0])
                .collect();
            let up: Vec<f32> = crate::testing::random_vec(x.len(), 3);
            let mut scalar = x.clone();
            for (a, &b) in scalar.iter_mut().zip(&up) {
                *a = silu(*a) * b;
            }
            for ((got, &v), &b) in scalar.iter().zip(&x).zip(&up) {
                let want = v as f64 / (1.0 + (-v as f64).exp()) * b as f64;
                assert!(
                    (*got as f64 - want).abs() <= 1e-6 * (1e-30 + want.abs()),
                    "silu({v}) * {b}: {got} vs {want}"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut simd = x.clone();
                // SAFETY: AVX2 was detected just above.
                unsafe { x86::silu_mul_avx2(&mut simd, &up) };
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&simd), bits(&scalar));
            }
        }

        #[test]
        fn softmax_matches_libm_and_its_vector_builds_bit_for_bit() {
            for n in [1, 3, 8, 16, 17, 24, 31, 300, 4099] {
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
                    unsafe { x86::softmax_avx2(&mut q) };
                    assert_eq!(q, p, "n={n}");
                }
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("f16c")
                {
                    let mut q = x.clone();
                    // SAFETY: the features were detected just above.
                    unsafe { x86::softmax_avx512(&mut q) };
                    assert_eq!(q, p, "avx512 n={n}");
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
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;

    /// Every token of an attention tile gets exactly the bits it gets alone through the
    /// portable reference, whatever the tile's length and wherever its positions fall against
    /// the KV blocks, for head sizes the vector builds special-case and one they do not.
    #[test]
    fn attention_tiles_give_each_token_its_bits_alone() {
        use vector::BT;
        for (nkv, group, hd, start) in [
            (3, 3, 64, 0),
            (3, 3, 64, 29),
            (1, 4, 128, 13),
            (2, 2, 16, 40),
            (1, 3, 64, 15),
        ] {
            let kvw = nkv * hd;
            let end = start + 2 * ATTN_TILE + 1;
            let blocks = end.div_ceil(BT);
            let mut storage = KvStorage::new(1, kvw, blocks);
            let table: Vec<BlockId> = (0..blocks as BlockId).collect();
            let mut kv = PagedStep {
                storage: &mut storage,
                tables: vec![&table],
            };
            for pos in 0..end {
                let (k, v) = (
                    random_vec(kvw, pos as u64),
                    random_vec(kvw, 5000 + pos as u64),
                );
                kv.write(0, 0, pos, &k, &v);
            }
            let cols = group * hd;
            let q = random_vec(end * nkv * cols, 7);
            let query = |t: usize, kvh: usize| &q[(t * nkv + kvh) * cols..][..cols];
            let task = |t0: usize, tokens: usize, kvh: usize| Attend {
                kv: &kv,
                seq: 0,
                layer: 0,
                n_pos: t0 + 1,
                tokens,
                kv_head: kvh,
                head_dim: hd,
                scale: 0.125,
            };
            for kvh in 0..nkv {
                let alone = |t: usize| {
                    let mut out = vec![0f32; cols];
                    let mut s = AttnScratch::default();
                    // SAFETY: the portable build needs no feature.
                    unsafe {
                        attend_with::<vector::Portable>(
                            &task(t, 1, kvh),
                            query(t, kvh),
                            &mut out,
                            &mut s,
                        )
                    };
                    out
                };
                for tokens in 1..=ATTN_TILE {
                    for t0 in (start..=end - tokens).step_by(tokens) {
                        let qs: Vec<f32> = (t0..t0 + tokens)
                            .flat_map(|t| query(t, kvh).to_vec())
                            .collect();
                        let mut out = vec![0f32; qs.len()];
                        attend(&task(t0, tokens, kvh), &qs, &mut out);
                        for (k, got) in out.chunks_exact(cols).enumerate() {
                            let want = alone(t0 + k);
                            let bits =
                                |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(got),
                                bits(&want),
                                "hd {hd} group {group} head {kvh}: token {} of a tile of {tokens} at {t0}",
                                t0 + k
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tiles_are_runs_of_consecutive_positions_of_one_sequence() {
        let mut tiles = Vec::new();
        // A 6-token prompt chunk, a decode, a 2-token chunk with a gap.
        let seq_of = [0, 0, 0, 0, 0, 0, 1, 2, 2, 2];
        let pos_of = [10, 11, 12, 13, 14, 15, 7, 0, 1, 5];
        attention_tiles(&seq_of, &pos_of, &mut tiles);
        assert_eq!(tiles, [(0, 4), (4, 2), (6, 1), (7, 2), (9, 1)]);
    }

    /// A header whose sizes the tensors cannot back is refused before it sizes anything (the
    /// fuzz test found `block_count` flipped to ~2^34 asking for a 1.7 TB vector of layers).
    #[test]
    fn sizes_the_tensors_cannot_back_are_refused_before_allocating() {
        use crate::gguf::Value;
        let bytes = crate::testing::TinyModel::default().gguf_bytes();
        let good = GgufFile::from_vec(bytes.clone()).unwrap();
        assert!(Model::load(&good).is_ok());
        for (key, value) in [
            ("llama.block_count", u64::MAX >> 20),
            ("llama.block_count", 0),
            ("llama.embedding_length", 1 << 40),
            ("llama.feed_forward_length", 1 << 40),
            ("llama.feed_forward_length", 0),
            ("llama.attention.key_length", 1 << 40),
        ] {
            let mut f = GgufFile::from_vec(bytes.clone()).unwrap();
            f.metadata.insert(key.into(), Value::U64(value));
            let err = Model::load(&f).map(|_| ()).unwrap_err();
            assert!(
                matches!(err, EngineError::Invalid(_)),
                "{key}={value}: {err}"
            );
        }
    }
}
