//! The KV cache seen by the forward pass: per sequence, per layer, per position.
//!
//! The forward pass only talks to [`KvSeq`], so the contiguous store here can be replaced by a
//! paged block pool (block tables, prefix sharing) without touching the model code.

/// One sequence's keys and values. Positions are written in order, each exactly once per layer.
pub trait KvSeq: Send + Sync {
    /// Number of positions stored (the next position to write).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Stores `k` and `v` (each `n_kv_heads * head_dim`) for `layer` at `pos`.
    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]);
    /// Key of `layer` at `pos` (all KV heads).
    fn key(&self, layer: usize, pos: usize) -> &[f32];
    /// Value of `layer` at `pos` (all KV heads).
    fn value(&self, layer: usize, pos: usize) -> &[f32];
    /// Marks positions `..len` as complete after a forward step wrote all layers.
    fn commit(&mut self, len: usize);
    /// Drops positions from `len` on (rolls back, e.g. after preemption).
    fn truncate(&mut self, len: usize);
}

/// A growable contiguous store, one `Vec` per layer, bounded by `max_positions`.
#[derive(Debug)]
pub struct ContiguousKv {
    width: usize,
    max_positions: usize,
    len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl ContiguousKv {
    pub fn new(n_layers: usize, width: usize, max_positions: usize) -> Self {
        ContiguousKv {
            width,
            max_positions,
            len: 0,
            k: vec![Vec::new(); n_layers],
            v: vec![Vec::new(); n_layers],
        }
    }
}

impl KvSeq for ContiguousKv {
    fn len(&self) -> usize {
        self.len
    }

    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        assert!(
            pos < self.max_positions,
            "KV position {pos} beyond the sequence limit {}",
            self.max_positions
        );
        assert_eq!(k.len(), self.width);
        let (ks, vs) = (&mut self.k[layer], &mut self.v[layer]);
        let at = pos * self.width;
        assert!(at <= ks.len(), "KV positions must be written in order");
        ks.truncate(at);
        vs.truncate(at);
        ks.extend_from_slice(k);
        vs.extend_from_slice(v);
    }

    fn key(&self, layer: usize, pos: usize) -> &[f32] {
        &self.k[layer][pos * self.width..(pos + 1) * self.width]
    }

    fn value(&self, layer: usize, pos: usize) -> &[f32] {
        &self.v[layer][pos * self.width..(pos + 1) * self.width]
    }

    fn commit(&mut self, len: usize) {
        self.len = len;
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
            k.truncate(self.len * self.width);
            v.truncate(self.len * self.width);
        }
    }
}
