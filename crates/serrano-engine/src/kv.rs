//! What the forward pass and the paged cache agree on: the [`KvCache`] a step reads and
//! writes, and the block size both lay positions out by. Kept apart so that neither
//! [`crate::model`] (which uses the cache) nor [`crate::paged`] (which implements it) imports
//! the other.

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// The KV cache as one forward step sees it, sequences numbered by their place in the step.
/// Positions are written in order before they are read; the paged pool implements it.
pub trait KvCache: Sync {
    /// Stores `k` and `v` (each `n_kv_heads * head_dim`) of `seq` for `layer` at `pos`.
    fn write(&mut self, seq: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]);
    /// Positions per block.
    fn block_tokens(&self) -> usize;
    /// The values (or keys) of `seq` at `layer` for the positions of its `i`-th block, as f16
    /// bits. Values: `block_tokens()` rows of `n_kv_heads * head_dim`, row `j` being position
    /// `i * block_tokens() + j`. Keys transposed: a row of `block_tokens()` positions per
    /// dimension (element `c * block_tokens() + j`), so a query meets a block's positions
    /// lane by lane. Positions past the sequence's length hold stale data.
    fn block(&self, seq: usize, layer: usize, value: bool, i: usize) -> &[u16];
}
